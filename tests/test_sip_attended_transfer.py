"""Attended transfer on the SIP side (Endpoint.transfer_attended): the target is called on a consultation
leg, and once it answers the caller gets a REFER with Replaces, calls the target itself with an INVITE that
replaces our leg, and both our legs end. Every peer is a real pjsua2 process on 127.0.0.1; what is checked
is what the caller and the target saw as well as our events and records."""
from __future__ import annotations

import pathlib

import pytest
from tests.sip_peers import PjsuaPeer, eventually

from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, TransferProgress

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bot():
    with Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),))) as ep:
        yield ep


def _call_in(bot: Endpoint, peer: PjsuaPeer) -> str:
    cid = peer.call(bot.account_uri())
    bot.wait_for(CallConfirmed, call_id=cid)
    peer.expect("state", call_id=cid, state="CONFIRMED")
    return cid


def _finals(bot: Endpoint, cid: str) -> list[TransferProgress]:
    return [e for e in bot.history(TransferProgress) if e.call_id == cid and e.final]


def test_the_caller_is_put_through_to_the_target_and_both_legs_end(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="alice", log_dir=tmp_path) as alice, \
            PjsuaPeer(user="agent", ring_ms=200, log_dir=tmp_path) as agent:
        cid = _call_in(bot, alice)
        leg = bot.transfer_attended(cid, agent.uri, labels={"transfer_of": cid})
        assert agent.expect("incoming")["call_id"] == leg  # the consultation leg rings the target first
        # answered: the caller is REFERred to the target, with Replaces naming our leg's dialog
        dest = alice.expect("transfer_request", call_id=cid)["dest"]
        assert dest.startswith(f"<{agent.uri}?") and f"Replaces={leg}%3Bto-tag%3D" in dest
        final = bot.wait_for(TransferProgress, call_id=cid, final=True)
        assert final.code == 200
        progress = [e.code for e in bot.history(TransferProgress) if e.call_id == cid]
        assert 180 in progress and all(c < 200 for c in progress[:-1])  # the target ringing, then NOTIFYs
        assert bot.wait_for(CallEnded, call_id=cid).cause == "transfer"
        assert bot.wait_for(CallEnded, call_id=leg).cause == "transfer"  # the target dropped the replaced leg
        # the caller's new call is the target's: its INVITE replaced our leg there (no new incoming call)
        new = _new_call(alice, cid)
        agent.expect("state", call_id=new, state="CONFIRMED")
        assert [e["call_id"] for e in agent.all("incoming")] == [leg]
        agent.expect("state", call_id=leg, state="DISCONNECTED")
        assert not bot.calls()
        rec, leg_rec = bot.records[cid], bot.records[leg]
        assert rec.transfer.target == agent.uri and rec.transfer.succeeded is True and rec.hangup_cause == "transfer"
        assert leg_rec.labels == {"transfer_of": cid} and leg_rec.direction == "outbound"


def _new_call(peer: PjsuaPeer, old: str) -> str:
    """The Call-ID of the call `peer` placed after the REFER (pjsua places it through the old call's object)."""
    return eventually(lambda: next((e["call_id"] for e in peer.all("state", state="CONFIRMED")
                                    if e["call_id"] != old), None), timeout=10)


def test_a_busy_target_fails_the_transfer_and_the_call_goes_on(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="carol", log_dir=tmp_path) as carol, \
            PjsuaPeer(user="busy", answer="busy", log_dir=tmp_path) as busy:
        cid = _call_in(bot, carol)
        leg = bot.transfer_attended(cid, busy.uri)
        final = bot.wait_for(TransferProgress, call_id=cid, final=True)
        assert (final.code, final.reason) == (486, "Busy Here")
        assert bot.wait_for(CallEnded, call_id=leg).cause == "failed"
        assert bot.calls() == [cid] and bot.records[cid].transfer.succeeded is False
        assert not carol.all("transfer_request")  # the caller never knew
        # the call can be transferred again, and hung up as usual
        assert bot.complete_transfer(cid) is False  # nothing to send
        bot.hangup(cid)
        assert bot.wait_for(CallEnded, call_id=cid).cause == "local"
        assert len(_finals(bot, cid)) == 1


def test_an_unanswered_target_is_given_up_at_the_timeout(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="dave", log_dir=tmp_path) as dave, \
            PjsuaPeer(user="away", answer="manual", log_dir=tmp_path) as away:
        cid = _call_in(bot, dave)
        leg = bot.transfer_attended(cid, away.uri, answer_timeout_s=1.0)
        final = bot.wait_for(TransferProgress, call_id=cid, final=True, timeout=10)
        assert (final.code, final.reason) == (408, "no answer within 1 s")
        assert bot.wait_for(CallEnded, call_id=leg).cause == "timeout"
        away.expect("disconnected", call_id=leg)  # cancelled at the target
        assert bot.calls() == [cid]
        bot.hangup(cid)
        bot.wait_for(CallEnded, call_id=cid)


def test_the_refer_waits_for_the_app_and_a_cancel_drops_the_leg_quietly(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="erin", log_dir=tmp_path) as erin, PjsuaPeer(user="sales", log_dir=tmp_path) as sales:
        cid = _call_in(bot, erin)
        leg = bot.transfer_attended(cid, sales.uri, refer_after_s=None)
        bot.wait_for(CallConfirmed, call_id=leg)
        with pytest.raises(ValueError, match="already being transferred"):
            bot.transfer_attended(cid, sales.uri)
        with pytest.raises(ValueError, match="is itself the consultation leg"):
            bot.transfer_attended(leg, erin.uri)
        assert bot.cancel_transfer(cid) is True
        assert bot.wait_for(CallEnded, call_id=leg).cause == "local"
        sales.expect("disconnected", call_id=leg)
        assert not erin.all("transfer_request") and not _finals(bot, cid)  # no REFER, nothing reported
        assert bot.cancel_transfer(cid) is False
        # a second attended transfer of the same call, REFERred when the app says
        leg2 = bot.transfer_attended(cid, sales.uri, refer_after_s=None)
        bot.wait_for(CallConfirmed, call_id=leg2)
        assert not erin.all("transfer_request")
        assert bot.complete_transfer(cid) is True
        assert bot.wait_for(TransferProgress, call_id=cid, final=True).code == 200
        assert bot.wait_for(CallEnded, call_id=cid).cause == "transfer"
        assert len(erin.all("transfer_request")) == 1


def test_a_caller_who_hangs_up_while_the_target_rings_cancels_the_leg(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="fay", log_dir=tmp_path) as fay, \
            PjsuaPeer(user="slow", answer="manual", log_dir=tmp_path) as slow:
        cid = _call_in(bot, fay)
        leg = bot.transfer_attended(cid, slow.uri)
        slow.expect("incoming", call_id=leg)
        with pytest.raises(ValueError, match="is not answered yet"):
            bot.complete_transfer(cid)
        fay.send("hangup", call_id=cid)
        assert bot.wait_for(CallEnded, call_id=cid).cause == "remote"
        assert bot.wait_for(CallEnded, call_id=leg).cause == "local"
        slow.expect("disconnected", call_id=leg)
        assert not _finals(bot, cid) and not bot.calls()
