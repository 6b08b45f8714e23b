"""The inference runner: one dedicated thread per loaded model steps every open call every 80 ms.

Why one thread: the model is one set of weights; each call holds its own LM and codec state (functional,
no lock). The thread runs at real-time priority where the OS allows (ext/ rtthread).

Batched (the default with a loaded Model): each call holds a slot of one `BatchedSessions`
(engine/model/batch.py; `slots` = the most calls the engine takes), joined on the inference thread when
the call is first seen and left when it has closed, and every call whose frame is due is stepped in one
forward (Mimi encode, LM, Mimi decode over all of them): the 7B step reads its weights once for B calls
instead of B times (BENCHMARKS.md, "Batched step"). Each slot's output equals its call stepped alone.
Rounds are scheduled against the media clock (engine/serving/round_schedule.py; `align=False` turns
it off). A round starts late enough to end `margin_ms` before the media tick its audio leaves on (the
tick grid and the frames' due times come from the rx stamps of the frames' last samples; its length
from this engine's own recent rounds of that size, `round_times`), not at once: the audio leaves on the
same tick either way, and the thread stays free until then for calls that fall due in between (the
model service's workers run their own clocks: the round aims at the tick of most of its calls, the
others wait for their own next tick). And a call's frames are put in phase with the calls already
running before its first frame: silence in front of its 24 kHz stream, under 80 ms, once, so that its
frames complete on their tick and it shares their rounds (without it, the calls of one SIP process fall
into up to 4 phases of the 80 ms frame and as many rounds). A planned round that overran its tick
drops from the front of each call's push the ticks that found its tx empty (they played silence),
so that one late round does not move the call's audio a tick later for good. After each batched round
`on_round(calls stepped, seconds)` is told (the model service feeds admission's StepTimes with it).
`batch=False` steps the calls one after another, each through its own `Session` (the model may then be
a wrapper such as a test's tap or `--step-delay-ms`'s SlowModel; a batch needs the loaded Model), in
the same scheduled rounds. The model line's resamplers are minimum phase (`resampler_phase`,
MODEL_RESAMPLER_PHASE; BENCHMARKS.md, "Resampler").

Control operations (engine/contract.py) take effect at a call's next step: a played clip's frame is
given to the model as its own audio (`agent_pcm`) and, one step later - when the model's output is that
frame's decode, its one-frame acoustic delay - the caller gets the clip's frame itself, sample-exact;
an informed clip is mixed into what the model hears; a muted caller is heard as silence; a persona
change runs inside the session's steps. Live events go to `on_event` as they happen.

A bot prepared again while calls run (`prepare_bot`, the contract's PrepareBot: its voice, persona or
sampling changed in the config) is prepared here, on the inference thread, once, by the same
`Model.prepare` the host ran at start, and swapped into the engine's `BotPrompts` when it is ready: the
calls that open from then on start from it, the calls open before hold the BotPrompt they started from
(a snapshot is the prompt's arrays by reference; a call copies a layer as it first writes it, so a
snapshot nobody can reach any more is freed with its last call), and until it is ready new calls get
the old one. The prompt is stepped one frame at a time, and before each frame (`_between`) the calls'
due rounds run as they would in the main loop; the next frame is taken only when no round is due for at
least as long as the slowest of the last prompt frames took (the first is assumed to take a round of
one call), so a preparation costs a running call at most the wait of its round behind one prompt frame
that was misjudged (BENCHMARKS.md, "Bot prepared while calls run"). Requests run one after another in
the order they came; a sampling change alone finds the snapshot in Model.prepare's cache and costs
nothing. A new sampling's depformer graph compiles in the first round that steps it, as a batch mixing
two bots' samplings does today.

Cadence is data-driven and clock-guarded (docs/latency.md, "Cadence"). A call's step starts as soon
as its 1920-sample 24 kHz frame is complete in its ring, not on a free-running clock that would add up
to a frame of waiting. The absolute-deadline clock is the watchdog: a call's next deadline is 80 ms after its last
real frame (then every 80 ms while it stalls); when the caller's audio is late past a deadline plus
`grace_ms`, the call is fed a frame of silence so the model keeps its 12.5 Hz time base. pjmedia's
conference bridge feeds the rx ring on its own steady 20 ms clock (the jitter buffer conceals lost
packets), so a stall means hold or a dead peer, not network jitter; re-anchoring on every real frame
keeps the two clocks from drifting apart. When stalled audio then arrives in a burst, frames beyond
`max_backlog` are dropped (counted), and CallAudio's tx limit trims what the extra steps would queue,
so a stall never turns into a lasting delay. The thread polls its calls every `poll_ms` (1 ms), and
every 0.1 ms around the tick where a call's next frame is expected (engine/serving/arrival_watch.py):
the media callback never signals anyone, because nothing on the hot path may block or take a lock.

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
from typing import Callable, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from callbot.engine.audio import PeriodicClock, make_realtime, now_ns, sleep_until, to_float32, to_int16
from callbot.engine.audio.cpu_affinity import PinResult, check_cpus, pin_thread
from callbot.engine.serving.arrival_watch import expected_arrival_ns, next_look_ns
from callbot.engine.serving.call_audio import CallAudio
from callbot.engine.serving.round_schedule import (MARGIN_NS, SAME_TICK_NS, TICK_NS, Due,
                                                   RoundPlan, RoundTimes, first_frame_pad, first_frame_tick,
                                                   majority_phase, plan_round)
from callbot.engine.contract import (ENGINE_RATE, BotSpeech, BotText, CallerSpeech, CallStart, CallSummary, Control,
                                     ControlNotSupported, EventSink, FrameStages, Inform, InformFinished, LiveEvent,
                                     HoldBot, MuteCaller, PersonaChanged, Play, PlayFinished, SessionClosed,
                                     SetPersona, StopPlay, TextPiece, BotPrepared, PrepareBot,
                                     answer_prepared)
from callbot.engine.serving.clips import Clip, cut_clips
from callbot.engine.serving.frame_stats import STAGES, FrameStats
from callbot.engine.serving.speech_activity import SpeechActivity
from callbot.engine.serving.step_budget import FRAME_S, HEADROOM, WARMUP_MAX_BATCH, WARMUP_REPEATS
from callbot.engine.serving.tx_policy import MODEL_TX_MAX_MS, MODEL_TX_SETTLE_PUSHES
from callbot.engine.model.batch import BatchedSessions
from callbot.engine.model.session import FRAME_SIZE, Model, PromptSnapshot, Session
from callbot.engine.model.sampling import SamplingConfig
from callbot.engine.serving.stderr_line import say

FRAME_NS = FRAME_SIZE * 1_000_000_000 // ENGINE_RATE  # 80 ms
(_RING_IN, _RESAMPLED, _RELEASED, _STEP_START, _ENCODED, _LM_STEPPED, _DECODED, _RING_OUT,
 _RTP_OUT) = range(len(STAGES))
_INT16_SCALE = 32768.0
# frames between FrameStages events (about 1 s), and how far behind the newest frame they stay, so that
# a frame's last stage (rtp_out, known once the media side has read it) is in its row when it is sent
STAGES_EVERY = 12
STAGES_LAG = 6
# calls one engine steps together at most (batched): an empty slot costs a row of zeros in the round's
# input and nothing in the model (it is not in the batch); admission (step_budget.py) keeps the real
# number of calls where the frame allows
DEFAULT_SLOTS = 64
SERVE_BATCHES = 4  # calls one `callbot serve` process takes at most (pjsua2's PJSUA_MAX_CALLS): the round sizes it warms
# the model line's resamplers (CallAudio): minimum phase, 0.25 / 0.13 ms per direction at 8 / 16 kHz instead
# of linear phase's 1.75 / 1.0 ms, with the same rejection (BENCHMARKS.md, "Resampler"); "linear" returns
# to the exact, frequency-independent delay
MODEL_RESAMPLER_PHASE = "minimum"


@dataclass(frozen=True)
class BotPrompt:
    """What a call is answered with: the prepared prompt state, its sampling and seed."""

    snapshot: PromptSnapshot
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None


class BotPrompts:
    """Each bot's prompt by name, the first answering calls that name none or an unknown bot: a
    ModelEngine's `prompt_for` that `prepare_bot` can update. `replace` swaps one bot's BotPrompt whole
    (one dict store: atomic under the GIL, so the app's thread reading it at a call's start sees the old
    or the new one, never a mix)."""

    def __init__(self, prompts: dict[str, BotPrompt]):
        if not prompts:
            raise ValueError("no bot to answer calls with")
        self._prompts = dict(prompts)
        self.default = next(iter(self._prompts))

    def __call__(self, start: CallStart) -> BotPrompt:
        prompts = self._prompts
        default = prompts[self.default]
        return prompts.get(start.bot, default) if start.bot is not None else default

    def __contains__(self, name: object) -> bool:
        return name in self._prompts

    def __getitem__(self, name: str) -> BotPrompt:
        return self._prompts[name]

    def names(self) -> list[str]:
        return list(self._prompts)

    def replace(self, name: str, prompt: BotPrompt) -> None:
        if name not in self._prompts:
            raise KeyError(name)
        self._prompts[name] = prompt


class _Stopping(Exception):
    """The engine closes while a bot is being prepared: the preparation is abandoned."""


@dataclass(eq=False)
class ModelCallSession:
    """One call served by the model (callbot.engine.contract.CallSession). `text` holds (ms since the
    call's first frame, piece).

    Control operations arrive on the app's thread (`control`) into `pending` (a deque: appends and pops
    are atomic, no lock shared with the inference thread) and take effect at the call's next step."""

    start: CallStart
    audio: CallAudio
    bot: BotPrompt
    seed: int
    engine: "ModelEngine"
    session: Session | None = None  # opened on the inference thread
    slot: int | None = None  # batched: the call's slot in the engine's BatchedSessions
    pending: deque = field(default_factory=deque)  # Control operations not yet taken up
    playing: deque = field(default_factory=deque)  # Clips for the caller (and forced into the agent stream)
    # the clip frame given to the model last step: (clip, call-rate frame, was its last), sent to the
    # caller this step in place of the model's decode of it
    in_flight: tuple | None = None
    informing: deque = field(default_factory=deque)  # Clips mixed into what the model hears
    muted: bool = False
    held: bool = False  # HoldBot: the agent stream forced to silence between clips
    # (id, text, requested ns) of set_persona requests not yet reported; a request made while another
    # waits replaces it in the session (engine/model/persona_swap.py), so one swap may answer several
    persona_requests: deque = field(default_factory=deque)
    swaps_reported: int = 0  # the session's completed persona changes already reported
    caller_speech: SpeechActivity = field(default_factory=lambda: SpeechActivity(80.0))
    bot_speech: SpeechActivity = field(default_factory=lambda: SpeechActivity(80.0))
    stages_sent: int = 0  # frames whose stage stamps went out as FrameStages
    stats: FrameStats = field(default_factory=FrameStats)
    text: list[tuple[float, str]] = field(default_factory=list)
    next_deadline_ns: int = 0  # watchdog: silence is fed after this (+ grace); 0 until the first frame
    # a step due and waiting for its round: (due ns, silence), or None; the frame stays in the call's
    # audio until the round pulls it (a call that closes meanwhile loses nothing it had taken)
    waiting: tuple | None = None
    frame_tick_ns: int = 0  # the media tick that completed the call's last real frame (its frames' grid)
    aligned: bool = False  # its first frame was put in phase with the other calls' (or needed not be)
    pad_samples: int = 0  # 24 kHz silence put before its first sample to do so (< one frame)
    underruns_seen: int = 0  # the tx ring's underrun count at the call's last push
    first_frame_ns: int = 0
    steps: int = 0
    steps_late: int = 0
    silence_fed: int = 0
    frames_dropped: int = 0
    # (frame number, tx position of its first sample): frames whose rtp_out the media side has yet to report
    departing: deque = field(default_factory=deque)
    closed: bool = False
    final_summary: CallSummary | None = None  # the summary taken as the session closed
    # held by the runner while it steps this call, by close_session while it closes it: closing waits
    # for at most this call's one step in flight (batched: the round it is in), never for later ones
    lock: threading.Lock = field(default_factory=threading.Lock)

    def control(self, op: Control) -> None:
        """Queues `op` for the call's next step (the app's thread). A clip is converted here, not on the
        inference thread."""
        if self.closed:
            raise RuntimeError(f"call {self.start.call_id}: the session is closed")
        if isinstance(op, (Play, Inform)):
            self.pending.append((op, Clip.of(op, self.audio.call_rate)))
        elif isinstance(op, (SetPersona, MuteCaller, StopPlay, HoldBot)):
            self.pending.append((op, None))
        else:
            raise ControlNotSupported(f"unknown control operation {type(op).__name__}")

    def t_ms(self, ns: int) -> float:
        return (ns - self.first_frame_ns) / 1e6 if self.first_frame_ns else 0.0

    def summary(self) -> CallSummary:
        """Counters, per-stage p50/p99/max, step times and the text spoken; reads the open rings' counters."""
        rows, _ = self.stats.held()
        step = (rows[:, _DECODED] - rows[:, _STEP_START]) / 1e9
        return CallSummary(
            steps=self.steps, steps_late=self.steps_late, silence_fed=self.silence_fed,
            frames_dropped=self.frames_dropped, tx_trimmed_ms=1000 * self.audio.tx_trimmed / self.audio.call_rate,
            tx_settled=self.audio.tx_settled, underruns=self.audio.underruns, overruns=self.audio.overruns,
            stages_ms=self.stats.summary(), step_s=step.tolist(),
            text=[TextPiece(t_ms=round(t, 1), piece=p) for t, p in self.text])


