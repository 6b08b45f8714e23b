"""Binding of ext/rtthread.c: make the calling thread real-time and restore it. Arguments are checked
by callbot.engine.audio.realtime, the public face; this layer only converts."""

from libc.stdint cimport int64_t

from includes.rtthread cimport (
    CB_RT_FIFO, CB_RT_OTHER, CB_RT_QOS_INTERACTIVE, CB_RT_TIME_CONSTRAINT, CB_RT_UNCHANGED, CB_RT_WRONG_THREAD,
    cb_rt_make_realtime, cb_rt_restore, cb_rt_result, cb_rt_saved,
)

# enum cb_rt_kind -> the name callers see
KIND_NAMES = {
    CB_RT_UNCHANGED: "unchanged",
    CB_RT_FIFO: "SCHED_FIFO",
    CB_RT_OTHER: "SCHED_OTHER",
    CB_RT_TIME_CONSTRAINT: "THREAD_TIME_CONSTRAINT_POLICY",
    CB_RT_QOS_INTERACTIVE: "QOS_CLASS_USER_INTERACTIVE",
}

ERR_WRONG_THREAD = ("restore() must run on the thread that called make_realtime(): scheduling "
                    "policies belong to one thread")


cdef class SavedPolicy:
    """The scheduling state a thread had before make_realtime(); restore() puts it back."""

    cdef cb_rt_saved _saved

    def restore(self):
        err = cb_rt_restore(&self._saved)
        if err == CB_RT_WRONG_THREAD:
            raise RuntimeError(ERR_WRONG_THREAD)
        if err:
            raise OSError(err, f"restoring the thread's scheduling policy failed (code {err})")


def make_realtime(int64_t period_ns, int64_t computation_ns, int64_t constraint_ns,
                  int fifo_priority, int target_nice):
    """Returns (kind name, priority, primary_err, fallback_err, computation_ns used, SavedPolicy)."""
    cdef cb_rt_result r
    saved = SavedPolicy()
    cb_rt_make_realtime(period_ns, computation_ns, constraint_ns, fifo_priority, target_nice, &r,
                        &(<SavedPolicy>saved)._saved)
    return (KIND_NAMES[r.kind], r.priority, r.primary_err, r.fallback_err, r.computation_ns, saved)
