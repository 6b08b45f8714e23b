"""Retention and erasure: calls older than a number of days deleted, files and store rows alike, and the
calls of one caller (or given Call-IDs) erased on request.

Why: a contact center keeps recordings for a set time (a legal or contractual period) and must erase a
person's calls when asked (GDPR article 17); a recordings folder that only grows also ends as a full
disk. `callbot calls purge --older-than DAYS`, `callbot calls delete CALL_ID... | --caller NUMBER`, and
`callbot serve` with `[retention] days = N` purging once an hour (`RetentionJob`). Our own code: what a
call is on disk is ours (app/recording.py's names), nothing off the shelf knows it.

What a call is: its files side by side (<name>.wav, <name>.json, <name>.events.jsonl; the analysis's
<name>.analysis.json and the redacted copy it names) and its row in the store (its events, transitions,
legs and analysis rows go with it: ON DELETE CASCADE), plus, by caller or age, the campaign attempts
that dialled it. A call is deleted only once it is over: complete, or its record not written for an
hour (a process killed mid-call leaves one incomplete for good; a call going on rewrites its record at
least every 10 s). Age is by the call's start. The sidecar goes last, so a purge cut short is found
again by the next. File names start with the call's UTC start (app/recording.py recording_name), so an
age purge passes over a folder's younger calls without reading them.
"""
from __future__ import annotations

import calendar
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from sqlalchemy import and_, delete, or_, select

from callbot.store.call_store import CallStore
from callbot.store.importer import ANALYSIS_SUFFIX, SIDECAR_MAX_BYTES
from callbot.store.schema import calls, campaign_attempts

log = logging.getLogger(__name__)

SUFFIXES = (".wav", ".events.jsonl", ANALYSIS_SUFFIX, ".redacted.wav", ".json")  # the sidecar last
STALE_S = 3600.0  # an incomplete record not written for this long: its call is over (its process died)
EVERY_S = 3600.0  # serve's purge runs this often
_STAMP = re.compile(r"^(\d{8}T\d{6}Z)-")
_CHUNK = 500


@dataclass
class Selection:
    """Which calls: started before `before` (unix s), or these `call_ids`, or this `caller` (compared by
    its digits); within `tenant` when given, outside `other_tenants` (those with a period of their own).
    At least one of the first three."""

    before: float | None = None
    call_ids: frozenset[str] = frozenset()
    caller: str | None = None
    tenant: str | None = None
    other_tenants: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.before is None and not self.call_ids and not self.caller:
            raise ValueError("say which calls: older than a time, Call-IDs, or a caller")
        if self.caller is not None and not _digits(self.caller):
            raise ValueError(f"caller {self.caller!r}: no digits to compare numbers by")

    def takes(self, call_id: str, start: float | None, caller: str | None, remote_uri: str | None,
              tenant: str | None) -> bool:
        if (self.tenant is not None and tenant != self.tenant) or (tenant is not None and tenant in self.other_tenants):
            return False
        if call_id in self.call_ids:
            return True
        if self.before is not None and start is not None and start < self.before:
            return True
        if self.caller is not None:
            wanted = _digits(self.caller)
            return any(_digits(x) == wanted for x in (caller, _uri_user(remote_uri)) if x)
        return False


@dataclass
class Report:
    calls: int = 0  # calls deleted (their files, their row, or both)
    files: int = 0
    bytes: int = 0
    rows: int = 0  # calls rows deleted from the store (their events and analysis with them)
    attempts: int = 0  # campaign attempts deleted
    going_on: int = 0  # calls the selection takes that are not over: left alone
    problems: list[str] = field(default_factory=list)

    def line(self, dry_run: bool) -> str:
        verb = "would be deleted" if dry_run else "deleted"
        text = (f"{self.calls} calls {verb}: {self.files} files ({_size(self.bytes)}), {self.rows} store rows, "
                f"{self.attempts} campaign attempts")
        return text + (f"; {self.going_on} not over, left alone" if self.going_on else "")


