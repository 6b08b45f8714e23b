"""What the store answers: calls filtered and listed, one call shown whole, its events and transcript,
counts for a dashboard. `callbot calls list/show/export` (app/cli.py) and the JSON API (store/api.py)
both ask here, so the command line and the web panel see the same calls for the same filters.

Every answer is plain JSON-ready data (dicts, lists, str, float, bool, None). A filter is a `CallFilter`;
`parse_time` reads the times people type (unix seconds, a date, an ISO 8601 time; UTC unless it says).
"""
from __future__ import annotations

import datetime
from typing import Any

import msgspec
from sqlalchemy import Connection, and_, exists, func, or_, select

from callbot.store.schema import (analysis_runs, calls, category_hits, events, flow_transitions, legs, metrics,
                                  score_items, scores, transcript_words, turns)

LIST_LIMIT = 100  # calls a listing shows unless told
MAX_LIMIT = 100_000
EVENTS_LIMIT = 10_000

# the columns of a listing (and of an export), in order
LIST_COLUMNS = ("call_id", "start_at", "duration_s", "direction", "tenant", "bot", "caller", "called", "outcome",
                "hangup_cause", "flow_name", "flow_state", "complete")


class QueryError(ValueError):
    """A filter a user gave that cannot be used (one line)."""


class CallFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which calls: started in [since, until), of a bot, a tenant, with an outcome, a category matched,
    a score in [min_score, max_score] (any of its scorecards), words said (any leg's transcript: the
    analysis's turns and words, case-insensitive), a phone number (`number`: its digits found in the
    caller's or the called number, whatever the punctuation: +1 (212) 555-0100, 2125550100 and 555-0100
    all find +12125550100; inbound the customer is the caller, outbound the called), complete or not."""

    since: float | None = None
    until: float | None = None
    bot: str | None = None
    tenant: str | None = None
    outcome: str | None = None
    category: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    text: str | None = None
    number: str | None = None
    complete: bool | None = None
    limit: int | None = LIST_LIMIT
    offset: int = 0

    def __post_init__(self) -> None:
        if self.number is not None and not number_digits(self.number):
            raise QueryError(f"number {self.number!r}: no digits to look for")
        if self.limit is not None and not 1 <= self.limit <= MAX_LIMIT:
            raise QueryError(f"limit must be 1..{MAX_LIMIT}, got {self.limit}")
        if self.offset < 0:
            raise QueryError(f"offset must be >= 0, got {self.offset}")


def parse_time(text: str) -> float:
    """Unix seconds from "1796276073", "2026-12-03", "2026-12-03T05:34" or "2026-12-03 05:34:33+01:00"
    (UTC unless an offset is given). QueryError otherwise."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(f"{text!r} is not a time: unix seconds, 2026-12-03 or 2026-12-03T05:34[:33][+01:00]") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def iso(t: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (seconds), for people and CSV."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def conditions(f: CallFilter) -> list:
    """The WHERE conditions of a filter on `calls` (the listing, the count, the stats, the dashboard)."""
    conds: list = []
    if f.since is not None:
        conds.append(calls.c.start_at >= f.since)
    if f.until is not None:
        conds.append(calls.c.start_at < f.until)
    for column, value in (("bot", f.bot), ("tenant", f.tenant), ("outcome", f.outcome)):
        if value is not None:
            conds.append(calls.c[column] == value)
    if f.complete is not None:
        conds.append(calls.c.complete == f.complete)
    if f.category is not None:
        conds.append(exists().where(category_hits.c.call_id == calls.c.call_id,
                                    category_hits.c.category == f.category, category_hits.c.matched.is_(True)))
    if f.min_score is not None or f.max_score is not None:
        score = [scores.c.call_id == calls.c.call_id]
        if f.min_score is not None:
            score.append(scores.c.score >= f.min_score)
        if f.max_score is not None:
            score.append(scores.c.score <= f.max_score)
        conds.append(exists().where(and_(*score)))
    if f.number is not None:
        like = f"%{number_digits(f.number)}%"
        conds.append(or_(_digits_of(calls.c.caller).like(like), _digits_of(calls.c.called).like(like)))
    if f.text:
        needle = f.text.lower()
        conds.append(or_(
            exists().where(turns.c.call_id == calls.c.call_id,
                           func.lower(turns.c.text).contains(needle, autoescape=True)),
            exists().where(transcript_words.c.call_id == calls.c.call_id,
                           func.lower(transcript_words.c.text).contains(needle, autoescape=True))))
    return conds


