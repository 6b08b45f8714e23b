"""`callbot campaign run LIST.csv --campaign campaign.toml`: the dialer of an outbound campaign.

One serve-like process (app/serve.py's running_server: the engine, the recorder, the event bus, the call
store's writer when it is on) dials the rows the scheduler (campaigns/scheduler.py) hands out, through
one SIP endpoint. For each attempt: the state file gets `dialing` before the INVITE leaves
(campaigns/state.py, the restart rule) with the Call-ID the dialer chose for it, the row's variables go
to the bot (CallRouter.expect) under that Call-ID, and the INVITE leaves with it (Endpoint.dial call_id=,
the campaign's caller_id/caller_name as From and P-Asserted-Identity, the record's labels: campaign, row,
attempt, there before any answer is handled). So a callee that answers at once finds everything ready.
On a restart, an attempt the killed dialer left open is looked up by that Call-ID (CallLookup: the call
store, else the call's JSON record): answered, it gets its disposition; otherwise it stays interrupted.

Answering-machine detection: when a call's audio comes up, the bot is held silent (HoldBot: the model
hears the callee, its own audio is forced silent; [amd] hold_bot = false lets it greet at once and holds
it only on a machine verdict; the verdict lifts only the campaign's hold, never a flow's: HoldVotes) and the callee's leg goes, as the recorder drains it
every 100 ms, to an AmdDetector (campaigns/amd.py). Human or unknown: the bot is released and talks. A
machine: the call is hung up, or (on_machine = "message") the dialer waits for the beep (at most
beep_wait_ms), plays the message (a WAV, or espeak-ng's reading of message_text) and hangs up when it
has been played.

Dispositions: answered-human, answered-machine, busy (486/600), no-answer (dial timeout, 408/480 after
the callee was reached), failed (any other code: the report keeps it; no SIP response at all), refused-by-admission (our own endpoint or engine had no room: not
counted as an attempt), do-not-call, outside-window, interrupted (see the restart rule).

Control: SIGUSR1 pauses (no new dials; calls up go on), SIGUSR2 resumes, SIGTERM/SIGINT stop (no new
dials, the calls up end by themselves; a second one hangs them up); or the words pause / resume / stop
written into --control FILE. A progress line on stderr (counts by outcome), and --report FILE (.csv or
.json) at the end: every attempt with its row's target and variables.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from callbot.app.event_bus import call_id_of
from callbot.app.settings import ConfigError, Settings
from callbot.campaigns import scheduler as sch
from callbot.campaigns.amd import MACHINE, AmdDetector
from callbot.campaigns.config import Campaign, CampaignError, load_campaign
from callbot.campaigns.contacts import Contact, load_contacts, load_dnc
from callbot.campaigns.state import Attempt, CampaignState, state_path
from callbot.engine.contract import FlowTransition, PlayFinished
from callbot.sip import events as ev
from callbot.store.export import safe_cell

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 1
MESSAGE_ID = "campaign-message"
PROGRESS_S = 1.0
STOP_GRACE_S = 30.0
TRUNK_REFUSED = (401, 403, 407)  # the trunk will not take our calls: credentials, caller ID, account
STATE_RETRY_S = 2.0  # a state file that refused a write is tried again this often (no new call meanwhile)
TRUNK_REFUSALS = 3  # in a row: the campaign stops instead of burning through its list  # after a stop, calls still up this long are hung up


@dataclass
class Live:
    """One attempt in progress."""

    attempt: Attempt
    contact: Contact
    call_id: str | None = None
    answered: bool = False
    responded: bool = False  # a provisional response came back (100 Trying, 180 Ringing): someone is there
    code: int | None = None
    reason: str = ""
    detector: AmdDetector | None = None
    verdict_seen: bool = False
    beep_deadline: float | None = None  # monotonic s
    message_sent: bool = False
    hangup_sent: bool = False
    answered_mono: float | None = None
    machine: bool = False
    amd: str | None = None
    amd_ms: float | None = None
    beep_ms: float | None = None


class AmdTap:
    """The Recorder's caller listener in front of the one it had (the caller recognizer, or none): each
    campaign call's callee leg goes to its AmdDetector; the recognizer still gets every call."""

    def __init__(self, recorder: Any, inner: Any, campaign: Campaign, wake: Callable[[], None]):
        self.recorder = recorder
        self.inner = inner
        self.campaign = campaign
        self.wake = wake
        self.lock = threading.Lock()
        self.detectors: dict[str, AmdDetector] = {}
        self.wanted: set[str] = set()

    def opened(self, record: Any, rate: int) -> None:
        call_id = record.call_id
        with self.lock:
            if _ours(record, self.wanted):
                amd = self.campaign.amd
                self.detectors[call_id] = AmdDetector(amd, rate, listen_for_beep=(
                    amd.on_machine == "message" and amd.wait_for_beep))
        if self.inner is not None:
            self.inner.opened(record, rate)

    def heard(self, call_id: str, samples: np.ndarray) -> None:
        with self.lock:
            d = self.detectors.get(call_id)
            if d is not None and not d.done:
                before = (d.verdict, d.beep_done)
                d.feed(samples)
                if (d.verdict, d.beep_done) != before:
                    self.wake()
        if self.inner is not None:
            self.inner.heard(call_id, samples)

    def closed(self, call_id: str) -> None:
        with self.lock:
            self.detectors.pop(call_id, None)
        if self.inner is not None:
            self.inner.closed(call_id)
        else:
            self.recorder.transcript_done(call_id)

    def detector(self, call_id: str) -> AmdDetector | None:
        with self.lock:
            return self.detectors.get(call_id)


