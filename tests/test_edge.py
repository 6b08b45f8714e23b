"""The public SIP edge (app/edge.py): kamailio's generated configuration, and real processes through it.

Everything runs on loopback. The flood comes from 127.0.0.2 (Linux routes all of 127.0.0.0/8 to lo)
so that pike bans the flooder and not the legitimate caller on 127.0.0.1. The TLS test needs kamailio's
tls module (Debian: `kamailio-tls-modules`); where it is not installed the test is skipped, unless
CALLBOT_TEST_KAMAILIO_MODULES names a folder holding it (e.g. `apt-get download kamailio-tls-modules`
unpacked with `dpkg -x`), searched after the system's modules.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave

import numpy as np
import pytest

from callbot.app import edge
from callbot.app.errors import StartupError
from callbot.app.settings import ConfigError, parse_settings
from tests.flood_peers import can_bind
from tests.sip_peers import (KAMAILIO_MODULES, LOCALHOST, MEDIA_PEER, PjsuaPeer, SippCallee, _Lines, eventually, free_port,
                              serve_config, sipp_ports, stop_process)

pytestmark = pytest.mark.timeout(120)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
KAMAILIO = shutil.which("kamailio")
needs_kamailio = pytest.mark.skipif(KAMAILIO is None, reason="kamailio is not installed (Debian: kamailio)")
EXTRA_MODULES = os.environ.get("CALLBOT_TEST_KAMAILIO_MODULES", "")
MODULES = ":".join(d for d in (KAMAILIO_MODULES.rstrip("/"), EXTRA_MODULES) if d)
HAS_TLS = any((pathlib.Path(d) / "tls.so").is_file() for d in MODULES.split(":"))
FLOODER = "127.0.0.2"




# ---------------------------------------------------------------------------------------------------
# the configuration


def _settings(edge_toml: str = "", sip_port: int = 5070, transport: str = 'bind = "127.0.0.1"'):
    return parse_settings(f"""
