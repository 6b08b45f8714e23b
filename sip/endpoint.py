"""The SIP endpoint: one per process, owning pjsua2 from start to a shutdown that cannot abort.

Every pjsua2 object is created, operated and destroyed on one thread of ours, the SIP thread: it pumps
pjsip (`libHandleEvents`, which releases the GIL), runs queued commands and timers, and so receives all
signalling callbacks. Public methods are thread-safe: they hand a function to that thread and wait for
its result. Events go to `events` (a queue for the application) and to a history that `wait_for` reads.

Shutdown order matters (docs/architecture.md, "Shutdown order"): hang up every call and wait for the
DISCONNECTED callbacks (which
detach media ports from the conference bridge), unregister, drop every Call and Account, gc, and only
then libDestroy — any pjsua2 object alive at libDestroy ends in the pjmedia_conf_remove_port abort.
"""
from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import gc
import heapq
import itertools
import logging
import queue
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pjsua2 as pj

from . import admission as adm
from .account import AccountState, SipAccount
from .call import INBOUND, OUTBOUND, SipCall, call_op, weakly
from .call_record import CallRecord, TransferRecord, peer_text
from .callbacks import forget_printed_errors, guarded
from .codecs import apply_codec_priorities
from .config import WHEEL_MAX_CALLS, EndpointConfig
from .events import CallRejected, EndpointStopped, Event, IncomingCall
from .gate import Gate, dialog_tags, report_event
from .offer import CODECS as _OFFER_CODECS
from .offer import validate_offer
from .transports import Transport, create_transport

if TYPE_CHECKING:
    from .media_session import CallRecorder, MediaSessions

log = logging.getLogger(__name__)

_POLL_MS = 10  # how long the SIP thread waits in pjsip for network events before running commands
_HANGUP_WAIT_S = 3.0  # shutdown: time for calls to end and un-REGISTERs to be answered
_GATE_SWEEP_S = 10.0  # how often refusals still unreported are looked at (each source: once a minute at most)
_instance_lock = threading.Lock()
_running: Endpoint | None = None


pjsip_log = logging.getLogger("callbot.sip.pjsip")
_PY_LEVELS = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO}
# pjsua2 logs every error it raises as pj.Error at level 1 ("<call>(...) error: <text> (status=N)
# [../src/pjsua2/call.cpp:927]") before throwing it: the exception is our code's to handle (reading a
# stream's statistics once the stream is gone ends every call that way: PJ_EINVAL), so the line is debug
_RAISED_BY_PJSUA2 = re.compile(r"\(status=\d+\) \[[^\]]*pjsua2/\w+\.cpp:\d+\]$")
_RAISED_LEVEL = 5


class _PjLog(pj.LogWriter):
    """pjsip's log lines up to `level`: appended to `path` when given, else to Python's logging
    ("callbot.sip.pjsip"). Called on whichever pjsip thread logs."""

    def __init__(self, level: int, path: str | None):
        super().__init__()
        self.level = level
        self._file = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1) if path else None

    def write(self, entry):
        level, msg = int(entry.level), str(entry.msg).rstrip()
        if _RAISED_BY_PJSUA2.search(msg):
            level = _RAISED_LEVEL
        if level > self.level:
            return
        if self._file is not None:
            if not self._file.closed:  # nothing should log after libDestroy; if it does, it is lost
                self._file.write(msg + "\n")
        else:
            pjsip_log.log(_PY_LEVELS.get(level, logging.DEBUG), "%s", msg)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _quiet_pjlib_until_configured() -> None:
    """pjlib logs its start-up on stdout at levels 4-5 (`pjlib 2.15.1 for POSIX initialized`, each module
    registered) before libInit applies any log setting, and pjsua2 has no setting that comes earlier: so
    pjlib's own pj_log_set_level, which the wheel's module exports, silences it until libInit."""
    try:
        ctypes.CDLL(pj._pjsua2.__file__).pj_log_set_level(ctypes.c_int(0))
    except (OSError, AttributeError):  # a build that hides the symbol: the chatter shows, nothing else
        pass


class _PjEndpoint(pj.Endpoint):
    """pjsua2's endpoint with the one callback we need of it: an INVITE pjsua refused itself, which never
    reaches onIncomingCall (486 when its call slots are full)."""

    def __init__(self, on_refused: Callable[[Any], None]):
        super().__init__()
        self._on_refused = on_refused

    @guarded
    def onRejectedIncomingCall(self, prm):
        self._on_refused(prm)


RECORDS_KEPT = 1000  # CallRecords an Endpoint keeps for inspection; each call's sidecar has its own
# a Call-ID we are asked to use (RFC 3261 25.1 word, '@' word): pjsip sends it as it is
_CALL_ID = re.compile(r"^[A-Za-z0-9.!%*+_'~()-]{1,120}(@[A-Za-z0-9.!%*+_'~()-]{1,120})?$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!%*+.`'~_-]{1,64}$")
_NUMBER = re.compile(r"^\+?[0-9*#]{1,32}$")
_URI = re.compile(r"^(sips?|tel):[^\s<>\"]{1,200}$", re.I)