def _ours(record: Any, wanted: set[str]) -> bool:
    """A campaign call: one we dialled (its Call-ID is ours and in `wanted` before its INVITE leaves)."""
    return record.call_id in wanted


class HoldVotes:
    """The bot of one campaign call is held while the campaign holds it (until the verdict; on a machine)
    or anyone else does (the call's flow: its states without a persona). The engine has one HoldBot switch
    per call; each holder setting it alone would let the verdict's release undo a flow's hold (the bot
    talking over a flow's menu), so the switch gets the OR of both."""

    def __init__(self, send: Callable[[bool], None]):
        self.send = send
        self.lock = threading.Lock()
        self.campaign = False
        self.others = False

    def set_campaign(self, on: bool) -> None:
        with self.lock:
            self.campaign = bool(on)
            self.send(self.campaign or self.others)

    def set_others(self, on: bool = True) -> None:
        with self.lock:
            self.others = bool(on)
            self.send(self.campaign or self.others)


class CampaignHolds:
    """A CallRouter watcher, first in line (before the flow host sees the call): each campaign call's
    LiveCall.hold_bot goes through its HoldVotes from then on (the flow's own holds are votes), and, with
    [amd] hold_bot, the campaign holds the bot from its first frame until the verdict (SIP thread)."""

    def __init__(self, wanted: set[str], hold_at_once: bool):
        self.wanted = wanted
        self.hold_at_once = hold_at_once
        self.votes: dict[str, HoldVotes] = {}

    def call_opened(self, live) -> None:
        if not _ours(live.record, self.wanted):
            return
        votes = HoldVotes(live.hold_bot)
        live.hold_bot = votes.set_others  # this call's other holders (the flow) vote from now on
        self.votes[live.call_id] = votes
        if self.hold_at_once:
            try:
                votes.set_campaign(True)
            except Exception:  # noqa: BLE001 - the call goes on; the verdict's release is then a no-op
                pass

    def call_closed(self, live) -> None:
        self.votes.pop(live.call_id, None)

    def hold(self, call_id: str, on: bool) -> bool:
        """The campaign's vote on one call; False when the call is not up (any more)."""
        from callbot.app.calls import CallControlError

        votes = self.votes.get(call_id)
        if votes is None:
            return False
        try:
            votes.set_campaign(on)
        except CallControlError:
            return False
        return True


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def message_text(template: str, variables: dict[str, str]) -> str:
    """message_text with the row's {variables} filled in (an unknown one: nothing)."""
    try:
        return template.format_map(_Blank(variables))
    except (ValueError, IndexError, AttributeError):  # stray braces: the text as written
        return template


def load_message(campaign: Campaign, variables: dict[str, str] | None = None):
    """The machine message as a clip for LiveCall.play: the WAV's path, or espeak-ng's (samples, rate) of
    message_text with the row's variables in it."""
    amd = campaign.amd
    if not amd.enabled or amd.on_machine != "message":
        return None
    if amd.message_wav is not None:
        from callbot.engine.audio.wavfile import read_wav

        try:
            read_wav(amd.message_wav)
        except (OSError, ValueError) as err:
            raise CampaignError(f"amd.message_wav {amd.message_wav}: {err}") from None
        return amd.message_wav
    from callbot.speech.tts import EspeakTts, TtsError

    try:
        return EspeakTts(voice=amd.voice).synthesize(message_text(amd.message_text, variables or {}))
    except (TtsError, ValueError) as err:
        raise CampaignError(f"amd.message_text: {err}") from None


