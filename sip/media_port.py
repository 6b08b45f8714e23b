"""A call's audio between pjmedia and the engine: one AudioMediaPort per call, bound to the call's rings.

Why: pjmedia's conference bridge calls a port's two callbacks on its clock thread every 20 ms; whatever
they do delays every call in the process. So they do one thing, in Cython (ext/_pcm.pyx): copy the
frame into the call's rx ring (and the recorder's caller ring), or fill it from the tx ring (and copy it
to the recorder's bot ring). No locks, no logging, no Python objects beyond the ones SWIG hands us; a
short tx ring plays silence and counts an underrun. The engine and the recorder drain the rings on
their own threads.

Clock rates, measured here (pjsua2 2.15.1, two ports on a null-device bridge; numbers in BENCHMARKS.md):
the conference bridge runs at one rate (MediaConfig.clockRate) and resamples every port whose rate
differs. With the default quality (8, libresample's large filter) that costs 4.1 ms at 8 -> 16 kHz and
2.1 ms at 16 -> 24 kHz, flat to 3.4 kHz; quality 3 (small filter) costs 0.9 ms but is -2.7 dB at 3 kHz
and -5.1 dB at 3.4 kHz. A port at 8 kHz on a 16 kHz bridge is resampled twice (8 -> 16 -> 8: 8.3 ms).
Port to port on the same bridge tick adds nothing. Hence: the bridge at 16 kHz, default quality, and
EVERY call's port (and its CallAudio and recording) at the bridge's rate, whatever the codec: a G.722
call then passes the bridge untouched, a G.711 call is resampled once (8 -> 16 kHz, 4.1 ms), and ours
takes 16 <-> 24 kHz (1.0 ms each way). `clock_rate` below is that rate.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import pjsua2 as pj

from callbot.sip import _pcm
from callbot.engine.audio import make_realtime
from callbot.sip._pcm import MediaPump
from callbot.engine.audio.realtime import RealtimeResult
from callbot.sip.media_session import CallRecording, MediaSession

log = logging.getLogger(__name__)

FRAME_US = 20000  # one 20 ms frame per clock tick
# pjmedia's clock thread carries every call's audio in and out (jitter buffers, codecs, the bridge, our
# callbacks: well under a millisecond a tick). It runs SCHED_FIFO above the inference thread (10, in its
# own process), so that a step hogging a core never makes a tick late (BENCHMARKS.md "Media callback").
MEDIA_FIFO_PRIORITY = 12
# what threading.current_thread() is on a thread Python did not start (documented as "a dummy thread
# object"; the class's name is private but has not changed since Python 2)
_FOREIGN_THREAD = threading._DummyThread

# The Cython pump reads and writes MediaFrame fields in place through SWIG's pointers; check on real
# pjsua2 objects that they are laid out as it expects before any port relies on it (ValueError if not).
_pcm.check_layout(pj)


def make_media_clock_realtime(on_result: Callable[[RealtimeResult], None] | None = None) -> None:
    """From now on, the first frame a C thread (one Python did not start) asks of any media port makes
    that thread as real-time as the OS permits (pjmedia's clock thread: the bridge's 20 ms tick), and
    hands the outcome to `on_result`. pjsua2 has no handle on that thread; its own callback is the one
    place we run on it."""

    def promote() -> None:
        # pjmedia's clock thread was not started by Python: threading shows it as a "dummy" thread.
        # Threads of ours that drive a pump directly (tests, benches) are left as they are.
        if not isinstance(threading.current_thread(), _FOREIGN_THREAD):
            return
        # macOS time-constraint: a tick every 20 ms, a few ms of work, done within 15 ms of it
        result = make_realtime(20.0, 5.0, 15.0, priority=MEDIA_FIFO_PRIORITY)
        log.info("media clock thread: %s priority %d%s", result.policy, result.priority,
                 f" ({result.reason})" if result.reason else "")
        if on_result is not None:
            on_result(result)

    _pcm.set_media_thread_hook(promote)


def leave_media_clock_alone() -> None:
    """Undoes make_media_clock_realtime for threads not yet seen (a promoted thread ends with its endpoint)."""
    _pcm.set_media_thread_hook(None)


class _RingPort(pj.AudioMediaPort):
    """The pjmedia port; its callbacks are the pump's own (Cython) methods, with no Python frame between."""

    def __init__(self, pump: MediaPump):
        super().__init__()
        self.pump = pump
        # SWIG's director looks the callback up on the instance each time: the bound Cython methods
        # shadow the Python ones below, saving a Python call per frame.
        self.onFrameReceived = pump.received
        self.onFrameRequested = pump.requested

    # SWIG's override check needs these; the instance's bound pump methods above shadow them. They are
    # reached only if a port is dropped while the bridge may still tick it (detach() destroys the C++
    # port first, so they should not be): static, so that a call from the clock thread takes no
    # reference to a Python object being deallocated. A plain method would: its `self` goes from 0 to 1
    # and back to 0 references, the object is freed twice, and the heap is corrupt (the SIGSEGVs in
    # pymalloc_alloc seen twice in CI, 2026-12-03, each in the first allocations after a hangup).
    @staticmethod
    def onFrameReceived(frame):  # noqa: F811
        return

    @staticmethod
    def onFrameRequested(frame):  # noqa: F811
        return


