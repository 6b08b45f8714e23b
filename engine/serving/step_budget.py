"""Admission control for one model: how long a round of steps takes for B calls, and whether one more
call still fits into the 80 ms frame.

Why: every open call needs one step of the model per 80 ms frame. The runner (engine/serving/runner.py)
steps its calls one after another on one thread, so a round of B calls costs the sum of B single steps;
once that sum passes the frame, every call falls behind together (silence fed, frames dropped), not
only the newest. A call that would push the round past the frame is better refused at the INVITE (SIP
503 with Retry-After: the caller, or the edge in front, tries another worker or later) than answered
and spoiled for everyone.

What is measured, not assumed: `StepTimes` holds seconds per round by batch size B. The service fills it
at warm-up (one session stepped B times back to back, B = 1, 2, ...: exactly what the sequential runner
does with B calls, without opening B calls' worth of memory) and while running (`observe_live`: the
calls' own step times, summed over the calls open). A batched step (issue 13, point 1) reports its
rounds through `observe` instead, and nothing else here changes. Where B was never measured, the
nearest measured size is scaled linearly (the sequential law: an upper bound for a batched step).

The frame is not all the model's: resampling, the rings, GIL hand-offs and a late media tick take their
share, so a round may use `HEADROOM` of it (72 of 80 ms). `max_calls` set in the config replaces the
measured limit (an operator who knows the machine better, or wants room for something else).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

FRAME_S = 0.080  # one frame of the model: 1920 samples at 24 kHz
HEADROOM = 0.9  # the share of the frame a round of steps may take
LIVE_WEIGHT = 0.2  # weight of a new observation in a batch size's running mean (about the last 5 count)
MAX_BATCH = 4096

# the reasons a call is refused (Prometheus labels, log words): the measured step time would miss the
# frame, the configured max_calls is reached, or (worker side) no model service is connected
FRAME_BUDGET = "frame_budget"
MAX_CALLS = "max_calls"
UNAVAILABLE = "unavailable"


class StepTimes:
    """Seconds a round of steps takes for B calls, by B: measured, and a running mean per B.

    Thread-safe: the service's control threads and the inference thread's events both write."""

    def __init__(self, weight: float = LIVE_WEIGHT):
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        self.weight = weight
        self._s: dict[int, float] = {}
        self._live: dict[str, float] = {}  # each open call's running mean step, s
        self._lock = threading.Lock()

    def observe(self, batch: int, seconds: float) -> None:
        """One round of `batch` calls took `seconds`."""
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be an int from 1 to {MAX_BATCH}, got {batch!r}")
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds!r}")
        with self._lock:
            old = self._s.get(batch)
            self._s[batch] = seconds if old is None else old + self.weight * (seconds - old)

    def observe_live(self, call: str, step_seconds: Iterable[float]) -> None:
        """Steps of one open call (a sequential runner's FrameStages): its running mean is updated, and
        the round of every call open now (their means summed) is observed at its batch size."""
        with self._lock:
            mean = self._live.get(call)
            for s in step_seconds:
                mean = s if mean is None else mean + self.weight * (s - mean)
            if mean is None:
                return
            self._live[call] = mean
            batch, total = len(self._live), sum(self._live.values())
        self.observe(min(batch, MAX_BATCH), total)

    def call_ended(self, call: str) -> None:
        with self._lock:
            self._live.pop(call, None)

    @property
    def measured(self) -> dict[int, float]:
        """Batch size -> seconds per round, for the sizes observed (a copy)."""
        with self._lock:
            return dict(sorted(self._s.items()))

    def predict(self, batch: int) -> float | None:
        """Seconds a round of `batch` calls should take: measured, else the nearest measured size scaled
        linearly; None when nothing was measured (an engine without steps, the echo line)."""
        with self._lock:
            if batch in self._s:
                return self._s[batch]
            if not self._s:
                return None
            near = min(self._s, key=lambda b: (abs(b - batch), -b))
            return self._s[near] * batch / near


class Admission:
    """Whether a model with `taken` calls (open or promised) may take one more."""

    def __init__(self, times: StepTimes | None, max_calls: int | None = None, *, frame_s: float = FRAME_S,
                 headroom: float = HEADROOM):
        if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int)
                                      or max_calls < 1):
            raise ValueError(f"max_calls must be an int >= 1 or None, got {max_calls!r}")
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
        self.times = times
        self.max_calls = max_calls
        self.budget_s = frame_s * headroom

    def refusal(self, taken: int) -> str | None:
        """None when call number `taken + 1` fits; else the reason (MAX_CALLS, FRAME_BUDGET)."""
        want = taken + 1
        if self.max_calls is not None:
            return MAX_CALLS if want > self.max_calls else None
        # a lone call is never refused by measurement: a model too slow for one call in real time is the
        # machine's problem, said once at start (the service warns), not a reason to answer nobody
        cost = self.times.predict(want) if self.times is not None and want > 1 else None
        if cost is not None and cost > self.budget_s:
            return FRAME_BUDGET
        return None

    def limit(self) -> int | None:
        """The most calls admitted at once now: max_calls, else the largest B (>= 1) whose predicted
        round fits the budget; None when unbounded (nothing measured, no max_calls)."""
        if self.max_calls is not None:
            return self.max_calls
        if self.times is None or self.times.predict(1) is None:
            return None
        b = 1
        while b < MAX_BATCH and self.times.predict(b + 1) <= self.budget_s:
            b += 1
        return b


WARMUP_MAX_BATCH = 8  # sizes measured at warm-up; beyond, the live rounds and the linear law
WARMUP_REPEATS = 2  # rounds per size; the slower one counts (the first may still pay for allocation)


def measure_rounds(step: Callable[[], None], times: StepTimes, budget_s: float = FRAME_S * HEADROOM,
                   max_batch: int = WARMUP_MAX_BATCH, repeats: int = WARMUP_REPEATS,
                   clock: Callable[[], float] = time.perf_counter) -> None:
    """Rounds of B = 1, 2, ... `step()` calls back to back (one warm session stepped B times: what the
    sequential runner does for B calls, with one call's memory), into `times`; stops after the first B
    over `budget_s` or at `max_batch`. Runs on the inference thread, before the first call."""
    for batch in range(1, max_batch + 1):
        worst = 0.0
        for _ in range(repeats):
            t0 = clock()
            for _ in range(batch):
                step()
            worst = max(worst, clock() - t0)
        times.observe(batch, worst)
        if worst > budget_s:
            return
