"""The inference runner: one dedicated thread per loaded model steps every open call every 80 ms.

Why one thread: the model is one set of weights and one codec object; steps of several calls take
turns on it (a batch later). The thread runs at real-time priority where the OS allows (ext/ rtthread).

Cadence is data-driven and clock-guarded (DESIGN.md). A call's step starts as soon as its 1920-sample
24 kHz frame is complete in its ring, not on a free-running clock that would add up to a frame of
waiting. The absolute-deadline clock is the watchdog: a call's next deadline is 80 ms after its last
real frame (then every 80 ms while it stalls); when the caller's audio is late past a deadline plus
`grace_ms`, the call is fed a frame of silence so the model keeps its 12.5 Hz time base. pjmedia's
conference bridge feeds the rx ring on its own steady 20 ms clock (the jitter buffer conceals lost
packets), so a stall means hold or a dead peer, not network jitter; re-anchoring on every real frame
keeps the two clocks from drifting apart. When stalled audio then arrives in a burst, frames beyond
`max_backlog` are dropped (counted), and CallAudio's tx limit trims what the extra steps would queue,
so a stall never turns into a lasting delay. The thread polls its calls every `poll_ms` (1 ms): the
media callback never signals anyone, because nothing on the hot path may block or take a lock.

Every frame leaves timestamps (`STAGES`: its last sample entering rx, resampled to 24 kHz, step start,
Mimi encoded, LM stepped, Mimi decoded, resampled into tx, its first sample leaving tx) in a
preallocated stats ring per call (`FrameStats`). The first and
last come from the media callbacks' stamp logs (CallAudio, ext/stamps.h); the last is known only once
the media side has read that far, so it is filled in on a later poll, and stays 0 (skipped in the
summaries) for a frame fed as silence, trimmed away, or pushed as the call closed. Summaries give
p50/p99/max per stage, and overload is counted, never silent: steps slower than 80 ms, silence fed,
frames dropped, underruns and overruns of the rings.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from callbot.engine.audio import PeriodicClock, make_realtime, now_ns
from callbot.engine.serving.call_audio import ENGINE_RATE, CallAudio
from callbot.engine.serving.frame_stats import STAGES, FrameStats
from callbot.engine.model.session import FRAME_SIZE, Model, PromptSnapshot
from callbot.engine.model.sampling import SamplingConfig

FRAME_NS = FRAME_SIZE * 1_000_000_000 // ENGINE_RATE  # 80 ms
(_RING_IN, _RESAMPLED, _STEP_START, _ENCODED, _LM_STEPPED, _DECODED, _RING_OUT, _RTP_OUT) = range(len(STAGES))
# what the media side may have queued after a push: the 80 ms just pushed + two 20 ms media ticks of
# slack; beyond that an underrun or a fed-silence frame would add delay for the rest of the call
TX_MAX_MS = 120.0
# pushes (10 s) whose every one must show a lasting tx backlog, with time to spare, before it is cut: a
# step slower than usual once in a hundred frames must keep the backlog that absorbs it (BENCHMARKS.md,
# "Cadence soak": a 1 s window cut and re-earned it by an underrun every 20-30 s)
TX_SETTLE_PUSHES = 125
_INT16_SCALE = 32768.0


@dataclass(frozen=True)
class BotPrompt:
    """What a call is answered with: the prepared prompt state, its sampling and seed."""

    snapshot: PromptSnapshot
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None


@dataclass
class ModelCallSession:
    """One call served by the model. `text` holds (ms since the call's first frame, piece)."""

    call_info: Any
    audio: CallAudio
    bot: BotPrompt
    seed: int
    session: Any = None  # callbot.engine.model.session.Session, opened on the inference thread
    stats: FrameStats = field(default_factory=FrameStats)
    text: list[tuple[float, str]] = field(default_factory=list)
    next_deadline_ns: int = 0  # watchdog: silence is fed after this (+ grace); 0 until the first frame
    first_frame_ns: int = 0
    steps: int = 0
    steps_late: int = 0
    silence_fed: int = 0
    frames_dropped: int = 0
    # (frame number, tx position of its first sample): frames whose rtp_out the media side has yet to report
    departing: deque = field(default_factory=deque)
    closed: bool = False
    final_summary: dict | None = None  # the summary taken as the session closed
    # held by the runner while it steps this call, by close_session while it closes it: closing waits
    # for at most this call's one step in flight, never for the other calls' steps
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict:
        """Counters, per-stage p50/p99/max, step times and the text spoken; reads the open rings' counters."""
        rows, _ = self.stats.held()
        step = (rows[:, _DECODED] - rows[:, _STEP_START]) / 1e9
        return {
            "steps": self.steps, "steps_late": self.steps_late, "silence_fed": self.silence_fed,
            "frames_dropped": self.frames_dropped, "tx_trimmed_ms": 1000 * self.audio.tx_trimmed / self.audio.call_rate,
            "tx_settled": self.audio.tx_settled,
            "underruns": self.audio.underruns,
            "overruns": self.audio.overruns, "stages_ms": self.stats.summary(), "step_s": step.tolist(),
            "text": [{"t_ms": round(t, 1), "piece": p} for t, p in self.text],
        }


class ModelEngine:
    """Implements callbot.engine.contract.CallEngine with a loaded `Model`.

    `prompt_for(call_info) -> BotPrompt` picks the bot (voice + persona snapshot) for a call; it runs on
    the SIP side's thread at call start, so it must only look up snapshots prepared at server start.
    `warmup`, if given, runs on the inference thread before the first call (MLX compiles and caches its
    graphs per stream, and the stream is the thread's own); the constructor returns once it is done and
    raises what it raised.
    """

    def __init__(self, model: Model, prompt_for: Callable[[Any], BotPrompt], *, realtime: bool = True,
                 grace_ms: float = 40.0, max_backlog: int = 2, poll_ms: float = 1.0,
                 on_closed: Callable[[ModelCallSession], None] | None = None,
                 warmup: Callable[[], None] | None = None, switch_interval_s: float | None = 0.001):
        if not 0 <= grace_ms <= 1000:
            raise ValueError(f"grace_ms must be 0..1000 ms, got {grace_ms!r}")
        if isinstance(max_backlog, bool) or not isinstance(max_backlog, int) or max_backlog < 1:
            raise ValueError(f"max_backlog must be an int >= 1 (frames), got {max_backlog!r}")
        self.model = model
        self.prompt_for = prompt_for
        self.grace_ns = int(grace_ms * 1e6)
        self.max_backlog = max_backlog
        self.poll_ms = poll_ms
        self.on_closed = on_closed
        self.realtime_result = None
        self._want_realtime = realtime
        if switch_interval_s is not None:
            # Python hands the GIL over every 5 ms by default: a step's graph building would then delay
            # the media callbacks by up to 5 ms (DESIGN.md: p99 25.6 ms instead of 20.3 ms); 1 ms keeps
            # them on time. Process-wide, like the GIL itself.
            sys.setswitchinterval(switch_interval_s)
        self._lock = threading.Lock()  # guards the session list only: held for a copy, never for a step
        self._sessions: list[ModelCallSession] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._warmup = warmup
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            self._thread.join()
            raise self.error

    # ---- CallEngine ---------------------------------------------------------------------------------

    def open_session(self, call_info: Any, rate: int | None = None,
                     audio: CallAudio | None = None) -> ModelCallSession:
        """`audio`: the call's CallAudio when it is made elsewhere (attached to shared memory by the
        inference process); None makes one at `rate` (or `call_info.clock_rate`)."""
        if self._stop.is_set():
            raise RuntimeError("the model engine is closed")
        if self.error is not None:
            raise RuntimeError(f"the inference thread has stopped: {self.error!r}")
        rate = rate if rate is not None else getattr(call_info, "clock_rate", None)
        if audio is None and rate is None:
            raise ValueError("open_session needs the media port's rate: pass rate= or a call_info with clock_rate")
        bot = self.prompt_for(call_info)
        seed = bot.seed if bot.seed is not None else time.monotonic_ns() & 0x7FFFFFFF
        if audio is None:
            audio = CallAudio(rate, tx_max_ms=TX_MAX_MS, tx_settle=TX_SETTLE_PUSHES)
        s = ModelCallSession(call_info, audio, bot, seed)
        with self._lock:
            self._sessions.append(s)
        return s

    def close_session(self, s: ModelCallSession) -> None:
        with self._lock:
            if s in self._sessions:
                self._sessions.remove(s)
        with s.lock:  # waits for this call's step in flight, if any: none follows once `closed` is set
            if s.closed:
                return
            self._note_departures(s)  # what the media side read since the last poll
            s.final_summary = s.summary()
            s.closed = True
        s.audio.close()
        if self.on_closed is not None:
            self.on_closed(s)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            with s.lock:
                s.closed = True
            s.audio.close()

    # ---- the inference thread ----------------------------------------------------------------------

    def _run(self) -> None:
        if self._want_realtime:
            # computation: what a q4 7B step needs on an M4 (DESIGN.md's budget), constraint: the frame
            self.realtime_result = make_realtime(80.0, 60.0, 80.0)
        try:
            # MLX keeps a stream per thread (0.3x) and caches compiled graphs per stream: this thread
            # needs its own before it evaluates anything, and the warm-up must run on it
            mx.set_default_stream(mx.new_stream(mx.default_device()))
            if self._warmup is not None:
                self._warmup()
            self._ready.set()
            clock = PeriodicClock(self.poll_ms)
            while not self._stop.is_set():
                clock.wait()
                with self._lock:
                    sessions = list(self._sessions)
                for s in sessions:
                    with s.lock:
                        if not s.closed:
                            self._service(s)
        except BaseException as exc:  # surfaced: a dead runner must fail calls loudly, not go quiet
            self.error = exc
            if self._ready.is_set():
                raise
        finally:
            self._ready.set()
            # a thread that used MLX must release its streams before it ends, or the process may abort
            # at exit ("terminate called without an active exception": ml-explore/mlx#3126)
            mx.synchronize()
            mx.clear_streams()
            if self.realtime_result is not None:
                self.realtime_result.restore()

    def _service(self, s: ModelCallSession) -> None:
        """Step `s` for every frame that is due: a complete frame, or silence past the watchdog deadline."""
        if s.session is None:
            # MLX arrays belong to the stream of the thread that made them: the session's own state is
            # made here, where it will be stepped (a restore from the snapshot: milliseconds)
            s.session = self.model.open_session(snapshot=s.bot.snapshot, seed=s.seed, sampling=s.bot.sampling)
        audio = s.audio
        self._note_departures(s)
        while True:
            frame = audio.pull(FRAME_SIZE)
            now = now_ns()
            if frame is not None:
                # a burst after a stall: keep the newest `max_backlog` frames, drop the rest
                while audio.pending_in >= FRAME_SIZE * self.max_backlog:
                    newer = audio.pull(FRAME_SIZE)
                    if newer is None:
                        break
                    frame = newer
                    s.frames_dropped += 1
                pcm = frame.astype(np.float32) / _INT16_SCALE
            elif s.next_deadline_ns and now > s.next_deadline_ns + self.grace_ns:
                pcm = np.zeros(FRAME_SIZE, dtype=np.float32)
                s.silence_fed += 1
            else:
                return
            if frame is not None:
                self._step(s, pcm, now, silence=False, arrival_ns=audio.last_arrival_ns,
                           resampled_ns=audio.last_resampled_ns)
            else:
                self._step(s, pcm, now, silence=True)

    @staticmethod
    def _note_departures(s: ModelCallSession) -> None:
        """rtp_out of the frames whose first sample the media side has read from tx since the last poll."""
        while s.departing:
            frame, pos = s.departing[0]
            ns = s.audio.departure_ns(pos)
            if ns == 0:
                return  # not read yet; nor are the frames after it
            if ns > 0:
                s.stats.fill(frame, _RTP_OUT, ns)
            s.departing.popleft()

    def _step(self, s: ModelCallSession, pcm: np.ndarray, ready_ns: int, silence: bool, arrival_ns: int = 0,
              resampled_ns: int = 0) -> None:
        """One step of `s` on `pcm`, found ready at `ready_ns` (a real frame: its last sample entered rx
        at `arrival_ns` and was resampled at `resampled_ns`; 0 where unknown)."""
        frame_no = s.stats.count
        row = s.stats.row(silence)
        row[_RING_IN] = arrival_ns
        row[_RESAMPLED] = ready_ns if silence else resampled_ns
        if not s.first_frame_ns:
            s.first_frame_ns = ready_ns
        # a real frame re-anchors the watchdog on its arrival; silence continues the 80 ms grid
        s.next_deadline_ns = (s.next_deadline_ns if silence else ready_ns) + FRAME_NS
        row[_STEP_START] = start = now_ns()
        out, piece = s.session.step(pcm)
        row[_DECODED] = end = now_ns()
        row[_ENCODED], row[_LM_STEPPED] = s.session.last_encoded_ns, s.session.last_stepped_ns
        pcm16 = np.clip(np.rint(out * _INT16_SCALE), -32768, 32767).astype(np.int16)
        if s.audio.push(pcm16):
            s.departing.append((frame_no, s.audio.last_push_pos))
        # taken as the audio was handed to tx (before the media side could read it): ring_out <= rtp_out
        row[_RING_OUT] = s.audio.last_push_ns
        s.steps += 1
        if end - start > FRAME_NS:
            s.steps_late += 1
        if piece:
            s.text.append(((ready_ns - s.first_frame_ns) / 1e6, piece))