def disposition_of_record(record: dict) -> str | None:
    """How a call ended, from its record (a sidecar or the call store's copy), as a campaign disposition; None
    when the record does not say (a call not answered whose end is not written: it may still have rung).
    Answered: a machine when the verdict the dialer put in its labels says so, else a person."""
    labels = record.get("labels") or {}
    if record.get("answered"):
        return sch.MACHINE if str(labels.get("amd", "")).startswith("machine") else sch.HUMAN
    if record.get("end") is None:
        return None
    code = record.get("hangup_code")
    if code in (486, 600) or record.get("hangup_cause") == "busy":
        return sch.BUSY
    if record.get("hangup_cause") == "timeout" or code in (408, 480, 487):
        return sch.NO_ANSWER
    return sch.FAILED


class CallLookup:
    """What became of a call a killed dialer left open, by its Call-ID (the restart rule, campaigns/state.py):
    the call store's record when the store is on, else the call's JSON record in the recordings folder.
    A call found in neither stays `interrupted` (it may have rung: it is never dialled again)."""

    def __init__(self, recordings_dir: str, store_url: str | None):
        self.recordings_dir = recordings_dir
        self.store_url = store_url
        self.store = None

    def __call__(self, call_id: str) -> str | None:
        record = self._stored(call_id) or self._sidecar(call_id)
        return disposition_of_record(record) if record else None

    def _stored(self, call_id: str) -> dict | None:
        if self.store_url is None:
            return None
        from sqlalchemy import select

        from callbot.store.call_store import CallStore
        from callbot.store.database import StoreError
        from callbot.store.schema import calls

        try:
            if self.store is None:
                self.store = CallStore(self.store_url)
            with self.store.reading() as conn:
                record = conn.execute(select(calls.c.record).where(calls.c.call_id == call_id)).scalar()
        except (SQLAlchemyError, StoreError):
            return None  # the sidecar may still tell
        return record if isinstance(record, dict) else None

    def _sidecar(self, call_id: str) -> dict | None:
        from callbot.app.recording import recording_name

        suffix = "-" + recording_name(call_id, 0).split("-", 1)[1] + ".json"
        try:
            names = [n for n in os.listdir(self.recordings_dir) if n.endswith(suffix)]
        except OSError:
            return None
        for name in sorted(names, reverse=True):
            try:
                with open(os.path.join(self.recordings_dir, name), "rb") as f:
                    record = msgspec.json.decode(f.read())
            except (OSError, msgspec.DecodeError):
                continue  # a torn or unreadable file: the next one, or interrupted
            if isinstance(record, dict) and record.get("call_id") == call_id:
                return record
        return None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class AttemptStore:
    """Each finished attempt into the call store's campaign_attempts (migration 0003), on a thread of its
    own: a slow or dead database never holds up the dialer. The campaign's state file stays the truth
    (campaigns/state.py); a row the store missed costs one line on stderr, nothing else."""

    def __init__(self, url: str, campaign: str, say: Callable[[str], None]):
        self.url = url
        self.campaign = campaign
        self.say = say
        self.queue: queue.Queue = queue.Queue(maxsize=10_000)
        self.written = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, name="campaign-store", daemon=True)
        self.thread.start()

    def put(self, row: dict) -> None:
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            self.failed += 1

    def _run(self) -> None:
        from sqlalchemy import insert

        from callbot.store.call_store import CallStore
        from callbot.store.database import StoreError
        from callbot.store.schema import campaign_attempts

        store = None
        while True:
            row = self.queue.get()
            if row is None:
                break
            try:
                if store is None:
                    store = CallStore(self.url)
                with store.engine.begin() as conn:
                    conn.execute(insert(campaign_attempts).values(campaign=self.campaign, **row))
                self.written += 1
            except (SQLAlchemyError, StoreError) as err:
                self.failed += 1
                if self.failed == 1:
                    text = str(getattr(err, "orig", None) or err).strip().splitlines()
                    self.say(f"campaign: the call store did not take an attempt ({text[0] if text else err}); "
                             "the campaign's state file has it")
        if store is not None:
            store.close()

    def close(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


class Control:
    """pause / resume / stop: from signals (SIGUSR1, SIGUSR2, SIGTERM/SIGINT) and a control file."""

    def __init__(self, path: str | None):
        self.path = path
        self.paused = False
        self.stops = 0
        self._mtime: float | None = None
        self.wake = threading.Event()

    def install(self) -> Callable[[], None]:
        def on(sig, _frame):
            if sig == signal.SIGUSR1:
                self.paused = True
            elif sig == signal.SIGUSR2:
                self.paused = False
            else:
                self.stops += 1
            self.wake.set()
        sigs = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
        old = {s: signal.signal(s, on) for s in sigs}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def poll_file(self) -> None:
        if self.path is None:
            return
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime:
                return
            self._mtime = mtime
            word = open(self.path, encoding="utf-8").read().strip().lower()
        except (OSError, UnicodeDecodeError):
            return
        if word == "pause":
            self.paused = True
        elif word == "resume":
            self.paused = False
        elif word == "stop":
            self.stops = max(self.stops, 1)


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def disposition_of(live: Live, ended: ev.CallEnded) -> tuple[str, int | None]:
    if live.answered:
        return (sch.MACHINE if live.machine else sch.HUMAN), None
    code = ended.code or live.code
    if not live.responded and code in (None, 0, 408, 487):
        # nothing came back at all (pjsip's own timeout, the 487 of our CANCEL): not a phone left ringing
        return sch.FAILED, None
    if code in (486, 600) or ended.cause == "busy":
        return sch.BUSY, code
    if ended.cause == "timeout" or code in (408, 480, 487):
        return sch.NO_ANSWER, code
    return sch.FAILED, code


class CampaignRunner:
    def __init__(self, settings: Settings, engine_kind: str, list_path: str, campaign: Campaign, bot: str,
                 account: str | None, host: str | None, report: str | None = None, control: str | None = None,
                 clock: Callable[[], float] = time.time, out=sys.stderr):
        self.settings = settings
        self.engine_kind = engine_kind
        self.list_path = list_path
        self.name = os.path.basename(list_path)
        self.campaign = campaign
        self.bot = bot
        self.account = account
        self.host = host
        self.report_path = report
        self.control = Control(control)
        self.clock = clock
        self.out = out
        self.contacts, digest = load_contacts(list_path, campaign.timezone)
        self.dnc = load_dnc(campaign.dnc)
        for c in self.contacts:
            c.uri(host)  # every number dialable before anything is dialled
        self.message = load_message(campaign)
        self.state = CampaignState(state_path(list_path), digest, clock)
        # writes the state file refused (a full disk), kept in order until it takes them; no new call
        # meanwhile: an attempt is committed before its INVITE leaves
        self._state_writes: list[Callable[[], None]] = []
        self._state_down_at: float | None = None  # monotonic s of the last refusal, None while it writes
        self._state_error = ""
        lookup = CallLookup(settings.recordings_dir, settings.store_url() if settings.store.enabled else None)
        try:
            states, self.recovered = self.state.load(resolve=lookup)
        finally:
            lookup.close()
        self.scheduler = sch.Scheduler(campaign, self.contacts, self.dnc, states)
        for r in self.recovered:  # a call found: its disposition goes through the retry rules as usual
            if r["resolved"] and r["row"] in self.scheduler.states:
                self.scheduler.finished(r["row"], r["disposition"], clock())
                self._write_state(functools.partial(self.state.save_row, r["row"], self.scheduler.states[r["row"]]))
        self.by_row = {c.row: c for c in self.contacts}
        self.live: dict[str, Live] = {}
        self.wanted: set[str] = set()
        self.notes: queue.SimpleQueue = queue.SimpleQueue()  # events of our calls (PlayFinished, FlowTransition)
        self.placed: set[str] = set()  # every Call-ID this run dialled: a flow's last moves come after its call ends
        self.flows: dict[str, dict] = {}  # Call-ID -> the flow's course, for the attempt's record and the report
        self.counts: dict[str, int] = {}  # by disposition, rows done before a restart included
        for st in states.values():
            if st.done and st.disposition:
                self.counts[st.disposition] = self.counts.get(st.disposition, 0) + 1
        self.max_active = 0
        self.refusals: list[tuple[int, str]] = []  # the trunk's refusals in a row
        self.error: str | None = None  # why the campaign stopped on its own (exit status 1)
        self.store: AttemptStore | None = None  # the call store's campaign_attempts, when [store] is on
        self.waiting_until: float | None = None  # nothing up, the next row due then (a window, a back-off)
        self._last_progress = ""
        self._progress_at = 0.0

    # ---- the loop ----------------------------------------------------------------------------------

    def run(self) -> int:
        from callbot.app.serve import ServerFailure, running_server

        for r in self.recovered:
            how = "its call found" if r["resolved"] else "no record of its call: never dialled again"
            self._say(f"campaign: row {r['row']} attempt {r['attempt']} was in progress when the dialer "
                      f"stopped: {r['disposition']} ({how})")
        restore = self.control.install()
        if self.settings.store.enabled:
            self.store = AttemptStore(self.settings.store_url(), self.name, self._say)
            for r in self.recovered:  # the killed dialer never wrote these
                c = self.by_row.get(r["row"])
                if c is not None:
                    self._stored(r["row"], r["attempt"], c, r["disposition"], call_id=r["call_id"],
                                 reason="resolved after a restart" if r["resolved"] else
                                 "the dialer stopped during this attempt")
        try:
            with running_server(self.settings, self.engine_kind) as server:
                self.server = server
                self.tap = AmdTap(server.recorder, server.recorder.listener, self.campaign, self.control.wake.set)
                self.tap.wanted = self.wanted
                self.holds = CampaignHolds(self.wanted, self.campaign.amd.enabled and self.campaign.amd.hold_bot)
                if self.campaign.amd.enabled:
                    server.recorder.listener = self.tap
                    server.router.watchers.insert(0, self.holds)
                server.bus.attach("campaign", self.notes.put,
                                  accept=lambda e: (isinstance(e, PlayFinished) and call_id_of(e) in self.wanted)
                                  or (isinstance(e, FlowTransition) and call_id_of(e) in self.placed))
                try:
                    self._loop(server)
                except ServerFailure as err:
                    self._say(f"callbot: error: {err}")
                    return EXIT_FAILED
        finally:
            restore()
            if self.store is not None:
                self.store.close()
            self._last_flow_moves()
            if not self._flush_state():
                self._say(f"campaign: {len(self._state_writes)} writes of the state file could not be made "
                          f"({self._state_error}): the rows they concern are seen as interrupted when the "
                          "campaign runs again (never called twice) and the report lacks their last state")
            self._write_report()
            self.state.close()
        self._progress(force=True)
        if self.error is not None:
            self._say(f"callbot: error: {self.error}")
            return EXIT_FAILED
        return EXIT_OK

    def _loop(self, server) -> None:
        stop_at: float | None = None
        hung_all = False
        while True:
            self.control.poll_file()
            now = self.clock()
            if self.control.stops and stop_at is None:
                stop_at = time.monotonic() + STOP_GRACE_S
                self._say("campaign: stopping: no new calls; the calls up end by themselves")
            if stop_at is not None and not hung_all and (self.control.stops > 1 or time.monotonic() >= stop_at):
                hung_all = True
                for live in list(self.live.values()):
                    self._hangup(live)
            self._amd_step()
            self._notes_step()
            self._limits_step()
            wait_until = None
            if stop_at is None and not self.control.paused and self._state_writes_taken():
                decision = self.scheduler.next(now)
                if isinstance(decision, sch.Done):
                    if not self.live:
                        return
                elif isinstance(decision, sch.Close):
                    self.scheduler.closed(decision.contact.row, decision.disposition)
                    self._write_state(functools.partial(self.state.close_row, decision.contact.row,
                                                        decision.disposition,
                                                        self.scheduler.states[decision.contact.row], now))
                    self._count(decision.disposition)
                    self._stored(decision.contact.row, 0, decision.contact, decision.disposition)
                    continue
                elif isinstance(decision, sch.Dial):
                    self._dial(decision)
                    continue
                else:
                    wait_until = decision.until
                    self.waiting_until = wait_until if not self.live else None
            elif stop_at is not None and not self.live:
                return
            self._progress()
            timeout = 0.05
            if wait_until is not None:
                timeout = max(0.0, min(timeout, wait_until - self.clock()))
            self._pump(server, timeout)

    def _pump(self, server, timeout: float) -> None:
        server._check_health()
        try:
            event = server.endpoint.events.get(timeout=timeout) if timeout > 0 else server.endpoint.events.get_nowait()
        except queue.Empty:
            return
        call_id = getattr(event, "call_id", None)
        live = self.live.get(call_id) if call_id is not None else None
        if live is None:
            return
        if isinstance(event, ev.CallProgress):
            if event.code < 200:
                live.responded = True
            if event.code >= 300:
                live.code, live.reason = event.code, event.reason
        elif isinstance(event, ev.CallConfirmed):
            live.answered = True
            live.answered_mono = time.monotonic()
            live.attempt.answered_at = self.clock()
            self._write_state(functools.partial(self.state.answered, live.attempt))
            if not self.campaign.amd.enabled:
                live.amd = None
        elif isinstance(event, ev.CallEnded):
            self._ended(live, event)

    def _dial(self, decision: sch.Dial) -> None:
        c = decision.contact
        uri = c.uri(self.host)
        now = self.clock()
        self.scheduler.started(c.row, now)
        # the Call-ID is ours: committed with the attempt before the INVITE leaves (a restart finds the call by
        # it), and the bot's variables are with the router before then (a callee that answers at once finds
        # them when its audio comes up)
        call_id = f"{uuid.uuid4().hex}@campaign"
        try:
            attempt = self.state.begin(c.row, decision.attempt, uri, self.scheduler.states[c.row], call_id=call_id)
        except SQLAlchemyError as err:  # not committed: the INVITE does not leave, the row waits
            self.scheduler.unstarted(c.row)
            self._state_refused(err)
            return
        self._state_writes_back()
        variables = {**c.variables, "campaign_row": str(c.row)}
        self.server.router.expect(call_id, bot=self.bot, variables=variables)
        self.wanted.add(call_id)
        self.placed.add(call_id)
        labels = {"campaign": self.name, "campaign_row": str(c.row), "campaign_attempt": str(decision.attempt)}
        try:
            self.server.endpoint.dial(uri, account=self.account, timeout_s=self.campaign.dial_timeout_s,
                                      call_id=call_id, caller_id=self.campaign.caller_id,
                                      caller_name=self.campaign.caller_name, labels=labels)
        except RuntimeError as err:  # at capacity, shutting down: our side had no room
            self.wanted.discard(call_id)
            self._finish(Live(attempt, c), sch.REFUSED, None, str(err))
            return
        except ValueError as err:  # not a SIP URI, no transport for it
            self.wanted.discard(call_id)
            self._finish(Live(attempt, c), sch.FAILED, None, str(err))
            return
        live = Live(attempt, c, call_id)
        self.live[call_id] = live
        self.max_active = max(self.max_active, len(self.live))

    def _amd_step(self) -> None:
        if not self.campaign.amd.enabled:
            return
        amd = self.campaign.amd
        for live in list(self.live.values()):
            if not live.answered or live.hangup_sent:
                continue
            d = self.tap.detector(live.call_id)
            if d is None or d.verdict is None:
                continue
            if not live.verdict_seen:
                live.verdict_seen = True
                live.amd, live.amd_ms = d.verdict.kind, d.verdict.at_ms
                self._label(live, amd=d.verdict.kind)  # in the call's record: what a restart reads
                if d.verdict.kind != MACHINE:
                    if amd.hold_bot:
                        self.holds.hold(live.call_id, False)  # the campaign's hold only: a flow's stays
                    continue
                if not amd.hold_bot:  # the bot greeted at once: it stops talking to a machine
                    self.holds.hold(live.call_id, True)
                live.machine = True
                if amd.on_machine == "hangup":
                    self._hangup(live)
                    continue
                live.beep_deadline = time.monotonic() + (amd.beep_wait_ms / 1000 if amd.wait_for_beep else 0)
            if live.machine and not live.message_sent:
                if d.beep is not None and d.beep_done:
                    live.beep_ms = d.beep.start_ms
                    live.amd = d.answered_by
                elif time.monotonic() < live.beep_deadline:
                    continue
                live.message_sent = True
                clip = self.message
                if amd.message_text is not None and "{" in amd.message_text:
                    try:
                        clip = load_message(self.campaign, live.contact.variables)
                    except CampaignError as err:
                        self._say(f"campaign: row {live.contact.row}: {err}; the message as checked at the start")
                if self._control(live, lambda call: call.play(clip, id=MESSAGE_ID)) is None:
                    self._hangup(live)

    def _notes_step(self) -> None:
        while True:
            try:
                note = self.notes.get_nowait()
            except queue.Empty:
                return
            if isinstance(note, FlowTransition):
                self._flow_moved(note)
                continue
            live = self.live.get(note.call_id)
            if live is not None and isinstance(note, PlayFinished) and note.id == MESSAGE_ID:
                self._hangup(live)

    def _last_flow_moves(self) -> None:
        """The flows' moves the bus delivered while the server closed, into the state file before the
        report is written from it."""
        while True:
            try:
                note = self.notes.get_nowait()
            except queue.Empty:
                return
            if isinstance(note, FlowTransition):
                self._flow_moved(note)

    def _flow_moved(self, move: FlowTransition) -> None:
        """The call's flow result for its attempt (issue 15, point 3): its states entered, where it ended
        and why, kept in the state file (the report) as the flow moves."""
        flow = self.flows.setdefault(move.call_id, {"name": move.flow, "path": [], "state": "", "reason": ""})
        if move.to_state:
            flow["path"].append(move.to_state)
        flow["state"], flow["reason"] = move.to_state, move.reason
        self._write_state(functools.partial(self.state.set_flow, move.call_id, dict(flow, path=list(flow["path"]))))

    def _limits_step(self) -> None:
        now = time.monotonic()
        for live in list(self.live.values()):
            if live.answered_mono is not None and now - live.answered_mono >= self.campaign.max_call_s:
                self._hangup(live)

    def _label(self, live: Live, **labels: str) -> None:
        record = self.server.endpoint.records.get(live.call_id)
        if record is not None:
            # a new dict, not an update in place: the recorder's and the store writer's threads may be
            # copying the old one this instant
            record.labels = {**record.labels, **labels}
            record.changed()

    def _control(self, live: Live, op):
        from callbot.app.calls import CallControlError

        try:
            return op(self.server.router.call(live.call_id)) or True
        except CallControlError:
            return None

    def _hangup(self, live: Live) -> None:
        if live.hangup_sent or live.call_id is None:
            return
        live.hangup_sent = True
        try:
            self.server.endpoint.hangup(live.call_id)
        except (ValueError, RuntimeError):
            pass  # ended meanwhile: its CallEnded is on the way

    def _ended(self, live: Live, ended: ev.CallEnded) -> None:
        self.live.pop(live.call_id, None)
        disposition, code = disposition_of(live, ended)
        reason = ended.reason or live.reason
        self._finish(live, disposition, code, reason)
        if disposition == sch.FAILED and code in TRUNK_REFUSED:
            self.refusals.append((code, reason))
            if len(self.refusals) >= TRUNK_REFUSALS and self.error is None:
                self.error = (f"the trunk refuses the campaign's calls: {len(self.refusals)} attempts in a row "
                              f"answered {code} {reason} (account {self.account or 'the first'!r}: check its "
                              "credentials and caller ID); campaign stopped, run it again once fixed")
                self.control.stops = max(self.control.stops, 1)
        elif live.responded or live.answered or disposition in (sch.BUSY, sch.NO_ANSWER):
            self.refusals.clear()

    def _finish(self, live: Live, disposition: str, code: int | None, reason: str | None) -> None:
        row = live.contact.row
        now = self.clock()
        self.scheduler.finished(row, disposition, now)
        self._write_state(functools.partial(self.state.end, live.attempt, disposition, self.scheduler.states[row],
                                            sip_code=code, reason=reason, amd=live.amd, amd_ms=live.amd_ms,
                                            beep_ms=live.beep_ms, at=now))
        self.wanted.discard(live.call_id)
        self._count(disposition)
        self._stored(row, live.attempt.attempt, live.contact, disposition, call_id=live.call_id, sip_code=code,
                     reason=reason, amd=live.amd, amd_ms=live.amd_ms, beep_ms=live.beep_ms,
                     started_at=live.attempt.started_at, answered_at=live.attempt.answered_at)

    def _stored(self, row: int, attempt: int, contact: Contact, disposition: str, **facts) -> None:
        if self.store is not None:
            self.store.put({"row": row, "attempt": attempt, "target": contact.target, "disposition": disposition,
                            "variables": dict(contact.variables), "ended_at": self.clock(), **facts})

    # ---- the state file refusing writes (a full disk) -------------------------------------------------

    def _write_state(self, write: Callable[[], None]) -> None:
        """A write of the state file for a call in progress or a row closed: made now, or kept in order
        until the file takes writes again."""
        self._state_writes.append(write)
        if self._state_down_at is None or time.monotonic() - self._state_down_at >= STATE_RETRY_S:
            self._flush_state()

    def _flush_state(self) -> bool:
        while self._state_writes:
            try:
                self._state_writes[0]()
            except SQLAlchemyError as err:
                self._state_refused(err)
                return False
            self._state_writes.pop(0)
        self._state_writes_back()
        return True

    def _state_writes_taken(self) -> bool:
        """Whether a new call may be placed: the state file takes writes, or is due to be tried again (the
        writes kept first, then the next attempt's own)."""
        if self._state_down_at is None:
            return True
        if time.monotonic() - self._state_down_at < STATE_RETRY_S:
            return False
        return self._flush_state() if self._state_writes else True

    def _state_refused(self, err: BaseException) -> None:
        if self._state_down_at is None:
            self._say(f"campaign: the state file {self.state.path} refused a write ({_one_line(err)}): no new "
                      f"call until it takes writes again (tried every {STATE_RETRY_S:g} s); the calls up go on")
        self._state_down_at = time.monotonic()
        self._state_error = _one_line(err)

    def _state_writes_back(self) -> None:
        if self._state_down_at is not None and not self._state_writes:
            self._state_down_at = None
            self._say("campaign: the state file takes writes again")

    # ---- output ------------------------------------------------------------------------------------

    def _count(self, disposition: str) -> None:
        self.counts[disposition] = self.counts.get(disposition, 0) + 1
        self._progress(force=True)

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._progress_at < PROGRESS_S:
            return
        done = sum(s.done for s in self.scheduler.states.values())
        by = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())) or "-"
        line = (f"campaign: {done}/{len(self.contacts)} rows done, {len(self.live)} up"
                f"{' (paused)' if self.control.paused else ''} | {by}")
        if self.waiting_until is not None and self.waiting_until - self.clock() > 5 and not self.live:
            line += " | next call " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.waiting_until))
        if line != self._last_progress:
            self._say(line)
            self._last_progress = line
        self._progress_at = now

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def _write_report(self) -> None:
        if self.report_path is None:
            return
        rows = []
        for a in self.state.all_attempts():
            c = self.by_row.get(a["row"])
            rows.append({**a, "target": c.target if c else "", "tz": c.tz if c else "",
                         "variables": dict(c.variables) if c else {},
                         "flow": json.loads(a["flow"]) if a.get("flow") else None})
        try:
            with open(self.report_path, "w", newline="", encoding="utf-8") as f:
                if self.report_path.endswith(".json"):
                    json.dump(rows, f, indent=2)
                    f.write("\n")
                    return
                names = ["row", "attempt", "target", "tz", "disposition", "sip_code", "reason", "amd", "amd_ms",
                         "beep_ms", "call_id", "uri", "started_at", "answered_at", "ended_at", "flow_state",
                         "flow_path", "flow_reason", "variables"]
                w = csv.writer(f)
                w.writerow(names)
                for r in rows:
                    flow = r["flow"] or {}
                    r = {**r, "flow_state": flow.get("state"), "flow_path": " > ".join(flow.get("path", [])),
                         "flow_reason": flow.get("reason")}
                    # the SIP reason phrase is the callee's text, the variables the list's: what a spreadsheet
                    # would run as a formula is written as text (store/export.py safe_cell)
                    w.writerow([safe_cell(json.dumps(r[n]) if n == "variables" else r[n]) for n in names])
        except OSError as err:
            self._say(f"callbot: error: report {self.report_path}: {err.strerror or err}")


def run_campaign(settings: Settings, engine_kind: str, list_path: str, campaign_path: str, bot: str | None,
                 host: str | None, report: str | None, control: str | None) -> int:
    """`callbot campaign run`: a problem with the campaign, list or DNC file is one line and exit 2."""
    try:
        campaign = load_campaign(campaign_path)
        name = bot or campaign.bot
        chosen = settings.bot(name) if name else settings.bots[0]
        settings = msgspec.structs.replace(settings, bots=(chosen, *(b for b in settings.bots if b is not chosen)),
                                           # a dialer serves no API: `callbot serve` or `calls api` does
                                           store=msgspec.structs.replace(settings.store, api=None))
        account = campaign.account or chosen.account or (settings.sip.accounts[0].name if settings.sip.accounts
                                                          else None)
        if account is not None and account not in {a.name for a in settings.sip.accounts}:
            raise ConfigError(f"{campaign_path}: account {account!r}: no such [[sip.accounts]] name "
                              f"({', '.join(a.name for a in settings.sip.accounts)})")
        runner = CampaignRunner(settings, engine_kind, list_path, campaign, chosen.name, account, host,
                                report=report, control=control)
    except CampaignError as err:
        print(f"callbot: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return runner.run()
