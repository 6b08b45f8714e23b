"""PII out of a call's words and, optionally, out of a copy of its recording.

What is found, on each leg's words in time order (a transcript is spoken words, so numbers come as
digits or as number words, "four one one one"):

- digit runs: consecutive words that are digits or digit words (zero/oh .. nine), 6 digits or more in
  all: a card number when 13-19 digits pass the Luhn check, a phone number when 7-15 digits, any other
  number otherwise (an account, an ID); each is redacted whatever its kind (the kind only names it);
- IBAN-like codes: two letters, two digits, then 10-30 letters and digits (spaces allowed);
- ID-like tokens: one word of 6 characters or more with at least 4 digits (X1234567Z, 123-45-6789);
- e-mail addresses, written (a@b.com) or spoken ("john at example dot com", the last part a common
  top-level domain, so that "look at that dot" is left alone).

A match's words become one word spanning them, its text the kind in brackets ("[card]"), `redacted`
true: the transcript keeps where something was said, never what. The recording's copy has those spans
silenced (zeros) on that leg only, `pad_ms` wider on each side (word times are estimates).

Why our own patterns rather than a PII library: the well-kept ones (Presidio) need spaCy and its
models, hundreds of MB, and are built for written text; spoken digits and "at ... dot" are ours to find.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from callbot.analytics.result import Word

DIGIT_WORDS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9"}
MIN_DIGITS = 6
_STRIP = re.compile(r"^[^\w+@]+|[^\w@]+$")
_EMAIL = re.compile(r"^[\w.+-]+@[\w-]+(\.[\w-]+)+$")
_IBAN = re.compile(r"^[a-z]{2}\d{2}[a-z0-9]{10,30}$", re.I)
_ID = re.compile(r"^(?=(?:\D*\d){4})[a-z0-9][a-z0-9-]{5,}$", re.I)
_TLDS = {"com", "net", "org", "edu", "gov", "io", "co", "uk", "de", "es", "fr", "it", "info", "biz", "eu"}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def digit_kind(digits: str) -> str:
    if 13 <= len(digits) <= 19 and luhn_ok(digits):
        return "card"
    if 7 <= len(digits) <= 15:
        return "phone"
    return "number"


def _clean(text: str) -> str:
    return _STRIP.sub("", text.lower())


def _digits_of(text: str) -> str | None:
    t = _clean(text)
    if t in DIGIT_WORDS:
        return DIGIT_WORDS[t]
    bare = t.lstrip("+").replace("-", "").replace(".", "")
    return bare if bare.isdigit() else None


def find_pii(words: Sequence[Word]) -> list[tuple[int, int, str]]:
    """(first index, last index + 1, kind) of the PII in one leg's words (in time order)."""
    found: list[tuple[int, int, str]] = []
    n = len(words)
    i = 0
    while i < n:
        # a run of digit words
        j, digits = i, ""
        while j < n and (d := _digits_of(words[j].text)) is not None:
            digits += d
            j += 1
        if j > i and len(digits) >= MIN_DIGITS:
            found.append((i, j, digit_kind(digits)))
            i = j
            continue
        t = _clean(words[i].text)
        # spoken e-mail: <name> at <domain> dot <tld> (dot <tld> ...)
        if i + 4 < n and _clean(words[i + 1].text) == "at" and _clean(words[i + 3].text) == "dot":
            k = i + 5
            while k + 1 < n and _clean(words[k].text) == "dot":
                k += 2
            if _clean(words[k - 1].text) in _TLDS:
                found.append((i, k, "email"))
                i = k
                continue
        if _EMAIL.match(t):
            found.append((i, i + 1, "email"))
        elif _IBAN.match(t):
            found.append((i, i + 1, "iban"))
        elif _ID.match(t) and sum(ch.isdigit() for ch in t) >= 4:
            found.append((i, i + 1, "id"))
        i += 1
    return found


def redact_words(words: Sequence[Word]) -> list[Word]:
    """The words with each PII match replaced by one redacted word (per leg; order kept by time)."""
    out: list[Word] = []
    for leg in ("caller", "bot"):
        mine = sorted((w for w in words if w.leg == leg), key=lambda w: w.start_ms)
        hits = {a: (b, kind) for a, b, kind in find_pii(mine)}
        i = 0
        while i < len(mine):
            if i in hits:
                b, kind = hits[i]
                out.append(Word(leg=leg, start_ms=mine[i].start_ms, end_ms=max(w.end_ms for w in mine[i:b]),
                                text=f"[{kind}]", redacted=True))
                i = b
            else:
                out.append(mine[i])
                i += 1
    return sorted(out, key=lambda w: (w.start_ms, w.leg))


def silence_spans(samples: np.ndarray, rate: int, words: Sequence[Word], pad_ms: float = 150.0,
                  legs: tuple[str, ...] = ("caller", "bot")) -> np.ndarray:
    """A copy of the recording's samples [frames, channels] with each redacted word's span (plus `pad_ms`
    each side) set to zero on its own leg's channel."""
    out = np.array(samples, np.int16, copy=True)
    if out.ndim == 1:
        out = out[:, None]
    for w in words:
        if not w.redacted or w.leg not in legs:
            continue
        ch = legs.index(w.leg)
        if ch >= out.shape[1]:
            continue
        a = max(0, int((w.start_ms - pad_ms) * rate / 1000))
        b = min(len(out), int(np.ceil((w.end_ms + pad_ms) * rate / 1000)))
        out[a:b, ch] = 0
    return out
