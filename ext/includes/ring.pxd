# C declarations of ext/ring.h, the lock-free SPSC ring of PCM samples (contract at the top of ring.h).
# Cimported by name: `from includes.ring cimport cb_ring, cb_ring_write` (setup.py says why).
from libc.stdint cimport uint32_t


cdef extern from "ring.h" nogil:
    # Only the fields written once by cb_ring_init are declared (the binding reads them after attach).
    # The indices and counters are _Atomic in C, which Cython cannot spell: they are reached only
    # through the functions below, never as fields, so no plain load or store can bypass the ordering.
    ctypedef struct cb_ring:
        uint32_t capacity
        uint32_t itemsize
        uint32_t dtype

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