def purge(dirs: Iterable[str], store: CallStore | None, selection: Selection, *, dry_run: bool = False,
          now: float | None = None) -> Report:
    """Deletes the calls `selection` takes that are over, from the folders `dirs` (searched with their
    subfolders) and from `store` (None: files only)."""
    now = time.time() if now is None else now
    report = Report()
    done: set[str] = set()
    going: set[str] = set()
    for sidecar, record in _sidecars(dirs, selection):
        call_id = str(record.get("call_id"))
        if call_id in done:  # a folder named twice (a tenant's inside the recordings folder)
            continue
        recording = record.get("recording") if isinstance(record.get("recording"), dict) else {}
        labels = record.get("labels") if isinstance(record.get("labels"), dict) else {}
        if not selection.takes(call_id, _number(record.get("start")), record.get("caller"),
                               record.get("remote_uri"), labels.get("tenant")):
            continue
        updated = _number(recording.get("updated")) or _mtime(sidecar)
        if not recording.get("complete") and now - updated < STALE_S:
            going.add(call_id)
            continue
        _delete_files(sidecar[:-len(".json")], report, dry_run)
        done.add(call_id)
        report.calls += 1
    if store is not None:
        _purge_store(store, selection, report, done, going, dry_run, now)
    report.going_on = len(going - done)
    return report


def _sidecars(dirs: Iterable[str], selection: Selection) -> Iterator[tuple[str, dict]]:
    for top in dict.fromkeys(os.path.abspath(d) for d in dirs):
        for folder, _, names in os.walk(top):
            for name in sorted(names):
                if not name.endswith(".json") or name.endswith(ANALYSIS_SUFFIX):
                    continue
                if selection.before is not None and not selection.call_ids and selection.caller is None:
                    started = _stamped(name)
                    if started is not None and started >= selection.before:
                        continue  # started after the cutoff: not read
                path = os.path.join(folder, name)
                try:
                    if os.path.getsize(path) > SIDECAR_MAX_BYTES:
                        continue
                    with open(path, "rb") as f:
                        record = json.loads(f.read())
                except (OSError, ValueError):
                    continue  # not a call record (or going away)
                if isinstance(record, dict) and isinstance(record.get("call_id"), str) and "recording" in record:
                    yield path, record


def _delete_files(stem: str, report: Report, dry_run: bool) -> None:
    """The call's files (`stem` + each suffix; the redacted copy where its analysis says), sidecar last."""
    paths = [stem + s for s in SUFFIXES]
    try:
        with open(stem + ANALYSIS_SUFFIX, "rb") as f:
            redacted = json.loads(f.read()).get("redacted_recording")
        if isinstance(redacted, str) and redacted not in paths:
            paths.insert(0, redacted)
    except (OSError, ValueError, AttributeError):
        pass
    for path in paths:
        try:
            size = os.path.getsize(path)
            if not dry_run:
                os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            report.problems.append(f"{path}: cannot delete it ({err.strerror or err})")
            continue
        report.files += 1
        report.bytes += size


def _purge_store(store: CallStore, selection: Selection, report: Report, done: set[str], going: set[str],
                 dry_run: bool, now: float) -> None:
    columns = (calls.c.call_id, calls.c.start_at, calls.c.caller, calls.c.remote_uri, calls.c.tenant,
               calls.c.complete, calls.c.updated_at, calls.c.recording_path)
    query = select(*columns)
    if selection.tenant is not None:
        query = query.where(calls.c.tenant == selection.tenant)
    if selection.caller is None:  # by age or Call-ID: the database narrows it; by caller: every number read
        narrow = []
        if selection.before is not None:  # a row with no start (seen only through an event): its last change
            narrow.append(or_(calls.c.start_at < selection.before,
                              and_(calls.c.start_at.is_(None), calls.c.updated_at < selection.before)))
        if selection.call_ids:
            narrow.append(calls.c.call_id.in_(sorted(selection.call_ids)))
        query = query.where(or_(*narrow))
    gone: list[str] = []
    with store.reading() as conn:
        for row in conn.execute(query):
            start = row.start_at if row.start_at is not None else row.updated_at
            if not selection.takes(row.call_id, start, row.caller, row.remote_uri, row.tenant):
                continue
            if row.call_id not in done and (row.call_id in going
                                            or (not row.complete and now - (row.updated_at or 0.0) < STALE_S)):
                going.add(row.call_id)  # its files say it goes on, or its row does: neither is touched
                continue
            gone.append(row.call_id)
            if row.recording_path and row.call_id not in done:  # files the folders searched did not hold
                _delete_files(os.path.splitext(row.recording_path)[0], report, dry_run)
            if row.call_id not in done:
                done.add(row.call_id)
                report.calls += 1
    report.rows = len(gone)
    attempts = _attempts(store, selection, done)
    report.attempts = len(attempts)
    if dry_run:
        return
    with store.writes() as w:
        for i in range(0, len(gone), _CHUNK):
            w.conn.execute(delete(calls).where(calls.c.call_id.in_(gone[i:i + _CHUNK])))
        for i in range(0, len(attempts), _CHUNK):
            w.conn.execute(delete(campaign_attempts).where(campaign_attempts.c.id.in_(attempts[i:i + _CHUNK])))


