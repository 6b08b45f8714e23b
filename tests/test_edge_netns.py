"""The edge with a caller on another host: a network namespace joined to this one by a veth pair.

Why: on loopback alone, every address is local to everyone, so a serve whose RTP stayed on 127.0.0.1
behind the edge, or an edge that relayed nothing and let serve send straight to the callee, would pass.
Here the peer (baresip, an independent user agent) sits in its own namespace at 10.213.x.2 and reaches
only the edge's public side, 10.213.x.1: a call in or out has audio only when serve's RTP faces that side
(`edge.serve_settings`) and its signalling goes through kamailio (`callbot call --edge` cannot reach the
callee from loopback).

`ip netns` needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): CI runs as root; elsewhere these tests skip
and say why. Each test makes its own namespace and veth pair, named after the test process, and removes
them.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import wave

import numpy as np
import pytest

from tests.sip_peers import BARESIP_MODULES, _Lines, eventually, free_port, serve_config, stop_process
from tests.test_edge import CALLBOT, KAMAILIO, _log_events, _serve_edge

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="network namespaces are Linux's"),
              pytest.mark.skipif(KAMAILIO is None, reason="kamailio is not installed (Debian: kamailio)"),
              pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip is not installed (Debian: baresip)"),
              pytest.mark.skipif(shutil.which("ip") is None, reason="`ip` is not installed (Debian: iproute2)")]
TONE_HZ = 440  # what baresip sends (ausine): the echo line sends it back


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


class Netns:
    """A namespace `name` whose only way out is a veth pair: `peer` inside, `host` on this side."""

    def __init__(self) -> None:
        n = os.getpid()
        self.name, self.host_if, self.peer_if = f"callbot-edge-{n}", f"cbe{n % 100000}h", f"cbe{n % 100000}n"
        net = f"10.213.{(n >> 6) % 256}.{(n % 64) * 4}"
        base = net.rsplit(".", 1)[0] + "."
        last = int(net.rsplit(".", 1)[1])
        self.host, self.peer = base + str(last + 1), base + str(last + 2)
        made = _ip("netns", "add", self.name)
        if made.returncode != 0:
            pytest.skip(f"`ip netns add` is not permitted here (needs root): {made.stderr.strip()}")
        steps = [("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if),
                 ("link", "set", self.peer_if, "netns", self.name),
                 ("addr", "add", f"{self.host}/30", "dev", self.host_if),
                 ("link", "set", self.host_if, "up"),
                 ("-n", self.name, "addr", "add", f"{self.peer}/30", "dev", self.peer_if),
                 ("-n", self.name, "link", "set", self.peer_if, "up"),
                 ("-n", self.name, "link", "set", "lo", "up"),
                 ("-n", self.name, "route", "add", "default", "via", self.host)]
        for step in steps:
            out = _ip(*step)
            if out.returncode != 0:
                self.close()
                raise RuntimeError(f"ip {' '.join(step)}: {out.stderr.strip()}")

    def run(self, *args: str) -> list[str]:
        """A command line that runs `args` inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def close(self) -> None:
        _ip("link", "del", self.host_if)  # both ends of the pair
        _ip("netns", "del", self.name)


@pytest.fixture
def netns():
    ns = Netns()
    try:
        yield ns
    finally:
        ns.close()


