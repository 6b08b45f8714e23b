"""Sentiment per turn and per leg over time: VADER (vaderSentiment), English only.

Why VADER: a lexicon and rules made for short, informal text (what a turn of a call is), its lexicon
ships inside the PyPI package, it runs offline in microseconds per turn with no model to load, and its
compound score in [-1, 1] is a number a contact center can threshold (VADER's own guide: >= 0.05
positive, <= -0.05 negative).

Other languages, Spanish among them: no sentiment (None), said plainly. VADER's lexicon is English;
the one Spanish lexicon found inside a PyPI wheel (SentiLeak 0.1.4) pins numpy < 1.22 and spaCy < 3.5
and is GPLv3, and the multilingual models that work need torch and a download (docs/analytics.md). A
call whose language is not English gets None for every turn and leg, never a number from the wrong
lexicon.

Over time: each turn keeps its own score at its time (Turn.sentiment), and each leg gets its mean and
the mean of its turns in each quarter of the call (LegMetrics.sentiment_by_quarter, None where the leg
said nothing in that quarter): a caller who starts angry and ends calm shows it.
"""
from __future__ import annotations

import re
from typing import Sequence

import msgspec

from callbot.analytics.result import Turn

_TAG = re.compile(r"\[\w+\]")
ENGLISH = ("en", "en-us", "en-gb", "en-au", "en-in", "english")


def supported(language: str) -> bool:
    return language.lower() in ENGLISH or language.lower().startswith("en-")


class SentimentScorer:
    """VADER's analyzer, loaded once (its lexicon file is read at build, ~10 ms)."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float | None:
        """VADER's compound score of `text` in [-1, 1]; None for text without letters (a redaction only)."""
        text = _TAG.sub(" ", text)  # "[card]": what was redacted says nothing of the mood
        if not any(ch.isalpha() for ch in text):
            return None
        return round(float(self._vader.polarity_scores(text)["compound"]), 4)


def score_turns(turns: Sequence[Turn], language: str = "en", scorer: SentimentScorer | None = None) -> list[Turn]:
    """The turns with their sentiment filled in (None for every turn when the language is not English)."""
    if not supported(language):
        return [msgspec.structs.replace(t, sentiment=None) for t in turns]
    scorer = scorer or SentimentScorer()
    return [msgspec.structs.replace(t, sentiment=scorer.score(t.text)) for t in turns]


def by_quarter(turns: Sequence[Turn], leg: str, duration_ms: float) -> list[float | None]:
    """The mean sentiment of a leg's turns in each quarter of the call (a turn counts where it starts)."""
    if duration_ms <= 0:
        return []
    sums, counts = [0.0] * 4, [0] * 4
    for t in turns:
        if t.leg != leg or t.sentiment is None:
            continue
        q = min(3, max(0, int(4 * t.start_ms / duration_ms)))
        sums[q] += t.sentiment
        counts[q] += 1
    return [round(s / c, 4) if c else None for s, c in zip(sums, counts)]
