"""The model in its own process: the SIP process keeps only the media callbacks and the calls' rings.

Why: BENCHMARKS.md "Media callback" measured pjmedia's clock thread next to a thread running Python in
the same process. With 4 calls the clock thread takes the GIL 8 times a tick, each take waits behind the
Python thread, and the bridge falls behind for good (p99 lateness 312-987 ms). So the model, the
runner's inference thread (engine/serving/runner.py) and the 24 kHz resamplers run in a child process; each
call's rx and tx rings live in a shared_memory block (CallAudio.shared / CallAudio.attach_engine_side),
and the two processes talk over one Pipe only when a call starts or ends, never per frame.

Control messages, tuples over a multiprocessing Connection:
    parent -> child   ("open", sid, shm_name, rate, bot, call_id)   ("close", sid)   ("stop",)
    child -> parent   ("ready", info)   ("startup_error", text)   ("closed", sid, summary, rows, silence)
                      (rows, silence: the call's FrameStats frames, FrameStats.held())
                      ("error", text): the inference thread died; the child exits after sending it

Lifetimes: the parent creates each call's block and unlinks it in close_session, whether the child
answered or not (a dead child leaks nothing; its mapping, if any, goes with it). If the child dies,
`error` is set (serve's health check then ends the server), open calls keep their rings, so the media
callback plays silence, and close_session returns at once. The child is started with the "spawn"
context: a fresh interpreter that imports the engine and the module of `setup`, never pjsua2.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from callbot.engine.serving.call_audio import CALL_RATES, RING_SECONDS, CallAudio, SharedCallRings
from callbot.engine.serving.frame_stats import FrameStats

READY_TIMEOUT_S = 3600.0  # loading (or downloading) a 7B and compiling its graphs takes a while
CLOSE_TIMEOUT_S = 5.0  # a close waits for at most the call's one step in flight, then its summary
STOP_TIMEOUT_S = 10.0


class InferenceStartupError(Exception):
    """The inference process could not start; the text is the one line the user gets. A `setup` that
    raises this (or a subclass) has its text passed on as it is."""


class InferenceSetup(NamedTuple):
    """What `setup()` returns in the child: the loaded model, each bot's prompt by name (BotPrompt of
    engine/serving/runner.py; the first is the default), and a warm-up run on the inference thread."""

    model: Any
    prompts: dict
    warmup: Callable[[], None] | None = None


@dataclass
class ProcessCallSession:
    """One call served by the inference process: `audio` (rx/tx in shared memory) is what the media
    port binds to; `final_summary` and `stats` arrive from the child at close."""

    call_info: Any
    audio: SharedCallRings
    sid: int
    bot: str | None
    final_summary: dict | None = None
    stats: FrameStats = field(default_factory=lambda: FrameStats(0))
    closed: bool = False
    answered: threading.Event = field(default_factory=threading.Event)


class InferenceProcess:
    """Implements callbot.engine.contract.CallEngine with the model in a child process.

    `setup` is a picklable callable (a module-level function, or functools.partial of one) that the child
    runs to load the model: it returns an InferenceSetup. `bot_for(call_info) -> name` picks a call's bot
    on the SIP side (None: the first). The constructor returns once the child has loaded, prepared and
    warmed up, and raises InferenceStartupError with the child's message if it could not. As with any
    "spawn" child, a script that builds one must do so under `if __name__ == "__main__":` (the child
    imports the script's module again).
    """

    def __init__(self, setup: Callable[[], InferenceSetup], bot_for: Callable[[Any], str | None] | None = None, *,
                 ready_timeout_s: float = READY_TIMEOUT_S, close_timeout_s: float = CLOSE_TIMEOUT_S,
                 ring_seconds: float = RING_SECONDS, realtime: bool = True,
                 on_closed: Callable[[ProcessCallSession], None] | None = None):
        if not ready_timeout_s > 0 or not close_timeout_s > 0:
            raise ValueError(f"timeouts must be > 0 s, got ready {ready_timeout_s!r}, close {close_timeout_s!r}")
        self.bot_for = bot_for
        self.close_timeout_s = close_timeout_s
        self.ring_seconds = ring_seconds
        self.on_closed = on_closed
        self.error: BaseException | None = None
        self.info: dict = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the session table
        self._send_lock = threading.Lock()
        self._sessions: dict[int, ProcessCallSession] = {}
        self._stopping = False
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_child_main, args=(child_conn, setup, ring_seconds, realtime),
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

    def open_session(self, call_info: Any) -> ProcessCallSession:
        if self._stopping:
            raise RuntimeError("the inference process is closed")
        if self.error is not None:
            raise RuntimeError(f"the inference process has stopped: {self.error}")
        rate = getattr(call_info, "clock_rate", None)
        if rate not in CALL_RATES:
            raise ValueError(f"open_session needs a call_info with clock_rate in {CALL_RATES} Hz, got {rate!r}")
        bot = self.bot_for(call_info) if self.bot_for is not None else None
        audio = CallAudio.shared(rate, self.ring_seconds)
        s = ProcessCallSession(call_info, audio, next(self._ids), bot)
        with self._lock:
            self._sessions[s.sid] = s
        try:
            self._send(("open", s.sid, audio.shm_name, rate, bot, str(getattr(call_info, "call_id", ""))))
        except (OSError, ValueError) as err:
            with self._lock:
                self._sessions.pop(s.sid, None)
            audio.close()
            raise RuntimeError(f"the inference process is not reachable: {err}") from None
        return s

    def close_session(self, s: ProcessCallSession) -> None:
        with self._lock:
            if s.closed:
                return
            s.closed = True
        try:
            if self.error is None and not self._stopping:
                self._send(("close", s.sid))
                s.answered.wait(self.close_timeout_s)
        except (OSError, ValueError):
            pass  # the child is gone: the reader thread says so in `error`
        finally:
            with self._lock:
                self._sessions.pop(s.sid, None)
            s.audio.close()  # closes and unlinks the block, answered or not
        if s.final_summary is not None and self.on_closed is not None:
            self.on_closed(s)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stops the child (its calls end) and frees every call's block; safe to call more than once."""
        self._stopping = True
        try:
            self._send(("stop",))
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

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _await_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise InferenceStartupError(f"the inference process was not ready within {timeout:g} s")
            if not self._conn.poll(min(left, 1.0)):
                continue
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(5.0)
                raise InferenceStartupError(
                    f"the inference process ended while starting (exit status {self._proc.exitcode}); "
                    "see the lines above") from None
            if msg[0] == "ready":
                return msg[1]
            if msg[0] == "startup_error":
                raise InferenceStartupError(msg[1])

    def _read(self) -> None:
        """The control channel's reader: summaries to their sessions, a dead child to `error`."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self._proc.join(2.0)
                    self._failed(f"the inference process ended unexpectedly (exit status {self._proc.exitcode})")
                return
            if msg[0] == "closed":
                _, sid, summary, rows, silence = msg
                with self._lock:
                    s = self._sessions.get(sid)
                if s is not None:
                    s.final_summary = summary
                    s.stats = FrameStats.of(rows, silence)
                    s.answered.set()
            elif msg[0] == "error":
                self._failed(msg[1])

    def _failed(self, text: str) -> None:
        if self.error is None:  # the first word is the cause; an EOF after an "error" adds nothing
            self.error = RuntimeError(text)
            print(f"callbot: inference process: {text}", file=sys.stderr, flush=True)
        with self._lock:
            waiting = list(self._sessions.values())
        for s in waiting:
            s.answered.set()  # a close in progress returns now; the rings stay until it frees them

    def _end_child(self, timeout: float) -> None:
        self._proc.join(timeout)
        if self._proc.is_alive():  # it ignores SIGTERM (see _child_main): past "stop", only SIGKILL
            self._proc.kill()
            self._proc.join(5.0)


# ---- the child -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChildCall:
    call_id: str
    clock_rate: int
    bot: str | None


def _child_main(conn, setup: Callable[[], InferenceSetup], ring_seconds: float, realtime: bool) -> None:
    # Ctrl-C in a terminal, or a service manager's SIGTERM, reaches the whole process group: the SIP
    # process decides when we stop ("stop", or EOF when it is gone), after it has hung up its calls.
    # Our stdout would land in serve's JSON log: anything a loader prints goes to stderr instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    os.dup2(2, 1)
    try:
        from callbot.engine.serving.runner import TX_MAX_MS, TX_SETTLE_PUSHES, ModelEngine

        model, prompts, warmup = setup()
        if not prompts:
            raise InferenceStartupError("no bot to answer calls with (the setup prepared none)")
        default = next(iter(prompts.values()))
        engine = ModelEngine(model, lambda call: prompts.get(call.bot, default), realtime=realtime, warmup=warmup)
    except InferenceStartupError as err:
        _send_quietly(conn, ("startup_error", str(err)))
        return
    except BaseException as err:  # unexpected: the traceback for a developer, one line for the user
        traceback.print_exc()
        _send_quietly(conn, ("startup_error", f"the model did not start: {type(err).__name__}: {err}"))
        return
    sessions: dict[int, Any] = {}
    try:
        rt = engine.realtime_result
        conn.send(("ready", {"pid": os.getpid(), "bots": list(prompts), "pjsua2": "pjsua2" in sys.modules,
                             "realtime": rt.policy if rt is not None else "unchanged"}))
        while True:
            if engine.error is not None:
                _send_quietly(conn, ("error", f"the inference thread failed: {engine.error!r}"))
                return
            if not conn.poll(0.2):
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the SIP process is gone
            if msg[0] == "open":
                _, sid, shm_name, rate, bot, call_id = msg
                try:
                    audio = CallAudio.attach_engine_side(shm_name, rate, ring_seconds, tx_max_ms=TX_MAX_MS,
                                                         tx_settle=TX_SETTLE_PUSHES)
                    sessions[sid] = engine.open_session(_ChildCall(call_id, rate, bot), audio=audio)
                except Exception as err:  # this call stays silent; the others go on
                    print(f"callbot: inference process: call {call_id}: {err}", file=sys.stderr, flush=True)
            elif msg[0] == "close":
                sid = msg[1]
                s = sessions.pop(sid, None)
                if s is None:
                    conn.send(("closed", sid, None, *FrameStats(0).held()))
                    continue
                engine.close_session(s)
                conn.send(("closed", sid, s.final_summary, *s.stats.held()))
            elif msg[0] == "stop":
                return
    except (OSError, ValueError):
        return  # the pipe broke: the SIP process is gone
    finally:
        engine.close()


def _send_quietly(conn, msg: tuple) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):
        pass
