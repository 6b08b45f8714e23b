"""Keep the calling thread, and the threads it starts from then on, on a set of CPUs.

Why: MLX evaluates a CPU stream's work on a thread of its own, which the thread that builds the graph
wakes and waits for many times a step (about 37 for the tiny model: the depformer's codebooks one after
another, the codec's layers). Across two cores every hand-over is a cross-core wake-up; on one core it
is a context switch. The tiny model's step on the 2-core CI machine (SCHED_FIFO): 9.1-10.2 ms p50 with
both threads on one core against 15.7-16.9 ms free to move, alone; 0.55-0.67x inside the latency
bench's calls (BENCHMARKS.md, "The inference thread on a core of its own"). A production machine gives
the model its own cores this way; it did not narrow the step's spread here (that is the core's own).

Linux: sched_setaffinity on the calling thread (pid 0 = this thread); a thread it creates later, like
MLX's stream thread when the inference thread makes its stream, inherits the mask, so pin before
that. macOS has no call that binds a thread to a core (its affinity tags only group threads onto a
shared cache, as hints), and the model runs on the GPU there: pinning is reported as not done, never
an error, like the real-time policy (engine/audio/realtime.py).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, NamedTuple

ERR_CPUS = "cpus must be a non-empty list of CPU numbers >= 0, got {value!r}"


class PinResult(NamedTuple):
    """What pin_thread() got: `cpus`, the CPUs the thread may now run on (empty when it was not
    pinned); `reason`, why it was not pinned as asked (None when it was)."""

    cpus: tuple[int, ...]
    reason: str | None


def check_cpus(cpus: Iterable[int]) -> tuple[int, ...]:
    """`cpus` as a sorted tuple of distinct CPU numbers; ValueError when it is empty or not CPU numbers."""
    try:
        got = tuple(sorted(set(cpus)))
    except TypeError:
        raise ValueError(ERR_CPUS.format(value=cpus)) from None
    if not got or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in got):
        raise ValueError(ERR_CPUS.format(value=cpus))
    return got


def pin_thread(cpus: Iterable[int]) -> PinResult:
    """Keep the CALLING thread (and the threads it starts after this) on `cpus`. CPUs the process may not
    use (absent, outside its cgroup's cpuset) are a reason, not an error: the thread keeps the ones it
    may use, or where it ran when it may use none. The thread's mask before does not limit it: a
    thread on CPU 0 may be pinned to CPU 1."""
    wanted = check_cpus(cpus)
    if not hasattr(os, "sched_setaffinity"):
        return PinResult((), f"not pinned to CPUs {_listed(wanted)}: {sys.platform} has no call that "
                             "keeps a thread on a core")
    try:
        os.sched_setaffinity(0, wanted)  # the kernel keeps those of them the process may use
    except OSError as err:
        return PinResult((), f"not pinned to CPUs {_listed(wanted)}: none of them is a CPU this process may "
                             f"use (sched_setaffinity: {err.strerror})")
    got = tuple(sorted(os.sched_getaffinity(0)))
    if got != wanted:
        return PinResult(got, f"pinned to CPUs {_listed(got)} only: the others of {_listed(wanted)} are not "
                              "CPUs this process may use")
    return PinResult(got, None)


def _listed(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in cpus)
