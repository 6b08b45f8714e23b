"""The call store's tables, as the newest migration leaves them (SQLAlchemy Core, one schema for SQLite
and PostgreSQL).

Why Core and not an ORM: the store writes rows from a queue and answers filtered listings; there are no
objects with behaviour to map, and Core's SQL expressions say exactly what runs on both databases.
The migrations (store/migrations/versions/) create these tables; a test compares the two, so that this
file and the migrations cannot drift apart. Queries and writes import the tables from here.

Times are wall-clock unix seconds (floats), as in the call records; `*_ms` times are milliseconds from
the start of the call's recording, as in the analysis (analytics/result.py). A call's whole record (its
JSON sidecar's content) is kept in `calls.record`, so nothing a record holds is lost when a field has no
column of its own; metrics are kept long (call, leg, name, value), so that a new metric of the analysis
needs no migration.
"""
from __future__ import annotations

from sqlalchemy import (JSON, BigInteger, Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table,
                        Text)
from sqlalchemy.dialects.postgresql import JSONB

# names for constraints and indexes, so that both databases and every migration agree on them
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

# JSON documents: JSONB on PostgreSQL (indexable, compact), JSON text on SQLite
Json = JSON().with_variant(JSONB(), "postgresql")
# row ids: 64-bit on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the rowid (autoincrementing)
RowId = BigInteger().with_variant(Integer(), "sqlite")
CallId = String(512)  # a SIP Call-ID as the record shows it (peer bytes escaped: up to 4x the wire length)


def _call_fk() -> ForeignKey:
    return ForeignKey("calls.call_id", ondelete="CASCADE")


tenants = Table(
    "tenants", metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

calls = Table(
    "calls", metadata,
    Column("call_id", CallId, primary_key=True),
    Column("direction", String(16)),
    Column("tenant", String(64), ForeignKey("tenants.name")),
    Column("bot", String(128)),
    Column("route", String(128)),
    Column("account", String(128)),
    Column("caller", Text),
    Column("called", Text),
    Column("local_uri", Text),
    Column("remote_uri", Text),
    Column("start_at", Float),
    Column("answered_at", Float),
    Column("end_at", Float),
    Column("duration_s", Float),  # answer to end; None while unanswered or going on
    Column("codec", String(32)),
    Column("clock_rate", Integer),
    Column("hangup_cause", String(32)),
    Column("hangup_code", Integer),
    Column("hangup_reason", Text),
    Column("transfer_target", Text),
    Column("transfer_succeeded", Boolean),
    Column("flow_name", String(128)),
    Column("flow_state", String(128)),  # the state the flow is in, or the last one it was in once ended
    Column("flow_reason", String(64)),  # the last transition's reason
    Column("outcome", String(32)),  # store/records.py outcome_of
    Column("complete", Boolean, nullable=False, default=False),  # finished at hang-up (False: going on or cut)
    Column("recording_path", Text),
    Column("recording_seconds", Float),
    Column("events_path", Text),
    Column("record", Json),  # the whole call record, as its JSON sidecar holds it
    Column("updated_at", Float, nullable=False),
    Index(None, "start_at"),
    Index(None, "bot"),
    Index(None, "tenant"),
    Index(None, "outcome"),
)

legs = Table(
    "legs", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("kind", String(32), nullable=False),  # "transfer" (a REFER) | "consultation" (an attended transfer's leg)
    Column("leg_call_id", CallId),  # the consultation leg's own Call-ID
    Column("target", Text),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("succeeded", Boolean),
    Column("code", Integer),
    Column("reason", Text),
    Column("detail", Json),
    Index(None, "call_id"),
)

events = Table(
    "events", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),  # the order events were written in
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("t", Float),  # wall clock when it was logged (the events file's `ts`)
    Column("t_ms", Float),  # the event's own time in the call, when it has one
    Column("type", String(64), nullable=False),
    Column("data", Json, nullable=False),  # the events file's line
    Index(None, "call_id", "id"),
)