class Peer:
    """baresip inside the namespace: auto-answers, sends a 440 Hz tone (ausine), and its sndfile module
    writes what it decoded from the call to dump-*-dec.wav (baresip 1.0's aufile has no player; aubridge
    is one that plays into nothing, so that the decoding runs); with `dial` it calls that URI at start."""

    def __init__(self, ns: Netns, workdir: pathlib.Path, *, dial: str | None = None):
        self.port = free_port()  # a port free here is free in the fresh namespace too
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        (workdir / "config").write_text(
            f"poll_method epoll\nsip_listen {ns.peer}:{self.port}\nnet_interface {ns.peer_if}\n"
            f"audio_player aubridge,sink\naudio_source ausine,{TONE_HZ}\naudio_alert aufile,/dev/null\n"
            f"snd_path {workdir}\n"
            "ausrc_srate 48000\nauplay_srate 48000\nausrc_channels 2\nauplay_channels 2\n"
            f"rtp_ports 20000-20100\nmodule_path {BARESIP_MODULES}\n"
            "module g711.so\nmodule g722.so\nmodule ausine.so\nmodule aufile.so\nmodule aubridge.so\nmodule sndfile.so\n"
            "module_app account.so\nmodule_app menu.so\n")
        (workdir / "accounts").write_text(f"<sip:peer@{ns.peer}:{self.port}>;regint=0;answermode=auto\n")
        self.uri = f"sip:peer@{ns.peer}:{self.port}"
        args = ns.run("baresip", "-f", str(workdir), "-t", "60")
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

    def heard_tone(self) -> tuple[float, float]:
        """(the strongest frequency in what it heard, Hz; its RMS level, of full scale)."""
        [heard] = self.workdir.glob("dump-*-dec.wav")  # one call
        with wave.open(str(heard)) as w:
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64) / 32768
            pcm = pcm.reshape(-1, w.getnchannels())[:, 0]
        spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
        return float(np.fft.rfftfreq(len(pcm), 1 / rate)[spectrum.argmax()]), float(np.sqrt(np.mean(pcm ** 2)))


ADDRESS_MODES = ["the public address", "every address"]


def _edge_toml(ns: Netns, mode: str, edge_port: int) -> str:
    address = ns.host if mode == "the public address" else "0.0.0.0"
    return f'[edge]\naddress = "{address}"\nport = {edge_port}\nrun_dir = "edge"\n'


@pytest.mark.parametrize("mode", ADDRESS_MODES)
def test_a_caller_on_another_host_is_answered_with_audio(netns, tmp_path, mode):
    """baresip in the namespace calls the edge's public address; the echo line answers from serve on
    loopback, its RTP on the public side: baresip hears its own tone back. serve ends the call
    (max_call_duration_s) and its BYE reaches baresip through the edge."""
    edge_port = free_port()
    cfg = serve_config(tmp_path, free_port(), extra="max_call_duration_s = 3.0", tail=_edge_toml(netns, mode, edge_port))
    proc = _serve_edge(cfg, tmp_path / "serve.log")
    peer = None
    try:
        peer = Peer(netns, tmp_path / "baresip", dial=f"sip:echo@{netns.host}:{edge_port}")
        peer.output.wait_line("Call established", 15)
        peer.output.wait_line("session closed", 15)  # serve's BYE came through the edge
        peer.close()
        assert stop_process(proc, 30) == 0
    finally:
        if peer:
            peer.close()
        stop_process(proc, 10, signal.SIGKILL)
    frequency, level = peer.heard_tone()
    assert abs(frequency - TONE_HZ) < 10 and level > 0.01, (frequency, level)
    log = _log_events(proc)
    [ended] = [e for e in log if e["event"] == "CallEnded"]
    assert ended["cause"] == "max_duration", ended
    assert not [e for e in log if e["event"] == "SourceRefused"]  # the edge's inside address is exempt


@pytest.mark.parametrize("mode", ADDRESS_MODES)
def test_a_call_out_reaches_a_callee_on_another_host_with_audio(netns, tmp_path, mode):
    """`callbot call --edge` from loopback: kamailio relays the INVITE from its public side to baresip in
    the namespace (serve could not reach it itself), baresip answers and hears its tone echoed, and
    serve's BYE (max_call_s) reaches it through the edge."""
    edge_port = free_port()
    cfg = serve_config(tmp_path, 0, tail=_edge_toml(netns, mode, edge_port) + "[[bots]]\nname = 'short'\nmax_call_s = 3\n")
    peer = Peer(netns, tmp_path / "baresip")
    try:
        out = subprocess.run([*CALLBOT, "call", "--edge", peer.uri, "--engine", "echo", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "call ended: max_duration" in out.stderr, out.stderr
        peer.output.wait_line("Call established", 5)
        peer.output.wait_line("session closed", 10)
    finally:
        peer.close()
    frequency, level = peer.heard_tone()
    assert abs(frequency - TONE_HZ) < 10 and level > 0.01, (frequency, level)
