"""The campaign's state on disk: an SQLite file of its own next to the list (`LIST.csv.campaign.db`),
through SQLAlchemy Core.

Why a file of its own rather than tables in the call store: the state must exist and be exact with the
store switched off or unreachable (a dead PostgreSQL must not make a campaign call people twice), it
belongs to one list (deleting the file starts that list afresh, nothing else is touched), and a local
SQLite commit is the cheapest durable step to take before every INVITE. The call store still gets every
answered call (its record, labelled with the campaign and row) through the app's usual store writer.

The write-ahead rule: an attempt is committed as `dialing` before its INVITE leaves, updated to
`answered` when the call is up, and to `ended` with its disposition at the end (one transaction with the
row's new state). So a dialer killed at any point leaves, for each row, either a finished attempt or
one attempt not ended. On restart such an attempt may have rung the callee (the INVITE may have left),
or even been answered: it is closed as `interrupted` and its row is done, never dialled again, unless a
`resolve(call_id)` callback knows how that call really ended (then its disposition and the retry rules
apply). Calling someone twice is the worse error for a contact center; an interrupted row is listed in
the report so that a person can decide.
"""
from __future__ import annotations

import os
import json
import time
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, create_engine, event, insert,
                        select, update)
from sqlalchemy.exc import SQLAlchemyError

from callbot.campaigns.config import CampaignError
from callbot.campaigns.scheduler import INTERRUPTED, RowState

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))

rows = Table(
    "rows", metadata,
    Column("row", Integer, primary_key=True),
    Column("attempts", Integer, nullable=False),
    Column("next_at", Float, nullable=False),
    Column("disposition", String(32)),
    Column("done", Integer, nullable=False),
)

attempts = Table(
    "attempts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("row", Integer, nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # dialing | answered | ended
    Column("uri", Text, nullable=False),
    Column("call_id", Text),
    Column("disposition", String(32)),
    Column("sip_code", Integer),
    Column("reason", Text),
    Column("amd", String(32)),  # human | machine | machine_end_beep | unknown
    Column("amd_ms", Float),  # when the verdict came, ms after the answer
    Column("beep_ms", Float),
    Column("started_at", Float, nullable=False),
    Column("answered_at", Float),
    Column("ended_at", Float),
    Column("flow", Text),  # JSON: the call's flow, its states entered and how it ended (FlowTransition events)
)


@dataclass
class Attempt:
    id: int
    row: int
    attempt: int
    uri: str
    started_at: float
    call_id: str | None = None
    answered_at: float | None = None


def state_path(list_path: str | os.PathLike) -> str:
    return os.fspath(list_path) + ".campaign.db"


