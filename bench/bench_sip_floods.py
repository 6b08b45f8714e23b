"""SIP floods against the endpoint itself (no edge in front): how far one process goes.

Each case runs a fresh endpoint in a child process (tests/flood_peers.py FloodTarget: direct mode on
127.0.0.1, UDP), floods it with SIPp from 127.0.0.2 at a rate for some seconds, places one real call from
127.0.0.1 in the middle of the flood and one after it (SIPp's uac: INVITE, ACK, 1 s, BYE), and reports:
whether the process lived, what SIPp got answered, the gate's counters (sip/admission.py), RSS before, at
the end of the flood and `settle_s` later.

A bench, not a test (tests/test_sip_floods.py runs short versions). Linux (127.0.0.2, /proc):
    python bench/bench_sip_floods.py                       # every case, 2000/s for 30 s
    python bench/bench_sip_floods.py --rate 500 --seconds 10 --case invite_bad_offer --no-gate
Figures: BENCHMARKS.md, "SIP floods".
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.flood_peers import ATTACKER, FloodTarget, SippFlood, sipp_call  # noqa: E402

# name -> (SIPp scenario, target config, what a flood of it is)
CASES = {
    "options": ("options", {}, "OPTIONS (pjsua's stateless 200)"),
    "register": ("register", {}, "REGISTER (405 at the gate)"),
    "message": ("message", {}, "MESSAGE (405 at the gate; pjsua: 200 and ~11.5 kB each)"),
    "subscribe": ("subscribe", {}, "SUBSCRIBE presence, Expires 3600 (405; pjsua: ~43 kB each)"),
    "invite_bad_offer": ("invite_bad_offer", {}, "INVITE, offer c=999.1.1.1 (488 at the gate)"),
    # an account that trusts only 127.0.0.1 and one that trusts anyone: the gate lets the INVITE on, pjsua
    # takes it up (media sockets), our onIncomingCall refuses it 403 - the path that aborted at 32 INVITEs
    "invite_taken_up": ("invite_refused", {"accounts": [
        {"name": "bot", "user": "callbot", "trusted_sources": ["127.0.0.1"]}, {"name": "open", "user": "open"}]},
        "INVITE taken up by pjsua, then refused 403 (the process-wide intake)"),
    "invite_no_ack": ("invite_no_ack", {}, "INVITE, good offer, 200s never ACKed (rate, ACK timeout, block)"),
}


def run_case(name: str, rate: float, seconds: float, settle_s: float, gate: bool, workdir: pathlib.Path) -> dict:
    scenario, config, _ = CASES[name]
    config = json.loads(json.dumps(config))
    config.setdefault("admission", {})["gate"] = gate
    out: dict = {"case": name, "rate": rate, "seconds": seconds, "gate": gate}
    workdir.mkdir(parents=True, exist_ok=True)
    with FloodTarget(config, log_path=workdir / f"{name}-target.log") as target:
        time.sleep(1.0)
        out["rss_before_kb"] = target.rss_kb()
        during: dict = {}

        def call_during() -> None:
            time.sleep(seconds / 2)
            t0 = time.monotonic()
            during["ok"] = sipp_call(target.port, workdir / "during", timeout_s=10)
            during["s"] = round(time.monotonic() - t0, 2)

        caller = threading.Thread(target=call_during)
        caller.start()
        t0 = time.monotonic()
        with SippFlood(scenario, target.port, workdir, rate=rate, seconds=seconds, source=ATTACKER) as flood:
            deadline = t0 + seconds
            peak = 0
            while flood.proc.poll() is None and time.monotonic() < deadline + 60:
                peak = max(peak, target.rss_kb())
                time.sleep(0.5)
            result = flood.wait(5)
        caller.join()
        out["flood_s"] = round(time.monotonic() - t0, 1)
        out["alive"] = target.alive
        out["sipp"] = result
        out["call_during"] = during
        out["rss_peak_kb"] = peak
        if target.alive:
            out["rss_end_kb"] = target.rss_kb()
            t1 = time.monotonic()
            out["call_after"] = {"ok": sipp_call(target.port, workdir / "after", timeout_s=15),
                                 "s": round(time.monotonic() - t1, 2)}
            time.sleep(settle_s)
            out["rss_settled_kb"] = target.rss_kb()
            out["counters"] = target.stats
        out["rc"] = target.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--settle", type=float, default=35.0, help="seconds after the flood before RSS is read again")
    p.add_argument("--no-gate", action="store_true", help="without sip/gate.py, as before it existed")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sip-floods-") as tmp:
        for name in args.case or list(CASES):
            res = run_case(name, args.rate, args.seconds, args.settle, not args.no_gate, pathlib.Path(tmp) / name)
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
