# cython: boundscheck=False, wraparound=False
"""Absolute-deadline timing for the 80 ms cadence: a periodic clock that never drifts, and one-shot
sleeps to a deadline, both on the monotonic clock of time.monotonic_ns().

Why not time.sleep: a loop that sleeps `period - elapsed` adds each wake's oversleep to the next
period, so its cadence drifts (BENCHMARKS.md, "Clock"); here every wake targets start + k * period.
The sleeping is C (ext/clock.c: clock_nanosleep(TIMER_ABSTIME) on Linux, mach_wait_until on macOS)
and runs without the GIL.
"""

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EINTR
from libc.stdint cimport int64_t

from includes.clock cimport (
    cb_clock_now_ns, cb_clock_sleep_until_interruptible, cb_periodic, cb_periodic_begin, cb_periodic_deadline,
    cb_periodic_end, cb_periodic_reset, cb_periodic_skip_to_now,
)

import math

# An hour keeps start + k * period far from int64 overflow (2.5 million hours of ticks); a frame clock
# with a longer period is a unit mistake (seconds given as ms the other way round, say).
MAX_PERIOD_MS = 3_600_000.0

ERR_PERIOD = "period_ms must be a finite number of milliseconds in (0, {max:g}], got {value!r}"
ERR_PERIOD_NS = "period_ms={value!r} rounds to 0 ns; the clock counts whole nanoseconds"
ERR_TIME = "{name} must be an int of monotonic nanoseconds >= 0 (see now_ns()), got {value!r}"
ERR_BUSY = "PeriodicClock.wait() is already running in another thread; a clock belongs to one thread"


cdef int64_t _check_time(str name, object value) except -1:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**62:
        raise ValueError(ERR_TIME.format(name=name, value=value))
    return value


cdef int _sleep_until(int64_t deadline) except -1:
    """Sleep to `deadline` without the GIL. A signal cuts the OS wait short: Python's handlers run
    (in the main thread; KeyboardInterrupt propagates from here) and the wait resumes on the same
    absolute deadline, so a handled signal neither shortens nor lengthens it."""
    cdef int err
    while True:
        with nogil:
            err = cb_clock_sleep_until_interruptible(deadline)
        if err != EINTR:
            break
        PyErr_CheckSignals()
    if err:
        raise OSError(err, f"sleep until {deadline} ns failed")
    return 0


def now_ns():
    """Monotonic time in ns: the time base of every deadline here (equal to time.monotonic_ns())."""
    return cb_clock_now_ns()


def sleep_until(deadline_ns):
    """Sleep until the monotonic clock reaches `deadline_ns`; return the lateness of the wake in ns
    (>= 0; a deadline already passed returns at once with how far past it was). Releases the GIL;
    signal handlers run during the wait (Ctrl-C interrupts it), which then resumes on the same deadline.

    Waiting for "data ready OR deadline" (the inference runner's watchdog, docs/latency.md, "Cadence"): the
    producer is the pjmedia clock thread, which must not make system calls, so nothing can wake us
    when data lands. The cheap way is short absolute sleeps that poll the ring:

        while ring.readable < frame:
            now = now_ns()
            if now >= deadline:
                break                      # stalled: feed concealment / silence
            sleep_until(min(deadline, now + 500_000))   # 0.5 ms polls

    which costs about 2000 wakes per second and adds at most one poll step of latency. Had the
    producer been allowed to signal, a futex / pthread_cond_timedwait (CLOCK_MONOTONIC on Linux;
    macOS only has relative timeouts) or an eventfd + poll(timeout) would wake on data at once; they
    put a system call on the media thread and need shared-memory care across processes.
    """
    cdef int64_t deadline = _check_time("deadline_ns", deadline_ns)
    _sleep_until(deadline)
    return cb_clock_now_ns() - deadline


cdef class PeriodicClock:
    """A clock ticking every `period_ms` on an absolute grid: deadlines are start + k * period, k >= 1.

    `wait()` sleeps to the next deadline and returns that wake's lateness in ns; a late wake never
    delays the ones after it. The grid starts at construction (or at `start_ns`, monotonic ns).

    Missed periods are counted, not replayed: if `wait()` is called after its deadline and the next
    grid point have both passed, the grid points more than a period old are dropped (added to
    `missed`) and the wait returns at once for the latest one passed. After any wait the deadline
    just served is `start_ns + (ticks + missed) * period_ns`. `skip_to_now()` drops every passed grid
    point, for a caller that wants its next wake in the future.

    A clock belongs to one thread: a wait() from a second thread while one is sleeping raises
    RuntimeError.
    """

    cdef cb_periodic _p
    cdef bint _waiting

    def __cinit__(self, period_ms, start_ns=None):
        if isinstance(period_ms, bool) or not isinstance(period_ms, (int, float)) \
                or not math.isfinite(period_ms) or not 0 < period_ms <= MAX_PERIOD_MS:
            raise ValueError(ERR_PERIOD.format(max=MAX_PERIOD_MS, value=period_ms))
        cdef int64_t period_ns = round(period_ms * 1_000_000)
        if period_ns <= 0:
            raise ValueError(ERR_PERIOD_NS.format(value=period_ms))
        cdef int64_t start = cb_clock_now_ns() if start_ns is None else _check_time("start_ns", start_ns)
        cb_periodic_reset(&self._p, period_ns, start)
        self._waiting = False

    def wait(self):
        """Sleep until the next deadline; return this wake's lateness in ns: from the deadline to the
        moment this thread holds the GIL again, i.e. when the caller can act. The GIL is released
        while sleeping; signal handlers run during the wait, which then resumes on the same deadline."""
        cdef int64_t deadline
        if self._waiting:
            raise RuntimeError(ERR_BUSY)
        self._waiting = True
        try:
            deadline = cb_periodic_begin(&self._p)
            _sleep_until(deadline)  # an exception from a signal handler leaves the grid unadvanced
            return cb_periodic_end(&self._p, deadline)
        finally:
            self._waiting = False

    def reset(self, start_ns=None):
        """Restart the grid at `start_ns` (default: now); counters go back to 0."""
        if self._waiting:
            raise RuntimeError(ERR_BUSY)
        cdef int64_t start = cb_clock_now_ns() if start_ns is None else _check_time("start_ns", start_ns)
        cb_periodic_reset(&self._p, self._p.period_ns, start)

    def skip_to_now(self):
        """Move the next deadline to the first grid point after now, without sleeping; return how many
        grid points were dropped (also added to `missed`)."""
        if self._waiting:
            raise RuntimeError(ERR_BUSY)
        return cb_periodic_skip_to_now(&self._p)

    @property
    def period_ns(self):
        return self._p.period_ns

    @property
    def start_ns(self):
        """Grid origin, monotonic ns."""
        return self._p.start_ns

    @property
    def deadline_ns(self):
        """The next deadline, monotonic ns."""
        return cb_periodic_deadline(&self._p)

    @property
    def ticks(self):
        """Wakes delivered by wait()."""
        return self._p.ticks

    @property
    def missed(self):
        """Grid points dropped (never delivered) by the no-burst policy or skip_to_now()."""
        return self._p.missed

    def __repr__(self):
        return (f"PeriodicClock(period_ns={self._p.period_ns}, ticks={self._p.ticks}, "
                f"missed={self._p.missed}, deadline_ns={cb_periodic_deadline(&self._p)})")
