"""`callbot serve`'s writer into the call store: every call, its events and its record, off the media path.

Why a queue and a thread of its own: a database write can take milliseconds (a commit, a lock held by
`callbot calls import`) or fail (PostgreSQL gone). The SIP thread and the bus's handler threads only put
a small item on a bounded queue and return; this thread commits what the queue holds in one
transaction at a time (a batch: at most BATCH_MAX items or BATCH_S of waiting). A full queue, or a
database that cannot be reached, costs the items concerned (counted in `dropped`, said in one log line,
then at most once a minute) and nothing else: calls go on, the recordings, the JSON sidecars and the
events files are written as ever (app/recording.py). Once the database takes writes again, each recorded
call that lost items meanwhile is brought in from those files as soon as they are final (its record,
the events the store lacks, its analysis: `caught_up`), as `callbot calls import` would; a call that
had no recording has only its events, and those are gone from the store (the events log has them).

Where it hears from: the event bus (every call event; the per-frame stage stamps left out) and the
recorder, through `RecorderTap`: the endpoint's recorder calls start(record) when a call's audio begins
and finish(record) when it ends; the tap passes both on to the real Recorder and tells this writer. The
live record (sip/call_record.py) is read on this thread: once a second when it reports a change, so a
killed process leaves the call in the store with what was known a second before, marked incomplete. A
call is marked complete only when its recording is finished; its record is read once more
FINAL_REFRESH_S later (the caller recognizer's last words, the flow's last step reach the record
after the hang-up, as they reach the sidecar). Calls that never had audio (refused, unanswered) are
kept from their events: IncomingCall opens them, CallEnded finishes them. A call's analysis
(`save_analysis`) goes through the same queue, so one thread writes the store.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import queue
import threading
import time
from typing import Any

import msgspec

from callbot.app.event_bus import BusEvent, EventBus, call_id_of
from callbot.app.event_log import event_line
from callbot.engine.contract import FrameStages
from callbot.sip import events as ev
from callbot.store.call_store import CallStore, Writes
from callbot.store.database import StoreError
from callbot.store.importer import ANALYSIS_SUFFIX, ImportReport, import_sidecar

log = logging.getLogger(__name__)

QUEUE_MAX = 20_000  # items waiting for the database (minutes of a busy server's events)
BATCH_MAX = 1_000  # items per transaction
BATCH_S = 0.2  # how long a batch waits for more items once it has one
UPDATE_S = 1.0  # a live record that reported a change is written at most this often
FINAL_REFRESH_S = 6.0  # after a call's finish, its record is read once more (app/recording.py TRANSCRIPT_WAIT_S + 1)
REOPEN_S = 10.0  # a store that could not be opened is tried again this often
COMPLAIN_S = 60.0  # at most one log line this often while writes keep failing
MISSED_MAX = 10_000  # calls remembered for a catch-up from their files (past it: `callbot calls import`)
CATCH_UP_S = 1.0  # how often the missed calls' files are looked at once the store takes writes again
GIVE_UP_S = 3600.0  # a missed call whose files never became final is let go after this long


def _record_dict(record: Any) -> dict | None:
    """The record as a dict; None when the SIP side changed it while it was copied (tried again later)."""
    try:
        if hasattr(record, "to_dict"):
            return dict(record.to_dict())
        return dict(record)
    except RuntimeError:
        return None


class _Live:
    """A recorded call this writer follows: its live record and its recording's files."""

    def __init__(self, record: Any, files: dict):
        self.record = record
        self.files = files
        self.revision = -1
        self.written_at = 0.0
        self.finished_at: float | None = None
        self.final: dict | None = None

    def snapshot(self) -> dict | None:
        data = _record_dict(self.record)
        if data is not None:
            data.update(self.files)
        return data


