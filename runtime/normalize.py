"""Text normalization: numbers, money, dates, times, ordinals, units and common
abbreviations written out as a person reads them, before phonemization.

espeak-ng (inside piper) reads '$3.50' as "dollar three point five zero" and '2026-12-01' as
"two thousand twenty six dash twelve dash zero one". `normalizer_for(language)` gives a
function text -> text that fixes that for the languages it has rules for; every other
language gets None and its text goes to espeak unchanged (never an error).

num2words (LGPL-2.1, used as a library; docs/dependencies.md says why it was chosen) spells
the numbers; which written pattern means what (a year, a price, a time) is decided here.
Output keeps within letters, spaces, hyphens and the punctuation the input had, and never
adds a sentence end where the input had none (the frontend splits sentences after this).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

import structlog

log = structlog.get_logger(__name__)

# The runtime's default for every voice (runtime.toml `normalize_text`, docs/runtime.md).
DEFAULT_NORMALIZE_TEXT = True
# Integers longer than this (without thousands separators) are read digit by digit, as a
# person reads a phone or account number, and as espeak does: a cardinal of 30 digits
# would be ~300 characters, and the expansion of a request must stay small
# (max_request_ids counts the ids of the expanded text).
MAX_CARDINAL_DIGITS = 12

Normalizer = Callable[[str], str]


def language_of(voice_config: dict[str, Any]) -> str:
    """The voice's language as 'en_US' / 'de' (bundle `language`, else its espeak voice)."""
    lang = voice_config.get("language")
    if isinstance(lang, dict):
        lang = lang.get("code") or lang.get("family")
    if not lang:
        lang = voice_config.get("espeak_voice") or (voice_config.get("espeak") or {}).get("voice") or ""
    return str(lang).replace("-", "_")


def normalizer_for(language: str) -> Normalizer | None:
    """The normalizer for a language code ('en_US', 'en-gb', 'en'), or None when this
    module has no rules for it (the text then passes through unchanged)."""
    family, _, region = language.replace("-", "_").partition("_")
    if family.lower() == "en":
        return EnglishNormalizer(region.upper().split("_")[0] or "US")
    return None


def _words(n: int | Decimal, **kwargs) -> str:
    from num2words import num2words

    # num2words writes "twelve thousand, five hundred": the commas would add pauses
    return num2words(n, lang="en", **kwargs).replace(",", "")


def _digits(s: str) -> str:
    return " ".join(_DIGIT_WORDS[int(c)] for c in s)


