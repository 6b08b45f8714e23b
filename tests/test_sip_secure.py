"""TCP and TLS transports (self-signed pair made here with openssl) and SRTP per account."""
from __future__ import annotations

import pathlib
import subprocess

import pytest
from tests.sip_peers import PjsuaPeer

from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, CallMedia, IncomingCall

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def bot(cert_pair):
    cert, key = cert_pair
    cfg = EndpointConfig(
        transports=(TransportConfig(name="udp", bind="127.0.0.1", port=0, rtp_port=0),
                    TransportConfig(name="tcp", kind="tcp", bind="127.0.0.1", port=0, rtp_port=0),
                    TransportConfig(name="tls", kind="tls", bind="127.0.0.1", port=0, rtp_port=0,
                                    cert_file=cert, key_file=key)),
        accounts=(AccountConfig(name="udp", user="bot", transport="udp"),
                  AccountConfig(name="tcp", user="bottcp", transport="tcp"),
                  AccountConfig(name="tls", user="bottls", transport="tls", srtp="mandatory",
                                srtp_require_tls=True),
                  AccountConfig(name="srtp", user="botsrtp", transport="udp", srtp="mandatory"),
                  AccountConfig(name="srtp-opt", user="botopt", transport="udp", srtp="optional")),
    )
    with Endpoint(cfg) as ep:
        yield ep


def _call_in(bot: Endpoint, peer: PjsuaPeer, account: str) -> CallMedia:
    cid = peer.call(bot.account_uri(account))
    assert bot.wait_for(IncomingCall, call_id=cid).account == account
    bot.wait_for(CallConfirmed, call_id=cid)
    media = bot.wait_for(CallMedia, call_id=cid)
    assert peer.expect("media", call_id=cid)["srtp"] == media.srtp
    peer.send("hangup", call_id=cid)
    bot.wait_for(CallEnded, call_id=cid)
    return media


def test_account_uris_carry_their_transport(bot):
    assert bot.account_uri("tcp").endswith(f":{bot.transports['tcp'].port};transport=tcp")
    assert bot.account_uri("tls").endswith(f":{bot.transports['tls'].port};transport=tls")
    assert ";transport" not in bot.account_uri("udp")
    assert len({t.port for t in bot.transports.values()}) == 3


def test_tcp_call(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="alice", transport="tcp", log_dir=tmp_path) as peer:
        assert _call_in(bot, peer, "tcp").srtp is False


def test_tls_call_with_mandatory_srtp(bot, cert_pair, tmp_path: pathlib.Path):
    cert, key = cert_pair
    with PjsuaPeer(user="alice", transport="tls", cert=cert, key=key, srtp="mandatory", log_dir=tmp_path) as peer:
        assert _call_in(bot, peer, "tls").srtp is True


def test_outbound_tls_call(bot, cert_pair, tmp_path: pathlib.Path):
    cert, key = cert_pair
    with PjsuaPeer(user="carol", transport="tls", cert=cert, key=key, srtp="optional", log_dir=tmp_path) as peer:
        cid = bot.dial(peer.uri, account="tls")
        media = bot.wait_for(CallMedia, call_id=cid)
        bot.wait_for(CallConfirmed, call_id=cid)
        assert media.srtp is True
        bot.hangup(cid)
        bot.wait_for(CallEnded, call_id=cid)


def test_srtp_mandatory_call_over_udp(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="alice", srtp="mandatory", log_dir=tmp_path) as peer:
        assert _call_in(bot, peer, "srtp").srtp is True


def test_srtp_mandatory_account_refuses_plain_rtp(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="plain", srtp="off", log_dir=tmp_path) as peer:
        cid = peer.call(bot.account_uri("srtp"))
        assert peer.expect("disconnected", call_id=cid)["code"] == 488
        assert cid not in bot.calls()
        out = bot.dial(peer.uri, account="srtp")
        ended = bot.wait_for(CallEnded, call_id=out)
        assert ended.cause == "failed" and ended.code == 488


@pytest.mark.parametrize("peer_srtp, expected", [("off", False), ("mandatory", True)])
def test_srtp_optional_account_takes_both(bot, tmp_path: pathlib.Path, peer_srtp, expected):
    with PjsuaPeer(user="opt", srtp=peer_srtp, log_dir=tmp_path) as peer:
        assert _call_in(bot, peer, "srtp-opt").srtp is expected
