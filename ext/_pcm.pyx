# cython: boundscheck=False, wraparound=False, cdivision=True
"""PCM between pjsua2's MediaFrame and the call's rings, for the two media callbacks.

Why Cython: in pjsua2 2.15.1 `MediaFrame.buf` is a SWIG `ByteVector` (std::vector<unsigned char>);
from Python its bytes can only be read or set one element at a time (the fast `assign_from_bytes` came
in 2.16). Here the vector's storage is reached through the SWIG proxy's pointer and copied with memcpy
straight into / out of a Ring, so a 20 ms frame costs a few microseconds and no Python object per sample.

Why no SWIG call at all in the callbacks: the SWIG build of pjsua2 releases the GIL around every call
into C++, member getters and setters included (`frame.buf`, `frame.size`, `buf.resize`). Each release
means taking the GIL back, which waits up to the interpreter's switch interval (5 ms) behind a busy
Python thread: measured, three such calls per frame put p99 callback cost at 6.5 ms with a Python-heavy
thread running (bench/bench_media.py). So the pump reads and writes the MediaFrame's fields in place:
the callback takes the GIL once (SWIG's upcall) and keeps it to the end, a few microseconds.

How the fields are reached: a SWIG proxy's `.this` is a SwigPyObject { PyObject_HEAD; void *ptr; ... }
whose ptr is the C++ object. pj::MediaFrame is { pjmedia_frame_type type; ByteVector buf; unsigned
size; }, and libstdc++, libc++ and MSVC all lay out std::vector as three pointers {begin, end,
end_of_capacity}. The frame pjsua2 hands onFrameRequested has an empty vector; it is grown with C++'s
own ::operator new, the allocation the vector's destructor frees with ::operator delete (so this module
links the C++ runtime). `check_layout` verifies every one of these facts on real pjsua2 objects before
any frame moves (callbot.sip.media_port calls it at import); until it has passed, the pump refuses.
The layouts are declared in C, in ext/pjsua2_frame.h.

The GIL is never released here: the copies take about a microsecond, and releasing it would mean
waiting to take it back behind whatever thread runs next.
"""
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport PyObject
from libc.stdint cimport int16_t, uint64_t
from libc.string cimport memset

from callbot.engine.audio._ring cimport Ring
from callbot.engine.audio._stamps cimport StampLog
from includes.pjsua2_frame cimport (
    callbot_byte_vector, callbot_cxx_delete, callbot_cxx_new, callbot_media_frame, callbot_swig_ptr,
)

# pjmedia_frame_type PJMEDIA_FRAME_TYPE_AUDIO (pjmedia/frame.h)
DEF FRAME_TYPE_AUDIO = 1
# largest frame we copy through the stack buffer: 20 ms at 48 kHz, in samples
DEF MAX_FRAME = 960

ERR_LAYOUT = "pjsua2's {what} is not laid out as this module expects; the media port cannot run"
ERR_UNCHECKED = "call check_layout(pjsua2) once before moving frames (it checks how SWIG's objects are laid out)"

# The type of SWIG's `.this` objects (SwigPyObject), learned by check_layout: until then nothing is trusted.
cdef object _swig_type = None


cdef inline void* _swig_ptr(object proxy) except NULL:
    this = proxy.this
    if type(this) is not _swig_type:
        if _swig_type is None:
            raise ValueError(ERR_UNCHECKED)
        raise ValueError(f"expected a pjsua2 object, got {type(proxy).__name__}")
    return callbot_swig_ptr(<PyObject*>this)


cdef inline void _grow(callbot_byte_vector* v, size_t nbytes) noexcept:
    """Makes the vector hold nbytes (contents undefined), as vector::resize would, without a SWIG call."""
    cdef unsigned char* p
    if <size_t>(v.cap - v.begin) < nbytes:
        p = callbot_cxx_new(nbytes)
        if v.begin != NULL:
            callbot_cxx_delete(v.begin)
        v.begin = p
        v.cap = p + nbytes
    v.end = v.begin + nbytes


def check_layout(pj):
    """Checks, on real objects of the pjsua2 module `pj`, every assumption the pump makes about them;
    ValueError naming the first that fails. The media port calls it once at import."""
    global _swig_type
    probe = bytes(range(1, 17))
    v = pj.ByteVector(probe)
    this = v.this
    if type(this).__name__ != "SwigPyObject":
        raise ValueError(ERR_LAYOUT.format(what=f"proxy .this ({type(this).__name__}, not SwigPyObject)"))
    cdef callbot_byte_vector* bv = <callbot_byte_vector*>callbot_swig_ptr(<PyObject*>this)
    if <size_t>(bv.end - bv.begin) != len(probe) or bv.begin[: bv.end - bv.begin] != probe or bv.cap < bv.end:
        raise ValueError(ERR_LAYOUT.format(what="ByteVector"))
    f = pj.MediaFrame()
    f.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    f.size = 4321
    f.buf = v
    cdef callbot_media_frame* mf = <callbot_media_frame*>callbot_swig_ptr(<PyObject*>f.this)
    if (mf.type != FRAME_TYPE_AUDIO or mf.size != 4321 or <size_t>(mf.buf.end - mf.buf.begin) != len(probe)
            or mf.buf.begin[: len(probe)] != probe):
        raise ValueError(ERR_LAYOUT.format(what="MediaFrame"))
    # growing a frame's vector ourselves: SWIG must see the new size and contents, and the frame's
    # destructor (operator delete) must accept the block (a mismatch would crash right here)
    _grow(&mf.buf, 640)
    mf.buf.begin[0] = 42
    mf.buf.begin[639] = 43
    if f.buf.size() != 640 or f.buf[0] != 42 or f.buf[639] != 43:
        raise ValueError(ERR_LAYOUT.format(what="MediaFrame buffer growth"))
    del f
    _swig_type = type(this)


