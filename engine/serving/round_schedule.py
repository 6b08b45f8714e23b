"""When a round of model steps starts: late enough that it ends just before a media tick, and which
calls it takes; and how a call's first frame is padded so that its frames complete with the others'.

Why: the caller's audio reaches us on pjmedia's 20 ms bridge ticks, and the bot's audio leaves on
them. A round that starts when its frames fall due ends S ms later (S: its step time) and its audio
waits for the next tick: 20 * ceil(S / 20) - S ms (22-23 ms for the tiny model on the CI machine,
whose step straddles a tick; BENCHMARKS.md, "Latency (mouth-to-ear)"). Since no input arrives between
ticks, a round that starts later, so that it ends just before the tick its audio leaves on, costs the
caller nothing (the audio leaves on the same tick) and leaves the inference thread free until then for
calls that fall due in between: calls of other workers of a model service, on other clocks, join
the same round instead of taking one of their own.

What the plan needs (all of it measured, nothing assumed):
- each waiting call's due time (the media tick that completed its frame: the rx stamp of the frame's
  last sample, ext/stamps.h) and a tick of its media clock (the same stamp);
- the expected length of a round of B calls: `RoundTimes`, from the runner's own rounds (the longest
  of the recent ones, so that a round rarely ends after its tick), plus a margin.

Calls of several clocks (the model service's workers each run their own pjmedia clock): the round
aims at the tick of the clock most of its calls are on (the majority phase); a call on another clock
waits for its own next tick, at most 20 ms, which is what every call waits without a schedule. Why
not a round per clock: a batched round of B calls costs about one step of one call on a memory-bound
machine (the 7B on a Mac reads its weights once per round), and rounds per clock would each pay it
again, pushing admission's round past the frame sooner. One round per frame keeps batching whole.

The 80 ms model frame spans 4 ticks, so calls of one clock still fall due on 4 different ticks
unless their frames are put in phase: `first_frame_pad` says how many samples of silence to put in
front of a new call's 24 kHz stream so that its frames complete on the same tick as the calls already
running (on or up to one tick before theirs, for a call on another clock). The pad is under 80 ms,
happens once, before the call's first frame, and loses none of the caller's audio; every later
frame then completes on the group's tick, with the same average wait for a frame as before.

Everything here is a pure function of the times it is given (tests/test_round_schedule.py).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple, Sequence

import numpy as np

TICK_NS = 20_000_000  # pjmedia's bridge tick (a port's ptime)
FRAME_NS = 80_000_000  # one model frame: 4 ticks
MARGIN_NS = 2_000_000  # a round aims to end this long before its tick (wake-up lateness, the push)
# ticks closer than this are one tick: the calls of one process share pjmedia's clock, their stamps
# in one tick lie microseconds apart
SAME_TICK_NS = 2_000_000
ROUND_WINDOW = 10  # recent rounds per batch size that the expected length is taken from (0.8 s)
# the percentile of them a plan expects: the longest. A round that ends after its tick leaves that
# tick without the call's audio (an underrun, 20 ms of silence) and moves the call's audio a tick
# later until the tx policy cuts it; the 90th percentile did that every ten rounds or so on the CI machine
ROUND_QUANTILE = 100.0


class Due(NamedTuple):
    """A call waiting with a complete frame: when it fell due, and a tick of its media clock (0:
    unknown, e.g. audio with no stamps).

    Not in it, on purpose: audio of earlier frames still queued in the call's tx. Aiming at the tick
    that empties tx would keep any backlog for ever (every round would end just in time for it, and
    one round that overran its tick would add a tick more, up to the tx limit: measured, 80 ms of
    hold); the backlog is the tx policy's to cut (engine/serving/tx_policy.py)."""

    due_ns: int
    tick_ns: int = 0


class RoundPlan(NamedTuple):
    """Start the round at `start_ns` (at once if that has passed) with the calls `members` (indexes
    into the calls planned); it aims to end before `end_tick_ns` (0: no tick known, start at once)."""

    start_ns: int
    members: tuple[int, ...]
    end_tick_ns: int = 0


def next_tick(grid_ns: int, t_ns: int, period_ns: int = TICK_NS) -> int:
    """The first tick at or after `t_ns` of the grid through `grid_ns` (one tick every `period_ns`)."""
    return t_ns + (grid_ns - t_ns) % period_ns


def majority_phase(ticks: Sequence[int], period_ns: int = TICK_NS, tolerance_ns: int = SAME_TICK_NS) -> int:
    """One of `ticks` (non-empty) on the grid that most of them share, modulo `period_ns`: ticks
    within `tolerance_ns` of each other (around the circle) count as one grid. Ties go to the grid of
    the earliest of them (ending before it ends before the later ones of its grid too)."""
    if not len(ticks):
        raise ValueError("majority_phase needs at least one tick")
    best, best_count = None, -1
    for t in sorted(ticks):
        count = 0
        for u in ticks:
            d = (u - t) % period_ns
            if min(d, period_ns - d) <= tolerance_ns:
                count += 1
        if count > best_count:
            best, best_count = t, count
    return int(best)


