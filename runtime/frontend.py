"""Text front end: clean, read numbers/dates/abbreviations out (runtime/normalize.py), split
into sentences, phonemize (piper's espeak-ng build), map to ids.

piper-tts is GPL; it is used here as a library only (EspeakPhonemizer, phonemes_to_ids).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from typing import Any, Iterator, NamedTuple

import structlog

from tts_common.errors import TtsError

from .normalize import DEFAULT_NORMALIZE_TEXT, language_of, normalizer_for

log = structlog.get_logger(__name__)

PAD, BOS, EOS = "_", "^", "$"

# Abbreviations whose trailing period does not end a sentence.
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "no",
    "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "approx", "dept", "fig", "gen", "gov", "lt", "col", "capt", "sgt",
}
# Dotted abbreviations ("U.S.", "Ph.D.", "p.m."): their last period ends a sentence only before a
# capitalized word that usually opens one ("... in the U.S. The weather"), never before a name
# or a lowercase word ("The U.S. Army", "the U.S. economy").
_DOTTED = re.compile(r"(?:[a-z]{1,2}\.)+[a-z]{1,2}")
_SENTENCE_STARTERS = {
    "the", "a", "an", "it", "its", "this", "that", "these", "those", "there", "they", "we", "he", "she", "i",
    "you", "my", "our", "his", "her", "their", "your", "but", "and", "so", "then", "if", "when", "what", "why",
    "how", "who", "in", "on", "at", "yes", "no", "now", "today", "also", "however",
}
# Latin sentence ends need a following space ("3.14", "e.g.x" stay whole); CJK, Devanagari,
# Arabic/Urdu and Ethiopic ends stand alone (those scripts put no space after them).
_SENTENCE_END = re.compile(
    r"([.!?…]+[\"'”’)\]]*)(\s+)|([。！？；｡।॥؟۔።፧]+[\"'”’)\]」』）]*)(\s*)"
)
# Clause ends inside a sentence: where an over-long sentence is cut first.
# Latin marks need a following space, so "1,000" and "12:30" stay whole.
_CLAUSE_END = re.compile(r"[,;:]+[\"'”’)\]]*\s+|[，、；：،؛]+[\"'”’)\]」』）]*\s*|\s+-\s+")
# Longest utterance (phoneme ids, BOS/EOS included) the engine is given; the runtime's
# `max_utterance_ids` (docs/runtime.md "Bounds" has the measurements behind the default:
# memory grows with the square of an utterance, and one utterance is the least a short
# request may have to wait for). 400 ids are about 17 s of speech.
DEFAULT_MAX_UTTERANCE_IDS = 400
MIN_UTTERANCE_IDS = 32
# Typographic variants folded to what espeak and the phoneme map know.
_FOLD = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ",
    "\u2026": "...", "\u00a0": " ",
})
# Unicode categories that carry speakable content: letters, marks, digits, punctuation,
# currency/math symbols (espeak reads "$", "%", "+"), separators.
_KEEP_CATEGORIES = ("L", "M", "N", "P", "Sc", "Sm", "Zs")


class TextTooLongError(TtsError, ValueError):
    """Text exceeds the configured character limit (the API layer answers 413)."""


class EmptyTextError(TtsError, ValueError):
    """Nothing speakable was left after normalization."""


class Utterance(NamedTuple):
    """One piece of engine work: its ids, and whether a sentence ends with it (then the
    sentence pause follows; a sentence cut for length joins its next piece with none)."""

    ids: list[int]
    ends_sentence: bool


class TextFrontend:
    def __init__(self, voice_config: dict[str, Any], max_chars: int = 5000,
                 max_utterance_ids: int = DEFAULT_MAX_UTTERANCE_IDS, normalize_text: bool = DEFAULT_NORMALIZE_TEXT):
        self.phoneme_type: str = str(voice_config.get("phoneme_type") or "espeak")
        if self.phoneme_type not in ("espeak", "text"):
            raise ValueError(f"phoneme_type {self.phoneme_type!r} is not supported (espeak, text)")
        try:
            self.id_map: dict[str, list[int]] = dict(voice_config["phoneme_id_map"])
            self.espeak_voice: str | None = (None if self.phoneme_type == "text" else
                                             voice_config.get("espeak_voice") or voice_config["espeak"]["voice"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"voice config lacks {exc}: need phoneme_id_map and espeak_voice") from exc
        for sym in (PAD, BOS, EOS):
            if sym not in self.id_map:
                raise ValueError(f"phoneme_id_map lacks the special symbol {sym!r}")
        if max_chars <= 0:
            raise ValueError(f"max_chars must be positive, got {max_chars}")
        if max_utterance_ids < MIN_UTTERANCE_IDS:
            raise ValueError(f"max_utterance_ids must be at least {MIN_UTTERANCE_IDS}, got {max_utterance_ids}")
        self.max_chars = max_chars
        self.max_utterance_ids = max_utterance_ids
        # piper merges these vowel sequences into one phoneme (e.g. a + ɪ -> aɪ) when a voice
        # was trained with them; `phoneme_map` is NOT applied: piper 1.8 does not read it
        clusters = voice_config.get("vowel_clusters") or []
        self.vowel_clusters = {tuple(vc) for vc in clusters} or None
        # numbers, dates, abbreviations read out (runtime/normalize.py); None for a language
        # without rules, whose text then reaches espeak unchanged. Per voice: runtime.toml
        # `normalize_text` (set by runtime.models.load_engine).
        self.language = language_of(voice_config)
        self.normalizer = normalizer_for(self.language)
        self.normalize_text = normalize_text
        self._phonemizer = None
        self._tashkeel = None
        # espeak-ng keeps global state: one phonemization at a time per process.
        self._lock = threading.Lock()

    def _espeak(self):
        if self._phonemizer is None:
            from piper.phonemize_espeak import EspeakPhonemizer

            self._phonemizer = EspeakPhonemizer()
        return self._phonemizer

    def _diacritize(self, text: str) -> str:
        """Arabic: piper adds the short vowels with its bundled diacritizer before espeak (its
        voices were trained so); used here as a library, as piper's defaults do."""
        if self._tashkeel is None:
            from piper.tashkeel import TashkeelDiacritizer

            self._tashkeel = TashkeelDiacritizer()
        return self._tashkeel(text, taskeen_threshold=0.8)

    def normalize(self, text: str) -> str:
        """NFC, typographic folding, unspeakable characters dropped, whitespace collapsed
        (numbers and abbreviations stay as written: see spoken_sentences)."""
        return self._clean(self._checked(text))

    def _checked(self, text: str) -> str:
        # max_chars is a limit on what the client sent, never on the read-out text
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if len(text) > self.max_chars:
            raise TextTooLongError(f"text is {len(text)} characters; the limit is {self.max_chars}")
        return text

    @property
    def expands(self) -> bool:
        """Whether this voice reads numbers, dates and abbreviations out."""
        return self.normalize_text and self.normalizer is not None

    def _clean(self, text: str, expand: bool = False) -> str:
        text = unicodedata.normalize("NFC", text).translate(_FOLD)
        if expand and self.expands:
            # before unspeakable characters are dropped: "°" (a symbol, So) is read as "degrees"
            text = self.normalizer(text)  # type: ignore[misc]
        kept, dropped = [], []
        for ch in text:
            if ch in "\n\r\t":
                kept.append(" ")
            elif unicodedata.category(ch).startswith(_KEEP_CATEGORIES):
                kept.append(ch)
            else:
                dropped.append(ch)
        if dropped:
            log.debug("frontend.dropped_characters", chars="".join(sorted(set(dropped))), count=len(dropped))
        return re.sub(r"\s+", " ", "".join(kept)).strip()

    def sentences(self, text: str) -> list[str]:
        """Split normalized text at . ! ? (not after common abbreviations or initials) and at
        the sentence ends of other scripts (。！？； । ؟ ۔ ...). Numbers and abbreviations
        stay as written (piper's sentences); spoken_sentences reads them out."""
        return self._split(self.normalize(text))

    def spoken_sentences(self, text: str) -> list[str]:
        """The sentences as they are phonemized: numbers, money, dates, times and
        abbreviations read out where the voice's language has rules and its setting is on
        (runtime/normalize.py), then split as sentences() does. The whole text is read out
        before splitting, so "Dr." or "p.m." no longer decide where a sentence ends."""
        return self._split(self._clean(self._checked(text), expand=True))

    def _split(self, text: str) -> list[str]:
        out: list[str] = []
        start = 0
        for end, after in sentence_ends(text):
            out.append(text[start:end].strip())
            start = after
        out.append(text[start:].strip())
        return [s for s in out if any(ch.isalnum() for ch in s)]

    def phonemes(self, sentence: str) -> list[str]:
        if self.phoneme_type == "text":
            return list(unicodedata.normalize("NFD", sentence))  # piper: the codepoints are the phonemes
        with self._lock:
            if self.espeak_voice == "ar":
                sentence = self._diacritize(sentence)
            groups = self._espeak().phonemize(self.espeak_voice, sentence, vowel_clusters=self.vowel_clusters)
        phonemes: list[str] = []
        for group in groups:  # espeak may split one sentence into several clauses
            if phonemes and group:
                phonemes.append(" ")
            phonemes.extend(group)
        return phonemes

    def to_ids(self, sentence: str) -> list[int]:
        """One sentence -> ids: BOS, each phoneme followed by PAD, EOS (Piper's layout)."""
        from piper.phoneme_ids import phonemes_to_ids

        sentence = self._clean(sentence)  # a read-out sentence may be longer than max_chars
        if not sentence:
            return []
        phonemes = self.phonemes(sentence)
        known = [p for p in phonemes if p in self.id_map]
        if len(known) != len(phonemes):
            unknown = sorted({p for p in phonemes if p not in self.id_map})
            log.debug("frontend.dropped_phonemes", phonemes=unknown, sentence=sentence[:80])
        if not any(p.strip() for p in known):
            return []
        return phonemes_to_ids(known, self.id_map)

    def text_to_sentence_ids(self, text: str) -> list[list[int]]:
        """Whole text -> one id list per utterance (see text_to_utterances)."""
        return [u.ids for u in self.text_to_utterances(text)]

    def text_to_utterances(self, text: str) -> list[Utterance]:
        """Whole text -> utterances of at most max_utterance_ids ids each: one per sentence,
        over-long sentences cut (bounded_ids). EmptyTextError when nothing is speakable."""
        result: list[Utterance] = []
        for sentence in self.spoken_sentences(text):
            pieces = self.bounded_ids(sentence)
            result.extend(Utterance(ids, k == len(pieces) - 1) for k, ids in enumerate(pieces))
        if not result:
            raise EmptyTextError("text contains nothing speakable")
        return result

    def bounded_ids(self, sentence: str) -> list[list[int]]:
        """A sentence's ids, cut into pieces of at most max_utterance_ids: at clause
        punctuation, else between words, else anywhere (one long word, or a script written
        without spaces). Pieces are as long as fits, so cuts are few; the attention of the
        text encoder grows with the square of an utterance, which is what this bounds."""
        limit = self.max_utterance_ids
        ids = self.to_ids(sentence)
        if len(ids) <= limit:
            return [ids] if ids else []
        pieces = _clauses(sentence)
        joiner = " "
        if len(pieces) < 2:
            pieces = sentence.split(" ")
        if len(pieces) < 2:
            parts = math.ceil(len(ids) / (0.8 * limit))
            size = math.ceil(len(sentence) / parts)
            pieces, joiner = [sentence[i:i + size] for i in range(0, len(sentence), size)], ""
            if len(pieces) < 2:  # a single character beyond the bound (never seen; a safety net)
                return self._cut_ids(ids)
        # Pack consecutive pieces up to ~80% of the bound by their share of characters; a
        # group that still phonemizes too long is cut again (each step is strictly shorter).
        budget = max(1.0, 0.8 * limit * len(sentence) / len(ids))
        groups: list[list[str]] = [[]]
        size = 0
        for piece in pieces:
            if groups[-1] and size + len(piece) > budget:
                groups.append([])
                size = 0
            groups[-1].append(piece)
            size += len(piece) + len(joiner)
        if len(groups) == 1:  # the estimate said it fits but it did not: halve
            groups = [pieces[: len(pieces) // 2], pieces[len(pieces) // 2:]]
        out: list[list[int]] = []
        for group in groups:
            out.extend(self.bounded_ids(joiner.join(group).strip()))
        return out

    def _cut_ids(self, ids: list[int]) -> list[list[int]]:
        bos, eos = ids[0], ids[-1]
        inner = ids[1:-1]
        step = (self.max_utterance_ids - 2) // 2 * 2  # whole (symbol, PAD) pairs
        return [[bos, *inner[i:i + step], eos] for i in range(0, len(inner), step)]


def sentence_ends(text: str) -> Iterator[tuple[int, int]]:
    """Where sentences end in `text`: (end of the sentence, start of what follows), at . ! ?
    followed by a space (not after abbreviations: _abbreviation_period) and at the sentence ends
    of other scripts (。！？； । ؟ ۔ ...)."""
    start = 0
    for m in _SENTENCE_END.finditer(text):
        if m.group(1) is not None:
            if m.group(1).startswith(".") and _abbreviation_period(text[start:m.start()], text[m.end():]):
                continue
            end = m.end(1)
        else:
            end = m.end(3)
        yield end, m.end()
        start = m.end()


def _abbreviation_period(before: str, after: str) -> bool:
    """Whether the period between `before` and `after` belongs to an abbreviation and does not
    end the sentence: a common abbreviation ("Dr.", "etc.", "e.g."), an initial ("J."), or a
    dotted one ("U.S.") unless a sentence plainly starts after it."""
    word = before.rsplit(" ", 1)[-1].lower().rstrip(".")
    if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
        return True
    if _DOTTED.fullmatch(word):
        following = after.split(" ", 1)[0]
        return not (following[:1].isupper() and following.lower().strip("\"'”’,") in _SENTENCE_STARTERS)
    return False


def complete_sentences(text: str) -> tuple[list[str], str]:
    """Text arriving piece by piece (a Wyoming stream): the sentences already complete in
    `text`, and the rest, which may still grow. A Latin sentence is complete once the space
    after its mark has arrived ("3." may become "3.14"); the sentences keep their raw text (the
    frontend normalizes each as a request). Sentences with nothing to speak are dropped."""
    out, start = [], 0
    for end, after in sentence_ends(text):
        if after == len(text) and after == end:  # a mark that needs no space, at the very end:
            break  # closing quotes may follow
        out.append(text[start:end].strip())
        start = after
    return [s for s in out if any(ch.isalnum() for ch in s)], text[start:]


def _clauses(sentence: str) -> list[str]:
    """A sentence cut after each clause mark (the mark stays with its clause)."""
    out, start = [], 0
    for m in _CLAUSE_END.finditer(sentence):
        if m.end() < len(sentence) and sentence[start:m.end()].strip():
            out.append(sentence[start:m.end()].strip())
            start = m.end()
    out.append(sentence[start:].strip())
    return [p for p in out if p]
