# C declarations of ext/clock.h: the monotonic time base and the absolute-deadline periodic clock.
# Cimported by name: `from includes.clock cimport cb_clock_now_ns` (setup.py says why).
from libc.stdint cimport int64_t


cdef extern from "clock.h" nogil:
    ctypedef struct cb_periodic:
        int64_t start_ns
        int64_t period_ns
        int64_t next
        int64_t ticks
        int64_t missed

    int64_t cb_clock_now_ns()
    int cb_clock_sleep_until(int64_t deadline_ns)
    int cb_clock_sleep_until_interruptible(int64_t deadline_ns)
    void cb_periodic_reset(cb_periodic* p, int64_t period_ns, int64_t start_ns)
    int64_t cb_periodic_deadline(const cb_periodic* p)
    int64_t cb_periodic_wait(cb_periodic* p)
    int64_t cb_periodic_begin(cb_periodic* p)
    int64_t cb_periodic_end(cb_periodic* p, int64_t deadline_ns)
    int64_t cb_periodic_skip_to_now(cb_periodic* p)
