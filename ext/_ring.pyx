# cython: boundscheck=False, wraparound=False
"""Thin binding of ring.h: binds a ring to a buffer and moves numpy arrays in and out, GIL released.

Why a separate layer: argument checks that are not about memory safety (capacity, dtype names, what a
bad header means) live in Python, in callbot.engine.audio.ring, which subclasses this Ring; here we check
only what keeps the C side safe (array type, layout, writability) and give Cython callers nogil
C-level access (see _ring.pxd).
"""
cimport numpy as cnp
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport uint32_t, uintptr_t

from includes.ring cimport (
    CB_RING_ERR_ALIGN, CB_RING_ERR_CAPACITY, CB_RING_ERR_DTYPE, CB_RING_ERR_INDICES, CB_RING_ERR_MAGIC,
    CB_RING_ERR_SIZE, CB_RING_ERR_VERSION, CB_RING_FLOAT32, CB_RING_INT16, CB_RING_MAX_CAPACITY, CB_RING_OK,
    cb_ring, cb_ring_check, cb_ring_count_underrun, cb_ring_init, cb_ring_nbytes, cb_ring_overruns,
    cb_ring_read, cb_ring_read_exact, cb_ring_readable, cb_ring_underruns, cb_ring_writable, cb_ring_write,
)

import numpy as np

cnp.import_array()

# Layout facts for the Python layer (ring.py): block size = HEADER_BYTES + capacity * itemsize.
HEADER_BYTES = cb_ring_nbytes(0, 1)
MAX_CAPACITY = CB_RING_MAX_CAPACITY
INT16 = CB_RING_INT16
FLOAT32 = CB_RING_FLOAT32
# cb_ring_check results, for the Python layer to turn into messages.
OK = CB_RING_OK
ERR_SIZE = CB_RING_ERR_SIZE
ERR_ALIGN = CB_RING_ERR_ALIGN
ERR_MAGIC = CB_RING_ERR_MAGIC
ERR_VERSION = CB_RING_ERR_VERSION
ERR_CAPACITY = CB_RING_ERR_CAPACITY
ERR_DTYPE = CB_RING_ERR_DTYPE
ERR_INDICES = CB_RING_ERR_INDICES

cdef int _typenum(uint32_t code):
    return cnp.NPY_INT16 if code == CB_RING_INT16 else cnp.NPY_FLOAT32