[[sip.transports]]
{transport}
port = {sip_port}
[[sip.accounts]]
user = "bot"
[edge]
{edge_toml}
""")


def _route_blocks(text: str) -> dict[str, list[str]]:
    """Each top-level block (`request_route`, `route[X]`, ...) -> its lines, with the line before it."""
    lines = text.splitlines()
    blocks = {}
    for i, line in enumerate(lines):
        m = re.match(r"^((?:\w+_)?route(?:\[\w+\])?) \{$", line)
        if m:
            end = lines.index("}", i)
            blocks[m.group(1)] = [lines[i - 1], *lines[i:end + 1]]
    return blocks


VARIANTS = {
    "default": "",
    "address, advertise, trusted": 'address = "127.0.0.1"\nadvertise = "sip.example.com"\n'
                                   'trusted_sources = ["192.0.2.0/24", "198.51.100.7"]',
    "private address behind NAT": 'address = "10.0.0.5"\nadvertise = "203.0.113.7"',
    "tls on every address": 'cert_file = "cert.pem"\nkey_file = "key.pem"\nca_file = "ca.pem"',
    "tls on one address": 'address = "127.0.0.1"\ncert_file = "cert.pem"\nkey_file = "key.pem"',
}


@needs_kamailio
@pytest.mark.parametrize("variant", VARIANTS)
def test_generated_config_is_accepted_by_kamailio(tmp_path, variant):
    settings = _settings(VARIANTS[variant])
    text = edge.render(settings.edge, edge.backend_of(settings), modules_dir=MODULES, run_dir=os.fspath(tmp_path))
    cfg = tmp_path / "kamailio.cfg"
    cfg.write_text(text)
    # what the configuration must hold, whatever the variant
    for needle in ('sanity_check(', 'mf_process_maxfwd_header(', 'pike_check_req()', 'record_route()',
                   '$du = "sip:127.0.0.1:5070"', 'sl_send_reply("405", "Method Not Allowed")', 'ds_select_dst'):
        assert needle in text, needle
    blocks = _route_blocks(text)
    assert {"request_route", "route[REQINIT]", "route[FLOOD]", "route[LIMITS]", "route[TO_SERVE]",
            "route[WITHINDLG]", "failure_route[SERVE_FAILED]"} <= set(blocks)
    for name, block in blocks.items():  # reads like a hand-written one: short blocks, each introduced
        assert block[0].startswith("#") or name == "request_route", f"{name} has no comment saying why"
        assert len(block) <= 45, f"{name} is {len(block)} lines"
    # serve's side: a loopback socket of the edge's own, from which everything reaches serve
    assert "force_send_socket(udp:127.0.0.1:5060)" in text
    if "NAT" in variant:
        assert "listen=udp:10.0.0.5:5060 advertise 203.0.113.7:5060\n" in text
        assert "listen=udp:127.0.0.1:5060\n" in text
    if "every address" in variant or variant == "default":
        assert "\nmhomed=1\n" in text
    if "tls" in variant:
        assert 'modparam("tls", "tls_method", "TLSv1.2+")' in text and "enable_tls=yes" in text
        if "ca_file" in VARIANTS[variant]:
            assert 'modparam("tls", "require_certificate", 1)' in text
        if not HAS_TLS:
            pytest.skip("kamailio's tls module is not installed (Debian: kamailio-tls-modules): the TLS "
                        "configuration is generated but not checked")
    out = subprocess.run([KAMAILIO, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_cap_on_tcp_connections_per_source_where_kamailio_has_one():
    """tcp_accept_iplimit is kamailio 5.8's; 5.6 (Debian 12) refuses the word, so it is left out there with
    a comment saying what holds instead."""
    settings = _settings()
    newer = edge.render(settings.edge, edge.backend_of(settings), modules_dir=MODULES, run_dir="/r", version=(5, 8, 1))
    older = edge.render(settings.edge, edge.backend_of(settings), modules_dir=MODULES, run_dir="/r", version=(5, 6, 3))
    assert f"\ntcp_accept_iplimit={edge.TCP_CONNECTIONS_PER_SOURCE}\n" in newer
    assert "tcp_accept_iplimit=" not in older and "# no cap per source on TCP/TLS connections" in older
    assert "tcp_accept_iplimit=" not in edge.render(settings.edge, edge.backend_of(settings), modules_dir=MODULES,
                                                    run_dir="/r")


@needs_kamailio
def test_kamailio_version_is_read_from_the_program():
    version = edge.kamailio_version(KAMAILIO)
    assert version is not None and version >= (5, 0), version


@needs_kamailio
def test_edge_print_and_check_commands(tmp_path):
    cfg = serve_config(tmp_path, free_port(), tail=f'[edge]\naddress = "127.0.0.1"\nport = {free_port()}\n')
    printed = subprocess.run([*CALLBOT, "edge", "--config", str(cfg), "--print"], capture_output=True, text=True,
                             timeout=60)
    assert printed.returncode == 0 and printed.stdout.startswith("#!KAMAILIO"), printed.stderr
    checked = subprocess.run([*CALLBOT, "edge", "--config", str(cfg), "--check"], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "kamailio -c accepts" in checked.stderr


@pytest.mark.parametrize("toml, message", [
    ('cert_file = "c.pem"', "$.edge: TLS at the edge needs both cert_file and key_file"),
    ('trusted_sources = ["trunk"]', "$.edge: trusted_sources: 'trunk' is not an IP address or CIDR network"),
    ("calls_per_s = 0", "$.edge.calls_per_s: Expected `int` >= 1"),
    ('cert_file = "c.pem"\nkey_file = "k.pem"\ntls_port = 5060', "$.edge: tls_port 5060 is the port of SIP over TCP"),
    ("dialog_keepalive_s = 5", "$.edge: dialog_keepalive_s: kamailio asks no more often than every 30 s"),
])
def test_edge_settings_errors_name_the_field(toml, message):
    with pytest.raises(ConfigError) as err:
        _settings(toml)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("transport, message", [
    ('bind = "0.0.0.0"', '$.sip.transports[0].bind: behind the edge serve listens on loopback only'),
    ('bind = "127.0.0.1"\nkind = "tcp"', "$.sip.transports[0].kind: the edge reaches serve over UDP"),
])
def test_serve_behind_the_edge_must_be_on_loopback(transport, message):
    with pytest.raises(StartupError) as err:
        edge.check_settings(_settings(transport=transport))
    assert str(err.value).startswith(message)
    for address in ("127.0.0.1", "203.0.113.7"):  # the edge listens on loopback at its port either way
        with pytest.raises(StartupError, match="both want port 5060"):
            edge.check_settings(_settings(f'address = "{address}"', sip_port=5060))


@pytest.mark.parametrize("edge_toml, rtp_bind, rtp_public, inside", [
    ('address = "203.0.113.7"', "203.0.113.7", "203.0.113.7", "127.0.0.1"),  # a public address of this host
    ('address = "10.0.0.5"\nadvertise = "203.0.113.7"', "10.0.0.5", "203.0.113.7", "127.0.0.1"),  # behind NAT
    ('address = "0.0.0.0"', "0.0.0.0", None, "127.0.0.1"),  # every address: pjsua names the host's own in the SDP
    ('address = "127.0.0.5"', "127.0.0.5", "127.0.0.5", "127.0.0.5"),  # all on loopback (tests)
])
def test_serve_behind_the_edge_takes_rtp_exemption_and_proxy_from_the_edge(edge_toml, rtp_bind, rtp_public, inside):
    """`serve --edge` derives serve's settings from [edge]: RTP on the public side, the edge's inside
    address exempt from serve's per-source limits, outbound requests through the edge."""
    settings = parse_settings(f"""
[[sip.transports]]
bind = "127.0.0.1"
port = 5070
[[sip.accounts]]
name = "line"
user = "bot"
[[sip.accounts]]
name = "pbx"
registrar = "sip:pbx.example.com"
[edge]
{edge_toml}
""")
    derived = edge.serve_settings(settings)
    [t] = derived.sip.transports
    assert (t.bind, t.port, t.rtp_bind, t.rtp_public_address) == ("127.0.0.1", 5070, rtp_bind, rtp_public)
    line, pbx = derived.sip.accounts
    assert line.proxy == f"sip:{inside}:5060;lr" and pbx.proxy is None  # a registrar routes its own account
    assert derived.sip.admission.exempt_sources == ("127.0.0.1", "::1") + ((inside,) if inside != "127.0.0.1" else ())
    assert settings.sip.transports[0].rtp_bind is None  # the user's settings are left as they were
    assert edge.inside_address(derived.edge, "127.0.0.1") == inside


