# cython: boundscheck=False, wraparound=False, cdivision=True
"""PCM between pjsua2's MediaFrame and the call's rings, for the two media callbacks.

Why Cython: in pjsua2 2.15.1 `MediaFrame.buf` is a SWIG `ByteVector` (std::vector<unsigned char>);
from Python its bytes can only be read or set one element at a time (the fast `assign_from_bytes` came
in 2.16). Here the vector's storage is reached through the SWIG proxy's pointer and copied with memcpy
straight into / out of a Ring, so a 20 ms frame costs a few microseconds and no Python object per sample.

How the vector is reached: a SWIG proxy's `.this` is a SwigPyObject { PyObject_HEAD; void *ptr; ... }
whose ptr is the C++ object; libstdc++, libc++ and MSVC all lay out std::vector as three pointers
{begin, end, end_of_capacity}. `check_vector_layout` verifies both facts against a real ByteVector
before any port uses them (callbot.sip.media_port calls it once at import). Growing the vector (the
frame pjsua2 hands onFrameRequested is empty) is C++ work, so that one step goes through the SWIG
method `resize`.

The GIL is NOT released here: the callbacks arrive holding it, the copies take about a microsecond,
and releasing it would mean waiting to take it back behind whatever thread runs next.
"""
from cpython.ref cimport PyObject
from libc.stdint cimport int16_t, uint64_t
from libc.string cimport memcpy, memset

from callbot.engine._ring cimport Ring

cdef extern from *:
    """
    typedef struct { PyObject_HEAD void *ptr; } callbot_swig_object;
    typedef struct { unsigned char *begin; unsigned char *end; unsigned char *cap; } callbot_byte_vector;
    static inline callbot_byte_vector *callbot_vector_of(PyObject *swig_this) {
        return (callbot_byte_vector *)((callbot_swig_object *)swig_this)->ptr;
    }
    """
    ctypedef struct callbot_byte_vector:
        unsigned char* begin
        unsigned char* end
        unsigned char* cap
    callbot_byte_vector* callbot_vector_of(PyObject* swig_this)

# pjmedia_frame_type PJMEDIA_FRAME_TYPE_AUDIO (pjmedia/frame.h)
DEF FRAME_TYPE_AUDIO = 1
# largest frame we copy through the stack buffer: 20 ms at 48 kHz, in samples
DEF MAX_FRAME = 960

ERR_LAYOUT = "pjsua2's ByteVector is not laid out as this module expects ({what}); the media port cannot run"


cdef inline callbot_byte_vector* _vector(object byte_vector) except NULL:
    this = byte_vector.this
    if type(this).__name__ != "SwigPyObject":
        raise ValueError(ERR_LAYOUT.format(what=f".this is {type(this).__name__}, not SwigPyObject"))
    return callbot_vector_of(<PyObject*>this)


def check_vector_layout(byte_vector, bytes expected):
    """Raises ValueError unless `byte_vector` (a ByteVector holding `expected`) is seen as expected."""
    cdef callbot_byte_vector* v = _vector(byte_vector)
    cdef size_t n = v.end - v.begin
    if n != <size_t>len(expected) or n != <size_t>byte_vector.size():
        raise ValueError(ERR_LAYOUT.format(what=f"size {n}, expected {len(expected)}"))
    if v.cap < v.end or (n and v.begin[:n] != expected):
        raise ValueError(ERR_LAYOUT.format(what="contents differ"))


def vector_to_bytes(byte_vector):
    """The vector's bytes (a test and bench helper, not for the hot path: it allocates)."""
    cdef callbot_byte_vector* v = _vector(byte_vector)
    return v.begin[: v.end - v.begin]


