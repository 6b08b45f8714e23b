"""The call store's writer (app/store_writer.py) when the database refuses writes for a while (SQLite on a
disk that fills up, PostgreSQL stopped): the calls recorded meanwhile lose nothing in the store in the
end: once it takes writes again, each is brought in from its files (record, events, analysis) as soon
as they are final. Real databases, a real tmpfs, the real Recorder and event bus."""
from __future__ import annotations

import contextlib
import logging

import msgspec
import pytest

from callbot.app.event_bus import EventBus
from callbot.app.recording import Recorder
from callbot.app.store_writer import StoreWriter
from callbot.engine.contract import FlowTransition
from callbot.sip import events as ev
from callbot.sip.call_record import CallRecord
from callbot.store import queries
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from tests.sip_peers import eventually
from tests.small_disk import small_disk
from tests.test_store import T0, _analysis

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def _sqlite_on_a_disk_that_fills(tmp_path):
    with small_disk(tmp_path / "disk", size="2m") as disk:
        yield sqlite_url(disk.path / "calls.db"), disk.fill, disk.free


@contextlib.contextmanager
def _postgresql_that_stops(tmp_path):
    from tests.pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl, postgres) on this machine")
    server = PostgresServer(bindir).start()  # its own: this test stops it
    try:
        yield server.new_database(), server.pause, server.resume
    finally:
        server.stop()


OUTAGES = {"sqlite-disk-full": _sqlite_on_a_disk_that_fills, "postgresql-stopped": _postgresql_that_stops}


@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_a_call_recorded_while_the_database_refused_writes_is_brought_in_from_its_files(outage, tmp_path, caplog):
    calls_dir = tmp_path / "calls"
    calls_dir.mkdir()
    with OUTAGES[outage](tmp_path) as (url, break_it, mend_it):
        bus: EventBus = EventBus()
        recorder = Recorder(calls_dir, poll_ms=10)
        writer = StoreWriter(url, update_s=0.0, final_refresh_s=0.0)
        bus.attach("recorder", recorder.on_event)
        writer.attach(bus)
        tap = writer.tap(recorder)
        try:
            record = CallRecord(call_id="c1", direction="inbound", account="line", local_uri="<sip:menu@h>",
                                remote_uri="<sip:bob@h>", start=T0, caller="bob", labels={"bot": "support"})
            bus.publish(ev.IncomingCall(at=1.0, call_id="c1", account="line", remote_uri="<sip:bob@h>",
                                        local_uri="<sip:menu@h>"))
            record.answered = T0 + 0.2
            rec = tap.start(record, 8000)
            bus.publish(ev.CallConfirmed(at=1.2, call_id="c1", direction="inbound"))
            assert writer.flush(20) and writer.dropped == 0
            with caplog.at_level(logging.WARNING, logger="callbot.app.store_writer"):
                break_it()
                # the call goes on while the store refuses: its events, its end, its analysis
                bus.publish(FlowTransition(call_id="c1", t_ms=3.0, flow="support", from_state="", to_state="greet",
                                           reason="start"))
                bus.publish(ev.DtmfReceived(at=2.0, call_id="c1", digit="5", method="rfc4733", duration_ms=100))
                eventually(lambda: writer.dropped >= 2, timeout=30, what="the refused writes")
                record.end, record.hangup_cause, record.hangup_code = T0 + 2, "remote", 200
                tap.finish(rec, record)
                analysis = _analysis("c1", said="my card is lost", score=7, category="lost card")
                (calls_dir / (rec.name + ".analysis.json")).write_bytes(msgspec.json.encode(analysis))
                writer.save_analysis("c1", analysis)
                assert writer.flush(30)
                assert writer.missed == 1 and writer.caught_up == 0
                mend_it()
                bus.publish(ev.CallConfirmed(at=9.0, call_id="after", direction="inbound"))  # a write that works
                eventually(lambda: writer.caught_up == 1 and writer.missed == 0, timeout=30,
                           what="the call brought in from its files")
            with CallStore(url, migrate_schema=False) as s, s.reading() as conn:
                got = queries.call_detail(conn, "c1")
                kinds = [e["event"] for e in queries.call_events(conn, "c1")]
                categories = [r["call_id"] for r in queries.list_calls(conn, queries.CallFilter(category="lost card"))]
            assert got["call"]["complete"] and got["call"]["hangup_cause"] == "remote"
            assert (got["call"]["flow_name"], got["call"]["flow_state"]) == ("support", "greet")
            for kind in ("IncomingCall", "CallConfirmed", "FlowTransition", "DtmfReceived"):
                assert kinds.count(kind) == 1, kinds  # what it had, once; what it lacked, from the file
            assert categories == ["c1"]  # the analysis too
            said = [r.getMessage() for r in caplog.records if r.name == "callbot.app.store_writer"]
            assert any("writing again" in x for x in said), said
        finally:
            bus.close()
            writer.close()
            recorder.close()