flow_transitions = Table(
    "flow_transitions", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("t", Float),
    Column("t_ms", Float),
    Column("flow", String(128), nullable=False),
    Column("from_state", String(128), nullable=False),
    Column("to_state", String(128), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("detail", Text, nullable=False),
    Index(None, "call_id", "id"),
)

# ---- the analysis (migration 0002) ---------------------------------------------------------------------

analysis_runs = Table(
    "analysis_runs", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("version", Integer, nullable=False),
    Column("analyzed_at", Float, nullable=False),
    Column("seconds", Float, nullable=False),
    Column("transcript_engine", String(64), nullable=False),
    Column("redacted_recording", Text),
    Column("errors", Json, nullable=False),
    Column("result", Json, nullable=False),  # the whole CallAnalysis, as the JSON API returns it
    Index(None, "call_id", "id"),
)

# the tables below hold the newest analysis of each call (save_analysis replaces them)

transcript_words = Table(
    "transcript_words", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("leg", String(16), nullable=False),
    Column("start_ms", Float, nullable=False),
    Column("end_ms", Float, nullable=False),
    Column("text", Text, nullable=False),
    Column("redacted", Boolean, nullable=False),
    Index(None, "call_id", "start_ms"),
)

segments = Table(
    "segments", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("leg", String(16), nullable=False),
    Column("start_ms", Float, nullable=False),
    Column("end_ms", Float, nullable=False),
    Index(None, "call_id", "start_ms"),
)

metrics = Table(
    "metrics", metadata,
    Column("call_id", CallId, _call_fk(), primary_key=True),
    Column("leg", String(16), primary_key=True),  # "call" for the whole call, else "caller" | "bot"
    Column("name", String(64), primary_key=True),
    Column("value", Float, nullable=False),
    Index(None, "name", "value"),
)

turns = Table(
    "turns", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("leg", String(16), nullable=False),
    Column("start_ms", Float, nullable=False),
    Column("end_ms", Float, nullable=False),
    Column("text", Text, nullable=False),
    Column("sentiment", Float),
    Index(None, "call_id", "start_ms"),
)

category_hits = Table(
    "category_hits", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("category", String(128), nullable=False),
    Column("matched", Boolean, nullable=False),
    Column("evidence", Json, nullable=False),
    Index(None, "call_id"),
    Index(None, "category", "matched"),
)

scores = Table(
    "scores", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("call_id", CallId, _call_fk(), nullable=False),
    Column("scorecard", String(128), nullable=False),
    Column("score", Float, nullable=False),
    Column("max_score", Float, nullable=False),
    Index(None, "call_id"),
    Index(None, "scorecard", "score"),
)

score_items = Table(
    "score_items", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("score_id", RowId, ForeignKey("scores.id", ondelete="CASCADE"), nullable=False),
    Column("rule", String(128), nullable=False),
    Column("weight", Float, nullable=False),
    Column("passed", Boolean, nullable=False),
    Index(None, "score_id"),
)

# what save_analysis replaces, children before parents
ANALYSIS_TABLES = (transcript_words, segments, metrics, turns, category_hits, scores)

# ---- outbound campaigns (migration 0003) ---------------------------------------------------------------

campaign_attempts = Table(
    "campaign_attempts", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("campaign", String(256), nullable=False),  # the list's file name
    Column("row", Integer, nullable=False),  # 1-based, in the list's order
    Column("attempt", Integer, nullable=False),  # 0: the row ended without a call (do-not-call, outside-window)
    Column("target", Text, nullable=False),
    Column("call_id", CallId),  # no foreign key: an unanswered attempt may have no call row
    Column("disposition", String(32), nullable=False),
    Column("sip_code", Integer),
    Column("reason", Text),
    Column("amd", String(32)),  # human | machine | machine_end_beep | unknown
    Column("amd_ms", Float),
    Column("beep_ms", Float),
    Column("started_at", Float),
    Column("answered_at", Float),
    Column("ended_at", Float),
    Column("variables", Json, nullable=False),
    Index(None, "campaign", "row"),
    Index(None, "call_id"),
    Index(None, "disposition"),
)

# ---- the web panel's users and audit log (migration 0004) ----------------------------------------------

users = Table(
    "users", metadata,
    Column("name", String(64), primary_key=True),
    Column("password_hash", Text, nullable=False),  # argon2id (web/users.py); never a password
    Column("role", String(16), nullable=False),  # admin | supervisor | viewer
    Column("tenant", String(64)),  # None: every tenant; else only that tenant's bots, calls and recordings
    Column("created_at", Float, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("t", Float, nullable=False),
    Column("user", String(64)),  # who (None: the command line, or a sign-in of an unknown name)
    Column("source", String(64)),  # the client's address, or "cli"
    Column("action", String(64), nullable=False),  # user.add, login, login.failed, logout, ...
    Column("target", Text),  # what it acted on (a user's name, a call)
    Column("detail", Json, nullable=False),
    Index(None, "t"),
)
