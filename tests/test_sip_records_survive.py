"""Records that survive a kill, and what a peer sends cannot break them (issue 11, points 1 and 7).

`callbot serve --engine echo` as a process on loopback, with real callers: the sidecar kept current
during a call (a SIGKILL leaves the call's facts and non-zero seconds), bounded DTMF, an INVITE whose
From display name and Call-ID are not UTF-8, and pjsip's own 486 when its four call slots are full.
"""
from __future__ import annotations

import json
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import wave

import pytest
from tests.sip_peers import (PjsuaPeer, _Lines, eventually, final_response, free_port, serve_config, sip_header, sidecars,
                             stop_process)

from callbot.sip import call_record
from callbot.sip.call_record import DtmfRecord
from callbot.sip.config import WHEEL_MAX_CALLS
from callbot.sip.events import CallConfirmed, CallEnded, DtmfReceived


def _eventually(condition, timeout: float = 20.0, what: str = "condition"):
    return eventually(condition, timeout, what)


pytestmark = pytest.mark.timeout(120)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]


class _JsonLog:
    """serve's stdout, each line parsed as JSON as it comes (a line that is not valid UTF-8 JSON fails)."""

    def __init__(self, stream):
        self.events: list[dict] = []
        self.bad: list[bytes] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for raw in stream:
            try:
                event = json.loads(raw)
            except ValueError:
                self.bad.append(raw)
                continue
            with self._lock:
                self.events.append(event)

    def all(self, kind: str, **fields) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e["event"] == kind and all(e.get(k) == v for k, v in fields.items())]