def _attempts(store: CallStore, selection: Selection, done: set[str]) -> list[int]:
    """The campaign attempts that go with the selection: of the calls deleted, older than the cutoff, or
    dialling the caller (tenant-less: a tenant's purge leaves them)."""
    if selection.tenant is not None:
        return []
    a = campaign_attempts.c
    found: list[int] = []
    with store.reading() as conn:
        for row in conn.execute(select(a.id, a.call_id, a.target, a.ended_at)):
            if (row.call_id in done
                    or (selection.before is not None and row.ended_at is not None and row.ended_at < selection.before)
                    or (selection.caller is not None and _digits(row.target) == _digits(selection.caller))):
                found.append(row.id)
    return found


class RetentionJob:
    """`callbot serve`'s purge of calls older than `days` (0: kept for ever), a tenant's older than its own
    period in `tenants` (name -> days), at start and every `every_s` after, on a thread of its own; one
    log line for each period that deleted something (or failed)."""

    def __init__(self, dirs: list[str], store_url: str | None, days: float, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.time, tenants: dict[str, float] | None = None):
        self.dirs = dirs
        self.store_url = store_url
        self.days = days
        self.tenants = dict(tenants or {})
        self.every_s = every_s
        self.clock = clock
        # what Prometheus reads (app/metrics.py watch_retention): a purge that keeps failing is a compliance
        # problem (calls kept past their period) that one log line an hour is too easy to miss
        self.runs = 0  # purges that ran to their end
        self.failures = 0  # purges that failed (a store down, a folder gone)
        self.deleted = 0  # calls deleted in all
        self.not_deleted = 0  # files a purge could not delete (their call is tried again next run)
        self.last_success = 0.0  # clock time of the last purge that ran to its end (0: none yet)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> RetentionJob:
        self._thread.start()
        return self

    def run_once(self) -> Report:
        now = self.clock()
        periods = [(f"tenant {name}'s calls", days, Selection(before=now - days * 86400, tenant=name))
                   for name, days in sorted(self.tenants.items()) if days > 0]
        if self.days > 0:
            periods.append(("calls", self.days, Selection(before=now - self.days * 86400,
                                                         other_tenants=frozenset(self.tenants))))
        total = Report()
        store = None
        try:
            if self.store_url is not None and store_exists(self.store_url):
                store = CallStore(self.store_url)
            for what, days, selection in periods:
                report = purge(self.dirs, store, selection, now=now)
                total.calls += report.calls
                total.files += report.files
                total.bytes += report.bytes
                total.rows += report.rows
                total.attempts += report.attempts
                total.going_on += report.going_on
                total.problems += report.problems
                if report.calls or report.problems:
                    log.warning("retention: %s started more than %g days ago: %s%s", what, days,
                                report.line(False), f"; {len(report.problems)} files not deleted, e.g. "
                                f"{report.problems[0]}" if report.problems else "")
        finally:
            if store is not None:
                store.close()
        self.runs += 1
        self.deleted += total.calls
        self.not_deleted += len(total.problems)
        self.last_success = self.clock()
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as err:  # noqa: BLE001 - a store down, a folder gone: the next run tries again
                self.failures += 1
                log.warning("retention: the purge failed (%s); tried again in %g s", _one_line(err), self.every_s)
            self._stop.wait(self.every_s)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


def store_exists(url: str) -> bool:
    """An SQLite store not made yet is no store to purge (and is not made for it)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.get_backend_name() != "sqlite" or bool(parsed.database and os.path.isfile(parsed.database))


def _stamped(name: str) -> float | None:
    """The UTC start a recording's file name begins with (app/recording.py recording_name)."""
    stamp = _STAMP.match(name)
    try:
        return calendar.timegm(time.strptime(stamp.group(1), "%Y%m%dT%H%M%SZ")) if stamp else None
    except ValueError:
        return None


def _digits(text: str | None) -> str:
    return re.sub(r"\D", "", text or "")


def _uri_user(uri: str | None) -> str | None:
    m = re.search(r"sips?:([^@;>]+)@", uri or "")
    return m.group(1) if m else None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _one_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__