cdef class Ring:
    """Binding of one ring.h ring; use callbot.engine.Ring, which builds and checks it."""

    def __cinit__(self, *args, **kwargs):
        # Accepts any arguments so that the Python subclass chooses its own constructor signature.
        self.ring = NULL
        self.has_view = False
        self.itemsize = 0
        self.typenum = -1

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        self.ring = NULL
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    cdef int _hold(self, buffer) except -1:
        if self.has_view:
            raise ValueError("this Ring is already bound to a buffer")
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        return 0

    cdef void _adopt(self) noexcept:
        self.ring = <cb_ring*>self.view.buf
        self.itemsize = self.ring.itemsize
        self.typenum = _typenum(self.ring.dtype)

    def _bind_new(self, buffer, uint32_t capacity, uint32_t dtype_code, uint32_t itemsize):
        """Lays out an empty ring at the start of `buffer`; returns OK or an ERR_* code (then unbound).

        The caller has checked capacity and dtype; this checks what C needs: room and alignment.
        """
        self._hold(buffer)
        if (<uintptr_t>self.view.buf) & 7:
            self._release()
            return CB_RING_ERR_ALIGN
        if <size_t>self.view.len < cb_ring_nbytes(capacity, itemsize):
            self._release()
            return CB_RING_ERR_SIZE
        cb_ring_init(self.view.buf, capacity, dtype_code, itemsize)
        self._adopt()
        return CB_RING_OK

    def _bind_existing(self, buffer):
        """Opens the ring another Ring laid out in `buffer`; returns OK or an ERR_* code (then unbound)."""
        self._hold(buffer)
        cdef int status = cb_ring_check(self.view.buf, <size_t>self.view.len)
        if status != CB_RING_OK:
            self._release()
            return status
        self._adopt()
        return CB_RING_OK

    cdef int _check_open(self) except -1:
        if self.ring == NULL:
            raise ValueError("the ring is closed (or was never bound to memory)")
        return 0

    def close(self):
        """Lets go of the buffer (a shared_memory block can then be closed). Not thread-safe: call it
        only when neither side will touch the ring again. Further calls raise ValueError."""
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._release()

    # ---- C level (nogil): for Cython callers such as the SIP media port ----------------------------

    cdef size_t write_raw(self, const void* src, size_t n) noexcept nogil:
        if self.ring == NULL:
            return 0
        return cb_ring_write(self.ring, src, n)

    cdef size_t read_raw(self, void* dst, size_t n) noexcept nogil:
        if self.ring == NULL:
            return 0
        return cb_ring_read(self.ring, dst, n)

    cdef size_t read_exact_raw(self, void* dst, size_t n) noexcept nogil:
        if self.ring == NULL:
            return 0
        return cb_ring_read_exact(self.ring, dst, n)

    cdef size_t readable_raw(self) noexcept nogil:
        if self.ring == NULL:
            return 0
        return cb_ring_readable(self.ring)

    cdef size_t writable_raw(self) noexcept nogil:
        if self.ring == NULL:
            return 0
        return cb_ring_writable(self.ring)

    # ---- Python level -------------------------------------------------------------------------------

    cdef object _samples_in(self, samples, str what):
        """samples as a 1-D C-contiguous native-order array of the ring's dtype, or ValueError."""
        cdef cnp.ndarray a
        if isinstance(samples, cnp.ndarray):
            a = <cnp.ndarray>samples
            if cnp.PyArray_TYPE(a) == self.typenum and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_ISCARRAY_RO(a):
                return a
            if cnp.PyArray_NDIM(a) != 1:
                raise ValueError(f"{what} takes a 1-D array of samples, got {cnp.PyArray_NDIM(a)}-D")
            if a.dtype.newbyteorder("=") != self.dtype:
                raise ValueError(f"{what} takes {self.dtype} samples (the ring's dtype), got {a.dtype}: "
                                 "convert explicitly, a silent cast would clip or truncate")
            # right type, but strided or byte-swapped: one copy into a plain array
            return np.ascontiguousarray(a, dtype=self.dtype)
        raise ValueError(f"{what} takes a numpy array of {self.dtype} samples, got {type(samples).__name__}")

    def write(self, samples):
        """Copies what fits of `samples` (1-D array of the ring's dtype) in; returns how many.

        Never blocks. If the ring is too full, the samples that do not fit (the newest, at the end of
        `samples`) are dropped and one overrun is counted; nothing already queued is overwritten.
        """
        self._check_open()
        cdef cnp.ndarray a = self._samples_in(samples, "write()")
        cdef const void* src = cnp.PyArray_DATA(a)
        cdef size_t n = <size_t>cnp.PyArray_DIM(a, 0)
        cdef size_t done
        with nogil:
            done = cb_ring_write(self.ring, src, n)
        return done

    def read(self, count):
        """Exactly `count` samples as a new array, or None (and one underrun counted) if fewer are readable."""
        self._check_open()
        if not isinstance(count, (int, cnp.integer)) or isinstance(count, bool) or count < 0:
            raise ValueError(f"read() takes a sample count, an int >= 0, got {count!r}")
        cdef Py_ssize_t n = count
        if cb_ring_readable(self.ring) < <size_t>n:
            cb_ring_count_underrun(self.ring)
            return None
        cdef cnp.npy_intp dims = n
        cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &dims, self.typenum, 0)
        cdef void* dst = cnp.PyArray_DATA(out)
        with nogil:
            # only this consumer removes samples, so the n seen above are still there
            cb_ring_read(self.ring, dst, <size_t>n)
        return out

    def read_into(self, out):
        """Fills `out` (writable 1-D C-contiguous array of the ring's dtype) from the front with up to
        len(out) samples; returns how many. Fewer than len(out) counts one underrun and leaves the
        rest of `out` as it was."""
        self._check_open()
        if not isinstance(out, cnp.ndarray):
            raise ValueError(f"read_into() takes a numpy array of {self.dtype}, got {type(out).__name__}")
        cdef cnp.ndarray a = <cnp.ndarray>out
        if cnp.PyArray_TYPE(a) != self.typenum or not cnp.PyArray_ISNOTSWAPPED(a):
            raise ValueError(f"read_into() takes an array of {self.dtype} (the ring's dtype), got {a.dtype}")
        if cnp.PyArray_NDIM(a) != 1:
            raise ValueError(f"read_into() takes a 1-D array, got {cnp.PyArray_NDIM(a)}-D")
        if not cnp.PyArray_ISCARRAY(a):
            raise ValueError("read_into() takes a writable C-contiguous array (it copies into its memory)")
        cdef void* dst = cnp.PyArray_DATA(a)
        cdef size_t n = <size_t>cnp.PyArray_DIM(a, 0)
        cdef size_t done
        with nogil:
            done = cb_ring_read(self.ring, dst, n)
        return done

    @property
    def readable(self):
        """Samples the consumer can read now (a snapshot when asked from another thread)."""
        self._check_open()
        return cb_ring_readable(self.ring)

    @property
    def writable(self):
        """Free slots the producer can fill now (a snapshot when asked from another thread)."""
        self._check_open()
        return cb_ring_writable(self.ring)

    @property
    def capacity(self):
        """Samples the ring holds when full (a power of two)."""
        self._check_open()
        return self.ring.capacity

    @property
    def dtype(self):
        """numpy dtype of the samples: int16 or float32."""
        self._check_open()
        return cnp.PyArray_DescrFromType(self.typenum)

    @property
    def overruns(self):
        """Writes that could not take all their samples (the rest was dropped)."""
        self._check_open()
        return cb_ring_overruns(self.ring)

    @property
    def underruns(self):
        """Reads that found fewer samples than they asked for."""
        self._check_open()
        return cb_ring_underruns(self.ring)

    @property
    def closed(self):
        return self.ring == NULL
