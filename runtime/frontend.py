"""Text front end: normalize, split into sentences, phonemize (piper's espeak-ng build), map to ids.

piper-tts is GPL; it is used here as a library only (EspeakPhonemizer, phonemes_to_ids).
"""

from __future__ import annotations

import re
import threading
import unicodedata
from typing import Any

import structlog

log = structlog.get_logger(__name__)

PAD, BOS, EOS = "_", "^", "$"

# Abbreviations whose trailing period does not end a sentence.
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e", "no",
    "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
    "oct", "nov", "dec", "approx", "dept", "fig", "gen", "gov", "lt", "col", "capt", "sgt",
}
_SENTENCE_END = re.compile(r"([.!?…]+[\"'”’)\]]*)(\s+)")
# Typographic variants folded to what espeak and the phoneme map know.
_FOLD = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ",
    "\u2026": "...", "\u00a0": " ",
})
# Unicode categories that carry speakable content: letters, marks, digits, punctuation,
# currency/math symbols (espeak reads "$", "%", "+"), separators.
_KEEP_CATEGORIES = ("L", "M", "N", "P", "Sc", "Sm", "Zs")


class TextTooLongError(ValueError):
    """Text exceeds the configured character limit (the API layer answers 413)."""


class EmptyTextError(ValueError):
    """Nothing speakable was left after normalization."""


class TextFrontend:
    def __init__(self, voice_config: dict[str, Any], max_chars: int = 5000):
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
        self.max_chars = max_chars
        # piper merges these vowel sequences into one phoneme (e.g. a + ɪ -> aɪ) when a voice
        # was trained with them; `phoneme_map` is NOT applied: piper 1.8 does not read it
        clusters = voice_config.get("vowel_clusters") or []
        self.vowel_clusters = {tuple(vc) for vc in clusters} or None
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
        """NFC, typographic folding, unspeakable characters dropped, whitespace collapsed."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if len(text) > self.max_chars:
            raise TextTooLongError(f"text is {len(text)} characters; the limit is {self.max_chars}")
        text = unicodedata.normalize("NFC", text).translate(_FOLD)
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
        """Split normalized text at . ! ? (not after common abbreviations or initials)."""
        text = self.normalize(text)
        out: list[str] = []
        start = 0
        for m in _SENTENCE_END.finditer(text):
            before = text[start:m.start()].rsplit(" ", 1)[-1].lower().rstrip(".")
            if m.group(1).startswith(".") and (before in _ABBREVIATIONS or (len(before) == 1 and before.isalpha())):
                continue
            out.append(text[start:m.end(1)].strip())
            start = m.end()
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

        sentence = self.normalize(sentence)
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
        """Whole text -> one id list per sentence; EmptyTextError when nothing is speakable."""
        result = [ids for ids in (self.to_ids(s) for s in self.sentences(text)) if ids]
        if not result:
            raise EmptyTextError("text contains nothing speakable")
        return result