def plan_round(now_ns: int, calls: Sequence[Due], expected_ns: Callable[[int], int | None],
               margin_ns: int = MARGIN_NS, period_ns: int = TICK_NS,
               tolerance_ns: int = SAME_TICK_NS) -> RoundPlan | None:
    """The next round for the waiting `calls` (each with a complete frame), or None if none waits.

    The calls that fell due first (on one tick, within `tolerance_ns`) define it: it aims at the
    first tick of the majority grid at or after their due time + the round's expected length
    (`expected_ns(B)`, None when unknown: start at once) + `margin_ns`, and starts that long before
    it. Calls due later join, in due order, as long as the round with them still ends before that
    tick; the others wait for the next round. A start in the past means: at once."""
    if not calls:
        return None
    order = sorted(range(len(calls)), key=lambda i: (calls[i].due_ns, i))
    ticks = [c.tick_ns for c in calls if c.tick_ns]
    first_due = calls[order[0]].due_ns
    members = [i for i in order if calls[i].due_ns - first_due <= tolerance_ns]
    expected = expected_ns(len(members))
    if not ticks or expected is None:
        return RoundPlan(now_ns, tuple(sorted(order)), 0)
    grid = majority_phase(ticks, period_ns, tolerance_ns)
    latest = max(calls[i].due_ns for i in members)
    end_tick = next_tick(grid, latest + expected + margin_ns, period_ns)
    for i in order[len(members):]:
        longer = expected_ns(len(members) + 1)
        if longer is None or max(latest, calls[i].due_ns) + longer + margin_ns > end_tick:
            break  # due in order: a later call fits no better
        members.append(i)
        expected, latest = longer, max(latest, calls[i].due_ns)
    return RoundPlan(end_tick - expected - margin_ns, tuple(sorted(members)), end_tick)


def first_frame_pad(made: int, last_tick_ns: int, group_frame_tick_ns: int, *, per_tick: int = 480,
                    frame: int = 1920, period_ns: int = TICK_NS, tolerance_ns: int = SAME_TICK_NS) -> int:
    """Samples of silence to put before a new call's first 24 kHz sample so that its frames complete
    on the group's frame ticks: `made` = its samples (at 24 kHz) up to the rx tick `last_tick_ns`, one
    `per_tick` more each tick; the group's frames complete at `group_frame_tick_ns` + k x frame time.
    The call's frames then complete on the group's tick or on one of its own ticks up to a tick before
    it (a call on another clock), so they are due when the group's round plans. Under one frame."""
    frame_ns = period_ns * frame // per_tick
    ahead = (group_frame_tick_ns - last_tick_ns) % frame_ns
    # the call's own tick on or before the group's; a group tick a little (< tolerance) before one of
    # the call's ticks is that tick (one clock: stamps of one tick lie microseconds apart)
    ticks = (ahead + tolerance_ns) // period_ns % (frame // per_tick)
    return (-(made + ticks * per_tick)) % frame


def first_frame_tick(made: int, pad: int, last_tick_ns: int, *, per_tick: int = 480, frame: int = 1920,
                     period_ns: int = TICK_NS) -> int:
    """The tick on which a call's next frame completes: `made` + `pad` samples by the tick
    `last_tick_ns` (that tick itself if they end a frame there), `per_tick` more each tick after.
    The grid of a call's frames before its first frame is pulled, for the calls that join after it."""
    have = made + pad
    if have and have % frame == 0:
        return last_tick_ns
    short = frame - have % frame
    return last_tick_ns + -(-short // per_tick) * period_ns


class RoundTimes:
    """How long a round of B calls takes, from the runner's recent rounds: `expected_ns(B)` is the
    ROUND_QUANTILE of the last ROUND_WINDOW rounds of that size; a size never seen is scaled linearly
    from the nearest one seen (an upper bound for a batch); None until a round was seen. One thread
    (the inference thread) writes and reads it."""

    def __init__(self, window: int = ROUND_WINDOW, quantile: float = ROUND_QUANTILE):
        if window < 1 or not 0 <= quantile <= 100:
            raise ValueError(f"window must be >= 1 and quantile in 0..100, got {window!r}, {quantile!r}")
        self.window, self.quantile = window, quantile  # a window of 0.8 s at one round per frame
        self._ns: dict[int, deque] = {}
        self._expected: dict[int, int] = {}

    def observe(self, batch: int, ns: int) -> None:
        """A round of `batch` calls took `ns`. A round longer than a frame is not kept: that is a stall
        (a first round compiling its graphs, the machine taken away), counted late by the runner; planned
        by, it would start the next rounds at odd places between ticks for the whole window."""
        if batch < 1 or ns < 0:
            raise ValueError(f"a round has >= 1 calls and takes >= 0 ns, got {batch!r}, {ns!r}")
        if ns > FRAME_NS:
            return
        seen = self._ns.setdefault(batch, deque(maxlen=self.window))
        seen.append(ns)
        self._expected[batch] = int(np.percentile(np.fromiter(seen, np.int64), self.quantile))

    def expected_ns(self, batch: int) -> int | None:
        if batch in self._expected:
            return self._expected[batch]
        if not self._expected:
            return None
        near = min(self._expected, key=lambda b: (abs(b - batch), -b))
        return self._expected[near] * batch // near
