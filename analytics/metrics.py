"""The call's numbers from its two legs' speech segments (and words): pure functions, no audio model.

Definitions (docs/analytics.md has them with pictures in words; times in ms from the recording's start):

- talk time of a leg: the union of its segments; talk ratio: talk time / the call's duration;
- talk/listen ratio: the caller's talk time / the bot's (None when the bot never spoke);
- overtalk: the stretches where both legs speak: their total and how many;
- interruption by a leg: it starts a segment while the other leg is inside one;
- barge-in: an interruption by the caller (of the bot); the bot's yield time: from the caller's start to
  the end of the bot segment it cut into (how long the bot kept talking over the caller);
- non-talk time: the stretches of the call where neither leg speaks, of any length (call start and end
  included); dead air: those longer than `dead_air_ms` (3 s by default), their total and count;
- monologue: a run of one leg's segments with no segment of the other leg starting in it, from its first
  start to its last end; the longest per leg;
- response latency: from the end of a caller segment to the start of the bot's next segment, when the bot
  was silent at that end, the caller did not start again before the bot, and the bot started within
  `response_window_ms` (a bot starting while the caller still speaks is an interruption, not a response;
  a full-duplex model does that, and the two numbers are kept apart);
- words per minute of a leg: its words / its talk time in minutes;
- loudness of a leg: the RMS of its samples inside its segments, in dBFS (a full-scale square wave is
  0 dBFS, a full-scale sine -3 dBFS).

Percentiles are numpy's linear interpolation between the sorted values (p99 of a few values lies close
to their maximum).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import msgspec
import numpy as np

from callbot.analytics.result import CallMetrics, Leg, LegMetrics, Segment, Turn, Word

LEGS: tuple[Leg, Leg] = ("caller", "bot")
Span = tuple[float, float]


class MetricParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    dead_air_ms: float = 3000.0          # both legs silent longer than this is dead air
    response_window_ms: float = 15000.0  # a bot start later than this after the caller stops is no response

    def __post_init__(self) -> None:
        if self.dead_air_ms < 0 or self.response_window_ms <= 0:
            raise ValueError("dead_air_ms must be >= 0 and response_window_ms > 0")


def union(spans: Iterable[Span]) -> list[Span]:
    """Sorted, merged spans (touching ones joined)."""
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def intersection(x: Sequence[Span], y: Sequence[Span]) -> list[Span]:
    """Where two sorted, merged span lists overlap."""
    out: list[Span] = []
    i = j = 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def gaps(spans: Sequence[Span], start: float, end: float) -> list[Span]:
    """The parts of [start, end] that sorted, merged `spans` leave free."""
    out: list[Span] = []
    t = start
    for a, b in spans:
        if a > t:
            out.append((t, min(a, end)))
        t = max(t, b)
        if t >= end:
            break
    if t < end:
        out.append((t, end))
    return [(a, b) for a, b in out if b > a]


def total(spans: Iterable[Span]) -> float:
    return float(sum(b - a for a, b in spans))


def leg_spans(segments: Iterable[Segment], leg: Leg, duration_ms: float | None = None) -> list[Span]:
    spans = ((float(s.start_ms), float(s.end_ms)) for s in segments if s.leg == leg)
    if duration_ms is not None:
        spans = ((max(0.0, a), min(duration_ms, b)) for a, b in spans)
    return union(spans)


def _inside(t: float, spans: Sequence[Span]) -> Span | None:
    """The span holding t strictly inside (started before t, ends after it)."""
    for a, b in spans:
        if a < t < b:
            return (a, b)
        if a >= t:
            return None
    return None


def interruptions(by: Sequence[Span], of: Sequence[Span]) -> list[tuple[float, float]]:
    """(start of the interrupting span, end of the interrupted span) for each span of `by` that starts
    inside a span of `of`."""
    out = []
    for a, _ in by:
        hit = _inside(a, of)
        if hit is not None:
            out.append((a, hit[1]))
    return out


def longest_monologue(mine: Sequence[Span], other: Sequence[Span]) -> float:
    """The longest run of `mine` in which no span of `other` starts (first start to last end)."""
    best = 0.0
    run: list[float] | None = None
    for a, b, is_mine in sorted([(a, b, True) for a, b in mine] + [(a, b, False) for a, b in other]):
        if not is_mine:
            run = None
            continue
        if run is None:
            run = [a, b]
        run[1] = max(run[1], b)
        best = max(best, run[1] - run[0])
    return best


def response_latencies(caller: Sequence[Span], bot: Sequence[Span], window_ms: float) -> list[float]:
    out = []
    for i, (_, end) in enumerate(caller):
        if any(a < end <= b for a, b in bot):
            continue  # the bot was already speaking when the caller stopped
        nxt = next((a for a, _ in bot if a >= end), None)
        if nxt is None or nxt - end > window_ms:
            continue
        if i + 1 < len(caller) and caller[i + 1][0] < nxt:
            continue  # the caller went on before the bot answered: the later stop counts
        out.append(round(nxt - end, 1))
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def loudness_dbfs(leg: np.ndarray, rate: int, spans: Sequence[Span]) -> float | None:
    """RMS of a leg's int16 samples inside `spans` (ms), dBFS; None when the spans hold no sample."""
    x = np.asarray(leg)
    parts = [x[int(a * rate / 1000):int(b * rate / 1000)] for a, b in spans]
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    y = np.concatenate(parts).astype(np.float64) / 32768.0
    rms = float(np.sqrt(np.mean(y * y)))
    return round(20.0 * float(np.log10(rms)), 2) if rms > 0 else -120.0