class StoreWriter:
    """Writes calls into the store at `url` from its own thread; `attach` to the bus, `tap` the recorder."""

    def __init__(self, url: str, *, queue_max: int = QUEUE_MAX, update_s: float = UPDATE_S,
                 final_refresh_s: float = FINAL_REFRESH_S, clock=time.monotonic):
        self.url = url
        self.update_s = update_s
        self.final_refresh_s = final_refresh_s
        self.clock = clock
        self.store: CallStore | None = None
        self.dropped = 0  # items lost: the queue was full, or the database refused their batch
        self.written = 0  # items committed
        self.failures = 0  # batches (or openings) that failed
        self._queue: queue.Queue = queue.Queue(queue_max)
        self._live: dict[str, _Live] = {}
        self._ended: set[str] = set()  # calls without a recording that CallEnded finished
        self._complained_at = -COMPLAIN_S
        self._opened_at = -REOPEN_S
        self._failing = False
        # calls that lost items to a refused write: call_id -> [sidecar path or None, since, analysis lost]
        self._missed: dict[str, list] = {}
        self.caught_up = 0  # missed calls brought in from their files
        self.missed_untracked = 0  # missed calls past MISSED_MAX (or without files): the store lacks them
        self._caught_up_at = -CATCH_UP_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # ---- what the other threads call: never waits ----------------------------------------------------

    def _put(self, item: tuple) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def on_event(self, event: BusEvent) -> None:
        """An event bus subscriber (a handler thread of the bus)."""
        if isinstance(event, FrameStages) or call_id_of(event) is None:
            return
        self._put(("event", event))

    def started(self, record: Any, recording: Any) -> None:
        """A call's recording started (the SIP thread, through RecorderTap)."""
        files = {}
        if recording is not None:
            files = {"recording": {"wav": recording.wav_path, "rate": recording.rate, "complete": False},
                     "events": recording.events_path}
        self._put(("start", record, files))

    def finished(self, record: Any) -> None:
        """A call's recording finished (the SIP thread, through RecorderTap)."""
        self._put(("finish", record))

    def save_analysis(self, call_id: str, analysis: Any) -> None:
        """A call's analysis (analytics/result.py CallAnalysis), written with the next batch (any thread).
        One for a call the store does not have is dropped alone, with a log line."""
        self._put(("analysis", call_id, analysis))

    def attach(self, bus: EventBus) -> None:
        bus.attach("store", self.on_event, maxsize=QUEUE_MAX,
                   accept=lambda e: not isinstance(e, FrameStages))

    def tap(self, recorder: Any) -> RecorderTap:
        return RecorderTap(recorder, self)

    # ---- the writer's thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=BATCH_S)
            except queue.Empty:
                first = None
            batch = [] if first is None else [first]
            deadline = self.clock() + BATCH_S
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._queue.get(timeout=max(0.0, deadline - self.clock())) if batch
                                 else self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
            if self._stop.is_set() and self._queue.empty():
                self._write([], final=True)
                return

    def _open(self) -> CallStore | None:
        if self.store is not None:
            return self.store
        now = self.clock()
        if now - self._opened_at < REOPEN_S:
            return None
        self._opened_at = now
        try:
            self.store = CallStore(self.url)
            if self._failing:
                log.warning("call store %s: reachable again", self._label())
            self._failing = False
        except Exception as err:  # StoreError, or the driver's own: the calls go on without the store
            self.failures += 1
            self._complain(f"cannot be opened ({_one_line(err)})")
        return self.store

    def _write(self, batch: list[tuple], final: bool = False) -> None:
        marks = [item[1] for item in batch if item[0] == "mark"]
        batch = [item for item in batch if item[0] != "mark"]
        try:
            if not batch and not self._refresh_due(final) and not self._catch_up_due(final):
                return
            store = self._open()
            if store is None:
                self.dropped += len(batch)
                self._miss(batch)
                self._forget_finished()
                return
            try:
                with store.writes() as w:
                    for item in batch:
                        self._apply(w, item)
                    self._refresh(w, final)
            except Exception as err:  # the batch is lost; the JSON records still hold it
                self.failures += 1
                self.dropped += len(batch)
                self._miss(batch)
                self._complain(f"a write failed, {len(batch)} items dropped ({_one_line(err)})")
                return
            self.written += len(batch)
            if self._failing:
                log.warning("call store %s: writing again (%d items dropped so far)", self._label(), self.dropped)
                self._failing = False
            if self._catch_up_due(final):
                self._caught_up_at = self.clock()
                self._catch_up(store)
        finally:
            for mark in marks:
                mark.set()

    # ---- calls whose writes were refused: brought in from their files ---------------------------------

    def _catch_up_due(self, final: bool) -> bool:
        return bool(self._missed) and (final or self.clock() - self._caught_up_at >= CATCH_UP_S)

    def _miss(self, batch: list[tuple]) -> None:
        for item in batch:
            call_id, sidecar = self._call_of(item)
            if call_id is None:
                continue
            missed = self._missed.get(call_id)
            if missed is None:
                if len(self._missed) >= MISSED_MAX:
                    self.missed_untracked += 1
                    continue
                missed = self._missed[call_id] = [None, self.clock(), False]
            missed[0] = missed[0] or sidecar
            missed[2] = missed[2] or item[0] == "analysis"
            live = self._live.get(call_id)
            if item[0] == "finish" and live is not None and live.finished_at is None:
                live.finished_at = self.clock()  # over (let go after its last refresh), though not written

    def _call_of(self, item: tuple) -> tuple[str | None, str | None]:
        """(call_id, its sidecar's path when known) of a queued item."""
        kind, files = item[0], None
        if kind == "event":
            call_id = call_id_of(item[1])
        elif kind in ("start", "finish"):
            record = item[1]
            call_id = str(getattr(record, "call_id", None) or (_record_dict(record) or {}).get("call_id"))
            files = item[2] if kind == "start" else None
        elif kind == "analysis":
            call_id = item[1]
        else:
            return None, None
        if files is None and call_id in self._live:
            files = self._live[call_id].files
        return call_id, _sidecar_of(files)

    def _catch_up(self, store: CallStore) -> None:
        """Brings in the missed calls whose files are final (the writer's thread, the store writing again)."""
        now = self.clock()
        for call_id, (sidecar, since, analysis) in list(self._missed.items()):
            live = self._live.get(call_id)
            sidecar = sidecar or _sidecar_of(live.files if live is not None else None)
            if sidecar is None:
                if live is None or live.finished_at is not None:  # no recording: its events were all there was
                    del self._missed[call_id]
                    self.missed_untracked += 1
                continue
            try:  # the recorder marks it complete once the call's files are final
                record = json.loads(pathlib.Path(sidecar).read_bytes())
                final = bool(record["recording"]["complete"])
            except (OSError, ValueError, KeyError, TypeError):
                final = False  # the call goes on, its record is not written yet (a disk that refuses it)
            if not final:
                if now - since >= GIVE_UP_S:
                    del self._missed[call_id]
                    self.missed_untracked += 1
                    log.warning("call store: call %s lacks items and its record at %s never became final; "
                                "`callbot calls import` brings it in once it does", call_id, sidecar)
                continue
            try:
                why = import_sidecar(store, pathlib.Path(sidecar), ImportReport(), merge=True)
                if why is None and analysis:
                    kept = pathlib.Path(sidecar[:-len(".json")] + ANALYSIS_SUFFIX)
                    if kept.is_file():
                        store.save_analysis(call_id, json.loads(kept.read_bytes()))
            except Exception as err:  # the database again: the next catch-up tries again
                self._complain(f"bringing in call {call_id} from its files failed ({_one_line(err)})")
                return
            del self._missed[call_id]
            if why is None:
                self.caught_up += 1
            else:
                self.missed_untracked += 1
                log.warning("call store: call %s lacks items the database refused and %s", call_id, why)

    def _forget_finished(self) -> None:
        """While the store cannot be opened: finished calls are let go (their files hold them)."""
        now = self.clock()
        for call_id, live in list(self._live.items()):
            if live.finished_at is not None and now - live.finished_at >= self.final_refresh_s:
                del self._live[call_id]

    def _refresh_due(self, final: bool) -> bool:
        now = self.clock()
        for live in self._live.values():
            if final:
                return True
            if live.finished_at is not None:
                if now - live.finished_at >= self.final_refresh_s:
                    return True
            elif getattr(live.record, "revision", 0) != live.revision and now - live.written_at >= self.update_s:
                return True
        return False

    def _apply(self, w: Writes, item: tuple) -> None:
        kind = item[0]
        if kind == "event":
            self._event(w, item[1])
        elif kind == "start":
            record, files = item[1], item[2]
            live = _Live(record, files)
            data = live.snapshot()
            call_id = str(getattr(record, "call_id", None) or (data or {}).get("call_id"))
            self._live[call_id] = live
            if data is not None:
                w.call_started(data)
                live.revision = getattr(record, "revision", 0)
                live.written_at = self.clock()
        elif kind == "analysis":
            try:
                with w.conn.begin_nested():  # a savepoint: a refused analysis takes nothing else with it
                    w.save_analysis(item[1], item[2])
            except StoreError as err:
                self.dropped += 1
                log.warning("call store: the analysis of call %s is not kept: %s", item[1], err)
        elif kind == "finish":
            record = item[1]
            call_id = str(getattr(record, "call_id", None) or (_record_dict(record) or {}).get("call_id"))
            live = self._live.get(call_id) or _Live(record, {})
            self._live[call_id] = live
            data = live.snapshot()
            if data is None:  # being changed this instant: the final refresh writes it
                data = {"call_id": call_id}
            data.setdefault("recording", {})["complete"] = True
            live.files.setdefault("recording", {})["complete"] = True
            w.call_finished(data)
            live.final = data
            live.finished_at = self.clock()

    def _event(self, w: Writes, event: BusEvent) -> None:
        call_id = call_id_of(event)
        line = msgspec.json.decode(event_line(event))  # the events file's line: digits of a secret masked
        if isinstance(event, ev.IncomingCall) and call_id not in self._live:
            w.call_started({"call_id": call_id, "direction": "inbound", "account": event.account,
                            "remote_uri": event.remote_uri, "local_uri": event.local_uri, "start": time.time()})
        w.event(call_id, line)
        if isinstance(event, ev.CallEnded) and call_id not in self._live and call_id not in self._ended:
            # a call that never had audio: its events are all there is
            self._ended.add(call_id)
            if len(self._ended) > 10_000:
                self._ended.clear()
            w.call_finished({"call_id": call_id, "end": time.time(), "hangup_cause": event.cause,
                             "hangup_code": event.code, "hangup_reason": event.reason})

    def _refresh(self, w: Writes, final: bool) -> None:
        """Live records that changed, written again; finished calls read a last time once due."""
        now = self.clock()
        for call_id, live in list(self._live.items()):
            if live.finished_at is not None:
                if final or now - live.finished_at >= self.final_refresh_s:
                    data = live.snapshot()
                    if data is not None and data != live.final:
                        w.call_finished(data)
                    del self._live[call_id]
                continue
            revision = getattr(live.record, "revision", 0)
            if (revision != live.revision and now - live.written_at >= self.update_s) or final:
                data = live.snapshot()
                if data is not None:
                    w.call_updated(data)
                    live.revision, live.written_at = revision, now

    def _complain(self, what: str) -> None:
        self._failing = True
        now = self.clock()
        if now - self._complained_at >= COMPLAIN_S:
            self._complained_at = now
            log.warning("call store %s: %s; calls go on, their JSON records are written", self._label(), what)

    def _label(self) -> str:
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "(bad URL)"

    # ---- control -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def missed(self) -> int:
        """Calls that lost items and wait for their files to be brought in."""
        return len(self._missed)

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until what was queued before this call is written (or dropped); True if it was."""
        done = threading.Event()
        self._put(("mark", done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Writes what is queued, the live records as they stand (still incomplete), then stops."""
        self._stop.set()
        self._thread.join(timeout)
        if self.store is not None:
            self.store.close()


