"""SIP floods through the kamailio edge: what `callbot serve --edge` survives on its public port.

Each case starts `callbot serve --edge --engine echo` (the edge on 127.0.0.1, serve behind it on another
loopback port, `ban_s` shortened so that recovery is measured in seconds), floods the edge with SIPp
(tests/flood_peers.py's scenarios) from 127.0.0.2, or from `--sources` addresses 127.0.0.10... sharing
the rate, places one real call (SIPp's uac: INVITE, ACK, 1 s, BYE) from 127.0.0.1 in the middle of the
flood and one after it, and reports: whether serve and kamailio lived, what SIPp got answered, the
edge's counters, serve's RSS and kamailio's shared memory in use (kamcmd core.shmmem) before, at the end
of the flood and `--settle` s later, and the time from the flood's end until the flooding address is
let in again (its ban gone from the `banned` htable, read with kamcmd so that the reading does not
extend it) and a call from it connects.

A bench, not a test (tests/test_edge.py runs a short flood). Linux (127.0.0.x, /proc):
    python bench/bench_edge_floods.py                                  # every case, 2000/s for 30 s
    python bench/bench_edge_floods.py --case invite_no_ack --sources 20 --rate 400 --seconds 20
Figures: BENCHMARKS.md, "SIP edge".
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from callbot.app.edge import read_counters  # noqa: E402
from tests.flood_peers import ATTACKER, SippFlood, rss_kb  # noqa: E402
from tests.sip_peers import LOCALHOST, _Lines, free_port, serve_config, sipp_ports, stop_process  # noqa: E402

CASES = {
    "options": "OPTIONS (answered by the edge itself)",
    "register": "REGISTER (405 at the edge)",
    "message": "MESSAGE (405 at the edge)",
    "invite_bad_offer": "INVITE, offer c=999.1.1.1 (passed to serve within the limits, 488 there)",
    "invite_no_ack": "INVITE, good offer, answers never ACKed",
}


# SIPp's built-in uac, but its ACK and BYE follow the Record-Route (rrs, [routes], [next_url]): the built-in
# one ignores it, and the edge lets no request into a call that does not come through it
_UAC_XML = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="uac through a proxy">
  <send retrans="500"><![CDATA[
INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:sipp@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000
]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rrs="true"/>
  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 1 ACK
[routes]
Max-Forwards: 70
Content-Length: 0
]]></send>
  <pause milliseconds="1000"/>
  <send retrans="500"><![CDATA[
BYE [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
Call-ID: [call_id]
CSeq: 2 BYE
[routes]
Max-Forwards: 70
Content-Length: 0
]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""


def _call(port: int, workdir: pathlib.Path, source: str, timeout_s: int = 10) -> bool | int:
    """One real call from `source` to the edge (_UAC_XML: 1 s, BYE): True when it connected and ended
    cleanly, else the final status that refused it (0: none came)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "uac.xml").write_text(_UAC_XML)
    args = ["sipp", f"{LOCALHOST}:{port}", "-sf", str(workdir / "uac.xml"), "-s", "echo", "-i", source, *sipp_ports(),
            "-m", "1", "-d", "1000", "-timeout", f"{timeout_s}s", "-timeout_error",
            "-nostdin", "-trace_err", "-error_file", str(workdir / "call-errors.log")]
    with open(workdir / "call.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if proc.wait(timeout_s + 10) == 0:
                return True
        finally:
            stop_process(proc, 5)
    errors = (workdir / "call-errors.log").read_text(errors="replace") if (workdir / "call-errors.log").exists() else ""
    codes = [int(c) for c in re.findall(r"SIP/2\.0 (\d{3})", errors) if not c.startswith("1")]
    return codes[0] if codes else 0


def _recovery(port: int, workdir: pathlib.Path, source: str, limit_s: float = 30.0) -> dict:
    """Calls from `source` until one connects (at most `limit_s`): seconds until it did, and the refusals
    before it."""
    t0, refusals = time.monotonic(), []
    while time.monotonic() - t0 < limit_s:
        result = _call(port, workdir / f"try-{len(refusals)}", source)
        if result is True:
            return {"ok": True, "s": round(time.monotonic() - t0, 2), "refused": refusals}
        refusals.append(result)
        time.sleep(0.5)
    return {"ok": False, "s": round(time.monotonic() - t0, 2), "refused": refusals}


def _kamcmd(ctl: str, *cmd: str) -> str:
    return subprocess.run(["kamcmd", "-s", ctl, *cmd], capture_output=True, text=True, timeout=10).stdout


def _shm_used_kb(ctl: str) -> int:
    m = re.search(r"real_used:\s*(\d+)", _kamcmd(ctl, "core.shmmem"))
    return int(m.group(1)) // 1024 if m else -1


def _banned(ctl: str, address: str) -> bool:
    return address in _kamcmd(ctl, "htable.dump", "banned")


def run_case(name: str, rate: float, seconds: float, settle_s: float, sources: int, ban_s: int,
             workdir: pathlib.Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    edge_port = free_port()
    cfg = serve_config(workdir, free_port(), tail=f'[edge]\naddress = "{LOCALHOST}"\nport = {edge_port}\n'
                                                  f'run_dir = "edge"\nban_s = {ban_s}\n')
    ctl = f"unix:{workdir / 'edge' / 'kamailio_ctl'}"
    proc = subprocess.Popen([sys.executable, "-m", "callbot.app.cli", "serve", "--edge", "--engine", "echo",
                             "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = _Lines(proc.stderr, workdir / "serve.log")
    out: dict = {"case": name, "rate": rate, "seconds": seconds, "sources": sources}
    try:
        lines.wait_line("edge: kamailio on", 60)
        kamailio = int((workdir / "edge" / "kamailio.pid").read_text())
        time.sleep(1.0)
        out["serve_rss_kb"] = [rss_kb(proc.pid)]
        out["edge_shm_kb"] = [_shm_used_kb(ctl)]
        during: dict = {}

        def call_during() -> None:
            time.sleep(seconds / 2)
            t0 = time.monotonic()
            during["ok"] = _call(edge_port, workdir / "during", LOCALHOST)
            during["s"] = round(time.monotonic() - t0, 2)

        caller = threading.Thread(target=call_during)
        caller.start()
        addresses = [ATTACKER] if sources == 1 else [f"127.0.0.{10 + i}" for i in range(sources)]
        floods = [SippFlood(name, edge_port, workdir / f"flood-{a}", rate=rate / sources, seconds=seconds, source=a)
                  for a in addresses]
        results = [f.wait(seconds + 60) for f in floods]
        flood_end = time.monotonic()
        for f in floods:
            f.close()
        caller.join()
        out["alive"] = {"serve": proc.poll() is None, "kamailio": _pid_alive(kamailio)}
        out["sipp"] = {k: sum(r.get(k, 0) for r in results) for k in ("sent", "successful", "failed")}
        out["call_during"] = during
        out["counters"] = read_counters(ctl)
        out["serve_rss_kb"].append(rss_kb(proc.pid))
        out["edge_shm_kb"].append(_shm_used_kb(ctl))
        # a caller from elsewhere: from the flood's end until a call connects (1.1-1.2 s: the call itself)
        out["call_after"] = _recovery(edge_port, workdir / "after", LOCALHOST)
        # the flooding address: banned until it has been quiet for ban_s; then a call from it connects
        deadline = flood_end + ban_s + 30
        while any(_banned(ctl, a) for a in addresses) and time.monotonic() < deadline:
            time.sleep(0.2)
        out["ban_lifted_s"] = round(time.monotonic() - flood_end, 1)
        out["flooder_call_after_ban"] = _call(edge_port, workdir / "flooder-after", addresses[0])
        time.sleep(max(0.0, settle_s - (time.monotonic() - flood_end)))
        out["serve_rss_kb"].append(rss_kb(proc.pid))
        out["edge_shm_kb"].append(_shm_used_kb(ctl))
        out["serve_rc"] = stop_process(proc, 30)
    finally:
        stop_process(proc, 10, signal.SIGKILL)
    out["flood_lines"] = [line.strip() for line in lines.lines if "flood from" in line][:3]
    return out


def _pid_alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    p.add_argument("--rate", type=float, default=2000.0, help="requests a second, all sources together")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--sources", type=int, default=1, help="flooding addresses (127.0.0.10...), sharing the rate")
    p.add_argument("--ban", type=int, default=10, help="[edge] ban_s: quiet seconds before a banned source is let in")
    p.add_argument("--settle", type=float, default=30.0, help="seconds after the flood before memory is read again")
    args = p.parse_args(argv)
    if shutil.which("kamailio") is None or shutil.which("sipp") is None:
        print("needs kamailio and SIPp (Debian: kamailio sip-tester)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edge-floods-") as tmp:
        for name in args.case or list(CASES):
            res = run_case(name, args.rate, args.seconds, args.settle, args.sources, args.ban, pathlib.Path(tmp) / name)
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
