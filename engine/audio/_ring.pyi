"""Thin binding of ext/ring.h, the lock-free single-producer / single-consumer ring of PCM samples.

Use callbot.engine.audio.ring.Ring, which subclasses this Ring and checks arguments; this layer checks
only what keeps the C side memory-safe.
"""
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

# Layout facts: a ring's block is HEADER_BYTES + capacity * itemsize bytes.
HEADER_BYTES: int
MAX_CAPACITY: int
# Sample type codes stored in the header.
INT16: int
FLOAT32: int
# cb_ring_check results.
OK: int
ERR_SIZE: int
ERR_ALIGN: int
ERR_MAGIC: int
ERR_VERSION: int
ERR_CAPACITY: int
ERR_DTYPE: int
ERR_INDICES: int

@disjoint_base
class Ring:
    """One ring.h ring bound to a writable buffer; closed until _bind_new or _bind_existing succeeds."""

    @property
    def itemsize(self) -> int:
        """Bytes per sample (2 or 4); 0 while unbound."""
    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        """Accepts any arguments: the Python subclass chooses its own constructor signature."""
    def _bind_new(self, buffer: Any, capacity: int, dtype_code: int, itemsize: int) -> int:
        """Lays out an empty ring at the start of `buffer`; OK or an ERR_* code (then unbound)."""
    def _bind_existing(self, buffer: Any) -> int:
        """Opens the ring laid out in `buffer`; OK or an ERR_* code (then unbound)."""
    def close(self) -> None:
        """Lets go of the buffer; not thread-safe (neither side may touch the ring again)."""
    def __enter__(self) -> Ring: ...
    def __exit__(
        self, *exc: type[BaseException] | BaseException | TracebackType | None
    ) -> None: ...
    def write(self, samples: npt.NDArray[Any]) -> int:
        """Producer: copies what fits of `samples` (1-D, the ring's dtype); returns how many."""
    def read(self, count: int) -> npt.NDArray[Any] | None:
        """Consumer: exactly `count` samples as a new array, or None (one underrun counted)."""
    def read_into(self, out: npt.NDArray[Any]) -> int:
        """Consumer: fills `out` from the front with up to len(out) samples; returns how many."""
    @property
    def readable(self) -> int:
        """Samples the consumer can read now (a snapshot from another thread)."""
    @property
    def writable(self) -> int:
        """Free slots the producer can fill now (a snapshot from another thread)."""
    @property
    def capacity(self) -> int:
        """Samples the ring holds when full (a power of two)."""
    @property
    def dtype(self) -> np.dtype[Any]:
        """numpy dtype of the samples: int16 or float32."""
    @property
    def overruns(self) -> int:
        """Writes that could not take all their samples."""
    @property
    def underruns(self) -> int:
        """Reads that found fewer samples than they asked for."""
    @property
    def closed(self) -> bool: ...
