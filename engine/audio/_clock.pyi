"""Absolute-deadline timing on the monotonic clock of time.monotonic_ns(): a periodic clock that
never drifts, and one-shot sleeps to a deadline (ext/clock.c, GIL released while sleeping)."""
from typing import Self

from typing_extensions import disjoint_base

MAX_PERIOD_MS: float
ERR_PERIOD: str
ERR_PERIOD_NS: str
ERR_TIME: str
ERR_BUSY: str

def now_ns() -> int:
    """Monotonic time in ns (equal to time.monotonic_ns())."""

def sleep_until(deadline_ns: int) -> int:
    """Sleeps until the monotonic clock reaches `deadline_ns`; returns how late the wake was, in ns."""

@disjoint_base
class PeriodicClock:
    """A clock ticking every `period_ms` on an absolute grid: deadlines are start + k * period, k >= 1."""

    def __new__(cls, period_ms: float, start_ns: int | None = None) -> Self: ...
    def wait(self) -> int:
        """Sleeps until the next deadline; returns this wake's lateness in ns."""
    def reset(self, start_ns: int | None = None) -> None:
        """Restarts the grid at `start_ns` (default: now); counters go back to 0."""
    def skip_to_now(self) -> int:
        """Moves the next deadline past now without sleeping; returns how many grid points were dropped."""
    @property
    def period_ns(self) -> int: ...
    @property
    def start_ns(self) -> int:
        """Grid origin, monotonic ns."""
    @property
    def deadline_ns(self) -> int:
        """The next deadline, monotonic ns."""
    @property
    def ticks(self) -> int:
        """Wakes delivered by wait()."""
    @property
    def missed(self) -> int:
        """Grid points dropped by the no-burst policy or skip_to_now()."""
