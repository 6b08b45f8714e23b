"""The call store's writes: a call as it starts, its events as they come, its record as it changes, the
call finished at hang-up, its analysis when done, and past calls imported from their JSON records.

Each write is one transaction: the database holds a call as it was after some whole write, never half
of one, so a process killed mid-call leaves the call with `complete` false and everything written up to
the last commit. A call is marked complete only by `call_finished` (or by importing a sidecar that says
its recording is complete). `writes()` groups several writes in one transaction: the app's store writer
(app/store_writer.py) commits what its queue holds at once, so a busy server costs one commit per batch,
not one per event.

Updates never erase what is known: a later record's missing field leaves the stored one (a call first
seen through its events, then through its record), `complete` never goes back to false, and a finished
call is changed only by another final record or an import, never by a live update that came late.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from typing import Any, Iterable, Iterator

import msgspec
from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from callbot.analytics.result import CallAnalysis, CallMetrics, LegMetrics
from callbot.store import migrate
from callbot.store.database import StoreError, open_engine, reading
from callbot.store.records import (call_row, consultation_of, consultation_row, event_row, leg_rows,
                                   transition_row)
from callbot.store.schema import (ANALYSIS_TABLES, analysis_runs, calls, category_hits, events, flow_transitions, legs,
                                  metrics, score_items, scores, segments, tenants, transcript_words, turns)

KNOWN_CALLS_KEPT = 10_000  # Call-IDs remembered as present (saves a statement per event); then forgotten
_CALL_KEY = {"call_id"}
_OR_COLUMNS = {"complete"}  # once true, stays true
_NEW_COLUMNS = {"updated_at"}  # always the newest


class CallStore:
    """The store at one database URL, migrated to the newest schema when opened."""

    def __init__(self, url: str, *, migrate_schema: bool = True):
        self.url = url
        self.engine: Engine = open_engine(url)
        if migrate_schema:
            migrate.upgrade(self.engine)
        self._known: set[str] = set()
        self._known_lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> CallStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def reading(self):
        """A connection for queries (store/queries.py)."""
        return reading(self.engine)

    @contextlib.contextmanager
    def writes(self) -> Iterator[Writes]:
        """One transaction for several writes: committed when the block ends, rolled back if it raises."""
        with self.engine.begin() as conn:
            w = Writes(self, conn)
            yield w
            w.flush()
        with self._known_lock:  # only once committed: a rolled-back call row is not there
            if len(self._known) > KNOWN_CALLS_KEPT:
                self._known.clear()
            self._known.update(w.added)

    def call_started(self, record: dict) -> None:
        with self.writes() as w:
            w.call_started(record)

    def event(self, call_id: str, event: dict) -> None:
        with self.writes() as w:
            w.event(call_id, event)

    def call_updated(self, record: dict) -> None:
        with self.writes() as w:
            w.call_updated(record)

    def call_finished(self, record: dict) -> None:
        with self.writes() as w:
            w.call_finished(record)

    def save_analysis(self, call_id: str, analysis: CallAnalysis | dict) -> None:
        with self.writes() as w:
            w.save_analysis(call_id, analysis)

    def import_call(self, record: dict, lines: Iterable[dict] | None, *, directory: str | None = None,
                    merge: bool = False) -> str:
        """Puts a past call (its sidecar's content and its events file's lines) into the store: "imported"
        (new), "replaced" (the store had it incomplete: its row is written from the sidecar, and the
        file's events the store lacks are added; the store may hold more, e.g. those from before the
        recording began) or "skipped" (the store has it complete). With `merge`, a call the store has
        complete still gets the file's events it lacks ("merged"): the writes of a running server that
        the database refused for a while (app/store_writer.py)."""
        call_id = str(record["call_id"])
        complete = bool((record.get("recording") or {}).get("complete"))
        with self.writes() as w:
            was = w.conn.execute(select(calls.c.complete).where(calls.c.call_id == call_id)).first()
            if was is not None and was.complete:
                if not merge:
                    return "skipped"
                if lines is not None:
                    have = Counter(_event_key(d) for d in w.conn.execute(
                        select(events.c.data).where(events.c.call_id == call_id)).scalars())
                    w.events_of(call_id, _missing(lines, have))
                return "merged"
            w.put_record(record, complete=complete, directory=directory, replace=was is None)
            if lines is not None:
                if was is not None:
                    have = Counter(_event_key(d) for d in w.conn.execute(
                        select(events.c.data).where(events.c.call_id == call_id)).scalars())
                    lines = _missing(lines, have)
                w.events_of(call_id, lines)
        return "imported" if was is None else "replaced"

    def known(self, call_id: str) -> bool:
        with self._known_lock:
            return call_id in self._known


class Writes:
    """The writes of one transaction (CallStore.writes)."""

    def __init__(self, store: CallStore, conn: Connection):
        self.store = store
        self.conn = conn
        self.added: set[str] = set()  # call rows this transaction made sure of
        self._events: list[tuple[str, dict]] = []  # (call_id, line) to insert at once (flush)

    # ---- calls -------------------------------------------------------------------------------------

    def call_started(self, record: dict) -> None:
        self.put_record(record, complete=False)

    def call_updated(self, record: dict) -> None:
        self.put_record(record, complete=False)

    def call_finished(self, record: dict) -> None:
        self.put_record(record, complete=True)

    def put_record(self, record: dict, *, complete: bool, directory: str | None = None, replace: bool = False) -> None:
        """Writes the call's row (and its tenant, its legs) from its record. `replace`: every column from
        this record (an import), else fields it lacks keep their stored values."""
        self.flush()  # the events before it first: their flow transitions, then the record
        row = call_row(record, complete=complete, directory=directory)
        if row["tenant"] is not None:
            self.conn.execute(_statement(self.conn, "tenant"), {"name": row["tenant"], "created_at": time.time()})
        mode = "replace" if replace else "final" if complete else "live"
        written = self.conn.execute(_statement(self.conn, mode), row).first()
        call_id = row["call_id"]
        self.added.add(call_id)
        if written is None:  # finished already: this late update is left out, legs included
            return
        self.conn.execute(delete(legs).where(legs.c.call_id == call_id, legs.c.kind == "transfer"))
        for leg in leg_rows(record):
            self.conn.execute(insert(legs).values(**leg))
        transferred = consultation_of(record)
        if transferred is not None:
            self.ensure_call(transferred)
            self.conn.execute(delete(legs).where(legs.c.call_id == transferred, legs.c.leg_call_id == call_id))
            self.conn.execute(insert(legs).values(**consultation_row(record)))

    def ensure_call(self, call_id: str, direction: str | None = None) -> None:
        """A row for a call first seen through an event (its record comes later, or never)."""
        if call_id in self.added or self.store.known(call_id):
            return
        self.conn.execute(_insert(self.conn, calls).values(
            call_id=call_id, direction=direction, complete=False, outcome="open", updated_at=time.time())
            .on_conflict_do_nothing(index_elements=["call_id"]))
        self.added.add(call_id)

    # ---- events ------------------------------------------------------------------------------------

    def event(self, call_id: str, line: dict) -> None:
        """One event of a call, as its events-file line (`event`, `ts` and its fields)."""
        self.ensure_call(call_id, line.get("direction") if isinstance(line.get("direction"), str) else None)
        self._events.append((call_id, line))

    def flush(self) -> None:
        """Inserts the events `event` gathered, in one statement per table (the transaction's end does it)."""
        pending, self._events = self._events, []
        rows = [event_row(call_id, line) for call_id, line in pending]
        moves = [m for m in (transition_row(call_id, line) for call_id, line in pending) if m is not None]
        self._insert_events(rows, moves)

    def events_of(self, call_id: str, lines: Iterable[dict], chunk: int = 500) -> int:
        """Inserts lines of one call's events (its row must exist), their flow transitions too; the call's
        flow columns follow its last transition. Returns how many."""
        n = 0
        batch: list[dict] = []
        moves: list[dict] = []
        for line in lines:
            batch.append(event_row(call_id, line))
            move = transition_row(call_id, line)
            if move is not None:
                moves.append(move)
            n += 1
            if len(batch) >= chunk:
                self._insert_events(batch, moves)
                batch, moves = [], []
        self._insert_events(batch, moves)
        return n

    def _insert_events(self, batch: list[dict], moves: list[dict]) -> None:
        if batch:
            self.conn.execute(insert(events), batch)
        if moves:
            self.conn.execute(insert(flow_transitions), moves)
            last = {m["call_id"]: m for m in moves}  # each call's flow columns follow its last transition
            for call_id, m in last.items():
                state = m["to_state"] or m["from_state"]  # "" = the flow ended: the state it ended in
                self.conn.execute(update(calls).where(calls.c.call_id == call_id).values(
                    flow_name=m["flow"] or None, flow_state=state or None, flow_reason=m["reason"] or None,
                    updated_at=time.time()))

    # ---- the analysis -------------------------------------------------------------------------------

    def save_analysis(self, call_id: str, analysis: CallAnalysis | dict) -> None:
        """Keeps an analysis of a call: a run (the whole result as JSON) and, replacing the call's previous
        ones, its words, segments, metrics, turns, categories and scores. StoreError for an unknown call."""
        if isinstance(analysis, dict):
            try:
                analysis = msgspec.convert(analysis, CallAnalysis)
            except msgspec.ValidationError as err:
                raise StoreError(f"call {call_id}: not an analysis: {err}") from None
        self.flush()
        if self.conn.execute(select(calls.c.call_id).where(calls.c.call_id == call_id)).first() is None:
            raise StoreError(f"no call {call_id!r} in the store: its analysis cannot be kept")
        c = self.conn
        for table in ANALYSIS_TABLES:  # score_items go with their scores (ON DELETE CASCADE; SQLite: foreign_keys=ON)
            if table is scores:
                c.execute(delete(score_items).where(score_items.c.score_id.in_(
                    select(scores.c.id).where(scores.c.call_id == call_id))))
            c.execute(delete(table).where(table.c.call_id == call_id))
        c.execute(insert(analysis_runs).values(
            call_id=call_id, version=analysis.version, analyzed_at=analysis.analyzed_at or time.time(),
            seconds=analysis.seconds, transcript_engine=analysis.transcript_engine,
            redacted_recording=analysis.redacted_recording, errors=list(analysis.errors),
            result=msgspec.to_builtins(analysis)))
        _many(c, transcript_words, [dict(call_id=call_id, leg=w.leg, start_ms=w.start_ms, end_ms=w.end_ms,
                                         text=w.text, redacted=w.redacted) for w in analysis.words])
        _many(c, segments, [dict(call_id=call_id, leg=s.leg, start_ms=s.start_ms, end_ms=s.end_ms)
                            for s in analysis.segments])
        _many(c, turns, [dict(call_id=call_id, leg=t.leg, start_ms=t.start_ms, end_ms=t.end_ms, text=t.text,
                              sentiment=t.sentiment) for t in analysis.turns])
        _many(c, metrics, [dict(call_id=call_id, leg=leg, name=name, value=value)
                           for leg, name, value in metric_rows(analysis.metrics)])
        _many(c, category_hits, [dict(call_id=call_id, category=h.category, matched=h.matched,
                                      evidence=list(h.evidence)) for h in analysis.categories])
        for s in analysis.scores:
            score_id = c.execute(insert(scores).values(call_id=call_id, scorecard=s.scorecard, score=s.score,
                                                       max_score=s.max_score).returning(scores.c.id)).scalar_one()
            _many(c, score_items, [dict(score_id=score_id, rule=i.rule, weight=i.weight, passed=i.passed)
                                   for i in s.items])


def _event_key(line: dict) -> str:
    """An event without the time it was logged: the store's writer and the recorder log the same event
    a few milliseconds apart."""
    return json.dumps({k: v for k, v in line.items() if k != "ts"}, sort_keys=True)


def _missing(lines: Iterable[dict], have: Counter) -> Iterator[dict]:
    for line in lines:
        key = _event_key(line)
        if have[key] > 0:
            have[key] -= 1
        else:
            yield line


def metric_rows(m: CallMetrics) -> list[tuple[str, str, float]]:
    """(leg, name, value) of every number in the metrics: the call's own under leg "call", each leg's
    under its name. Lists (each latency) stay in the run's JSON; None (not measured) is left out. A new
    field of CallMetrics or LegMetrics becomes a row by itself."""
    rows: list[tuple[str, str, float]] = []

    def numbers(leg: str, struct: Any) -> None:
        for name in struct.__struct_fields__:
            value = getattr(struct, name)
            if isinstance(value, LegMetrics):
                numbers(name, value)
            elif isinstance(value, (int, float)) and not isinstance(value, str):
                rows.append((leg, name, float(value)))

    numbers("call", m)
    return rows


def _many(conn: Connection, table, rows: list[dict]) -> None:
    if rows:
        conn.execute(insert(table), rows)


_STATEMENTS: dict[tuple[str, str], Any] = {}


def _statement(conn: Connection, kind: str):
    """The upserts, built once per dialect (a statement of 30 columns costs milliseconds to build, and is
    the same every time; the values come as parameters)."""
    key = (conn.dialect.name, kind)
    stmt = _STATEMENTS.get(key)
    if stmt is not None:
        return stmt
    if kind == "tenant":
        stmt = _insert(conn, tenants).on_conflict_do_nothing(index_elements=["name"])
    else:
        stmt = _insert(conn, calls)
        x = stmt.excluded
        columns = [c.name for c in calls.columns if c.name not in _CALL_KEY]
        if kind == "replace":
            changes = {c: x[c] for c in columns}
        else:
            changes = {c: or_(calls.c[c], x[c]) if c in _OR_COLUMNS else x[c] if c in _NEW_COLUMNS
                       else func.coalesce(x[c], calls.c[c]) for c in columns}
        # a finished call is changed only by its final record (or an import): a live snapshot late in a
        # queue must not undo what its end wrote
        only = calls.c.complete.is_(False) if kind == "live" else None
        stmt = stmt.on_conflict_do_update(index_elements=["call_id"], set_=changes, where=only) \
            .returning(calls.c.call_id)
    _STATEMENTS[key] = stmt
    return stmt


def _insert(conn: Connection, table):
    """INSERT with ON CONFLICT, in the connection's dialect (both have it, spelled by their own classes)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
