"""A transport's RTP address apart from its SIP address: behind the edge, SIP stays on loopback while the
calls' RTP binds the public side and the SDP gives callers the address they can reach."""
from __future__ import annotations

import pathlib
import re
import socket

import pytest

from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed
from tests.sip_peers import final_response, sip_header
from tests.test_sip_robustness import _SDP, _invite

pytestmark = pytest.mark.timeout(60)
PUBLIC = "192.0.2.9"  # TEST-NET-1: what the SDP must say, never reached


def _udp_binds(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/udp writes them) of the UDP sockets on `port`."""
    found = set()
    for line in pathlib.Path("/proc/net/udp").read_text().splitlines()[1:]:
        local = line.split()[1]
        address, hexport = local.split(":")
        if int(hexport, 16) == port:
            found.add(address)
    return found


@pytest.mark.parametrize("rtp_bind, bound_hex", [("0.0.0.0", "00000000"), (None, "0100007F")])
def test_rtp_binds_and_announces_its_own_address(rtp_bind, bound_hex):
    transport = TransportConfig(bind="127.0.0.1", port=0, rtp_port=0, rtp_bind=rtp_bind,
                                rtp_public_address=PUBLIC if rtp_bind else None)
    cfg = EndpointConfig(transports=(transport,), accounts=(AccountConfig(name="bot", user="callbot"),))
    with Endpoint(cfg) as ep, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        port = ep.transports["udp"].port
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        me = f"127.0.0.1:{s.getsockname()[1]}"
        s.sendto(_invite(port, me, f"rtp-{bound_hex}", _SDP.format(addr="127.0.0.1", port=40000, pt=0)),
                 ("127.0.0.1", port))
        ok = final_response(s, b"1 INVITE")
        assert ok.startswith(b"SIP/2.0 200"), ok
        sdp = ok.split(b"\r\n\r\n", 1)[1].decode()
        announced = re.search(r"^c=IN IP4 (\S+)", sdp, re.M).group(1)
        rtp_port = int(re.search(r"^m=audio (\d+)", sdp, re.M).group(1))
        assert announced == (PUBLIC if rtp_bind else "127.0.0.1")
        assert sip_header(ok, b"Contact").decode().find("127.0.0.1") >= 0  # SIP itself stays on loopback
        if pathlib.Path("/proc/net/udp").exists():  # Linux: which address the RTP socket really bound
            assert _udp_binds(rtp_port) == {bound_hex}
        target = sip_header(ok, b"Contact").decode().strip("<>").split(">")[0]
        s.sendto((f"ACK {target} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKack\r\nMax-Forwards: 70\r\n"
                  f"From: <sip:evil@127.0.0.1>;tag=rtp-{bound_hex}\r\nTo: {sip_header(ok, b'To').decode()}\r\n"
                  f"Call-ID: rtp-{bound_hex}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode(),
                 ("127.0.0.1", port))
        ep.wait_for(CallConfirmed, call_id=f"rtp-{bound_hex}")
