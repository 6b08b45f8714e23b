"""Floods for the SIP gate's tests and bench: an endpoint under test in its own process, SIPp scenarios that
send what scanners send (OPTIONS, REGISTER, MESSAGE, SUBSCRIBE, INVITEs that are refused or never ACKed)
at a given rate, and a raw UDP client for requests no user agent sends. Loopback only, bounded in time,
every process stopped.

The target runs as a child (`python -m tests.flood_peers '<EndpointConfig as JSON>'`) so that a flood
that aborts pjsip (the ioqueue assertion) ends the child, not the test; it prints `listening <port>` and
then, every 0.5 s, one JSON line with its gate's counters (Endpoint.admission_stats) and its RSS.

Imported as `from tests.flood_peers import ...` (docs/testing.md, "Helpers").
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

from tests.sip_peers import LOCALHOST, free_port, sipp_ports, stop_process

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent

# a second loopback address for the attacker, so that per-source limits do not touch the real caller on
# 127.0.0.1 (Linux routes all of 127/8 to lo; macOS needs `ifconfig lo0 alias 127.0.0.2` first)
ATTACKER = "127.0.0.2"


def can_bind(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def rss_kb(pid: int) -> int:
    """Resident memory of process `pid` now, kB (/proc on Linux, `ps` elsewhere: macOS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except FileNotFoundError:
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True).stdout
        return int(out.strip() or 0)


class FloodTarget:
    """An Endpoint in a child process, direct mode on 127.0.0.1 (UDP), with `config` (EndpointConfig fields as
    JSON-ready data) over the loopback defaults. `alive`, `rss_kb()`, `stats` (its latest counters)."""

    def __init__(self, config: dict | None = None, log_path: pathlib.Path | None = None):
        self.port = free_port()
        cfg = {"transports": [{"bind": LOCALHOST, "port": self.port, "rtp_port": 0}],
               "accounts": [{"name": "bot", "user": "callbot"}]}
        cfg.update(config or {})
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.flood_peers", json.dumps(cfg)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.stats: dict = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not self._ready.wait(20):
            self.close()
            raise RuntimeError("flood target did not start")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("listening"):
                self._ready.set()
            elif line.startswith("{"):
                self.stats = json.loads(line)
        self._ready.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid) if self.alive else 0

    def wait_stats(self, done, timeout: float = 10.0) -> dict:
        """Polls the child's counters until `done(stats)` or the deadline; returns the last ones."""
        deadline = time.monotonic() + timeout
        while not done(self.stats) and time.monotonic() < deadline and self.alive:
            time.sleep(0.1)
        return self.stats

    def close(self) -> int:
        rc = stop_process(self.proc, 15)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return rc

    def __enter__(self) -> FloodTarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- SIPp scenarios: [service] is the Request-URI's user, each call one request

_HEAD = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="{name}">
"""
_REQUEST = """  <send retrans="500"><![CDATA[
{method} sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:flood@[local_ip]:[local_port]>;tag=[call_number]
To: <sip:[service]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 {method}
Contact: <sip:flood@[local_ip]:[local_port]>
Max-Forwards: 70
{headers}Content-Length: [len]

{body}
  ]]></send>
