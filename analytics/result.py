"""What the analysis of one call produces: the shape the analysis writes and the call store keeps.

One msgspec struct tree, so that the analysis (its own process or pool) and the store (another package)
agree on one typed shape without importing each other's code, and so that it crosses a process
boundary as msgpack and lands in the store's JSON API unchanged. Times are milliseconds from the start
of the call's recording (the WAV's first sample). A leg is "caller" (the WAV's left channel) or "bot"
(its right channel).

New fields get defaults, so that an analysis stored by an older version still decodes.
"""
from __future__ import annotations

from typing import Literal

import msgspec

Leg = Literal["caller", "bot"]

ANALYSIS_VERSION = 1


class Segment(msgspec.Struct, frozen=True, kw_only=True):
    """A stretch of speech on one leg, from the voice activity detector."""
    leg: Leg
    start_ms: float
    end_ms: float


class Word(msgspec.Struct, frozen=True, kw_only=True):
    """One word of a leg's transcript; `redacted` when PII was replaced in `text` (e.g. "[card]")."""
    leg: Leg
    start_ms: float
    end_ms: float
    text: str
    redacted: bool = False


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """A leg's turn (speech until the other leg takes the floor) with its text and sentiment
    (VADER's compound score in [-1, 1]; None where the leg's language has no sentiment model)."""
    leg: Leg
    start_ms: float
    end_ms: float
    text: str
    sentiment: float | None = None


class LegMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Numbers of one leg over the whole call."""
    talk_ms: float = 0.0
    talk_ratio: float = 0.0            # talk_ms / the call's duration
    segments: int = 0
    longest_monologue_ms: float = 0.0
    interruptions: int = 0             # times this leg started speaking while the other was speaking
    words: int = 0
    words_per_minute: float = 0.0      # words / talk time in minutes
    loudness_dbfs: float | None = None  # RMS over the leg's speech, dBFS; None when it never spoke
    sentiment: float | None = None     # mean of its turns' sentiment
    sentiment_by_quarter: list[float | None] = []  # mean of its turns' sentiment in each quarter of the call


class CallMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Numbers of the whole call; `caller` and `bot` hold the per-leg ones."""
    duration_ms: float = 0.0
    caller: LegMetrics = LegMetrics()
    bot: LegMetrics = LegMetrics()
    talk_listen_ratio: float | None = None   # caller talk / bot talk
    overtalk_ms: float = 0.0                  # both legs speaking
    overtalk_count: int = 0
    dead_air_ms: float = 0.0                  # both legs silent longer than the dead-air threshold
    dead_air_count: int = 0
    non_talk_ms: float = 0.0                  # neither leg speaking at all
    response_latency_ms: list[float] = []    # caller stops -> bot starts, each caller turn the bot answered
    response_latency_p50_ms: float | None = None
    response_latency_p99_ms: float | None = None
    barge_ins: int = 0                        # the caller started while the bot was speaking
    yield_ms: list[float] = []               # after a barge-in, how long the bot kept speaking
    yield_p50_ms: float | None = None


class CategoryHit(msgspec.Struct, frozen=True, kw_only=True):
    """One category of the tenant's rules evaluated on the call; `evidence` says what matched where."""
    category: str
    matched: bool
    evidence: list[str] = []


class ScoreItem(msgspec.Struct, frozen=True, kw_only=True):
    rule: str
    weight: float
    passed: bool


class Score(msgspec.Struct, frozen=True, kw_only=True):
    """A QA scorecard applied to the call: the weighted rules that passed over all of them."""
    scorecard: str
    score: float
    max_score: float
    items: list[ScoreItem] = []


class CallAnalysis(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the analysis found in one call."""
    call_id: str
    version: int = ANALYSIS_VERSION
    analyzed_at: float = 0.0                  # unix time
    seconds: float = 0.0                      # how long the analysis took
    segments: list[Segment] = []
    words: list[Word] = []
    turns: list[Turn] = []
    metrics: CallMetrics = CallMetrics()
    categories: list[CategoryHit] = []
    scores: list[Score] = []
    transcript_engine: str = ""               # which recognizer gave the caller's words ("live", "pocketsphinx", ...)
    segments_source: str = ""                 # "vad" (the recording), "events" (the engine's live speech events,
                                              # coarse: the recording was lost), "" (none)
    redacted_recording: str | None = None     # path of the recording with PII silenced, when made
    errors: list[str] = []                    # one line per part that could not be analysed
