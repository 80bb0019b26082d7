"""Phoneme ids equal to piper's (PiperVoice.phonemize + phonemes_to_ids, piper-tts as a library)
for a multilingual sentence set, with and without vowel_clusters, and for phoneme_type text."""

from __future__ import annotations

import json

import pytest

from runtime.frontend import TextFrontend
from piper_import import bundled_voice_paths

pytestmark = pytest.mark.unit

piper_voice = pytest.importorskip("piper.voice")
piper_config = pytest.importorskip("piper.config")

# one sentence each (sentence splitting is tested elsewhere): (espeak voice, text)
SENTENCES = [
    ("en-us", "Hi, how are you today? I'd like a house by the sea"),
    ("de", "Ich möchte heute Abend ein Buch über Häuser lesen."),
    ("fr", "Où est la bibliothèque, s'il vous plaît ?"),
    ("es", "El niño comió una manzana y bebió agua."),
    ("ru", "Мы пойдём в парк завтра утром."),
    ("cmn", "今天天气真好"),
    ("ar", "ذهب الولد إلى المدرسة"),
    ("hi", "मैं आज बाज़ार जा रहा हूँ।"),
]
CLUSTERS = [["a", "ɪ"], ["a", "ʊ"], ["e", "ɪ"], ["o", "ʊ"], ["ɔ", "ɪ"]]


def _config(espeak: str, clusters: bool, phoneme_type: str = "espeak") -> dict:
    cfg = json.loads(bundled_voice_paths()[1].read_text())
    cfg["espeak"] = {"voice": espeak}
    cfg["phoneme_type"] = phoneme_type
    cfg["num_speakers"] = 1
    if clusters:
        cfg["vowel_clusters"] = CLUSTERS
        for k, vc in enumerate(CLUSTERS):
            cfg["phoneme_id_map"]["".join(vc)] = [200 + k]
    return cfg


def _piper_ids(cfg: dict, text: str) -> list[list[int]]:
    voice = piper_voice.PiperVoice(session=None, config=piper_config.PiperConfig.from_dict(cfg))
    return [voice.phonemes_to_ids(p) for p in voice.phonemize(text)]


def _ours(cfg: dict, text: str) -> list[list[int]]:
    voice = dict(cfg, espeak_voice=(cfg.get("espeak") or {}).get("voice"))
    return [TextFrontend(voice).to_ids(s) for s in TextFrontend(voice).sentences(text)]


@pytest.mark.parametrize("clusters", [False, True], ids=["plain", "vowel_clusters"])
@pytest.mark.parametrize("espeak,text", SENTENCES, ids=[v for v, _ in SENTENCES])
def test_ids_equal_piper(espeak, text, clusters):
    cfg = _config(espeak, clusters)
    ours = _ours(cfg, text)
    assert ours == _piper_ids(cfg, text)
    assert ours and len(ours[0]) > 10


def test_vowel_clusters_merge_as_piper_does():
    text = "Hi, how are you today?"
    plain, merged = _ours(_config("en-us", False), text), _ours(_config("en-us", True), text)
    assert len(merged[0]) < len(plain[0])  # aɪ, aʊ, eɪ became one id each
    assert {200, 201, 202} <= set(merged[0])


def test_phoneme_map_is_not_applied():
    """piper 1.8 ignores phoneme_map; so must we, or the voice speaks other ids than trained."""
    cfg = _config("en-us", False)
    cfg["phoneme_map"] = {"h": ["x"]}
    assert _ours(cfg, "Hello there") == _piper_ids(cfg, "Hello there")


def test_phoneme_type_text_maps_codepoints():
    import unicodedata

    cfg = _config("en-us", False, "text")
    text = "ein schöner tag"
    decomposed = unicodedata.normalize("NFD", text)  # ö is o + combining diaeresis
    cfg["phoneme_id_map"] = {"_": [0], "^": [1], "$": [2]} | {ch: [10 + k] for k, ch in enumerate(sorted(set(decomposed)))}
    ours = _ours(cfg, text)
    assert ours == _piper_ids(cfg, text)
    assert len(ours[0]) == 2 * len(decomposed) + 3  # ^ _ (phoneme _)* $
