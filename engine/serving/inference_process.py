"""The model in its own process: the SIP process keeps only the media callbacks and the calls' rings.

Why: BENCHMARKS.md "Media callback" measured pjmedia's clock thread next to a thread running Python in
the same process. With 4 calls the clock thread takes the GIL 8 times a tick, each take waits behind the
Python thread, and the bridge falls behind for good (p99 lateness 312-987 ms). So the model, the
runner's inference thread (engine/serving/runner.py) and the 24 kHz resamplers run in a child process; each
call's rx and tx rings live in a shared_memory block (CallAudio.shared / CallAudio.attach_engine_side),
and the two processes talk over one Pipe, never per audio frame: a call's start and end, the app's
control operations (play, inform, set_persona, mute), the call's live events (text pieces, speech
start/stop, stage stamps about once a second), and a bot prepared again while calls run (PrepareBot,
answered by BotPrepared: the child's runner prepares it between rounds and swaps it in for the next
calls, engine/serving/runner.py). The words are typed (engine/serving/process_messages.py).
In the child, the inference thread never writes to the pipe: it queues its events, and a sender
thread forwards them, so a slow parent can never delay a step.

Lifetimes: the parent creates each call's block and unlinks it in close_session, whether the child
answered or not (a dead child leaks nothing; its mapping, if any, goes with it). If the child dies,
`error` is set (serve's health check then ends the server), open calls keep their rings, so the media
callback plays silence, and close_session returns at once. The child is started with the "spawn"
context: a fresh interpreter that imports the engine and the module of `setup`, never pjsua2.
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import msgspec

from callbot.engine.contract import (BotPrepared, CallStart, CallSummary, Control, EventSink, PrepareBot,
                                     answer_prepared)
from callbot.engine.serving import process_messages as pm
from callbot.engine.serving.call_audio import RING_SECONDS, CallAudio
from callbot.engine.serving.frame_stats import FrameStats
from callbot.engine.serving.shared_block import SharedCallRings
from callbot.engine.serving.tx_policy import MODEL_TX_MAX_MS, MODEL_TX_SETTLE_PUSHES
from callbot.engine.serving.stderr_line import say

if TYPE_CHECKING:  # the SIP process must not load MLX: these are for the reader, not imported there
    from callbot.engine.model.session import Model
    from callbot.engine.serving.runner import BotPrompt, ModelCallSession

READY_TIMEOUT_S = 3600.0  # loading (or downloading) a 7B and compiling its graphs takes a while
CLOSE_TIMEOUT_S = 5.0  # a close waits for at most the call's one step in flight, then its summary
STOP_TIMEOUT_S = 10.0


class InferenceStartupError(Exception):
    """The inference process could not start; the text is the one line the user gets. A `setup` that
    raises this (or a subclass) has its text passed on as it is."""


class InferenceSetup(NamedTuple):
    """What `setup()` returns in the child: the loaded model, each bot's prompt by name (BotPrompt of
    engine/serving/runner.py; the first is the default), and a warm-up run on the inference thread."""

    model: "Model"
    prompts: "dict[str, BotPrompt]"
    warmup: Callable[[], None] | None = None


@dataclass(eq=False)
class ProcessCallSession:
    """One call served by the inference process (callbot.engine.contract.CallSession): `audio` (rx/tx
    in shared memory) is what the media port binds to; `final_summary` and `stats` arrive from the
    child at close."""

    start: CallStart
    audio: SharedCallRings
    sid: int
    engine: "InferenceProcess"
    final_summary: CallSummary | None = None
    stats: FrameStats = field(default_factory=lambda: FrameStats(0))
    closed: bool = False
    answered: threading.Event = field(default_factory=threading.Event)

    def control(self, op: Control) -> None:
        self.engine.control(self, op)


class InferenceProcess:
    """Implements callbot.engine.contract.CallEngine with the model in a child process.

    `setup` is a picklable callable (a module-level function, or functools.partial of one) that the child
    runs to load the model: it returns an InferenceSetup. A call's bot is its CallStart's (None or an
    unknown name: the first bot). The constructor returns once the child has loaded, prepared and
    warmed up, and raises InferenceStartupError with the child's message if it could not. As with any
    "spawn" child, a script that builds one must do so under `if __name__ == "__main__":` (the child
    imports the script's module again). `on_event` receives the calls' live events on the control
    channel's reader thread; `on_closed` each closed session (with its summary and frames). `batch`:
    the child's runner steps the calls due together (engine/serving/runner.py); False, one by one.
    `align` and `resampler_phase`: the runner's round schedule and the model line's resamplers; `cpus`: the
    CPUs the child's inference thread stays on (ModelEngine).
    """

    def __init__(self, setup: Callable[[], InferenceSetup], *,
                 ready_timeout_s: float = READY_TIMEOUT_S, close_timeout_s: float = CLOSE_TIMEOUT_S,
                 ring_seconds: float = RING_SECONDS, realtime: bool = True, batch: bool = True,
                 align: bool = True, resampler_phase: str = "minimum", cpus: Sequence[int] | None = None,
                 on_closed: Callable[[ProcessCallSession], None] | None = None, on_event: EventSink | None = None):
        if not ready_timeout_s > 0 or not close_timeout_s > 0:
            raise ValueError(f"timeouts must be > 0 s, got ready {ready_timeout_s!r}, close {close_timeout_s!r}")
        self.close_timeout_s = close_timeout_s
        self.ring_seconds = ring_seconds
        self.on_closed = on_closed
        self.on_event = on_event
        self.error: BaseException | None = None
        self.info: pm.Ready | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the session table
        self._send_lock = threading.Lock()
        self._sessions: dict[int, ProcessCallSession] = {}
        self._preparing: dict[int, tuple] = {}  # req -> (bot name, done), under _lock
        self._stopping = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_child_main, args=(child_conn, setup, ring_seconds, realtime, batch, align,
                                                             resampler_phase, None if cpus is None else list(cpus)),
                                 name="callbot-inference", daemon=True)
        self._proc.start()
        child_conn.close()  # ours is closed so that the child's exit reads as EOF here
        try:
            self.info = self._await_ready(ready_timeout_s)
        except BaseException:
            self._stopping = True
            self._end_child(timeout=1.0)
            self._conn.close()
            raise
        self._reader = threading.Thread(target=self._read, name="inference-control", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    # ---- CallEngine (the SIP side's thread) ---------------------------------------------------------

    def open_session(self, start: CallStart) -> ProcessCallSession:
        if not isinstance(start, CallStart):
            raise TypeError(f"open_session takes a CallStart, got {type(start).__name__}")
        if self._stopping:
            raise RuntimeError("the inference process is closed")
        if self.error is not None:
            raise RuntimeError(f"the inference process has stopped: {self.error}")
        audio = CallAudio.shared(start.rate, self.ring_seconds)
        s = ProcessCallSession(start, audio, next(self._ids), self)
        with self._lock:
            self._sessions[s.sid] = s
        try:
            self._send(pm.OpenCall(sid=s.sid, shm_name=audio.shm_name, start=start))
        except (OSError, ValueError) as err:
            with self._lock:
                self._sessions.pop(s.sid, None)
            audio.close()
            raise RuntimeError(f"the inference process is not reachable: {err}") from None
        return s

    def control(self, s: ProcessCallSession, op: Control) -> None:
        if s.closed:
            raise RuntimeError(f"call {s.start.call_id}: the session is closed")
        if self.error is not None:
            raise RuntimeError(f"the inference process has stopped: {self.error}")
        try:
            self._send(pm.ControlCall(sid=s.sid, op=op))
        except (OSError, ValueError) as err:
            raise RuntimeError(f"the inference process is not reachable: {err}") from None

    @property
    def prepares_bots(self) -> bool:
        return self.info is not None and self.info.prepares_bots

    def prepare_bot(self, request: PrepareBot, done: Callable[[BotPrepared], None] | None = None) -> None:
        """Asks the child to prepare a bot again (engine/serving/runner.py `prepare_bot`); `done` gets its
        BotPrepared on the control channel's reader thread (a dead child: ok False at once)."""
        if not isinstance(request, PrepareBot):
            raise TypeError(f"prepare_bot takes a PrepareBot, got {type(request).__name__}")
        req = next(self._ids)
        with self._lock:
            self._preparing[req] = (request.name, done)
        try:
            if self._stopping or self.error is not None:
                raise OSError("the inference process has stopped")
            self._send(pm.PrepareBotCall(req=req, request=request))
        except (OSError, ValueError) as err:
            self._prepared(req, BotPrepared(name=request.name, ok=False, error=f"the inference process: {err}"))

    def _prepared(self, req: int, result: BotPrepared) -> None:
        with self._lock:
            if req not in self._preparing:
                return
            name, done = self._preparing.pop(req)
        if not result.name:
            result = msgspec.structs.replace(result, name=name)
        answer_prepared(done, result)

    def close_session(self, s: ProcessCallSession) -> CallSummary | None:
        with self._lock:
            if s.closed:
                return s.final_summary
            s.closed = True
        try:
            if self.error is None and not self._stopping:
                self._send(pm.CloseCall(sid=s.sid))
                s.answered.wait(self.close_timeout_s)
        except (OSError, ValueError):
            pass  # the child is gone: the reader thread says so in `error`
        finally:
            with self._lock:
                self._sessions.pop(s.sid, None)
            s.audio.close()  # closes and unlinks the block, answered or not
        if s.final_summary is not None and self.on_closed is not None:
            self.on_closed(s)
        return s.final_summary

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stops the child (its calls end) and frees every call's block; safe to call more than once."""
        self._stopping = True
        try:
            self._send(pm.StopChild())
        except (OSError, ValueError):
            pass
        self._end_child(timeout)
        if self._reader.is_alive():
            self._reader.join(timeout)
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.closed = True
            s.answered.set()
            s.audio.close()
        if not self._reader.is_alive():
            self._conn.close()

    # ---- internals ----------------------------------------------------------------------------------

    def _send(self, msg: pm.Message) -> None:
        with self._send_lock:
            pm.send(self._conn, msg)

    def _await_ready(self, timeout: float) -> pm.Ready:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise InferenceStartupError(f"the inference process was not ready within {timeout:g} s")
            if not self._conn.poll(min(left, 1.0)):
                continue
            try:
                msg = pm.recv_in_parent(self._conn)
            except (EOFError, OSError):
                self._proc.join(5.0)
                raise InferenceStartupError(
                    f"the inference process ended while starting (exit status {self._proc.exitcode}); "
                    "see the lines above") from None
            if isinstance(msg, pm.Ready):
                return msg
            if isinstance(msg, pm.StartupFailed):
                raise InferenceStartupError(msg.text)

    def _read(self) -> None:
        """The control channel's reader: events to `on_event`, summaries to their sessions, a dead child
        to `error`."""
        while True:
            try:
                msg = pm.recv_in_parent(self._conn)
            except (EOFError, OSError):
                if not self._stopping:
                    self._proc.join(2.0)
                    self._failed(f"the inference process ended unexpectedly (exit status {self._proc.exitcode})")
                return
            except msgspec.DecodeError as err:  # a bug on one side: say it, keep serving the calls
                say(f"callbot: inference process: a message did not decode: {err}")
                continue
            if isinstance(msg, pm.CallEvent):
                sink = self.on_event
                if sink is not None:
                    sink(msg.event)
            elif isinstance(msg, pm.CallClosed):
                with self._lock:
                    s = self._sessions.get(msg.sid)
                if s is not None:
                    s.final_summary = msg.summary
                    s.stats = msg.stats()
                    s.answered.set()
            elif isinstance(msg, pm.BotReady):
                self._prepared(msg.req, msg.result)
            elif isinstance(msg, pm.ChildFailed):
                self._failed(msg.text)

    def _failed(self, text: str) -> None:
        if self.error is None:  # the first word is the cause; an EOF after an "error" adds nothing
            self.error = RuntimeError(text)
            say(f"callbot: inference process: {text}")
        with self._lock:
            waiting = list(self._sessions.values())
            preparing = list(self._preparing)
        for s in waiting:
            s.answered.set()  # a close in progress returns now; the rings stay until it frees them
        for req in preparing:  # never answered now: the bots stay as they were
            self._prepared(req, BotPrepared(name="", ok=False, error=f"the inference process stopped: {text}"))

    def _end_child(self, timeout: float) -> None:
        self._proc.join(timeout)
        if self._proc.is_alive():  # it ignores SIGTERM (see _child_main): past "stop", only SIGKILL
            self._proc.kill()
            self._proc.join(5.0)


# ---- the child -------------------------------------------------------------------------------------


def _child_main(conn, setup: Callable[[], InferenceSetup], ring_seconds: float, realtime: bool,
                batch: bool = True, align: bool = True, resampler_phase: str = "minimum",
                cpus: list[int] | None = None) -> None:
    # Ctrl-C in a terminal, or a service manager's SIGTERM, reaches the whole process group: the SIP
    # process decides when we stop ("stop", or EOF when it is gone), after it has hung up its calls.
    # Our stdout would land in serve's JSON log: anything a loader prints goes to stderr instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        from callbot.engine.serving.runner import SERVE_BATCHES, BotPrompts, ModelEngine

        model, prompts, warmup = setup()
        if not prompts:
            raise InferenceStartupError("no bot to answer calls with (the setup prepared none)")
        # batched unless told not to (or the setup wrapped its model: then one by one, see the runner)
        engine = ModelEngine(model, BotPrompts(prompts), realtime=realtime, warmup=warmup,
                             batch=None if batch else False, warm_batches=SERVE_BATCHES, align=align,
                             resampler_phase=resampler_phase, cpus=cpus)
    except InferenceStartupError as err:
        _send_quietly(conn, pm.StartupFailed(text=str(err)))
        return
    except BaseException as err:  # unexpected: the traceback for a developer, one line for the user
        traceback.print_exc()
        _send_quietly(conn, pm.StartupFailed(text=f"the model did not start: {type(err).__name__}: {err}"))
        return
    sessions: dict[int, ModelCallSession] = {}
    # one FIFO to the parent: events from the inference thread and the loop's own words keep their order
    # (a call's last events before its CallClosed), and the inference thread never waits on the pipe
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    sender = threading.Thread(target=_forward, args=(conn, outbox), name="inference-sender", daemon=True)
    engine.on_event = lambda event: outbox.put(pm.CallEvent(event=event))
    try:
        rt = engine.realtime_result
        pm.send(conn, pm.Ready(pid=os.getpid(), bots=list(prompts), pjsua2_loaded="pjsua2" in sys.modules,
                               realtime=rt.policy if rt is not None else "unchanged",
                               prepares_bots=engine.prepares_bots,
                               cpus=list(engine.pinned.cpus) if engine.pinned is not None else []))
        sender.start()
        while True:
            if engine.error is not None:
                outbox.put(pm.ChildFailed(text=f"the inference thread failed: {engine.error!r}"))
                return
            if not sender.is_alive():
                return  # the pipe broke: the SIP process is gone
            if not conn.poll(0.2):
                continue
            try:
                msg = pm.recv_in_child(conn)
            except (EOFError, OSError):
                return  # the SIP process is gone
            except msgspec.DecodeError as err:
                say(f"callbot: inference process: a message did not decode: {err}")
                continue
            if isinstance(msg, pm.OpenCall):
                try:
                    audio = CallAudio.attach_engine_side(msg.shm_name, msg.start.rate, ring_seconds,
                                                         tx_max_ms=MODEL_TX_MAX_MS, tx_settle=MODEL_TX_SETTLE_PUSHES)
                    sessions[msg.sid] = engine.open_session(msg.start, audio=audio)
                except Exception as err:  # this call stays silent; the others go on
                    say(f"callbot: inference process: call {msg.start.call_id}: {err}")
            elif isinstance(msg, pm.ControlCall):
                s = sessions.get(msg.sid)
                if s is not None:
                    try:
                        s.control(msg.op)
                    except (ValueError, RuntimeError) as err:
                        say(f"callbot: inference process: call {s.start.call_id}: {err}")
            elif isinstance(msg, pm.CloseCall):
                s = sessions.pop(msg.sid, None)
                if s is None:
                    outbox.put(pm.CallClosed.of(msg.sid, None, FrameStats(0)))
                    continue
                summary = engine.close_session(s)
                outbox.put(pm.CallClosed.of(msg.sid, summary, s.stats))
            elif isinstance(msg, pm.PrepareBotCall):
                try:  # answered on the inference thread, through the outbox like the calls' events
                    engine.prepare_bot(msg.request, functools.partial(_bot_ready, outbox, msg.req))
                except RuntimeError as err:
                    outbox.put(pm.BotReady(req=msg.req, result=BotPrepared(name=msg.request.name, ok=False,
                                                                           error=str(err))))
            elif isinstance(msg, pm.StopChild):
                return
    except (OSError, ValueError):
        return  # the pipe broke: the SIP process is gone
    finally:
        engine.close()
        outbox.put(None)
        if sender.is_alive():
            sender.join(STOP_TIMEOUT_S)


def _bot_ready(outbox: queue.SimpleQueue, req: int, result: BotPrepared) -> None:
    outbox.put(pm.BotReady(req=req, result=result))


def _forward(conn, outbox: queue.SimpleQueue) -> None:
    """The child's only writer to the pipe after Ready; None ends it."""
    while (msg := outbox.get()) is not None:
        try:
            pm.send(conn, msg)
        except (OSError, ValueError):
            return


def _send_quietly(conn, msg: pm.Message) -> None:
    try:
        pm.send(conn, msg)
    except (OSError, ValueError):
        pass