"""
SDP = """v=0
o=- 1 1 IN IP4 [local_ip]
s=-
c=IN IP4 {address}
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000"""


def scenario(method: str, expect: tuple[int, ...], *, body: str = "", headers: str = "", ack: bool = False) -> str:
    """One request, then any of the `expect`ed final answers (provisional ones skipped); an INVITE's 2xx is
    never ACKed and a non-2xx is ACKed only when `ack` (the worst case for the target is no ACK at all)."""
    ctype = "Content-Type: application/sdp\n" if body else ""
    xml = _HEAD.format(name=f"{method} flood") + _REQUEST.format(method=method, headers=headers + ctype, body=body)
    if method == "INVITE":
        xml += '  <recv response="100" optional="true"/>\n  <recv response="180" optional="true"/>\n'
    for code in expect[:-1]:
        xml += f'  <recv response="{code}" optional="true" next="{"ack" if ack and code >= 300 else "end"}"/>\n'
    last = expect[-1]
    xml += f'  <recv response="{last}" next="{"ack" if ack and last >= 300 else "end"}"/>\n'
    if ack:
        xml += """  <label id="ack"/>
  <send><![CDATA[
ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:flood@[local_ip]:[local_port]>;tag=[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

  ]]></send>
"""
    return xml + '  <label id="end"/>\n</scenario>\n'


SCENARIOS = {
    "options": scenario("OPTIONS", (200,)),
    "register": scenario("REGISTER", (405,), headers="Expires: 3600\n"),
    "message": scenario("MESSAGE", (405,), headers="Content-Type: text/plain\n", body="hello"),
    "subscribe": scenario("SUBSCRIBE", (405,), headers="Event: presence\nExpires: 3600\n"),
    # an offer pjsip's parser takes and no call can use: refused 488 before pjsua takes it up
    "invite_bad_offer": scenario("INVITE", (503, 488), body=SDP.format(address="999.1.1.1"), ack=True),
    # INVITEs a scanner sends: a good offer, answers never ACKed
    "invite_no_ack": scenario("INVITE", (503, 486, 488, 200), body=SDP.format(address="[local_ip]")),
    # a good offer refused after pjsua took it up (403 from an account that does not trust the source,
    # 486 busy below the wheel's 4): never ACKed
    "invite_refused": scenario("INVITE", (503, 486, 488, 403), body=SDP.format(address="[local_ip]")),
    # no offer: 488 in direct mode unless an account accepts late offers
    "invite_late": scenario("INVITE", (503, 486, 200, 488), ack=True),
    "invite_late_no_ack": scenario("INVITE", (503, 486, 200, 488)),
}


class SippFlood:
    """SIPp sending `scenario` (a SCENARIOS key) to `port` at `rate` calls a second for `seconds`, from
    `source`. `wait()` returns {"rc", "successful", "failed", "sent"} from SIPp's own statistics."""

    def __init__(self, name: str, port: int, workdir: pathlib.Path, *, rate: float, seconds: float,
                 source: str = LOCALHOST, service: str = "callbot"):
        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / f"{name}.xml"
        xml.write_text(SCENARIOS[name])
        self.stat = workdir / f"{name}-{int(rate)}-stat.csv"
        self.calls = max(1, int(rate * seconds))
        self.seconds = seconds
        args = ["sipp", f"{LOCALHOST}:{port}", "-sf", str(xml), "-i", source, *sipp_ports(),
                "-s", service, "-r", str(rate), "-rp", "1000", "-m", str(self.calls),
                "-l", str(min(5000, max(100, int(rate * 5)))), "-timeout", f"{int(seconds) + 40}s", "-nostdin",
                "-nd", "-recv_timeout", "5000", "-max_recv_loops", "10000", "-max_sched_loops", "10000",
                "-trace_stat", "-stf", str(self.stat), "-fd", "1",
                "-trace_err", "-error_file", str(workdir / f"{name}-{int(rate)}-errors.log")]
        self._log = open(workdir / f"{name}-{int(rate)}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float | None = None) -> dict:
        try:
            rc = self.proc.wait(timeout if timeout is not None else self.seconds + 60)
        except subprocess.TimeoutExpired:
            rc = stop_process(self.proc, 5)
        self._log.close()
        out = {"rc": rc, "sent": self.calls}
        try:
            rows = self.stat.read_text().splitlines()
            names, last = rows[0].split(";"), rows[-1].split(";")
            row = dict(zip(names, last))
            out["successful"] = int(row.get("SuccessfulCall(C)", 0))
            out["failed"] = int(row.get("FailedCall(C)", 0))
            # requests sent again after 500 ms without an answer (a loaded machine): each is one more request
            out["retransmissions"] = int(row.get("Retransmissions(C)", 0))
        except (OSError, IndexError, ValueError):
            pass
        return out

    def close(self) -> None:
        stop_process(self.proc, 5)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> SippFlood:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sipp_call(port: int, workdir: pathlib.Path, *, timeout_s: int = 10, service: str = "callbot") -> bool:
    """One real call (SIPp's built-in uac: INVITE with an offer, ACK, 1 s, BYE) from 127.0.0.1: connected?"""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["sipp", f"{LOCALHOST}:{port}", "-sn", "uac", "-s", service, "-i", LOCALHOST, *sipp_ports(),
            "-m", "1", "-d", "1000", "-timeout", f"{timeout_s}s", "-timeout_error",
            "-nostdin", "-trace_err", "-error_file", str(workdir / "call-errors.log")]
    with open(workdir / "call.log", "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            return proc.wait(timeout_s + 10) == 0
        finally:
            stop_process(proc, 5)


class RawClient:
    """Hand-written requests over one UDP socket bound to `source` (default 127.0.0.1)."""

    def __init__(self, port: int, source: str = LOCALHOST):
        self.target = (LOCALHOST, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.settimeout(5)
        self.me = f"{source}:{self.sock.getsockname()[1]}"
        self.uri = f"sip:callbot@{LOCALHOST}:{port}"

    def request(self, method: str, call_id: str, *, headers: str = "", body: str = "", to_tag: str = "",
                uri: str | None = None) -> bytes:
        uri = uri or self.uri
        tag = f";tag={to_tag}" if to_tag else ""
        return (f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {self.me};branch=z9hG4bK-{call_id}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:raw@{self.me}>;tag=f-{call_id}\r\nTo: <{uri}>{tag}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\nContact: <sip:raw@{self.me}>\r\n{headers}"
                f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def final(self, call_id: str, timeout: float = 5.0) -> bytes:
        """The next final response for `call_id` (provisional ones and other calls' answers skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if data.startswith(b"SIP/2.0 ") and not data.startswith(b"SIP/2.0 1") \
                    and header(data, b"Call-ID") == call_id.encode():
                return data

    def ask(self, method: str, call_id: str, **kw) -> bytes:
        self.send(self.request(method, call_id, **kw))
        return self.final(call_id)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def header(msg: bytes, name: bytes) -> bytes:
    """A header's value in a raw SIP message (b"" when absent)."""
    for line in msg.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return b""


def status(msg: bytes) -> int:
    return int(msg.split(b" ", 2)[1])


def offer(port: int, address: str = LOCALHOST) -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def _serve(config_json: str) -> int:
    # the child: the endpoint under test, its counters on stdout every 0.5 s until SIGTERM
    import signal

    import msgspec

    from callbot.sip.config import EndpointConfig
    from callbot.sip.endpoint import Endpoint

    cfg = msgspec.convert(json.loads(config_json), EndpointConfig)
    ep = Endpoint(cfg).start()
    print("listening", cfg.transports[0].port, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        try:
            stats = ep.admission_stats()
        except (RuntimeError, TimeoutError):
            continue
        stats["rss_kb"] = rss_kb(os.getpid())
        stats["calls"] = len(ep.calls())
        print(json.dumps(stats), flush=True)
    ep.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
