"""Real SIP peers for the tests, all on 127.0.0.1 with free ports, bounded in time and always stopped.

- PjsuaPeer: a second pjsua2 process (tests/peer_pjsua.py) driven over a pipe, caller or callee.
- Kamailio: a registrar with digest auth and no database (docs/testing.md, "A registrar for tests"),
  one password per user.
- Baresip / Sipp: the other independent user agents (see their docstrings).
- endpoint_process: the endpoint under test as its own process (for signal tests).
- MEDIA_PEER: tests/media_peer.py, the pjsua2 caller that plays a WAV and records what it hears.
- serve_config: a `callbot serve` config on loopback for the tests that run the server as a process.

Imported as `from tests.sip_peers import ...` (docs/testing.md, "Helpers").
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).parent
PEER_SCRIPT = HERE / "peer_pjsua.py"
MEDIA_PEER = HERE / "media_peer.py"  # the WAV-playing, recording caller (its docstring); run, never imported
LOCALHOST = "127.0.0.1"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for both UDP and TCP right now (the OS may hand it out again later: a small race)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, other) as s:
            try:
                s.bind((LOCALHOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")


def sipp_ports(signalling: int | None = None) -> list[str]:
    """SIPp's port arguments: `-p`, its SIP port (`signalling`, or a free one), and `-mp`, the first of its
    media ports (SIPp binds it and the three after it: audio and video, RTP and RTCP), none of them the SIP
    port. Two free_port() calls can hand back the same port: seen in CI, SIPp then could not bind its audio
    socket ("Address already in use") and exited 254 before it sent a request."""
    sip = free_port() if signalling is None else signalling
    for _ in range(50):
        base = free_port()
        if base <= sip <= base + 3 or base + 3 > 65535:
            continue
        try:
            for k in range(1, 4):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((LOCALHOST, base + k))
        except OSError:
            continue
        return ["-p", str(sip), "-mp", str(base)]
    raise RuntimeError("no free media ports for SIPp")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Signal, wait up to `timeout`, then kill: a test never leaves a process behind."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class _JsonLines:
    """Reads JSON events from a process's stdout on a thread; tests wait for them with `expect`."""

    def __init__(self, stream):
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line.startswith("{"):
                continue
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "exit"})
            self._cond.notify_all()

    def expect(self, ev: str, timeout: float = 10.0, start: int = 0, **fields) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events[start:]:
                    if e["ev"] == ev and all(e.get(k) == v for k, v in fields.items()):
                        return e
                if any(e["ev"] == "exit" for e in self.events) and ev != "exit":
                    raise RuntimeError(f"peer exited while waiting for {ev} {fields}; events: {self.events}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {ev} {fields} within {timeout} s; events: {self.events}")
                self._cond.wait(left)

    def all(self, ev: str, **fields) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e["ev"] == ev and all(e.get(k) == v for k, v in fields.items())]