def caller_identity(caller_id: str | None, name: str | None, account_uri: str | None) -> str:
    """The From (and P-Asserted-Identity) of a call with its own caller ID: `"name" <sip:caller_id@host>`,
    the host the account's (its domain, or its transport's address in direct mode); a caller ID that is a
    URI already is kept as it is. ValueError for anything that is neither a number nor a URI, or a display
    name that would break the header."""
    if caller_id is None:
        if account_uri is None:
            raise ValueError("no account to take the caller ID from")
        uri = account_uri
    elif _URI.match(caller_id):
        uri = caller_id
    elif _NUMBER.match(caller_id):
        if account_uri is None:
            raise ValueError("no account to take the caller ID's host from")
        host = account_uri.split(":", 1)[1].rsplit("@", 1)[-1]
        uri = f"sip:{caller_id}@{host}"
    else:
        raise ValueError(f"caller ID {caller_id!r}: a number (+15551234567) or a sip:/tel: URI")
    if name is None:
        return f"<{uri}>"
    if len(name) > 64 or any(c in name for c in '"\\') or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"caller name {name!r}: at most 64 characters, no quotes, backslashes or control characters")
    return f'"{name}" <{uri}>'


def check_header(name: str, value: str) -> None:
    """ValueError for a header that would not be one header: a name that is not a token, a value with a line
    break in it (it would smuggle headers of its own)."""
    if not _HEADER_NAME.match(name):
        raise ValueError(f"header name {name!r} is not a SIP token")
    if "\r" in value or "\n" in value or len(value) > 1024:
        raise ValueError(f"header {name}: the value has a line break or is over 1024 characters")


