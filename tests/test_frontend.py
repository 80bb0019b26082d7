"""Text front end: normalization, sentence split, phonemes -> ids, limits."""

from __future__ import annotations

import json

import pytest

from piper_import import bundled_voice_paths
from runtime.frontend import EmptyTextError, TextFrontend, TextTooLongError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def voice():
    return json.loads(bundled_voice_paths()[1].read_text())


@pytest.fixture(scope="module")
def frontend(voice):
    return TextFrontend(voice, max_chars=200)


def test_sentence_split(frontend):
    text = "Dr. Smith went to Washington. He paid $5 - really?! Yes... J. R. Tolkien wrote it. Done"
    assert frontend.sentences(text) == [
        "Dr. Smith went to Washington.", "He paid $5 - really?!", "Yes...", "J. R. Tolkien wrote it.", "Done",
    ]
    assert frontend.sentences("  one\n\ntwo  ") == ["one two"]
    assert frontend.sentences("Hi! ... !!") == ["Hi!"]


@pytest.mark.parametrize("normalize", [True, False], ids=["read-out", "as-written"])
def test_abbreviation_periods_do_not_end_sentences(voice, normalize):
    frontend = TextFrontend(voice, max_chars=500, normalize_text=normalize)
    for text in ("The U.S. economy grew fast.", "See e.g. the manual.", "Dr. Smith arrived.",
                 "I saw the Dr. yesterday.", "The U.S. Army left.", "Call the Ph.D. students.", "At 3 p.m. today."):
        assert len(frontend.spoken_sentences(text)) == 1, text
    # a dotted abbreviation can still end a sentence: before a word that plainly starts one
    assert len(frontend.spoken_sentences("I live in the U.S. The weather is fine.")) == 2


def test_ids_use_the_voice_map(frontend, voice):
    ids = frontend.to_ids("Hello world.")
    id_map = voice["phoneme_id_map"]
    assert ids[0] == id_map["^"][0] and ids[-1] == id_map["$"][0]
    assert ids[1::2] == [id_map["_"][0]] * (len(ids) // 2)  # PAD after every symbol
    assert id_map["."][0] in ids
    assert all(0 <= i < 256 for i in ids)


def test_unknown_characters_are_dropped(frontend):
    plain = frontend.to_ids("Hello world")
    assert frontend.to_ids("Hello \U0001F600 world\u200b") == plain  # emoji, zero-width space
    assert frontend.to_ids("Hello\x07 world") == plain  # control character
    assert frontend.normalize("\u201cquoted\u201d \u2014 dash") == '"quoted" - dash'


def test_unknown_phonemes_are_dropped(voice):
    narrow = dict(voice)
    narrow["phoneme_id_map"] = {k: v for k, v in voice["phoneme_id_map"].items() if k != "ə"}
    fe = TextFrontend(narrow)
    ids = fe.to_ids("Hello")  # /həlˈoʊ/ contains the dropped schwa
    assert voice["phoneme_id_map"]["ə"][0] not in ids
    assert len(ids) == len(TextFrontend(voice).to_ids("Hello")) - 2


def test_limits_and_empty(frontend):
    with pytest.raises(TextTooLongError, match="limit is 200"):
        frontend.text_to_sentence_ids("a" * 201)
    assert frontend.text_to_sentence_ids("a" * 200)
    for empty in ("", "   ", "\U0001F600", "?!."):
        with pytest.raises(EmptyTextError):
            frontend.text_to_sentence_ids(empty)
    assert len(frontend.text_to_sentence_ids("One. Two! Three?")) == 3


def test_bad_config_is_refused(voice):
    with pytest.raises(ValueError, match="phoneme_id_map"):
        TextFrontend({"espeak_voice": "en-us"})
    with pytest.raises(ValueError, match="max_chars"):
        TextFrontend(voice, max_chars=0)
    with pytest.raises(TypeError):
        TextFrontend(voice).sentences(b"bytes")
