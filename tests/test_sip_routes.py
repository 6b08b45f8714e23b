"""Tenants and routes on real SIP calls: `running_server` (the echo engine) with two tenants, two bots and
routes by DID, a pjsua2 caller in another process dialling each DID; each call's record names its bot and
tenant and its files land in that tenant's folder; a number no route takes gets the configured answer.
A hand-written INVITE carries an X-Tenant header to a header route; an Endpoint whose screen raises
refuses that one INVITE with 500 and takes the next call."""
from __future__ import annotations

import io
import json
import pathlib
import threading

import pytest

from callbot.app.event_log import EventLog
from callbot.app.serve import running_server
from callbot.app.settings import load_settings
from callbot.sip import events as ev
from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from tests.sip_peers import LOCALHOST, PjsuaPeer, RawUac, eventually, final_response, free_port, serve_config, sidecars

pytestmark = pytest.mark.timeout(120)

TENANTS = """
[[tenants]]
name = "acme"
[[tenants]]
name = "globex"
recordings_dir = "globex-records"
[[bots]]
name = "sales"
tenant = "acme"
language = "en-US"
[[bots]]
name = "support"
tenant = "globex"
language = "de-CH"
[[routes]]
did = "+1 555-0001"
bot = "sales"
variables = { product = "anvils" }
[[routes]]
did = "15550002"
bot = "support"
[[routes]]
name = "by-header"
header = { name = "X-Tenant", match = "^globex$" }
bot = "support"
[routing]
no_route = 480
reason = "No such number"
"""


@pytest.fixture
def server(tmp_path: pathlib.Path):
    port = free_port()
    settings = load_settings(serve_config(tmp_path, port, tail=TENANTS))
    with running_server(settings, "echo", log=EventLog(io.StringIO())) as srv:
        stop = threading.Event()
        pump = threading.Thread(target=srv.pump, kwargs={"stop": stop}, daemon=True)
        pump.start()  # the endpoint's events onto the bus: the recorder's events files
        try:
            yield srv, port
        finally:
            stop.set()
            pump.join(10)


def _finished_sidecar(folder: pathlib.Path, call_id: str) -> dict:
    """The call's sidecar in `folder` once its recording is complete."""
    def done():
        for path in sidecars(folder):
            record = json.loads(path.read_text())
            if record["call_id"] == call_id and record["recording"]["complete"]:
                return record
        return None
    return eventually(done, 15, f"the finished sidecar of {call_id} in {folder}")


def test_two_dids_reach_two_tenants_bots_and_their_files_land_apart(server, tmp_path: pathlib.Path):
    srv, port = server
    folders = {"acme": tmp_path / "calls" / "acme", "globex": tmp_path / "globex-records"}
    starts = {}
    with PjsuaPeer(user="caller", log_dir=tmp_path) as peer:
        for did, tenant in (("+15550001", "acme"), ("+15550002", "globex")):
            call_id = peer.call(f"sip:{did}@{LOCALHOST}:{port}")
            peer.expect("media", timeout=10, call_id=call_id)
            starts[tenant] = eventually(lambda: call_id in srv.calls and srv.calls[call_id].start, 10,
                                        "the call's engine session").variables
            eventually(lambda: (srv.endpoint.media_stats(call_id) or {}).get("frames_received", 0) >= 10, 10,
                       "audio from the caller")  # 0.2 s of it: the recording holds some
            peer.send("hangup", call_id=call_id)
            peer.expect("disconnected", timeout=10, call_id=call_id)
            record = _finished_sidecar(folders[tenant], call_id)
            bot = {"acme": "sales", "globex": "support"}[tenant]
            assert record["labels"] == {"tenant": tenant, "bot": bot, "route": f"routes[{tenant == 'globex':d}]"}
            assert record["called"] == did and record["caller"] == "caller"
            assert record["request_uri"] == f"sip:{did}@{LOCALHOST}:{port}"
            assert (folders[tenant] / record["recording"]["wav"]).stat().st_size > 44  # audio, not a bare header
            assert (folders[tenant] / record["events"]).is_file()
        # a number no route takes: the configured answer, and a CallRejected saying why
        call_id = peer.call(f"sip:+15559999@{LOCALHOST}:{port}")
        gone = peer.expect("disconnected", timeout=10, call_id=call_id)
        assert (gone["code"], gone["reason"]) == (480, "No such number")
    rejected = srv.endpoint.wait_for(ev.CallRejected, timeout=5, code=480)
    assert rejected.by == "callbot" and rejected.reason == "No such number"
    assert srv.endpoint.records[call_id].labels == {"route": "none"}
    assert srv.endpoint.records[call_id].called == "+15559999"
    # the engine got each call's bot, route variables and the call's own
    assert starts["acme"] == {"product": "anvils", "caller": "caller", "called": "+15550001", "account": "line",
                              "call_id": starts["acme"]["call_id"], "tenant": "acme", "bot": "sales",
                              "language": "en-US", "caller_language": ""}
    assert starts["globex"]["bot"] == "support" and starts["globex"]["language"] == "de-CH"
    # each tenant's folder holds its own call's files and nothing of the other's
    for tenant, folder in folders.items():
        names = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".analysis.json"))
        assert len(names) == 3 and all(n.endswith((".wav", ".json", ".events.jsonl")) for n in names), names
        assert [json.loads(p.read_text())["labels"]["tenant"] for p in sidecars(folder)] == [tenant]
    # no call outside a tenant (the call store's SQLite files lie in the recordings folder: [store] url's default)
    assert sorted(p.name for p in (tmp_path / "calls").iterdir() if not p.name.startswith("calls.db")) == ["acme"]


