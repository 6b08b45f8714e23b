"""A SIP worker's engine when the model runs in a shared service: `callbot serve` with `[model] service`.

Why: the model is loaded once, by `callbot model-service` (engine/serving/inference_service.py), and
several `callbot serve` processes (4 calls each: the pjsua2 wheel's cap) attach to it. For the app this
is one more CallEngine, like the inference child's (engine/serving/inference_process.py), whose words it
shares: each call's rx/tx rings are a shared-memory block made here and attached there by name, and
only a call's start, controls and end, and its live events, cross the socket.

What differs from a child of our own is that the service comes and goes on its own:
- before answering an INVITE the app asks `admit(call_id)`: the service holds a slot, or says why not
  (its measured step time would miss the frame, max_calls): the caller gets 503 with Retry-After
  instead of a call that spoils every other one (app/service_worker.py turns it into the SIP answer);
- the service gone (stopped, crashed): every call it served is hung up through `hangup` (the app's
  endpoint: the calls end and are recorded as usual), `admit` answers "unavailable" (503) at once, and
  a thread reconnects with back-off (0.2 s doubling to 5 s); `error` stays None, because the worker
  is fine and will serve again;
- the service stalled (stopped, not dead: its socket stays open, nothing reads EOF): the worker pings
  every `heartbeat_s` and the service answers; `heartbeat_misses` intervals without a word from it
  (engine/serving/heartbeat.py) and the connection is given up as if the service had died (its calls
  hung up, 503 meanwhile, reconnecting: a resumed service is found again);
- a call the service cannot take after all (OpenRefused) is hung up rather than left silent;
- a bot prepared again (`prepare_bot`, the contract's PrepareBot) is asked of the service, whose
  engine swaps it for every worker's next calls; a service lost before it answered answers ok False.

Never on the media path: the media callback touches only the rings. The SIP thread waits at most
`admit_timeout_s` for an admission and `close_timeout_s` for a summary, and a send at most
`send_timeout_s` (the socket's SO_SNDTIMEO, so a service that stopped reading with the socket's buffer
full cannot hold the SIP thread; a send that times out gives the connection up: part of a word may
have gone, and a stream cut mid-word cannot be resumed); the reader thread only hands
words on and never calls into the endpoint (hang-ups run on a thread of their own, because the
endpoint's hangup waits for the SIP thread, which may be waiting for this reader).
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Callable

import msgspec

from callbot.engine.contract import (BotPrepared, CallStart, CallSummary, Control, EventSink, PrepareBot,
                                     answer_prepared)
from callbot.engine.serving import process_messages as pm
from callbot.engine.serving import service_messages as sm
from callbot.engine.serving.call_audio import RING_SECONDS, CallAudio
from callbot.engine.serving.frame_stats import FrameStats
from callbot.engine.serving.heartbeat import HEARTBEAT_MISSES, HEARTBEAT_S, Liveness
from callbot.engine.serving.shared_block import SharedCallRings
from callbot.engine.serving.step_budget import UNAVAILABLE
from callbot.engine.serving.stderr_line import say

ADMIT_TIMEOUT_S = 0.5  # the SIP thread waits this long for room; a local round trip takes well under 1 ms
CONNECT_TIMEOUT_S = 2.0  # to connect and hear Ready
CLOSE_TIMEOUT_S = 5.0  # a close waits for at most the call's one step in flight, then its summary
BACKOFF_S = (0.2, 5.0)  # reconnect: first wait, doubling up to the last
RETRY_AFTER_DOWN_S = 5  # Retry-After while no service is connected: about one reconnect attempt
SEND_TIMEOUT_S = 0.5  # a send to the service (its socket's buffer full: it stopped reading) gives up after this


@dataclass(frozen=True)
class Refusal:
    """Why a call cannot be taken now: a step_budget reason, one line, and when to try again (s)."""

    reason: str
    text: str
    retry_after_s: int


@dataclass(eq=False)
class _Link:
    """One connection to the service."""

    sock: socket.socket
    conn: Connection
    ready: pm.Ready
    liveness: Liveness | None = None
    alive: bool = True
    why: str = ""  # what the service said as it went (ChildFailed), or why we gave it up


@dataclass(eq=False)
class ServiceCallSession:
    """One call served by the model service (callbot.engine.contract.CallSession)."""

    start: CallStart
    audio: SharedCallRings
    sid: int
    engine: "ServiceEngine"
    link: _Link
    final_summary: CallSummary | None = None
    stats: FrameStats = field(default_factory=lambda: FrameStats(0))
    closed: bool = False
    lost: bool = False  # its service went away, or refused it: nothing more to say to it
    answered: threading.Event = field(default_factory=threading.Event)

    def control(self, op: Control) -> None:
        self.engine.control(self, op)


class _Waiter:
    def __init__(self):
        self.done = threading.Event()
        self.answer: sm.Admission | None = None


class ServiceEngine:
    """Implements callbot.engine.contract.CallEngine over the model service's Unix socket at `path`.

    The constructor tries to connect once, then a thread keeps (re)connecting: a worker may start before
    its service. `name` tells the service's log who this is. `hangup(call_id)`, set by the app, ends a
    call whose service is gone; `on_event` gets this worker's calls' live events (reader thread)."""

    def __init__(self, path: str, *, name: str = "", on_event: EventSink | None = None,
                 ring_seconds: float = RING_SECONDS, admit_timeout_s: float = ADMIT_TIMEOUT_S,
                 close_timeout_s: float = CLOSE_TIMEOUT_S, backoff_s: tuple[float, float] = BACKOFF_S,
                 retry_after_s: int = RETRY_AFTER_DOWN_S, heartbeat_s: float = HEARTBEAT_S,
                 heartbeat_misses: int = HEARTBEAT_MISSES, send_timeout_s: float = SEND_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic,
                 on_closed: Callable[[ServiceCallSession], None] | None = None):
        self.path = path
        self.name = name
        self.on_event = on_event
        self.on_closed = on_closed
        self.hangup: Callable[[str], None] | None = None
        self.ring_seconds = ring_seconds
        self.admit_timeout_s = admit_timeout_s
        self.close_timeout_s = close_timeout_s
        self.backoff_s = backoff_s
        self.retry_after_s = retry_after_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_misses = heartbeat_misses
        self.send_timeout_s = send_timeout_s
        self._clock = clock
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sessions: dict[int, ServiceCallSession] = {}
        self._admits: dict[int, _Waiter] = {}
        self._preparing: dict[int, tuple] = {}  # req -> (link, bot name, done)
        self._refusals: dict[str, int] = {}
        self._link: _Link | None = None
        self._down_said = False
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._readers: list[threading.Thread] = []
        self._connect()
        self._connector = threading.Thread(target=self._keep_connected, name="service-connect", daemon=True)
        self._connector.start()
        self._beater = threading.Thread(target=self._beat, name="service-heartbeat", daemon=True)
        self._beater.start()

    # ---- state ----------------------------------------------------------------------------------------

    @property
    def error(self) -> BaseException | None:
        """Always None: a service that goes away is waited for, not a failure of this worker."""
        return None

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.alive

    @property
    def info(self) -> pm.Ready | None:
        """What the service said when this connection began (its pid, its bots), None while down."""
        link = self._link
        return link.ready if link is not None else None

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def refusals(self) -> dict[str, int]:
        """Calls refused since start, by reason (step_budget's words): for the metrics."""
        with self._lock:
            return dict(self._refusals)

    # ---- admission (the SIP thread, before answering an INVITE) ----------------------------------------

    def admit(self, call_id: str) -> Refusal | None:
        """None: the service holds a slot for this call; else why not, and when to try again."""
        link = self._link
        if self._closed.is_set() or link is None or not link.alive:
            return self._refuse(UNAVAILABLE, "model service unavailable", self.retry_after_s)
        req, waiter = next(self._ids), _Waiter()
        with self._lock:
            self._admits[req] = waiter
        try:
            self._send(link, sm.Admit(req=req, call_id=call_id))
            answered = waiter.done.wait(self.admit_timeout_s)
        except (OSError, ValueError):
            answered = False
        finally:
            with self._lock:
                self._admits.pop(req, None)
        answer = waiter.answer
        if not answered or answer is None:
            return self._refuse(UNAVAILABLE, "model service did not answer", self.retry_after_s)
        if answer.ok:
            return None
        return self._refuse(answer.reason, answer.text, answer.retry_after_s)

    def release(self, call_id: str) -> None:
        """The call's INVITE ended before its call opened (or the call ended): any slot it holds goes back.
        Best effort: without a connection there is no slot to give back."""
        link = self._link
        if link is None or not link.alive or self._closed.is_set():
            return
        try:
            self._send(link, sm.Release(call_id=call_id))
        except (OSError, ValueError):
            pass

    def _refuse(self, reason: str, text: str, retry_after_s: int) -> Refusal:
        with self._lock:
            self._refusals[reason] = self._refusals.get(reason, 0) + 1
        return Refusal(reason, text, retry_after_s)

    # ---- bots prepared again (the app's threads) ---------------------------------------------------------

    @property
    def prepares_bots(self) -> bool:
        """Whether the service connected now can prepare a bot again (a model; not the echo line)."""
        link = self._link
        return link is not None and link.alive and link.ready.prepares_bots

    def prepare_bot(self, request: PrepareBot, done: Callable[[BotPrepared], None] | None = None) -> None:
        """Asks the service to prepare a bot again; `done` gets its BotPrepared on the reader thread, or
        ok False at once without a connection (or when it is lost before it answers)."""
        if not isinstance(request, PrepareBot):
            raise TypeError(f"prepare_bot takes a PrepareBot, got {type(request).__name__}")
        link = self._link
        req = next(self._ids)
        with self._lock:
            self._preparing[req] = (link, request.name, done)
        try:
            if self._closed.is_set() or link is None or not link.alive:
                raise OSError("the model service is not connected")
            self._send(link, pm.PrepareBotCall(req=req, request=request))
        except (OSError, ValueError) as err:
            self._prepared(req, BotPrepared(name=request.name, ok=False, error=f"{err}"))

    def _prepared(self, req: int, result: BotPrepared) -> None:
        with self._lock:
            entry = self._preparing.pop(req, None)
        if entry is not None:
            answer_prepared(entry[2], result, say=lambda line: _log(self.path, line))

    # ---- CallEngine (the SIP side's threads) ------------------------------------------------------------

    def open_session(self, start: CallStart) -> ServiceCallSession:
        if not isinstance(start, CallStart):
            raise TypeError(f"open_session takes a CallStart, got {type(start).__name__}")
        if self._closed.is_set():
            raise RuntimeError("the model service client is closed")
        link = self._link
        if link is None or not link.alive:
            self._hang_up([start.call_id])  # answered while the service went: not left silent
            raise RuntimeError("the model service is not connected")
        audio = CallAudio.shared(start.rate, self.ring_seconds)
        s = ServiceCallSession(start, audio, next(self._ids), self, link)
        with self._lock:
            registered = link.alive
            if registered:
                self._sessions[s.sid] = s
        try:
            if not registered:
                raise OSError("the connection closed")
            self._send(link, pm.OpenCall(sid=s.sid, shm_name=audio.shm_name, start=start))
        except (OSError, ValueError) as err:
            with self._lock:
                self._sessions.pop(s.sid, None)
            audio.close()
            self._hang_up([start.call_id])
            raise RuntimeError(f"the model service is not reachable: {err}") from None
        return s

    def control(self, s: ServiceCallSession, op: Control) -> None:
        if s.closed:
            raise RuntimeError(f"call {s.start.call_id}: the session is closed")
        if s.lost or not s.link.alive:
            raise RuntimeError(f"call {s.start.call_id}: the model service is gone")
        try:
            self._send(s.link, pm.ControlCall(sid=s.sid, op=op))
        except (OSError, ValueError) as err:
            raise RuntimeError(f"the model service is not reachable: {err}") from None

    def close_session(self, s: ServiceCallSession) -> CallSummary | None:
        with self._lock:
            if s.closed:
                return s.final_summary
            s.closed = True
        try:
            if not s.lost and s.link.alive:
                self._send(s.link, pm.CloseCall(sid=s.sid))
                s.answered.wait(self.close_timeout_s)
        except (OSError, ValueError):
            pass  # gone: the reader says so
        finally:
            with self._lock:
                self._sessions.pop(s.sid, None)
            s.audio.close()  # closes and unlinks the block, answered or not
        if s.final_summary is not None and self.on_closed is not None:
            self.on_closed(s)
        return s.final_summary

    def close(self, timeout: float = 5.0) -> None:
        """Stops reconnecting, closes the connection (the service closes this worker's calls) and frees
        every call's block; safe to call more than once."""
        self._closed.set()
        self._wake.set()
        link = self._link
        if link is not None:
            _shutdown(link.sock)
        self._connector.join(timeout)
        self._beater.join(timeout)
        for reader in list(self._readers):
            reader.join(timeout)
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.closed = s.lost = True
            s.answered.set()
            s.audio.close()

    # ---- the connection ---------------------------------------------------------------------------------

    def _send(self, link: _Link, msg) -> None:
        """One word to the service, within send_timeout_s (OSError otherwise: the link is given up when the
        socket itself timed out)."""
        if not self._send_lock.acquire(timeout=self.send_timeout_s):
            raise TimeoutError("another send to the model service is stuck")
        try:
            sm.send(link.conn, msg)
        except OSError as err:
            self._give_up(link, f"a send failed ({err.strerror or err})" if not isinstance(err, BlockingIOError)
                          else f"a send timed out after {self.send_timeout_s:g} s: it stopped reading")
            raise
        finally:
            self._send_lock.release()

    def _give_up(self, link: _Link, why: str) -> None:
        """Ends the connection from our side: its reader sees the end and does what a lost service needs."""
        if link.alive and not link.why:
            link.why = why
        _shutdown(link.sock)

    def _beat(self) -> None:
        """Every heartbeat_s: a Ping to the service, and a look at how long it has said nothing."""
        while not self._closed.wait(self.heartbeat_s):
            link = self._link
            if link is None or not link.alive or link.liveness is None:
                continue
            try:
                self._send(link, sm.Ping())
            except (OSError, ValueError):
                continue
            silent = link.liveness.check()
            if silent is not None:
                self._give_up(link, f"stalled: not a word for {silent:.1f} s")

    def _keep_connected(self) -> None:
        delay = self.backoff_s[0]
        while not self._closed.is_set():
            if self.connected:
                self._wake.wait()
                self._wake.clear()
                delay = self.backoff_s[0]
                continue
            if self._connect():
                continue
            self._closed.wait(delay)
            delay = min(delay * 2, self.backoff_s[1])

    def _connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn = None
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(self.path)
            sock.setblocking(True)
            _set_send_timeout(sock, self.send_timeout_s)
            conn = Connection(os.dup(sock.fileno()))
            sm.send(conn, sm.Hello(pid=os.getpid(), name=self.name, heartbeat_s=self.heartbeat_s))
            if not conn.poll(CONNECT_TIMEOUT_S):
                raise OSError(f"no answer within {CONNECT_TIMEOUT_S:g} s")
            ready = sm.recv_in_worker(conn)
            if not isinstance(ready, pm.Ready):
                raise OSError(f"it began with {type(ready).__name__}, not Ready")
        except (OSError, EOFError, msgspec.DecodeError) as err:
            if conn is not None:
                conn.close()
            sock.close()
            if not self._down_said:
                self._down_said = True
                _log(self.path, f"not reachable ({getattr(err, 'strerror', None) or err}); new calls are "
                     "refused with 503 until it is, retrying")
            return False
        link = _Link(sock, conn, ready, Liveness(self.heartbeat_s, self.heartbeat_misses, self._clock))
        with self._lock:
            if self._closed.is_set():
                link.alive = False
            else:
                self._link = link
        if not link.alive:
            conn.close()
            sock.close()
            return False
        self._down_said = False
        reader = threading.Thread(target=self._read, args=(link,), name="service-read", daemon=True)
        self._readers = [t for t in self._readers if t.is_alive()] + [reader]
        reader.start()
        _log(self.path, f"connected (pid {ready.pid}, bots {', '.join(ready.bots)})")
        return True

    def _read(self, link: _Link) -> None:
        """The connection's reader: events to `on_event`, summaries and admissions to their waiters."""
        try:
            while True:
                try:
                    msg = sm.recv_in_worker(link.conn)
                except (EOFError, OSError):
                    return
                except msgspec.DecodeError as err:  # a bug on one side: say it, keep serving the calls
                    _log(self.path, f"a message did not decode: {err}")
                    continue
                if link.liveness is not None:
                    link.liveness.heard()
                if isinstance(msg, pm.CallEvent):
                    sink = self.on_event
                    if sink is not None:
                        try:
                            sink(msg.event)
                        except Exception as err:  # a subscriber's bug must not hang up every call here
                            _log(self.path, f"an event sink failed on {type(msg.event).__name__}: {err!r}")
                elif isinstance(msg, pm.CallClosed):
                    with self._lock:
                        s = self._sessions.get(msg.sid)
                    if s is not None:
                        s.final_summary = msg.summary
                        s.stats = msg.stats()
                        s.answered.set()
                elif isinstance(msg, sm.Admission):
                    with self._lock:
                        waiter = self._admits.get(msg.req)
                    if waiter is not None:
                        waiter.answer = msg
                        waiter.done.set()
                elif isinstance(msg, sm.OpenRefused):
                    self._open_refused(msg)
                elif isinstance(msg, pm.BotReady):
                    self._prepared(msg.req, msg.result)
                elif isinstance(msg, pm.ChildFailed):
                    link.why = msg.text
        finally:
            self._lost(link)

    def _open_refused(self, msg: sm.OpenRefused) -> None:
        with self._lock:
            s = self._sessions.get(msg.sid)
            if s is not None:
                s.lost = True
                self._refusals[msg.reason] = self._refusals.get(msg.reason, 0) + 1
        if s is not None:
            s.answered.set()
            _log(self.path, f"call {s.start.call_id} refused: {msg.text}; hanging it up")
            self._hang_up([s.start.call_id])

    def _lost(self, link: _Link) -> None:
        """The connection is gone: its calls are hung up, admissions refused, a reconnect begins."""
        with self._lock:
            link.alive = False
            if self._link is link:
                self._link = None
            lost = [s for s in self._sessions.values() if s.link is link and not s.lost]
            for s in lost:
                s.lost = True
            waiters = list(self._admits.values())
            unanswered = [(req, name) for req, (owner, name, _) in self._preparing.items() if owner is link]
        for req, name in unanswered:
            self._prepared(req, BotPrepared(name=name, ok=False, error="the model service was lost before it answered"))
        for s in lost:
            s.answered.set()
        for waiter in waiters:
            waiter.done.set()  # no answer: unavailable
        _shutdown(link.sock)
        link.conn.close()
        link.sock.close()
        if not self._closed.is_set():
            self._down_said = True
            _log(self.path, f"lost ({link.why or 'the connection closed'}): {len(lost)} calls hung up; new calls "
                 "are refused with 503 until it is back")
            self._hang_up([s.start.call_id for s in lost if not s.closed])
        self._wake.set()

    def _hang_up(self, call_ids: list[str]) -> None:
        hangup = self.hangup
        if hangup is None or not call_ids:
            return

        def run() -> None:
            for call_id in call_ids:
                try:
                    hangup(call_id)
                except Exception:  # ended meanwhile, or the endpoint is stopping
                    pass

        threading.Thread(target=run, name="service-hangup", daemon=True).start()


def _log(path: str, text: str) -> None:
    say(f"callbot: model service {path}: {text}")


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO: a blocking write to this socket returns (partly written, or EAGAIN) after `seconds`.
    A struct timeval of two longs: Linux and macOS on 64-bit (macOS's int tv_usec is padded to 8 bytes)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", whole, int((seconds - whole) * 1e6)))


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