def test_what_the_user_set_for_serve_behind_the_edge_wins():
    settings = parse_settings("""
[[sip.transports]]
bind = "127.0.0.1"
port = 5070
rtp_bind = "198.51.100.2"
rtp_public_address = "198.51.100.9"
[[sip.accounts]]
user = "bot"
proxy = "sip:trunk.example.com"
[sip.admission]
exempt_sources = ["192.0.2.0/24"]
[edge]
address = "203.0.113.7"
""")
    derived = edge.serve_settings(settings)
    t = derived.sip.transports[0]
    assert (t.rtp_bind, t.rtp_public_address) == ("198.51.100.2", "198.51.100.9")
    assert derived.sip.accounts[0].proxy == "sip:trunk.example.com"
    # the user's list left out loopback: the edge's inside address is added, or every call would count
    # against one source
    assert derived.sip.admission.exempt_sources == ("192.0.2.0/24", "127.0.0.1")


def test_an_advertised_address_needs_the_local_one():
    """kamailio on every address writes the receiving socket's own (private) address into
    Record-Route, whatever advertised_address says: behind NAT the edge must name its private address."""
    with pytest.raises(StartupError, match=r"^\$\.edge\.address: with advertise, name the local address"):
        edge.check_settings(_settings('advertise = "203.0.113.7"'))


def test_serve_without_the_edge_on_a_public_address_warns_once(tmp_path, monkeypatch, capsys):
    """One warning line at start (issue 11, point 2); loopback gets none. serve itself is not started."""
    from callbot.app import cli, serve

    given = []  # serve prints the warning once its "listening" lines are out: a failed start says only why
    monkeypatch.setattr(serve, "serve", lambda settings, engine, warning=None, config=None: given.append(warning) or 0)
    for bind, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        cfg = tmp_path / f"{bind}.toml"
        cfg.write_text(f'[[sip.transports]]\nbind = "{bind}"\nport = 5060\n')
        assert cli.main(["serve", "--engine", "echo", "--config", str(cfg)]) == 0
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [] and (given.pop() is not None) == warned
    assert err == [] and "no edge in front" in edge.public_exposure_warning(_settings(transport='bind = "0.0.0.0"'))