_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_MONTH_RE = (r"(Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
             r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_CURRENCIES = {  # symbol: (one, many, one hundredth, hundredths)
    "$": ("dollar", "dollars", "cent", "cents"),
    "£": ("pound", "pounds", "penny", "pence"),
    "€": ("euro", "euros", "cent", "cents"),
    "¥": ("yen", "yen", None, None),
}
_UNITS = {  # after a number only; (singular, plural)
    "km": ("kilometer", "kilometers"), "m": ("meter", "meters"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "mi": ("mile", "miles"), "ft": ("foot", "feet"),
    "in": None,  # "5 in the box": never a unit here
    "kg": ("kilogram", "kilograms"), "g": ("gram", "grams"), "mg": ("milligram", "milligrams"),
    "lb": ("pound", "pounds"), "lbs": ("pound", "pounds"), "oz": ("ounce", "ounces"),
    "ml": ("milliliter", "milliliters"),
    "mph": ("mile per hour", "miles per hour"), "km/h": ("kilometer per hour", "kilometers per hour"),
    "kph": ("kilometer per hour", "kilometers per hour"),
    "°C": ("degree Celsius", "degrees Celsius"), "°F": ("degree Fahrenheit", "degrees Fahrenheit"),
    "°": ("degree", "degrees"),
    "KB": ("kilobyte", "kilobytes"), "MB": ("megabyte", "megabytes"), "GB": ("gigabyte", "gigabytes"),
    "TB": ("terabyte", "terabytes"), "Hz": ("hertz", "hertz"), "kHz": ("kilohertz", "kilohertz"),
    "MHz": ("megahertz", "megahertz"), "GHz": ("gigahertz", "gigahertz"),
    "kW": ("kilowatt", "kilowatts"), "kWh": ("kilowatt hour", "kilowatt hours"),
}
# Titles: their period is never a sentence end.
_TITLES = {"Mr": "Mister", "Mrs": "Missus", "Ms": "Miz", "Prof": "Professor", "Rev": "Reverend",
           "Gen": "General", "Capt": "Captain", "Lt": "Lieutenant", "Col": "Colonel", "Sgt": "Sergeant",
           "Gov": "Governor", "Sen": "Senator", "Rep": "Representative", "Mt": "Mount", "Ft": "Fort"}
# After a capitalized word or a number; the period may also end the sentence.
_PLACES = {"St": "Street", "Dr": "Drive", "Ave": "Avenue", "Rd": "Road", "Blvd": "Boulevard",
           "Ln": "Lane", "Hwy": "Highway", "Sq": "Square", "Pl": "Place"}
# The same letters before a name: St. Louis, Dr. Smith.
_BEFORE_NAME = {"St": "Saint", "Dr": "Doctor"}
_AFTER_NAME = {"Jr": "Junior", "Sr": "Senior", "Inc": "Incorporated", "Ltd": "Limited", "Corp": "Corporation"}
_LATIN = [(re.compile(r"\bNo\.\s?(?=\d)|(?<!\w)#(?=\d)"), "number "),
          (re.compile(r"\be\.g\.(?=\s|,|$)", re.I), "for example"),
          (re.compile(r"\bi\.e\.(?=\s|,|$)", re.I), "that is"),
          (re.compile(r"\betc\.(?=\s|,|$)"), "et cetera."),
          (re.compile(r"\bvs\.?(?=\s)"), "versus"),
          (re.compile(r"\bapprox\.(?=\s)"), "approximately"),
          (re.compile(r"\bdept\.(?=\s)", re.I), "department")]

_NUM = r"\d{1,3}(?:,\d{3})+|\d+"  # 12,500 or 12500
_FRACTIONS = {2: ("half", "halves"), 4: ("quarter", "quarters")}  # other denominators: ordinals
_ENDS_SENTENCE = re.compile(r"\s+[A-Z\"']|\s*$")


class EnglishNormalizer:
    """English rules. `region` decides slash dates: US month/day/year, elsewhere day/month/year."""

    def __init__(self, region: str = "US"):
        self.month_first = self.american = region in ("US", "")
        self.language = f"en_{region}" if region else "en"
        units = "|".join(re.escape(u) for u in sorted((u for u, v in _UNITS.items() if v), key=len, reverse=True))
        self._steps: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
            # order matters: the specific forms first, plain numbers last
            (re.compile(r"(?<![\w.])(\d{4})-(\d{1,2})-(\d{1,2})\b(?!-)"), self._iso_date),
            (re.compile(r"(?<![\w/.])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})\b(?!/)"), self._slash_date),
            (re.compile(_MONTH_RE + r"\.?\s+(\d{1,2})(?:st|nd|rd|th)?\b(?!:)(?:(,?)\s+(\d{4})\b)?"), self._month_day),
            (re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH_RE + r"\b\.?(?:(,?)\s+(\d{4})\b)?"),
             self._day_month),
            (re.compile(r"(?<![\w/.,])(?:(\d{1,2})\s)?(\d{1,2})/(\d{1,2})(?![\w/]|[.,]\d)"), self._fraction),
            (re.compile(r"(?<![\w:.])(\d{1,2}):(\d{2}):(\d{2})(?![\d:])(?:\s?([AaPp])\.?[Mm]\b(\.?))?"),
             self._time_seconds),
            (re.compile(r"(?<![\w:.])(\d{1,2}):(\d{2})(?!:?\d)(?:\s?([AaPp])\.?[Mm]\b(\.?))?"), self._time),
            (re.compile(r"(?<![\w:.])(\d{1,2})\s?([AaPp])\.?[Mm]\b(\.?)"), self._hour_ampm),
            (re.compile(r"(?<![\w.])([$£€¥])\s?(" + _NUM + r")(?:\.(\d+))?(?:\s?(thousand|million|billion|trillion)\b)?"),
             self._money),
            (re.compile(r"(?<![\w.,])(" + _NUM + r")(?:\.(\d+))?\s?%"), self._percent),
            (re.compile(r"(?<![\w.,])(\d{3})-(\d{3})-(\d{4})\b|(?<![\w.,-])(\d{3})-(\d{4})\b(?!-)"), self._phone),
            (re.compile(r"(?<![\w.,])(\d+)(st|nd|rd|th)\b"), self._ordinal),
            (re.compile(r"(?<![\w.,])('?)(\d|\d{3})0s\b"), self._decade),
            (re.compile(r"(?<![\w.,])(\d{4})\s?(?:-|to)\s?(\d{4}|\d{2})\b(?![.,]\d)"), self._year_range),
            (re.compile(r"\b((?i:in|since|by|from|until|till|of|year|circa|around|before|after|during|early|late|"
                        r"mid|spring|summer|autumn|fall|winter|born|died)|" + _MONTH_RE[1:-1] + r")\s+(\d{4})\b(?![.,]?\w)"),
             self._year_after_word),
            (re.compile(r"\b(\d{4})\s?(AD|BC|BCE|CE)\b"), self._year_era),
            (re.compile(r"(?<![\w.,-])-(?=\d)"), lambda m: "minus "),
            (re.compile(r"(?<![\w.,])(" + _NUM + r")(?:\.(\d+))?\s?(" + units + r")(?![\w/])"), self._unit),
            (re.compile(r"(?<![\w.,])(\d+)-(\d+)(?![.,]?\w)"), self._range),
            (re.compile(r"(?<![\w.,])(" + _NUM + r")(?:\.(\d+))?(?![.,]?\w)"), self._number),
        ]

    def __call__(self, text: str) -> str:
        # abbreviations first: "5th St." is a street only while "5th" is still digits
        text = self._abbreviations(text)
        if any(c.isdigit() for c in text):
            for pattern, fn in self._steps:
                text = pattern.sub(_guarded(fn), text)
        return re.sub(r"[ \t]{2,}", " ", text)

    # -- numbers ------------------------------------------------------------------------
    def _n(self, n: int, **kwargs) -> str:
        words = _words(n, **kwargs)
        # num2words writes British "one hundred and five"; American English says no "and"
        return words.replace(" and ", " ") if self.american else words

    def cardinal(self, digits: str) -> str:
        digits = digits.replace(",", "")
        if len(digits) > MAX_CARDINAL_DIGITS or (len(digits) > 1 and digits.startswith("0")):
            return _digits(digits)  # an identifier, not an amount
        return self._n(int(digits))

    def decimal(self, whole: str, frac: str | None) -> str:
        out = self.cardinal(whole)
        return f"{out} point {_digits(frac)}" if frac else out

    def year(self, y: str) -> str:
        n = int(y)
        if 2000 <= n <= 2009:  # "two thousand five", not "twenty oh-five"
            return self._n(n)
        return self._n(n, to="year")

    # -- rules -------------------------------------------------------------------------
    def _date(self, year: str | None, month: int, day: int) -> str | None:
        if not 1 <= month <= 12 or not 1 <= day <= 31:
            return None
        head = (f"{_MONTHS[month - 1]} {self._n(day, to='ordinal')}" if self.month_first
                else f"the {self._n(day, to='ordinal')} of {_MONTHS[month - 1]}")
        if year is None:
            return head
        return f"{head}, {self.year(year) if len(year) == 4 else self._n(int(year))}"

    def _iso_date(self, m: re.Match) -> str:
        return self._date(m.group(1), int(m.group(2)), int(m.group(3))) or m.group(0)

    def _slash_date(self, m: re.Match) -> str:
        a, b = int(m.group(1)), int(m.group(2))
        month, day = (a, b) if self.month_first and a <= 12 else (b, a)
        return self._date(m.group(3), month, day) or m.group(0)

    @staticmethod
    def _month_index(name: str) -> int:
        return next(i for i, full in enumerate(_MONTHS, 1) if full.startswith(name[:3]))

    def _month_day(self, m: re.Match) -> str:
        month, day = self._month_index(m.group(1)), int(m.group(2))
        if not 1 <= day <= 31:
            return m.group(0)
        out = f"{_MONTHS[month - 1]} {self._n(day, to='ordinal')}"
        return f"{out}, {self.year(m.group(4))}" if m.group(4) else out

    def _day_month(self, m: re.Match) -> str:
        day, month = int(m.group(1)), self._month_index(m.group(2))
        if not 1 <= day <= 31:
            return m.group(0)
        out = f"the {self._n(day, to='ordinal')} of {_MONTHS[month - 1]}"
        return f"{out}, {self.year(m.group(4))}" if m.group(4) else out

    @staticmethod
    def _ampm(letter: str | None, period: str, m: re.Match) -> str:
        if not letter:
            return ""
        # keep a period that ended the sentence ("at 3 p.m. Then ...")
        end = "." if period and _ENDS_SENTENCE.match(m.string, m.end()) else ""
        return f" {letter.upper()}M{end}"

    def _clock(self, h: int, mins: int, suffix: str) -> str | None:
        """h:mm as a person reads it, or None when it is no time of day."""
        if h > 23 or mins > 59 or (suffix and (h == 0 or h > 12)):  # "0:30 am", "13:00 pm": not 12-hour
            return None
        if mins == 0:
            return self._n(h) + ("" if suffix else " o'clock" if 1 <= h <= 12 else " hundred")
        if mins < 10:
            return f"{self._n(h)} oh {self._n(mins)}"
        return f"{self._n(h)} {self._n(mins)}"

    def _time(self, m: re.Match) -> str:
        suffix = self._ampm(m.group(3), m.group(4), m)
        words = self._clock(int(m.group(1)), int(m.group(2)), suffix)
        return m.group(0) if words is None else words + suffix

    def _time_seconds(self, m: re.Match) -> str:
        # 23:59:59 -> twenty-three fifty-nine and fifty-nine seconds
        suffix = self._ampm(m.group(4), m.group(5), m)
        words, secs = self._clock(int(m.group(1)), int(m.group(2)), suffix), int(m.group(3))
        if words is None or secs > 59:
            return m.group(0)
        if secs:
            words += f" and {self._n(secs)} second{'' if secs == 1 else 's'}"
        return words + suffix

    def _fraction(self, m: re.Match) -> str:
        # 1/2 -> one half, 3/4 -> three quarters, 2/3 -> two thirds, 1 1/2 -> one and a half;
        # only proper fractions with a denominator up to 10 (12/25 may be a date, 24/7 is not a fraction)
        whole, num, den = m.group(1), int(m.group(2)), int(m.group(3))
        if not 0 < num < den <= 10:
            return m.group(0)
        one, many = _FRACTIONS.get(den) or (self._n(den, to="ordinal"), self._n(den, to="ordinal") + "s")
        part = f"{'a' if whole and num == 1 else self._n(num)} {one if num == 1 else many}"
        return f"{self.cardinal(whole)} and {part}" if whole else part

    def _hour_ampm(self, m: re.Match) -> str:
        h = int(m.group(1))
        if not 1 <= h <= 12:
            return m.group(0)
        return self._n(h) + self._ampm(m.group(2), m.group(3), m)

    def _money(self, m: re.Match) -> str:
        one, many, cent, cents = _CURRENCIES[m.group(1)]
        whole, frac, scale = m.group(2), m.group(3), m.group(4)
        if scale:  # $3.5 million: three point five million dollars
            return f"{self.decimal(whole, frac)} {scale} {many}"
        if frac and (len(frac) > 2 or cent is None):
            return f"{self.decimal(whole, frac)} {many}"
        units = int(whole.replace(",", ""))
        hundredths = int(frac.ljust(2, "0")) if frac else 0
        parts = []
        if units or not hundredths:
            parts.append(f"{self.cardinal(whole)} {one if units == 1 else many}")
        if hundredths:
            parts.append(f"{self._n(hundredths)} {cent if hundredths == 1 else cents}")
        return " and ".join(parts)

    def _percent(self, m: re.Match) -> str:
        return f"{self.decimal(m.group(1), m.group(2))} percent"

    @staticmethod
    def _phone(m: re.Match) -> str:
        groups = [g for g in m.groups() if g]
        return ", ".join(_digits(g) for g in groups)

    def _ordinal(self, m: re.Match) -> str:
        if len(m.group(1)) > MAX_CARDINAL_DIGITS:
            return m.group(0)
        return self._n(int(m.group(1)), to="ordinal")

    def _decade(self, m: re.Match) -> str:
        # 1990s -> nineteen nineties, '80s / 80s -> eighties, 2000s -> two thousands
        head = m.group(2)
        spoken = self.year(head + "0") if len(head) == 3 else self._n(int(head + "0"))
        rest, _, last = spoken.rpartition(" ")
        plural = last[:-1] + "ies" if last.endswith("y") else last + "s"
        return f"{rest} {plural}".strip()

    def _year_range(self, m: re.Match) -> str:
        first, second = m.group(1), m.group(2)
        if not 1000 <= int(first) <= 2099:
            return m.group(0)
        if len(second) == 2:
            second = first[:2] + second
        if int(second) < int(first) or int(second) > 2099:
            return m.group(0)
        return f"{self.year(first)} to {self.year(second)}"

    def _year_after_word(self, m: re.Match) -> str:
        y = m.group(2)
        if not 1000 <= int(y) <= 2099:
            return m.group(0)
        return f"{m.group(1)} {self.year(y)}"

    def _year_era(self, m: re.Match) -> str:
        era = {"AD": "A D", "BC": "B C", "BCE": "B C E", "CE": "C E"}[m.group(2)]
        return f"{self.year(m.group(1))} {era}"

    def _unit(self, m: re.Match) -> str:
        one, many = _UNITS[m.group(3)]
        singular = m.group(1) == "1" and not m.group(2)
        return f"{self.decimal(m.group(1), m.group(2))} {one if singular else many}"

    def _range(self, m: re.Match) -> str:
        return f"{self.cardinal(m.group(1))} to {self.cardinal(m.group(2))}"

    def _number(self, m: re.Match) -> str:
        return self.decimal(m.group(1), m.group(2))

    # -- abbreviations -----------------------------------------------------------------
    @staticmethod
    def _abbreviation(m: re.Match) -> str:
        abbr, text = m.group(1), m.string
        prev = _PREV_WORD.search(text, max(0, m.start() - 40), m.start())
        before = prev.group(1) if prev else ""
        # "Elm St.", "5th St." - but not "... Tom. Dr. Smith", where a sentence ended before
        follows_name = (before[:1].isupper() or before[:1].isdigit()) and not before.endswith((".", "!", "?"))
        name_next = _NAME_NEXT.match(text, m.end()) is not None
        # the period of "Elm St." may also end the sentence: then it stays
        end = "." if _ENDS_SENTENCE.match(text, m.end()) else ""
        if abbr in _TITLES:
            return _TITLES[abbr]
        if abbr in _BEFORE_NAME and name_next and not follows_name:
            return _BEFORE_NAME[abbr]
        if abbr in _PLACES and follows_name:
            return _PLACES[abbr] + end
        if abbr in _AFTER_NAME and follows_name:
            return _AFTER_NAME[abbr] + end
        return m.group(0)

    def _abbreviations(self, text: str) -> str:
        for pattern, spoken in _LATIN:
            def latin(m: re.Match, spoken=spoken) -> str:
                # "etc." keeps its period only where it also ended the sentence
                if spoken.endswith(".") and not _ENDS_SENTENCE.match(m.string, m.end()):
                    return spoken[:-1]
                return spoken
            text = pattern.sub(latin, text)
        return _ABBREVIATION.sub(self._abbreviation, text)


def _guarded(fn: Callable[[re.Match], str]) -> Callable[[re.Match], str]:
    """A rule that fails on some odd input leaves that match as written (espeak reads it):
    normalization must never fail a request."""
    def run(m: re.Match) -> str:
        try:
            return fn(m)
        except Exception as exc:  # noqa: BLE001 - num2words raises various types on odd input
            log.debug("normalize.rule_failed", rule=getattr(fn, "__name__", "?"), text=m.group(0)[:40],
                      error=f"{type(exc).__name__}: {exc}")
            return m.group(0)
    return run


_PREV_WORD = re.compile(r"(\S+)\s+$")
_NAME_NEXT = re.compile(r"\s+[A-Z0-9]")
_ABBREVIATION = re.compile(r"\b(" + "|".join(sorted({*_TITLES, *_PLACES, *_BEFORE_NAME, *_AFTER_NAME}, key=len,
                                                    reverse=True)) + r")\.")
