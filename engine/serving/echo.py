"""The echo-test line: what the caller says comes straight back, through the model's own audio path.

Why it exists: PBXs offer an echo line to measure a line's latency by ear or by instrument; ours also
stands in for the model while the SIP side is built and measured. Each call's audio goes through the
same CallAudio rings and 24 kHz resamplers the model will use, framed at 24 kHz, so the round trip it
shows is the baseline the model's own delay adds to.

One worker thread serves every open session. It polls on absolute deadlines (PeriodicClock) rather than
being woken by the media callback, which may not signal anything (no locks on the hot path); a 2 ms poll
adds 1 ms on average to the round trip. With no session open it sleeps until one opens.
"""

from __future__ import annotations

import threading
from typing import Any

from callbot.engine.audio import PeriodicClock
from callbot.engine.serving.call_audio import ENGINE_RATE, CallAudio

DEFAULT_FRAME = 480  # samples at 24 kHz = 20 ms, one media frame
DEFAULT_POLL_MS = 2.0
# pushes (10 s of 20 ms frames) whose every one must show a lasting tx backlog before it is cut (CallAudio)
TX_SETTLE_PUSHES = 500


class EchoSession:
    """One call on the echo line."""

    def __init__(self, call_info: Any, audio: CallAudio):
        self.call_info = call_info
        self.audio = audio
        self.frames_echoed = 0
        self.closed = False


class EchoEngine:
    """Echoes every open session's caller audio back to it, in 24 kHz frames of `frame_samples`.

    Implements callbot.engine.contract.CallEngine. `close()` stops the worker thread.
    """

    def __init__(self, frame_samples: int = DEFAULT_FRAME, poll_ms: float = DEFAULT_POLL_MS):
        if isinstance(frame_samples, bool) or not isinstance(frame_samples, int) or not 1 <= frame_samples <= ENGINE_RATE:
            raise ValueError(f"frame_samples must be an int from 1 to {ENGINE_RATE} (24 kHz samples), got {frame_samples!r}")
        if not 0.1 <= poll_ms <= 100:
            raise ValueError(f"poll_ms must be between 0.1 and 100 ms, got {poll_ms!r}")
        self.frame_samples = frame_samples
        self.poll_ms = poll_ms
        # The worker takes this lock for each pass over the sessions; open/close take it to change the
        # list, so a closed session's rings are never touched again. Engine side only: the media
        # callbacks never see it.
        self._lock = threading.Lock()
        self._sessions: list[EchoSession] = []
        self._stop = threading.Event()
        self._busy = threading.Event()  # set while a session is open: the worker polls only then
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="echo-engine", daemon=True)
        self._thread.start()

    def open_session(self, call_info: Any, rate: int | None = None) -> EchoSession:
        """A session at `rate` Hz: the media port's rate; by default `call_info.port_rate` when the call
        has one (the bridge's rate, which the port should run at), else `call_info.clock_rate`."""
        if self._stop.is_set():
            raise RuntimeError("the echo engine is closed")
        if rate is None:
            rate = getattr(call_info, "port_rate", None) or getattr(call_info, "clock_rate", None)
        if rate is None:
            raise ValueError("open_session needs the media port's rate: pass rate= or a call_info with clock_rate")
        # the frame just pushed + two 20 ms media ticks: a late worker must not leave lasting delay
        session = EchoSession(call_info, CallAudio(rate, tx_max_ms=self.frame_samples * 1000 / ENGINE_RATE + 40.0,
                                                   tx_settle=TX_SETTLE_PUSHES))
        with self._lock:
            self._sessions.append(session)
            self._busy.set()
        return session

    def close_session(self, session: EchoSession) -> None:
        with self._lock:
            if session.closed:
                return
            session.closed = True
            if session in self._sessions:
                self._sessions.remove(session)
            if not self._sessions:
                self._busy.clear()
        session.audio.close()

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def error(self) -> BaseException | None:
        """What stopped the worker, if anything did."""
        return self._error

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._busy.set()
        self._thread.join(timeout)
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s.closed = True
            s.audio.close()

    def _run(self) -> None:
        clock = PeriodicClock(self.poll_ms)
        n = self.frame_samples
        try:
            while not self._stop.is_set():
                if not self._busy.is_set():
                    self._busy.wait()
                    clock.reset()
                clock.wait()
                with self._lock:
                    for s in self._sessions:
                        audio = s.audio
                        while (frame := audio.pull(n)) is not None:
                            audio.push(frame)
                            s.frames_echoed += 1
        except BaseException as exc:  # surfaced through .error; a dead echo line must not pass silently
            self._error = exc
            raise

    def __enter__(self) -> EchoEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