class Endpoint:
    """A SIP user agent answering and placing calls for the accounts in `config`.

    `sessions` (optional, sip/media_session.py's MediaSessions; the app's CallRouter) provides
    `open_session(record)` / `close_session(session, record)`: each call with active audio gets a
    session and a media port bound to its rings; without one calls are silent. `recorder` (optional,
    a CallRecorder: the app's Recorder) records every
    call with media (stereo WAV + sidecar from the call's CallRecord). Neither is owned: close them
    after `stop()`. `screen` (optional; the app's call routes) sees each INVITE that passed the
    endpoint's own checks, as its CallRecord (Request-URI, called, caller, kept headers), on the SIP
    thread before it is answered: None lets it through, (code, reason) refuses it with that final
    answer, (code, reason, retry_after_s) adds a Retry-After header (an overloaded model: 503); it may
    set `record.labels`. An exception it raises refuses that INVITE with 500. `on_event` (optional; the
    app's bus publish) gets every event on the thread that emits it, before it is queued on `events`: the
    SIP thread's events then come before whatever they cause elsewhere (a call's IncomingCall before the
    flow that its audio starts), which a consumer of `events` on another thread cannot promise. It must
    not wait; an exception it raises is logged and the event is still queued.
    """

    def __init__(self, config: EndpointConfig | None = None, sessions: MediaSessions | None = None,
                 recorder: CallRecorder | None = None,
                 screen: Callable[[CallRecord], tuple[int, str] | tuple[int, str, int] | None] | None = None,
                 on_event: Callable[[Event], None] | None = None):
        self.config = config or EndpointConfig()
        self.sessions = sessions
        self.recorder = recorder
        self.screen = screen
        self.on_event = on_event
        self._attach_media = None
        self._media_clock = None  # (make realtime, undo) when calls have media ports
        # what pjmedia's clock thread got when its first frame made it real-time (None until then)
        self.media_clock_realtime = None
        if sessions is not None:
            # only calls whose audio is served need media ports (and the compiled PCM helper behind them)
            from .media_port import attach_media, leave_media_clock_alone, make_media_clock_realtime

            self._attach_media = attach_media
            self._media_clock = (make_media_clock_realtime, leave_media_clock_alone)
        self.events: queue.Queue[Event] = queue.Queue()
        self._history: collections.deque[Event] = collections.deque(maxlen=10_000)
        self._history_cond = threading.Condition()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._timers: list = []
        self._timer_seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()
        self._startup_error: BaseException | None = None
        self._closing = False
        self._ep: pj.Endpoint | None = None
        self._log_writer: _PjLog | None = None
        self.transports: dict[str, Transport] = {}
        self._accounts: dict[str, SipAccount] = {}  # pjsua2 objects: never handed out
        self._uris: dict[str, str] = {}
        self._calls: dict[str, SipCall] = {}
        self._rejected: list[SipCall] = []  # answered with an error, kept alive until DISCONNECTED
        # the last RECORDS_KEPT calls seen, by SIP Call-ID, ended and rejected ones included (a server runs
        # for months: an unbounded dict would grow with every INVITE, a flood of them faster)
        self.records: dict[str, CallRecord] = {}
        self.codecs: list[str] = []
        self._accepted: tuple[str, ...] = ()
        self._protected_ports: frozenset[int] = frozenset()
        self._local_hosts: frozenset[str] = frozenset()
        self._gate: Gate | None = None  # our pjsip module in front of pjsua (sip/gate.py), once started

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 15.0) -> Endpoint:
        """Create pjsua2, the transports and accounts on the SIP thread; errors come back raised here."""
        global _running
        if self._thread is not None:
            raise RuntimeError("an Endpoint starts once; create a new one to start again")
        with _instance_lock:
            if _running is not None:
                raise RuntimeError("a callbot Endpoint is already running in this process (pjsip allows one)")
            _running = self
        self._thread = threading.Thread(target=self._main, name="callbot-sip", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"SIP endpoint did not start within {timeout} s")
        if self._startup_error is not None:
            self._thread.join(timeout)
            raise self._startup_error
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Hang up every call, unregister, destroy pjsua2. Idempotent; safe from any thread but the SIP one."""
        if self._thread is None:
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("stop() waits for the SIP thread: call it from another thread, not a callback")
        self._stop_requested.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"SIP endpoint did not stop within {timeout} s")

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def run_until_signal(self) -> int:
        """Serve until SIGTERM or SIGINT, then shut down cleanly; returns the exit status (0)."""
        done = threading.Event()

        def on_signal(signum, _frame):
            log.info("signal %d: shutting down", signum)
            done.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if not self.running:
                self.start()
            # short waits: Python runs signal handlers in the main thread between bytecodes only
            while not done.wait(0.2) and self._thread.is_alive():
                pass
        finally:
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)
        return 0

    # ---------------------------------------------------------------- public operations (thread-safe)

    def dial(self, uri: str, account: str | None = None, timeout_s: float | None = None, *,
             call_id: str | None = None, caller_id: str | None = None, caller_name: str | None = None,
             headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
             labels: dict[str, str] | None = None) -> str:
        """Place a call to `uri` from `account` (default: the first); returns its SIP Call-ID.

        Progress arrives as CallProgress events; unanswered after `timeout_s` (default: the
        configured dial_timeout_s) the call is cancelled and ends with cause "timeout".

        Per call, without touching the account: `call_id` is the INVITE's Call-ID (one the caller chose,
        so it can tell the app about the call before the INVITE leaves: a callee that answers at once
        finds it ready); `caller_id` (a number or a SIP URI) and `caller_name` make the From (user and
        display name) and a P-Asserted-Identity with the same identity; `headers` are added to the
        INVITE as they are; `labels` are on the call's record before any answer can be handled.

        Why pjsua's per-request local URI (SipTxOption.localUri, pjsua_msg_data.local_uri) and not an
        account per caller ID: the call keeps the account's registration, transport, proxy and digest
        credentials (a trunk's 401/407 challenge is answered as for any call of the account), and a
        caller ID is one string, not a pjsua2 Account to create, keep and destroy for every number.
        """
        for name, value in headers:
            check_header(name, value)
        identity = (caller_id, caller_name) if caller_id is not None or caller_name is not None else None
        return self._submit(lambda: self._dial(uri, account, timeout_s, call_id=call_id, identity=identity,
                                               headers=tuple(headers), labels=labels))

    def answer(self, call_id: str, code: int = 200) -> None:
        def op():
            call = self._call(call_id)
            call.answer(call_op(code)) if code != 200 else call.answer_now()
        self._submit(op)

    def hangup(self, call_id: str, code: int = 0) -> None:
        self._submit(lambda: self._call(call_id).end("local", code))

    def send_dtmf(self, call_id: str, digits: str, method: str = "rfc4733") -> None:
        if method not in ("rfc4733", "info"):
            raise ValueError(f"DTMF method {method!r} must be 'rfc4733' or 'info'")
        if not digits or any(d not in "0123456789*#ABCDabcd" for d in digits):
            raise ValueError(f"DTMF digits {digits!r} must be non-empty and among 0-9 * # A-D")
        self._submit(lambda: self._call(call_id).send_digits(digits, method))

    def transfer(self, call_id: str, target: str) -> None:
        """Blind transfer (REFER) to `target`; TransferProgress events follow, the call ends on success."""
        self._submit(lambda: self._call(call_id).blind_transfer(target))

    def transfer_attended(self, call_id: str, target: str, *, account: str | None = None,
                          answer_timeout_s: float | None = None, refer_after_s: float | None = 0.0,
                          labels: dict[str, str] | None = None) -> str:
        """Attended (consultative) transfer of `call_id` to `target`; returns the consultation leg's Call-ID.

        The target is dialled as a call of ours (from `account`, default the call's own) with `labels` on
        its record before its audio comes up (the app's: how it knows what the leg is for). Answered, and
        `refer_after_s` later (0: at once; None: only at `complete_transfer`), the caller gets a REFER with
        Replaces: its UA calls the target with an INVITE that replaces our consultation leg, the target
        drops that leg, and the call ends with cause "transfer" on the caller's NOTIFY 200.

        TransferProgress events for `call_id` follow it: the leg's provisional answers (180), then the
        REFER's NOTIFYs. A leg that fails (busy, declined, unanswered within `answer_timeout_s` (default
        dial_timeout_s): 408, hung up before the REFER: 480) ends in a final TransferProgress with that code,
        and the call goes on; so does a REFER the caller refuses (its code), and the leg is then hung up.
        """
        return self._submit(lambda: self._transfer_attended(call_id, target, account, answer_timeout_s,
                                                            refer_after_s, labels))

    def complete_transfer(self, call_id: str) -> bool:
        """The REFER with Replaces of `call_id`'s attended transfer, now (its leg answered: after an
        announcement to the target). False when there is nothing to send: it went already, or the transfer
        failed or was cancelled. ValueError while the leg still rings, or when the call is gone."""
        def op() -> bool:
            call = self._call(call_id)
            leg = call._consultation()
            if leg is None or leg.referred:
                return False
            leg.refer_replacing()
            return leg.referred
        return self._submit(op)

    def cancel_transfer(self, call_id: str) -> bool:
        """Drops `call_id`'s attended transfer before its REFER: the consultation leg is hung up and no
        TransferProgress follows (whoever cancels knows); False when there is none or its REFER went."""
        def op() -> bool:
            call = self._calls.get(call_id)
            leg = call._consultation() if call is not None else None
            if leg is None or leg.referred:
                return False
            call.consult_id = None  # so the leg's end reports nothing
            if call.record.transfer is not None:
                call.record.transfer.succeeded = False
                call.record.changed()
            leg.end("local")
            return True
        return self._submit(op)

    def calls(self) -> list[str]:
        return self._submit(lambda: [cid for cid, c in self._calls.items() if not c.ended])

    def media_stats(self, call_id: str) -> dict | None:
        """The media port's counters for an active call (frames, underruns), None when no port is attached."""
        def read():
            att = self._call(call_id).attachment
            return dict(att.stats) if att is not None else None
        return self._submit(read)

    @property
    def accounts(self) -> dict[str, AccountState]:
        """Each account's state now, by name (plain data: safe to keep)."""
        def snapshot() -> dict[str, AccountState]:
            return {name: AccountState(name=name, uri=a.uri, direct=a.cfg.direct, registered=a.registered,
                                       last_error=a.last_error) for name, a in self._accounts.items()}
        # read on the SIP thread: a pjsua2 object must never have its last reference elsewhere
        return self._submit(snapshot) if self.running else {}

    def account_uri(self, name: str | None = None) -> str:
        """Where the account is reached: sip:<user>@<host>:<port> for a direct one, its AOR otherwise."""
        if name is None:
            return next(iter(self._uris.values()))
        try:
            return self._uris[name]
        except KeyError:
            raise ValueError(f"no account {name!r}; accounts are {list(self._uris)}") from None

    def wait_for(self, kind: type[Event], timeout: float = 10.0, after: float = 0.0, **fields) -> Event:
        """The first event of `kind` in the history, stamped after `after`, whose fields equal `fields`."""
        deadline = time.monotonic() + timeout
        with self._history_cond:
            while True:
                for ev in self._history:
                    if (isinstance(ev, kind) and ev.at >= after
                            and all(getattr(ev, k) == v for k, v in fields.items())):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {kind.__name__} {fields} within {timeout} s")
                self._history_cond.wait(left)

    def history(self, kind: type[Event] = Event) -> list[Event]:
        with self._history_cond:
            return [e for e in self._history if isinstance(e, kind)]

    # ---------------------------------------------------------------- SIP thread

    def _main(self) -> None:
        try:
            self._boot()
        except BaseException as exc:  # reported to start(); pjsua2 is torn down again
            # the traceback's frames hold pjsua2 objects (the pj.Endpoint itself): a pj.Endpoint that
            # outlives libDestroy makes the next pj.Endpoint() abort the process, so drop them
            exc.__traceback__ = exc.__context__ = exc.__cause__ = None
            self._startup_error = exc
            del exc
            self._teardown()
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop_requested.is_set():
                self._ep.libHandleEvents(_POLL_MS)
                self._run_pending()
        except BaseException:
            log.exception("SIP thread failed; shutting down")
        finally:
            self._shutdown()

    def _boot(self) -> None:
        cfg = self.config
        self._ep = _PjEndpoint(self._refused_by_pjsip)
        _quiet_pjlib_until_configured()
        self._ep.libCreate()
        ec = pj.EpConfig()
        ec.uaConfig.threadCnt = 0  # no pjsua worker: this thread polls, so callbacks come here
        ec.uaConfig.mainThreadOnly = False
        ec.uaConfig.maxCalls = WHEEL_MAX_CALLS  # our own capacity check answers 486 below it
        ec.uaConfig.userAgent = cfg.user_agent
        self._log_writer = _PjLog(cfg.log_level, cfg.log_file)
        ec.logConfig.writer = self._log_writer
        ec.logConfig.level = ec.logConfig.consoleLevel = cfg.log_level
        ec.medConfig.clockRate = cfg.conference_clock_rate
        # the null device's clock drives the conference bridge and with it every stream's sending side
        # (RFC 4733 digits included): pjsua would stop it after 1 s with no port connected
        ec.medConfig.sndAutoCloseTime = -1
        # RTP flows without pause (no silence suppression): peers, and our RTP timeout, read a pause as a
        # dead line
        ec.medConfig.noVad = True
        self._ep.libInit(ec)
        self._ep.audDevManager().setNullDev()
        for tcfg in cfg.transports:
            self.transports[tcfg.name] = create_transport(self._ep, tcfg)
        self._ep.libStart()
        if self._media_clock is not None:
            self._media_clock[0](lambda result: setattr(self, "media_clock_realtime", result))
        self.codecs = apply_codec_priorities(self._ep, cfg.codecs)
        names = [c.split("/", 1)[0].upper() for c in self.codecs]
        self._accepted = tuple(n for n in dict.fromkeys(names) if n in _OFFER_CODECS)
        self._protected_ports = frozenset({t.port for t in self.transports.values()} | set(cfg.protected_ports))
        self._local_hosts = frozenset(h for t in cfg.transports
                                      for h in (t.bind, t.public_address, t.rtp_bind, t.rtp_public_address)
                                      if h and h not in ("0.0.0.0", "::"))
        for acfg in cfg.accounts:
            acc = SipAccount(self, acfg, self.transports[cfg.transport_of(acfg).name])
            acc.create(acc.pj_config(), True)
            self._accounts[acfg.name] = acc
            self._uris[acfg.name] = acc.uri
        if cfg.admission.gate:
            self._gate = Gate(self)
            if self._gate.install():
                self._after(_GATE_SWEEP_S, self._sweep_gate)

    def _run_pending(self) -> None:
        self._run_commands()
        now = time.monotonic()
        ran = False
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            ran = True
            try:
                fn()
            except Exception:
                log.exception("timer failed")
        if ran:
            # what a timer queued runs before pjsip polls again: a call a timer ended (the ACK timeout drops
            # its session at once) is dropped before pjsua can give its slot to a new INVITE, which the old
            # Call object's destructor would otherwise hang up
            self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                fn()
            except Exception:  # one failed action must not end the endpoint and every other call
                log.exception("SIP thread action failed")

    def _shutdown(self) -> None:
        self._closing = True
        try:
            self._end_calls_and_unregister()
        except BaseException:
            log.exception("shutdown: hanging up / unregistering failed; destroying anyway")
        self._teardown()
        self._emit(EndpointStopped(at=time.monotonic()))

    # Every helper below keeps its pjsua2 references in its own frame: a loop variable still holding a
    # Call or Account when libDestroy runs would be destroyed after it and abort the process
    # (pjsua_call_set_user_data asserts).

    def _end_calls_and_unregister(self) -> None:
        for call in list(self._calls.values()):
            call.end("shutdown")
        self._pump_until(lambda: not self._calls and not self._rejected)
        registered = [a for a in self._accounts.values() if a.registered]
        for acc in registered:
            try:
                acc.setRegistration(False)
            except pj.Error as exc:
                log.warning("unregister %s: %s", acc.name, exc.info())
        self._pump_until(lambda: not any(a.registered for a in registered))

    def _pump_until(self, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _HANGUP_WAIT_S
        while not done() and time.monotonic() < deadline:
            self._ep.libHandleEvents(_POLL_MS)
            self._run_pending()

    def _drop_pjsua_objects(self) -> None:
        for call in list(self._calls.values()) + self._rejected:
            call._detach()
        self._calls.clear()
        self._rejected.clear()
        self._timers.clear()
        while True:  # commands queued after the loop stopped hold references too
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                break
            fut = getattr(fn, "future", None)
            if fut is not None:
                fut.cancel()
        for acc in self._accounts.values():
            try:
                acc.shutdown()
            except pj.Error:
                pass
        self._accounts.clear()

    def _teardown(self) -> None:
        global _running
        if self._media_clock is not None:
            self._media_clock[1]()
        self._drop_pjsua_objects()
        forget_printed_errors()  # a traceback printed by pjsua2 may hold a Call (sip/callbacks.py)
        gc.collect()
        if self._gate is not None:
            self._gate.uninstall()  # kept referenced: pjsip held pointers into it until now
        if self._ep is not None:
            try:
                self._ep.libDestroy()
            except pj.Error as exc:
                log.error("libDestroy: %s", exc.info())
            self._ep = None
            gc.collect()
        if self._log_writer is not None:
            self._log_writer.close()
        self._log_writer = None
        with _instance_lock:
            if _running is self:
                _running = None

    # ---- helpers run on the SIP thread

    def _submit(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        if not self.running:
            raise RuntimeError("the SIP endpoint is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
        run.future = fut  # so that shutdown can cancel what it will never run
        self._commands.put(run)
        try:
            return fut.result(timeout)
        except concurrent.futures.CancelledError:
            raise RuntimeError("the SIP endpoint stopped before running the request") from None

    def _soon(self, fn: Callable[[], Any]) -> None:
        self._commands.put(fn)

    def _after(self, delay_s: float, fn: Callable[[], Any]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._timer_seq), fn))

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("SIP endpoint: the event sink failed on %s", type(event).__name__)
        self.events.put(event)
        with self._history_cond:
            self._history.append(event)
            self._history_cond.notify_all()

    def _account(self, name: str | None) -> SipAccount:
        if name is None:
            return next(iter(self._accounts.values()))
        try:
            return self._accounts[name]
        except KeyError:
            raise ValueError(f"no account {name!r}; accounts are {list(self._accounts)}") from None

    def _call(self, call_id: str) -> SipCall:
        call = self._calls.get(call_id)
        if call is None or call.ended:
            raise ValueError(f"no active call {call_id!r}")
        return call

    def _active(self) -> int:
        return sum(not c.ended for c in self._calls.values())

    def _forget(self, call: SipCall) -> None:
        call._detach()
        if call.record is not None:
            self._calls.pop(call.record.call_id, None)
        if call in self._rejected:
            self._rejected.remove(call)

    def _dial(self, uri: str, account: str | None, timeout_s: float | None, call_id: str | None = None,
              identity: tuple[str | None, str | None] | None = None, headers: tuple[tuple[str, str], ...] = (),
              labels: dict[str, str] | None = None) -> str:
        acc = self._account(account)
        from_uri = None
        if identity is not None:
            from_uri = caller_identity(*identity, acc.uri)
            headers = (("P-Asserted-Identity", from_uri), *headers)
        call = self._place(uri, acc, timeout_s, call_id=call_id, from_uri=from_uri, headers=headers)
        # on the SIP thread, in the same step as the INVITE: no answer is handled before the labels are there
        call.record.labels.update(labels or {})
        return call.call_id

    def _transfer_attended(self, call_id: str, target: str, account: str | None, answer_timeout_s: float | None,
                           refer_after_s: float | None, labels: dict[str, str] | None) -> str:
        call = self._call(call_id)
        if call.transfer_of is not None:
            raise ValueError(f"call {call_id!r} is itself the consultation leg of a transfer")
        if not call.confirmed:
            raise ValueError(f"call {call_id!r} is not answered yet: nothing to transfer")
        leg = self._calls.get(call.consult_id) if call.consult_id is not None else None
        if leg is not None and not leg.ended:
            raise ValueError(f"call {call_id!r} is already being transferred (to {leg.record.remote_uri})")
        if refer_after_s is not None and not 0 <= refer_after_s <= 3600:
            raise ValueError(f"refer_after_s must be within 0..3600 s, got {refer_after_s}")
        leg = self._place(target, self._account(account) if account is not None else call.account, answer_timeout_s)
        leg.record.labels.update(labels or {})
        leg.transfer_of, leg.refer_after_s = call_id, refer_after_s
        call.consult_id = leg.call_id
        call.record.transfer = TransferRecord(target=target)
        call.record.changed()
        log.info("call %s: attended transfer to %s, consultation leg %s", call_id, target, leg.call_id)
        return leg.call_id

    def _place(self, uri: str, acc: SipAccount, timeout_s: float | None, call_id: str | None = None,
               from_uri: str | None = None, headers: tuple[tuple[str, str], ...] = ()) -> SipCall:
        if self._closing:
            raise RuntimeError("the SIP endpoint is shutting down")
        if self._active() >= self.config.max_calls:
            raise RuntimeError(f"at capacity: {self.config.max_calls} calls already up")
        if self._ep.utilVerifySipUri(uri) != 0:
            raise ValueError(f"{uri!r} is not a valid SIP URI")
        if call_id is not None and (call_id in self._calls or not _CALL_ID.match(call_id)):
            raise ValueError(f"Call-ID {call_id!r} is in use or not a Call-ID (word characters, . - ! % * + ' ~ @)")
        op = call_op(headers=headers)
        if call_id is not None:
            op.opt.customCallId = call_id
        if from_uri is not None:
            op.txOption.localUri = from_uri
        call = SipCall(self, acc, OUTBOUND)
        try:
            call.makeCall(uri, op)
        except pj.Error as exc:
            info = exc.info()
            del call  # not in the traceback the caller's thread gets: Calls die on this thread
            raise ValueError(f"cannot call {uri!r} from account {acc.name!r}: {info}") from None
        rec = call.init_record()
        self._calls[rec.call_id] = call
        self._keep_record(rec)
        limit = self.config.dial_timeout_s if timeout_s is None else timeout_s
        call.dial_limit_s = limit
        self._after(limit, weakly(call, "_dial_timeout"))
        return call

    def _keep_record(self, rec: CallRecord) -> None:
        self.records[rec.call_id] = rec
        while len(self.records) > RECORDS_KEPT:
            del self.records[next(iter(self.records))]  # the oldest (dicts keep insertion order)

    def _offer_problem(self, sdp: str) -> str | None:
        """Why an SDP offer (first INVITE, re-INVITE, UPDATE) cannot be answered, or None."""
        if not self._accepted:
            return None
        return validate_offer(sdp, self._accepted, protected=self._protected_ports, local_hosts=self._local_hosts)

    def admission_stats(self) -> dict:
        """What the gate in front of pjsua refused since start, by reason (sip/admission.py), and whether it
        runs: {"active": bool, "refused": {reason: n}, "admitted": n, "sources": n}."""
        return self._submit(lambda: self._gate.stats() if self._gate is not None else {"active": False})

    def _source_report(self, report: adm.Report) -> None:
        """A source's refusals (sip/admission.py Report): one log line and one SourceRefused event."""
        event = report_event(report, self.config.admission)
        floods = {adm.RATE, adm.BLOCKED, adm.OVERLOAD, adm.UNACKED, adm.UNTRUSTED}
        log.log(logging.WARNING if floods.intersection(report.counts) else logging.INFO, "%s", event.message)
        self._emit(event)

    def _sweep_gate(self) -> None:
        if self._gate is not None and self._gate.active:
            self._gate.sweep()
            self._after(_GATE_SWEEP_S, self._sweep_gate)

    def _terminate(self, call: SipCall, code: int) -> bool:
        """Drops an inbound call's INVITE session at once, no BYE (sip/gate.py terminate); False if it cannot."""
        if self._gate is None or not (call.local_tag and call.remote_tag):
            return False
        try:
            call_id = str(call.getInfo().callIdString)  # as pjsip keeps it (the record's is escaped)
        except pj.Error:
            return False
        return self._gate.terminate(call_id, call.local_tag, call.remote_tag, code)

    def _drop_if_lingering(self, call: SipCall, code: int) -> None:
        """After our BYE: if pjsip still has the call's INVITE session `bye_timeout_s` later (the BYE is
        unanswered: the peer is gone), drop it (sip/gate.py terminate), which frees pjsua's call slot that
        the BYE's 32 s of retransmissions would otherwise hold. Inbound calls only (the tags we know)."""
        if self._gate is None or not (call.local_tag and call.remote_tag):
            return
        try:
            call_id = str(call.getInfo().callIdString)
        except pj.Error:
            return
        tags, shown = (call.local_tag, call.remote_tag), call.call_id

        def drop() -> None:
            if self._gate is not None and self._gate.terminate(call_id, *tags, code):
                log.info("call %s: no answer to our BYE within %.1f s, its session dropped", shown,
                         self.config.admission.bye_timeout_s)
        self._after(self.config.admission.bye_timeout_s, drop)

    def _unacked(self, call: SipCall) -> None:
        """An INVITE we answered was never ACKed (sip/call.py hangs it up): counted against its source."""
        if self._gate is None or call.source is None:
            return
        host = call.source.rpartition(":")[0].strip("[]") or call.source
        now = time.monotonic()
        a = self._gate.admission
        if a.unacked(host, now):
            log.warning("SIP source %s blocked for %.0f s: %d answered INVITEs never ACKed within %.0f s", host,
                        a.cfg.block_s, a.cfg.unacked_limit, a.cfg.unacked_window_s)
        report = a.refused(host, adm.UNACKED, now)
        if report is not None:
            self._source_report(report)

    def _refused_by_pjsip(self, prm) -> None:
        """An INVITE pjsua answered with an error on its own (SIP thread): a CallRejected like ours, so that
        the log and the metrics see it too."""
        code, local = int(prm.statusCode), peer_text(str(prm.localInfo))
        user = local.partition(":")[2].partition("@")[0]
        account = next((name for name, acc in self._accounts.items() if acc.cfg.user == user), "")
        why = f"all {WHEEL_MAX_CALLS} call slots taken" if code == 486 else "its own checks"
        self._emit(CallRejected(at=time.monotonic(), account=account, remote_uri=peer_text(str(prm.remoteInfo)),
                                code=code, reason=f"refused by pjsip ({why}): {peer_text(str(prm.reason))}",
                                by="pjsip"))

    def _incoming_call(self, acc: SipAccount, prm) -> None:
        call = SipCall(self, acc, INBOUND, prm.callId)
        rec = call.init_record()
        if rec.call_id in self._calls:  # a call to ourselves: both legs share the SIP Call-ID
            rec.call_id += "~inbound"
        self._keep_record(rec)
        msg = str(prm.rdata.wholeMsg)
        rec.fill_from_invite(msg)
        _, _, body = msg.partition("\r\n\r\n")
        reason = self._offer_problem(body)
        source = str(prm.rdata.srcAddress)
        call.source = source
        call.remote_tag = dialog_tags(msg)[0]
        code, retry_after = 0, None
        if not acc.trusts(source):
            code, text = 403, "Forbidden"
            reason = f"INVITE for registered account {acc.name!r} from {source}, not from its registrar"
            log.warning("%s", reason)
        elif reason is not None:
            code, text = 488, "Not Acceptable Here"
            log.info("INVITE %s from %s rejected: %s", rec.call_id, rec.remote_uri, reason)
        elif not body.strip() and not acc.accepts_late_offer:
            code, text = 488, "Not Acceptable Here"
            reason = f"INVITE without an SDP offer (late offer) for account {acc.name!r} (accept_late_offer)"
            log.info("INVITE %s from %s rejected: %s", rec.call_id, rec.remote_uri, reason)
        elif self._closing:
            code, text = 503, "Service Unavailable"
        elif self._active() >= self.config.max_calls:
            code, text = 486, "Busy Here"
        elif self.screen is not None:
            code, text, reason, retry_after = self._screen(rec)
        if code:
            self._rejected.append(call)
            call.ended = call.rejected = True  # never counted, never attached
            rec.end, rec.hangup_cause, rec.hangup_code, rec.hangup_reason = time.time(), "rejected", code, text
            self._emit(CallRejected(at=time.monotonic(), account=acc.name, remote_uri=rec.remote_uri,
                                    code=code, reason=reason or text))
            # answered from the loop, not inside onIncomingCall: a refused INVITE without an offer is torn
            # down at once, and pjsua2 then frees the INVITE's copy a second time when the callback returns
            # (pjsip_rx_data_free_cloned asserts: the process aborts)
            self._soon(lambda: _refuse(call, code, text, retry_after))
            return
        self._calls[rec.call_id] = call
        self._emit(IncomingCall(at=time.monotonic(), call_id=rec.call_id, account=acc.name,
                                remote_uri=rec.remote_uri, local_uri=rec.local_uri))
        if not acc.cfg.auto_answer:
            call.answer(call_op(180))
        elif acc.cfg.ring_delay_s > 0:
            call.answer(call_op(180))
            self._after(acc.cfg.ring_delay_s, weakly(call, "answer_now"))
        else:
            call.answer_now()

    def _screen(self, rec: CallRecord) -> tuple[int, str, str | None, int | None]:
        """(code, reason phrase, why, Retry-After s) from the app's screen of an INVITE; code 0 lets it
        through."""
        try:
            verdict = self.screen(rec)
            if verdict is None:
                return 0, "", None, None
            code, text, *rest = verdict
            code, text = int(code), _phrase(str(text))
            retry_after = int(rest[0]) if rest and rest[0] is not None else None
            if not 300 <= code <= 699:
                raise ValueError(f"a refusal needs a final error code (300-699), got {code}")
            if len(rest) > 1 or (retry_after is not None and not 0 <= retry_after <= 86400):
                raise ValueError(f"a refusal is (code, reason[, retry_after_s 0..86400]), got {verdict!r}")
        except Exception:  # one INVITE the app cannot judge is refused; the endpoint and its calls go on
            # the traceback as text, not exc_info: a log record kept with the traceback (a handler that
            # buffers, pytest's caplog) would keep its frames, _incoming_call's Call among them, alive past
            # libDestroy, and the process aborts when it goes (sip/callbacks.py)
            log.error("INVITE %s from %s: the call screen failed; refused with 500\n%s", rec.call_id,
                      rec.remote_uri, traceback.format_exc().rstrip())
            return 500, "Server Internal Error", "the call screen failed (see the log)", None
        log.info("INVITE %s from %s to %r refused: %d %s", rec.call_id, rec.remote_uri, rec.called, code, text)
        return code, text, text, retry_after


_NOT_PHRASE = re.compile(r"[\x00-\x1f\x7f]+")


def _phrase(text: str) -> str:
    """A SIP reason phrase: one line (a CR or LF would end the status line and start headers of its own)."""
    return _NOT_PHRASE.sub(" ", peer_text(text)).strip()[:128]


def _refuse(call: SipCall, code: int, text: str = "", retry_after: int | None = None) -> None:
    try:
        call.answer(call_op(code, text, (("Retry-After", str(retry_after)),) if retry_after is not None else ()))
    except pj.Error as exc:  # gone meanwhile (a CANCEL): its DISCONNECTED callback still comes
        log.debug("refusing %s: %s", call.record.call_id if call.record else "?", exc.info())


def main(argv: list[str] | None = None) -> int:
    """Run one direct-mode endpoint until SIGTERM/SIGINT (`python -m callbot.sip.endpoint`).

    Prints "listening <uri>" once it can be called; useful by hand and for tests that signal a process.
    """
    import argparse

    from .config import AccountConfig, TransportConfig

    p = argparse.ArgumentParser(prog="python -m callbot.sip.endpoint")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5060)
    p.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    p.add_argument("--user", default="callbot")
    p.add_argument("--max-calls", type=int, default=WHEEL_MAX_CALLS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = EndpointConfig(transports=(TransportConfig(kind=args.transport, bind=args.bind, port=args.port),),
                         accounts=(AccountConfig(user=args.user),), max_calls=args.max_calls)
    ep = Endpoint(cfg).start()
    print("listening", ep.account_uri(), flush=True)
    return ep.run_until_signal()


if __name__ == "__main__":
    import sys

    sys.exit(main())
