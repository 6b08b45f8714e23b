"""The call store (store/; issue 14, points 1 and 6) on real databases: every test runs on SQLite and on
PostgreSQL (a real server, tests/pg_server.py, started once per session).

Checked: the migrations build what store/schema.py says, from an empty database and from revision 0001
holding calls; a schema newer than the program is refused in one line; the writes (a call started,
updated, finished, its events and flow transitions; complete only at finish, never erased); importing
the files the real Recorder writes, idempotent, a crashed call's files completing what the store had;
the analysis kept and found by the filters; `callbot calls import/list/show/export` as processes; the
JSON API over HTTP from a live uvicorn; the serve-side writer (app/store_writer.py) fed by a real event
bus and the real Recorder, and a dead database costing counted drops and one log line.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import pathlib
import subprocess
import sys

import httpx
import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from callbot.analytics.result import (CallAnalysis, CallMetrics, CategoryHit, LegMetrics, Score, ScoreItem, Segment,
                                      Turn, Word)
from callbot.app.event_bus import EventBus
from callbot.app.recording import Recorder
from callbot.app.store_writer import StoreWriter
from callbot.engine.contract import BotText, CallerWords, FlowTransition, FrameStages
from callbot.sip import events as ev
from callbot.sip.call_record import CallRecord
from callbot.store import migrate, queries
from callbot.store.api import ApiServer
from callbot.store.call_store import CallStore, metric_rows
from callbot.store.database import StoreError, open_engine, sqlite_url
from callbot.store.importer import import_dir
from callbot.store.queries import CallFilter, QueryError
from callbot.store.schema import calls, events, flow_transitions, legs, metadata, metrics
from tests.sip_peers import eventually, free_port

pytestmark = pytest.mark.timeout(120)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
T0 = 1_796_276_073.0  # 2026-12-03T05:34:33Z


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "calls.db")
    return request.getfixturevalue("postgres_server").new_database()


def _record(call_id: str, **over) -> dict:
    rec = {"call_id": call_id, "direction": "inbound", "account": "line", "local_uri": "<sip:menu@127.0.0.1>",
           "remote_uri": "<sip:bob@127.0.0.1>", "start": T0, "answered": T0 + 0.5, "end": None, "codec": "G722",
           "clock_rate": 16000, "caller": "bob", "called": "menu", "transfer": None, "flow": None,
           "hangup_cause": None, "hangup_code": None, "hangup_reason": None,
           "labels": {"bot": "support", "tenant": "acme", "route": "default"}}
    rec.update(over)
    return rec


def _line(event: str, call_id: str, t: float, **fields) -> dict:
    import datetime

    ts = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")
    return {"ts": ts, "event": event, "call_id": call_id, **fields}


def _analysis(call_id: str, *, said: str, score: float, category: str | None) -> CallAnalysis:
    return CallAnalysis(
        call_id=call_id, analyzed_at=T0 + 100, seconds=0.4, transcript_engine="live",
        segments=[Segment(leg="caller", start_ms=100, end_ms=900), Segment(leg="bot", start_ms=1000, end_ms=2000)],
        words=[Word(leg="caller", start_ms=100 + 100 * i, end_ms=180 + 100 * i, text=w)
               for i, w in enumerate(said.split())] + [Word(leg="caller", start_ms=900, end_ms=950, text="[card]",
                                                            redacted=True)],
        turns=[Turn(leg="caller", start_ms=100, end_ms=900, text=said, sentiment=-0.4),
               Turn(leg="bot", start_ms=1000, end_ms=2000, text="thank you for calling", sentiment=0.5)],
        metrics=CallMetrics(duration_ms=2500, caller=LegMetrics(talk_ms=800, words=len(said.split())),
                            bot=LegMetrics(talk_ms=1000, loudness_dbfs=-20.0), overtalk_ms=0.0,
                            response_latency_ms=[100.0], response_latency_p50_ms=100.0),
        categories=[CategoryHit(category=category, matched=True, evidence=["bot said disclosure at 1.0 s"])]
        if category else [CategoryHit(category="disclosure", matched=False)],
        scores=[Score(scorecard="qa", score=score, max_score=10,
                      items=[ScoreItem(rule="greeted", weight=score, passed=True),
                             ScoreItem(rule="disclosure", weight=10 - score, passed=False)])])


# ---- migrations -----------------------------------------------------------------------------------------

def test_an_empty_database_gets_the_schema_that_schema_py_declares(url):
    assert migrate.upgrade(url) == migrate.head() == "0004"
    engine = open_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert migrate.upgrade(url) == "0004"  # again: nothing to do
    finally:
        engine.dispose()


def test_a_0001_database_with_calls_is_upgraded_and_keeps_them(url):
    assert migrate.upgrade(url, "0001") == "0001"
    engine = open_engine(url)
    try:
        with engine.begin() as conn:  # written the way 0001's program wrote: no analysis tables exist yet
            assert "analysis_runs" not in _tables(conn)
            conn.execute(insert(calls).values(call_id="old-1", complete=True, outcome="caller_hangup",
                                              start_at=T0, bot="support", updated_at=T0, record={"call_id": "old-1"}))
            conn.execute(insert(events).values(call_id="old-1", t=T0, type="CallConfirmed",
                                               data={"event": "CallConfirmed"}))
    finally:
        engine.dispose()
    with CallStore(url) as store:  # opening it migrates
        assert migrate.current(store.engine) == "0004"
        store.save_analysis("old-1", _analysis("old-1", said="hello there", score=7, category="greeting"))
        with store.reading() as conn:
            assert queries.list_calls(conn)[0]["call_id"] == "old-1"
            assert queries.call_events(conn, "old-1") == [{"event": "CallConfirmed"}]
            assert [r["call_id"] for r in queries.list_calls(conn, CallFilter(category="greeting"))] == ["old-1"]


def test_a_newer_schema_is_refused_in_one_line(url):
    migrate.upgrade(url)
    engine = open_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError) as err:
        CallStore(url)
    assert "revision 0099, newer than this callbot knows (up to 0004)" in str(err.value)
    assert "\n" not in str(err.value)


def _tables(conn) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(conn).get_table_names())


# ---- writes ---------------------------------------------------------------------------------------------

def test_a_call_is_complete_only_at_finish_and_nothing_known_is_erased(url):
    with CallStore(url) as store:
        # first seen through an event (a stub), then through its record
        store.event("c1", _line("IncomingCall", "c1", T0, account="line", remote_uri="<sip:bob@h>",
                                local_uri="<sip:menu@h>"))
        store.call_started(_record("c1", answered=None))
        for i, (frm, to, why) in enumerate((("", "greet", "start"), ("greet", "menu", "next"))):
            store.event("c1", _line("FlowTransition", "c1", T0 + i, t_ms=100.0 * i, flow="support", from_state=frm,
                                    to_state=to, reason=why, detail=""))
        store.call_updated(_record("c1", codec=None))  # a field the record lacks keeps the stored value
        with store.reading() as conn:
            row = conn.execute(select(calls).where(calls.c.call_id == "c1")).one()
            assert not row.complete and row.outcome == "open" and row.codec == "G722"
            assert (row.flow_name, row.flow_state, row.flow_reason) == ("support", "menu", "next")
            assert row.tenant == "acme" and row.bot == "support" and row.answered_at == T0 + 0.5
        store.event("c1", _line("FlowTransition", "c1", T0 + 2, t_ms=300.0, flow="support", from_state="menu",
                                to_state="", reason="hangup", detail=""))
        final = _record("c1", end=T0 + 3, hangup_cause="local", hangup_code=200, hangup_reason="OK",
                        flow={"name": "support", "path": ["greet", "menu"], "state": "", "reason": "hangup"},
                        transfer={"target": "sip:agent@h", "notifications": [[100, "Trying"], [200, "OK"]],
                                  "succeeded": True})
        store.call_finished(final)
        store.call_updated(_record("c1", end=T0 + 3))  # a late update never makes it incomplete again
        with store.reading() as conn:
            row = conn.execute(select(calls).where(calls.c.call_id == "c1")).one()
            assert row.complete and row.outcome == "transferred" and row.duration_s == 2.5
            assert (row.flow_state, row.flow_reason) == ("menu", "hangup")
            assert row.record["transfer"]["target"] == "sip:agent@h"
            [leg] = conn.execute(select(legs).where(legs.c.call_id == "c1")).all()
            assert (leg.kind, leg.target, leg.succeeded, leg.code) == ("transfer", "sip:agent@h", True, 200)
            moves = conn.execute(select(flow_transitions.c.to_state).order_by(flow_transitions.c.id)).scalars().all()
            assert moves == ["greet", "menu", ""]
            detail = queries.call_detail(conn, "c1")
            assert detail["flow"]["path"] == ["greet", "menu"] and detail["events"] == 4
        # a consultation leg of an attended transfer becomes a leg of the call it transfers
        store.call_finished(_record("c2", direction="outbound", remote_uri="<sip:agent@h>", end=T0 + 2,
                                    hangup_cause="transfer", labels={"transfer_of": "c1"}))
        with store.reading() as conn:
            kinds = {(r.kind, r.leg_call_id) for r in conn.execute(select(legs).where(legs.c.call_id == "c1"))}
            assert kinds == {("transfer", None), ("consultation", "c2")}


def test_a_transaction_that_fails_leaves_nothing_of_itself(url):
    with CallStore(url) as store:
        store.call_started(_record("c1"))
        with pytest.raises(StoreError):
            with store.writes() as w:
                w.event("c1", _line("CallConfirmed", "c1", T0))
                w.save_analysis("no-such-call", _analysis("no-such-call", said="x", score=1, category=None))
        with store.reading() as conn:
            assert queries.call_events(conn, "c1") == []


def test_analysis_is_kept_replaced_and_found_by_every_filter(url):
    with CallStore(url) as store:
        store.call_finished(_record("a", end=T0 + 60, hangup_cause="remote"))
        store.call_finished(_record("b", start=T0 + 7200, answered=T0 + 7201, end=T0 + 7300, hangup_cause="local",
                                    labels={"bot": "sales", "tenant": "globex"}))
        store.call_started(_record("c", start=T0 + 3600))
        store.save_analysis("a", _analysis("a", said="my card is declined", score=3, category="complaint"))
        store.save_analysis("b", _analysis("b", said="great service thanks", score=9, category=None))
        store.save_analysis("b", _analysis("b", said="great service thanks", score=8, category="praise"))  # replaces
        with store.reading() as conn:
            def ids(**f) -> list[str]:
                return [r["call_id"] for r in queries.list_calls(conn, CallFilter(**f))]

            assert ids() == ["b", "c", "a"]  # newest first
            assert ids(bot="sales") == ["b"] and ids(tenant="acme") == ["c", "a"]
            assert ids(since=T0 + 3600) == ["b", "c"] and ids(until=T0 + 3600) == ["a"]
            assert ids(outcome="caller_hangup") == ["a"] and ids(outcome="open") == ["c"]
            assert ids(complete=False) == ["c"]
            assert ids(category="praise") == ["b"] and ids(category="complaint") == ["a"]
            assert ids(category="disclosure") == []  # evaluated, not matched
            assert ids(min_score=5) == ["b"] and ids(max_score=5) == ["a"] and ids(min_score=8.5) == []
            assert ids(text="Card is") == ["a"] and ids(text="THANKS") == ["b"] and ids(text="100%") == []
            assert ids(limit=1, offset=1) == ["c"]
            assert queries.count_calls(conn, CallFilter(tenant="acme")) == 2
            listed = queries.list_calls(conn, CallFilter(bot="sales"))[0]
            assert listed["categories"] == ["praise"] and listed["scores"] == {"qa": 8.0}
            d = queries.call_detail(conn, "b")
            assert [c["category"] for c in d["categories"]] == ["praise"]
            assert d["scores"] == [{"scorecard": "qa", "score": 8.0, "max_score": 10.0,
                                    "items": [{"rule": "greeted", "weight": 8.0, "passed": True},
                                              {"rule": "disclosure", "weight": 2.0, "passed": False}]}]
            assert d["metrics"]["call"]["response_latency_p50_ms"] == 100.0
            assert d["metrics"]["bot"]["loudness_dbfs"] == -20.0 and "loudness_dbfs" not in d["metrics"]["caller"]
            assert [t["sentiment"] for t in d["transcript"]["turns"]] == [-0.4, 0.5]
            assert [w["text"] for w in d["transcript"]["words"] if w["redacted"]] == ["[card]"]
            assert d["analysis"]["transcript_engine"] == "live"
            runs = conn.execute(text("SELECT count(*) FROM analysis_runs WHERE call_id = 'b'")).scalar_one()
            assert runs == 2  # every run kept; the tables hold the newest
            n = conn.execute(select(metrics).where(metrics.c.call_id == "b")).all()
            assert len(n) == len(metric_rows(_analysis("b", said="x", score=1, category=None).metrics))
            s = queries.stats(conn)
            assert s["calls"] == 3 and s["by_outcome"] == {"bot_hangup": 1, "caller_hangup": 1, "open": 1}
            assert s["by_bot"] == {"sales": 1, "support": 2}
            assert [h["calls"] for h in s["per_hour"]] == [1, 1, 1]
            assert s["per_hour"][0]["hour"] == "2026-12-03T05:00:00+00:00"
        with pytest.raises(StoreError):
            store.save_analysis("nope", _analysis("nope", said="x", score=1, category=None))


def test_a_phone_number_finds_its_calls_however_written_as_caller_or_called(url):
    with CallStore(url) as store:
        store.call_finished(_record("in", start=T0 + 10, end=T0 + 20, caller="+1 (212) 555-0100", called="100"))
        store.call_finished(_record("out", start=T0 + 30, end=T0 + 40, direction="outbound", caller="bot",
                                    called="12125550100"))
        store.call_finished(_record("other", start=T0 + 50, end=T0 + 60, caller="+44 20 7946 0958"))
        with store.reading() as conn:
            def ids(number: str) -> list[str]:
                return [r["call_id"] for r in queries.list_calls(conn, CallFilter(number=number))]

            # inbound the customer is the caller, outbound the called; a part of a number finds it too
            for written in ("+12125550100", "212-555-0100", "(212) 555 0100", "555.0100"):
                assert ids(written) == ["out", "in"], written
            assert ids("7946") == ["other"] and ids("999999") == []


def test_times_people_type_are_read_and_bad_filters_refused():
    assert queries.parse_time("2026-12-03") == 1_796_256_000.0
    assert queries.parse_time("2026-12-03T05:34:33") == T0
    assert queries.parse_time("2026-12-03T06:34:33+01:00") == T0
    assert queries.parse_time(str(T0)) == T0
    with pytest.raises(QueryError):
        queries.parse_time("yesterday")
    with pytest.raises(QueryError):
        CallFilter(limit=0)
    with pytest.raises(QueryError, match="no digits"):
        CallFilter(number="bob")


# ---- importing recorded calls ------------------------------------------------------------------------------

def _recorded_call(folder: pathlib.Path, call_id: str, *, finish: bool, start: float = T0) -> CallRecord:
    """A call's files as `callbot serve` leaves them: the real Recorder, its record and bus events."""
    recorder = Recorder(folder)
    try:
        record = CallRecord(call_id=call_id, direction="inbound", account="line", local_uri="<sip:menu@h>",
                            remote_uri="<sip:bob@h>", start=start, answered=start + 0.1, codec="PCMU",
                            clock_rate=8000, caller="bob", called="menu", labels={"bot": "support"})
        rec = recorder.start(record, 8000)
        rec.caller.write(np.zeros(800, np.int16))
        rec.bot.write(np.zeros(800, np.int16))
        for event in (ev.CallConfirmed(at=1.0, call_id=call_id, direction="inbound"),
                      FlowTransition(call_id=call_id, t_ms=5.0, flow="support", from_state="", to_state="greet",
                                     reason="start"),
                      ev.DtmfReceived(at=2.0, call_id=call_id, digit="4", method="rfc4733", duration_ms=100,
                                      redacted=True),
                      CallerWords(call_id=call_id, t_ms=900.0, text="my card", final=True, start_ms=300.0,
                                  end_ms=800.0),
                      BotText(call_id=call_id, t_ms=960.0, piece=" thanks")):
            recorder.on_event(event)
        if finish:
            record.end, record.hangup_cause, record.hangup_code, record.hangup_reason = start + 2, "remote", 200, "OK"
            recorder.finish(rec, record)
    finally:
        recorder.close() if finish else recorder._stop.set()  # unfinished: left as a killed process leaves it
    return record


