"""Capacity (486 Busy Here beyond max_calls, up to the wheel's 4) and maximum call duration."""
from __future__ import annotations

import pathlib

import pytest
from tests.sip_peers import PjsuaPeer

from callbot.sip.config import WHEEL_MAX_CALLS, AccountConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, CallRejected

pytestmark = pytest.mark.timeout(120)
MAX_DURATION_S = 1.0


def test_busy_beyond_configured_capacity(tmp_path: pathlib.Path):
    # first in the module: its own endpoint, before the module's `bot` exists (one per process)
    cfg = EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
                         accounts=(AccountConfig(name="bot", user="bot"),), max_calls=2)
    with Endpoint(cfg) as ep, PjsuaPeer(user="a", log_dir=tmp_path) as a:
        ids = _fill(ep, a, 2)
        third = a.call(ep.account_uri("bot"))
        assert a.expect("disconnected", call_id=third)["code"] == 486
        rejected = ep.wait_for(CallRejected, code=486)
        assert rejected.account == "bot" and "sip:a@" in rejected.remote_uri
        assert ep.records[third].hangup_cause == "rejected"
        assert sorted(ep.calls()) == sorted(ids)
        with pytest.raises(RuntimeError, match="at capacity"):
            ep.dial(a.uri)
        _hang_up_all(ep, ids[:1])
        fourth = a.call(ep.account_uri("bot"))
        ep.wait_for(CallConfirmed, call_id=fourth)


@pytest.fixture(scope="module")
def bot():
    cfg = EndpointConfig(
        transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
        accounts=(AccountConfig(name="bot", user="bot"),
                  AccountConfig(name="short", user="short", max_call_duration_s=MAX_DURATION_S)),
    )
    with Endpoint(cfg) as ep:
        yield ep


def _fill(bot: Endpoint, peer: PjsuaPeer, n: int) -> list[str]:
    ids = [peer.call(bot.account_uri("bot")) for _ in range(n)]
    for cid in ids:
        bot.wait_for(CallConfirmed, call_id=cid)
    return ids


def _hang_up_all(bot: Endpoint, ids: list[str]) -> None:
    for cid in ids:
        bot.hangup(cid)
    for cid in ids:
        bot.wait_for(CallEnded, call_id=cid)


def test_busy_beyond_the_wheels_four_calls(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="a", log_dir=tmp_path) as a, PjsuaPeer(user="b", log_dir=tmp_path) as b:
        ids = _fill(bot, a, WHEEL_MAX_CALLS)
        assert sorted(bot.calls()) == sorted(ids)
        fifth = b.call(bot.account_uri("bot"))
        assert b.expect("disconnected", call_id=fifth)["code"] == 486
        # the four calls are untouched
        assert sorted(bot.calls()) == sorted(ids)
        _hang_up_all(bot, ids)
        # room again
        again = b.call(bot.account_uri("bot"))
        bot.wait_for(CallConfirmed, call_id=again)
        _hang_up_all(bot, [again])


def test_max_call_duration_hangs_up(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="c", log_dir=tmp_path) as c:
        cid = c.call(bot.account_uri("short"))
        confirmed = bot.wait_for(CallConfirmed, call_id=cid)
        ended = bot.wait_for(CallEnded, call_id=cid, timeout=15)
        assert ended.cause == "max_duration"
        assert ended.at - confirmed.at >= MAX_DURATION_S
        assert c.expect("disconnected", call_id=cid)["code"] == 200  # a BYE, not a failure
        assert bot.records[cid].hangup_cause == "max_duration"


def test_max_duration_does_not_touch_other_accounts(bot, tmp_path: pathlib.Path):
    with PjsuaPeer(user="d", log_dir=tmp_path) as d:
        long_call = d.call(bot.account_uri("bot"))
        short_call = d.call(bot.account_uri("short"))
        bot.wait_for(CallEnded, call_id=short_call, timeout=15)
        assert long_call in bot.calls()
        _hang_up_all(bot, [long_call])


def test_nothing_rejected_by_our_own_policy_below_capacity(bot):
    assert all(r.code == 486 for r in bot.history(CallRejected))
