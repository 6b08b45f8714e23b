"""A campaign's own caller ID and a row's variables, at the callee: the INVITE's From and
P-Asserted-Identity (SIPp's message trace), the Call-ID the state file committed before the INVITE, the
flow's webhook getting the row's variables from a callee that answers at once (no 180 first); and a
flow's own HoldBot outliving the answering-machine verdict (the verdict releases only its own hold)."""
from __future__ import annotations

import http.server
import json
import pathlib
import threading

import numpy as np

from callbot.app.recording import read_recording
from tests.campaign_calls import Callee, human, silence, speech
from tests.sip_peers import LOCALHOST, PjsuaPeer, SippCallee, free_port, serve_config, stop_process
from tests.test_campaign_sip import finish, start_campaign

class Hook(http.server.BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).bodies.append(json.loads(body))
        data = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _write(d: pathlib.Path, target: str, campaign: str, flow: str) -> tuple[str, str, str]:
    lst = d / "list.csv"
    lst.write_text(f"uri,name,amount_due\n{target},Ann,42.50\n")
    camp = d / "campaign.toml"
    camp.write_text(campaign + '\n[window]\nhours = "00:00-24:00"\n')
    (d / "flow.toml").write_text(flow)
    cfg = serve_config(d, free_port(), account="out", user="bot",
                       tail='[[bots]]\nname = "collect"\nflow = "flow.toml"\n')
    return str(lst), str(camp), str(cfg)


def _header(message: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in message.splitlines()
                if line.lower().startswith(name.lower() + ":"))


def test_the_invite_carries_the_campaigns_caller_id_and_the_flow_gets_the_rows_variables(tmp_path):
    Hook.bodies = []
    backend = http.server.ThreadingHTTPServer((LOCALHOST, 0), Hook)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    sipp = SippCallee(tmp_path / "sipp", timeout_s=60)
    try:
        lst, camp, cfg = _write(tmp_path, f"sip:+33612345678@{LOCALHOST}:{sipp.port}", """
bot = "collect"
caller_id = "+15551234567"
caller_name = "Clinic Reminders"
dial_timeout_s = 5
max_call_s = 5
[amd]
enabled = false
""", f"""
start = "lookup"
[states.lookup]
webhook = {{ url = "http://{LOCALHOST}:{backend.server_address[1]}/row", timeout_s = 3, retries = 0 }}
next = "bye"
[states.bye]
hangup = true
""")
        report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path, timeout=60)
        invite = sipp.received("INVITE")
    finally:
        sipp.close()
        backend.shutdown()
        backend.server_close()
    [a] = report
    assert a["disposition"] == "answered-human", a
    from_ = _header(invite, "From")
    assert from_.startswith('"Clinic Reminders" <sip:+15551234567@'), from_
    pai = _header(invite, "P-Asserted-Identity")
    assert pai.startswith('"Clinic Reminders" <sip:+15551234567@') and pai.endswith(">"), pai
    # the Call-ID the state file committed before the INVITE is the one the INVITE carried
    assert _header(invite, "Call-ID") == a["call_id"]
    # the flow started with the row's variables although the callee answered at once
    assert len(Hook.bodies) == 1, Hook.bodies
    body = Hook.bodies[0]
    assert (body.get("name"), body.get("amount_due"), body.get("campaign_row")) == ("Ann", "42.50", "1"), body
    # the flow's result is the attempt's (issue 15, point 3): its states, where it ended and why
    assert a["flow"]["name"] and a["flow"]["path"] == ["lookup", "bye"] and a["flow"]["state"] == "", a["flow"]