def test_importing_recorded_calls_is_idempotent_and_completes_a_crashed_one(url, tmp_path):
    folder = tmp_path / "calls"
    (folder / "acme").mkdir(parents=True)
    _recorded_call(folder, "done-1", finish=True)
    _recorded_call(folder / "acme", "cut-1", finish=False, start=T0 + 10)
    (folder / "notes.json").write_text('{"not": "a record"}')
    (folder / "broken.json").write_text("{")
    # a lone surrogate, as a JSON escape: no database takes it; that file is named, the others go in
    (folder / "odd.json").write_text('{"call_id": "odd-\\udcff", "caller": "\\udcff", "recording": {}}')
    with CallStore(url) as store:
        store.call_started(_record("cut-1", start=T0 + 10))  # what a live writer had before the crash
        first = import_dir(store, folder)
        assert (first.imported, first.replaced, first.skipped) == (1, 1, 0)
        assert first.events == 10 and len(first.problems) == 3
        assert any("odd.json: not imported" in p for p in first.problems), first.problems
        again = import_dir(store, folder)
        assert (again.imported, again.replaced, again.skipped) == (0, 1, 1)  # the cut call: its files again
        with store.reading() as conn:
            rows = {r["call_id"]: r for r in queries.list_calls(conn)}
            assert rows["done-1"]["complete"] and rows["done-1"]["outcome"] == "caller_hangup"
            assert not rows["cut-1"]["complete"] and rows["cut-1"]["outcome"] == "open"
            evs = queries.call_events(conn, "cut-1")
            assert [e["event"] for e in evs] == ["CallConfirmed", "FlowTransition", "DtmfReceived", "CallerWords",
                                                "BotText"]  # once each, after two imports
            assert evs[2]["digit"] == "x"  # a secret's digit stays masked, as in the file
            d = queries.call_detail(conn, "done-1")
            assert pathlib.Path(d["call"]["recording_path"]).is_file()
            assert d["flow"]["path"] == ["greet"]
            assert d["transcript"]["live"] == [{"leg": "caller", "t_ms": 300.0, "text": "my card"},
                                               {"leg": "bot", "t_ms": 960.0, "text": " thanks"}]