class Serve:
    """`callbot serve --engine echo` on loopback: its JSON log, its stderr, its recordings directory."""

    def __init__(self, directory: pathlib.Path):
        self.sip_port, self.metrics_port = free_port(), free_port()
        cfg = serve_config(directory, self.sip_port, self.metrics_port)
        self.calls = directory / "calls"
        self.uri = f"sip:echo@127.0.0.1:{self.sip_port}"
        self.proc = subprocess.Popen([*CALLBOT, "serve", "--engine", "echo", "--config", str(cfg)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err = _Lines(self.proc.stderr, directory / "serve.stderr")
        self.log = _JsonLog(self.proc.stdout)
        try:
            self.err.wait_line("listening", 30)
        except BaseException:
            stop_process(self.proc, 10, signal.SIGKILL)
            raise

    def metric(self, sample: str) -> float | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        return None

    def sidecar(self, call_id: str) -> dict | None:
        for path in sidecars(self.calls):
            try:
                data = json.loads(path.read_bytes())
            except (FileNotFoundError, ValueError):
                continue  # replaced between the listing and the read: the next poll sees the new one
            if data.get("call_id") == call_id:
                return data
        return None

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, 10, signal.SIGKILL)


def test_sigkill_mid_call_leaves_a_current_sidecar(tmp_path):
    with Serve(tmp_path) as serve, PjsuaPeer(user="alice", log_dir=tmp_path) as peer:
        call_id = peer.call(serve.uri)
        media = peer.expect("media", call_id=call_id, timeout=15)
        peer.send("dtmf", call_id=call_id, digits="12", method="rfc4733")
        peer.send("dtmf", call_id=call_id, digits="#", method="info")
        # the sidecar follows the call: answered, the codec, every digit, audio safe on disk
        current = _eventually(
            lambda: (lambda s: s if s and len(s["dtmf"]) == 3 and s["recording"]["seconds"] > 0 else None)(
                serve.sidecar(call_id)), what="the digits and some audio in the sidecar")
        serve.proc.send_signal(signal.SIGKILL)
        assert serve.proc.wait(10) == -signal.SIGKILL
    after = serve.sidecar(call_id)
    assert after is not None and after["recording"]["complete"] is False and after["end"] is None
    assert after["answered"] is not None and after["codec"] == media["codec"]
    # (an INFO digit can overtake RTP ones: they are played out in real time)
    assert sorted(d["digit"] for d in after["dtmf"]) == ["#", "1", "2"] and after["dtmf_dropped"] == 0
    assert after["recording"]["seconds"] >= current["recording"]["seconds"] > 0
    with wave.open(str(serve.calls / after["recording"]["wav"])) as w:  # no repair needed
        assert w.getnframes() >= after["recording"]["frames"]
    events = [json.loads(line) for line in (serve.calls / after["events"]).read_text().splitlines()]
    assert sorted(e["digit"] for e in events if e["event"] == "DtmfReceived") == ["#", "1", "2"]
    assert not list(serve.calls.glob("*.tmp"))


def _invite(port: int, me: str, call_id: bytes, display: bytes, rtp_port: int) -> bytes:
    sdp = (f"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           f"m=audio {rtp_port} RTP/AVP 0\r\n").encode()
    return (f"INVITE sip:echo@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKbadbytes1\r\n"
            f"Max-Forwards: 70\r\n").encode() + \
        b'From: "' + display + b'" <sip:evil@127.0.0.1>;tag=badbytes\r\n' + \
        b'To: "' + display + f'" <sip:echo@127.0.0.1:{port}>\r\n'.encode() + \
        b"Call-ID: " + call_id + b"\r\n" + \
        (f"CSeq: 1 INVITE\r\nContact: <sip:evil@{me}>\r\nContent-Type: application/sdp\r\n"
         f"Content-Length: {len(sdp)}\r\n\r\n").encode() + sdp


def test_an_invite_that_is_not_utf8_costs_nothing(tmp_path):
    """Invalid UTF-8 in the From/To display names and the Call-ID (pjsua2 hands it over as surrogates) once
    ended `callbot serve` (its JSON log refused to encode it). Now: a call like any other, logged and
    recorded with the bad bytes escaped (\\xff), and the server still answers a real caller."""
    bad_id = b"bad\xff\xfe-1"
    shown_id = "bad\\xff\\xfe-1"  # what the log and the record say: the bytes, escaped
    with Serve(tmp_path) as serve:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp:
            s.bind(("127.0.0.1", 0))
            rtp.bind(("127.0.0.1", 0))
            s.settimeout(10)
            me = f"127.0.0.1:{s.getsockname()[1]}"
            s.sendto(_invite(serve.sip_port, me, bad_id, b"\xff\xfeName", rtp.getsockname()[1]),
                     ("127.0.0.1", serve.sip_port))
            ok = final_response(s, b"1 INVITE")
            assert ok.startswith(b"SIP/2.0 200"), ok
            assert sip_header(ok, b"Call-ID") == bad_id  # the wire keeps the peer's bytes
            to = sip_header(ok, b"To")
            target = sip_header(ok, b"Contact").strip(b"<>").split(b">")[0]
            dialog = (b'From: "\xff\xfeName" <sip:evil@127.0.0.1>;tag=badbytes\r\nTo: ' + to +
                      b"\r\nCall-ID: " + bad_id + b"\r\nMax-Forwards: 70\r\n")
            s.sendto(b"ACK " + target + b" SIP/2.0\r\nVia: SIP/2.0/UDP " + me.encode() +
                     b";branch=z9hG4bKbadbytes1\r\n" + dialog + b"CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
                     ("127.0.0.1", serve.sip_port))
            _eventually(lambda: serve.log.all("CallConfirmed", call_id=shown_id), what="the call confirmed")
            _eventually(lambda: (serve.sidecar(shown_id) or {}).get("answered"), what="its sidecar")
            s.sendto(b"BYE " + target + b" SIP/2.0\r\nVia: SIP/2.0/UDP " + me.encode() +
                     b";branch=z9hG4bKbadbytes2\r\n" + dialog + b"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
                     ("127.0.0.1", serve.sip_port))
            assert final_response(s, b"2 BYE").startswith(b"SIP/2.0 200")
        ended = _eventually(lambda: serve.log.all("CallEnded", call_id=shown_id), what="CallEnded logged")
        assert ended[0]["cause"] == "remote"
        [incoming] = serve.log.all("IncomingCall", call_id=shown_id)
        assert incoming["remote_uri"] == '"\\xff\\xfeName" <sip:evil@127.0.0.1>'
        assert incoming["local_uri"].startswith('"\\xff\\xfeName" <sip:echo@127.0.0.1')
        record = _eventually(lambda: (lambda s: s if s and s["recording"]["complete"] else None)(
            serve.sidecar(shown_id)), what="the record completed")
        assert record["remote_uri"] == incoming["remote_uri"] and record["hangup_cause"] == "remote"
        # alive, and a real call still works
        assert serve.proc.poll() is None
        with PjsuaPeer(user="bob", log_dir=tmp_path) as peer:
            call_id = peer.call(serve.uri)
            peer.expect("media", call_id=call_id, timeout=15)
            peer.send("hangup", call_id=call_id)
            peer.expect("disconnected", call_id=call_id, timeout=15)
        _eventually(lambda: serve.log.all("CallEnded", call_id=call_id), what="the real call logged")
        assert stop_process(serve.proc, timeout=30) == 0
    assert not serve.log.bad and "Traceback" not in "".join(serve.err.lines)
    assert not list(serve.calls.glob("*.tmp"))


def test_pjsips_own_busy_at_capacity_is_an_event_and_a_metric(tmp_path):
    """Five callers at once on the wheel's four call slots: pjsua answers the fifth 486 itself, before any
    callback of ours runs; it is logged as a CallRejected by pjsip and counted like our own refusals."""
    with Serve(tmp_path) as serve, PjsuaPeer(user="a", log_dir=tmp_path) as a, \
            PjsuaPeer(user="b", log_dir=tmp_path) as b:
        ids = [a.call(serve.uri) for _ in range(WHEEL_MAX_CALLS)] + [b.call(serve.uri)]
        outcome = {}
        for cid in ids:
            peer = a if cid in ids[:WHEEL_MAX_CALLS] else b
            outcome[cid] = _eventually(lambda: ("up" if peer.all("media", call_id=cid) else
                                                 next((e["code"] for e in peer.all("disconnected", call_id=cid)), None)),
                                       what=f"call {cid} answered or refused")
        assert sorted(outcome.values(), key=str) == [486, "up", "up", "up", "up"], outcome
        [refused] = _eventually(lambda: serve.log.all("CallRejected"), what="the refusal logged")
        assert refused["code"] == 486 and refused["by"] == "pjsip" and "call slots" in refused["reason"]
        assert refused["account"] == "line" and refused["remote_uri"].startswith("sip:")
        assert _eventually(lambda: serve.metric('callbot_calls_rejected_total{code="486"}'),
                           what="the refusal counted") == 1
        for cid, state in outcome.items():
            if state == "up":
                (a if cid in ids[:WHEEL_MAX_CALLS] else b).send("hangup", call_id=cid)
        _eventually(lambda: len(serve.log.all("CallEnded")) == WHEEL_MAX_CALLS, what="the four calls ended")
        assert len(serve.log.all("CallRejected")) == 1


def test_a_digit_flood_keeps_the_record_bounded(echo_line, tmp_path, monkeypatch):
    """The record keeps the first DTMF_KEPT digits and counts the rest; every digit is still an event."""
    monkeypatch.setattr(call_record, "DTMF_KEPT", 3)  # 1000 in service; 3 keeps the call short
    with PjsuaPeer(user="carol", log_dir=tmp_path) as peer:
        call_id = peer.call(echo_line.account_uri())
        echo_line.wait_for(CallConfirmed, call_id=call_id)
        peer.send("dtmf", call_id=call_id, digits="12345", method="info")
        echo_line.wait_for(DtmfReceived, call_id=call_id, digit="5")
        echo_line.hangup(call_id)
        echo_line.wait_for(CallEnded, call_id=call_id)
    record = echo_line.records[call_id]
    assert [d.digit for d in record.dtmf] == ["1", "2", "3"] and record.dtmf_dropped == 2
    assert all(isinstance(d, DtmfRecord) for d in record.dtmf)
    sidecar = _eventually(lambda: [json.loads(p.read_text()) for p in sidecars(tmp_path)],
                          what="the sidecar")[0]
    assert [d["digit"] for d in sidecar["dtmf"]] == ["1", "2", "3"] and sidecar["dtmf_dropped"] == 2
