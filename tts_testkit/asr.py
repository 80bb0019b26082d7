"""Offline ASR round trip (pocketsphinx): waveform -> transcript, and word error rate.

One definition for tests/test_engine_intelligibility.py, tests/test_normalize.py and
bench/normalize.py.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np


def words(text: str) -> list[str]:
    """Lower-case words; hyphens and punctuation are word breaks ("twenty-six" = two words)."""
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, rw in enumerate(ref, 1):
        prev, row = row, [i] + [0] * len(hyp)
        for j, hw in enumerate(hyp, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (rw != hw))
    return row[-1] / max(len(ref), 1)


def make_recognizer() -> Callable[[np.ndarray, int], str]:
    """A pocketsphinx decoder (its bundled US English model) as wave, rate -> transcript."""
    import pocketsphinx
    import soxr

    decoder = pocketsphinx.Decoder(loglevel="FATAL")
    # pocketsphinx adapts its cepstral mean across utterances; starting each one from the same
    # state makes a waveform's transcript independent of what was decoded before it.
    initial_cmn = decoder.get_cmn()

    def run(wave: np.ndarray, rate: int) -> str:
        x = soxr.resample(np.asarray(wave, dtype=np.float32), rate, 16000)
        pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
        decoder.set_cmn(initial_cmn)
        decoder.start_utt()
        decoder.process_raw(pcm, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        return hyp.hypstr if hyp else ""

    return run