class ModelEngine:
    """Implements callbot.engine.contract.CallEngine with a loaded `Model`.

    `prompt_for(start) -> BotPrompt` picks the bot (voice + persona snapshot) for a call (its CallStart);
    it runs on the app's thread at call start, so it must only look up snapshots prepared at server start.
    `on_event` receives the calls' live events on the inference thread: it must only enqueue.
    `warmup`, if given, runs on the inference thread before the first call (MLX compiles and caches its
    graphs per stream, and the stream is the thread's own); the constructor returns once it is done and
    raises what it raised.

    Batching (the module's docstring): `batch` None = batched when `model` is a loaded Model, True = must
    be, False = one by one; `slots` = the most calls open at once (batched; open_session refuses more);
    `warm_batches` = rounds of 1..n calls compiled before the first call (the tiny model: 0.1 s for 1..4;
    a first round of a size not compiled pays for it, late); `on_round(calls, seconds)` after each
    batched round, on the inference thread (it must only record).

    Bots prepared while calls run (the module's docstring): with `prompt_for` a BotPrompts,
    `prepare_bot(PrepareBot, done)` prepares a bot again on the inference thread between rounds and
    swaps it in for the next calls; `done(BotPrepared)` is called on the inference thread.

    Schedule (the module's docstring): `align` = rounds planned to end `margin_ms` before a media tick
    and new calls' frames put in phase with the others' (False: every due frame stepped at once, each
    call in its own phase); `resampler_phase` = the phase of the resamplers of the calls' CallAudio
    ("minimum" by default, "linear" for the exact, frequency-independent delay).

    `cpus`: the CPUs the inference thread and MLX's stream thread stay on (engine/audio/cpu_affinity.py:
    one core makes their many hand-overs a step context switches, not cross-core wake-ups); None = where
    the OS puts them. Not pinned (macOS, a CPU the process may not use): `pinned.reason`, one stderr line.
    """

    def __init__(self, model: Model, prompt_for: Callable[[CallStart], BotPrompt], *, realtime: bool = True,
                 grace_ms: float = 40.0, max_backlog: int = 2, poll_ms: float = 1.0,
                 on_closed: Callable[[ModelCallSession], None] | None = None, on_event: EventSink | None = None,
                 warmup: Callable[[], None] | None = None, switch_interval_s: float | None = 0.001,
                 batch: bool | None = None, slots: int = DEFAULT_SLOTS, warm_batches: int = 0,
                 on_round: Callable[[int, float], None] | None = None, align: bool = True,
                 margin_ms: float = MARGIN_NS / 1e6, resampler_phase: str = MODEL_RESAMPLER_PHASE,
                 cpus: Sequence[int] | None = None):
        if not 0 <= grace_ms <= 1000:
            raise ValueError(f"grace_ms must be 0..1000 ms, got {grace_ms!r}")
        if isinstance(max_backlog, bool) or not isinstance(max_backlog, int) or max_backlog < 1:
            raise ValueError(f"max_backlog must be an int >= 1 (frames), got {max_backlog!r}")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1 (calls), got {slots!r}")
        if batch and not isinstance(model, Model):
            raise ValueError(f"a batched step needs a loaded Model, got {type(model).__name__}: pass batch=False")
        if not 0 <= margin_ms <= 20:
            raise ValueError(f"margin_ms must be 0..20 ms (a tick), got {margin_ms!r}")
        if resampler_phase not in ("linear", "minimum"):
            raise ValueError(f"resampler_phase must be 'linear' or 'minimum', got {resampler_phase!r}")
        self.align = bool(align)
        self.margin_ns = int(margin_ms * 1e6)
        self.resampler_phase = resampler_phase
        self.round_times = RoundTimes()  # rounds by size, what the schedule expects (inference thread)
        self.batched = isinstance(model, Model) if batch is None else bool(batch)
        self.slots = slots
        self._warm_batches = min(max(warm_batches, 0), slots) if self.batched else 0
        self.on_round = on_round
        self._batch: BatchedSessions | None = None  # made on the inference thread
        self._held: list[ModelCallSession | None] = [None] * slots  # the call in each slot (inference thread)
        self._pcm = np.zeros((slots, FRAME_SIZE), np.float32)  # a round's inputs, reused
        self._active = np.zeros(slots, np.bool_)
        self._agents: list[np.ndarray | None] = [None] * slots
        self.model = model
        self.prompt_for = prompt_for
        self.grace_ns = int(grace_ms * 1e6)
        self.max_backlog = max_backlog
        self.poll_ms = poll_ms
        self.on_closed = on_closed
        self.on_event = on_event
        self.realtime_result = None
        self._want_realtime = realtime
        self._cpus = None if cpus is None else check_cpus(cpus)
        self.pinned: PinResult | None = None  # what pinning to `cpus` got (inference thread), None: not asked
        if switch_interval_s is not None:
            # Python hands the GIL over every 5 ms by default: a step's graph building would then delay
            # the media callbacks by up to 5 ms (docs/latency.md, "The GIL and the media clock": p99
            # 25.6 ms instead of 20.3 ms); 1 ms keeps them on time. Process-wide, like the GIL itself.
            sys.setswitchinterval(switch_interval_s)
        self._lock = threading.Lock()  # guards the session list only: held for a copy, never for a step
        self._sessions: list[ModelCallSession] = []
        self._to_prepare: deque = deque()  # (PrepareBot, done) for the inference thread, in order
        self._prompt_frames_ns: deque = deque(maxlen=8)  # the last prompt frames' lengths (bot preparation)
        self._prompt_frame_start = 0  # when the prompt frame in progress began (0: none)
        self._next_round_ns = 0  # set by _rounds: when the round it left planned starts (0: none held)
        self._round_failure: BaseException | None = None  # a round failed inside a preparation
        self.prompt_waits = 0  # polls a preparation waited for a round to pass before its next frame
        self.early_looks = 0  # looks around an expected arrival that found new audio before the coarse poll
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

    def open_session(self, start: CallStart, audio: CallAudio | None = None) -> ModelCallSession:
        """`audio`: the call's CallAudio when it is made elsewhere (attached to shared memory by the
        inference process); None makes one at `start.rate`."""
        if not isinstance(start, CallStart):
            raise TypeError(f"open_session takes a CallStart, got {type(start).__name__}")
        if self._stop.is_set():
            raise RuntimeError("the model engine is closed")
        if self.error is not None:
            raise RuntimeError(f"the inference thread has stopped: {self.error!r}")
        if audio is not None and audio.call_rate != start.rate:
            raise ValueError(f"the call's audio runs at {audio.call_rate} Hz, its CallStart says {start.rate} Hz")
        bot = self.prompt_for(start)
        seed = bot.seed if bot.seed is not None else time.monotonic_ns() & 0x7FFFFFFF
        given = audio
        if audio is None:
            audio = CallAudio(start.rate, tx_max_ms=MODEL_TX_MAX_MS, tx_settle=MODEL_TX_SETTLE_PUSHES,
                              resampler_phase=self.resampler_phase)
        else:
            audio.use_resampler_phase(self.resampler_phase)  # before the inference thread sees the call
        s = ModelCallSession(start, audio, bot, seed, self)
        with self._lock:
            full = self.batched and len(self._sessions) >= self.slots
            if not full:
                self._sessions.append(s)
        if full:
            if given is None:
                audio.close()
            raise RuntimeError(f"the model engine is full: all {self.slots} slots hold a call")
        return s

    def close_session(self, s: ModelCallSession) -> CallSummary | None:
        with self._lock:
            if s in self._sessions:
                self._sessions.remove(s)
        with s.lock:  # waits for this call's step in flight, if any: none follows once `closed` is set
            if s.closed:
                return s.final_summary
            self._note_departures(s)  # what the media side read since the last poll
            s.final_summary = s.summary()
            s.closed = True
            t_ms = s.t_ms(now_ns())
            unsent = [s.in_flight[0]] if s.in_flight is not None and s.in_flight[0] is not None \
                and s.in_flight[0] not in s.playing else []
            for clip in unsent + list(s.playing):
                self._emit(PlayFinished(call_id=s.start.call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms,
                                        interrupted=True))
            for clip in s.informing:
                self._emit(InformFinished(call_id=s.start.call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms,
                                          interrupted=True))
            self._send_stages(s, final=True)
            self._emit(SessionClosed(call_id=s.start.call_id, t_ms=t_ms, summary=s.final_summary))
        s.audio.close()
        if self.on_closed is not None:
            self.on_closed(s)
        return s.final_summary

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def prepares_bots(self) -> bool:
        """Whether `prepare_bot` can swap a bot: the bots are a BotPrompts and the model prepares prompts."""
        return isinstance(self.prompt_for, BotPrompts) and callable(getattr(self.model, "prepare", None))

    def prepare_bot(self, request: PrepareBot, done: Callable[[BotPrepared], None] | None = None) -> None:
        """Queues `request` for the inference thread (the module's docstring); `done` gets its
        BotPrepared there (it must only record or enqueue). Returns at once."""
        if not isinstance(request, PrepareBot):
            raise TypeError(f"prepare_bot takes a PrepareBot, got {type(request).__name__}")
        if self._stop.is_set() or self.error is not None:
            raise RuntimeError("the model engine is closed")
        if not self.prepares_bots:
            answer_prepared(done, BotPrepared(name=request.name, ok=False,
                                              error="this engine's bots are fixed: restart to prepare them again"))
            return
        self._to_prepare.append((request, done))

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
        if self._cpus is not None:  # first: the threads this one starts (MLX's stream) inherit the mask
            self.pinned = pin_thread(self._cpus)
            if self.pinned.reason:
                say(f"callbot: warning: the inference thread was {self.pinned.reason}")
        if self._want_realtime:
            # computation: what a q4 7B step needs on an M4 (docs/latency.md, "Latency budget"),
            # constraint: the frame period
            self.realtime_result = make_realtime(80.0, 60.0, 80.0)
        try:
            # MLX keeps a stream per thread (0.3x) and caches compiled graphs per stream: this thread
            # needs its own before it evaluates anything, and the warm-up must run on it
            mx.set_default_stream(mx.new_stream(mx.default_device()))
            if self.batched:
                self._batch = BatchedSessions(self.model, self.slots)
            if self._warmup is not None:
                self._warmup()
            if self._warm_batches:  # a round of a new size compiles its graphs: before a caller waits on it
                self._batch.warmup(range(1, self._warm_batches + 1))
            self._ready.set()
            clock = PeriodicClock(self.poll_ms)
            while not self._stop.is_set():
                self._wait_to_look(clock)
                with self._lock:
                    sessions = list(self._sessions)
                self._rounds(sessions)
                if self._to_prepare:
                    self._prepare_next(clock)
        except _Stopping:
            pass
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

    def _wait_to_look(self, clock: PeriodicClock) -> None:
        """Returns at the coarse poll's next deadline, or earlier when a call whose frame is expected
        about now (engine/serving/arrival_watch.py) has new audio in rx: looked at every 0.1 ms around
        the tick its frame should complete on, so that the frame is resampled and planned within
        0.1-0.2 ms of its arrival instead of up to a poll later."""
        with self._lock:
            sessions = list(self._sessions)
        # the inference thread's own fields: calls with no frame waiting whose frames' grid is known
        watched = [s for s in sessions if s.waiting is None and s.frame_tick_ns and not s.closed]
        while True:
            now = now_ns()
            look = next_look_ns(now, clock.deadline_ns, [expected_arrival_ns(s.frame_tick_ns, now)
                                                         for s in watched])
            if look >= clock.deadline_ns or self._stop.is_set():
                clock.wait()
                return
            sleep_until(look)
            for s in watched:
                with s.lock:  # an open call's rings stay mapped while its lock is held (close_session)
                    if not s.closed and s.audio.rx.readable:
                        self.early_looks += 1
                        return

    # ---- bots prepared while calls run (the inference thread) ----------------------------------------

    def _prepare_next(self, clock: PeriodicClock) -> None:
        """The oldest PrepareBot: prepared between rounds, swapped in, answered (always, once)."""
        request, done = self._to_prepare.popleft()
        started = time.perf_counter()
        try:
            prompt = self._prepared_prompt(request, clock)
        except _Stopping:
            answer_prepared(done, BotPrepared(name=request.name, ok=False,
                                              error="the engine closed before it was ready"))
            raise
        except Exception as err:  # a bad voice, a persona too long for the context, a broken file: this bot only
            if self._round_failure is not None:  # a round run between two prompt frames failed: as in _run
                answer_prepared(done, BotPrepared(name=request.name, ok=False, error="the engine failed"))
                raise self._round_failure
            text = str(err).strip().splitlines()
            answer_prepared(done, BotPrepared(name=request.name, ok=False,
                                              error=text[0] if text else type(err).__name__,
                                              seconds=time.perf_counter() - started))
            return
        finally:
            self._prompt_frame_start = 0
        self.prompt_for.replace(request.name, prompt)
        answer_prepared(done, BotPrepared(name=request.name, ok=True, seconds=time.perf_counter() - started))

    def _prepared_prompt(self, request: PrepareBot, clock: PeriodicClock) -> BotPrompt:
        prompts = self.prompt_for
        if request.name not in prompts:
            raise ValueError(f"bot {request.name!r} was not prepared when the engine started: restart to add bots")
        s = request.sampling
        sampling = SamplingConfig(text_temperature=s.text_temperature, text_top_k=s.text_top_k,
                                  audio_temperature=s.audio_temperature, audio_top_k=s.audio_top_k)
        snapshot = self.model.prepare(request.voice, request.persona, context=request.context,
                                      between=lambda: self._between(clock))
        return BotPrompt(snapshot, sampling, s.seed)

    def _between(self, clock: PeriodicClock) -> None:
        """Before each prompt frame: the calls' due rounds run; returns once the next round is far enough
        away for one more prompt frame (the slowest of the last few), or when no call is open."""
        now = now_ns()
        if self._prompt_frame_start:
            self._prompt_frames_ns.append(now - self._prompt_frame_start)
        first = True
        while True:
            if self._stop.is_set():
                raise _Stopping()
            if not first:
                self._wait_to_look(clock)  # the poll, or sooner when a call's frame arrives about its tick
                self.prompt_waits += 1
            first = False
            with self._lock:
                sessions = list(self._sessions)
            try:
                calls = self._rounds(sessions)
            except BaseException as err:  # the calls' failure, not the bot's: it ends the engine (_prepare_next)
                self._round_failure = err
                raise
            room = self._room_ns(calls)
            if room is None:
                break
            need = max(self._prompt_frames_ns, default=0) or self.round_times.expected_ns(1) or FRAME_NS // 4
            if room >= need:
                break
        self._prompt_frame_start = now_ns()

    def _room_ns(self, calls: list[ModelCallSession]) -> int | None:
        """How long until the next round must start (ns, <= 0: now), None when no open call has a
        frame to expect (none open, or none has sent its first frame)."""
        now = now_ns()
        soonest = None
        for s in calls:
            if s.closed:
                continue
            if s.waiting is not None:  # due, its round planned for later (or to be taken at the next poll)
                due = self._next_round_ns or now
            elif s.frame_tick_ns or s.next_deadline_ns:
                # its next frame completes one frame after its last (the tick grid, else the step's grid),
                # or, frames stepped since the tick was noted, at the grid point in the last frame before now;
                # a frame past that is late or not coming: the watchdog feeds silence at deadline + grace
                due = expected_arrival_ns(s.frame_tick_ns or (s.next_deadline_ns - FRAME_NS), now, span_ns=FRAME_NS)
                if due <= now:
                    due = max(now, s.next_deadline_ns + self.grace_ns) if s.next_deadline_ns else now
            else:
                continue  # no audio yet: its first frame may wait for one prompt frame
            soonest = due if soonest is None else min(soonest, due)
        return None if soonest is None else soonest - now

    def _step_due(self, s: ModelCallSession) -> tuple | None:
        """(due ns, silence) when `s` has a step due - a complete frame (due: the media tick that brought
        its last sample, else now) or silence past the watchdog's deadline - else None. Takes nothing:
        `_due_frame` does, when the round starts."""
        arrival = s.audio.frame_due(FRAME_SIZE)
        now = now_ns()
        if arrival is not None:
            if arrival:
                s.frame_tick_ns = arrival  # the call's frames complete on this tick's grid
            return (arrival or now, False)
        if s.next_deadline_ns and now > s.next_deadline_ns + self.grace_ns:
            return (now, True)
        return None

    def _due_frame(self, s: ModelCallSession) -> tuple | None:
        """(pcm float32 [1920], ready ns, silence, arrival ns, resampled ns) of `s`'s next step: its next
        complete frame (a burst after a stall keeps the newest `max_backlog` frames), else silence when the
        watchdog's deadline has passed; None when nothing is due."""
        audio = s.audio
        frame = audio.pull(FRAME_SIZE)
        now = now_ns()
        if frame is not None:
            while audio.pending_in >= FRAME_SIZE * self.max_backlog:
                newer = audio.pull(FRAME_SIZE)
                if newer is None:
                    break
                frame = newer
                s.frames_dropped += 1
            return to_float32(frame, 1.0 / _INT16_SCALE), now, False, audio.last_arrival_ns, audio.last_resampled_ns
        if s.next_deadline_ns and now > s.next_deadline_ns + self.grace_ns:
            s.silence_fed += 1
            return np.zeros(FRAME_SIZE, dtype=np.float32), now, True, 0, 0
        return None

    # ---- rounds: the calls whose frames are due, ending just before a media tick -------------------

    def _seat(self, sessions: list[ModelCallSession]) -> list[ModelCallSession]:
        """The calls to step from now: new ones get their state (batched: a slot, joined), closed ones
        give their slots back."""
        batch = self._batch
        if batch is None:
            live = []
            for s in sessions:
                with s.lock:
                    if s.closed:
                        continue
                    if s.session is None:
                        # MLX arrays belong to the stream of the thread that made them: the session's own
                        # state is made here, where it will be stepped (a restore from the snapshot: ms)
                        s.session = self.model.open_session(snapshot=s.bot.snapshot, seed=s.seed,
                                                            sampling=s.bot.sampling)
                    live.append(s)
            return live
        held = self._held
        alive = {id(s) for s in sessions if not s.closed}
        for slot, s in enumerate(held):  # calls closed since the last poll give their slots back
            if s is not None and id(s) not in alive:
                batch.leave(slot)
                held[slot] = None
        for s in sessions:
            if s.session is None and not s.closed:
                slot = held.index(None)  # open_session admits no more calls than slots
                batch.join(slot, s.bot.snapshot, seed=s.seed, sampling=s.bot.sampling)
                held[slot] = s
                s.slot, s.session = slot, batch.session(slot)
        return [s for s in held if s is not None]

    def _rounds(self, sessions: list[ModelCallSession]) -> list[ModelCallSession]:
        """Rounds over the calls with a frame due (engine/serving/round_schedule.py plans each: when it
        starts, which calls it takes), until none has one or the next round starts after the next poll
        (`_next_round_ns`: when). Returns the calls seated."""
        calls = self._seat(sessions)
        poll_ns = int(self.poll_ms * 1e6)
        self._next_round_ns = 0
        while True:
            waiting: list[ModelCallSession] = []
            for s in calls:
                with s.lock:
                    if s.closed:
                        s.waiting = None
                        continue
                    self._note_departures(s)
                    if s.waiting is None:
                        if not s.aligned:
                            self._align_first_frame(s, calls)
                        s.waiting = self._step_due(s)
                    else:
                        s.audio.frame_due(FRAME_SIZE)  # resampled as it comes: its stamps stay true
                    if s.waiting is not None:
                        waiting.append(s)
            if not waiting:
                return calls
            plan = self._plan(waiting)
            now = now_ns()
            held = plan.start_ns > now
            if held and plan.start_ns - now > poll_ns:
                self._next_round_ns = plan.start_ns
                return calls  # polled again before then: a call falling due meanwhile may still join
            # a planned start already passed (this thread looked late) is still the start the schedule
            # meant: the wait up to it is the schedule's hold, the lateness after it ours
            self._round([waiting[i] for i in plan.members], plan.start_ns if plan.end_tick_ns else 0,
                        plan.end_tick_ns, plan.start_ns if held else now)

    def _plan(self, waiting: list[ModelCallSession]) -> RoundPlan:
        if not self.align:
            return RoundPlan(0, tuple(range(len(waiting))))
        # due: the media tick that completed the frame (the rx stamp of its last sample), else when the
        # runner found it (no stamps, or silence fed by the watchdog)
        dues = [Due(s.waiting[0], self._read_tick_ns(s) or s.frame_tick_ns) for s in waiting]
        return plan_round(now_ns(), dues, self.round_times.expected_ns, self.margin_ns)

    @staticmethod
    def _read_tick_ns(s: ModelCallSession) -> int:
        """When the media side last read the call's tx (its stamp log; 0 before it has): the ticks a
        round must end before. pjmedia's bridge reads a port before it writes it, so these come a
        little (0.5-1 ms measured) before the rx stamps of the same tick."""
        stamps = s.audio.tx_stamps
        reached = stamps.reached()
        return stamps.find(reached) if reached else 0

    def _align_first_frame(self, s: ModelCallSession, calls: list[ModelCallSession]) -> None:
        """Before a call's first audio is pulled: silence before it (< one frame, once) so that its
        frames complete on the tick the other calls' frames complete on (round_schedule.py,
        `first_frame_pad`). Nothing to do while no audio came, or with no other call or no stamps."""
        audio = s.audio
        written, tick = audio.rx_tick()
        if not written and not audio.rx.readable:
            return  # no audio yet: the call's phase is still open
        s.aligned = True
        if not self.align or not tick or not audio.untouched:
            return
        others = [c.frame_tick_ns for c in calls if c is not s and c.frame_tick_ns and not c.closed]
        made = written * ENGINE_RATE // audio.call_rate
        per_tick = ENGINE_RATE * TICK_NS // 1_000_000_000
        pad = 0
        if others:  # else the first call sets the phase
            pad = first_frame_pad(made, tick, majority_phase(others, FRAME_NS, SAME_TICK_NS), per_tick=per_tick,
                                  frame=FRAME_SIZE)
        if pad:
            audio.pad_start(pad)
            s.pad_samples = pad
        # where its frames will complete, for the calls that join before its first frame does
        s.frame_tick_ns = first_frame_tick(made, pad, tick, per_tick=per_tick, frame=FRAME_SIZE)

    @staticmethod
    def _missed_samples(s: ModelCallSession, end_tick: int) -> int:
        """Call-rate samples to drop from the front of this push so that a planned round's audio
        starts on the tick it was planned for (`end_tick`; 0: no planned round, drop nothing: the tx
        policy alone decides, as before), for a call on that tick's clock:
        - the round overran its tick (the media side found tx empty there and played silence): one
          tick's worth for each such tick (the tx ring counts them since the call's last push), as far
          as the round is past its tick; sent anyway, that audio would leave a tick late and every
          later frame with it;
        - on time, with whole ticks of earlier audio still queued in tx (left by a start without a plan
          or an overrun the media side covered): that many ticks, once; the schedule, which ends every
          round before its tick, does not need them to absorb a late step.
        What the caller loses is audio the tick had already replaced by silence, or one tick of the
        new frame in place of a delay for the rest of the call. (A frame of a played clip is sent
        whole all the same: _push_out.)"""
        audio = s.audio
        underruns = audio.underruns
        missed, s.underruns_seen = underruns - s.underruns_seen, underruns
        if not end_tick or not audio.frames_pushed or not audio.tx_stamps.reached():
            return 0  # no plan, or nothing has read tx on a media clock yet
        off = (s.frame_tick_ns - end_tick) % TICK_NS
        if s.frame_tick_ns and min(off, TICK_NS - off) > SAME_TICK_NS:
            return 0  # another clock: its own ticks, not this one, read its audio
        per_tick = audio.frame_samples
        queued = audio.tx.readable
        late = now_ns() - end_tick
        if queued == 0 and missed > 0 and late > 0:
            return min(missed, 1 + late // TICK_NS) * per_tick
        if late <= 0:
            return queued // per_tick * per_tick
        return 0

    def _round(self, members: list[ModelCallSession], planned_ns: int = 0, end_tick: int = 0,
               origin_ns: int = 0) -> None:
        """One round, held until `planned_ns` (0: no plan; passed: at once) to end before `end_tick` (0:
        no tick): every member's waiting frame stepped, in one `BatchedSessions.step` (batched) or one
        after another; its length, from `origin_ns` (when it began, prepared calls included) to the
        last push, goes to `round_times`. The frames are pulled and the app's controls taken up before
        the hold, not after it: that work then runs inside a wait that was coming anyway, and the step
        starts at the planned time instead of that much later."""
        stepped: list[tuple[ModelCallSession, _Prepared]] = []
        locked: list[ModelCallSession] = []
        batch = self._batch
        try:
            for s in members:
                s.lock.acquire()  # a close waits for the round in flight; none follows once `closed` is set
                locked.append(s)
                s.waiting = None
                if s.closed or (due := self._due_frame(s)) is None:
                    continue
                prep = self._before_step(s, *due)
                prep.row[_RELEASED] = max(planned_ns, int(prep.row[_RESAMPLED]))
                stepped.append((s, prep))
            if not stepped:
                return
            if planned_ns:
                sleep_until(planned_ns)
            first = now_ns()
            if batch is not None:
                pcm, active, agents = self._pcm, self._active, self._agents
                active[:] = False
                for s, prep in stepped:
                    pcm[s.slot] = prep.heard
                    active[s.slot] = True
                    agents[s.slot] = prep.agent
                start = first
                out, pieces = batch.step(pcm, active, agents)
                end = now_ns()
                # every call's audio to tx first: the last call's does not wait for the others' events
                sents = [self._push_out(s, prep, out[s.slot], end_tick) for s, prep in stepped]
                for (s, prep), sent in zip(stepped, sents):
                    agents[s.slot] = None
                    self._after_push(s, prep, out[s.slot], pieces[s.slot], start, end, sent)
            else:
                for s, prep in stepped:
                    start = now_ns()
                    out, piece = s.session.step(prep.heard, agent_pcm=prep.agent)
                    self._after_step(s, prep, out, piece, start, now_ns(), end_tick)
            last = now_ns()
        finally:
            for s in locked:
                s.lock.release()
        # a planned round's length counts from its planned start: the wake, the pulls and the app's
        # controls before the step are part of what must end before the tick
        self.round_times.observe(len(stepped), last - (origin_ns or first))
        if batch is not None and self.on_round is not None:
            self.on_round(len(stepped), (end - start) / 1e9)

    def _emit(self, event: LiveEvent) -> None:
        sink = self.on_event
        if sink is not None:
            sink(event)

    def _take_controls(self, s: ModelCallSession, now: int) -> None:
        """What the app asked since the last step, taken up in order (the inference thread)."""
        while s.pending:
            op, clip = s.pending.popleft()
            if isinstance(op, Play):
                s.playing.append(clip)
            elif isinstance(op, Inform):
                s.informing.append(clip)
            elif isinstance(op, MuteCaller):
                s.muted = op.on
            elif isinstance(op, HoldBot):
                s.held = op.on
            elif isinstance(op, StopPlay):
                # the frame already given to the model still goes to the caller next step (one frame, 80 ms)
                for clip in cut_clips(s.playing, op.id):
                    self._emit(PlayFinished(call_id=s.start.call_id, t_ms=s.t_ms(now), id=clip.id,
                                            ms=clip.played_ms, interrupted=True))
            elif isinstance(op, SetPersona):
                try:
                    s.session.set_persona(op.text)
                except ValueError as err:  # this request goes; the call and the other calls go on
                    say(f"callbot: call {s.start.call_id}: set_persona: {err}")
                    continue
                s.persona_requests.append((op.id, op.text, now))

    def _send_stages(self, s: ModelCallSession, final: bool = False) -> None:
        """FrameStages for the frames old enough to know their rtp_out (all of them as the call closes)."""
        end = s.stats.count if final else s.stats.count - STAGES_LAG
        if end - s.stages_sent < (1 if final else STAGES_EVERY):
            return
        first = max(s.stages_sent, s.stats.count - len(s.stats.t))
        rows = s.stats.rows(first, end)
        s.stages_sent = end
        self._emit(FrameStages(call_id=s.start.call_id, t_ms=s.t_ms(now_ns()), first_frame=first, rows=rows.tolist()))

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

    def _before_step(self, s: ModelCallSession, pcm: np.ndarray, ready_ns: int, silence: bool, arrival_ns: int,
                     resampled_ns: int) -> "_Prepared":
        """Everything of a call's step before the model runs: its stamps, the app's controls taken up, what
        the model hears (`heard`) and is given as its own audio (`agent`)."""
        frame_no = s.stats.count
        row = s.stats.row(silence)
        row[_RING_IN] = arrival_ns
        row[_RESAMPLED] = ready_ns if silence else resampled_ns
        if not s.first_frame_ns:
            s.first_frame_ns = ready_ns
        t_ms = s.t_ms(ready_ns)
        call_id = s.start.call_id
        # a real frame re-anchors the watchdog on its arrival; silence continues the 80 ms grid
        s.next_deadline_ns = (s.next_deadline_ns if silence else ready_ns) + FRAME_NS
        self._take_controls(s, ready_ns)
        if not silence and (started := s.caller_speech.update(pcm)) is not None:
            self._emit(CallerSpeech(call_id=call_id, t_ms=t_ms, speaking=started))
        heard = np.zeros_like(pcm) if s.muted else pcm
        if s.informing:  # what the model hears: the caller (unless muted) and the fact being told
            clip = s.informing[0]
            heard = np.clip(heard + clip.next_frames()[1], -1.0, 1.0)
            if clip.done:
                s.informing.popleft()
                self._emit(InformFinished(call_id=call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms))
        fed = agent = None
        # the model's agent stream gets the clip's frame (held back while a persona's tokens run: the
        # agent stream is forced to silence then); the caller gets the frame itself a step later
        if s.playing and s.session.persona_phase not in ("persona", "spacer"):
            clip = s.playing[0]
            frame, agent = clip.next_frames()
            if clip.done:
                s.playing.popleft()
            fed = (clip, frame, clip.done)
        elif s.held and s.session.persona_phase not in ("persona", "spacer"):
            # held: a silent frame forced into the agent stream, and silence (not its decode) to the caller
            agent = np.zeros(FRAME_SIZE, np.float32)
            fed = (None, np.zeros(s.audio.call_rate * 80 // 1000, np.int16), False)
        return _Prepared(frame_no, row, t_ms, heard, agent, fed)

    def _after_step(self, s: ModelCallSession, prep: "_Prepared", out: np.ndarray, piece: str | None, start: int,
                    end: int, end_tick: int = 0) -> None:
        """Everything of a call's step after the model ran from `start` to `end` (ns): its audio to tx
        (_push_out), then the rest (_after_push)."""
        self._after_push(s, prep, out, piece, start, end, self._push_out(s, prep, out, end_tick))

    def _push_out(self, s: ModelCallSession, prep: "_Prepared", out: np.ndarray, end_tick: int) -> tuple | None:
        """A step's audio to the call's tx (a played frame sent exact); returns the played frame it sent
        (its `fed` tuple) or None. `end_tick`: the tick its round aimed to end before (0: none); a round
        that overran it drops the ticks it missed from the front of the call's audio (_missed_samples)."""
        sent, s.in_flight = (s.in_flight if s.session.last_output_played else None), prep.fed
        exact = sent[1] if sent is not None else None  # in place of the decode of the played frame
        pcm16 = to_int16(out, _INT16_SCALE)
        skip = self._missed_samples(s, end_tick)
        if exact is not None:
            skip = 0  # a clip the app plays reaches the caller whole: late by a tick rather than cut
        if s.audio.push(pcm16, exact=exact, skip=skip):
            s.departing.append((prep.frame_no, s.audio.last_push_pos))
        # taken as the audio was handed to tx (before the media side could read it): ring_out <= rtp_out
        prep.row[_RING_OUT] = s.audio.last_push_ns
        return sent

    def _after_push(self, s: ModelCallSession, prep: "_Prepared", out: np.ndarray, piece: str | None, start: int,
                    end: int, sent: tuple | None) -> None:
        """The rest of a call's step once its audio is in tx: the events, the persona reports, the stage
        stamps."""
        row, t_ms, call_id = prep.row, prep.t_ms, s.start.call_id
        row[_STEP_START], row[_DECODED] = start, end
        row[_ENCODED], row[_LM_STEPPED] = s.session.last_encoded_ns, s.session.last_stepped_ns
        exact = sent[1] if sent is not None else None
        s.steps += 1
        if end - start > FRAME_NS:
            s.steps_late += 1
        if (started := s.bot_speech.update(out if exact is None else exact)) is not None:
            self._emit(BotSpeech(call_id=call_id, t_ms=t_ms, speaking=started))
        if sent is not None and sent[2]:
            clip = sent[0]
            self._emit(PlayFinished(call_id=call_id, t_ms=t_ms, id=clip.id, ms=clip.played_ms))
        if piece:
            s.text.append((t_ms, piece))
            self._emit(BotText(call_id=call_id, t_ms=t_ms, piece=piece))
        swaps = s.session.persona_swaps
        for swap in swaps[s.swaps_reported:]:  # done: the persona is in effect, the caller heard again
            s.swaps_reported += 1
            while s.persona_requests:  # the requests it answered: the one it took, and any it replaced
                request_id, text, requested_ns = s.persona_requests.popleft()
                self._emit(PersonaChanged(call_id=call_id, t_ms=t_ms, id=request_id,
                                          waited_ms=(now_ns() - requested_ns) / 1e6, replaced=text != swap.persona))
                if text == swap.persona:
                    break
        self._send_stages(s)


def measure_batched_rounds(model: Model, prompt: BotPrompt, times, *, max_batch: int = WARMUP_MAX_BATCH,
                           repeats: int = WARMUP_REPEATS, budget_s: float = FRAME_S * HEADROOM) -> None:
    """Admission's warm-up for the batched runner: rounds of B = 1, 2, ... calls in one
    `BatchedSessions.step` (B slots joined on `prompt`, silence heard), the slowest of `repeats` per B
    into `times` (StepTimes.observe); stops after the first B over `budget_s` or at `max_batch`. Runs on
    the inference thread before the first call (it also compiles each size's graphs). The slots share
    the prompt's cache until they write, so B calls' memory is not taken up front."""
    batch = BatchedSessions(model, max_batch)
    for slot in range(max_batch):
        batch.join(slot, prompt.snapshot, seed=slot, sampling=prompt.sampling)
    pcm = np.zeros((max_batch, FRAME_SIZE), np.float32)
    active = np.zeros(max_batch, np.bool_)
    for size in range(1, max_batch + 1):
        active[:size] = True
        worst = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            batch.step(pcm, active)
            worst = max(worst, time.perf_counter() - t0)
        times.observe(size, worst)
        if worst > budget_s:
            return


class _Prepared(NamedTuple):
    """A call's step between `_before_step` and `_after_step`."""

    frame_no: int
    row: np.ndarray  # the frame's stats row
    t_ms: float
    heard: np.ndarray  # float32 [1920]: what the model hears
    agent: np.ndarray | None  # float32 [1920] forced into its agent stream, or None
    fed: tuple | None  # (clip or None, call-rate frame, its last) sent to the caller next step