_PUNCTUATION = ("+", " ", "-", "(", ")", ".", "/")  # what a written phone number holds beside its digits


def number_digits(text: str) -> str:
    """The digits of a phone number as a person writes it."""
    return "".join(ch for ch in text if ch.isdigit())


def _digits_of(column):
    """`column` with a phone number's punctuation removed, in SQL (replace() is in SQLite and PostgreSQL).
    A SIP caller may also be a URI user part with letters: those stay and simply never match digits."""
    for ch in _PUNCTUATION:
        column = func.replace(column, ch, "")
    return column


def list_calls(conn: Connection, f: CallFilter = CallFilter()) -> list[dict]:
    """The calls the filter takes, newest first, each with LIST_COLUMNS, its matched categories and its
    scores ({scorecard: score})."""
    q = select(*(calls.c[c] for c in LIST_COLUMNS)).where(*conditions(f)) \
        .order_by(calls.c.start_at.desc().nulls_last(), calls.c.call_id).offset(f.offset or None)
    if f.limit is not None:
        q = q.limit(f.limit)
    rows = [dict(r._mapping) for r in conn.execute(q)]
    ids = [r["call_id"] for r in rows]
    cats: dict[str, list[str]] = {i: [] for i in ids}
    marks: dict[str, dict[str, float]] = {i: {} for i in ids}
    for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
        for r in conn.execute(select(category_hits.c.call_id, category_hits.c.category)
                              .where(category_hits.c.call_id.in_(chunk), category_hits.c.matched.is_(True))
                              .order_by(category_hits.c.id)):
            cats[r.call_id].append(r.category)
        for r in conn.execute(select(scores.c.call_id, scores.c.scorecard, scores.c.score)
                              .where(scores.c.call_id.in_(chunk)).order_by(scores.c.id)):
            marks[r.call_id][r.scorecard] = r.score
    for r in rows:
        r["complete"] = bool(r["complete"])
        r["categories"] = cats[r["call_id"]]
        r["scores"] = marks[r["call_id"]]
    return rows


def count_calls(conn: Connection, f: CallFilter = CallFilter()) -> int:
    return conn.execute(select(func.count()).select_from(calls).where(*conditions(f))).scalar_one()


def call_detail(conn: Connection, call_id: str) -> dict | None:
    """One call whole: its row and record, legs, flow path, transcript, metrics, categories, scores and
    the newest analysis run (without the events: `call_events`). None if the store has no such call."""
    row = conn.execute(select(calls).where(calls.c.call_id == call_id)).first()
    if row is None:
        return None
    call = dict(row._mapping)
    record = call.pop("record", None)
    call["complete"] = bool(call["complete"])
    detail: dict[str, Any] = {"call": call, "record": record}
    detail["legs"] = [_plain(r, drop=("id",)) for r in conn.execute(
        select(legs).where(legs.c.call_id == call_id).order_by(legs.c.id))]
    moves = [_plain(r, drop=("id", "call_id")) for r in conn.execute(
        select(flow_transitions).where(flow_transitions.c.call_id == call_id).order_by(flow_transitions.c.id))]
    path = [m["to_state"] for m in moves if m["to_state"]]
    if moves and moves[0]["from_state"]:  # the flow's start came before the events did
        path.insert(0, moves[0]["from_state"])
    detail["flow"] = {"name": call["flow_name"], "path": path, "transitions": moves}
    detail["transcript"] = call_transcript(conn, call_id)
    values: dict[str, dict[str, float]] = {}
    for r in conn.execute(select(metrics).where(metrics.c.call_id == call_id).order_by(metrics.c.leg, metrics.c.name)):
        values.setdefault(r.leg, {})[r.name] = r.value
    detail["metrics"] = values
    detail["categories"] = [_plain(r, drop=("id", "call_id")) for r in conn.execute(
        select(category_hits).where(category_hits.c.call_id == call_id).order_by(category_hits.c.id))]
    cards = []
    for r in conn.execute(select(scores).where(scores.c.call_id == call_id).order_by(scores.c.id)):
        items = [_plain(i, drop=("id", "score_id")) for i in conn.execute(
            select(score_items).where(score_items.c.score_id == r.id).order_by(score_items.c.id))]
        cards.append({"scorecard": r.scorecard, "score": r.score, "max_score": r.max_score, "items": items})
    detail["scores"] = cards
    run = conn.execute(select(analysis_runs).where(analysis_runs.c.call_id == call_id)
                       .order_by(analysis_runs.c.id.desc()).limit(1)).first()
    detail["analysis"] = None if run is None else _plain(run, drop=("id", "call_id", "result"))
    detail["events"] = conn.execute(select(func.count()).select_from(events)
                                    .where(events.c.call_id == call_id)).scalar_one()
    return detail


