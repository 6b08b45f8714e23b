# C declarations of ext/stamps.h, the lock-free log of (samples moved, monotonic ns) pairs that the
# media callbacks append to (contract at the top of stamps.h).
# Cimported by name: `from includes.stamps cimport cb_stamps, cb_stamps_advance` (setup.py says why).
from libc.stdint cimport int64_t


cdef extern from "stamps.h" nogil:
    # Opaque: every field is _Atomic or writer-private, reached only through the functions below.
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