def test_missing_kamailio_is_one_line_and_exit_2(tmp_path):
    """A PATH without kamailio: `callbot edge` and `callbot serve --edge` say which package, nothing more."""
    cfg = serve_config(tmp_path, free_port(), tail=f'[edge]\naddress = "127.0.0.1"\nport = {free_port()}\n')
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    for args in (["edge"], ["serve", "--edge", "--engine", "echo"]):
        out = subprocess.run([*CALLBOT, *args, "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                             env=env)
        assert out.returncode == 2, out.stderr
        [line] = out.stderr.strip().splitlines()
        assert line == f"callbot: error: {edge.NOT_INSTALLED}"
        assert "apt install kamailio" in line and "brew install kamailio" in line


def test_a_run_dir_on_a_full_disk_is_one_line_and_exit_2(tmp_path):
    """kamailio's config cannot be written: `callbot edge` says where and why, nothing more."""
    from tests.small_disk import small_disk

    if KAMAILIO is None:
        pytest.skip("kamailio is not installed (Debian: kamailio)")
    with small_disk(tmp_path / "disk") as disk:
        cfg = serve_config(tmp_path, free_port(), tail=f'[edge]\naddress = "127.0.0.1"\nport = {free_port()}\n'
                                                        f'run_dir = "{disk.path / "edge"}"\n')
        (disk.path / "edge").mkdir()
        disk.fill()
        out = subprocess.run([*CALLBOT, "edge", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("callbot: error: kamailio's files in ") and "No space left on device" in line, line


# ---------------------------------------------------------------------------------------------------
# real processes through the edge


def _sip_request(method: str, port: int, *, transport: str = "udp", to_tag: str = "", headers: str = "",
                 cseq_method: str | None = None, max_forwards: int = 70, timeout: float = 5.0) -> str:
    """One request to 127.0.0.1:`port`; returns the status line of its first final answer."""
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOCALHOST, 0))
        s.settimeout(timeout)
        if transport == "tcp":
            s.connect((LOCALHOST, port))
        me = f"{LOCALHOST}:{s.getsockname()[1]}"
        call_id = f"{method.lower()}-{time.monotonic_ns()}"
        uri = f"sip:bot@{LOCALHOST}:{port}"
        tag = f";tag={to_tag}" if to_tag else ""
        msg = (f"{method} {uri} SIP/2.0\r\nVia: SIP/2.0/{transport.upper()} {me};branch=z9hG4bK{call_id}\r\n"
               f"Max-Forwards: {max_forwards}\r\nFrom: <sip:probe@{LOCALHOST}>;tag=probe\r\nTo: <{uri}>{tag}\r\n"
               f"Call-ID: {call_id}\r\nCSeq: 1 {cseq_method or method}\r\nContact: <sip:probe@{me}>\r\n{headers}"
               "Content-Length: 0\r\n\r\n").encode()
        if transport == "tcp":
            s.sendall(msg)
        else:
            s.sendto(msg, (LOCALHOST, port))
        while True:
            status = s.recv(65536).decode(errors="replace").split("\r\n", 1)[0]
            if not status.startswith("SIP/2.0 1"):
                return status


def _methods_received(sock: socket.socket, quiet_s: float) -> list[str]:
    """The request methods that reached `sock` until it has been quiet for `quiet_s`."""
    sock.settimeout(quiet_s)
    methods = []
    with pytest.raises(socket.timeout):
        while True:
            methods.append(sock.recv(65536).decode(errors="replace").split(" ", 1)[0])
    return methods


@pytest.fixture
def edge_alone(tmp_path):
    """`callbot edge` (tcp_idle_s = 2) in front of a plain UDP socket standing in for serve; yields
    (edge port, the stand-in socket, the ctl socket). SIGTERM must end it with status 0."""
    if KAMAILIO is None:
        pytest.skip("kamailio is not installed (Debian: kamailio)")
    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    backend.bind((LOCALHOST, 0))
    edge_port = free_port()
    cfg = serve_config(tmp_path, backend.getsockname()[1], tail=f"""[edge]
address = "127.0.0.1"
port = {edge_port}
run_dir = "edge"
tcp_idle_s = 2
""")
    proc = subprocess.Popen([*CALLBOT, "edge", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = _Lines(proc.stderr, tmp_path / "edge.log")
    try:
        lines.wait_line("edge: kamailio on", 30)
        yield edge_port, backend, f"unix:{tmp_path / 'edge' / 'kamailio_ctl'}"
        assert stop_process(proc, 15) == 0
    finally:
        stop_process(proc, 10, signal.SIGKILL)
        backend.close()


def test_methods_we_do_not_serve_stop_at_the_edge(edge_alone):
    """Refused requests are answered by the edge and never reach serve; OPTIONS is answered there too;
    an INVITE goes through, and one serve never answers gets 503 from the edge."""
    edge_port, backend, ctl = edge_alone
    refused = {m: _sip_request(m, edge_port) for m in ("MESSAGE", "SUBSCRIBE", "REGISTER", "PUBLISH",
                                                        "NOTIFY", "REFER", "INFO", "UPDATE")}
    refused["MESSAGE over TCP"] = _sip_request("MESSAGE", edge_port, transport="tcp")
    assert all(status.startswith("SIP/2.0 405") for status in refused.values()), refused
    assert _sip_request("OPTIONS", edge_port).startswith("SIP/2.0 200")
    # in-dialog requests for dialogs the edge never set up, with or without a Route to it
    assert _sip_request("BYE", edge_port, to_tag="x").startswith("SIP/2.0 404")
    route = f"Route: <sip:{LOCALHOST}:{edge_port};lr>\r\n"
    assert _sip_request("BYE", edge_port, to_tag="x", headers=route).startswith("SIP/2.0 481")
    assert _sip_request("INVITE", edge_port, max_forwards=0).startswith("SIP/2.0 483")
    assert _sip_request("INVITE", edge_port, cseq_method="BYE").startswith("SIP/2.0 400")
    assert _methods_received(backend, 0.5) == []
    # the control: an INVITE is passed on; the stand-in never answers, so the edge says 503 after 4 s
    assert _sip_request("INVITE", edge_port, timeout=15).startswith("SIP/2.0 503")
    assert set(_methods_received(backend, 0.5)) == {"INVITE"}  # with the edge's retransmissions
    counters = edge.read_counters(ctl)
    assert counters["refused"] == 9 and counters["malformed"] == 1 and counters["calls_passed"] == 1, counters


def test_held_tcp_connections_neither_shut_the_edge_nor_stay(edge_alone):
    """200 idle TCP connections (pjsua2 alone accepts 62, ever): a request on a new one is answered,
    and the idle ones are closed after tcp_idle_s (2 s here)."""
    edge_port, _, _ = edge_alone
    held = [socket.create_connection((LOCALHOST, edge_port), timeout=5) for _ in range(200)]
    try:
        assert _sip_request("OPTIONS", edge_port, transport="tcp").startswith("SIP/2.0 200")
        for s in held:
            s.settimeout(15)  # a bound on waiting: the edge closes each after ~2 s (its timer's granularity)
            assert s.recv(1) == b""
    finally:
        for s in held:
            s.close()


def _edge_toml(port: int, extra: str = "") -> str:
    """The [edge] section of serve's config for an edge on 127.0.0.1:`port` (run folder "edge")."""
    return f'[edge]\naddress = "127.0.0.1"\nport = {port}\nrun_dir = "edge"\n{extra}'


def _serve_edge(cfg: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    proc = subprocess.Popen([*CALLBOT, "serve", "--edge", "--engine", "echo", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.err_lines = _Lines(proc.stderr, log)
    proc.err_lines.wait_line("edge: kamailio on", 60)
    return proc


def _edge_pid(run_dir: pathlib.Path) -> int:
    return int((run_dir / "kamailio.pid").read_text())


def _state(pid: int) -> str | None:
    """A process's state letter ("Z": a zombie), None when there is no such process (/proc, else ps: macOS)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=10).stdout
    return out.strip()[:1] or None


def _gone(pid: int, timeout: float = 15.0) -> bool:
    """`pid` has exited within `timeout` (a zombie counts: an orphan waits for whoever reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(pid) in (None, "Z"):
            return True
        time.sleep(0.05)
    return False


def _media_call(uri: str, tmp_path: pathlib.Path, seconds: float = 2.0) -> tuple[list[dict], np.ndarray]:
    """tests/media_peer.py plays a 300 Hz tone into `uri` for `seconds`; its events and what it heard."""
    rate = 16000
    t = np.arange(int(rate * seconds)) / rate
    play, heard = tmp_path / "tone.wav", tmp_path / "heard.wav"
    with wave.open(str(play), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((4000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes())
    with open(tmp_path / "media-peer.log", "w") as log:
        peer = subprocess.Popen([sys.executable, str(MEDIA_PEER), "--uri", uri, "--codec", "G722", "--play", str(play),
                                 "--record", str(heard), "--seconds", str(seconds)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            events = [json.loads(line) for line in peer.stdout]  # ends with "done": bounded by --seconds
        finally:
            stop_process(peer, 10)
    with wave.open(str(heard)) as w:
        return events, np.frombuffer(w.readframes(w.getnframes()), "<i2")


def _log_events(proc: subprocess.Popen) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]


@needs_kamailio
def test_call_through_the_edge_connects_and_has_audio(tmp_path):
    sip_port, edge_port = free_port(), free_port()
    cfg = serve_config(tmp_path, sip_port, tail=_edge_toml(edge_port))
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    try:
        kamailio = _edge_pid(tmp_path / "edge")
        events, heard = _media_call(f"sip:echo@{LOCALHOST}:{edge_port}", tmp_path)
        assert events[-1]["ev"] == "done", events
        rx = max(e["rx_packets"] for e in events if e["ev"] == "jitter_buffer")
        assert rx >= 0.9 * 2.0 * 50, events  # the echo's RTP every 20 ms
        assert np.abs(heard).max() > 1000, "the echo never reached the caller"
        counters = edge.read_counters(f"unix:{tmp_path / 'edge' / 'kamailio_ctl'}")
        assert counters["calls_passed"] == 1, counters
        assert stop_process(proc, 30) == 0
        assert _gone(kamailio), "kamailio outlived serve"
    finally:
        stop_process(proc, 10, signal.SIGKILL)
    log = _log_events(proc)
    [incoming] = [e for e in log if e["event"] == "IncomingCall"]
    ended = [e for e in log if e["event"] == "CallEnded" and e["call_id"] == incoming["call_id"]]
    assert ended and ended[0]["cause"] == "remote"  # the caller's BYE came through the edge


@needs_kamailio
def test_serve_stopped_hangs_up_its_calls_through_its_edge(tmp_path):
    """`callbot serve --edge` stopped (SIGTERM) with a call up: serve's BYE reaches the caller through the
    edge (kamailio stops after serve's calls have ended, not before: its Record-Route is their only way)."""
    sip_port, edge_port = free_port(), free_port()
    cfg = serve_config(tmp_path, sip_port, tail=_edge_toml(edge_port))
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    try:
        kamailio = _edge_pid(tmp_path / "edge")
        with PjsuaPeer(user="alice", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@{LOCALHOST}:{edge_port}")
            peer.expect("media", call_id=call_id, timeout=15)
            proc.send_signal(signal.SIGTERM)
            assert peer.expect("disconnected", call_id=call_id, timeout=15)["code"] == 200
        assert stop_process(proc, 30) == 0
        assert _gone(kamailio), "kamailio outlived serve"
    finally:
        stop_process(proc, 10, signal.SIGKILL)
    [ended] = [e for e in _log_events(proc) if e["event"] == "CallEnded"]
    assert ended["cause"] == "shutdown", ended  # serve's own hang-up, not the edge's


@needs_kamailio
@pytest.mark.timeout(200)
def test_a_call_whose_serve_stopped_dead_is_hung_up_by_the_edge(tmp_path):
    """[edge] dialog_keepalive_s: a stopped serve (SIGSTOP: a hung process, or a machine gone) can send no
    BYE, and its caller would hear silence until they gave up. The edge asks both sides of the call in
    its dialog (OPTIONS) every 30 s (kamailio's shortest); answered while serve runs, the call stays;
    unanswered once serve is stopped, the edge ends the call with a BYE to the caller: within 30 s + tm's
    5 s + the dialog's last 10 s. (About 80 s: kamailio's dialog timers are whole seconds and 30 s apart.)"""
    sip_port, edge_port = free_port(), free_port()
    cfg = serve_config(tmp_path, sip_port, tail=_edge_toml(edge_port, "dialog_keepalive_s = 30\n"))
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    ctl = f"unix:{tmp_path / 'edge' / 'kamailio_ctl'}"

    def keepalives_sent() -> int:  # tm's count of requests the edge sent itself (only keep-alives here)
        out = edge.kamcmd(ctl, None, "cnt.get", "tmx", "UAC_transactions")
        return int(out.strip() or 0)

    try:
        with PjsuaPeer(user="alice", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@{LOCALHOST}:{edge_port}")
            peer.expect("media", call_id=call_id, timeout=15)
            # both sides answered the first round (one OPTIONS each): the call is still up
            eventually(lambda: keepalives_sent() >= 2, 50, "the edge's keep-alives", interval=0.5)
            assert peer.all("disconnected", call_id=call_id) == []
            proc.send_signal(signal.SIGSTOP)
            try:
                ended = peer.expect("disconnected", call_id=call_id, timeout=60)
            finally:
                proc.send_signal(signal.SIGCONT)
            assert ended["code"] == 200, ended  # a BYE (from the edge: serve was stopped)
        assert stop_process(proc, 30) == 0
    finally:
        stop_process(proc, 10, signal.SIGKILL)


@needs_kamailio
def test_a_killed_serve_takes_its_edge_with_it(tmp_path):
    """SIGKILL gives serve no chance to stop kamailio: the parent-death signal does (Linux; macOS: the
    orphan watcher), so nothing is left holding the public port."""
    cfg = serve_config(tmp_path, free_port(), tail=_edge_toml(free_port()))
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    try:
        kamailio = _edge_pid(tmp_path / "edge")
        proc.kill()
        proc.wait(10)
        assert _gone(kamailio), "kamailio outlived a killed serve"
    finally:
        stop_process(proc, 10, signal.SIGKILL)


def test_the_orphan_watcher_ends_the_group_of_a_killed_parent(tmp_path):
    """macOS's stand-in for the parent-death signal (edge.watch_for_orphan), run here on Linux: a parent
    starts a process group (kamailio's place) and the watcher, then dies by SIGKILL; the group gets
    SIGTERM. A normal stop ends the watcher first."""
    script = ("import subprocess, sys, time\n"
              "from callbot.app.edge import watch_for_orphan\n"
              "child = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
              "watcher = watch_for_orphan(child.pid)\n"
              "print(child.pid, watcher.pid, flush=True)\n"
              "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child, watcher = map(int, parent.stdout.readline().split())
        assert not _gone(child, 0.5), "the group ended while its parent lived"
        parent.kill()
        parent.wait(10)
        assert _gone(child, 10) and _gone(watcher, 10)
    finally:
        stop_process(parent, 5, signal.SIGKILL)
    group = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        watcher = edge.watch_for_orphan(group.pid)  # its parent lives: stopped, it leaves the group alone
        watcher.terminate()
        assert watcher.wait(10) == -signal.SIGTERM and group.poll() is None
    finally:
        stop_process(group, 5)


@needs_kamailio
@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed (Debian: sip-tester)")
@pytest.mark.skipif(not can_bind(FLOODER), reason=f"{FLOODER} is not a local address here (Linux's lo has it)")
def test_invite_flood_is_absorbed_and_a_call_connects_after(tmp_path):
    """SIPp sends 900 INVITEs at 300/s from 127.0.0.2 through the edge: pike bans it (logged once), the
    per-source rate lets a couple reach serve, serve lives, and a call from 127.0.0.1 connects after."""
    sip_port, edge_port = free_port(), free_port()
    cfg = serve_config(tmp_path, sip_port, tail=_edge_toml(edge_port))
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    try:
        with open(tmp_path / "sipp.log", "w") as log:
            sipp = subprocess.run(["sipp", f"{LOCALHOST}:{edge_port}", "-sn", "uac", "-s", "echo", "-i", FLOODER,
                                   *sipp_ports(), "-r", "300", "-m", "900",
                                   "-d", "500", "-recv_timeout", "2000", "-timeout", "20", "-nostdin"],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=60)
        screen = (tmp_path / "sipp.log").read_text()
        sent = re.findall(r"INVITE -+>\s+(\d+)\s+(\d+)", screen)
        assert sent and int(sent[-1][0]) == 900, screen[-3000:]  # (retransmissions: sent[-1][1])
        assert proc.poll() is None, "serve died in the flood"
        counters = edge.read_counters(f"unix:{tmp_path / 'edge' / 'kamailio_ctl'}")
        assert counters["flood_sources"] == 1, counters
        assert counters["flood_dropped"] >= 800, counters
        assert counters["calls_passed"] <= 4, counters  # 2 a second per source, until the ban
        events, heard = _media_call(f"sip:echo@{LOCALHOST}:{edge_port}", tmp_path)
        assert any(e["ev"] == "media" for e in events) and np.abs(heard).max() > 1000, events
        assert stop_process(proc, 30) == 0
    finally:
        stop_process(proc, 10, signal.SIGKILL)
    log = _log_events(proc)
    from_flooder = [e for e in log if e["event"] == "IncomingCall" and FLOODER in e.get("remote_uri", "")]
    assert len(from_flooder) == counters["calls_passed"], from_flooder
    bans = [line for line in proc.err_lines.lines if "flood from" in line]
    assert len(bans) == 1 and FLOODER in bans[0], bans
    print(f"flood: {sipp.returncode=} counters={counters} invites+retransmissions={sent[-1]}")


def _self_signed(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", f"/CN={LOCALHOST}"], check=True, capture_output=True, timeout=60)
    return cert, key


def _tls_version_accepted(port: int, version: str) -> bool:
    out = subprocess.run(["openssl", "s_client", "-connect", f"{LOCALHOST}:{port}", f"-{version}"],
                         input="", capture_output=True, text=True, timeout=20)
    return re.search(r"^New, TLSv1\.\d", out.stdout, re.M) is not None


@needs_kamailio
@pytest.mark.skipif(not HAS_TLS, reason="kamailio's tls module is not installed (Debian: kamailio-tls-modules)")
def test_tls_at_the_edge_takes_a_sips_call(tmp_path):
    """The edge terminates TLS with the system's OpenSSL 3: 1.2 and 1.3 accepted, 1.1 refused; a pjsua2
    caller dials a sips: URI, has media, and serve's own BYE (max_call_duration_s) reaches it over TLS."""
    cert, key = _self_signed(tmp_path)
    sip_port, edge_port, tls_port = free_port(), free_port(), free_port(socket.SOCK_STREAM)
    cfg = serve_config(tmp_path, sip_port, extra="max_call_duration_s = 2.0", tail=f"""[edge]
address = "127.0.0.1"
port = {edge_port}
tls_port = {tls_port}
cert_file = "{cert}"
key_file = "{key}"
run_dir = "edge"
modules_dir = "{MODULES}"
""")
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    try:
        accepted = {v: _tls_version_accepted(tls_port, v) for v in ("tls1_1", "tls1_2", "tls1_3")}
        assert accepted == {"tls1_1": False, "tls1_2": True, "tls1_3": True}, accepted
        with PjsuaPeer(user="alice", transport="tls", cert=str(cert), key=str(key), log_dir=tmp_path) as peer:
            call_id = peer.call(f"sips:echo@{LOCALHOST}:{tls_port}")
            peer.expect("media", call_id=call_id, timeout=15)
            ended = peer.expect("disconnected", call_id=call_id, timeout=15)
            assert ended["code"] == 200, ended
        assert stop_process(proc, 30) == 0
    finally:
        stop_process(proc, 10, signal.SIGKILL)
    [call_end] = [e for e in _log_events(proc) if e["event"] == "CallEnded"]
    assert call_end["cause"] == "max_duration"


@needs_kamailio
@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp is not installed (Debian: sip-tester)")
def test_call_out_through_the_edge(tmp_path):
    """`callbot call --edge`: the INVITE goes from loopback through kamailio to a SIPp callee that
    answers and echoes RTP; its ACK and serve's BYE (max_call_s) come through the edge too (its Via on
    top), as the edge's Record-Route asks."""
    edge_port = free_port()
    cfg = serve_config(tmp_path, 0, tail=f'[edge]\naddress = "127.0.0.1"\nport = {edge_port}\nrun_dir = "edge"\n'
                                         "[[bots]]\nname = 'short'\nmax_call_s = 2\n")
    with SippCallee(tmp_path / "sipp") as callee:
        out = subprocess.run([*CALLBOT, "call", "--edge", callee.uri, "--engine", "echo", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr + callee.tail()
        # SIPp ends by itself on the BYE, or at its own -timeout (30 s) when the call went wrong.
        try:
            sipp_rc = callee.wait(45)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIPp did not end:\n" + out.stderr + callee.tail()) from None
        assert sipp_rc == 0, out.stderr + callee.tail()
    assert "edge: kamailio on" in out.stderr and "call ended: max_duration" in out.stderr, out.stderr
    edge_via = f"Via: SIP/2.0/UDP {LOCALHOST}:{edge_port};branch="
    invite = callee.received("INVITE")
    assert edge_via in invite and f"Record-Route: <sip:{LOCALHOST}:{edge_port};lr" in invite, invite
    for method in ("ACK", "BYE"):
        assert edge_via in callee.received(method), callee.received(method)
