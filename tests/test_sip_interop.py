"""Interop with independent user agents: baresip (auto-answer) and SIPp (built-in UAC and UAS)."""
from __future__ import annotations

import pathlib
import time

import pytest
from tests.sip_peers import Baresip, Sipp

from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, CallMedia, CallProgress, IncomingCall

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bot():
    with Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),))) as ep:
        yield ep


def test_dial_baresip_which_auto_answers(bot, tmp_path: pathlib.Path):
    with Baresip(tmp_path / "baresip") as peer:
        cid = bot.dial(peer.uri)
        bot.wait_for(CallProgress, call_id=cid, code=200)
        bot.wait_for(CallConfirmed, call_id=cid)
        media = bot.wait_for(CallMedia, call_id=cid)
        assert (media.codec, media.clock_rate) == ("G722", 16000)
        peer.output.wait_line("Call established", 10)
        bot.hangup(cid)
        assert bot.wait_for(CallEnded, call_id=cid).cause == "local"
        peer.output.wait_line("session closed", 10)  # our BYE reached it


def test_baresip_calls_in_and_hangs_up(bot, tmp_path: pathlib.Path):
    peer = Baresip(tmp_path / "baresip", user="caller", dial=bot.account_uri())
    try:
        incoming = bot.wait_for(IncomingCall, timeout=15, remote_uri="<sip:caller@127.0.0.1>")
        bot.wait_for(CallConfirmed, call_id=incoming.call_id)
        peer.output.wait_line("Call established", 10)
    finally:
        peer.close()  # SIGTERM: baresip hangs up on its way out
    assert bot.wait_for(CallEnded, call_id=incoming.call_id).cause == "remote"


def test_sipp_uac_calls_in(bot, tmp_path: pathlib.Path):
    port = bot.transports["udp"].port
    with Sipp("uac", tmp_path, target=f"127.0.0.1:{port}", service="callbot", calls=1, call_ms=500) as sipp:
        assert sipp.wait() == 0, (tmp_path / "sipp-uac.log").read_text()[-2000:]
    [incoming] = [e for e in bot.history(IncomingCall) if "sipp" in e.remote_uri]
    assert bot.wait_for(CallConfirmed, call_id=incoming.call_id)
    assert bot.wait_for(CallEnded, call_id=incoming.call_id).cause == "remote"
    assert bot.records[incoming.call_id].codec == "PCMU"  # SIPp's offer holds PCMU only


def test_sipp_uas_with_rtp_echo_answers_our_call(bot, tmp_path: pathlib.Path):
    with Sipp("uas", tmp_path, calls=1, rtp_echo=True) as sipp:
        cid = bot.dial(sipp.uri)
        for code in (180, 200):
            bot.wait_for(CallProgress, call_id=cid, code=code)
        bot.wait_for(CallConfirmed, call_id=cid)
        bot.hangup(cid)
        assert bot.wait_for(CallEnded, call_id=cid).code == 200
        assert sipp.wait() == 0, (tmp_path / "sipp-uas.log").read_text()[-2000:]


def test_sipp_uac_burst_beyond_capacity(bot, tmp_path: pathlib.Path):
    # six simultaneous calls against four slots: four succeed, two are turned away busy, none hang
    port = bot.transports["udp"].port
    t0 = time.monotonic()
    with Sipp("uac", tmp_path, target=f"127.0.0.1:{port}", service="callbot", calls=6, call_ms=2000) as sipp:
        sipp.proc.wait(60)
    log = (tmp_path / "sipp-uac.log").read_text()
    assert sipp.proc.returncode != 0  # SIPp reports failed calls
    assert not bot.calls()
    answered = [e for e in bot.history(CallConfirmed) if e.at >= t0]
    ended = [e for e in bot.history(CallEnded) if e.at >= t0 and e.cause == "remote"]
    assert 4 <= len(answered) < 6 and len(ended) == len(answered), log[-2000:]