def test_a_header_route_takes_a_raw_invite_and_a_call_no_route_takes_is_refused(server, tmp_path: pathlib.Path):
    srv, port = server
    with RawUac(port) as uac:
        answer = uac.invite("hdr-1", headers="X-Tenant: globex\r\nX-Campaign: spring\r\nSubject: ignored\r\n",
                            user="reception")
        assert answer["status"].startswith("SIP/2.0 200")
        record = srv.endpoint.records["hdr-1"]
        assert record.labels == {"tenant": "globex", "bot": "support", "route": "by-header"}
        assert record.headers == {"X-Tenant": "globex", "X-Campaign": "spring"} and record.called == "reception"
        # the raw caller hangs up
        uac.sock.sendto((f"BYE sip:reception@{LOCALHOST}:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {uac.me};branch=z9hG4bKbye1"
                         f"\r\nMax-Forwards: 70\r\nFrom: <sip:raw@{LOCALHOST}>;tag=raw-hdr-1\r\nTo: <sip:reception@"
                         f"{LOCALHOST}:{port}>;tag={answer['to_tag']}\r\nCall-ID: hdr-1\r\nCSeq: 2 BYE\r\n"
                         "Content-Length: 0\r\n\r\n").encode(), uac.target)
        assert final_response(uac.sock, b"2 BYE").startswith(b"SIP/2.0 200")
        _finished_sidecar(tmp_path / "globex-records", "hdr-1")
        refused = uac.invite("hdr-2", headers="X-Tenant: initech\r\n", user="reception")
        assert refused["status"] == "SIP/2.0 480 No such number"


def test_a_screen_that_raises_refuses_that_invite_with_500_and_the_next_call_goes_through(tmp_path: pathlib.Path):
    def screen(record):
        if record.called == "boom":
            raise RuntimeError("a bug in the app's routes")
        return (404, "Not\r\nX-Injected: 1") if record.called == "nobody" else None

    ep = Endpoint(EndpointConfig(transports=(TransportConfig(bind=LOCALHOST, port=0, rtp_port=0),),
                                 accounts=(AccountConfig(user="bot"),)), screen=screen).start()
    try:
        port = ep.account_uri().rpartition(":")[2]
        with PjsuaPeer(user="caller", log_dir=tmp_path) as peer:
            boom = peer.call(f"sip:boom@{LOCALHOST}:{port}")
            assert peer.expect("disconnected", timeout=10, call_id=boom)["code"] == 500
            nobody = peer.call(f"sip:nobody@{LOCALHOST}:{port}")
            gone = peer.expect("disconnected", timeout=10, call_id=nobody)
            assert (gone["code"], gone["reason"]) == (404, "Not X-Injected: 1")  # one line: no header smuggled in
            ok = peer.call(f"sip:bot@{LOCALHOST}:{port}")
            peer.expect("media", timeout=10, call_id=ok)
            peer.send("hangup", call_id=ok)
            peer.expect("disconnected", timeout=10, call_id=ok)
        assert ep.running
        assert [(e.code, e.by) for e in ep.history(ev.CallRejected)] == [(500, "callbot"), (404, "callbot")]
    finally:
        ep.stop()