def call_events(conn: Connection, call_id: str, limit: int = EVENTS_LIMIT) -> list[dict] | None:
    """The call's events in the order they were logged (each its events-file line; events imported later
    from the file fall into their place by time); None: no such call."""
    if conn.execute(select(calls.c.call_id).where(calls.c.call_id == call_id)).first() is None:
        return None
    return [r.data for r in conn.execute(select(events.c.data).where(events.c.call_id == call_id)
                                         .order_by(events.c.t, events.c.id).limit(limit))]


def call_transcript(conn: Connection, call_id: str) -> dict:
    """The call's words: the analysis's turns and words (PII redacted there) and, from the live events,
    the caller recognizer's final utterances and the bot's text pieces (`live`)."""
    words = [_plain(r, drop=("id", "call_id")) for r in conn.execute(
        select(transcript_words).where(transcript_words.c.call_id == call_id)
        .order_by(transcript_words.c.start_ms, transcript_words.c.id))]
    said = [_plain(r, drop=("id", "call_id")) for r in conn.execute(
        select(turns).where(turns.c.call_id == call_id).order_by(turns.c.start_ms, turns.c.id))]
    live = []
    for r in conn.execute(select(events.c.type, events.c.data).where(
            events.c.call_id == call_id, events.c.type.in_(("CallerWords", "BotText"))).order_by(events.c.id)):
        d = r.data
        if r.type == "CallerWords" and d.get("final"):
            live.append({"leg": "caller", "t_ms": d.get("start_ms"), "text": d.get("text", "")})
        elif r.type == "BotText":
            live.append({"leg": "bot", "t_ms": d.get("t_ms"), "text": d.get("piece", "")})
    return {"turns": said, "words": words, "live": live}


def stats(conn: Connection, f: CallFilter = CallFilter(limit=None)) -> dict:
    """Counts of the calls the filter takes (its limit ignored): in all, by outcome, by bot, per hour
    (UTC, hours with calls only)."""
    where = conditions(f)
    total = conn.execute(select(func.count()).select_from(calls).where(*where)).scalar_one()
    by: dict[str, dict[str, int]] = {}
    for column in ("outcome", "bot"):
        q = select(calls.c[column], func.count()).where(*where).group_by(calls.c[column]).order_by(calls.c[column])
        by[column] = {(k if k is not None else ""): n for k, n in conn.execute(q)}
    hours: dict[int, int] = {}
    for (start,) in conn.execute(select(calls.c.start_at).where(*where, calls.c.start_at.is_not(None))):
        hour = int(start // 3600) * 3600
        hours[hour] = hours.get(hour, 0) + 1
    return {"calls": total, "by_outcome": by["outcome"], "by_bot": by["bot"],
            "per_hour": [{"hour": iso(h), "calls": n} for h, n in sorted(hours.items())]}


def _plain(row, drop: tuple[str, ...] = ()) -> dict:
    d = {k: v for k, v in row._mapping.items() if k not in drop}
    for k, v in d.items():
        if k in ("matched", "redacted", "passed", "succeeded") and v is not None:
            d[k] = bool(v)
    return d