# Threads the callbacks have run on since the hook was set (pjmedia's clock thread: one per endpoint).
DEF MAX_SEEN_THREADS = 8
cdef unsigned long _seen_threads[MAX_SEEN_THREADS]
cdef int _seen_count = 0
cdef object _thread_hook = None


def set_media_thread_hook(hook):
    """`hook()` is called once on each new thread that runs a pump's `requested` (at most 8 threads per
    hook), from inside that callback: pjsua2 gives no other handle on pjmedia's clock thread, and the SIP
    side makes it real-time there. Exceptions from the hook are swallowed (the frame must go on). None:
    no hook."""
    global _thread_hook, _seen_count
    _thread_hook = hook
    _seen_count = 0


cdef inline void _note_thread() noexcept:
    global _seen_count
    if _thread_hook is None:
        return
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef int i
    for i in range(_seen_count):
        if _seen_threads[i] == me:
            return
    if _seen_count >= MAX_SEEN_THREADS:
        return
    _seen_threads[_seen_count] = me
    _seen_count += 1
    try:
        _thread_hook()
    except BaseException:
        pass


def vector_to_bytes(byte_vector):
    """The vector's bytes (a test and bench helper, not for the hot path: it allocates)."""
    cdef callbot_byte_vector* v = <callbot_byte_vector*>_swig_ptr(byte_vector)
    return v.begin[: v.end - v.begin]


cdef class MediaPump:
    """The state of one call's media port: which rings its frames go to and what went wrong.

    rx: caller audio at the port's rate (producer: `received`); tx: bot audio (consumer: `requested`).
    rec_caller / rec_bot (optional, both or neither): the recorder's rings. They are kept in lockstep,
    one frame each per clock tick, so the two channels of the recording stay time-aligned even when
    pjmedia skips a put_frame (a tick with no received frame records silence for the caller).
    rx_stamps / tx_stamps (optional): StampLogs (ext/stamps.h) of when samples entered rx and left tx,
    one monotonic clock read per callback: the first and last stages of the engine's per-frame stats.
    """

    cdef Ring rx
    cdef Ring tx
    cdef Ring rec_caller
    cdef Ring rec_bot
    cdef StampLog rx_stamps
    cdef StampLog tx_stamps
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

    def __cinit__(self, Ring rx, Ring tx, Py_ssize_t frame_samples, Ring rec_caller=None, Ring rec_bot=None,
                  StampLog rx_stamps=None, StampLog tx_stamps=None):
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
        self.rx_stamps = rx_stamps
        self.tx_stamps = tx_stamps
        memset(self.silence, 0, sizeof(self.silence))

    def received(self, frame):
        """onFrameReceived: the caller's PCM from pjmedia into rx (and the recorder)."""
        cdef callbot_media_frame* f = <callbot_media_frame*>_swig_ptr(frame)
        cdef size_t n = (f.buf.end - f.buf.begin) // 2
        cdef const void* src = f.buf.begin
        self.frames_received += 1
        self.received_since_request = True
        if n == 0 or f.type != FRAME_TYPE_AUDIO:
            # a tick without caller audio: keep the engine's and the recording's time base
            self.empty_received += 1
            n = self.frame_samples
            src = self.silence
        cdef size_t fits
        if self.rx_stamps is not None:
            # stamped before the samples become readable, so the engine always finds their stamp
            fits = self.rx.writable_raw()
            self.rx_stamps.advance_now(n if n < fits else fits)
        if self.rx.write_raw(src, n) != n:
            self.rx_overruns += 1
        if self.rec_caller is not None and self.rec_caller.write_raw(src, n) != n:
            self.recorder_overruns += 1

    def requested(self, frame):
        """onFrameRequested: fill the frame from tx; a shortfall is played as silence and counted."""
        _note_thread()
        cdef callbot_media_frame* f = <callbot_media_frame*>_swig_ptr(frame)
        cdef size_t want = f.size // 2
        if want > MAX_FRAME:
            want = MAX_FRAME
        f.type = FRAME_TYPE_AUDIO
        _grow(&f.buf, want * 2)
        cdef unsigned char* dst = f.buf.begin
        cdef size_t got = 0
        self.frames_requested += 1
        if not self.tx_started and self.tx.readable_raw() == 0:
            pass  # the engine has not spoken yet: silence, not an underrun
        else:
            self.tx_started = True
            got = self.tx.read_raw(dst, want)  # a shortfall counts one underrun in the ring too
            if got < want:
                self.tx_underruns += 1
            if got and self.tx_stamps is not None:
                self.tx_stamps.advance_now(got)
        if got < want:
            memset(dst + got * 2, 0, (want - got) * 2)
        if self.rec_bot is not None:
            # a tick whose received frame never came: the caller's channel gets silence for it
            if self.first_request_done and not self.received_since_request:
                if self.rec_caller.write_raw(self.silence, want) != want:
                    self.recorder_overruns += 1
            if self.rec_bot.write_raw(dst, want) != want:
                self.recorder_overruns += 1
        self.received_since_request = False
        self.first_request_done = True
