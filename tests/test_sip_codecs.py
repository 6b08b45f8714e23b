"""Codec choice: G.722 first, then PCMU, PCMA (configurable), whoever offers; the result per call."""
from __future__ import annotations

import pathlib
import socket

import pytest
from tests.sip_peers import PjsuaPeer

from callbot.sip.codecs import narrow_answer
from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, CallMedia, CallRejected

pytestmark = pytest.mark.timeout(120)


def _local(**kw) -> EndpointConfig:
    return EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),), **kw)


def _call_in(bot: Endpoint, peer: PjsuaPeer) -> CallMedia:
    cid = peer.call(bot.account_uri())
    media = bot.wait_for(CallMedia, call_id=cid)
    bot.wait_for(CallConfirmed, call_id=cid)
    peer_media = peer.expect("media", call_id=cid)
    assert (peer_media["codec"], peer_media["rate"]) == (media.codec, media.clock_rate)
    bot.hangup(cid)
    bot.wait_for(CallEnded, call_id=cid)
    return media


def test_configured_priority_puts_pcmu_first(tmp_path: pathlib.Path):
    # first in the module: its own endpoint, before the module's `bot` exists (one per process)
    with Endpoint(_local(codecs=("PCMU/8000", "G722/16000"))) as ep:
        assert ep.codecs == ["PCMU/8000/1", "G722/16000/1"]
        with PjsuaPeer(user="a", codecs="G722/,PCMU/,PCMA/", log_dir=tmp_path) as a:
            assert _call_in(ep, a).codec == "PCMU"
        with PjsuaPeer(user="b", codecs="PCMA/", log_dir=tmp_path) as b:  # nothing in common
            cid = b.call(ep.account_uri())
            assert b.expect("disconnected", call_id=cid)["code"] == 488  # pjsua's own verification


@pytest.fixture(scope="module")
def bot():
    with Endpoint(_local()) as ep:
        yield ep


def test_default_order(bot):
    assert bot.codecs == ["G722/16000/1", "PCMU/8000/1", "PCMA/8000/1"]


@pytest.mark.parametrize("offer, expected", [
    ("PCMU/,PCMA/,G722/", ("G722", 16000)),  # our priority wins over the caller's order
    ("PCMA/,PCMU/", ("PCMU", 8000)),
    ("PCMA/", ("PCMA", 8000)),
    ("GSM/,PCMA/", ("PCMA", 8000)),
])
def test_inbound_negotiation_follows_our_priority(bot, tmp_path, offer, expected):
    with PjsuaPeer(user="caller", codecs=offer, log_dir=tmp_path) as peer:
        media = _call_in(bot, peer)
    assert (media.codec, media.clock_rate) == expected


@pytest.mark.parametrize("accepts, expected", [
    ("PCMA/,PCMU/,G722/", ("G722", 16000)),  # we offer G722 first: the answerer takes it
    ("PCMA/,PCMU/", ("PCMU", 8000)),
    ("PCMA/", ("PCMA", 8000)),
])
def test_outbound_negotiation(bot, tmp_path, accepts, expected):
    with PjsuaPeer(user="callee", codecs=accepts, log_dir=tmp_path) as peer:
        cid = bot.dial(peer.uri)
        media = bot.wait_for(CallMedia, call_id=cid)
        bot.wait_for(CallConfirmed, call_id=cid)
        bot.hangup(cid)
        bot.wait_for(CallEnded, call_id=cid)
    assert (media.codec, media.clock_rate) == expected
    assert (bot.records[cid].codec, bot.records[cid].codec_rate) == expected


def test_unknown_codecs_only_get_488(bot, tmp_path):
    with PjsuaPeer(user="gsm", codecs="GSM/", log_dir=tmp_path) as peer:
        cid = peer.call(bot.account_uri())
        assert peer.expect("disconnected", call_id=cid)["code"] == 488
    assert not bot.calls()


def _raw_invite(port: int, sdp: str, call_id: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        me = f"127.0.0.1:{s.getsockname()[1]}"
        msg = (f"INVITE sip:callbot@127.0.0.1:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {me};branch=z9hG4bK{call_id}\r\nMax-Forwards: 70\r\n"
               f"From: <sip:raw@127.0.0.1>;tag=r1\r\nTo: <sip:callbot@127.0.0.1:{port}>\r\n"
               f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:raw@{me}>\r\n"
               f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
        s.sendto(msg.encode(), ("127.0.0.1", port))
        while True:  # skip provisional answers
            data = s.recv(65536)
            if not data.startswith(b"SIP/2.0 1"):
                break
        # acknowledge the final answer, as a UAC must
        s.sendto((f"ACK sip:callbot@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{call_id}"
                  f"\r\nMax-Forwards: 70\r\nFrom: <sip:raw@127.0.0.1>;tag=r1\r\nTo: <sip:callbot@127.0.0.1:{port}>"
                  f"\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode(),
                 ("127.0.0.1", port))
        return data


def test_nonsense_offer_gets_488_before_taking_a_slot(bot, tmp_path):
    bad = OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 999.1.1.1")
    answer = _raw_invite(bot.transports["udp"].port, bad, "nonsense-1")
    assert answer.startswith(b"SIP/2.0 488")
    # ours: the 488s pjsip gives on its own (an offer with no codec in common) say by="pjsip"
    rejected = bot.wait_for(CallRejected, code=488, by="callbot")
    assert "999.1.1.1" in rejected.reason or "address" in rejected.reason
    assert bot.records["nonsense-1"].hangup_cause == "rejected"
    assert not bot.calls()
    with PjsuaPeer(user="after", log_dir=tmp_path) as peer:  # and real callers still get in
        assert _call_in(bot, peer).codec == "G722"


OFFER = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         "m=audio 4000 RTP/AVP 0 8 9 101\r\na=rtpmap:101 telephone-event/8000\r\n")
ANSWER = ("v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
          "m=audio 5000 RTP/AVP 0 9 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:9 G722/8000\r\n"
          "a=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n")


def test_narrow_answer_keeps_our_best_common_codec_and_dtmf():
    out = narrow_answer(ANSWER, OFFER, ["G722/16000/1", "PCMU/8000/1"])
    assert "m=audio 5000 RTP/AVP 9 101\r\n" in out
    assert "a=rtpmap:0 " not in out and "a=rtpmap:8 " not in out
    assert "a=fmtp:101 0-16" in out and "a=sendrecv" in out
    assert narrow_answer(ANSWER, OFFER, ["OPUS/48000"]) is None  # nothing in common: leave it to pjsip
    one = ANSWER.replace("RTP/AVP 0 9 8 101", "RTP/AVP 9 101")
    assert narrow_answer(one, OFFER, ["G722/16000/1"]) is None  # already one codec