def compute_metrics(segments: Sequence[Segment], duration_ms: float, words: Sequence[Word] = (),
                    loudness: dict[str, float | None] | None = None, turns: Sequence[Turn] = (),
                    params: MetricParams = MetricParams()) -> CallMetrics:
    """Every number of CallMetrics from the legs' segments (and words, loudness, turns' sentiment)."""
    spans = {leg: leg_spans(segments, leg, duration_ms) for leg in LEGS}
    caller, bot = spans["caller"], spans["bot"]
    both = intersection(caller, bot)
    anyone = union([*caller, *bot])
    quiet = gaps(anyone, 0.0, duration_ms)
    dead = [g for g in quiet if g[1] - g[0] > params.dead_air_ms]
    barge = interruptions(caller, bot)
    yields = [round(end - start, 1) for start, end in barge]
    latencies = response_latencies(caller, bot, params.response_window_ms)
    loudness = loudness or {}

    def leg_metrics(leg: Leg) -> LegMetrics:
        mine, other = spans[leg], spans["bot" if leg == "caller" else "caller"]
        talk = total(mine)
        n_words = sum(1 for w in words if w.leg == leg)
        sentiments = [t.sentiment for t in turns if t.leg == leg and t.sentiment is not None]
        return LegMetrics(
            talk_ms=round(talk, 1),
            talk_ratio=round(talk / duration_ms, 4) if duration_ms > 0 else 0.0,
            segments=len(mine),
            longest_monologue_ms=round(longest_monologue(mine, other), 1),
            interruptions=len(interruptions(mine, other)),
            words=n_words,
            words_per_minute=round(n_words / (talk / 60000.0), 1) if talk > 0 else 0.0,
            loudness_dbfs=loudness.get(leg),
            sentiment=round(float(np.mean(sentiments)), 4) if sentiments else None,
        )

    caller_m, bot_m = leg_metrics("caller"), leg_metrics("bot")
    return CallMetrics(
        duration_ms=round(duration_ms, 1),
        caller=caller_m,
        bot=bot_m,
        talk_listen_ratio=round(caller_m.talk_ms / bot_m.talk_ms, 4) if bot_m.talk_ms > 0 else None,
        overtalk_ms=round(total(both), 1),
        overtalk_count=len(both),
        dead_air_ms=round(total(dead), 1),
        dead_air_count=len(dead),
        non_talk_ms=round(total(quiet), 1),
        response_latency_ms=latencies,
        response_latency_p50_ms=percentile(latencies, 50),
        response_latency_p99_ms=percentile(latencies, 99),
        barge_ins=len(barge),
        yield_ms=yields,
        yield_p50_ms=percentile(yields, 50),
    )