# ---- the command line and the JSON API --------------------------------------------------------------------

def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*CALLBOT, "calls", *args], capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_callbot_calls_import_list_show_export(url, tmp_path):
    folder = tmp_path / "calls"
    folder.mkdir()
    _recorded_call(folder, "done-1", finish=True)
    _recorded_call(folder, "done-2", finish=True, start=T0 + 3600)
    out = _cli("import", str(folder), "--store", url)
    assert out.stdout.strip() == f"{folder}: 2 imported, 0 replaced, 0 already complete, 10 events"
    assert "0 imported, 0 replaced, 2 already complete" in _cli("import", str(folder), "--store", url).stdout
    with CallStore(url) as store:
        store.save_analysis("done-1", _analysis("done-1", said="cancel my plan", score=4, category="churn"))
    table = _cli("list", "--store", url).stdout.splitlines()
    assert table[0].split()[:3] == ["start", "(UTC)", "call_id"] and table[-1] == "(2 calls)"
    assert "done-2" in table[1] and "done-1" in table[2] and "churn" in table[2] and "qa=4" in table[2]
    found = json.loads(_cli("list", "--store", url, "--category", "churn", "--json").stdout)
    assert [r["call_id"] for r in found] == ["done-1"]
    assert json.loads(_cli("list", "--store", url, "--text", "plan", "--max-score", "5", "--json").stdout)[0][
        "call_id"] == "done-1"
    assert json.loads(_cli("list", "--store", url, "--since", "2026-12-03T06:00", "--json").stdout)[0][
        "call_id"] == "done-2"
    shown = _cli("show", "done-1", "--store", url).stdout
    for part in ("call done-1  (complete)", "flow support: greet", "category churn: matched",
                 "score qa: 4 / 10", "events (5)", "DtmfReceived"):
        assert part in shown, shown
    whole = json.loads(_cli("show", "done-1", "--store", url, "--json").stdout)
    assert whole["call"]["caller"] == "bob" and len(whole["events"]) == 5
    rows = list(csv.DictReader(io.StringIO(_cli("export", "--store", url, "--format", "csv").stdout)))
    assert [r["call_id"] for r in rows] == ["done-2", "done-1"] and rows[1]["categories"] == "churn"
    target = tmp_path / "out.json"
    _cli("export", "--store", url, "--format", "json", "--bot", "support", "-o", str(target))
    assert [r["call_id"] for r in json.loads(target.read_text())] == ["done-2", "done-1"]
    missing = _cli("show", "nope", "--store", url, check=False)
    assert missing.returncode == 1 and missing.stderr.strip() == "callbot: error: no call 'nope' in the store"
    bad = _cli("list", "--store", url, "--since", "someday", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is not a time" in bad.stderr


def test_the_cli_says_one_line_for_a_store_it_cannot_use(tmp_path):
    absent = _cli("list", "--store", sqlite_url(tmp_path / "none.db"), check=False)
    assert absent.returncode == 2 and absent.stderr.startswith("callbot: error: no call store at")
    dead = _cli("list", "--store", f"postgresql+psycopg://nobody@127.0.0.1:{free_port(1)}/x", check=False)
    assert dead.returncode == 2 and dead.stderr.count("\n") == 1 and "Traceback" not in dead.stderr
    wrong = _cli("list", "--store", "mysql://x/y", check=False)
    assert wrong.returncode == 2 and "not a supported database" in wrong.stderr


def test_the_json_api_answers_over_http(url):
    with CallStore(url) as store:
        store.call_finished(_record("a", end=T0 + 60, hangup_cause="remote"))
        store.event("a", _line("CallConfirmed", "a", T0 + 1, direction="inbound"))
        store.call_started(_record("b/with slash", start=T0 + 7200, labels={"bot": "sales"}))
        store.save_analysis("a", _analysis("a", said="where is my order", score=6, category="order"))
    port = free_port(1)
    api = ApiServer.start(url, "127.0.0.1", port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            listed = http.get("/api/calls").json()
            assert listed["total"] == 2 and [c["call_id"] for c in listed["calls"]] == ["b/with slash", "a"]
            assert [c["call_id"] for c in http.get("/api/calls", params={"category": "order"}).json()["calls"]] == ["a"]
            assert http.get("/api/calls", params={"bot": "sales", "complete": "false"}).json()["total"] == 1
            assert http.get("/api/calls", params={"text": "my order", "min_score": "5"}).json()["total"] == 1
            one = http.get("/api/calls/a").json()
            assert one["call"]["outcome"] == "caller_hangup" and one["scores"][0]["score"] == 6.0
            assert http.get("/api/calls/a/events").json() == {"events": [_line("CallConfirmed", "a", T0 + 1,
                                                                                 direction="inbound")]}
            assert http.get("/api/calls/a/transcript").json()["turns"][0]["text"] == "where is my order"
            assert http.get("/api/calls/b%2Fwith%20slash").json()["call"]["bot"] == "sales"
            st = http.get("/api/stats", params={"since": "2026-12-03"}).json()
            assert st["calls"] == 2 and st["by_bot"] == {"sales": 1, "support": 1} and len(st["per_hour"]) == 2
            assert http.get("/api/calls/nope").status_code == 404
            assert http.get("/api/calls/nope/events").status_code == 404
            bad = http.get("/api/calls", params={"min_score": "high"})
            assert bad.status_code == 400 and bad.json() == {"error": "min_score: 'high' is not a number"}
    finally:
        api.stop()
    with pytest.raises(OSError):  # the port is refused at start, not later in a log
        with __import__("socket").socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            ApiServer.start(url, "127.0.0.1", taken.getsockname()[1])


# ---- the serve-side writer -----------------------------------------------------------------------------

def test_the_writer_follows_a_call_from_the_bus_and_the_recorder(url, tmp_path):
    bus: EventBus = EventBus()
    recorder = Recorder(tmp_path)
    writer = StoreWriter(url, update_s=0.0, final_refresh_s=0.0)
    writer.attach(bus)
    tap = writer.tap(recorder)
    try:
        record = CallRecord(call_id="w1", direction="inbound", account="line", local_uri="<sip:menu@h>",
                            remote_uri="<sip:bob@h>", start=T0, caller="bob", labels={"bot": "support"})
        bus.publish(ev.IncomingCall(at=1.0, call_id="w1", account="line", remote_uri="<sip:bob@h>",
                                    local_uri="<sip:menu@h>"))
        record.answered = T0 + 0.2
        rec = tap.start(record, 8000)
        bus.publish(ev.CallConfirmed(at=1.2, call_id="w1", direction="inbound"))
        bus.publish(FrameStages(call_id="w1", t_ms=0.0, first_frame=0, rows=[]))  # not the store's
        bus.publish(FlowTransition(call_id="w1", t_ms=3.0, flow="support", from_state="", to_state="greet",
                                   reason="start"))
        record.codec = "PCMU"
        record.changed()

        def stored() -> dict | None:
            try:
                with CallStore(url, migrate_schema=False) as s, s.reading() as conn:
                    return queries.call_detail(conn, "w1")
            except SQLAlchemyError:  # the writer has not made the schema yet
                return None

        live = eventually(lambda: (lambda d: d if d and d["call"]["codec"] == "PCMU" and d["events"] == 3 else None)(
            stored()), what="the live call in the store")
        assert not live["call"]["complete"] and live["call"]["flow_state"] == "greet"
        assert live["call"]["recording_path"] == rec.wav_path
        record.end, record.hangup_cause, record.hangup_code = T0 + 2, "local", 200
        tap.finish(rec, record)
        bus.publish(ev.CallEnded(at=3.0, call_id="w1", code=200, reason="OK", cause="local"))
        record.caller_text.append({"text": "late words", "start_ms": 0.0, "end_ms": 1.0})  # after the hang-up
        done = eventually(lambda: (lambda d: d if d and d["record"]["caller_text"] else None)(stored()),
                          what="the finished call with its late words")
        assert done["call"]["complete"] and done["call"]["outcome"] == "bot_hangup" and done["events"] == 4
        # a call that never had audio: its events are all the store gets, and they finish it
        bus.publish(ev.IncomingCall(at=4.0, call_id="w2", account="line", remote_uri="<sip:eve@h>",
                                    local_uri="<sip:menu@h>"))
        bus.publish(ev.CallEnded(at=4.5, call_id="w2", code=486, reason="Busy Here", cause="remote"))
        assert writer.flush() and eventually(lambda: writer.written >= 7)
        with CallStore(url, migrate_schema=False) as s, s.reading() as conn:
            w2 = queries.call_detail(conn, "w2")["call"]
        assert w2["complete"] and w2["outcome"] == "unanswered" and w2["hangup_code"] == 486
        assert w2["remote_uri"] == "<sip:eve@h>"
        assert writer.dropped == 0 and writer.failures == 0
        # the analysis comes through the same queue; one for a call the store lacks is dropped alone
        writer.save_analysis("nowhere", _analysis("nowhere", said="x", score=1, category=None))
        writer.save_analysis("w1", _analysis("w1", said="hello there", score=9, category="greeting"))
        bus.publish(ev.CallConfirmed(at=5.0, call_id="w3", direction="inbound"))
        assert writer.flush()
        with CallStore(url, migrate_schema=False) as s, s.reading() as conn:
            assert [r["call_id"] for r in queries.list_calls(conn, CallFilter(category="greeting"))] == ["w1"]
            assert queries.call_events(conn, "w3") is not None
        assert writer.dropped == 1
    finally:
        bus.close()
        writer.close()
        recorder.close()


@pytest.mark.parametrize("dead", ["sqlite", "postgresql"])
def test_a_dead_database_costs_counted_drops_and_one_log_line(dead, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    url = sqlite_url(blocker / "calls.db") if dead == "sqlite" else \
        f"postgresql+psycopg://nobody@127.0.0.1:{free_port(1)}/calls"
    bus: EventBus = EventBus()
    writer = StoreWriter(url)
    writer.attach(bus)
    try:
        with caplog.at_level(logging.WARNING, logger="callbot.app.store_writer"):
            for i in range(50):
                bus.publish(ev.CallConfirmed(at=float(i), call_id=f"d{i}", direction="inbound"))
            assert writer.flush(20)
            eventually(lambda: writer.dropped == 50, what="every item counted as dropped")
        lines = [r for r in caplog.records if r.name == "callbot.app.store_writer"]
        assert len(lines) == 1 and "calls go on, their JSON records are written" in lines[0].getMessage()
        assert "\n" not in lines[0].getMessage()
    finally:
        bus.close()
        writer.close()


def test_postgresql_going_away_costs_the_writes_meanwhile_and_writing_resumes(tmp_path, caplog):
    from tests.pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl, postgres) on this machine")
    server = PostgresServer(bindir).start()  # its own: this test stops it
    bus: EventBus = EventBus()
    writer = None
    try:
        url = server.new_database()
        writer = StoreWriter(url)
        writer.attach(bus)
        with caplog.at_level(logging.WARNING, logger="callbot.app.store_writer"):
            bus.publish(ev.CallConfirmed(at=1.0, call_id="before", direction="inbound"))
            assert writer.flush(20) and writer.written == 1
            server.pause()
            for i in range(20):
                bus.publish(ev.CallConfirmed(at=2.0, call_id=f"during-{i}", direction="inbound"))
            assert writer.flush(20)
            eventually(lambda: writer.dropped == 20, timeout=20, what="the writes while it was down, dropped")
            server.resume()
            bus.publish(ev.CallConfirmed(at=3.0, call_id="after", direction="inbound"))
            assert writer.flush(20)
            eventually(lambda: writer.written == 2, timeout=20, what="writing again")
        said = [r.getMessage() for r in caplog.records if r.name == "callbot.app.store_writer"]
        assert len(said) == 2 and "20 items dropped" in said[0] and "writing again" in said[1], said
        with CallStore(url) as store, store.reading() as conn:
            assert sorted(r["call_id"] for r in queries.list_calls(conn)) == ["after", "before"]
    finally:
        bus.close()
        if writer is not None:
            writer.close()
        server.stop()


def test_callbot_calls_api_serves_until_sigterm(tmp_path):
    url = sqlite_url(tmp_path / "calls.db")
    with CallStore(url) as store:
        store.call_finished(_record("a", end=T0 + 60, hangup_cause="remote"))
    port = free_port(1)
    proc = subprocess.Popen([*CALLBOT, "calls", "api", "--store", url, "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert f"listening http://127.0.0.1:{port}/api/calls" in proc.stderr.readline()
        assert httpx.get(f"http://127.0.0.1:{port}/api/stats", timeout=10).json()["by_outcome"] == {"caller_hangup": 1}
        proc.send_signal(__import__("signal").SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_two_writers_on_one_database_wait_for_each_other(url, tmp_path):
    """serve's writer committing while `callbot calls import` writes the same database (and, on start,
    several serve workers migrating it at once): neither fails, nothing is lost."""
    import threading

    folder = tmp_path / "calls"
    folder.mkdir()
    for i in range(5):
        _recorded_call(folder, f"rec-{i}", finish=True, start=T0 + i)
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            CallStore(url).close()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    openers = [threading.Thread(target=opener) for _ in range(3)]
    for t in openers:
        t.start()
    for t in openers:
        t.join(60)
    assert not errors and migrate.upgrade(url) == "0004"
    bus: EventBus = EventBus()
    writer = StoreWriter(url)
    writer.attach(bus)
    try:
        for i in range(300):
            bus.publish(ev.CallConfirmed(at=float(i), call_id=f"live-{i % 30}", direction="inbound"))
        with CallStore(url) as store:
            report = import_dir(store, folder)
        assert report.imported == 5 and not report.problems
        assert writer.flush(30)
        eventually(lambda: writer.written == 300, timeout=30, what="every live event written")
        assert writer.dropped == 0 and writer.failures == 0
        with CallStore(url) as store, store.reading() as conn:
            assert queries.count_calls(conn) == 35
    finally:
        bus.close()
        writer.close()


def test_store_settings_are_checked_at_load(tmp_path):
    from callbot.app.serve import _store_writer
    from callbot.app.settings import ConfigError, parse_settings

    settings = parse_settings('recordings_dir = "rec"\n[store]\nurl = "sqlite:///db/calls.db"\napi = "127.0.0.1:8091"',
                              base_dir=tmp_path)
    assert settings.store_url() == sqlite_url(tmp_path / "db" / "calls.db")
    assert settings.store.api_address == ("127.0.0.1", 8091)
    assert parse_settings('recordings_dir = "rec"', base_dir=tmp_path).store_url() == sqlite_url(
        tmp_path / "rec" / "calls.db")
    assert _store_writer(parse_settings("[store]\nenabled = false")) is None
    for bad, said in (('url = "mysql://h/db"', "$.store: url: 'mysql://h/db' is not a store URL"),
                      ('api = "everywhere"', "$.store: api: 'everywhere' is not HOST:PORT"),
                      ('path = "x"', "$.store: Object contains unknown field `path`")):
        with pytest.raises(ConfigError) as err:
            parse_settings(f"[store]\n{bad}")
        assert str(err.value).startswith(said)
