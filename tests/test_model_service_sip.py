"""One model service and two `callbot serve` workers on 127.0.0.1, called by real pjsua2 peers
(docs/capacity.md): the echo line behind the service while workers and the service are killed, then
the tiny model behind it with a deliberately slow step, where admission refuses the call that would
miss the frame (503 with Retry-After) and takes it again once a call has ended."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import wave

import numpy as np
import pytest

from tests.sip_peers import PjsuaPeer, RawUac, _Lines, eventually, free_port, serve_config, sip_header, stop_process, sidecars
from tests.test_model_service import _scrape, _service_config, _start_service, sock_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(240)

CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
RATE = 16000


def _tone_wav(path: pathlib.Path, freq: float, seconds: float) -> pathlib.Path:
    t = np.arange(int(RATE * seconds)) / RATE
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes((9000 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes())
    return path


def _heard(path: pathlib.Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64), w.getframerate()


def _dominant_hz(x: np.ndarray, rate: int) -> float:
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(np.abs(np.fft.rfft(x)))])


class Worker:
    """`callbot serve` attached to the model service at `socket_path`, its JSON log in a file."""

    def __init__(self, directory: pathlib.Path, socket_path: str, name: str, model: str = ""):
        directory.mkdir()
        self.dir = directory
        self.port, self.metrics_port = free_port(), free_port()
        cfg = serve_config(directory, self.port, self.metrics_port,
                           tail=f'[model]\nservice = "{socket_path}"\n{model}\n')
        self.log = open(directory / "events.jsonl", "w")
        self.proc = subprocess.Popen([*CALLBOT, "serve", "--config", str(cfg)], stdout=self.log,
                                     stderr=subprocess.PIPE, text=True)
        self.err = _Lines(self.proc.stderr, directory / "serve.stderr")
        self.uri = f"sip:echo@127.0.0.1:{self.port}"
        try:
            self.err.wait_line("listening", 60)
        except BaseException:
            self.close()
            raise

    def record(self, call_id: str) -> dict | None:
        for path in sidecars(self.dir / "calls"):
            try:
                record = json.loads(path.read_text())
            except ValueError:
                continue
            if record.get("call_id") == call_id and record["recording"]["complete"]:
                return record
        return None

    def close(self, sig: int = signal.SIGTERM) -> int:
        code = stop_process(self.proc, 20, sig)
        self.log.close()
        return code


def _refused(worker: Worker, call_id: str) -> bytes:
    """A raw INVITE's final answer from `worker`, as bytes."""
    with RawUac(worker.port) as uac:
        return uac.invite(call_id, user="echo")["text"].encode()


