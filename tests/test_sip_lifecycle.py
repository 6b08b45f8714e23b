"""Endpoint lifecycle: start/stop in-process, one endpoint per process, config errors, signals mid-call."""
from __future__ import annotations

import signal

import msgspec
import pytest
from tests.sip_peers import PjsuaPeer, endpoint_process, free_port

from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, EndpointStopped

pytestmark = pytest.mark.timeout(120)


def _local(**kw) -> EndpointConfig:
    return EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),), **kw)


def test_start_stop_twice_in_one_process():
    for _ in range(2):
        ep = Endpoint(_local()).start()
        assert ep.running
        ep.stop()
        assert not ep.running
        assert ep.history(EndpointStopped)


def test_second_endpoint_in_process_is_refused():
    with Endpoint(_local()):
        with pytest.raises(RuntimeError, match="already running"):
            Endpoint(_local()).start()


def test_port_in_use_is_a_clear_error_and_leaves_no_endpoint():
    port = free_port()
    with Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=port),))):
        pass  # free again
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        with pytest.raises(ValueError, match=f"cannot listen on udp 127.0.0.1:{port}"):
            Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=port),))).start()
    with Endpoint(_local()):  # the failed start cleaned up after itself
        pass


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="codec 'OPUS/48000' is not available"):
        Endpoint(_local(codecs=("OPUS/48000",))).start()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_calls=5), "Expected `int` <= 4"),
    (dict(accounts=(AccountConfig(transport="nope"),)), "transport 'nope' is not one of"),
    (dict(accounts=(AccountConfig(name="a"), AccountConfig(name="a"))), "account names must be unique"),
])
def test_config_errors(kwargs, message):
    with pytest.raises((ValueError, msgspec.ValidationError), match=message):
        msgspec.convert({**{k: msgspec.to_builtins(v) for k, v in kwargs.items()}}, EndpointConfig)


def test_config_rejects_unknown_fields_and_bad_combinations():
    with pytest.raises(msgspec.ValidationError, match="unknown field `pasword`"):
        msgspec.convert({"name": "x", "pasword": "p"}, AccountConfig)
    with pytest.raises(ValueError, match="needs cert_file and key_file"):
        TransportConfig(kind="tls")
    with pytest.raises(ValueError, match="a password needs a registrar"):
        AccountConfig(password="secret")
    with pytest.raises(ValueError, match="must be a plain SIP user part"):
        AccountConfig(user="a@b")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_call_hangs_up_and_exits_zero(sig, tmp_path):
    with endpoint_process("--bind", "127.0.0.1", "--port", "0", "--user", "bot",
                          log_path=tmp_path / "endpoint.log") as (proc, uri):
        with PjsuaPeer(user="alice", log_dir=tmp_path) as peer:
            call_id = peer.call(uri)
            peer.expect("state", call_id=call_id, state="CONFIRMED")
            proc.send_signal(sig)
            # the endpoint said goodbye (BYE) rather than vanishing
            assert peer.expect("disconnected", call_id=call_id)["code"] == 200
            assert proc.wait(30) == 0, (tmp_path / "endpoint.log").read_text()[-3000:]
    log = (tmp_path / "endpoint.log").read_text()
    assert "Assertion" not in log and "Traceback" not in log


def test_stop_mid_call_in_process(tmp_path):
    ep = Endpoint(_local()).start()
    try:
        with PjsuaPeer(user="bob", log_dir=tmp_path) as peer:
            call_id = peer.call(ep.account_uri())
            ep.wait_for(CallConfirmed, call_id=call_id)
            ep.stop()
            assert ep.wait_for(CallEnded, call_id=call_id).cause == "shutdown"
            assert peer.expect("disconnected", call_id=call_id)["code"] == 200
    finally:
        ep.stop()


def test_public_address_goes_into_uri_contact_and_sdp():
    # what a NATed or containerised endpoint announces; a raw INVITE shows what peers are told
    import socket

    cfg = EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0,
                                                     public_address="192.0.2.10"),))
    with Endpoint(cfg) as ep:
        port = ep.transports["udp"].port
        assert ep.account_uri() == f"sip:callbot@192.0.2.10:{port}"
        sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               "m=audio 4000 RTP/AVP 0\r\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
            me = f"127.0.0.1:{s.getsockname()[1]}"
            s.sendto((f"INVITE sip:callbot@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKpub\r\n"
                      f"Max-Forwards: 70\r\nFrom: <sip:raw@127.0.0.1>;tag=p1\r\nTo: <sip:callbot@127.0.0.1>\r\n"
                      f"Call-ID: public-1\r\nCSeq: 1 INVITE\r\nContact: <sip:raw@{me}>\r\n"
                      f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}").encode(),
                     ("127.0.0.1", port))
            while True:
                answer = s.recv(65536).decode()
                if not answer.startswith("SIP/2.0 1"):
                    break
        assert answer.startswith("SIP/2.0 200")
        contact = next(h for h in answer.split("\r\n") if h.lower().startswith("contact:"))
        assert f"192.0.2.10:{port}" in contact
        assert "c=IN IP4 192.0.2.10" in answer  # RTP is announced at the public address too
        ep.hangup("public-1")
        ep.wait_for(CallEnded, call_id="public-1")


def test_an_endpoint_starts_once_and_refuses_work_when_stopped():
    ep = Endpoint(_local()).start()
    ep.stop()
    with pytest.raises(RuntimeError, match="starts once"):
        ep.start()
    with pytest.raises(RuntimeError, match="not running"):
        ep.dial("sip:x@127.0.0.1")


_RAISING_CALLBACK = """
import logging, sys
logging.basicConfig(level=logging.ERROR)
from callbot.sip import call
from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded

def broken(self, code, reason):
    raise RuntimeError("deliberately broken progress handler")
call.SipCall._report_progress = broken
ep = Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),))).start()
cid = ep.dial(ep.account_uri())  # a call to ourselves: both legs in this process
inbound = cid + "~inbound"  # the answering leg, whose handlers are intact
ep.wait_for(CallConfirmed, call_id=inbound)
ep.hangup(inbound)
ep.wait_for(CallEnded, call_id=inbound)
ep.stop()
print("stopped cleanly")
"""


def test_a_raising_callback_is_logged_and_the_process_exits_cleanly():
    # a traceback kept by pjsua2's error printing would hold a Call past libDestroy: abort at exit
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _RAISING_CALLBACK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stopped cleanly" in out.stdout
    assert "deliberately broken progress handler" in out.stderr
    assert "pjsua2 callback SipCall.onCall" in out.stderr


def test_default_bind_all_publishes_a_reachable_host(tmp_path):
    # the embedded default listens on every interface; its URI must name a real host, not 0.0.0.0
    with Endpoint(EndpointConfig(transports=(TransportConfig(port=0, rtp_port=0),))) as ep:
        uri = ep.account_uri()
        host, port = uri.split("@", 1)[1].rsplit(":", 1)
        assert host not in ("0.0.0.0", "") and int(port) == ep.transports["udp"].port
        with PjsuaPeer(user="lan", log_dir=tmp_path) as peer:  # and loopback reaches it too
            cid = peer.call(f"sip:callbot@127.0.0.1:{port}")
            ep.wait_for(CallConfirmed, call_id=cid)
            ep.hangup(cid)
            ep.wait_for(CallEnded, call_id=cid)
