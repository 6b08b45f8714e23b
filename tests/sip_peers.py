"""Real SIP peers for the tests, all on 127.0.0.1 with free ports, bounded in time and always stopped.

- PjsuaPeer: a second pjsua2 process (tests/peer_pjsua.py) driven over a pipe, caller or callee.
- Kamailio: a registrar with digest auth and no database (DESIGN.md's recipe), one password per user.
- Baresip / Sipp: the other independent user agents (see their docstrings).
- endpoint_process: the endpoint under test as its own process (for signal tests).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).parent
PEER_SCRIPT = HERE / "peer_pjsua.py"
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
    if (is_method("INVITE")) {{ record_route(); }}
    if (!lookup("location")) {{ sl_send_reply("404", "Not Found"); exit; }}
    t_relay();
}}
"""


class Kamailio:
    """kamailio as a digest-auth registrar and proxy on 127.0.0.1 (UDP and TCP on one free port).

    `users` maps user -> password. REGISTER for a known user with the right password is saved
    (min_expires 1 s, so tests can watch re-registration); anything else is challenged again.
    """

    def __init__(self, users: dict[str, str], workdir: pathlib.Path):
        self.port = free_port()
        self.uri = f"sip:{LOCALHOST}:{self.port}"
        branches = "\n".join(
            f'        if ($fU == "{u}" && pv_www_authenticate("$td", "{p}", "0") == 1) '
            f'{{ save("location"); exit; }}' for u, p in users.items())
        cfg = workdir / "kamailio.cfg"
        cfg.write_text(_KAMAILIO_CFG.format(port=self.port, modules=KAMAILIO_MODULES, auth_branches=branches))
        check = subprocess.run(["kamailio", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"kamailio config check failed:\n{check.stderr[-2000:]}")
        self._log = open(workdir / "kamailio.log", "w")
        self.proc = subprocess.Popen(
            ["kamailio", "-f", str(cfg), "-P", str(workdir / "kamailio.pid"), "-Y", str(workdir), "-DD", "-E"],
            stdout=self._log, stderr=subprocess.STDOUT)
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
        stop_process(self.proc, 10)
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
