"""Binding of ext/stamps.h: when audio crossed the media side of a call's rings, as lock-free
(samples moved so far, monotonic ns) pairs that the media callback appends and the engine reads."""
from typing import Any, Self

from typing_extensions import disjoint_base

NBYTES: int
"""Bytes one log takes: the size of ext/stamps.h's cb_stamps (1280), to size shared blocks."""
HELD: int
"""Pairs held: positions older than the last HELD - 1 callbacks are answered 0 (unknown)."""

@disjoint_base
class StampLog:
    """One stamp log in a writable, 8-byte aligned buffer of at least NBYTES bytes."""

    def __new__(cls, buffer: Any, create: bool) -> Self:
        """Lays out a new log in `buffer` (create) or opens the one there; prefer create_in / attach."""
    @staticmethod
    def create_in(buffer: Any) -> StampLog:
        """A new, empty log at the start of `buffer`."""
    @staticmethod
    def attach(buffer: Any) -> StampLog:
        """The log another StampLog laid out at the start of `buffer` (another process's, for one)."""
    def close(self) -> None:
        """Lets go of the buffer; the log then answers nothing and takes nothing. Safe to repeat."""
    @property
    def closed(self) -> bool: ...
    def note(self, n: int, ns: int = 0) -> None:
        """Writer: `n` samples moved now (or at monotonic `ns`)."""
    def appended(self) -> int:
        """Reader: pairs the writer has appended so far (0 once closed)."""
    def reached(self) -> int:
        """Reader: the writer's sample total as of its last pair (0 if none)."""
    def find(self, pos: int) -> int:
        """Reader: monotonic ns at which the writer had moved `pos` samples; 0 if not yet, or too long ago."""
