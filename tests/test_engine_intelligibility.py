"""ASR round trip with pocketsphinx: our engine must be as intelligible as Piper itself.

Both voices are decoded in the same run; white noise must decode to (almost) nothing so the
test cannot pass on garbage audio.
"""

from __future__ import annotations

import numpy as np
import pytest

from tts_testkit.asr import make_recognizer, word_error_rate
from tts_testkit.asr import words as _words

pocketsphinx = pytest.importorskip("pocketsphinx")

DRAWS = 4  # noise draws per sentence and voice

SENTENCES = [
    "The boy was there when the sun rose.",
    "Rice is often served in round bowls.",
    "I would like a cup of hot coffee.",
    "Please close the door when you leave.",
    "We went to the park on Sunday morning.",
    "My sister lives in a small house by the river.",
    "The children are playing in the garden.",
    "Turn left at the next street.",
    "He reads the newspaper every day.",
    "Can you help me find my keys?",
    "She bought a new car last week.",
    "Thank you very much for your help.",
    "The dog is sleeping under the table.",
]


@pytest.fixture(scope="module")
def recognize():
    return make_recognizer()


@pytest.mark.unit
def test_white_noise_decodes_to_nothing(recognize):
    noise = np.random.default_rng(0).normal(0, 0.3, 16000 * 3).astype(np.float32)
    assert len(_words(recognize(noise, 16000))) <= 1


@pytest.mark.integration
def test_wer_matches_piper(engine, recognize):
    from piper.config import SynthesisConfig
    from piper.voice import PiperVoice

    from piper_import import bundled_voice_paths

    assert len(SENTENCES) >= 10
    piper = PiperVoice.load(*bundled_voice_paths())
    ours, theirs = [], []
    # Both voices sample noise (piper's cannot be seeded): with one draw per sentence the mean
    # WER of either voice moved by 0.02-0.06 between draws (ours 0.013-0.071 over three seed
    # sets, piper 0.022-0.104), as much as the 0.05 being checked. DRAWS draws per sentence on
    # both sides keep the comparison about the voices rather than one noise sample.
    for draw in range(DRAWS):
        for k, text in enumerate(SENTENCES):
            wave = engine.synthesize_text(text, seed=k + 1000 * draw)
            ref_wave = np.concatenate([c.audio_float_array for c in piper.synthesize(text, SynthesisConfig())])
            ours.append(word_error_rate(text, recognize(wave, engine.sample_rate)))
            theirs.append(word_error_rate(text, recognize(ref_wave, piper.config.sample_rate)))
    ours_mean, piper_mean = float(np.mean(ours)), float(np.mean(theirs))
    print(f"mean WER ours={ours_mean:.3f} piper={piper_mean:.3f}")
    assert abs(ours_mean - piper_mean) <= 0.05, (ours, theirs)
    assert ours_mean < 0.3  # and the absolute level is sane