class PjsuaPeer:
    """A pjsua2 user agent in its own process. `uri` is where it can be called."""

    def __init__(self, *, user: str = "peer", transport: str = "udp", answer: str = "auto", ring_ms: int = 0,
                 srtp: str = "off", codecs: str = "", cert: str | None = None, key: str | None = None,
                 registrar: str | None = None, password: str = "", log_dir: pathlib.Path | None = None):
        args = [sys.executable, str(PEER_SCRIPT), "--user", user, "--transport", transport, "--answer", answer,
                "--ring-ms", str(ring_ms), "--srtp", srtp]
        if codecs:
            args += ["--codecs", codecs]
        if cert:
            args += ["--cert", cert, "--key", key]
        if registrar:
            args += ["--registrar", registrar, "--password", password]
        self._log = open(log_dir / f"peer-{user}.log", "w") if log_dir else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True)
        self._lines = _JsonLines(self.proc.stdout)
        self._seq = 0
        try:
            self.uri = self.expect("ready", timeout=20)["uri"]
        except BaseException:
            self.close()
            raise

    def send(self, cmd: str, **fields) -> None:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def expect(self, ev: str, timeout: float = 10.0, **fields) -> dict:
        return self._lines.expect(ev, timeout, **fields)

    def all(self, ev: str, **fields) -> list[dict]:
        return self._lines.all(ev, **fields)

    def call(self, uri: str) -> str:
        """Dial `uri`; returns the SIP Call-ID."""
        self._seq += 1
        self.send("call", uri=uri, seq=self._seq)
        return self.expect("calling", seq=self._seq)["call_id"]

    def close(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(self.proc, 5, signal.SIGKILL)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> PjsuaPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


KAMAILIO_MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"

_KAMAILIO_CFG = """#!KAMAILIO
debug=1
log_stderror=yes
fork=yes
children=1
tcp_children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
listen=tcp:127.0.0.1:{port}
alias="127.0.0.1:{port}"
mpath="{modules}"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "auth.so"
modparam("usrloc", "db_mode", 0)
modparam("registrar", "min_expires", 1)
modparam("registrar", "default_expires", 60)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
    if (is_method("REGISTER")) {{
{auth_branches}
        www_challenge("$td", "0");
        exit;
    }}
    if (is_method("INVITE")) {{
{invite_auth}
        record_route();
    }}
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"""


class Kamailio:
    """kamailio as a digest-auth registrar and proxy on 127.0.0.1 (UDP and TCP on one free port).

    `users` maps user -> password. REGISTER for a known user with the right password is saved
    (min_expires 1 s, so tests can watch re-registration); anything else is challenged again. An
    INVITE from a known user is challenged (407) until it carries that user's credentials.
    """

    def __init__(self, users: dict[str, str], workdir: pathlib.Path):
        self.port = free_port()
        self.uri = f"sip:{LOCALHOST}:{self.port}"
        branches = "\n".join(
            f'        if ($fU == "{u}" && pv_www_authenticate("$td", "{p}", "0") == 1) '
            f'{{ save("location"); exit; }}' for u, p in users.items())
        # an INVITE from one of our users must prove it too (407 challenge), as a PBX asks its extensions
        invite_auth = "\n".join(
            f'        if ($fU == "{u}" && pv_proxy_authenticate("$fd", "{p}", "0") != 1) '
            f'{{ proxy_challenge("$fd", "0"); exit; }}' for u, p in users.items())
        cfg = workdir / "kamailio.cfg"
        cfg.write_text(_KAMAILIO_CFG.format(port=self.port, modules=KAMAILIO_MODULES, auth_branches=branches,
                                            invite_auth=invite_auth))
        check = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"kamailio config check failed:\n{check.stderr[-2000:]}")
        self._log = open(workdir / "kamailio.log", "w")
        self.proc = subprocess.Popen(
            ["kamailio", "-f", str(cfg), "-P", str(workdir / "kamailio.pid"), "-Y", str(workdir), "-DD", "-E"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)  # its group: close() ends all
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        # an OPTIONS ping over UDP: any answer means kamailio is up
        deadline = time.monotonic() + timeout
        msg = (f"OPTIONS sip:{LOCALHOST}:{self.port} SIP/2.0\r\nVia: SIP/2.0/UDP {LOCALHOST}:9;branch=z9hG4bKping\r\n"
               f"From: <sip:ping@{LOCALHOST}>;tag=1\r\nTo: <sip:{LOCALHOST}>\r\nCall-ID: ping\r\nCSeq: 1 OPTIONS\r\n"
               f"Max-Forwards: 5\r\nContent-Length: 0\r\n\r\n").encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((LOCALHOST, 0))
            s.settimeout(0.2)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"kamailio exited with {self.proc.returncode}")
                s.sendto(msg.replace(b"127.0.0.1:9", f"{LOCALHOST}:{s.getsockname()[1]}".encode()),
                         (LOCALHOST, self.port))
                try:
                    s.recv(4096)
                    return
                except OSError:
                    continue
        self.close()
        raise TimeoutError(f"kamailio did not answer on port {self.port} within {timeout} s")

    def close(self) -> None:
        if self._log.closed:
            return  # closed already: its group id may belong to another process by now
        stop_process(self.proc, 10)
        # children its main left behind (seen once in CI: three outlived a main that had exited, ignoring SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def endpoint_process(*args: str, log_path: pathlib.Path | None = None):
    """`python -m callbot.sip.endpoint ARGS` (the endpoint on its own); yields (process, uri)."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "callbot.sip.endpoint", *args], stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        uri = None
        deadline = time.monotonic() + 20
        for line in proc.stdout:
            if line.startswith("listening "):
                uri = line.split()[1]
                break
            if time.monotonic() > deadline:
                break
        if uri is None:
            raise RuntimeError("endpoint process did not report its address")
        # keep draining stdout so that a chatty process never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
        yield proc, uri
    finally:
        stop_process(proc, 15)
        if log is not subprocess.DEVNULL:
            log.close()


def tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="callbot-sip-")


def _udp_port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return True
    return False


class _Lines:
    """Collects a process's output lines on a thread, for `wait_line`."""

    def __init__(self, stream, log_path: pathlib.Path | None):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._log = open(log_path, "w") if log_path else None
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            if self._log:
                self._log.write(line)
                self._log.flush()
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        if self._log:
            self._log.close()

    def wait_line(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no output line with {text!r} within {timeout} s:\n{''.join(self.lines)[-2000:]}")
                self._cond.wait(left)


BARESIP_MODULES = "/usr/lib/baresip/modules"


class Baresip:
    """baresip 1.0 with auto-answer, a 440 Hz source (ausine), G.722/PCMU/PCMA; `uri` reaches it.

    `dial` makes it call that URI at start (menu's /dial). It quits by itself after `max_s` seconds
    (-t) in case a test forgets it; `close()` stops it now.
    """

    def __init__(self, workdir: pathlib.Path, *, user: str = "peer", dial: str | None = None, max_s: int = 60):
        self.port = free_port()
        rtp = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config").write_text(
            f"poll_method epoll\nsip_listen {LOCALHOST}:{self.port}\n"
            f"audio_player aufile,{workdir / 'played.wav'}\naudio_source ausine,440\naudio_alert aufile,/dev/null\n"
            f"ausrc_srate 48000\nauplay_srate 48000\nausrc_channels 2\nauplay_channels 2\n"
            f"rtp_ports {rtp}-{rtp + 20}\nmodule_path {BARESIP_MODULES}\n"
            "module g711.so\nmodule g722.so\nmodule ausine.so\nmodule aufile.so\n"
            "module_app account.so\nmodule_app menu.so\n")
        (workdir / "accounts").write_text(f"<sip:{user}@{LOCALHOST}:{self.port}>;regint=0;answermode=auto\n")
        self.uri = f"sip:{user}@{LOCALHOST}:{self.port}"
        args = ["baresip", "-f", str(workdir), "-t", str(max_s)]
        if dial:
            args += ["-e", f"/dial {dial}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.output = _Lines(self.proc.stdout, workdir / "baresip.log")
        try:
            self.output.wait_line("baresip is ready", 20)
        except BaseException:
            self.close()
            raise

    def close(self) -> int:
        return stop_process(self.proc, 10)

    def __enter__(self) -> Baresip:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sipp:
    """SIPp 3.6 running one of its built-in scenarios ("uac", "uas") on 127.0.0.1.

    UAS: `uri` is where to call it; `-rtp_echo` sends every RTP packet back. UAC: calls `target`.
    `-m calls` ends it after that many calls; `wait()` gives its exit status (0 = all calls succeeded).
    """

    def __init__(self, scenario: str, workdir: pathlib.Path, *, target: str | None = None, service: str = "service",
                 calls: int = 1, call_ms: int = 1000, rtp_echo: bool = False, timeout_s: int = 30):
        self.port = free_port()
        self.uri = f"sip:{service}@{LOCALHOST}:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        args = ["sipp", "-sn", scenario, "-i", LOCALHOST, *sipp_ports(self.port),
                "-m", str(calls), "-d", str(call_ms), "-timeout", str(timeout_s), "-timeout_error", "-nostdin",
                "-trace_err", "-error_file", str(workdir / f"sipp-{scenario}-errors.log")]
        if target:
            args[3:3] = [target, "-s", service]
        if rtp_echo:
            args.append("-rtp_echo")
        self._log = open(workdir / f"sipp-{scenario}.log", "w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if scenario == "uas":
            deadline = time.monotonic() + 10
            while not _udp_port_taken(self.port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("sipp did not start listening")
                time.sleep(0.02)

    def wait(self, timeout: float = 40) -> int:
        return self.proc.wait(timeout)

    def close(self) -> int:
        rc = stop_process(self.proc, 10)
        self._log.close()
        return rc

    def __enter__(self) -> Sipp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


LATE_SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


# A callee that answers at once (no 180 first) with PCMU and echoes RTP; its 200 copies the INVITE's
# Record-Route (RFC 3261 12.1.1: SIPp's built-in UAS drops it, so the caller's ACK and BYE would skip every
# proxy on the way; with none, SIPp leaves the line out).
_SIPP_CALLEE_XML = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="callee that answers at once and keeps the route set">
  <recv request="INVITE" crlf="true"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Record-Route:]
Contact: <sip:[local_ip]:[local_port];transport=[transport]>
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
  <recv request="ACK" crlf="true"/>
  <recv request="BYE"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0
]]></send>
</scenario>
"""


class SippCallee:
    """SIPp as a callee on 127.0.0.1 for one call (_SIPP_CALLEE_XML), tracing every message it sees:
    what a trunk or a phone received (From, P-Asserted-Identity, Via, Record-Route) is read back with
    `received(method)`. `uri` is where to call it; `wait()` gives its exit status (0: the call went
    INVITE to BYE; at `timeout_s` it gives up with an error)."""

    def __init__(self, workdir: pathlib.Path, *, timeout_s: int = 30):
        self.port = free_port()
        self.uri = f"sip:service@{LOCALHOST}:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.trace = workdir / "sipp-messages.log"
        scenario = workdir / "callee.xml"
        scenario.write_text(_SIPP_CALLEE_XML)
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(scenario), "-i", LOCALHOST, *sipp_ports(self.port), "-m", "1",
             "-rtp_echo", "-timeout", str(timeout_s), "-timeout_error", "-nostdin", "-trace_msg",
             "-message_file", str(self.trace)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            eventually(lambda: self.proc.poll() is not None or _udp_port_taken(self.port), 10, "SIPp listening")
        except BaseException:
            self.close()
            raise

    def received(self, method: str) -> str:
        """The first `method` request SIPp logged as received, as text (AssertionError if none)."""
        for block in self.trace.read_text(errors="replace").split("----------------------------------------------- "):
            if re.search(r"message received \[\d+\] bytes :\s+" + method + " ", block):
                return block
        raise AssertionError(f"SIPp received no {method}:" + self.tail())

    def tail(self) -> str:
        """The end of SIPp's message trace, for a failure's message."""
        return "\n" + self.trace.read_text(errors="replace")[-3000:] if self.trace.exists() else "\n(no SIPp trace)"

    def wait(self, timeout: float = 45) -> int:
        return self.proc.wait(timeout)

    def close(self) -> int:
        return stop_process(self.proc, 10)

    def __enter__(self) -> SippCallee:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RawUac:
    """A hand-written SIP client over one UDP socket, for requests no user agent would send."""

    def __init__(self, target_port: int):
        self.target = (LOCALHOST, target_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCALHOST, 0))
        self.sock.settimeout(5)
        self.me = f"{LOCALHOST}:{self.sock.getsockname()[1]}"

    def invite(self, call_id: str, sdp: str | None = None, headers: str = "", user: str = "callbot") -> dict:
        """Sends an INVITE, ACKs its final answer; returns {"status": line, "to_tag": ..., "text": ...}."""
        sdp = LATE_SDP.format(port=free_port()) if sdp is None else sdp
        uri = f"sip:{user}@{LOCALHOST}:{self.target[1]}"
        base = (f"Via: SIP/2.0/UDP {self.me};branch=z9hG4bK{call_id}\r\nMax-Forwards: 70\r\n"
                f"From: <sip:raw@{LOCALHOST}>;tag=raw-{call_id}\r\n")
        self.sock.sendto((f"INVITE {uri} SIP/2.0\r\n{base}To: <{uri}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
                          f"Contact: <sip:raw@{self.me}>\r\n{headers}Content-Type: application/sdp\r\n"
                          f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode(), self.target)
        while True:
            text = self.sock.recv(65536).decode(errors="replace")
            if not text.startswith("SIP/2.0 1"):
                break
        to = next(h for h in text.split("\r\n") if h.lower().startswith(("to:", "t:")))
        to_tag = to.split("tag=", 1)[1].split(";", 1)[0] if "tag=" in to else ""
        self.sock.sendto((f"ACK {uri} SIP/2.0\r\n{base}To: <{uri}>;tag={to_tag}\r\nCall-ID: {call_id}\r\n"
                          f"CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode(), self.target)
        return {"status": text.split("\r\n", 1)[0], "to_tag": to_tag, "text": text}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawUac:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_config(directory: pathlib.Path, sip_port: int, metrics_port: int | None = None, *,
                 account: str = "line", user: str = "echo", extra: str = "", recordings_dir: str = "calls",
                 tail: str = "", codecs: tuple[str, ...] | None = None, analytics: bool = False) -> pathlib.Path:
    """`directory`/callbot.toml for `callbot serve` on loopback: one UDP transport on `sip_port` (0: any
    free port), one account (`user`; `extra` adds to its table), metrics on `metrics_port` (None: off),
    `codecs` offered (None: the product's default); `tail` adds tables after it ([model], [[bots]]).
    The analysis of each call after hang-up is off unless `tail` has an [analytics] table or `analytics`
    leaves it at the product's default (on): its processes (spawned, nice +10) compete on a 2-core CI
    machine with the next call's audio, which tests of calls measure; the analysis has its own tests."""
    metrics = f'address = "127.0.0.1:{metrics_port}"' if metrics_port is not None else "enabled = false"
    if not analytics and "[analytics]" not in tail:
        tail += "\n[analytics]\nenabled = false\n"
    sip = "[sip]\ncodecs = [{}]\n".format(", ".join(f'"{c}"' for c in codecs)) if codecs is not None else ""
    cfg = directory / "callbot.toml"
    cfg.write_text(f"""
recordings_dir = "{recordings_dir}"
[metrics]
{metrics}
{sip}[[sip.transports]]
bind = "127.0.0.1"
port = {sip_port}
rtp_port = 0
[[sip.accounts]]
name = "{account}"
user = "{user}"
{extra}
{tail}""")
    return cfg


@contextlib.contextmanager
def pumping(server):
    """`server.pump` (app/serve.py: the endpoint's queue emptied, its parts watched) on a thread of its own while the
    block runs, for a `running_server` in the test's process; stopped and joined (10 s at most) after."""
    stop = threading.Event()
    pump = threading.Thread(target=server.pump, kwargs={"stop": stop}, daemon=True)
    pump.start()
    try:
        yield
    finally:
        stop.set()
        pump.join(10)


def sip_header(msg: bytes, name: bytes) -> bytes:
    """The value of header `name` in a raw SIP message."""
    return next(h for h in msg.split(b"\r\n") if h.lower().startswith(name.lower() + b":")).split(b":", 1)[1].strip()


def final_response(s: socket.socket, cseq: bytes) -> bytes:
    """The next final response for CSeq `cseq` on a raw UDP socket (provisional ones and retransmissions
    skipped; the socket's own timeout bounds the wait)."""
    while True:
        data = s.recv(65536)
        if data.startswith(b"SIP/2.0 ") and not data.startswith(b"SIP/2.0 1") and sip_header(data, b"CSeq") == cseq:
            return data


def sidecars(folder) -> list[pathlib.Path]:
    """The call records (`<name>.json`) in a recordings folder: a call's analysis beside them
    (`<name>.analysis.json`, written by serve after the hang-up: app/analysis_host.py) is not one."""
    return sorted(p for p in pathlib.Path(folder).glob("*.json") if not p.name.endswith(".analysis.json"))


def eventually(condition, timeout: float = 10.0, what: str = "condition", interval: float = 0.02):
    """Polls `condition()` until it returns something true, which it returns; fails after `timeout` s
    (a bound, not a measurement: tests wait for conditions, never for durations)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(interval)
