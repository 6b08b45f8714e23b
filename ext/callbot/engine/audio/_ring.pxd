# C-level face of the PCM ring, for Cython modules that move audio without the GIL.
#
# Why this path: ext/_ring.pyx builds into the module callbot.engine.audio._ring, and Cython looks for a
# module's .pxd by its full name, under the include path (ext/): ext/callbot/engine/audio/_ring.pxd. A cimport
# by that name also makes the cimporting module import the Ring type from the right module at run time
# (`from _ring cimport Ring` would compile, then fail to import a top-level `_ring`).
#
# Another extension (the SIP media port, for instance) does
#     from callbot.engine.audio._ring cimport Ring
# takes a Ring object from Python once, and then, holding no GIL, calls
#     ring.write_raw(src, n) / ring.read_raw(dst, n) / ring.read_exact_raw(dst, n)
# with n in samples of the ring's dtype (ring.itemsize bytes each). The single-producer /
# single-consumer contract of ring.h applies: one thread writes, one thread reads.
from libc.stdint cimport uint32_t
from cpython.buffer cimport Py_buffer


cdef extern from "ring.h" nogil:
    ctypedef struct cb_ring:
        pass

    ctypedef struct cb_ring_regions:
        void* first
        size_t first_n
        void* second
        size_t second_n

    enum:
        CB_RING_LINE
        CB_RING_MAGIC
        CB_RING_VERSION
        CB_RING_MAX_CAPACITY
        CB_RING_INT16
        CB_RING_FLOAT32
        CB_RING_OK
        CB_RING_ERR_SIZE
        CB_RING_ERR_ALIGN
        CB_RING_ERR_MAGIC
        CB_RING_ERR_VERSION
        CB_RING_ERR_CAPACITY
        CB_RING_ERR_DTYPE
        CB_RING_ERR_INDICES

    size_t cb_ring_nbytes(size_t capacity, size_t itemsize)
    cb_ring* cb_ring_init(void* mem, uint32_t capacity, uint32_t dtype, uint32_t itemsize)
    int cb_ring_check(const void* mem, size_t size)
    size_t cb_ring_readable(cb_ring* r)
    size_t cb_ring_writable(cb_ring* r)
    unsigned long long cb_ring_overruns(cb_ring* r)
    unsigned long long cb_ring_underruns(cb_ring* r)
    void cb_ring_count_overrun(cb_ring* r)
    void cb_ring_count_underrun(cb_ring* r)
    size_t cb_ring_write_regions(cb_ring* r, size_t n, cb_ring_regions* out)
    void cb_ring_commit_write(cb_ring* r, size_t n)
    size_t cb_ring_read_regions(cb_ring* r, size_t n, cb_ring_regions* out)
    void cb_ring_commit_read(cb_ring* r, size_t n)
    size_t cb_ring_write(cb_ring* r, const void* src, size_t n)
    size_t cb_ring_read(cb_ring* r, void* dst, size_t n)
    size_t cb_ring_read_exact(cb_ring* r, void* dst, size_t n)


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
