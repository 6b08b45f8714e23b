"""SIPp floods against the endpoint in its own process (tests/flood_peers.py), from 127.0.0.2 at 2000
requests a second for a few seconds: the process lives, answers every request, keeps its memory, and a
real call from 127.0.0.1 connects during and after. Short versions of bench/bench_sip_floods.py, whose
30 s figures are in BENCHMARKS.md ("SIP floods")."""
from __future__ import annotations

import pathlib
import threading
import time

import pytest
from tests.flood_peers import ATTACKER, FloodTarget, SippFlood, can_bind, sipp_call

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not can_bind(ATTACKER), reason=f"{ATTACKER} is not a local address here")]
RATE = 2000
# pjsua kept ~11.5 kB a MESSAGE and ~43 kB a SUBSCRIBE: 2000/s for 2 s would be 46-172 MB
RSS_BOUND_KB = 8 * 1024
# an account that trusts only 127.0.0.1 beside one that trusts anyone: INVITEs from 127.0.0.2 to it pass the
# gate, pjsua takes them up (media sockets), our onIncomingCall refuses them 403 - the path that aborted
TAKEN_UP = {"accounts": [{"name": "bot", "user": "callbot", "trusted_sources": ["127.0.0.1"]},
                         {"name": "open", "user": "open"}]}


def _flood(target: FloodTarget, scenario: str, workdir: pathlib.Path, seconds: float, rate: float = RATE) -> dict:
    with SippFlood(scenario, target.port, workdir, rate=rate, seconds=seconds, source=ATTACKER) as flood:
        return flood.wait()


@pytest.mark.parametrize("scenario", ["options", "register", "message", "subscribe"])
def test_floods_of_requests_we_answer_statelessly(scenario, tmp_path: pathlib.Path):
    with FloodTarget(log_path=tmp_path / "target.log") as target:
        time.sleep(0.5)
        before = target.rss_kb()
        result = _flood(target, scenario, tmp_path, seconds=2)
        assert target.alive
        assert result["rc"] == 0 and result["successful"] == result["sent"] == 2 * RATE, result
        assert target.rss_kb() - before < RSS_BOUND_KB
        assert sipp_call(target.port, tmp_path / "after")
        if scenario != "options":
            stats = target.wait_stats(lambda s: s.get("refused", {}).get("not_served", 0) >= 2 * RATE)
            # every request refused and counted; a retransmitted one (the first answer late on a loaded
            # machine: 33 of 4000 once in CI) is refused and counted again
            assert 2 * RATE <= stats["refused"]["not_served"] <= 2 * RATE + result["retransmissions"], (stats, result)


def test_a_flood_of_refused_offers_is_survived_and_a_real_call_connects_during_it(tmp_path: pathlib.Path):
    with FloodTarget(log_path=tmp_path / "target.log") as target:
        during: dict = {}

        def call() -> None:
            time.sleep(1.5)
            during["ok"] = sipp_call(target.port, tmp_path / "during")

        caller = threading.Thread(target=call)
        caller.start()
        result = _flood(target, "invite_bad_offer", tmp_path, seconds=4)
        caller.join()
        assert target.alive and during.get("ok"), during
        assert result["successful"] == result["sent"], result  # every INVITE answered (488)
        stats = target.wait_stats(lambda s: s.get("refused", {}).get("offer", 0) >= 4 * RATE)
        assert stats["refused"]["offer"] == 4 * RATE
        assert sipp_call(target.port, tmp_path / "after")


def test_a_flood_of_invites_pjsua_takes_up_is_held_to_the_process_intake(tmp_path: pathlib.Path):
    with FloodTarget(TAKEN_UP, log_path=tmp_path / "target.log") as target:
        time.sleep(0.5)
        before = target.rss_kb()
        result = _flood(target, "invite_refused", tmp_path, seconds=3)
        assert target.alive, "the ioqueue assertion: the intake let too many INVITEs through"
        assert result["successful"] == result["sent"], result  # 403 or 503, each answered
        stats = target.wait_stats(lambda s: sum(s.get("refused", {}).values()) + s.get("admitted", 0) >= 3 * RATE)
        # per source first (10/s, burst 20), then the process (20/s, burst 10): ~50 reach pjsua in 3 s
        assert 10 <= stats["admitted"] <= 20 + 10 * 4
        assert stats["refused"]["rate"] >= 3 * RATE - 100
        # each refused INVITE waits 32 s for its ACK (~35 kB): bounded by what was admitted
        assert target.rss_kb() - before < RSS_BOUND_KB
        assert sipp_call(target.port, tmp_path / "after")


def test_invites_never_acked_get_their_source_blocked(tmp_path: pathlib.Path):
    config = {"admission": {"ack_timeout_s": 1.0}}
    with FloodTarget(config, log_path=tmp_path / "target.log") as target:
        result = _flood(target, "invite_no_ack", tmp_path, seconds=2, rate=200)
        assert target.alive and result["rc"] == 0, result
        stats = target.wait_stats(lambda s: s.get("refused", {}).get("blocked", 0) > 0, timeout=15)
        refused = stats["refused"]
        assert refused.get("unacked", 0) >= 3 and refused.get("rate", 0) > 0, stats
        # the slots the flood took are free again within the ACK timeout: a real caller connects
        deadline = time.monotonic() + 10
        while not sipp_call(target.port, tmp_path / "after", timeout_s=5):
            assert time.monotonic() < deadline, "a real caller kept out after the flood"
        assert target.wait_stats(lambda s: s.get("calls", 1) == 0)["calls"] == 0


def test_without_the_gate_a_flood_of_refused_invites_aborts_the_process(tmp_path: pathlib.Path):
    """The trap the gate exists for (docs/sip.md): pjsua takes each INVITE up, our 488 comes after, and the
    wheel's 64 ioqueue handles run out within a second. If this ever passes on a new wheel, say so there."""
    with FloodTarget({"admission": {"gate": False}}, log_path=tmp_path / "target.log") as target:
        _flood(target, "invite_bad_offer", tmp_path, seconds=2, rate=100)
        target.proc.wait(10)
        assert target.proc.returncode == -6  # SIGABRT: pj_ioqueue_register_sock2's assertion
        assert "pj_ioqueue_register_sock2" in (tmp_path / "target.log").read_text()
