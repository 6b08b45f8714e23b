"""The gate in front of pjsua (sip/gate.py) and the ACK timeout: methods we do not serve get 405/501/481
and keep no state, answered INVITEs that are never ACKed free their slots within seconds and get their
source refused, late offers are taken only where configured. Each followed by a real call."""
from __future__ import annotations

import os
import pathlib
import socket
import time

import pytest
from tests.flood_peers import (ATTACKER, FloodTarget, RawClient, SippFlood, can_bind, header, offer, rss_kb,
                               status)
from tests.sip_peers import PjsuaPeer

from callbot.sip.config import WHEEL_MAX_CALLS, AccountConfig, AdmissionConfig, EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, CallRejected, IncomingCall, SourceRefused

pytestmark = pytest.mark.timeout(120)
ACK_TIMEOUT_S = 2.0
# what the gate may add to RSS for 2,000 requests it refuses (pjsua kept ~55 MB of them: ~43 kB a
# SUBSCRIBE, ~11.5 kB a MESSAGE)
RSS_BOUND_KB = 4096


@pytest.fixture(scope="module")
def bot():
    cfg = EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
                         accounts=(AccountConfig(name="bot", user="callbot"),
                                   AccountConfig(name="late", user="late", accept_late_offer=True)),
                         admission=AdmissionConfig(ack_timeout_s=ACK_TIMEOUT_S))
    with Endpoint(cfg) as ep:
        yield ep


def _rss_kb() -> int:
    return rss_kb(os.getpid())


def _call_works(bot: Endpoint, peer: PjsuaPeer, user: str = "callbot") -> None:
    cid = peer.call(bot.account_uri("bot" if user == "callbot" else "late"))
    bot.wait_for(CallConfirmed, call_id=cid)
    bot.hangup(cid)
    bot.wait_for(CallEnded, call_id=cid)


def _allow(msg: bytes) -> set[str]:
    return {m.strip() for m in header(msg, b"Allow").decode().split(",") if m.strip()}


