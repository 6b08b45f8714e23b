"""Is the other end of the model service's socket still there? A count of silent intervals, on a clock.

Why: a process that is stopped (SIGSTOP, a debugger, a machine swapping hard) keeps its socket open, so
nothing on the other end ever reads EOF: its calls would stay silent and its slots taken forever. So
the two ends speak at least every `interval_s` (a worker sends Ping, the service answers Pong; calls'
events count as well), and `misses` intervals without a word mean the other end has stalled: the
service closes that worker's calls, the worker hangs up the calls the service served and reconnects
(engine/serving/inference_service.py, service_client.py; docs/capacity.md).

The rule is kept apart from the sockets so that it can be tested on an injected clock. One subtlety is
our own stall: when this process is the one that was stopped, every peer looks silent the moment it
resumes, before its reading thread has caught up with what the other end said meanwhile. A check that
finds its own previous check more than two intervals old therefore restarts the count instead of
judging: after a gap of its own it knows nothing of the other end. (Its checks come every interval,
or more often.)
"""
from __future__ import annotations

import time
from typing import Callable

HEARTBEAT_S = 1.0  # how often a worker pings its service (the [model] heartbeat_s default)
HEARTBEAT_MISSES = 3  # intervals without a word before the other end counts as stalled ([model] heartbeat_misses)


class Liveness:
    """When one end last heard the other, and whether that was too long ago.

    `heard()` on every message received (any thread); `check()` from one monitoring thread, at least
    every `interval_s`: the seconds of silence once they exceed `interval_s * misses`, else None."""

    def __init__(self, interval_s: float, misses: int, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0 or misses < 1:
            raise ValueError(f"a heartbeat needs interval_s > 0 and misses >= 1, got {interval_s}, {misses}")
        self.interval_s = interval_s
        self.misses = misses
        self._clock = clock
        now = clock()
        self._heard = now
        self._checked = now

    @property
    def limit_s(self) -> float:
        """Silence longer than this is a stall."""
        return self.interval_s * self.misses

    def heard(self) -> None:
        self._heard = self._clock()

    def silent_s(self) -> float:
        return self._clock() - self._heard

    def check(self) -> float | None:
        """The seconds of silence when the other end counts as stalled, else None. A gap in our own checks
        of more than two intervals (this process was stopped or starved) restarts the count from now."""
        now = self._clock()
        if now - self._checked > 2 * self.interval_s:
            self._heard = now
        self._checked = now
        silent = now - self._heard
        return silent if silent > self.limit_s else None
