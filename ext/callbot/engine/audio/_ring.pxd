# C-level face of the PCM ring, for Cython modules that move audio without the GIL.
#
# Why this path: ext/_ring.pyx builds into the module callbot.engine.audio._ring, and Cython looks for a
# module's .pxd by its full name, under the include path (ext/): ext/callbot/engine/audio/_ring.pxd. A cimport
# by that name also makes the cimporting module import the Ring type from the right module at run time
# (`from _ring cimport Ring` would compile, then fail to import a top-level `_ring`). This file holds the
# shared cdef class only; ring.h's C declarations are in ext/includes/ring.pxd.
#
# Another extension (the SIP media port, for instance) does
#     from callbot.engine.audio._ring cimport Ring
# takes a Ring object from Python once, and then, holding no GIL, calls
#     ring.write_raw(src, n) / ring.read_raw(dst, n) / ring.read_exact_raw(dst, n)
# with n in samples of the ring's dtype (ring.itemsize bytes each). The single-producer /
# single-consumer contract of ring.h applies: one thread writes, one thread reads.
from cpython.buffer cimport Py_buffer

from includes.ring cimport cb_ring


cdef class Ring:
    # NULL until bound to memory, and again after close(); every C-level method checks it.
    cdef cb_ring* ring
    # The buffer the ring lives in, held (PyObject_GetBuffer) so its exporter cannot free or resize
    # it while the ring uses it: a shared_memory block refuses close() until the ring is closed.
    cdef Py_buffer view
    cdef bint has_view
    cdef readonly Py_ssize_t itemsize
    cdef int typenum  # numpy type number of the samples, compared on every Python-level call

    # Producer: copies up to n samples from src, returns how many fit; a shortfall is dropped and
    # counted as one overrun. Never blocks.
    cdef size_t write_raw(self, const void* src, size_t n) noexcept nogil
    # Consumer: copies up to n samples into dst, returns how many; a shortfall counts one underrun
    # and dst's tail is left as it was (fill it with silence).
    cdef size_t read_raw(self, void* dst, size_t n) noexcept nogil
    # Consumer: copies exactly n samples and returns n, or copies nothing, counts an underrun, returns 0.
    cdef size_t read_exact_raw(self, void* dst, size_t n) noexcept nogil
    cdef size_t readable_raw(self) noexcept nogil
    cdef size_t writable_raw(self) noexcept nogil

    # binding internals (_ring.pyx)
    cdef void _release(self) noexcept
    cdef int _hold(self, buffer) except -1
    cdef void _adopt(self) noexcept
    cdef int _check_open(self) except -1
    cdef object _samples_in(self, samples, str what)
