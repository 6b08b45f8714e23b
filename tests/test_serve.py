"""`callbot serve` and `callbot call` as users run them: subprocesses, a config file, real peers."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
import wave

import pytest
from tests.sip_peers import MEDIA_PEER, PjsuaPeer, _Lines, free_port, serve_config, stop_process, sidecars

pytestmark = pytest.mark.timeout(120)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]


def _config(tmp_path: pathlib.Path, sip_port: int, metrics_port: int, extra: str = "",
            account: str = "line") -> pathlib.Path:
    return serve_config(tmp_path, sip_port, metrics_port, account=account, extra=extra)


def _model_toml(model_dir, arch, persona: str = "You answer the phone.", bot: str = "") -> str:
    """[model] for the tiny model (its architecture file) and one bot with a persona that fits its context."""
    return f"""
[model]
path = "{model_dir}"
architecture = "{arch}"
quantization = "none"
download = false
[[bots]]
persona = "{persona}"
{bot}
"""


def _serve(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`callbot serve ARGS` with its stderr read on a thread (a full pipe must never block the server)."""
    proc = subprocess.Popen([*CALLBOT, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    proc.err_lines = _Lines(proc.stderr, None)
    return proc


def _wait_line(proc: subprocess.Popen, needle: str, timeout: float = 30.0) -> str:
    """The first stderr line holding `needle`, within `timeout` (a condition, not a duration)."""
    return proc.err_lines.wait_line(needle, timeout)


def _eventually(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Polls `condition()` until true; fails after `timeout` (a bound on waiting, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met within {timeout} s"
        time.sleep(0.05)


def _recorded(directory: pathlib.Path, min_bytes: int) -> bool:
    """A call's WAV in `directory` has synced more than `min_bytes` to disk (it syncs every second)."""
    return any(w.stat().st_size > min_bytes for w in directory.glob("*.wav"))


def _metric(port: int, name: str) -> float | None:
    """The sample's value, None while it is not exported (a labelled series appears on first use)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None


def test_serve_echo_answers_records_and_counts(tmp_path):
    sip_port, metrics_port = free_port(), free_port()
    cfg = _config(tmp_path, sip_port, metrics_port)
    proc = _serve("--engine", "echo", "--config", str(cfg))
    try:
        line = _wait_line(proc, "listening")
        assert f"sip:echo@127.0.0.1:{sip_port}" in line
        with PjsuaPeer(user="alice", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("media", call_id=call_id, timeout=15)
            _eventually(lambda: _metric(metrics_port, "callbot_calls_active") == 1, what="call counted as active")
            _eventually(lambda: _recorded(tmp_path / "calls", 44), what="audio recorded")
            peer.send("hangup", call_id=call_id)
            peer.expect("disconnected", call_id=call_id, timeout=15)
        assert stop_process(proc, timeout=30, sig=signal.SIGTERM) == 0
        log = [json.loads(l) for l in proc.stdout.read().splitlines()]
    finally:
        stop_process(proc, timeout=10, sig=signal.SIGKILL)
    ended = [e for e in log if e["event"] == "CallEnded" and e["call_id"] == call_id]
    assert ended and ended[0]["cause"] == "remote"
    [sidecar] = [json.loads(p.read_text()) for p in sidecars(tmp_path / "calls")]
    assert sidecar["call_id"] == call_id and sidecar["recording"]["complete"] is True
    assert (tmp_path / "calls" / sidecar["recording"]["wav"]).stat().st_size > 44


def test_call_command_exit_status_says_how_the_call_ended(tmp_path):
    cfg = _config(tmp_path, free_port(), free_port(), extra="")
    with PjsuaPeer(user="bob", answer="busy", log_dir=tmp_path) as busy_peer:
        out = subprocess.run([*CALLBOT, "call", busy_peer.uri, "--engine", "echo", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert "486" in out.stderr and "Traceback" not in out.stderr
    with PjsuaPeer(user="carol", answer="auto", log_dir=tmp_path) as peer:
        proc = subprocess.Popen([*CALLBOT, "call", peer.uri, "--engine", "echo", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            call_id = peer.expect("incoming", timeout=20)["call_id"]
            peer.expect("media", call_id=call_id, timeout=15)
            peer.send("hangup", call_id=call_id)
            assert proc.wait(30) == 0
        finally:
            stop_process(proc, timeout=10, sig=signal.SIGKILL)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[model]\nwat = 1\n", "$.model: Object contains unknown field `wat`"),
        ("recordings_dir = 5\n", "$.recordings_dir: Expected `str`, got `int`"),
        ("[[bots]]\nvoice = 'NATF9'\n", '$.bots[0].voice: unknown voice "NATF9"'),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, toml, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    out = subprocess.run([*CALLBOT, "serve", "--engine", "echo", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"callbot: error: {cfg}: {message}")
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """The tiny model in the HF file layout plus the architecture file that tells serve its size."""
    from tests.tiny_assets import write_tiny_model_for_serve

    return write_tiny_model_for_serve(tmp_path_factory.mktemp("personaplex"))


def test_serve_model_answers_with_the_tiny_model(tmp_path, tiny_model):
    """A caller plays 3 s into the model's line: RTP comes back every 20 ms for the whole call, the
    recording and the sidecar (with the model's text pieces) are written, metrics count the steps."""
    import numpy as np

    model_dir, arch = tiny_model
    sip_port, metrics_port = free_port(), free_port()
    cfg = _config(tmp_path, sip_port, metrics_port)
    cfg.write_text(cfg.read_text() + _model_toml(model_dir, arch, "You take orders for a pizza shop.",
                                                 bot='name = "pizza"\nvoice = "NATM1"\naccount = "line"'))
    rate, seconds = 16000, 3.0
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(tmp_path / "caller.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((4000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes())
    proc = _serve("--config", str(cfg))
    try:
        _wait_line(proc, "listening", timeout=90)
        with open(tmp_path / "peer.log", "w") as log:
            peer = subprocess.Popen(
                [sys.executable, str(MEDIA_PEER), "--uri", f"sip:echo@127.0.0.1:{sip_port}", "--codec", "G722",
                 "--play", str(tmp_path / "caller.wav"), "--record", str(tmp_path / "heard.wav"),
                 "--seconds", str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            try:
                events = [json.loads(line) for line in peer.stdout]  # ends with "done": bounded by --seconds
            finally:
                stop_process(peer, 10)
        _eventually(lambda: _metric(metrics_port, "callbot_step_seconds_count"), what="steps counted")
        steps = _metric(metrics_port, "callbot_step_seconds_count")
        jitter_buffers = _metric(metrics_port, "callbot_jitter_buffer_delay_seconds_count")
        assert stop_process(proc, timeout=30, sig=signal.SIGTERM) == 0
    finally:
        stop_process(proc, timeout=10, sig=signal.SIGKILL)
    assert events[-1]["ev"] == "done", events
    # RTP from the bot every 20 ms for the whole call: at least 90% of 3 s / 20 ms = 135 packets
    rx = max(e["rx_packets"] for e in events if e["ev"] == "jitter_buffer")
    assert rx >= 0.9 * seconds * 50, events
    with wave.open(str(tmp_path / "heard.wav")) as w:
        heard = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert np.abs(heard).max() > 0, "the model's audio never reached the caller"
    assert steps and steps >= 1
    [sidecar] = [json.loads(p.read_text()) for p in sidecars(tmp_path / "calls")]
    assert sidecar["recording"]["complete"] is True
    engine = sidecar["engine"]
    assert engine["steps"] >= 1 and len(engine["step_s"]) == engine["steps"]
    assert all(isinstance(t["piece"], str) for t in engine["text"])
    # every stage of the audio path, per frame: ours from the engine, the network half from pjmedia
    assert set(engine["stages_ms"]) >= {"ring_in->resampled", "resampled->released", "released->step_start",
                                        "step_start->encoded", "encoded->lm_stepped", "lm_stepped->decoded", "decoded->ring_out",
                                        "ring_out->rtp_out"}, engine["stages_ms"]
    stream = sidecar["stream"]
    assert stream["rx_packets"] >= 0.9 * seconds * 50 and stream["tx_packets"] >= 0.9 * seconds * 50, stream
    jb = stream["jitter_buffer_ms"]
    assert 0 <= jb["min"] <= jb["avg"] <= jb["max"], stream
    assert jitter_buffers == 1


def test_missing_weights_exit_2_and_say_what_is_missing(tmp_path):
    cfg = tmp_path / "callbot.toml"
    cfg.write_text(f'[model]\npath = "{tmp_path / "weights"}"\ndownload = false\n[metrics]\nenabled = false\n')
    out = subprocess.run([*CALLBOT, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("callbot: error: model weights: ") and "model.safetensors" in line


def test_serve_echo_registered_through_kamailio(tmp_path):
    from tests.sip_peers import Kamailio

    kamailio = Kamailio({"echo": "echopw", "erin": "erinpw"}, tmp_path)
    try:
        sip_port, metrics_port = free_port(), free_port()
        cfg = _config(tmp_path, sip_port, metrics_port, account="pbx",
                      extra=f'registrar = "{kamailio.uri}"\npassword_env = "CALLBOT_TEST_ECHO_PASSWORD"')
        env = {**os.environ, "CALLBOT_TEST_ECHO_PASSWORD": "echopw"}
        proc = _serve("--engine", "echo", "--config", str(cfg), env=env)
        try:
            _wait_line(proc, "listening")
            _eventually(lambda: _metric(metrics_port, 'callbot_registration_state{account="pbx"}') == 1,
                        what="registered at kamailio")
            with PjsuaPeer(user="erin", registrar=kamailio.uri, password="erinpw", log_dir=tmp_path) as erin:
                erin.expect("reg", code=200)
                call_id = erin.call(f"sip:echo@127.0.0.1:{kamailio.port}")  # via the registrar
                erin.expect("media", call_id=call_id, timeout=15)
                erin.send("hangup", call_id=call_id)
                erin.expect("disconnected", call_id=call_id, timeout=15)
            assert stop_process(proc, timeout=30, sig=signal.SIGTERM) == 0
            log = [json.loads(line) for line in proc.stdout.read().splitlines()]
        finally:
            stop_process(proc, timeout=10, sig=signal.SIGKILL)
    finally:
        kamailio.close()
    assert any(e["event"] == "RegistrationChanged" and e["registered"] for e in log)
    assert any(e["event"] == "CallEnded" and e["call_id"] == call_id for e in log)
    # shutdown unregistered the account
    assert [e for e in log if e["event"] == "RegistrationChanged"][-1]["registered"] is False


def test_call_command_to_baresip_auto_answer(tmp_path):
    from tests.sip_peers import Baresip

    cfg = _config(tmp_path, free_port(), free_port())
    cfg.write_text(cfg.read_text() + "[[bots]]\nname = 'short'\naccount = 'line'\nmax_call_s = 2\n")
    with Baresip(tmp_path / "baresip", user="frank") as peer:
        out = subprocess.run([*CALLBOT, "call", peer.uri, "--bot", "short", "--engine", "echo", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        peer.output.wait_line("Call established", 10)
    assert out.returncode == 0, out.stderr
    assert "180" in out.stderr or "200" in out.stderr
    assert "call ended: max_duration" in out.stderr


def test_model_server_survives_silent_callers_and_hangups_mid_call(tmp_path, tiny_model):
    """A caller that never sends RTP (SIPp's UAC), then callers hanging up while steps run; the server
    keeps answering, and each call leaves its record."""
    from tests.sip_peers import Sipp

    model_dir, arch = tiny_model
    sip_port, metrics_port = free_port(), free_port()
    cfg = _config(tmp_path, sip_port, metrics_port)
    cfg.write_text(cfg.read_text() + _model_toml(model_dir, arch))
    proc = _serve("--config", str(cfg))
    try:
        _wait_line(proc, "listening", timeout=90)
        with Sipp("uac", tmp_path / "sipp", target=f"127.0.0.1:{sip_port}", service="echo", calls=1,
                  call_ms=2500) as silent:
            assert silent.wait(60) == 0  # answered, held 2.5 s without RTP, hung up cleanly
        with PjsuaPeer(user="gina", log_dir=tmp_path) as peer:
            for _ in range(2):
                call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
                peer.expect("media", call_id=call_id, timeout=15)
                peer.send("hangup", call_id=call_id)
                peer.expect("disconnected", call_id=call_id, timeout=15)
        assert proc.poll() is None, "the server died"
        _eventually(lambda: (_metric(metrics_port, 'callbot_calls_total{cause="remote",direction="inbound"}') or 0) >= 3,
                    what="three ended calls counted")
        assert stop_process(proc, timeout=30, sig=signal.SIGTERM) == 0
    finally:
        stop_process(proc, timeout=10, sig=signal.SIGKILL)
    records = [json.loads(p.read_text()) for p in sidecars(tmp_path / "calls")]
    assert len(records) == 3 and all(s["recording"]["complete"] for s in records)
