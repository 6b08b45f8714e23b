"""Real-time scheduling for the calling thread (the inference thread): ask the OS for its real-time
policy, take what it grants, and say why when that is less.

Why: the 80 ms step must start on its deadline even while other work wants the cores (docs/latency.md,
"Cadence"). Real-time policies need privileges a phone bot often lacks, so missing privileges are a
reported outcome, never an exception: the bot still runs, less protected from other load. What is
tried on each OS, and why, is in ext/rtthread.h.

    result = make_realtime(period_ms=80, computation_ms=60, constraint_ms=80)
    log.info("inference thread: %s priority %d (%s)", result.policy, result.priority, result.reason)
    ...
    result.restore()   # same thread; optional
"""
from __future__ import annotations

import errno
import math
import os
import sys
from dataclasses import dataclass, field

from callbot.engine.audio import _rtthread

# Linux SCHED_FIFO priority (1-99): above every time-sharing thread, below the kernel's threaded
# interrupt handlers (50) and the audio servers (PipeWire and JACK use 20-88), which we must not
# preempt since they feed the same sound path.
DEFAULT_FIFO_PRIORITY = 10
# Linux fallback under SCHED_OTHER: nice -10 is about 10x the CPU share of a nice-0 thread under load.
DEFAULT_NICE = -10
# A frame period, not a batch job; also keeps macOS's 32-bit mach-time fields (4.29 s at 1 ns/unit)
# far from overflow.
MAX_PERIOD_MS = 1000.0

ERR_TIME = "{name} must be a finite number of milliseconds in (0, {max:g}], got {value!r}"
ERR_ORDER = ("need computation_ms <= constraint_ms <= period_ms (the work fits its deadline, the "
             "deadline falls within the period), got {c!r}, {k!r}, {p!r}")
ERR_PRIORITY = "priority must be an int SCHED_FIFO priority in [1, 99], got {value!r}"
ERR_NICE = "nice must be an int nice value in [-20, 19], got {value!r}"

# kern_return_t values thread_policy_set gives back (mach/kern_return.h)
_KERN_NAMES = {1: "KERN_INVALID_ADDRESS", 2: "KERN_PROTECTION_FAILURE", 4: "KERN_INVALID_ARGUMENT",
               5: "KERN_FAILURE", 6: "KERN_RESOURCE_SHORTAGE", 8: "KERN_NO_ACCESS",
               46: "KERN_NOT_SUPPORTED"}


@dataclass(frozen=True)
class RealtimeResult:
    """What the calling thread got from make_realtime().

    policy: "SCHED_FIFO" or "SCHED_OTHER" (Linux); "THREAD_TIME_CONSTRAINT_POLICY" or
        "QOS_CLASS_USER_INTERACTIVE" (macOS); "unchanged" when nothing was granted.
    priority: the SCHED_FIFO priority, or the thread's nice value under SCHED_OTHER; 0 on macOS.
    reason: why this is less than what was asked (the refused call and its error), None when the
        first choice was granted as asked.
    computation_ms: the computation the OS was asked for (macOS clamps it into 0.05-50 ms).
    """

    policy: str
    priority: int
    reason: str | None
    computation_ms: float
    _saved: _rtthread.SavedPolicy = field(repr=False, compare=False)

    @property
    def realtime(self) -> bool:
        """True when the thread is in a real-time scheduling class (not only favoured)."""
        return self.policy in ("SCHED_FIFO", "THREAD_TIME_CONSTRAINT_POLICY")

    def restore(self) -> None:
        """Put the thread's scheduling back as it was before make_realtime(). Call it on the same
        thread (RuntimeError otherwise)."""
        self._saved.restore()


def _check_ms(name: str, value: object, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= maximum:
        raise ValueError(ERR_TIME.format(name=name, max=maximum, value=value))
    return float(value)


def _errno_text(code: int) -> str:
    return f"{errno.errorcode.get(code, str(code))}: {os.strerror(code)}"


def _kern_text(code: int) -> str:
    return f"kern_return_t {code} {_KERN_NAMES.get(code, '')}".rstrip()


def make_realtime(period_ms: float, computation_ms: float, constraint_ms: float, *,
                  priority: int = DEFAULT_FIFO_PRIORITY, nice: int = DEFAULT_NICE) -> RealtimeResult:
    """Make the CALLING thread as real-time as the OS permits; returns what it got.

    period_ms: how often the thread wakes (the 80 ms frame); computation_ms: CPU time it needs per
    period; constraint_ms: by when, from the period's start, that work must be done. macOS uses all
    three (time-constraint policy); Linux SCHED_FIFO only `priority`, and its fallback `nice`.
    Raises ValueError for bad arguments, never for missing privileges.
    """
    period = _check_ms("period_ms", period_ms, MAX_PERIOD_MS)
    computation = _check_ms("computation_ms", computation_ms, MAX_PERIOD_MS)
    constraint = _check_ms("constraint_ms", constraint_ms, MAX_PERIOD_MS)
    if not computation <= constraint <= period:
        raise ValueError(ERR_ORDER.format(c=computation_ms, k=constraint_ms, p=period_ms))
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 99:
        raise ValueError(ERR_PRIORITY.format(value=priority))
    if isinstance(nice, bool) or not isinstance(nice, int) or not -20 <= nice <= 19:
        raise ValueError(ERR_NICE.format(value=nice))

    policy, got, primary_err, fallback_err, computation_ns, saved = _rtthread.make_realtime(
        round(period * 1e6), round(computation * 1e6), round(constraint * 1e6), priority, nice)
    used_ms = computation_ns / 1e6

    darwin = sys.platform == "darwin"
    reasons = []
    if primary_err and darwin:
        reasons.append(f"THREAD_TIME_CONSTRAINT_POLICY refused ({_kern_text(primary_err)})")
    elif primary_err and policy == "SCHED_FIFO":
        reasons.append(f"SCHED_FIFO priority {priority} refused ({_errno_text(primary_err)}); "
                       f"RLIMIT_RTPRIO allowed priority {got}")
    elif primary_err:
        reasons.append(f"SCHED_FIFO priority {priority} refused ({_errno_text(primary_err)}; it "
                       "needs CAP_SYS_NICE or RLIMIT_RTPRIO >= 1)")
    if fallback_err and darwin:
        reasons.append(f"QOS_CLASS_USER_INTERACTIVE refused ({_errno_text(fallback_err)})")
    elif fallback_err:
        reasons.append(f"nice {nice} refused ({_errno_text(fallback_err)}); the thread runs at nice {got}")
    if darwin and computation_ns != round(computation * 1e6):
        reasons.append(f"computation {computation:g} ms clamped to {used_ms:g} ms "
                       "(the kernel allows 0.05-50 ms)")
    return RealtimeResult(policy=policy, priority=got, reason="; ".join(reasons) or None,
                          computation_ms=used_ms, _saved=saved)