cdef class MediaPump:
    """The state of one call's media port: which rings its frames go to and what went wrong.

    rx: caller audio at the port's rate (producer: `received`); tx: bot audio (consumer: `requested`).
    rec_caller / rec_bot (optional, both or neither): the recorder's rings. They are kept in lockstep,
    one frame each per clock tick, so the two channels of the recording stay time-aligned even when
    pjmedia skips a put_frame (a tick with no received frame records silence for the caller).
    """

    cdef Ring rx
    cdef Ring tx
    cdef Ring rec_caller
    cdef Ring rec_bot
    cdef readonly Py_ssize_t frame_samples
    cdef bint received_since_request
    cdef bint first_request_done
    cdef bint tx_started  # set by the first audio the engine sent: silence before it is no underrun
    # counters, read from Python any time (plain words: a torn read is impossible on 64-bit)
    cdef readonly uint64_t frames_received
    cdef readonly uint64_t frames_requested
    cdef readonly uint64_t tx_underruns       # requested frames not fully covered by tx (silence filled)
    cdef readonly uint64_t rx_overruns        # received frames rx could not take whole
    cdef readonly uint64_t empty_received     # received frames with no audio (recorded as silence)
    cdef readonly uint64_t recorder_overruns  # frames the recorder's rings could not take whole
    cdef int16_t silence[MAX_FRAME]

    def __cinit__(self, Ring rx, Ring tx, Py_ssize_t frame_samples, Ring rec_caller=None, Ring rec_bot=None):
        if rx is None or tx is None:
            raise ValueError("a media pump needs both call rings (rx and tx)")
        if frame_samples < 1 or frame_samples > MAX_FRAME:
            raise ValueError(f"frame_samples must be 1..{MAX_FRAME} (20 ms at up to 48 kHz), got {frame_samples}")
        if (rec_caller is None) != (rec_bot is None):
            raise ValueError("rec_caller and rec_bot come together (both channels of one recording) or not at all")
        for ring in (rx, tx, rec_caller, rec_bot):
            if ring is not None and ring.itemsize != 2:
                raise ValueError("the media port's rings must hold int16 samples (16-bit PCM frames)")
        self.rx = rx
        self.tx = tx
        self.rec_caller = rec_caller
        self.rec_bot = rec_bot
        self.frame_samples = frame_samples
        memset(self.silence, 0, sizeof(self.silence))

    def received(self, frame):
        """onFrameReceived: the caller's PCM from pjmedia into rx (and the recorder)."""
        cdef callbot_byte_vector* v = _vector(frame.buf)
        cdef size_t n = (v.end - v.begin) // 2
        cdef const void* src = v.begin
        self.frames_received += 1
        self.received_since_request = True
        if n == 0:
            # a tick without caller audio: keep the engine's and the recording's time base
            self.empty_received += 1
            n = self.frame_samples
            src = self.silence
        if self.rx.write_raw(src, n) != n:
            self.rx_overruns += 1
        if self.rec_caller is not None and self.rec_caller.write_raw(src, n) != n:
            self.recorder_overruns += 1

    def requested(self, frame):
        """onFrameRequested: fill the frame from tx; a shortfall is played as silence and counted."""
        cdef Py_ssize_t nbytes = frame.size
        cdef size_t want = nbytes // 2
        if want > MAX_FRAME:
            want = MAX_FRAME
        frame.type = FRAME_TYPE_AUDIO
        buf = frame.buf
        buf.resize(want * 2)
        cdef callbot_byte_vector* v = _vector(buf)
        cdef size_t got = 0
        self.frames_requested += 1
        if not self.tx_started and self.tx.readable_raw() == 0:
            pass  # the engine has not spoken yet: silence, not an underrun
        else:
            self.tx_started = True
            got = self.tx.read_raw(v.begin, want)  # a shortfall counts one underrun in the ring too
            if got < want:
                self.tx_underruns += 1
        if got < want:
            memset(v.begin + got * 2, 0, (want - got) * 2)
        if self.rec_bot is not None:
            # a tick whose received frame never came: the caller's channel gets silence for it
            if self.first_request_done and not self.received_since_request:
                if self.rec_caller.write_raw(self.silence, want) != want:
                    self.recorder_overruns += 1
            if self.rec_bot.write_raw(v.begin, want) != want:
                self.recorder_overruns += 1
        self.received_since_request = False
        self.first_request_done = True
