"""Lock-free single-producer/single-consumer PCM ring: the checked public face of ext/ring.h.

Why: the media thread, the resampler and the inference thread hand audio to each other without locks
or waiting, in one process or, over a shared_memory block, in two
(docs/architecture.md, "Two processes"). The C ring and its
contract are in ext/ring.h; ext/_ring.pyx binds it; this module checks arguments and says what is wrong.

Policy (never blocks, never allocates after creation except the arrays `read` returns):
- write: what does not fit is dropped (the newest samples, never queued ones) and counts one overrun.
- read(n): all n or nothing; nothing returns None and counts one underrun.
- read_into(out): up to len(out); a short read counts one underrun.
One thread writes and one thread reads; `readable`/`writable` from elsewhere are snapshots.
"""
from __future__ import annotations

import numpy as np

from callbot.engine.audio import _ring

# Error texts (named, so tests and callers can match them).
ERR_CAPACITY = "capacity must be a power of two between 1 and {max} samples, got {got!r}"
ERR_DTYPE = "dtype must be int16 or float32 (PCM samples), got {got!r}"
ERR_NOT_BUFFER = "buffer must support the buffer protocol (bytearray, shared_memory.buf, ...), got {got}"
ERR_READONLY = "buffer must be writable: the ring stores its indices and samples in it"
ERR_NOT_CONTIGUOUS = "buffer must be one contiguous block of memory"
ERR_TOO_SMALL = "buffer holds {have} bytes, the ring needs {need} (Ring.nbytes({capacity}, {dtype}))"
ERR_ALIGN = "buffer must start on an 8-byte boundary so the 64-bit indices are atomic (mmap'd memory is)"
# Why Ring.attach refused a buffer, by the C check's result.
ERR_ATTACH = {
    _ring.ERR_SIZE: "buffer is smaller than the ring its header describes",
    _ring.ERR_ALIGN: ERR_ALIGN,
    _ring.ERR_MAGIC: "buffer does not hold a ring (no ring magic): create one there with Ring.create_in",
    _ring.ERR_VERSION: "buffer holds a ring of another layout version (built by another callbot release)",
    _ring.ERR_CAPACITY: "buffer's ring header has a capacity that is not a power of two: not a valid ring",
    _ring.ERR_DTYPE: "buffer's ring header names an unknown sample type: not a valid ring",
    _ring.ERR_INDICES: (
        "buffer's ring indices are inconsistent (read ahead of write, or behind by more than the "
        "capacity): not a valid ring"
    ),
}

_DTYPES = {np.dtype(np.int16): (_ring.INT16, 2), np.dtype(np.float32): (_ring.FLOAT32, 4)}


def capacity_for(samples: int) -> int:
    """The smallest power-of-two capacity holding `samples` (a Ring's capacity must be a power of two)."""
    return 1 << max(0, int(samples - 1).bit_length())


def _dtype_code(dtype) -> tuple[np.dtype, int, int]:
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ValueError(ERR_DTYPE.format(got=dtype)) from None
    for known, (code, itemsize) in _DTYPES.items():
        if dt == known:  # native byte order only: the C side copies bytes as they are
            return known, code, itemsize
    raise ValueError(ERR_DTYPE.format(got=dtype))


def _check_capacity(capacity) -> int:
    if isinstance(capacity, (bool, np.bool_)) or not isinstance(capacity, (int, np.integer)):
        raise ValueError(ERR_CAPACITY.format(max=_ring.MAX_CAPACITY, got=capacity))
    c = int(capacity)
    if c < 1 or c > _ring.MAX_CAPACITY or c & (c - 1):
        raise ValueError(ERR_CAPACITY.format(max=_ring.MAX_CAPACITY, got=capacity))
    return c


def _check_buffer(buffer) -> memoryview:
    try:
        view = memoryview(buffer)
    except TypeError:
        raise ValueError(ERR_NOT_BUFFER.format(got=type(buffer).__name__)) from None
    if view.readonly:
        raise ValueError(ERR_READONLY)
    if not view.c_contiguous:
        raise ValueError(ERR_NOT_CONTIGUOUS)
    return view


class Ring(_ring.Ring):
    """A ring of `capacity` PCM samples of `dtype` ("int16" or "float32"); capacity a power of two.

    `Ring(capacity, dtype)` owns its memory. For two processes, lay one out in shared memory:
        shm = SharedMemory(create=True, size=Ring.nbytes(capacity, dtype))
        ring = Ring.create_in(shm.buf, capacity, dtype)    # the other process: Ring.attach(shm.buf)
    and `ring.close()` before `shm.close()` (the ring holds the buffer while open).
    """

    def __init__(self, capacity, dtype):
        capacity = _check_capacity(capacity)
        _, code, itemsize = _dtype_code(dtype)
        size = _ring.HEADER_BYTES + capacity * itemsize
        # one spare cache line (128 bytes) so the header can start on a line boundary
        block = np.zeros(size + 128, dtype=np.uint8)
        start = -block.ctypes.data % 128
        status = self._bind_new(block[start : start + size], capacity, code, itemsize)
        assert status == _ring.OK, status  # we sized and aligned the block ourselves

    @staticmethod
    def nbytes(capacity, dtype) -> int:
        """Bytes a buffer needs to hold a ring of `capacity` samples of `dtype` (header included)."""
        capacity = _check_capacity(capacity)
        _, _, itemsize = _dtype_code(dtype)
        return _ring.HEADER_BYTES + capacity * itemsize

    @classmethod
    def create_in(cls, buffer, capacity, dtype) -> Ring:
        """Lays out a new, empty ring at the start of `buffer` (overwriting it) and opens it.

        The buffer needs Ring.nbytes(capacity, dtype) bytes and an 8-byte aligned start; it stays
        held (cannot be closed or resized) until the ring is closed.
        """
        capacity = _check_capacity(capacity)
        dt, code, itemsize = _dtype_code(dtype)
        view = _check_buffer(buffer)
        need = _ring.HEADER_BYTES + capacity * itemsize
        if view.nbytes < need:
            raise ValueError(ERR_TOO_SMALL.format(have=view.nbytes, need=need, capacity=capacity, dtype=dt))
        ring = cls.__new__(cls)
        status = ring._bind_new(view, capacity, code, itemsize)
        if status != _ring.OK:
            raise ValueError(ERR_ALIGN if status == _ring.ERR_ALIGN else ERR_ATTACH[status])
        return ring

    @classmethod
    def attach(cls, buffer) -> Ring:
        """Opens the ring that Ring.create_in laid out in `buffer` (in this or another process).

        Capacity and dtype come from the ring's header. ValueError if the buffer does not hold one.
        """
        view = _check_buffer(buffer)
        ring = cls.__new__(cls)
        status = ring._bind_existing(view)
        if status != _ring.OK:
            raise ValueError(ERR_ATTACH[status])
        return ring

    def __reduce__(self):
        raise TypeError(
            "a Ring cannot be pickled (it points into memory of this process): create it with "
            "Ring.create_in(shm.buf, ...) and have the other process call Ring.attach on the same block"
        )

    def __repr__(self) -> str:
        if self.closed:
            return "<Ring closed>"
        return (
            f"<Ring {self.dtype} capacity={self.capacity} readable={self.readable} "
            f"overruns={self.overruns} underruns={self.underruns}>"
        )
