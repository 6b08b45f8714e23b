# cython: boundscheck=False, wraparound=False
"""When audio crossed the media side of a call's rings: the binding of ext/stamps.h.

Why: the caller's audio entering rx and the bot's audio leaving tx happen in the media callbacks, the
first and last of a frame's stages (engine/serving/runner.py FrameStats). A StampLog is about a kB (NBYTES)
that the callback appends one (samples so far, monotonic ns) pair to, lock-free, and the engine side
reads, possibly from another process when the log lives in the call's shared_memory block. The
contract (one writer, readers that write nothing, what `find` answers) is in stamps.h.
"""
from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uintptr_t

from includes.clock cimport cb_clock_now_ns
from includes.stamps cimport (
    CB_STAMPS_BYTES, CB_STAMPS_HELD, cb_stamps, cb_stamps_advance, cb_stamps_appended, cb_stamps_find,
    cb_stamps_init, cb_stamps_reached, cb_stamps_valid,
)

NBYTES = CB_STAMPS_BYTES  # bytes one log takes
HELD = CB_STAMPS_HELD  # pairs held: positions older than the last HELD - 1 callbacks are answered 0 (unknown)


cdef class StampLog:
    """One stamp log laid out in (`create_in`) or opened from (`attach`) a writable, 8-byte aligned buffer."""

    def __cinit__(self, buffer, bint create):
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        if (<uintptr_t>self.view.buf) & 7:
            self._release()
            raise ValueError("a stamp log's buffer must start on an 8-byte boundary (its words are atomic)")
        if self.view.len < CB_STAMPS_BYTES:
            n = self.view.len
            self._release()
            raise ValueError(f"a stamp log needs {CB_STAMPS_BYTES} bytes, the buffer holds {n}")
        self.log = <cb_stamps*>self.view.buf
        if create:
            cb_stamps_init(self.log)
        elif not cb_stamps_valid(self.log):
            self._release()
            raise ValueError("the buffer holds no stamp log (no magic, or one laid out by another version "
                             "of stamps.h): make one with StampLog.create_in")

    @staticmethod
    def create_in(buffer):
        """A new, empty log at the start of `buffer` (CB_STAMPS_BYTES = NBYTES of it)."""
        return StampLog(buffer, True)

    @staticmethod
    def attach(buffer):
        """The log another StampLog laid out at the start of `buffer` (another process's, for one)."""
        return StampLog(buffer, False)

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        self.log = NULL
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    def close(self):
        """Lets go of the buffer; the log then answers nothing and takes nothing. Safe to repeat."""
        self._release()

    @property
    def closed(self) -> bool:
        return self.log == NULL

    cdef void advance_now(self, int64_t n) noexcept nogil:
        if self.log != NULL:
            cb_stamps_advance(self.log, n, cb_clock_now_ns())

    def note(self, int64_t n, int64_t ns=0):
        """Writer, from Python (a media-like thread in tests): `n` samples moved now (or at monotonic
        `ns`, for a test that drives its own clock). For rx call it just before writing them, for tx
        just after reading them (stamps.h says why)."""
        if n < 0:
            raise ValueError(f"note() takes a sample count >= 0, got {n}")
        if ns < 0:
            raise ValueError(f"note() takes a time in ns >= 0, got {ns}")
        if ns == 0:
            self.advance_now(n)
        elif self.log != NULL:
            cb_stamps_advance(self.log, n, ns)

    def appended(self) -> int:
        """Reader: pairs the writer has appended so far (0: it never stamped; 0 once closed)."""
        if self.log == NULL:
            return 0
        return cb_stamps_appended(self.log)

    def reached(self) -> int:
        """Reader: the writer's sample total as of its last pair (how far its stamps reach; 0 if none)."""
        if self.log == NULL:
            return 0
        return cb_stamps_reached(self.log)

    def find(self, int64_t pos) -> int:
        """Reader: monotonic ns at which the writer had moved `pos` samples; 0 if not yet, or too long ago."""
        if self.log == NULL:
            return 0
        return cb_stamps_find(self.log, pos)