@pytest.mark.parametrize("method,headers,body", [
    ("MESSAGE", "Content-Type: text/plain\r\n", "hello"),
    ("SUBSCRIBE", "Event: presence\r\nExpires: 3600\r\n", ""),
    ("PUBLISH", "Event: presence\r\nExpires: 3600\r\n", ""),
    ("REGISTER", "Expires: 3600\r\n", ""),
    ("REFER", "Refer-To: <sip:someone@127.0.0.1>\r\n", ""),
])
def test_methods_we_do_not_serve_get_405_with_our_allow(bot, method, headers, body):
    with RawClient(bot.transports["udp"].port) as c:
        answer = c.ask(method, f"not-served-{method}", headers=headers, body=body)
    assert status(answer) == 405, answer
    allow = _allow(answer)
    assert method not in allow and {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS"} <= allow


def test_unknown_methods_get_501_and_stray_dialog_requests_481(bot):
    with RawClient(bot.transports["udp"].port) as c:
        assert status(c.ask("FOO", "unknown-1")) == 501
        for method in ("BYE", "INFO", "NOTIFY", "UPDATE", "PRACK"):
            assert status(c.ask(method, f"stray-{method}", headers="Event: presence\r\n")) == 481, method
        # a request of a dialog that is not ours (a To tag), INVITE included
        assert status(c.ask("INVITE", "stray-reinvite", to_tag="gone", body=offer(4000),
                            headers="Content-Type: application/sdp\r\n")) == 481
        # OPTIONS stays pjsua's (200), and its Allow no longer lists what we answer 405
        answer = c.ask("OPTIONS", "options-1")
        assert status(answer) == 200
        assert not {"MESSAGE", "SUBSCRIBE", "PUBLISH", "REFER"} & _allow(answer)
    assert bot.running and not bot.calls()


def _windowed(c: RawClient, method: str, n: int, headers: str, body: str, tag: str) -> dict[int, int]:
    """Sends `n` requests keeping at most 16 unanswered (a socket buffer holds no more); answers by code."""
    codes: dict[int, int] = {}
    answered: set[bytes] = set()
    sent = 0
    deadline = time.monotonic() + 60
    while len(answered) < n and time.monotonic() < deadline:
        while sent < n and sent - len(answered) < 16:
            c.send(c.request(method, f"{tag}-{sent}", headers=headers, body=body))
            sent += 1
        c.sock.settimeout(2)
        try:
            data = c.sock.recv(65536)
        except socket.timeout:
            sent = len(answered)  # lost on the way: send those again
            continue
        cid = header(data, b"Call-ID")
        if data.startswith(b"SIP/2.0 1") or cid in answered:
            continue
        answered.add(cid)
        codes[status(data)] = codes.get(status(data), 0) + 1
    return codes


def test_refused_requests_keep_no_state(bot, tmp_path: pathlib.Path):
    """1,000 MESSAGEs and 1,000 SUBSCRIBEs (Expires 3600): all 405, RSS flat, then a real call."""
    port = bot.transports["udp"].port
    kinds = [("MESSAGE", "Content-Type: text/plain\r\n", "hello"),
             ("SUBSCRIBE", "Event: presence\r\nExpires: 3600\r\n", "")]
    with RawClient(port) as c:
        for method, headers, body in kinds:  # warm-up: the first requests allocate what every later one reuses
            assert _windowed(c, method, 50, headers, body, f"warm-{method}") == {405: 50}
        before = _rss_kb()
        refused_before = bot.admission_stats()["refused"].get("not_served", 0)
        for method, headers, body in kinds:
            assert _windowed(c, method, 1000, headers, body, f"flood-{method}") == {405: 1000}
        grown = _rss_kb() - before
    assert grown < RSS_BOUND_KB, f"RSS grew {grown} kB for 2,000 refused requests"
    assert bot.admission_stats()["refused"]["not_served"] - refused_before == 2000
    # counted and reported, not logged or evented per request
    reports = [e for e in bot.history(SourceRefused) if e.source == "127.0.0.1"]
    assert 1 <= len(reports) <= 3 and reports[0].first
    with PjsuaPeer(user="after-flood", log_dir=tmp_path) as peer:
        _call_works(bot, peer)


def test_sipp_floods_of_message_and_subscribe_get_405(bot, tmp_path: pathlib.Path):
    for name in ("message", "subscribe", "register"):
        with SippFlood(name, bot.transports["udp"].port, tmp_path, rate=500, seconds=2) as flood:
            result = flood.wait()
        assert result["rc"] == 0 and result["successful"] == result["sent"], (name, result)
    assert bot.running


def _attacker() -> str:
    if not can_bind(ATTACKER):
        pytest.skip(f"{ATTACKER} is not a local address here (macOS: `sudo ifconfig lo0 alias {ATTACKER}`)")
    return ATTACKER


def test_unacknowledged_invites_free_their_slots_and_block_their_source(bot, tmp_path: pathlib.Path):
    """Four answered INVITEs never ACKed take all 4 slots; ACK_TIMEOUT_S later they are hung up, a real
    caller gets in, and the source that left them is refused (503 + Retry-After) and reported once."""
    attacker = _attacker()
    port = bot.transports["udp"].port
    with RawClient(port, source=attacker) as evil, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp, \
            PjsuaPeer(user="real", log_dir=tmp_path) as peer:
        rtp.bind(("127.0.0.1", 0))
        ids = [f"no-ack-{i}" for i in range(WHEEL_MAX_CALLS)]
        for cid in ids:
            answer = evil.ask("INVITE", cid, body=offer(rtp.getsockname()[1]),
                              headers="Content-Type: application/sdp\r\n")
            assert status(answer) == 200  # and never ACKed
        taken = time.monotonic()
        assert sorted(bot.calls()) == sorted(ids)
        # the line is free again within the ACK timeout and a little: a real caller connects
        deadline = taken + ACK_TIMEOUT_S + 5
        while True:
            cid = peer.call(bot.account_uri("bot"))
            if _answered(peer, cid):
                break
            assert time.monotonic() < deadline, "a real caller was kept out past the ACK timeout"
            time.sleep(0.2)
        connected_after = time.monotonic() - taken
        assert connected_after < ACK_TIMEOUT_S + 5
        for no_ack in ids:
            assert bot.wait_for(CallEnded, call_id=no_ack).cause == "no_ack"
        bot.hangup(cid)
        bot.wait_for(CallEnded, call_id=cid)
        # the source is counted, reported once, and refused for a while
        report = bot.wait_for(SourceRefused, source=attacker)
        assert report.first and report.counts.get("unacked", 0) >= 1
        refused = evil.ask("INVITE", "no-ack-again", body=offer(rtp.getsockname()[1]),
                           headers="Content-Type: application/sdp\r\n")
        assert status(refused) == 503 and int(header(refused, b"Retry-After")) > 0
        assert bot.admission_stats()["refused"]["blocked"] >= 1
        assert len([e for e in bot.history(SourceRefused) if e.source == attacker]) == 1


def _answered(peer: PjsuaPeer, cid: str) -> bool:
    """Waits for the call's outcome at the peer: True when answered, False when refused (486 while full)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if peer.all("state", call_id=cid, state="CONFIRMED"):
            return True
        if peer.all("disconnected", call_id=cid):
            return False
        time.sleep(0.02)
    return False


def test_sipp_invites_never_acked_then_a_real_call(bot, tmp_path: pathlib.Path):
    if not can_bind("127.0.0.3"):
        pytest.skip("127.0.0.3 is not a local address here")
    port = bot.transports["udp"].port
    with SippFlood("invite_no_ack", port, tmp_path, rate=10, seconds=0.4, source="127.0.0.3") as flood:
        result = flood.wait()
    assert result["rc"] == 0, result
    sent = time.monotonic()
    with PjsuaPeer(user="real2", log_dir=tmp_path) as peer:
        while True:
            cid = peer.call(bot.account_uri("bot"))
            if _answered(peer, cid):
                break
            assert time.monotonic() - sent < ACK_TIMEOUT_S + 5
            time.sleep(0.2)
        bot.wait_for(CallConfirmed, call_id=cid)
        bot.hangup(cid)
        bot.wait_for(CallEnded, call_id=cid)
    assert bot.wait_for(SourceRefused, source="127.0.0.3", timeout=ACK_TIMEOUT_S + 5).counts.get("unacked")


def test_late_offers_only_where_configured(bot, tmp_path: pathlib.Path):
    port = bot.transports["udp"].port
    with RawClient(port) as c:
        # "bot" is a direct account: an INVITE without an offer is refused (pjsua took it up: another
        # account takes late offers; refusing it inside onIncomingCall used to abort the process)
        answer = c.ask("INVITE", "late-refused", uri=f"sip:callbot@127.0.0.1:{port}")
        assert status(answer) == 488
        rejected = bot.wait_for(CallRejected, code=488, by="callbot")
        assert "late offer" in rejected.reason
        # "late" accepts them: answered with our offer in the 200
        c.send(c.request("INVITE", "late-taken", uri=f"sip:late@127.0.0.1:{port}"))
        ok = c.final("late-taken")
        assert status(ok) == 200 and b"m=audio" in ok
        bot.wait_for(IncomingCall, call_id="late-taken")
        bot.hangup("late-taken")
        bot.wait_for(CallEnded, call_id="late-taken")
    assert bot.running
    with PjsuaPeer(user="after-late", log_dir=tmp_path) as peer:
        _call_works(bot, peer)


def test_with_no_account_taking_late_offers_the_gate_refuses_them(tmp_path: pathlib.Path):
    with FloodTarget(log_path=tmp_path / "target.log") as target, RawClient(target.port) as c:
        answer = c.ask("INVITE", "late-gate")
        assert status(answer) == 488
        stats = target.wait_stats(lambda s: s.get("refused", {}).get("offer"))
        assert stats["refused"]["offer"] == 1 and stats["admitted"] == 0
        assert target.alive