def test_a_killed_worker_costs_only_its_calls_a_killed_service_ends_them_and_503s_until_back(sock_dir, tmp_path):
    cfg = _service_config(sock_dir)
    service = _start_service(cfg, "--engine", "echo")
    path = str(sock_dir / "m.sock")
    workers: list[Worker] = []
    try:
        workers = [Worker(tmp_path / "w1", path, "w1"), Worker(tmp_path / "w2", path, "w2")]
        service.err_lines.wait_line("worker 2", 10)
        tone_a, tone_b = _tone_wav(tmp_path / "a.wav", 440, 60), _tone_wav(tmp_path / "b.wav", 1000, 60)
        with PjsuaPeer(user="alice", log_dir=tmp_path) as alice, PjsuaPeer(user="bob", log_dir=tmp_path) as bob:
            ca = alice.call(workers[0].uri)
            cb = bob.call(workers[1].uri)
            alice.expect("media", call_id=ca, timeout=15)
            bob.expect("media", call_id=cb, timeout=15)
            alice.send("play", path=str(tone_a), call_id=ca)
            bob.send("play", path=str(tone_b), call_id=cb)

            # worker 1 dies mid-call: the service closes its call and keeps the model; worker 2's call goes on
            workers[0].close(signal.SIGKILL)
            service.err_lines.wait_line("its 1 open calls closed", 15)
            heard = tmp_path / "bob-heard.wav"
            bob.send("record", path=str(heard), call_id=cb)
            bob.expect("ok", cmd="record", timeout=5)
            eventually(lambda: heard.exists() and heard.stat().st_size > 2 * RATE * 2, 15, "2 s of bob's call recorded")

            # the service dies: worker 2 hangs up its call (recorded as ever) and refuses new ones with 503
            service.send_signal(signal.SIGKILL)
            service.wait(10)
            bob.expect("disconnected", call_id=cb, timeout=15)
            workers[1].err.wait_line("lost (", 10)
        x, rate = _heard(heard)
        x = x[rate // 2:]  # past the recorder's first frames
        assert len(x) > rate and np.abs(x).max() > 2000, "bob heard nothing after worker 1 died"
        assert abs(_dominant_hz(x, rate) - 1000) < 30, "bob heard something else than his own tone echoed"
        record = eventually(lambda: workers[1].record(cb), 15, "bob's call record, complete")
        assert record["hangup_cause"] == "local"  # hung up by the worker as its service went
        answer = _refused(workers[1], "while-down")
        assert answer.startswith(b"SIP/2.0 503") and sip_header(answer, b"Retry-After") == b"5"
        assert 'callbot_admission_refused_total{reason="unavailable"} 1.0' in _scrape(workers[1].metrics_port)
        assert "callbot_model_service_up 0.0" in _scrape(workers[1].metrics_port)

        # back: worker 2 reconnects by itself and answers again
        service = _start_service(cfg, "--engine", "echo")
        eventually(lambda: "callbot_model_service_up 1.0" in _scrape(workers[1].metrics_port), 15, "reconnected")
        with PjsuaPeer(user="carol", log_dir=tmp_path) as carol:
            cc = carol.call(workers[1].uri)
            carol.expect("media", call_id=cc, timeout=15)
            carol.send("hangup", call_id=cc)
            carol.expect("disconnected", call_id=cc, timeout=15)
        assert workers[1].proc.poll() is None
    finally:
        for w in workers:
            w.close()
        stop_process(service, 10, signal.SIGKILL)


def test_a_stalled_service_ends_the_workers_calls_503s_and_serves_again_after_sigcont(sock_dir, tmp_path):
    """SIGSTOP: the service is alive to the kernel (its socket open), silent to its workers. After
    heartbeat_misses silent intervals the worker hangs up the call it served (recorded, cause local) and
    answers an INVITE 503 with Retry-After; SIGCONT: it reconnects and answers again."""
    service = _start_service(_service_config(sock_dir), "--engine", "echo")
    path = str(sock_dir / "m.sock")
    worker = None
    try:
        worker = Worker(tmp_path / "w", path, "w", model="heartbeat_s = 0.2\nheartbeat_misses = 3")
        service.err_lines.wait_line("worker 1", 10)
        with PjsuaPeer(user="alice", log_dir=tmp_path) as alice:
            ca = alice.call(worker.uri)
            alice.expect("media", call_id=ca, timeout=15)
            eventually(lambda: "callbot_model_service_up 1.0" in _scrape(worker.metrics_port), 5, "attached")
            service.send_signal(signal.SIGSTOP)
            alice.expect("disconnected", call_id=ca, timeout=15)
            line = worker.err.wait_line("lost (", 10)
            assert "stalled: not a word for" in line and "1 calls hung up" in line, line
        record = eventually(lambda: worker.record(ca), 15, "alice's call record, complete")
        assert record["hangup_cause"] == "local"
        answer = _refused(worker, "while-stalled")
        assert answer.startswith(b"SIP/2.0 503") and sip_header(answer, b"Retry-After") == b"5"
        assert "callbot_model_service_up 0.0" in _scrape(worker.metrics_port)

        service.send_signal(signal.SIGCONT)
        eventually(lambda: "callbot_model_service_up 1.0" in _scrape(worker.metrics_port), 15, "reconnected")
        with PjsuaPeer(user="bob", log_dir=tmp_path) as bob:
            cb = bob.call(worker.uri)
            bob.expect("media", call_id=cb, timeout=15)
            bob.send("hangup", call_id=cb)
            assert bob.expect("disconnected", call_id=cb, timeout=15)["code"] == 200
    finally:
        if worker is not None:
            worker.close()
        with contextlib.suppress(ProcessLookupError):
            service.send_signal(signal.SIGCONT)
        stop_process(service, 10, signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_assets import write_tiny_model_for_serve

    return write_tiny_model_for_serve(tmp_path_factory.mktemp("personaplex"))


def test_admission_refuses_the_call_a_slow_step_cannot_take_and_takes_it_once_there_is_room(sock_dir, tmp_path,
                                                                                            tiny_model):
    """The tiny model with every step 45 ms slower: one call a round fits the 72 ms budget, two do not
    (90+ ms). The first caller is answered and hears the model; the second INVITE, to the other worker,
    gets 503 with Retry-After, counted by reason on both sides; once the first call ends it is taken."""
    model_dir, arch = tiny_model
    service_metrics = free_port()
    cfg = _service_config(sock_dir, f'path = "{model_dir}"\narchitecture = "{arch}"\nquantization = "none"\n'
                          'download = false\n[[bots]]\npersona = "You answer the phone."',
                          metrics_port=service_metrics)
    service = _start_service(cfg, "--step-delay-ms", "45")
    path = str(sock_dir / "m.sock")
    workers: list[Worker] = []
    try:
        line = next(ln for ln in service.err_lines.lines if "model service listening" in ln)
        assert "up to 1 calls a round within 72 ms" in line, line
        if pathlib.Path(f"/proc/{service.pid}/maps").exists():  # the model's process, never a SIP stack's
            maps = pathlib.Path(f"/proc/{service.pid}/maps").read_text()
            assert "mlx" in maps and "pjsua2" not in maps
        workers = [Worker(tmp_path / "w1", path, "w1"), Worker(tmp_path / "w2", path, "w2")]
        with PjsuaPeer(user="first", log_dir=tmp_path) as first:
            c1 = first.call(workers[0].uri)
            first.expect("media", call_id=c1, timeout=15)
            heard = tmp_path / "first-heard.wav"
            first.send("record", path=str(heard), call_id=c1)
            eventually(lambda: "callbot_service_calls 1.0" in _scrape(service_metrics), 10, "the call in the service")

            answer = _refused(workers[1], "one-too-many")
            assert answer.startswith(b"SIP/2.0 503") and sip_header(answer, b"Retry-After") == b"10"
            assert b"would take" in answer.split(b"\r\n", 1)[0]  # the reason phrase says why
            assert 'callbot_admission_refused_total{reason="frame_budget"} 1.0' in _scrape(workers[1].metrics_port)
            text = _scrape(service_metrics)
            assert 'callbot_service_refused_total{reason="frame_budget"} 1.0' in text
            assert "callbot_service_slots_limit 1.0" in text
            assert 'callbot_service_round_seconds{batch="1"}' in text
            eventually(lambda: heard.exists() and heard.stat().st_size > RATE * 2, 15, "1 s of the model heard")
            first.send("hangup", call_id=c1)
            first.expect("disconnected", call_id=c1, timeout=15)
        x, _ = _heard(heard)
        assert np.abs(x).max() > 0, "the model's audio never reached the caller through the service"
        eventually(lambda: "callbot_service_calls 0.0" in _scrape(service_metrics), 10, "the call closed there")
        with PjsuaPeer(user="second", log_dir=tmp_path) as second:
            c2 = second.call(workers[1].uri)
            second.expect("media", call_id=c2, timeout=15)
            second.send("hangup", call_id=c2)
            second.expect("disconnected", call_id=c2, timeout=15)
        assert workers[0].record(c1)["engine"]["steps"] > 0  # the summary came back through the service
    finally:
        for w in workers:
            w.close()
        assert stop_process(service, 20) == 0
    assert not os.path.exists(path)  # a clean stop removes its socket
