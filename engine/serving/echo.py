"""The echo-test line: what the caller says comes straight back, through the model's own audio path.

Why it exists: PBXs offer an echo line to measure a line's latency by ear or by instrument; ours also
stands in for the model while the SIP side is built and measured. Each call's audio goes through the
same CallAudio rings and 24 kHz resamplers the model will use, framed at 24 kHz, so the round trip it
shows is the baseline the model's own delay adds to.

One worker thread serves every open session. It polls on absolute deadlines (PeriodicClock) rather than
being woken by the media callback, which may not signal anything (no locks on the hot path); a 2 ms poll
adds 1 ms on average to the round trip. With no session open it sleeps until one opens.

It takes the app's control operations the way the model does where they make sense without a model, so
call flows can run on it: `Play` sends the clip to the caller sample-exact instead of the echo,
`StopPlay` cuts it, `MuteCaller` and `HoldBot` stop the echo; `Inform` and `SetPersona` have no model to
reach and are reported done at
once. Its live events: caller and bot speech start/stop, PlayFinished, SessionClosed.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from callbot.engine.audio import PeriodicClock, now_ns
from callbot.engine.contract import (ENGINE_RATE, BotSpeech, CallerSpeech, CallStart, CallSummary, Control,
                                     ControlNotSupported, EventSink, HoldBot, Inform, InformFinished, LiveEvent,
                                     MuteCaller, PersonaChanged, Play, PlayFinished, SessionClosed, SetPersona,
                                     StopPlay)
from callbot.engine.serving.call_audio import CallAudio
from callbot.engine.serving.clips import Clip, cut_clips
from callbot.engine.serving.speech_activity import SpeechActivity
from callbot.engine.serving.tx_policy import ECHO_TX_SETTLE_PUSHES, tx_limit_ms

DEFAULT_FRAME = 480  # samples at 24 kHz = 20 ms, one media frame
DEFAULT_POLL_MS = 2.0


class EchoSession:
    """One call on the echo line (callbot.engine.contract.CallSession)."""

    def __init__(self, start: CallStart, audio: CallAudio, frame_ms: float):
        self.start = start
        self.audio = audio
        self.frames_echoed = 0
        self.closed = False
        self.final_summary: CallSummary | None = None
        self.pending: deque = deque()  # (Control, Clip | None) from the app's thread, taken by the worker
        self.playing: deque[Clip] = deque()
        self.muted = False
        self.held = False  # HoldBot: no echo, only clips
        self.first_ns = 0
        self.caller_speech = SpeechActivity(frame_ms)
        self.bot_speech = SpeechActivity(frame_ms)
        self._frame_ms = frame_ms

    def control(self, op: Control) -> None:
        if self.closed:
            raise RuntimeError(f"call {self.start.call_id}: the session is closed")
        if isinstance(op, Play):
            self.pending.append((op, Clip.of(op, self.audio.call_rate, self._frame_ms)))
        elif isinstance(op, (Inform, SetPersona, MuteCaller, StopPlay, HoldBot)):
            self.pending.append((op, None))
        else:
            raise ControlNotSupported(f"unknown control operation {type(op).__name__}")

    def t_ms(self) -> float:
        return (now_ns() - self.first_ns) / 1e6 if self.first_ns else 0.0


class EchoEngine:
    """Echoes every open session's caller audio back to it, in 24 kHz frames of `frame_samples`.

    Implements callbot.engine.contract.CallEngine. `close()` stops the worker thread.
    """

    def __init__(self, frame_samples: int = DEFAULT_FRAME, poll_ms: float = DEFAULT_POLL_MS,
                 on_event: EventSink | None = None):
        if isinstance(frame_samples, bool) or not isinstance(frame_samples, int) or not 1 <= frame_samples <= ENGINE_RATE:
            raise ValueError(f"frame_samples must be an int from 1 to {ENGINE_RATE} (24 kHz samples), got {frame_samples!r}")
        if not 0.1 <= poll_ms <= 100:
            raise ValueError(f"poll_ms must be between 0.1 and 100 ms, got {poll_ms!r}")
        self.frame_samples = frame_samples
        self.poll_ms = poll_ms
        self.on_event = on_event
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

    def open_session(self, start: CallStart, audio: CallAudio | None = None) -> EchoSession:
        """A session at `start.rate` Hz (the media port's rate). `audio`: the call's CallAudio when it is
        made elsewhere (attached to a worker's shared block by the model service, with `tx_policy()`);
        None makes one."""
        if not isinstance(start, CallStart):
            raise TypeError(f"open_session takes a CallStart, got {type(start).__name__}")
        if self._stop.is_set():
            raise RuntimeError("the echo engine is closed")
        if audio is not None and audio.call_rate != start.rate:
            raise ValueError(f"the call's audio runs at {audio.call_rate} Hz, its CallStart says {start.rate} Hz")
        frame_ms = self.frame_samples * 1000 / ENGINE_RATE
        if audio is None:
            audio = CallAudio(start.rate, tx_max_ms=self.tx_policy()[0], tx_settle=self.tx_policy()[1])
        session = EchoSession(start, audio, frame_ms)
        with self._lock:
            self._sessions.append(session)
            self._busy.set()
        return session

    def tx_policy(self) -> tuple[float, int]:
        """(tx_max_ms, tx_settle) of its calls' audio: a late worker must not leave lasting delay
        (tx_policy.py)."""
        return tx_limit_ms(self.frame_samples * 1000 / ENGINE_RATE), ECHO_TX_SETTLE_PUSHES

    def close_session(self, session: EchoSession) -> CallSummary | None:
        with self._lock:
            if session.closed:
                return session.final_summary
            session.closed = True
            if session in self._sessions:
                self._sessions.remove(session)
            if not self._sessions:
                self._busy.clear()
            t_ms = session.t_ms()
            for clip in session.playing:
                self._emit(PlayFinished(call_id=session.start.call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms,
                                        interrupted=True))
            audio = session.audio
            session.final_summary = CallSummary(
                steps=audio.frames_pushed, tx_trimmed_ms=1000 * audio.tx_trimmed / audio.call_rate,
                tx_settled=audio.tx_settled, underruns=audio.underruns, overruns=audio.overruns)
            self._emit(SessionClosed(call_id=session.start.call_id, t_ms=t_ms, summary=session.final_summary))
        session.audio.close()
        return session.final_summary

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
                            self._serve(s, frame)
        except BaseException as exc:  # surfaced through .error; a dead echo line must not pass silently
            self._error = exc
            raise

    def _serve(self, s: EchoSession, frame: np.ndarray) -> None:
        """One frame of `s`: the caller's audio back (or a clip, or nothing while muted)."""
        if not s.first_ns:
            s.first_ns = now_ns()
        call_id, t_ms = s.start.call_id, s.t_ms()
        while s.pending:
            op, clip = s.pending.popleft()
            if isinstance(op, Play):
                s.playing.append(clip)
            elif isinstance(op, MuteCaller):
                s.muted = op.on
            elif isinstance(op, HoldBot):
                s.held = op.on
            elif isinstance(op, StopPlay):
                for clip in cut_clips(s.playing, op.id):
                    self._emit(PlayFinished(call_id=call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms,
                                            interrupted=True))
            elif isinstance(op, Inform):  # no model to tell: done at once
                self._emit(InformFinished(call_id=call_id, t_ms=t_ms, id=op.id, ms=0.0))
            elif isinstance(op, SetPersona):
                self._emit(PersonaChanged(call_id=call_id, t_ms=t_ms, id=op.id, waited_ms=0.0))
        if (started := s.caller_speech.update(frame)) is not None:
            self._emit(CallerSpeech(call_id=call_id, t_ms=t_ms, speaking=started))
        exact = None
        if s.playing:
            clip = s.playing[0]
            exact = clip.next_frames()[0]
            if clip.done:
                s.playing.popleft()
                self._emit(PlayFinished(call_id=call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms))
        out = np.zeros_like(frame) if s.muted or s.held else frame
        s.audio.push(out, exact=exact)
        if (started := s.bot_speech.update(out if exact is None else exact)) is not None:
            self._emit(BotSpeech(call_id=call_id, t_ms=t_ms, speaking=started))
        s.frames_echoed += 1

    def _emit(self, event: LiveEvent) -> None:
        sink = self.on_event
        if sink is not None:
            sink(event)

    def __enter__(self) -> EchoEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