class StoreCollector:
    """The writer's counters for Prometheus (read when scraped): items written and dropped, failed
    batches, the queue's backlog. Register it on the app's registry: Metrics.registry.register(...)."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        w = self.writer
        yield CounterMetricFamily("callbot_store_written", "Items (events, records, analyses) committed to the "
                                  "call store", value=w.written)
        yield CounterMetricFamily("callbot_store_dropped", "Items the call store did not get (its queue full, "
                                  "or the database failing)", value=w.dropped)
        yield CounterMetricFamily("callbot_store_failures", "Call store batches (or openings) that failed",
                                  value=w.failures)
        yield GaugeMetricFamily("callbot_store_queue", "Items waiting for the call store", value=w.pending)
        yield GaugeMetricFamily("callbot_store_missed_calls", "Calls that lost items to a failing database, "
                                "waiting for their files to be brought in", value=w.missed)
        yield CounterMetricFamily("callbot_store_caught_up", "Calls brought in from their files after the "
                                  "database had refused some of their items", value=w.caught_up)
        yield CounterMetricFamily("callbot_store_missed_untracked", "Calls that lost items the store will not "
                                  "get back by itself (no recording, too many, or files never final)",
                                  value=w.missed_untracked)


class RecorderTap:
    """The endpoint's recorder: the real Recorder, with the store writer told of each call's start and
    finish (sip/media_session.py CallRecorder)."""

    def __init__(self, recorder: Any, writer: StoreWriter):
        self.recorder = recorder
        self.writer = writer

    def start(self, record: Any, rate: int):
        recording = self.recorder.start(record, rate)
        self.writer.started(record, recording)
        return recording

    def finish(self, recording: Any, record: Any) -> None:
        self.recorder.finish(recording, record)
        self.writer.finished(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.recorder, name)


def _sidecar_of(files: dict | None) -> str | None:
    """The sidecar's path from a recording's files (the WAV's, .json for .wav)."""
    wav = ((files or {}).get("recording") or {}).get("wav")
    return os.path.splitext(wav)[0] + ".json" if isinstance(wav, str) and wav else None


def _one_line(err: BaseException) -> str:
    if isinstance(err, StoreError):
        return str(err)
    text = str(getattr(err, "orig", None) or err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