class MediaAttachment:
    """A call's media port, connected both ways to the call's audio; `detach()` undoes it."""

    def __init__(self, call_audio_media, port: _RingPort, pump: MediaPump, recording):
        self.call_audio_media = call_audio_media
        self.port = port
        self.pump = pump
        self.recording = recording

    @property
    def stats(self) -> dict:
        """Counters of the media callbacks (snapshots)."""
        p = self.pump
        return {
            "frames_received": p.frames_received,
            "frames_requested": p.frames_requested,
            "tx_underruns": p.tx_underruns,
            "rx_overruns": p.rx_overruns,
            "empty_received": p.empty_received,
            "recorder_overruns": p.recorder_overruns,
        }

    def detach(self) -> None:
        """Disconnects the port and destroys it. Call it from a pjlib-registered thread, before the
        call's media goes away when possible (errors from an already-gone call's media are ignored),
        and before closing the engine session or finishing the recording."""
        port, self.port = self.port, None
        if port is None:
            return
        for src, dst in ((self.call_audio_media, port), (port, self.call_audio_media)):
            try:
                src.stopTransmit(dst)
            except pj.Error:
                pass  # the call's media is gone already: the bridge has dropped the link itself
        self.call_audio_media = None
        # The C++ destructor takes the port off the bridge, waiting for a clock tick that is inside its
        # callback; it runs here, explicitly, while the Python object is whole (its pump methods still
        # bound), not from the object's deallocation, where a tick arriving meanwhile called back into
        # a half-freed object (tests/test_media_port_teardown.py runs that race on purpose).
        type(port).__swig_destroy__(port)  # SWIG disowns it: the Python object's end deletes nothing
        del port


def attach_media(call_audio_media, clock_rate: int, session: MediaSession,
                 recorder: CallRecording | None = None) -> MediaAttachment:
    """Creates the call's port at `clock_rate` Hz and connects it both ways to `call_audio_media`.

    `session` serves the call's audio (its `.audio` holds the rings at `clock_rate`); `recorder` is the
    call's CallRecording (app/recording.py) at the same rate, or None for no recording.
    """
    audio = session.audio
    if isinstance(clock_rate, bool) or not isinstance(clock_rate, int) or clock_rate % 50:
        raise ValueError(f"clock_rate must be an int in Hz with whole 20 ms frames, got {clock_rate!r}")
    if audio.call_rate != clock_rate:
        raise ValueError(f"the session's audio runs at {audio.call_rate} Hz, the port at {clock_rate} Hz: they must match")
    if recorder is not None and recorder.rate != clock_rate:
        raise ValueError(f"the recording runs at {recorder.rate} Hz, the port at {clock_rate} Hz: they must match")
    pump = MediaPump(
        audio.rx, audio.tx, clock_rate // 50,
        recorder.caller if recorder is not None else None,
        recorder.bot if recorder is not None else None,
        # when samples entered rx and left tx: the first and last stages of the engine's frame stats
        audio.rx_stamps, audio.tx_stamps,
    )
    port = _RingPort(pump)
    fmt = pj.MediaFormatAudio()
    fmt.init(pj.PJMEDIA_FORMAT_PCM, clock_rate, 1, FRAME_US, 16)
    port.createPort(f"callbot-{id(port):x}", fmt)
    try:
        call_audio_media.startTransmit(port)
        port.startTransmit(call_audio_media)
    except pj.Error:
        try:
            call_audio_media.stopTransmit(port)
        except pj.Error:
            pass
        raise
    return MediaAttachment(call_audio_media, port, pump, recorder)
