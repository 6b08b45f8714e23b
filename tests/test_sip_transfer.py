"""Blind transfer (REFER): the caller is sent to a third peer; NOTIFY progress; the call ends on success."""
from __future__ import annotations

import pathlib

import pytest
from tests.sip_peers import PjsuaPeer, RawUac

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


def test_blind_transfer_succeeds_and_ends_the_call(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="alice", log_dir=tmp_path) as alice, \
            PjsuaPeer(user="bob", ring_ms=200, log_dir=tmp_path) as bob:
        cid = _call_in(bot, alice)
        bot.transfer(cid, bob.uri)
        assert alice.expect("transfer_request", call_id=cid)["dest"].strip("<>") == bob.uri
        final = bot.wait_for(TransferProgress, call_id=cid, final=True)
        assert final.code == 200
        progress = [e.code for e in bot.history(TransferProgress) if e.call_id == cid]
        assert progress[-1] == 200 and all(c < 200 for c in progress[:-1])
        ended = bot.wait_for(CallEnded, call_id=cid)
        assert ended.cause == "transfer"
        # alice now talks to bob
        bob_call = bob.expect("incoming")["call_id"]
        bob.expect("state", call_id=bob_call, state="CONFIRMED")
        alice.expect("state", call_id=bob_call, state="CONFIRMED")
        rec = bot.records[cid]
        assert rec.transfer.target == bob.uri and rec.transfer.succeeded is True
        assert rec.transfer.notifications[-1][0] == 200
        assert rec.hangup_cause == "transfer"


def test_failed_transfer_keeps_the_call(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="carol", log_dir=tmp_path) as carol, \
            PjsuaPeer(user="busy", answer="busy", log_dir=tmp_path) as busy:
        cid = _call_in(bot, carol)
        bot.transfer(cid, busy.uri)
        final = bot.wait_for(TransferProgress, call_id=cid, final=True)
        assert final.code == 486
        assert cid in bot.calls()
        assert bot.records[cid].transfer.succeeded is False
        bot.hangup(cid)
        assert bot.wait_for(CallEnded, call_id=cid).cause == "local"


def test_a_refer_to_the_bot_is_declined_and_the_call_goes_on(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="eve", log_dir=tmp_path) as eve, PjsuaPeer(user="target", log_dir=tmp_path) as target:
        cid = _call_in(bot, eve)
        eve.send("transfer", call_id=cid, uri=target.uri)
        status = eve.expect("transfer_status", call_id=cid, final=True)
        assert status["code"] == 603
        assert cid in bot.calls() and bot.running
        assert not target.all("incoming")  # nobody was dialled
        bot.hangup(cid)
        assert bot.wait_for(CallEnded, call_id=cid).cause == "local"


def test_an_invite_replacing_a_call_is_declined(bot):
    with RawUac(bot.transports["udp"].port) as uac:
        first = uac.invite("replace-me")
        assert first["status"] == "SIP/2.0 200 OK"
        bot.wait_for(CallConfirmed, call_id="replace-me")
        replaces = f"Replaces: replace-me;to-tag={first['to_tag']};from-tag=raw-replace-me\r\n"
        second = uac.invite("replacer", headers=replaces)
        assert second["status"].startswith("SIP/2.0 603")
        assert "replace-me" in bot.calls() and "replacer" not in bot.calls()
        bot.hangup("replace-me")
        assert bot.wait_for(CallEnded, call_id="replace-me").cause == "local"
