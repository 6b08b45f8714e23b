# C-level face of the stamp log (ext/stamps.h), for the media pump (ext/_pcm.pyx), which appends to
# it from pjmedia's clock thread: `log.advance_now(n)` reads the monotonic clock and appends one pair,
# no GIL, no allocation. Why this path: see _ring.pxd (Cython finds a module's .pxd by its full name);
# stamps.h's C declarations are in ext/includes/stamps.pxd.
from cpython.buffer cimport Py_buffer
from libc.stdint cimport int64_t

from includes.stamps cimport cb_stamps


cdef class StampLog:
    cdef cb_stamps* log  # NULL once closed
    cdef Py_buffer view
    cdef bint has_view
    # Writer: `n` samples moved now (ns from the monotonic clock, read here).
    cdef void advance_now(self, int64_t n) noexcept nogil
    cdef void _release(self) noexcept