class CampaignState:
    """The state file of one list. `open` checks the list is the one the file was started with."""

    def __init__(self, path: str, digest: str, clock: Callable[[], float] = time.time):
        self.path = path
        self.clock = clock
        self.engine = create_engine(f"sqlite:///{path}")

        @event.listens_for(self.engine, "connect")
        def _durable(dbapi_conn, _record):  # every commit on disk before the INVITE it announces leaves
            dbapi_conn.execute("PRAGMA synchronous=FULL")

        try:
            metadata.create_all(self.engine)
            with self.engine.begin() as conn:
                columns = {r[1] for r in conn.exec_driver_sql("PRAGMA table_info(attempts)")}
                if "flow" not in columns:  # a state file written before attempts kept their flow
                    conn.exec_driver_sql("ALTER TABLE attempts ADD COLUMN flow TEXT")
                known = conn.execute(select(meta.c.value).where(meta.c.key == "list_sha256")).scalar()
                if known is None:
                    conn.execute(insert(meta).values(key="list_sha256", value=digest))
                elif known != digest:
                    raise CampaignError(f"{path}: this campaign was started on another version of the list "
                                        "(rows would be mixed up): restore that list, or remove the state file "
                                        "to start afresh")
        except SQLAlchemyError as err:
            self.engine.dispose()
            raise CampaignError(f"campaign state {path}: {_line(err)}") from None
        except CampaignError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    # ---- restart -----------------------------------------------------------------------------------

    def load(self, resolve: Callable[[str], str | None] | None = None) -> tuple[dict[int, RowState], list[dict]]:
        """The rows' states as saved, after closing the attempts a dead dialer left open (the rule above);
        returns them and the attempts so closed (row, attempt, call_id, disposition)."""
        states: dict[int, RowState] = {}
        closed: list[dict] = []
        now = self.clock()
        with self.engine.begin() as conn:
            for r in conn.execute(select(rows)):
                states[r.row] = RowState(attempts=r.attempts, next_at=r.next_at, disposition=r.disposition,
                                         done=bool(r.done))
            for a in conn.execute(select(attempts).where(attempts.c.status != "ended")).all():
                known = resolve(a.call_id) if resolve is not None and a.call_id else None
                disposition = known or INTERRUPTED
                conn.execute(update(attempts).where(attempts.c.id == a.id).values(
                    status="ended", disposition=disposition, ended_at=now,
                    reason="resolved after a restart" if known else "the dialer stopped during this attempt"))
                s = states.setdefault(a.row, RowState())
                s.attempts = max(s.attempts, a.attempt)
                s.disposition = disposition
                s.done = known is None  # a resolved one goes through the retry rules (the caller's scheduler)
                self._save_row(conn, a.row, s)
                closed.append({"row": a.row, "attempt": a.attempt, "call_id": a.call_id,
                               "disposition": disposition, "resolved": known is not None})
        return states, closed

    # ---- an attempt --------------------------------------------------------------------------------

    def begin(self, row: int, attempt: int, uri: str, state: RowState, call_id: str | None = None) -> Attempt:
        """Committed before the INVITE leaves (status dialing), with the row's attempt count and, when the
        dialer chose it, the Call-ID the INVITE will carry (what a restart looks the call up by)."""
        now = self.clock()
        with self.engine.begin() as conn:
            rid = conn.execute(insert(attempts).values(row=row, attempt=attempt, status="dialing", uri=uri,
                                                       call_id=call_id, started_at=now)).inserted_primary_key[0]
            self._save_row(conn, row, state)
        return Attempt(id=rid, row=row, attempt=attempt, uri=uri, started_at=now, call_id=call_id)

    def dialled(self, a: Attempt, call_id: str) -> None:
        a.call_id = call_id
        with self.engine.begin() as conn:
            conn.execute(update(attempts).where(attempts.c.id == a.id).values(call_id=call_id))

    def answered(self, a: Attempt) -> None:
        """The attempt answered (at `a.answered_at` when the caller set it: a write made again later keeps
        the time the call was answered)."""
        if a.answered_at is None:
            a.answered_at = self.clock()
        with self.engine.begin() as conn:
            conn.execute(update(attempts).where(attempts.c.id == a.id).values(status="answered",
                                                                              answered_at=a.answered_at))

    def end(self, a: Attempt, disposition: str, state: RowState, *, sip_code: int | None = None,
            reason: str | None = None, amd: str | None = None, amd_ms: float | None = None,
            beep_ms: float | None = None, at: float | None = None) -> None:
        """The attempt ended (`at`, default now: a write made again later passes the time it ended)."""
        with self.engine.begin() as conn:
            conn.execute(update(attempts).where(attempts.c.id == a.id).values(
                status="ended", disposition=disposition, sip_code=sip_code, reason=reason, amd=amd, amd_ms=amd_ms,
                beep_ms=beep_ms, ended_at=self.clock() if at is None else at))
            self._save_row(conn, a.row, state)

    def set_flow(self, call_id: str, flow: dict) -> None:
        """The flow's course so far for the attempt that placed `call_id` (its last moves may come after
        the call ended)."""
        with self.engine.begin() as conn:
            conn.execute(update(attempts).where(attempts.c.call_id == call_id).values(flow=json.dumps(flow)))

    def close_row(self, row: int, disposition: str, state: RowState, at: float | None = None) -> None:
        """A row that ends without a call (do-not-call, outside-window): an attempt row of its own, with
        no call, so that the report lists it (`at`: when, default now)."""
        now = self.clock() if at is None else at
        with self.engine.begin() as conn:
            conn.execute(insert(attempts).values(row=row, attempt=0, status="ended", uri="",
                                                 disposition=disposition, started_at=now, ended_at=now))
            self._save_row(conn, row, state)

    def save_row(self, row: int, state: RowState) -> None:
        with self.engine.begin() as conn:
            self._save_row(conn, row, state)

    def _save_row(self, conn, row: int, s: RowState) -> None:
        values = dict(attempts=s.attempts, next_at=s.next_at, disposition=s.disposition, done=int(s.done))
        if conn.execute(update(rows).where(rows.c.row == row).values(**values)).rowcount == 0:
            conn.execute(insert(rows).values(row=row, **values))

    # ---- the report --------------------------------------------------------------------------------

    def all_attempts(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(attempts).order_by(attempts.c.id))]


def _line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__