def test_the_amd_verdict_does_not_release_a_bot_its_flow_holds(tmp_path):
    # "hello?" then, at 2.6 s, "is anyone there?": the verdict (human) comes between them. The flow's only
    # state plays nothing and waits for a digit without a persona, the caller not muted (the echo line hears
    # them): the flow holds the bot all along, so the echo line must send back neither phrase; the verdict
    # releases only the campaign's own hold
    first = human("hello?", tail_ms=2000)
    callee = Callee("human", np.concatenate([first.samples, speech("is anyone there?"), silence(2000)]))
    wav = callee.write(tmp_path / "hello.wav")
    heard = str(tmp_path / "heard.wav")
    with PjsuaPeer(user="person", answer="auto", log_dir=tmp_path) as peer:
        lst, camp, cfg = _write(tmp_path, peer.uri, """
bot = "collect"
dial_timeout_s = 5
max_call_s = 5.5
""", """
start = "wait"
[states.wait]
mute_caller = false
gather = { max_digits = 1, timeout_s = 20, interdigit_timeout_s = 1 }
on_no_input = "bye"
on_digits = { "1" = "bye" }
[states.bye]
hangup = true
""")
        proc = start_campaign(tmp_path, lst, camp, cfg)
        try:
            media = peer.expect("media", timeout=20)
            peer.send("record", path=heard, call_id=media["call_id"])
            rec = peer.expect("ok", cmd="record")
            peer.send("play", path=wav, call_id=media["call_id"])
            play = peer.expect("ok", cmd="play")
            report = finish(proc, tmp_path)
        finally:
            stop_process(proc)
    [a] = report
    assert (a["disposition"], a["amd"]) == ("answered-human", "human"), a
    rate, audio = read_recording(heard)
    x = np.abs((audio[:, 0] if audio.ndim == 2 else audio).astype(np.int32))
    offset = play["t"] - rec["t"]
    assert len(x) > int((offset + len(first.samples) / 16000 + 1.0) * rate), "the call ended too early"
    assert x[int(max(offset, 0) * rate):].max(initial=0) < 1000, "the verdict released the flow's hold"


def test_endpoint_dial_takes_a_call_id_a_caller_id_and_labels_and_refuses_bad_ones(tmp_path):
    import pytest

    from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
    from callbot.sip.endpoint import Endpoint, caller_identity
    from callbot.sip.events import CallConfirmed, CallEnded

    cfg = EndpointConfig(transports=(TransportConfig(bind=LOCALHOST, port=0, rtp_port=0),),
                         accounts=(AccountConfig(name="out", user="bot"),), dial_timeout_s=5.0)
    with Endpoint(cfg) as ep, PjsuaPeer(user="carol", answer="auto", log_dir=tmp_path) as carol:
        call_id = ep.dial(carol.uri, call_id="c0ffee-1@campaign", caller_id="+15551234567", caller_name="Acme",
                          headers=[("X-Campaign", "reminders")], labels={"campaign_row": "7"})
        assert call_id == "c0ffee-1@campaign"
        assert ep.records[call_id].labels == {"campaign_row": "7"}
        incoming = carol.expect("incoming", timeout=10)
        assert incoming["call_id"] == call_id
        assert incoming["remote"].startswith('"Acme" <sip:+15551234567@127.0.0.1'), incoming
        ep.wait_for(CallConfirmed, call_id=call_id)
        with pytest.raises(ValueError, match="in use"):
            ep.dial(carol.uri, call_id=call_id)
        for bad in ({"call_id": "two words"}, {"caller_id": "555 123"}, {"caller_name": 'A "B"'},
                    {"headers": [("X-A", "1\r\nX-Injected: 2")]}, {"headers": [("Bad Name", "1")]}):
            with pytest.raises(ValueError):
                ep.dial(carol.uri, **bad)
        ep.hangup(call_id)
        ep.wait_for(CallEnded, call_id=call_id)
        assert len(carol.all("incoming")) == 1  # none of the refused ones left
    # the account's own identity when only a display name is given; a URI caller ID as it is
    assert caller_identity(None, "Acme", "sip:bot@10.0.0.1:5060") == '"Acme" <sip:bot@10.0.0.1:5060>'
    assert caller_identity("sip:sales@example.com", None, "sip:bot@x") == "<sip:sales@example.com>"
