# C-level face of the stamp log (ext/stamps.h), for the media pump (ext/_pcm.pyx), which appends to
# it from pjmedia's clock thread: `log.advance_now(n)` reads the monotonic clock and appends one pair,
# no GIL, no allocation. Why this path: see _ring.pxd (Cython finds a module's .pxd by its full name).
from libc.stdint cimport int64_t
from cpython.buffer cimport Py_buffer


cdef extern from "stamps.h" nogil:
    ctypedef struct cb_stamps:
        pass
    enum:
        CB_STAMPS_HELD
    int64_t CB_STAMPS_BYTES
    void cb_stamps_init(cb_stamps* s)
    int cb_stamps_valid(const cb_stamps* s)
    void cb_stamps_advance(cb_stamps* s, int64_t n, int64_t ns)
    int64_t cb_stamps_find(const cb_stamps* s, int64_t pos)
    int64_t cb_stamps_appended(const cb_stamps* s)
    int64_t cb_stamps_reached(const cb_stamps* s)


cdef class StampLog:
    cdef cb_stamps* log  # NULL once closed
    cdef Py_buffer view
    cdef bint has_view
    # Writer: `n` samples moved now (ns from the monotonic clock, read here).
    cdef void advance_now(self, int64_t n) noexcept nogil
    cdef void _release(self) noexcept
