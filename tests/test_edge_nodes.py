"""Two hops: a front `callbot edge` whose `[edge] nodes` are two "machines", each a `callbot serve --edge
--workers 2` on 127.0.0.1 (its own kamailio, two workers and its own `callbot model-service` serving the
echo line: `[model] service` in the node's config), called by real pjsua2 peers through the front.

What it shows (issue 13, point 7, "several machines"): the front spreads the calls over both nodes;
each caller hears only its own tone (the cross-talk measure of tests/test_edge_workers.py: every other
caller's tone >= 30 dB below its own); a call's BYE finds its way back through both edges; a node
stopped mid-run (SIGTERM, a short drain_s) hangs up its own calls - its callers see them end - while
the other node's calls keep their audio, and the next calls all reach the node that is left.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import tempfile

import pytest

from tests.sip_peers import LOCALHOST, PjsuaPeer, _Lines, eventually, free_port, stop_process
from tests.test_edge_workers import (CALLBOT, RATE, TONES, Deployment, _dispatcher_states, _hears, _kamailio_gone,
                                     _samples, _tone_wav)

pytestmark = [pytest.mark.timeout(240)]


class Node:
    """One machine of the deployment: `callbot serve --edge --workers 2 --engine echo` with its own model
    service (echo) on a socket in a short folder of its own."""

    def __init__(self, directory: pathlib.Path, drain_s: float = 2):
        directory.mkdir()
        self.sock_dir = tempfile.mkdtemp(prefix="cb-", dir="/tmp")  # a Unix socket's path holds ~104 bytes
        self.socket = os.path.join(self.sock_dir, "m.sock")
        self.dep = Deployment(directory, 2, drain_s=drain_s,
                              tail=f'[model]\nservice = "{self.socket}"\nheartbeat_s = 0.5\n')
        self.events = directory / "events.jsonl"

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.dep.edge_port}"

    def active(self) -> int:
        return self.dep.active(1) + self.dep.active(2)

    def incoming(self) -> set[str]:
        return {line.split('"call_id":"', 1)[1].split('"', 1)[0] for line in self.events.read_text().splitlines()
                if '"event":"IncomingCall"' in line}

    def close(self, sig: int = signal.SIGTERM) -> int:
        code = self.dep.close(sig)
        with contextlib.suppress(OSError):
            for name in os.listdir(self.sock_dir):
                os.unlink(os.path.join(self.sock_dir, name))
            os.rmdir(self.sock_dir)
        return code


def _call(peer: PjsuaPeer, uri: str, tone: int, tmp_path: pathlib.Path, tag: str) -> tuple[PjsuaPeer, str, int]:
    cid = peer.call(uri)
    peer.expect("media", call_id=cid, timeout=30)
    peer.send("play", path=str(_tone_wav(tmp_path / f"tone-{tone}.wav", tone)), call_id=cid)
    peer.send("record", path=str(tmp_path / f"{tag}-{tone}.wav"), call_id=cid)
    return peer, cid, tone


def test_a_front_edge_spreads_calls_over_two_nodes_and_a_stopped_node_loses_only_its_calls(tmp_path):
    nodes: list[Node] = []
    front = None
    try:
        nodes = [Node(tmp_path / "node1"), Node(tmp_path / "node2")]
        for node in nodes:  # each machine has its own model service, and both its workers are its clients
            node.dep.err.wait_line(f"model service: model service listening on {node.socket} (echo;", 10)
            eventually(lambda: sum("model service: callbot: model service: worker" in line and " connected" in line
                                   for line in node.dep.err.lines) == 2, 20, "both workers attached to the service")
        front_port = free_port()
        cfg = tmp_path / "front.toml"
        cfg.write_text(f'[edge]\naddress = "127.0.0.1"\nport = {front_port}\nrun_dir = "front"\n'
                       f'trusted_sources = ["127.0.0.0/8"]\ntotal_calls_per_s = 50\n'
                       f'nodes = ["{nodes[0].address}", "{nodes[1].address}"]\n')
        front = subprocess.Popen([*CALLBOT, "edge", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
        front_err = _Lines(front.stderr, tmp_path / "front.log")
        front_err.wait_line("edge: kamailio on", 30)
        uri = f"sip:echo@{LOCALHOST}:{front_port}"

        with PjsuaPeer(user="a", log_dir=tmp_path) as a, PjsuaPeer(user="b", log_dir=tmp_path) as b:
            calls = [_call(peer, uri, f, tmp_path, "heard") for peer, f in zip([a] * 4 + [b] * 4, TONES)]
            on = [node.incoming() for node in nodes]
            assert (len(on[0]), len(on[1])) == (4, 4), on  # the front's round robin: half on each machine
            assert eventually(lambda: (nodes[0].active(), nodes[1].active()) == (4, 4), 10, "4 calls on each node")
            heard = {f: tmp_path / f"heard-{f}.wav" for f in TONES}
            eventually(lambda: all(len(_samples(p)) > 2.5 * RATE for p in heard.values()), 30, "2.5 s of every call")
            before = {f: _hears(_samples(heard[f])[RATE // 2:], f) for f in TONES}
            assert before == {f: "own" for f in TONES}, before

            # node 2 stops (SIGTERM, drain_s 2 s): its calls are hung up through both edges; node 1's go on
            doomed = [(peer, cid, f) for peer, cid, f in calls if cid in on[1]]
            kept = [(peer, cid, f) for peer, cid, f in calls if cid in on[0]]
            nodes[1].dep.proc.send_signal(signal.SIGTERM)
            for peer, cid, f in doomed:
                assert peer.expect("disconnected", call_id=cid, timeout=30)["code"] == 200
            assert nodes[1].dep.proc.wait(40) == 0
            assert _kamailio_gone(nodes[1].dep.run_dir)
            assert not os.path.exists(nodes[1].socket)  # its model service stopped with it, cleanly
            mark = {f: len(_samples(heard[f])) for _, _, f in kept}
            eventually(lambda: all(len(_samples(heard[f])) > mark[f] + 2 * RATE for f in mark), 20,
                       "2 s more of node 1's calls")
            after = {f: _hears(_samples(heard[f])[mark[f]:], f) for f in mark}
            assert after == {f: "own" for f in mark}, after
            assert all(not peer.all("disconnected", call_id=cid) for peer, cid, _ in kept)

            # the next calls all reach node 1 (the front skips the machine that is gone) and hear themselves
            again = [_call(peer, uri, f, tmp_path, "again") for peer, _, f in doomed]
            assert nodes[0].incoming() >= {cid for _, cid, _ in again}
            assert eventually(lambda: nodes[0].active() == 8, 10, "node 1 full: 8 calls")
            eventually(lambda: all(len(_samples(tmp_path / f"again-{f}.wav")) > 1.5 * RATE for _, _, f in again), 30,
                       "1.5 s of the new calls")
            assert {f: _hears(_samples(tmp_path / f"again-{f}.wav")[RATE // 2:], f) for _, _, f in again} == {
                f: "own" for _, _, f in again}
            eventually(lambda: _dispatcher_states(tmp_path / "front")[f"sip:{nodes[1].address}"] == "IP", 20,
                       "the stopped node out of the front's set")
            for peer, cid, _ in kept + again:  # each BYE finds its call through the front and node 1's edge
                peer.send("hangup", call_id=cid)
                assert peer.expect("disconnected", call_id=cid, timeout=10)["code"] == 200
        eventually(lambda: nodes[0].active() == 0, 10, "node 1's calls all ended")
        assert stop_process(front, 20) == 0
        assert nodes[0].close() == 0
    finally:
        if front is not None:
            stop_process(front, 10, signal.SIGKILL)
        for node in nodes:
            node.close(signal.SIGKILL)


def _metric(port: int, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5).read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_stalled_model_service_on_one_node_sends_its_calls_to_the_other(tmp_path):
    """Node 1's model service stopped (SIGSTOP: alive, silent): its workers see the stall, hang up its call
    and answer 503, which the node's edge relays as a 503 (not tm's default 500) and the front then
    tries on node 2; SIGCONT: node 1's workers reconnect and it takes calls again."""
    nodes: list[Node] = []
    front = None
    service_pid = None
    try:
        nodes = [Node(tmp_path / "node1"), Node(tmp_path / "node2")]
        for node in nodes:
            eventually(lambda: sum("model service: callbot: model service: worker" in line and " connected" in line
                                   for line in node.dep.err.lines) == 2, 20, "both workers attached to the service")
        service_pid = int(nodes[0].dep.err.wait_line("model service: pid ", 5).split()[-1])
        front_port = free_port()
        cfg = tmp_path / "front.toml"
        cfg.write_text(f'[edge]\naddress = "127.0.0.1"\nport = {front_port}\nrun_dir = "front"\n'
                       f'trusted_sources = ["127.0.0.0/8"]\ntotal_calls_per_s = 50\n'
                       f'nodes = ["{nodes[0].address}", "{nodes[1].address}"]\n')
        front = subprocess.Popen([*CALLBOT, "edge", "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
        _Lines(front.stderr, tmp_path / "front.log").wait_line("edge: kamailio on", 30)
        uri = f"sip:echo@{LOCALHOST}:{front_port}"
        with PjsuaPeer(user="a", log_dir=tmp_path) as a:
            first = [_call(a, uri, f, tmp_path, "heard") for f in TONES[:2]]
            on_1 = [cid for _, cid, _ in first if cid in nodes[0].incoming()]
            assert len(on_1) == 1, (on_1, nodes[0].incoming(), nodes[1].incoming())

            os.kill(service_pid, signal.SIGSTOP)
            assert a.expect("disconnected", call_id=on_1[0], timeout=20)["code"] == 200  # hung up by its worker
            for w in (1, 2):
                eventually(lambda: _metric(nodes[0].dep.metrics_port + w, "callbot_model_service_up") == 0, 10,
                           f"node 1's worker {w} without its service")
            before = len(nodes[1].incoming())
            again = [_call(a, uri, f, tmp_path, "again") for f in TONES[2:4]]
            assert len(nodes[1].incoming()) == before + 2  # both on node 2: node 1's workers said 503
            assert not {cid for _, cid, _ in again} & nodes[0].incoming()
            refused = [line for line in nodes[0].events.read_text().splitlines() if '"event":"CallRejected"' in line]
            assert refused and all('"code":503' in r and "model service unavailable" in r for r in refused), refused

            os.kill(service_pid, signal.SIGCONT)
            for w in (1, 2):
                eventually(lambda: _metric(nodes[0].dep.metrics_port + w, "callbot_model_service_up") == 1, 20,
                           f"node 1's worker {w} reconnected")
            for _, cid, _ in first + again:
                if cid != on_1[0]:
                    a.send("hangup", call_id=cid)
                    a.expect("disconnected", call_id=cid, timeout=10)
            back = [_call(a, uri, f, tmp_path, "back") for f in TONES[4:6]]
            assert {cid for _, cid, _ in back} & nodes[0].incoming()  # round robin reaches node 1 again
            eventually(lambda: all(len(_samples(tmp_path / f"back-{f}.wav")) > 1.5 * RATE for _, _, f in back), 30,
                       "1.5 s of the calls after SIGCONT")
            assert {f: _hears(_samples(tmp_path / f"back-{f}.wav")[RATE // 2:], f) for _, _, f in back} == {
                f: "own" for _, _, f in back}
            for _, cid, _ in back:
                a.send("hangup", call_id=cid)
                assert a.expect("disconnected", call_id=cid, timeout=10)["code"] == 200
    finally:
        if service_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service_pid, signal.SIGCONT)
        if front is not None:
            stop_process(front, 10, signal.SIGKILL)
        for node in nodes:
            node.close(signal.SIGKILL)
