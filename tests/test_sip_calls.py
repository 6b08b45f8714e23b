"""Inbound and outbound calls between the endpoint (in this process) and pjsua2 peer processes."""
from __future__ import annotations

import pathlib
import time

import pytest
from tests.sip_peers import PjsuaPeer

from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import (CallConfirmed, CallEnded, CallMedia, CallProgress, CallRejected, DtmfReceived,
                                IncomingCall)

pytestmark = pytest.mark.timeout(120)

RING_DELAY_S = 0.3


@pytest.fixture(scope="module")
def bot():
    cfg = EndpointConfig(
        transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
        accounts=(AccountConfig(name="bot", user="bot"),
                  AccountConfig(name="ringer", user="ringer", ring_delay_s=RING_DELAY_S),
                  AccountConfig(name="manual", user="manual", auto_answer=False)),
        dial_timeout_s=5.0,
    )
    with Endpoint(cfg) as ep:
        yield ep


@pytest.fixture
def peer(tmp_path: pathlib.Path):
    with PjsuaPeer(user="alice", log_dir=tmp_path) as p:
        yield p


def _dial_in(bot: Endpoint, peer: PjsuaPeer, account: str = "bot") -> str:
    t0 = time.monotonic()
    call_id = peer.call(bot.account_uri(account))
    bot.wait_for(IncomingCall, call_id=call_id, after=t0)
    return call_id


def test_direct_account_uri_names_user_host_and_port(bot):
    uri = bot.account_uri("bot")
    port = bot.transports["udp"].port
    assert uri == f"sip:bot@127.0.0.1:{port}"
    assert port != 0


def test_inbound_call_is_answered_and_peer_hangs_up(bot, peer):
    call_id = _dial_in(bot, peer)
    assert bot.wait_for(CallConfirmed, call_id=call_id).direction == "inbound"
    peer.expect("state", call_id=call_id, state="CONFIRMED")
    media = bot.wait_for(CallMedia, call_id=call_id)
    assert (media.codec, media.clock_rate) == ("G722", 16000)  # best shared codec, G.722 first
    assert call_id in bot.calls()
    peer.send("hangup", call_id=call_id)
    ended = bot.wait_for(CallEnded, call_id=call_id)
    assert ended.cause == "remote"
    rec = bot.records[call_id]
    assert rec.direction == "inbound" and rec.account == "bot"
    assert rec.codec == "G722" and rec.hangup_cause == "remote"
    assert rec.start <= rec.answered <= rec.end
    assert "alice" in rec.remote_uri
    assert call_id not in bot.calls()


def test_inbound_call_bot_hangs_up(bot, peer):
    call_id = _dial_in(bot, peer)
    bot.wait_for(CallConfirmed, call_id=call_id)
    peer.expect("state", call_id=call_id, state="CONFIRMED")
    bot.hangup(call_id)
    assert bot.wait_for(CallEnded, call_id=call_id).cause == "local"
    assert peer.expect("disconnected", call_id=call_id)["code"] == 200


def test_ring_delay_sends_180_before_answering(bot, peer):
    call_id = _dial_in(bot, peer, "ringer")
    confirmed = bot.wait_for(CallConfirmed, call_id=call_id)
    incoming = bot.wait_for(IncomingCall, call_id=call_id)
    assert incoming.account == "ringer"
    # the peer saw ringing first; the answer came no earlier than the configured delay
    assert peer.expect("progress", call_id=call_id, code=180)
    assert confirmed.at - incoming.at >= RING_DELAY_S
    bot.hangup(call_id)
    bot.wait_for(CallEnded, call_id=call_id)


def test_manual_answer_and_reject(bot, peer):
    call_id = _dial_in(bot, peer, "manual")
    peer.expect("progress", call_id=call_id, code=180)
    bot.answer(call_id)
    bot.wait_for(CallConfirmed, call_id=call_id)
    peer.send("hangup", call_id=call_id)
    bot.wait_for(CallEnded, call_id=call_id)

    call_id = _dial_in(bot, peer, "manual")
    bot.hangup(call_id, 603)
    assert peer.expect("disconnected", call_id=call_id)["code"] == 603


def test_unknown_call_id_is_a_clear_error(bot):
    with pytest.raises(ValueError, match="no active call"):
        bot.hangup("no-such-call")
    with pytest.raises(ValueError, match="DTMF digits"):
        bot.send_dtmf("x", "12Z")


def test_outbound_call_reports_progress_then_peer_answers(bot, tmp_path):
    with PjsuaPeer(user="carol", answer="auto", ring_ms=200, log_dir=tmp_path) as carol:
        t0 = time.monotonic()
        call_id = bot.dial(carol.uri, account="bot")
        codes = []
        for code in (100, 180, 200):
            codes.append(bot.wait_for(CallProgress, call_id=call_id, code=code, after=t0))
        assert [c.at for c in codes] == sorted(c.at for c in codes)
        assert bot.wait_for(CallConfirmed, call_id=call_id).direction == "outbound"
        carol.expect("state", state="CONFIRMED", call_id=call_id)
        bot.hangup(call_id)
        assert bot.wait_for(CallEnded, call_id=call_id).cause == "local"
        carol.expect("disconnected", call_id=call_id)


def test_outbound_early_media_183(bot, tmp_path):
    with PjsuaPeer(user="dave", answer="early", ring_ms=200, log_dir=tmp_path) as dave:
        call_id = bot.dial(dave.uri)
        bot.wait_for(CallProgress, call_id=call_id, code=183)
        bot.wait_for(CallConfirmed, call_id=call_id)
        dave.send("hangup")
        assert bot.wait_for(CallEnded, call_id=call_id).cause == "remote"


