"""When the inference thread looks at its calls' audio next: on its coarse poll (`poll_ms`, 1 ms), and
finely (every 0.1 ms) around the tick where a call's next frame is expected to complete.

Why: a frame's last samples reach rx on a media tick, and the runner finds them only when it next
looks. A 1 ms poll put 0-1 ms (p99 1.0 ms, BENCHMARKS.md "The rounds meet the tick") between the
frame's arrival and its resampling: most of what our own stages added on the model line beyond the
tick. Why not a wake-up sent by the writer instead: the writer is pjmedia's clock thread, in the SIP
process or in one of a model service's workers; waking the inference thread from there needs a
cross-process primitive on the media hot path, which must neither block nor take a lock (a futex on
Linux, `os_sync_wake_by_address_any` on macOS >= 14.4), a doorbell shared by every call of every
worker, and a system call on each 20 ms write of each call. The arrivals are known in advance
instead: a call's frames complete on its own grid, one every 80 ms from the tick that completed its
last frame (the rx stamps, round_schedule.py). So the thread looks finely only from `lead` before the
expected tick until the frame has come, or until `span` after it (a caller on hold, a stalled worker:
the coarse poll and the watchdog take over): a handful of looks per frame, each one a ring counter.

Pure functions of the times given (tests/test_arrival_watch.py).
"""
from __future__ import annotations

from typing import Iterable

FRAME_NS = 80_000_000  # one model frame: a call's frames complete this far apart
FINE_NS = 100_000  # the look period around an expected arrival
# the window around the expected tick: before it, because the tick the grid was taken from may itself
# have been served late by the media clock (its lateness p99 is 1-3 ms on a loaded machine,
# BENCHMARKS.md "Media callback"); after it, for this tick's lateness
LEAD_NS = 1_000_000
SPAN_NS = 4_000_000


def expected_arrival_ns(grid_ns: int, now_ns: int, period_ns: int = FRAME_NS, span_ns: int = SPAN_NS) -> int:
    """The expected arrival to watch for: the first point after `grid_ns` (a frame's arrival) of its
    `period_ns` grid whose window is still open at `now_ns` (point + `span_ns` > now)."""
    k = max(1, (now_ns - span_ns - grid_ns) // period_ns + 1)
    return grid_ns + k * period_ns


def next_look_ns(now_ns: int, coarse_ns: int, expected: Iterable[int], fine_ns: int = FINE_NS,
                 lead_ns: int = LEAD_NS, span_ns: int = SPAN_NS) -> int:
    """When to look next: `fine_ns` from now while `now_ns` lies in some expected arrival's window
    [arrival - lead, arrival + span); else the coarse poll's deadline `coarse_ns`, or the opening of
    the next window if that comes first."""
    look = coarse_ns
    for arrival in expected:
        opens = arrival - lead_ns
        if opens <= now_ns < arrival + span_ns:
            return min(look, now_ns + fine_ns)
        if now_ns < opens:
            look = min(look, opens)
    return look
