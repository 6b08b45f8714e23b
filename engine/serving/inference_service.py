"""One loaded model serving the calls of several SIP worker processes over a local Unix socket.

Why: a 16 GB Mac holds one 7B, and pjsua2 takes at most 4 calls per process (issue 13). So the model is
loaded once, by `callbot model-service`, and each `callbot serve` worker attaches to it
(engine/serving/service_client.py) instead of loading its own. It is the inference child's loop
(engine/serving/inference_process.py) made to serve several connections: the same typed words
(engine/serving/service_messages.py), the same shared-memory rings (a worker creates each call's block,
the service attaches to it by name), the same engine stepping every call on one inference thread. A
worker's calls are keyed apart inside the engine (two workers may see the same SIP Call-ID), and a
worker hears only its own calls' events.

Lifetimes. A worker that disconnects or dies: its calls are closed here (their mappings released; the
worker side, or its resource tracker when it was killed, unlinks the blocks), the slots it held go back,
the model stays loaded and the other workers' calls go on. The service that stops or dies: every worker
sees its socket close, hangs up its calls and answers new INVITEs 503 until it can connect again.

A worker that stalls (stopped, not dead: its socket stays open) is seen by its silence: it pings every
`heartbeat_s` it announced, and `heartbeat_misses` of those intervals without a word from it count as
a stall (engine/serving/heartbeat.py): its connection is shut, which closes its calls as a disconnect
does, and the other workers' calls go on. Every Ping is answered with a Pong, so the workers see a
stalled service the same way.

Threads: one accepts connections; per worker one reads (and does what it asks: opens, controls,
closes, admits) and one sends, so that neither the inference thread nor another worker ever waits on a
slow worker's socket; one watches the workers' heartbeats. The engine's events are routed on the
inference thread by a dictionary lookup and an enqueue only, into the worker's bounded outbox
(engine/serving/outbox.py: a worker that stops reading loses its FrameStages first, counted, and never
holds up the inference thread). `_lock` guards the tables and is never held while calling into the engine (whose
close emits events that take it).

A bot prepared again (PrepareBotCall, a worker saw its bot's voice, persona or sampling change in the
config) is handed to the engine, which prepares it between rounds and swaps it in for every worker's
next calls; the worker that asked gets the BotReady. Several workers watching one config each ask:
the engine's prompt cache (Model.prepare) makes every request after the first cost nothing.

Admission (engine/serving/step_budget.py): before answering an INVITE a worker asks (Admit); the answer
holds a slot for `reserve_s` until the call's OpenCall consumes it. A call opened without a slot (an
outbound call, or one that waited too long) is admitted by the same rule or refused (OpenRefused).
"""
from __future__ import annotations

import itertools
import os
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from typing import Callable

import msgspec

from callbot.engine.contract import BotPrepared, FrameStages, LiveEvent, SessionClosed
from callbot.engine.serving import process_messages as pm
from callbot.engine.serving import service_messages as sm
from callbot.engine.serving.call_audio import RING_SECONDS, CallAudio
from callbot.engine.serving.frame_stats import STAGES, FrameStats
from callbot.engine.serving.heartbeat import HEARTBEAT_MISSES, Liveness
from callbot.engine.serving.outbox import ESSENTIAL, EVENT, LOW, OUTBOX_LIMIT, Outbox
from callbot.engine.serving.step_budget import FRAME_BUDGET, MAX_CALLS, Admission, StepTimes
from callbot.engine.serving.stderr_line import say

RESERVE_S = 30.0  # a slot promised to an INVITE waits this long for its call to open (ringing, answering)
RETRY_AFTER_S = 10  # what a full model tells callers: calls last minutes, a retry within seconds is wasted
STOP_TIMEOUT_S = 5.0
ACCEPT_POLL_S = 0.2  # how often the accepting thread looks at the stop flag
WATCH_TICK_S = 0.05  # how often the heartbeat watcher looks at the workers (their intervals are longer)
_STEP_START, _DECODED = STAGES.index("step_start"), STAGES.index("decoded")
# Linux's sun_path holds 108 bytes, macOS's 104, the terminating NUL included
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107


class ServiceError(Exception):
    """The service could not start; the text is the user's one line."""


def _log(text: str) -> None:
    say(f"callbot: model service: {text}")


