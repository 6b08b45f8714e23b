"""Several SIP workers behind the kamailio edge (app/workers.py, app/edge.py's dispatcher configuration),
with real processes on 127.0.0.1: `callbot serve --edge --workers N --engine echo` (a supervisor, N
`callbot serve` workers, kamailio), pjsua2 callers (tests/peer_pjsua.py, 4 calls per process: the
wheel's cap) each playing a tone of its own and recording what comes back, and `callbot edge` with
`[edge] nodes` in front of two separate `callbot serve` processes.

Cross-talk is checked by frequency: caller k plays f_k and must hear f_k, with every other caller's tone
at least 30 dB (10^3 in power) below it (measured: 64-65 dB; a call mixed into another would be ~0 dB,
and 30 leaves room for a late packet's concealment on a loaded machine). Which worker has a call is read from each worker's
`callbot_calls_active` (their metrics ports follow the configured one). Mid-call audio is read from the
callers' WAV files while pjmedia still writes them (raw PCM after the 44-byte header).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
import wave

import httpx
import msgspec
import numpy as np
import pytest

from callbot.app import edge, workers
from callbot.app.errors import StartupError
from callbot.app.settings import ConfigError, parse_settings
from tests.sip_peers import LOCALHOST, PjsuaPeer, RawUac, _Lines, eventually, free_port, serve_config, stop_process

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio is not installed (Debian: kamailio)")]
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules"
RATE = 16000  # the callers' bridge and recordings (tests/peer_pjsua.py)
TONES = (400, 550, 700, 850, 1000, 1150, 1300, 1450)  # Hz, one per caller
HEADER = 44  # bytes of pjmedia's WAV header before the samples


# ---------------------------------------------------------------------------------------------------
# the configuration


def _settings(edge_toml: str, sip_port: int = 5070):
    return parse_settings(f'[[sip.transports]]\nbind = "127.0.0.1"\nport = {sip_port}\n[[sip.accounts]]\n'
                          f'user = "bot"\n[edge]\n{edge_toml}\n')


@pytest.mark.parametrize("edge_toml", ['address = "127.0.0.1"\nnodes = ["127.0.0.1:5080"]',
                                       'address = "203.0.113.7"\nnodes = ["10.0.0.2:5070", "10.0.0.3:5070"]',
                                       'nodes = ["10.0.0.2:5070"]'])
def test_the_dispatcher_configuration_is_accepted_by_kamailio(tmp_path, edge_toml):
    """Workers on loopback and nodes elsewhere in one dispatcher set; each destination reached from the
    edge's socket facing it (the inside one for loopback, the public one for other machines)."""
    settings = _settings(edge_toml)
    local = [edge.Backend("127.0.0.1", 5070), edge.Backend("127.0.0.1", 5071)]
    dests = edge.destinations(settings.edge, local)
    assert [str(d) for d in dests][:2] == ["127.0.0.1:5070", "127.0.0.1:5071"] and len(dests) == 2 + len(settings.edge.nodes)
    text = edge.render(settings.edge, local, modules_dir=MODULES, run_dir=os.fspath(tmp_path))
    listing = edge.dispatcher_list(settings.edge, dests)
    (tmp_path / "kamailio.cfg").write_text(text)
    (tmp_path / "dispatcher.list").write_text(listing)
    for needle in ('loadmodule "dispatcher.so"', 'ds_select_dst("1", "4")', "ds_next_dst()", 'ds_mark_dst("ip")',
                   't_check_status("486|503")', "$dlg_var(serve) = $du", "$du = $dlg_var(serve)",
                   'ds_is_from_list("1", "2")', "route(DRAINING)", 'modparam("tm", "remap_503_500", 0)'):
        assert needle in text, needle
    if settings.edge.address == "127.0.0.1":
        assert "1 sip:127.0.0.1:5080 8 0 socket=udp:127.0.0.1:5060" in listing
    if settings.edge.address == "203.0.113.7":
        assert "1 sip:127.0.0.1:5070 8 0 socket=udp:127.0.0.1:5060" in listing  # the inside socket
        assert "1 sip:10.0.0.2:5070 8 0 socket=udp:203.0.113.7:5060" in listing
    if settings.edge.address == "0.0.0.0":  # other machines: whichever address the kernel routes from
        assert "1 sip:10.0.0.2:5070 8 0\n" in listing
    for line in listing.splitlines()[2:]:  # the config names each destination in a comment
        assert f"#   {line}" in text
    out = subprocess.run(["kamailio", "-c", "-f", str(tmp_path / "kamailio.cfg")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]


def test_one_serve_keeps_its_fixed_route_and_nodes_are_checked():
    one = _settings('address = "127.0.0.1"')
    text = edge.render(one.edge, edge.backend_of(one), modules_dir=MODULES, run_dir="/r")
    assert 'loadmodule "dispatcher.so"' not in text and '$du = "sip:127.0.0.1:5070"' in text
    with pytest.raises(ConfigError, match=r"\$\.edge: nodes: '10\.0\.0\.2' is not HOST:PORT"):
        _settings('nodes = ["10.0.0.2"]')
    with pytest.raises(StartupError, match=r"^\$\.edge\.nodes\[0\]: 127\.0\.0\.1:5060 is the edge's own port"):
        edge.check_settings(_settings('nodes = ["127.0.0.1:5060"]'))


def test_each_worker_gets_its_port_rtp_metrics_and_the_edge_derived_settings():
    settings = parse_settings('[metrics]\naddress = "127.0.0.1:9500"\n[[sip.transports]]\nbind = "127.0.0.1"\n'
                              'port = 5070\nrtp_port = 4000\n[[sip.accounts]]\nuser = "bot"\n[edge]\n'
                              'address = "203.0.113.7"\n')
    spec = workers.Supervised(role="worker", index=2, sip_port=5071, rtp_port=4100, service="/tmp/m.sock",
                              metrics="127.0.0.1:9502")
    derived = workers.supervised_settings(settings, spec)
    [t] = derived.sip.transports
    assert (t.port, t.rtp_port, t.rtp_bind, t.rtp_public_address) == (5071, 4100, "203.0.113.7", "203.0.113.7")
    assert derived.model.service == "/tmp/m.sock" and derived.metrics.address == "127.0.0.1:9502"
    assert "127.0.0.1" in derived.sip.admission.exempt_sources
    off = workers.supervised_settings(settings, workers.Supervised(role="service", service="/tmp/m.sock"))
    assert not off.metrics.enabled and off.sip == settings.sip
    # the panel, the store's API and the retention job are the supervisor's, once: no child gets them
    shared = parse_settings('[web]\nlisten = "127.0.0.1:8088"\n[store]\napi = "127.0.0.1:8091"\n[retention]\n'
                            'days = 30\n[[tenants]]\nname = "acme"\nretention_days = 7\n[[sip.transports]]\n'
                            'bind = "127.0.0.1"\nport = 5070\n[[sip.accounts]]\nuser = "bot"\n')
    for role in ("worker", "service"):
        child = workers.supervised_settings(shared, workers.Supervised(role=role, index=1, sip_port=5071))
        assert child.web.listen is None and child.store.api is None and child.store.enabled
        assert child.retention.days == 0 and child.retention_by_tenant() == {}
    assert workers.parse_supervised(msgspec.json.encode(spec).decode()) == spec


def test_workers_need_the_edge_and_free_ports(tmp_path):
    cfg = serve_config(tmp_path, free_port())
    out = subprocess.run([*CALLBOT, "serve", "--workers", "2", "--engine", "echo", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == ("callbot: error: --workers runs serve's workers behind "
                                                          "the edge: add --edge"), out.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOCALHOST, 0))
        port = taken.getsockname()[1]
        settings = _settings('address = "127.0.0.1"', sip_port=port - 1)
        with pytest.raises(StartupError, match=rf"workers take UDP ports {port - 1}-{port} on 127\.0\.0\.1, and "
                                               rf"{port} is in use"):
            workers.worker_ports(settings, 2)


# ---------------------------------------------------------------------------------------------------
# real processes


def _free_run(n: int) -> int:
    """The first of `n` consecutive ports free for UDP and TCP now."""
    for _ in range(100):
        first = free_port()
        if first + n > 65535:
            continue
        ok = True
        for p in range(first + 1, first + n):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    try:
                        s.bind((LOCALHOST, p))
                    except OSError:
                        ok = False
        if ok:
            return first
    raise RuntimeError("no run of free ports")


def _tone_wav(path: pathlib.Path, freq: float, seconds: float = 60) -> pathlib.Path:
    t = np.arange(int(RATE * seconds)) / RATE
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes((9000 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes())
    return path


def _samples(path: pathlib.Path) -> np.ndarray:
    """What a caller's recorder has written so far (the header's sizes are filled in only at its end)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) > HEADER:
        assert struct.unpack_from("<I", data, 24)[0] == RATE
    return np.frombuffer(data[HEADER:len(data) - (len(data) - HEADER) % 2], "<i2").astype(np.float64)


def _hears(x: np.ndarray, own: float) -> str:
    """"own": `own` dominates and every other caller's tone is >= 30 dB below it; "silence"; else what."""
    if len(x) < RATE or np.abs(x).max() < 500:
        return "silence"
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2  # windowed: a tone leaks into no other's band
    freqs = np.fft.rfftfreq(len(x), 1 / RATE)

    def power(f: float) -> float:
        return float(spectrum[(freqs > f - 15) & (freqs < f + 15)].sum())

    mine, loudest_other = power(own), max(power(f) for f in TONES if f != own)
    if freqs[np.argmax(spectrum)] != pytest.approx(own, abs=15) or mine < 1e3 * loudest_other:
        return f"not its own: dominant {freqs[np.argmax(spectrum)]:.0f} Hz, others {loudest_other / mine:.1e} of it"
    return "own"


def _calls_active(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://{LOCALHOST}:{metrics_port}/metrics", timeout=5).read().decode()
    return int(float(next(l.split()[1] for l in text.splitlines() if l.startswith("callbot_calls_active "))))


class Deployment:
    """`callbot serve --edge --workers N --engine echo` on loopback: workers from `sip_port` up, their
    metrics from `metrics_port` + 1 up, the edge on `edge_port`."""

    def __init__(self, tmp_path: pathlib.Path, n: int, *, drain_s: float = 30, engine: str = "echo", tail: str = "",
                 metrics: bool = True):
        self.sip_port, self.edge_port = _free_run(n), free_port()
        self.metrics_port = _free_run(n + 1) if metrics else None
        self.run_dir = tmp_path / "edge"
        cfg = serve_config(tmp_path, self.sip_port, self.metrics_port, tail=f"""[recognizer]
engine = "none"
[edge]
address = "127.0.0.1"
port = {self.edge_port}
run_dir = "edge"
trusted_sources = ["127.0.0.0/8"]
total_calls_per_s = 50
drain_s = {drain_s}
{tail}""")
        self.events = open(tmp_path / "events.jsonl", "w")
        self.proc = subprocess.Popen([*CALLBOT, "serve", "--edge", "--workers", str(n), "--engine", engine,
                                      "--config", str(cfg)], stdout=self.events, stderr=subprocess.PIPE, text=True)
        self.err = _Lines(self.proc.stderr, tmp_path / "supervisor.log")
        self.uri = f"sip:echo@{LOCALHOST}:{self.edge_port}"
        try:  # a supervisor that could not start exits: said at once, not after the wait
            eventually(lambda: self.proc.poll() is not None or any("edge: kamailio on" in l for l in self.err.lines),
                       90, "the supervisor up")
            assert self.proc.poll() is None, "".join(self.err.lines[-30:])
        except BaseException:
            self.close(signal.SIGKILL)
            raise

    def pid(self, worker: int) -> int:
        """The worker's newest process id (its "pid N" line, then a restart's "is back (pid N")."""
        found = None
        for line in self.err.lines:
            for marker in (f"worker {worker}: pid ", f"callbot: worker {worker} is back (pid "):
                if line.startswith(marker):
                    found = int(line[len(marker):].split(",")[0].split(" ")[0])
        assert found is not None, self.err.lines
        return found

    def active(self, worker: int) -> int:
        return _calls_active(self.metrics_port + worker)

    def close(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        code = stop_process(self.proc, timeout, sig)
        self.events.close()
        return code


def _dispatcher_states(run_dir: pathlib.Path) -> dict[str, str]:
    return edge.dispatcher_states(f"unix:{run_dir / 'kamailio_ctl'}")


def _kamailio_gone(run_dir: pathlib.Path) -> bool:
    try:
        pid = int((run_dir / "kamailio.pid").read_text())
    except (FileNotFoundError, ValueError):
        return True
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_two_workers_take_eight_calls_without_cross_talk_and_survive_a_killed_worker(tmp_path):
    """8 callers through the edge: 4 calls on each worker, each caller hears only its own tone. Worker 1
    is killed mid-call: its 4 calls go silent, the other 4 keep their audio; the supervisor restarts it
    and, worker 2 being full (486), the next 4 calls all land on it (the edge's failover)."""
    web_port, api_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    dep = Deployment(tmp_path, 2, tail=f'[web]\nlisten = "127.0.0.1:{web_port}"\n[store]\n'
                                       f'api = "127.0.0.1:{api_port}"\n[retention]\ndays = 30\n')
    try:
        # the panel and the store's API, served once by the supervisor: both workers came up (each would
        # have bound the same two ports before), and they answer
        assert httpx.get(f"http://127.0.0.1:{web_port}/login", timeout=10).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{api_port}/api/campaigns", timeout=10).json() == {"campaigns": []}
        assert any("the web panel on" in line for line in dep.err.lines)
        with PjsuaPeer(user="a", log_dir=tmp_path) as a, PjsuaPeer(user="b", log_dir=tmp_path) as b:
            peers = [a] * 4 + [b] * 4
            calls = [(peer, peer.call(dep.uri), f) for peer, f in zip(peers, TONES)]
            for peer, cid, f in calls:
                peer.expect("media", call_id=cid, timeout=20)
                peer.send("play", path=str(_tone_wav(tmp_path / f"tone-{f}.wav", f)), call_id=cid)
                peer.send("record", path=str(tmp_path / f"heard-{f}.wav"), call_id=cid)
            assert eventually(lambda: (dep.active(1), dep.active(2)) == (4, 4), 10, "4 calls on each worker")
            heard = {f: tmp_path / f"heard-{f}.wav" for f in TONES}
            eventually(lambda: all(len(_samples(p)) > 2.5 * RATE for p in heard.values()), 20, "2.5 s of every call")
            before = {f: _hears(_samples(heard[f])[RATE // 2:], f) for f in TONES}
            assert before == {f: "own" for f in TONES}, before

            # worker 1 dies: only its calls lose their audio
            os.kill(dep.pid(1), signal.SIGKILL)
            dep.err.wait_line("callbot: worker 1 (pid", 10)
            mark = {f: len(_samples(p)) + RATE // 2 for f, p in heard.items()}  # from half a second after the kill
            eventually(lambda: all(len(_samples(p)) > mark[f] + 2 * RATE for f, p in heard.items()), 20,
                       "2 s more of every call")
            after = {f: _hears(_samples(heard[f])[mark[f]:], f) for f in TONES}
            assert sorted(after.values()) == ["own"] * 4 + ["silence"] * 4, after
            assert dep.active(2) == 4

            # back: the silent calls are hung up by their callers, and 4 new ones reach worker 1 only
            dep.err.wait_line("callbot: worker 1 is back", 20)
            assert _dispatcher_states(dep.run_dir)[f"sip:{LOCALHOST}:{dep.sip_port}"] == "AP"
            dead = [(peer, cid, f) for peer, cid, f in calls if after[f] == "silence"]
            for peer, cid, f in dead:
                peer.send("hangup", call_id=cid)
                peer.expect("disconnected", call_id=cid, timeout=10)
            again = [(peer, peer.call(dep.uri), f) for peer, _, f in dead]
            for peer, cid, f in again:
                peer.expect("media", call_id=cid, timeout=20)
                peer.send("play", path=str(tmp_path / f"tone-{f}.wav"), call_id=cid)
                peer.send("record", path=str(tmp_path / f"again-{f}.wav"), call_id=cid)
            assert eventually(lambda: (dep.active(1), dep.active(2)) == (4, 4), 10, "4 new calls on worker 1")
            eventually(lambda: all(len(_samples(tmp_path / f"again-{f}.wav")) > 1.5 * RATE for _, _, f in again), 20,
                       "1.5 s of the new calls")
            assert {f: _hears(_samples(tmp_path / f"again-{f}.wav")[RATE // 2:], f) for _, _, f in again} == {
                f: "own" for _, _, f in again}
            for peer, cid, f in again:  # the BYE finds the worker that took the call, after a failover too
                peer.send("hangup", call_id=cid)
                assert peer.expect("disconnected", call_id=cid, timeout=10)["code"] == 200
        assert dep.close() == 0
        assert _kamailio_gone(dep.run_dir)
    finally:
        dep.close(signal.SIGKILL)
    log = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines() if line.startswith("{")]
    assert len([e for e in log if e["event"] == "IncomingCall"]) == 12  # every call reached a worker once
    ended = {e["call_id"]: e["cause"] for e in log if e["event"] == "CallEnded"}
    assert all(ended.get(cid) == "remote" for _, cid, _ in again), ended  # each caller's BYE reached its call
    # round robin sent some of the 4 to the full worker: its 486 went on to the restarted one (2 measured)
    refused = [e for e in log if e["event"] == "CallRejected"]
    assert refused and all(e["code"] == 486 and e["by"] == "pjsip" for e in refused), refused


def test_sigterm_drains_a_running_call_finishes_a_new_one_gets_503(tmp_path):
    """SIGTERM: the edge answers a new INVITE 503 at once while two calls go on; the caller who hangs up
    ends its call normally, the other is hung up by its worker when drain_s is over; everything stops."""
    dep = Deployment(tmp_path, 1, drain_s=6)
    try:
        with PjsuaPeer(user="a", log_dir=tmp_path) as a:
            first, second = a.call(dep.uri), a.call(dep.uri)
            for cid, f in ((first, TONES[0]), (second, TONES[1])):
                a.expect("media", call_id=cid, timeout=20)
                a.send("play", path=str(_tone_wav(tmp_path / f"tone-{f}.wav", f)), call_id=cid)
            dep.proc.send_signal(signal.SIGTERM)
            dep.err.wait_line("callbot: draining: new calls get 503; 2 in progress", 10)
            with RawUac(dep.edge_port) as uac:
                refused = uac.invite("drained-1", user="echo")
            assert refused["status"] == "SIP/2.0 503 Shutting Down", refused["text"]
            assert f"Retry-After: {edge.DRAIN_RETRY_AFTER_S}" in refused["text"]
            heard = tmp_path / "heard.wav"
            a.send("record", path=str(heard), call_id=first)
            eventually(lambda: len(_samples(heard)) > 1.5 * RATE, 10, "1.5 s of the first call while draining")
            assert _hears(_samples(heard)[RATE // 2:], TONES[0]) == "own"
            a.send("hangup", call_id=first)
            assert a.expect("disconnected", call_id=first, timeout=10)["code"] == 200
            assert not a.all("disconnected", call_id=second)  # still up: the drain waits for it
            ended = a.expect("disconnected", call_id=second, timeout=20)  # the deadline: its worker hangs up
            assert ended["code"] == 200, ended
        assert dep.proc.wait(30) == 0
        dep.err.wait_line("1 calls still in progress after 6 s: they are hung up", 5)
        assert _kamailio_gone(dep.run_dir)
    finally:
        dep.close(signal.SIGKILL)


class Serve:
    """A plain `callbot serve --engine echo` on 127.0.0.1:`port`, its events in a file."""

    def __init__(self, directory: pathlib.Path, port: int):
        directory.mkdir()
        cfg = serve_config(directory, port, tail='[recognizer]\nengine = "none"\n')
        self.events_path = directory / "events.jsonl"
        self.events = open(self.events_path, "w")
        self.proc = subprocess.Popen([*CALLBOT, "serve", "--engine", "echo", "--config", str(cfg)], stdout=self.events,
                                     stderr=subprocess.PIPE, text=True)
        self.err = _Lines(self.proc.stderr, directory / "serve.log")

    def incoming(self) -> int:
        return sum('"event":"IncomingCall"' in line for line in self.events_path.read_text().splitlines())

    def close(self) -> int:
        code = stop_process(self.proc, 20)
        self.events.close()
        return code


def _front_edge(tmp_path: pathlib.Path, port: int, node_ports: list[int], extra: str = "") -> tuple[subprocess.Popen, _Lines]:
    """`callbot edge` on 127.0.0.1:`port` with [edge] nodes on `node_ports`, started; it and its stderr."""
    nodes = ", ".join(f'"127.0.0.1:{p}"' for p in node_ports)
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[edge]\naddress = "127.0.0.1"\nport = {port}\nrun_dir = "edge"\n{extra}'
                   f'trusted_sources = ["127.0.0.0/8"]\nnodes = [{nodes}]\n')
    proc = subprocess.Popen([*CALLBOT, "edge", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
    err = _Lines(proc.stderr, tmp_path / "edge.log")
    try:
        err.wait_line("edge: kamailio on", 30)
    except BaseException:
        stop_process(proc, 10, signal.SIGKILL)
        raise
    return proc, err


def test_callbot_edge_with_nodes_spreads_calls_and_skips_a_node_that_is_down(tmp_path):
    """`callbot edge` whose [edge] nodes are two serve processes on different ports: 4 calls go 2 and 2;
    one serve stopped is taken out after its pings go unanswered, and the next calls all reach the other;
    started again, it is back once it answers. SIGTERM drains the edge as it does the supervisor's."""
    port_a, port_b, edge_port = free_port(), free_port(), free_port()
    nodes = [Serve(tmp_path / "a", port_a), Serve(tmp_path / "b", port_b)]
    kamailio = None
    try:
        for node in nodes:
            node.err.wait_line("listening", 60)
        kamailio, kamailio_err = _front_edge(tmp_path, edge_port, [port_a, port_b])
        uri = f"sip:echo@{LOCALHOST}:{edge_port}"
        with PjsuaPeer(user="a", log_dir=tmp_path) as a:
            ids = [a.call(uri) for _ in range(4)]
            for cid in ids:
                a.expect("media", call_id=cid, timeout=20)
            assert (nodes[0].incoming(), nodes[1].incoming()) == (2, 2)
            for cid in ids:
                a.send("hangup", call_id=cid)
                a.expect("disconnected", call_id=cid, timeout=10)

            assert nodes[1].close() == 0
            # two pings unanswered, each after kamailio's 5 s transaction timeout
            eventually(lambda: _dispatcher_states(tmp_path / "edge")[f"sip:{LOCALHOST}:{port_b}"] == "IP", 20,
                       "the stopped node taken out")
            ids = [a.call(uri) for _ in range(2)]
            for cid in ids:
                a.expect("media", call_id=cid, timeout=20)
            assert (nodes[0].incoming(), nodes[1].incoming()) == (4, 2)

            nodes[1] = Serve(tmp_path / "b-again", port_b)  # answers its pings again: back in
            eventually(lambda: _dispatcher_states(tmp_path / "edge")[f"sip:{LOCALHOST}:{port_b}"] == "AP", 20,
                       "the node back once it answers")

            # `callbot edge` drains too: SIGTERM, a new INVITE refused, the call in progress ended by its caller
            for cid in ids:
                a.send("hangup", call_id=cid)
                a.expect("disconnected", call_id=cid, timeout=10)
            cid = a.call(uri)
            a.expect("media", call_id=cid, timeout=20)
            kamailio.send_signal(signal.SIGTERM)
            kamailio_err.wait_line("callbot: draining: new calls get 503; 1 in progress", 10)
            with RawUac(edge_port) as uac:
                assert uac.invite("drained-at-the-front", user="echo")["status"] == "SIP/2.0 503 Shutting Down"
            a.send("hangup", call_id=cid)
            assert a.expect("disconnected", call_id=cid, timeout=10)["code"] == 200
        assert kamailio.wait(20) == 0
        kamailio_err.wait_line("callbot: drained: stopping", 5)
    finally:
        if kamailio is not None:
            stop_process(kamailio, 10, signal.SIGKILL)
        for node in nodes:
            node.close()


def test_a_call_whose_node_died_is_hung_up_by_the_edge_when_it_stops(tmp_path):
    """A node killed mid-call (SIGKILL: no BYE) leaves its caller's call at `callbot edge`. Stopped
    (SIGTERM, drain_s 1 s), the edge ends that call itself with a BYE before kamailio goes: the caller is
    hung up then, not left in silence (the dialog keep-alive, 30 s or more, dies with kamailio)."""
    port, edge_port = free_port(), free_port()
    node = Serve(tmp_path / "a", port)
    kamailio = None
    try:
        node.err.wait_line("listening", 60)
        kamailio, kamailio_err = _front_edge(tmp_path, edge_port, [port], "drain_s = 1\n")
        with PjsuaPeer(user="a", log_dir=tmp_path) as a:
            cid = a.call(f"sip:echo@{LOCALHOST}:{edge_port}")
            a.expect("media", call_id=cid, timeout=20)
            node.proc.kill()
            node.proc.wait(10)
            kamailio.send_signal(signal.SIGTERM)
            kamailio_err.wait_line("callbot: 1 calls still in progress after 1 s", 15)
            assert a.expect("disconnected", call_id=cid, timeout=15)["code"] == 200  # the edge's BYE
        kamailio_err.wait_line("callbot: 1 calls left at the edge after their server stopped: hung up by the edge", 5)
        assert kamailio.wait(20) == 0
        assert _kamailio_gone(tmp_path / "edge")
    finally:
        if kamailio is not None:
            stop_process(kamailio, 10, signal.SIGKILL)
        node.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_assets import write_tiny_model_for_serve

    return write_tiny_model_for_serve(tmp_path_factory.mktemp("personaplex"))


def test_the_model_engine_gets_one_model_service_for_all_workers(tmp_path, tiny_model):
    """`--engine model`: the supervisor starts `callbot model-service` (the tiny model, on a socket in its
    own folder) before the workers, both workers attach to it, and a call through the edge hears it. The
    supervisor killed (SIGKILL: no drain, no stop in order), its children go with it."""
    model_dir, arch = tiny_model
    dep = Deployment(tmp_path, 2, engine="model", metrics=False, tail=f'[model]\npath = "{model_dir}"\narchitecture = "{arch}"\n'
                     'quantization = "none"\ndownload = false\n[[bots]]\npersona = "You answer the phone."\n')
    try:
        listening = dep.err.wait_line("model service: model service listening on /tmp/callbot-", 5)
        folder = pathlib.Path(listening.split(" on ", 1)[1].split()[0]).parent  # the supervisor's
        eventually(lambda: sum("model service: worker" in line and "connected" in line for line in dep.err.lines) == 2,
                   20, "both workers attached to the service")
        with PjsuaPeer(user="a", log_dir=tmp_path) as a:
            cid = a.call(dep.uri)
            a.expect("media", call_id=cid, timeout=20)
            heard = tmp_path / "heard.wav"
            a.send("record", path=str(heard), call_id=cid)
            eventually(lambda: len(_samples(heard)) > RATE, 20, "1 s of the call")
            assert np.abs(_samples(heard)).max() > 0, "the model was never heard"
            a.send("hangup", call_id=cid)
            assert a.expect("disconnected", call_id=cid, timeout=10)["code"] == 200
        children = [int(dep.err.wait_line("model service: pid ", 5).split()[-1]), dep.pid(1), dep.pid(2)]
        dep.proc.kill()
        dep.proc.wait(10)
        eventually(lambda: all(_gone(pid) for pid in children) and _kamailio_gone(dep.run_dir), 15,
                   "the service, the workers and kamailio gone with the supervisor")
        eventually(lambda: not (folder / "model.sock").exists(), 5, "the service's socket removed as it stopped")
        folder.rmdir()  # the supervisor, killed, could not
    finally:
        dep.close(signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
