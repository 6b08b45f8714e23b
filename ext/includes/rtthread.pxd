# C declarations of ext/rtthread.h: make the calling thread real-time, and put it back.
# Cimported by name: `from includes.rtthread cimport cb_rt_make_realtime` (setup.py says why).
from libc.stdint cimport int64_t


cdef extern from "rtthread.h" nogil:
    ctypedef struct cb_rt_result:
        int kind
        int priority
        int primary_err
        int fallback_err
        int64_t computation_ns

    # Opaque: what it holds differs between Linux and macOS; only rtthread.c reads it.
    ctypedef struct cb_rt_saved:
        pass

    enum cb_rt_kind:
        CB_RT_UNCHANGED
        CB_RT_FIFO
        CB_RT_OTHER
        CB_RT_TIME_CONSTRAINT
        CB_RT_QOS_INTERACTIVE

    int CB_RT_WRONG_THREAD

    void cb_rt_make_realtime(int64_t period_ns, int64_t computation_ns, int64_t constraint_ns,
                             int fifo_priority, int target_nice, cb_rt_result* result,
                             cb_rt_saved* saved)
    int cb_rt_restore(const cb_rt_saved* saved)