def check_socket_path(path: str) -> None:
    """ServiceError unless `path` can name a Unix socket here."""
    if not path:
        raise ServiceError("the model service needs a socket path ([model] service)")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ServiceError(f"{path}: too long for a Unix socket ({len(os.fsencode(path))} bytes, at most "
                           f"{MAX_SOCKET_PATH} here): pick a shorter [model] service path")


def listen(path: str) -> socket.socket:
    """A listening Unix socket at `path`, readable and writable by this user only. A socket file left by
    a service that died is replaced; one a live service answers on is an error."""
    check_socket_path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServiceError(f"{path}: exists and is not a socket: pick another [model] service path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a dead service's leftover
        else:
            raise ServiceError(f"{path}: another model service is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # the workers run as this user; nobody else may open calls on our model
        sock.listen(64)
    except OSError as err:
        sock.close()
        raise ServiceError(f"{path}: cannot listen there ({err.strerror or err})") from None
    return sock


def _untrack(shm_name: str) -> None:
    """Python registers a block this process only attached to with its resource tracker (3.13: unless
    track=False), which would unlink it when the service exits: the worker owns it and unlinks it."""
    if os.name != "posix":
        return
    try:
        resource_tracker.unregister("/" + shm_name, "shared_memory")
    except Exception:  # a tracker that is gone or never knew it: nothing to undo
        pass


@dataclass(eq=False)
class _Worker:
    no: int
    sock: socket.socket
    conn: Connection
    name: str = ""
    outbox: Outbox = field(default_factory=Outbox)
    liveness: Liveness | None = None  # once its Hello says how often it pings
    why: str = ""  # set when the service ends the connection: what its log line says
    quiet: bool = False  # a connection its worker had given up before it was accepted: not worth a log line
    calls: dict = field(default_factory=dict)  # the worker's sid -> _Call
    reserved: dict = field(default_factory=dict)  # call_id -> when the slot lapses (monotonic s)
    sender: threading.Thread | None = None
    reader: threading.Thread | None = None


@dataclass(eq=False)
class _Call:
    worker: _Worker
    sid: int
    call_id: str  # the worker's (SIP Call-ID)
    key: str  # the engine's: unique across workers
    session: object | None = None


@dataclass(frozen=True)
class ServiceStats:
    """A snapshot for the metrics: workers connected, calls open, slots promised, the admission limit
    (None: unbounded), refusals by reason since start, seconds per round by batch size."""

    workers: int
    calls: int
    reserved: int
    limit: int | None
    refused: dict[str, int]
    round_s: dict[int, float]
    dropped: dict[str, int] = field(default_factory=dict)  # events dropped from outboxes of slow workers, by kind


class InferenceService:
    """Serves `engine`'s calls to the workers that connect on the Unix socket at `path`.

    `engine` is a CallEngine whose `open_session(start, audio=...)` takes the call's CallAudio attached
    to the worker's block (ModelEngine; EchoEngine for tests and the echo line). `bots` are its bots'
    names (the first answers calls that name none or another). `admission` decides whether one more call
    fits; `step_times` gets the live rounds: a batched ModelEngine's own (`on_round`: calls stepped
    together, seconds), else the calls' step times from their FrameStages, summed. `tx_max_ms`/`tx_settle` are
    the engine's tx policy for the attached rings. `start()` begins accepting; `close()` stops.
    """

    def __init__(self, engine, path: str, *, bots: list[str], realtime: str = "unchanged",
                 admission: Admission | None = None, step_times: StepTimes | None = None,
                 tx_max_ms: float | None = None, tx_settle: int | None = None, ring_seconds: float = RING_SECONDS,
                 reserve_s: float = RESERVE_S, retry_after_s: int = RETRY_AFTER_S,
                 heartbeat_misses: int = HEARTBEAT_MISSES, outbox_limit: int = OUTBOX_LIMIT,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.path = path
        self.bots = list(bots)
        self.realtime = realtime
        self.admission = admission
        self.step_times = step_times
        self.tx_max_ms = tx_max_ms
        self.tx_settle = tx_settle
        self.ring_seconds = ring_seconds
        self.reserve_s = reserve_s
        self.retry_after_s = retry_after_s
        self.heartbeat_misses = heartbeat_misses
        self.outbox_limit = outbox_limit
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._by_key: dict[str, _Call] = {}
        self._refused: dict[str, int] = {}
        self._dropped: dict[str, int] = {}  # of workers gone, by kind (the live ones keep their own)
        self._numbers = itertools.count(1)
        self._stopping = threading.Event()
        self._sock = listen(path)
        self._inode = os.stat(path).st_ino
        self._acceptor = threading.Thread(target=self._accept, name="service-accept", daemon=True)
        self._watcher = threading.Thread(target=self._watch, name="service-heartbeat", daemon=True)
        engine.on_event = self._on_event
        # a batched engine (ModelEngine, batched) reports each round's calls and seconds itself; the calls'
        # step times summed are the law of one-by-one stepping, and would overstate a batch's round
        self._rounds_from_engine = step_times is not None and getattr(engine, "batched", False)
        if self._rounds_from_engine:
            engine.on_round = step_times.observe

    def start(self) -> InferenceService:
        self._acceptor.start()
        self._watcher.start()
        return self

    # ---- what the metrics read -----------------------------------------------------------------------

    def stats(self) -> ServiceStats:
        now = self._clock()
        with self._lock:
            self._prune(now)
            calls = sum(len(w.calls) for w in self._workers)
            reserved = sum(len(w.reserved) for w in self._workers)
            workers, refused = len(self._workers), dict(self._refused)
            dropped = dict(self._dropped)
            for w in self._workers:
                for kind, n in dict(w.outbox.dropped).items():
                    dropped[kind] = dropped.get(kind, 0) + n
        limit = self.admission.limit() if self.admission is not None else None
        rounds = self.step_times.measured if self.step_times is not None else {}
        return ServiceStats(workers, calls, reserved, limit, refused, rounds, dropped)

    # ---- stopping -------------------------------------------------------------------------------------

    def close(self, text: str = "the model service stopped") -> None:
        """Tells every worker `text` (ChildFailed), closes their calls and the socket; the engine is the
        caller's to close. Safe to call more than once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for thread in (self._acceptor, self._watcher):
            if thread.is_alive():
                thread.join(STOP_TIMEOUT_S)
        self._sock.close()
        try:
            if os.stat(self.path).st_ino == self._inode:  # ours still, not a newer service's
                os.unlink(self.path)
        except OSError:
            pass
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.outbox.put(pm.ChildFailed(text=text))
            w.outbox.close()
        for w in workers:
            if w.sender is not None:
                w.sender.join(STOP_TIMEOUT_S)
            _shutdown(w.sock)  # the reader sees EOF and closes the worker's calls
            if w.reader is not None:
                w.reader.join(STOP_TIMEOUT_S)

    # ---- connections ----------------------------------------------------------------------------------

    def _accept(self) -> None:
        self._sock.settimeout(ACCEPT_POLL_S)
        while not self._stopping.is_set():
            try:
                sock, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            sock.setblocking(True)
            w = _Worker(next(self._numbers), sock, Connection(os.dup(sock.fileno())), outbox=Outbox(self.outbox_limit))
            w.name = f"worker {w.no}"
            with self._lock:
                if self._stopping.is_set():
                    _shutdown(sock)
                    w.conn.close()
                    sock.close()
                    return
                self._workers.append(w)
            w.outbox.put(pm.Ready(pid=os.getpid(), bots=self.bots, pjsua2_loaded="pjsua2" in sys.modules,
                                  realtime=self.realtime, prepares_bots=bool(getattr(self.engine, "prepares_bots",
                                                                                      False))))
            w.sender = threading.Thread(target=_forward, args=(w.conn, w.outbox), name=f"service-send-{w.no}",
                                        daemon=True)
            w.reader = threading.Thread(target=self._serve_worker, args=(w,), name=f"service-read-{w.no}",
                                        daemon=True)
            w.sender.start()
            w.reader.start()

    def _serve_worker(self, w: _Worker) -> None:
        why = "disconnected"
        try:
            while True:
                try:
                    msg = sm.recv_in_service(w.conn)
                except (EOFError, OSError):
                    return
                except msgspec.DecodeError as err:  # a bug on one side, or a stranger: say it, go on
                    _log(f"{w.name}: a message did not decode: {err}")
                    continue
                if w.liveness is not None:
                    w.liveness.heard()
                if isinstance(msg, sm.Ping):
                    w.outbox.put(sm.Pong())
                elif isinstance(msg, sm.Admit):
                    w.outbox.put(self._admit(w, msg))
                elif isinstance(msg, sm.Release):
                    with self._lock:
                        w.reserved.pop(msg.call_id, None)
                elif isinstance(msg, pm.OpenCall):
                    self._open(w, msg)
                elif isinstance(msg, pm.ControlCall):
                    self._control(w, msg)
                elif isinstance(msg, pm.CloseCall):
                    self._close_call(w, msg.sid)
                elif isinstance(msg, pm.PrepareBotCall):
                    self._prepare_bot(w, msg)
                elif isinstance(msg, sm.Hello):
                    w.name = f"worker {w.no} ({msg.name or 'pid'} pid {msg.pid})"
                    if msg.heartbeat_s > 0:
                        w.liveness = Liveness(msg.heartbeat_s, self.heartbeat_misses, self._clock)
                    if _peer_gone(w.sock):  # it gave up waiting for our Ready (we were stopped): forget it
                        w.quiet = True
                        return
                    _log(f"{w.name} connected")
        except BaseException as err:  # a bug here must cost this worker its calls, not the service
            why = f"failed: {err!r}"
            raise
        finally:
            self._drop(w, w.why or why)

    def _drop(self, w: _Worker, why: str) -> None:
        """The worker is gone (or we stop): its calls close, its slots go back."""
        with self._lock:
            if w in self._workers:
                self._workers.remove(w)
            calls, w.calls = list(w.calls.values()), {}
            w.reserved.clear()
        for call in calls:
            self._end(call)
        w.outbox.close()
        _shutdown(w.sock)
        w.conn.close()
        w.sock.close()
        with self._lock:
            for kind, n in w.outbox.dropped.items():
                self._dropped[kind] = self._dropped.get(kind, 0) + n
        if not self._stopping.is_set() and not (w.quiet and not calls):
            closed = f": its {len(calls)} open calls closed, the other workers' go on" if calls else ""
            dropped = (f" ({w.outbox.dropped_total()} events it did not read in time were dropped)"
                       if w.outbox.dropped else "")
            _log(f"{w.name} {why}{closed}{dropped}")

    def _watch(self) -> None:
        """Shuts the connection of a worker whose heartbeat stopped: its reader sees the end and drops it."""
        while not self._stopping.wait(WATCH_TICK_S):
            with self._lock:
                watched = [(w, w.liveness) for w in self._workers if w.liveness is not None and not w.why]
            for w, liveness in watched:
                silent = liveness.check()
                if silent is not None:
                    w.why = f"stalled (not a word for {silent:.1f} s)"
                    _shutdown(w.sock)

    # ---- a worker's requests (its reader thread) ---------------------------------------------------------

    def _prune(self, now: float) -> None:
        """Slots promised longer ago than reserve_s go back (the INVITE was never answered). Under _lock."""
        for w in self._workers:
            for call_id in [c for c, until in w.reserved.items() if until <= now]:
                del w.reserved[call_id]

    def _refusal(self) -> tuple[str, str] | None:
        """(reason, text) when one more call would not fit, else None. Under _lock."""
        if self.admission is None:
            return None
        taken = sum(len(w.calls) + len(w.reserved) for w in self._workers)
        reason = self.admission.refusal(taken)
        if reason is None:
            return None
        self._refused[reason] = self._refused.get(reason, 0) + 1
        if reason == MAX_CALLS:
            return reason, f"model at capacity ({taken} of max_calls {self.admission.max_calls})"
        if reason == FRAME_BUDGET:
            cost = self.admission.times.predict(taken + 1) if self.admission.times is not None else None
            return reason, (f"model at capacity ({taken + 1} calls would take {1000 * (cost or 0):.0f} ms a round, "
                            f"over {1000 * self.admission.budget_s:.0f} ms)")
        return reason, f"model at capacity ({reason})"

    def _admit(self, w: _Worker, msg: sm.Admit) -> sm.Admission:
        now = self._clock()
        with self._lock:
            self._prune(now)
            if msg.call_id in w.reserved:  # asked again (a retransmitted INVITE): the same slot
                w.reserved[msg.call_id] = now + self.reserve_s
                return sm.Admission(req=msg.req, ok=True)
            refusal = self._refusal()
            if refusal is None:
                w.reserved[msg.call_id] = now + self.reserve_s
                return sm.Admission(req=msg.req, ok=True)
        reason, text = refusal
        return sm.Admission(req=msg.req, ok=False, reason=reason, retry_after_s=self.retry_after_s, text=text)

    def _open(self, w: _Worker, msg: pm.OpenCall) -> None:
        start = msg.start
        now = self._clock()
        with self._lock:
            held = w.reserved.pop(start.call_id, None)
            self._prune(now)
            refusal = self._refusal() if held is None or held <= now else None
            if refusal is None:
                call = _Call(w, msg.sid, start.call_id, f"{w.no}/{start.call_id}")
                w.calls[msg.sid] = call
                self._by_key[call.key] = call
        if refusal is not None:
            w.outbox.put(sm.OpenRefused(sid=msg.sid, reason=refusal[0], text=refusal[1]))
            return
        audio = None
        try:
            audio = CallAudio.attach_engine_side(msg.shm_name, start.rate, self.ring_seconds,
                                                 tx_max_ms=self.tx_max_ms, tx_settle=self.tx_settle)
            _untrack(msg.shm_name)
            call.session = self.engine.open_session(msgspec.structs.replace(start, call_id=call.key), audio=audio)
        except Exception as err:  # this call cannot be served; the others go on
            with self._lock:
                w.calls.pop(msg.sid, None)
                self._by_key.pop(call.key, None)
            if audio is not None:
                audio.close()
            _log(f"{w.name}: call {start.call_id}: {err}")
            w.outbox.put(sm.OpenRefused(sid=msg.sid, reason="error", text=str(err).splitlines()[0][:200]))

    def _control(self, w: _Worker, msg: pm.ControlCall) -> None:
        with self._lock:
            call = w.calls.get(msg.sid)
        if call is None or call.session is None:
            return
        try:
            call.session.control(msg.op)
        except (ValueError, RuntimeError) as err:
            _log(f"{w.name}: call {call.call_id}: {err}")

    def _prepare_bot(self, w: _Worker, msg: pm.PrepareBotCall) -> None:
        """The engine prepares the bot between rounds; its answer goes to the worker that asked."""
        request = msg.request

        def answer(result: BotPrepared) -> None:  # the inference thread: enqueue only
            w.outbox.put(pm.BotReady(req=msg.req, result=result), ESSENTIAL, "BotReady")

        prepare = getattr(self.engine, "prepare_bot", None)
        if prepare is None or not getattr(self.engine, "prepares_bots", False):
            answer(BotPrepared(name=request.name, ok=False, error="this model service prepares no bots (echo)"))
            return
        try:
            prepare(request, answer)
        except RuntimeError as err:
            answer(BotPrepared(name=request.name, ok=False, error=str(err)))
            return
        _log(f"{w.name}: preparing bot {request.name!r} again (voice {os.path.basename(request.voice)})")

    def _close_call(self, w: _Worker, sid: int) -> None:
        with self._lock:
            call = w.calls.pop(sid, None)
        if call is None:
            w.outbox.put(pm.CallClosed.of(sid, None, FrameStats(0)))
            return
        summary, stats = self._end(call)
        w.outbox.put(pm.CallClosed.of(sid, summary, stats))

    def _end(self, call: _Call):
        """Closes the call's session (its last events still routed to its worker), then forgets it."""
        summary, stats = None, FrameStats(0)
        try:
            if call.session is not None:
                summary = self.engine.close_session(call.session)
                stats = getattr(call.session, "stats", stats)
        finally:
            with self._lock:
                self._by_key.pop(call.key, None)
            if self.step_times is not None:
                self.step_times.call_ended(call.key)
        return summary, stats

    # ---- the engine's events (its threads: only look up and enqueue) -----------------------------------

    def _on_event(self, event: LiveEvent) -> None:
        with self._lock:
            call = self._by_key.get(event.call_id)
        if call is None:
            return
        if isinstance(event, FrameStages) and self.step_times is not None and not self._rounds_from_engine:
            steps = [(r[_DECODED] - r[_STEP_START]) / 1e9 for r in event.rows if r[_DECODED] and r[_STEP_START]]
            self.step_times.observe_live(call.key, steps)
        elif isinstance(event, SessionClosed) and self.step_times is not None:
            self.step_times.call_ended(call.key)
        worth = LOW if isinstance(event, FrameStages) else ESSENTIAL if isinstance(event, SessionClosed) else EVENT
        call.worker.outbox.put(pm.CallEvent(event=msgspec.structs.replace(event, call_id=call.call_id)), worth,
                               type(event).__name__)


def _peer_gone(sock: socket.socket) -> bool:
    """Whether all that is left to read is the end: the other side closed (a peek that never blocks)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _forward(conn: Connection, outbox: Outbox) -> None:
    """A worker's only writer, until its outbox closes."""
    while (msg := outbox.get()) is not None:
        try:
            sm.send(conn, msg)
        except (OSError, ValueError):
            return