def test_outbound_busy_is_a_failure_with_its_code(bot, tmp_path):
    with PjsuaPeer(user="erin", answer="busy", log_dir=tmp_path) as erin:
        call_id = bot.dial(erin.uri)
        bot.wait_for(CallProgress, call_id=call_id, code=486)
        ended = bot.wait_for(CallEnded, call_id=call_id)
        assert (ended.cause, ended.code) == ("failed", 486)


def test_outbound_unanswered_call_times_out(bot, tmp_path):
    with PjsuaPeer(user="frank", answer="manual", log_dir=tmp_path) as frank:
        call_id = bot.dial(frank.uri, timeout_s=1.0)
        bot.wait_for(CallProgress, call_id=call_id, code=180)
        ended = bot.wait_for(CallEnded, call_id=call_id, timeout=10)
        assert ended.cause == "timeout"
        assert ended.code == 487  # CANCEL answered: Request Terminated
        frank.expect("disconnected", call_id=call_id)


def test_dial_bad_uri_is_a_clear_error(bot):
    with pytest.raises(ValueError, match="not a valid SIP URI"):
        bot.dial("not a uri")
    with pytest.raises(ValueError, match="no account"):
        bot.dial("sip:x@127.0.0.1", account="nobody")


def test_dial_over_a_transport_we_lack_is_one_error_and_no_failed_callback(bot, caplog):
    """pjsua reports the call's state from inside makeCall before the INVITE could leave: that callback
    must not trip over the record made only after makeCall (it did: AttributeError)."""
    with caplog.at_level("ERROR"), pytest.raises(ValueError, match="Unsuitable transport"):
        bot.dial("sip:x@127.0.0.1:5999;transport=tcp")  # `bot` listens on UDP only
    assert not [r for r in caplog.records if "callback" in r.getMessage()]


def test_dtmf_received_both_methods_with_timestamps(bot, peer):
    call_id = _dial_in(bot, peer)
    bot.wait_for(CallConfirmed, call_id=call_id)
    peer.expect("state", call_id=call_id, state="CONFIRMED")
    t0 = time.monotonic()
    peer.send("dtmf", call_id=call_id, digits="1*", method="rfc4733")
    first = bot.wait_for(DtmfReceived, call_id=call_id, digit="1")
    star = bot.wait_for(DtmfReceived, call_id=call_id, digit="*")
    peer.send("dtmf", call_id=call_id, digits="9", method="info")
    nine = bot.wait_for(DtmfReceived, call_id=call_id, digit="9")
    assert (first.method, star.method, nine.method) == ("rfc4733", "rfc4733", "info")
    assert t0 <= first.at <= star.at <= nine.at
    bot.hangup(call_id)
    bot.wait_for(CallEnded, call_id=call_id)
    rec = bot.records[call_id]
    assert [(d.digit, d.method) for d in rec.dtmf] == [("1", "rfc4733"), ("*", "rfc4733"), ("9", "info")]
    assert rec.dtmf[0].duration_ms > 0  # "1" had ended before "*" began: its length is known


def test_dtmf_sent_both_methods(bot, peer):
    call_id = _dial_in(bot, peer)
    bot.wait_for(CallConfirmed, call_id=call_id)
    peer.expect("state", call_id=call_id, state="CONFIRMED")
    bot.send_dtmf(call_id, "4#", "rfc4733")
    assert peer.expect("dtmf", call_id=call_id, digit="4")["method"] == "rfc4733"
    assert peer.expect("dtmf", call_id=call_id, digit="#")["method"] == "rfc4733"
    bot.send_dtmf(call_id, "7", "info")
    assert peer.expect("dtmf", call_id=call_id, digit="7")["method"] == "info"
    bot.hangup(call_id)
    bot.wait_for(CallEnded, call_id=call_id)


def test_no_call_was_rejected(bot):
    # nothing above should have met the busy or bad-offer path
    assert bot.history(CallRejected) == []


def test_ended_calls_are_released_at_once_despite_pending_timers(bot, tmp_path):
    # pjsua2's Call keeps its slot number after DISCONNECTED and its destructor clears that slot: an
    # object kept alive by a timer (here the 5 s dial timeout) could later hang up whoever took the slot
    import gc
    import weakref

    with PjsuaPeer(user="gina", log_dir=tmp_path) as gina:
        cid = bot.dial(gina.uri)
        bot.wait_for(CallConfirmed, call_id=cid)
        ref = bot._submit(lambda: weakref.ref(bot._calls[cid]))
        gina.send("hangup", call_id=cid)
        bot.wait_for(CallEnded, call_id=cid)
        bot._submit(lambda: None)  # the SIP thread has run what the DISCONNECTED callback queued
        bot._submit(gc.collect)
        assert ref() is None


def test_caller_gives_up_while_ringing(bot, tmp_path):
    # CANCEL while we ring: the call ends with 487 and can no longer be answered
    with PjsuaPeer(user="hasty", log_dir=tmp_path) as peer:
        call_id = _dial_in(bot, peer, "manual")
        peer.expect("progress", call_id=call_id, code=180)
        peer.send("hangup", call_id=call_id)
        ended = bot.wait_for(CallEnded, call_id=call_id)
        assert (ended.cause, ended.code) == ("remote", 487)
        assert bot.records[call_id].answered is None
        with pytest.raises(ValueError, match="no active call"):
            bot.answer(call_id)
    with PjsuaPeer(user="patient", log_dir=tmp_path) as peer:
        call_id = _dial_in(bot, peer, "ringer")
        bot.wait_for(CallConfirmed, call_id=call_id)
        bot.hangup(call_id)
        bot.wait_for(CallEnded, call_id=call_id)
