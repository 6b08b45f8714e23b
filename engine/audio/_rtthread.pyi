"""Binding of ext/rtthread.c: make the calling thread real-time and restore it. Arguments are checked
by callbot.engine.audio.realtime, the public face; this layer only converts."""
from typing_extensions import disjoint_base

KIND_NAMES: dict[int, str]
"""enum cb_rt_kind -> the name callers see ("SCHED_FIFO", ...)."""
ERR_WRONG_THREAD: str

@disjoint_base
class SavedPolicy:
    """The scheduling state a thread had before make_realtime(); restore() puts it back."""

    def restore(self) -> None:
        """Puts the policy back; RuntimeError from another thread, OSError if the OS refuses."""

def make_realtime(
    period_ns: int, computation_ns: int, constraint_ns: int, fifo_priority: int, target_nice: int
) -> tuple[str, int, int, int, int, SavedPolicy]:
    """Returns (kind name, priority, primary_err, fallback_err, computation_ns used, SavedPolicy)."""
