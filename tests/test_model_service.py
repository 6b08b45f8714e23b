"""One model service, several workers (engine/serving/inference_service.py, service_client.py), without
SIP: the admission rules on their own, then `callbot model-service --engine echo` as a real process on a
Unix socket, with workers in this process (ServiceEngine, a media-like thread feeding each call's rings
in shared memory) and in a process of their own that is killed mid-call. The same with real SIP calls,
`callbot serve` workers and the tiny model: tests/test_model_service_sip.py."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import shared_memory

import numpy as np
import pytest

from callbot.app.metrics import Metrics, ServiceMetrics
from callbot.engine.contract import CallStart, SessionClosed
from callbot.engine.audio import PeriodicClock
from callbot.engine.serving.echo import EchoEngine
from callbot.engine.serving.inference_service import InferenceService, ServiceError, ServiceStats, listen
from callbot.engine.serving.service_client import ServiceEngine
from callbot.engine.serving.step_budget import (FRAME_BUDGET, MAX_CALLS, UNAVAILABLE, Admission, StepTimes,
                                                measure_rounds)
from tests.sip_peers import _Lines, eventually, stop_process

pytestmark = pytest.mark.timeout(120)

CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
RATE = 8000


# ---- the rules: step times and admission ------------------------------------------------------------------


def test_a_round_is_predicted_from_the_nearest_measured_batch_scaled_linearly():
    times = StepTimes()
    assert times.predict(1) is None  # nothing measured: no opinion (the echo line)
    times.observe(1, 0.010)
    times.observe(4, 0.050)
    assert times.predict(1) == 0.010 and times.predict(4) == 0.050
    assert times.predict(2) == pytest.approx(0.020)  # nearest is 1 (ties go to the larger: 2 is 1 from 1, 2 from 4)
    assert times.predict(8) == pytest.approx(0.100)  # from 4, linearly: the sequential law
    times.observe(1, 0.020)  # a running mean, not the last word
    assert 0.010 < times.predict(1) < 0.020
    with pytest.raises(ValueError):
        times.observe(0, 0.01)


def test_live_steps_of_the_open_calls_add_up_to_the_round_of_their_batch():
    times = StepTimes(weight=1.0)  # the newest step is the mean: easy numbers
    times.observe_live("a", [0.010, 0.012])
    assert times.measured == {1: pytest.approx(0.012)}
    times.observe_live("b", [0.020])
    assert times.measured[2] == pytest.approx(0.032)  # two calls stepped one after another
    times.call_ended("a")
    times.observe_live("b", [0.030])
    assert times.measured[1] == pytest.approx(0.030)


def test_admission_refuses_the_call_that_would_miss_the_frame_never_a_lone_one():
    times = StepTimes()
    times.observe(1, 0.030)
    times.observe(2, 0.060)
    admission = Admission(times)  # budget 72 ms of the 80 ms frame
    assert admission.budget_s == pytest.approx(0.072)
    assert admission.refusal(0) is None and admission.refusal(1) is None  # 2 calls: 60 ms
    assert admission.refusal(2) == FRAME_BUDGET  # 3 calls: 90 ms
    assert admission.limit() == 2
    slow = StepTimes()
    slow.observe(1, 0.200)  # too slow for even one call: still answered (the start line warns)
    assert Admission(slow).refusal(0) is None and Admission(slow).limit() == 1
    assert Admission(StepTimes()).refusal(100) is None and Admission(StepTimes()).limit() is None


def test_max_calls_replaces_the_measured_limit():
    times = StepTimes()
    times.observe(1, 0.060)
    admission = Admission(times, max_calls=3)
    assert admission.refusal(2) is None and admission.refusal(3) == MAX_CALLS and admission.limit() == 3
    with pytest.raises(ValueError):
        Admission(times, max_calls=0)


def test_warm_up_measures_rounds_of_growing_batches_until_one_misses_the_budget():
    clock = [0.0]

    def step():  # each step "takes" 25 ms on the injected clock
        clock[0] += 0.025

    times = StepTimes()
    measure_rounds(step, times, budget_s=0.072, max_batch=8, repeats=2, clock=lambda: clock[0])
    assert times.measured == {1: pytest.approx(0.025), 2: pytest.approx(0.050), 3: pytest.approx(0.075)}


# ---- the service as a process, workers on its socket -------------------------------------------------------


@pytest.fixture
def sock_dir():
    """A short folder for the socket (a Unix socket path holds 104-108 bytes; pytest's tmp paths are long)."""
    d = tempfile.mkdtemp(prefix="cb-", dir="/tmp")
    yield pathlib.Path(d)
    for f in pathlib.Path(d).iterdir():
        f.unlink()
    os.rmdir(d)


def _service_config(directory: pathlib.Path, extra: str = "", metrics_port: int | None = None) -> pathlib.Path:
    cfg = directory / "service.toml"
    metrics = f'address = "127.0.0.1:{metrics_port}"' if metrics_port else "enabled = false"
    cfg.write_text(f'[metrics]\n{metrics}\n[model]\nservice = "{directory / "m.sock"}"\n{extra}\n')
    return cfg


def _start_service(cfg: pathlib.Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*CALLBOT, "model-service", "--config", str(cfg), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    proc.err_lines = _Lines(proc.stderr, None)
    try:
        proc.err_lines.wait_line("model service listening", 60)
    except BaseException:
        stop_process(proc, 5, signal.SIGKILL)
        raise
    return proc


@pytest.fixture
def echo_service(sock_dir):
    cfg = _service_config(sock_dir)
    proc = _start_service(cfg, "--engine", "echo")
    yield proc, str(sock_dir / "m.sock")
    stop_process(proc, 10)


def _tone(freq: float, n: int, start: int = 0) -> np.ndarray:
    t = (start + np.arange(n)) / RATE
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


class MediaSide(threading.Thread):
    """pjmedia's part for one call: every 20 ms a frame of a `freq` tone into rx, one out of tx (kept)."""

    def __init__(self, audio, freq: float):
        super().__init__(daemon=True)
        self.audio, self.freq = audio, freq
        self.heard: list[np.ndarray] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n, i, clock = self.audio.frame_samples, 0, PeriodicClock(20.0)
        while not self.stop.is_set() and not self.audio.closed:
            clock.wait()
            self.audio.rx_stamps.note(n)
            self.audio.rx.write(_tone(self.freq, n, i * n))
            i += 1
            have = min(n, self.audio.tx.readable)
            out = np.zeros(n, np.int16)
            if have:
                out[:have] = self.audio.tx.read(have)
                self.audio.tx_stamps.note(have)
            self.heard.append(out)

    def heard_since(self, frame: int) -> np.ndarray:
        return np.concatenate(self.heard[frame:]) if len(self.heard) > frame else np.zeros(0, np.int16)

    def end(self) -> None:
        self.stop.set()
        self.join(5)


def _dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64)))
    return float(np.fft.rfftfreq(len(x), 1 / RATE)[np.argmax(spectrum)])


def _hears(media: MediaSide, since: int, freq: float, frames: int = 25) -> bool:
    """`frames` frames (0.5 s) heard since frame `since` carry the call's own tone, loud."""
    x = media.heard_since(since)[-frames * RATE // 50:]
    return len(x) >= frames * RATE // 50 and np.abs(x).max() > 2000 and abs(_dominant_hz(x) - freq) < 20


def _gone(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name=name).close()
    except FileNotFoundError:
        return True
    return False


def test_two_workers_on_one_echo_service_each_hear_only_their_own_call(echo_service):
    proc, path = echo_service
    events: dict[str, list] = {"a": [], "b": []}
    a = ServiceEngine(path, name="a", on_event=events["a"].append)
    b = ServiceEngine(path, name="b", on_event=events["b"].append)
    try:
        assert a.connected and b.connected and a.info.pjsua2_loaded is False and a.info.bots == ["default"]
        assert a.admit("same-call-id") is None and b.admit("same-call-id") is None
        # the same SIP Call-ID on both workers (it happens behind a B2BUA): still two calls
        sa = a.open_session(CallStart(call_id="same-call-id", rate=RATE))
        sb = b.open_session(CallStart(call_id="same-call-id", rate=RATE))
        ma, mb = MediaSide(sa.audio, 440), MediaSide(sb.audio, 1000)
        ma.start(), mb.start()
        eventually(lambda: _hears(ma, 0, 440) and _hears(mb, 0, 1000), 15, "each call's own tone echoed")
        ma.end(), mb.end()
        summary_a = a.close_session(sa)
        assert summary_a is not None and summary_a.steps > 0
        assert b.close_session(sb).steps > 0
        # each worker got its own call's SessionClosed, once, under its own Call-ID
        eventually(lambda: any(isinstance(e, SessionClosed) for e in events["b"]), 5, "b's SessionClosed")
        for mine in events.values():
            assert [e.call_id for e in mine if isinstance(e, SessionClosed)] == ["same-call-id"]
        assert _gone(sa.audio.shm_name) and _gone(sb.audio.shm_name)
    finally:
        a.close()
        b.close()


WORKER_SCRIPT = r"""
import sys, threading
sys.path.insert(0, sys.argv[2])
from callbot.engine.contract import CallStart
from callbot.engine.serving.service_client import ServiceEngine
from tests.test_model_service import MediaSide
engine = ServiceEngine(sys.argv[1], name="doomed")
assert engine.admit("doomed-call") is None
s = engine.open_session(CallStart(call_id="doomed-call", rate=8000))
MediaSide(s.audio, 700).start()
print(s.audio.shm_name, flush=True)
threading.Event().wait()
"""


def test_a_killed_worker_loses_only_its_calls_and_the_model_stays(echo_service):
    proc, path = echo_service
    mine = ServiceEngine(path, name="survivor")
    doomed = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, path, str(pathlib.Path(__file__).parents[1])],
                              stdout=subprocess.PIPE, text=True)
    try:
        block = doomed.stdout.readline().strip()
        assert block, "the doomed worker did not open its call"
        s = mine.open_session(CallStart(call_id="mine", rate=RATE))
        media = MediaSide(s.audio, 440)
        media.start()
        eventually(lambda: _hears(media, 0, 440), 15, "our call echoed")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        proc.err_lines.wait_line("its 1 open calls closed", 15)
        at_kill = len(media.heard)
        eventually(lambda: _hears(media, at_kill, 440), 15, "our call still echoed after the other worker died")
        # its resource tracker unlinks the dead worker's block; the service only ever unmapped it
        eventually(lambda: _gone(block), 15, "the dead worker's block unlinked")
        assert proc.poll() is None and mine.connected
        media.end()
        mine.close_session(s)
    finally:
        stop_process(doomed, 5, signal.SIGKILL)
        mine.close()


def test_the_service_killed_hangs_up_its_calls_refuses_with_retry_after_and_comes_back(sock_dir):
    cfg = _service_config(sock_dir)
    proc = _start_service(cfg, "--engine", "echo")
    hung_up: list[str] = []
    engine = ServiceEngine(str(sock_dir / "m.sock"), name="w", backoff_s=(0.05, 0.2))
    engine.hangup = hung_up.append
    try:
        s = engine.open_session(CallStart(call_id="c1", rate=RATE))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        eventually(lambda: hung_up == ["c1"], 10, "the lost call hung up")
        assert not engine.connected and engine.error is None  # the worker lives on
        refusal = engine.admit("c2")
        assert refusal is not None and refusal.reason == UNAVAILABLE and refusal.retry_after_s > 0
        with pytest.raises(RuntimeError, match="not connected"):
            engine.open_session(CallStart(call_id="c3", rate=RATE))
        eventually(lambda: "c3" in hung_up, 5, "a call answered meanwhile is hung up, not left silent")
        assert engine.close_session(s) is None and _gone(s.audio.shm_name)
        assert engine.refusals() == {UNAVAILABLE: 1}
        # a restart replaces the dead service's socket file, and the worker finds it by itself
        proc = _start_service(cfg, "--engine", "echo")
        eventually(lambda: engine.connected, 10, "reconnected")
        assert engine.admit("c4") is None
        s = engine.open_session(CallStart(call_id="c4", rate=RATE))
        media = MediaSide(s.audio, 440)
        media.start()
        eventually(lambda: _hears(media, 0, 440), 15, "served again")
        media.end()
        assert engine.close_session(s).steps > 0
        # a clean stop says why, and hangs up the same way
        s = engine.open_session(CallStart(call_id="c5", rate=RATE))
        assert stop_process(proc, 10) == 0
        eventually(lambda: "c5" in hung_up, 10, "calls hung up when the service stops")
        engine.close_session(s)
    finally:
        stop_process(proc, 5, signal.SIGKILL)
        engine.close()


def test_max_calls_refuses_with_retry_after_and_a_call_without_a_slot_is_hung_up(sock_dir):
    metrics_port = _free_tcp_port()
    cfg = _service_config(sock_dir, "max_calls = 1", metrics_port=metrics_port)
    proc = _start_service(cfg, "--engine", "echo")
    a, b = ServiceEngine(str(sock_dir / "m.sock"), name="a"), ServiceEngine(str(sock_dir / "m.sock"), name="b")
    hung_up: list[str] = []
    b.hangup = hung_up.append
    try:
        assert a.admit("a1") is None
        refusal = b.admit("b1")
        assert refusal.reason == MAX_CALLS and refusal.retry_after_s == 10 and "max_calls 1" in refusal.text
        sa = a.open_session(CallStart(call_id="a1", rate=RATE))  # takes its slot
        sb = b.open_session(CallStart(call_id="b-outbound", rate=RATE))  # never asked: no room, hung up
        eventually(lambda: hung_up == ["b-outbound"], 5, "the call without a slot hung up")
        b.close_session(sb)
        assert b.refusals() == {MAX_CALLS: 2}
        text = _scrape(metrics_port)
        assert 'callbot_service_refused_total{reason="max_calls"} 2.0' in text
        assert "callbot_service_slots_used 1.0" in text and "callbot_service_slots_limit 1.0" in text
        assert "callbot_service_workers 2.0" in text
        a.close_session(sa)
        assert b.admit("b2") is None  # the slot is free again
    finally:
        a.close()
        b.close()
        stop_process(proc, 10)


def test_a_promised_slot_lapses_when_its_call_never_opens(sock_dir):
    now = [100.0]
    engine = EchoEngine()
    service = InferenceService(engine, str(sock_dir / "s.sock"), bots=["x"], admission=Admission(None, max_calls=1),
                               tx_max_ms=engine.tx_policy()[0], tx_settle=engine.tx_policy()[1], reserve_s=30,
                               clock=lambda: now[0]).start()
    worker = ServiceEngine(str(sock_dir / "s.sock"))
    try:
        assert worker.admit("rang-out") is None
        assert worker.admit("next").reason == MAX_CALLS
        assert service.stats().reserved == 1
        now[0] += 31  # the first INVITE was never answered
        assert worker.admit("next") is None
        assert service.stats() == ServiceStats(workers=1, calls=0, reserved=1, limit=1, refused={MAX_CALLS: 1},
                                               round_s={})
    finally:
        worker.close()
        service.close()
        engine.close()


def test_a_released_slot_goes_back_at_once(sock_dir):
    """INVITE + CANCEL: the worker releases the slot its INVITE was given; it need not wait RESERVE_S."""
    engine = EchoEngine()
    service = InferenceService(engine, str(sock_dir / "s.sock"), bots=["x"], admission=Admission(None, max_calls=1),
                               tx_max_ms=engine.tx_policy()[0], tx_settle=engine.tx_policy()[1]).start()
    worker = ServiceEngine(str(sock_dir / "s.sock"))
    try:
        assert worker.admit("cancelled") is None
        assert worker.admit("next").reason == MAX_CALLS
        worker.release("cancelled")
        eventually(lambda: service.stats().reserved == 0, 5, "the slot back")
        assert worker.admit("next") is None
    finally:
        worker.close()
        service.close()
        engine.close()


def test_the_socket_path_is_checked_and_a_live_service_is_not_replaced(sock_dir, tmp_path):
    with pytest.raises(ServiceError, match="too long for a Unix socket"):
        listen(str(sock_dir / ("x" * 120)))
    (sock_dir / "file").write_text("")
    with pytest.raises(ServiceError, match="is not a socket"):
        listen(str(sock_dir / "file"))
    live = listen(str(sock_dir / "live.sock"))
    try:
        with pytest.raises(ServiceError, match="another model service is listening"):
            listen(str(sock_dir / "live.sock"))
        assert oct(os.stat(sock_dir / "live.sock").st_mode & 0o777) == "0o600"
    finally:
        live.close()
    # no [model] service: one line, status 2
    cfg = tmp_path / "c.toml"
    cfg.write_text("[metrics]\nenabled = false\n")
    out = subprocess.run([*CALLBOT, "model-service", "--engine", "echo", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("callbot: error: $.model.service: ") and "Traceback" not in out.stderr
    out = subprocess.run([*CALLBOT, "model-service", "--engine", "echo", "--step-delay-ms", "30", "--config",
                          str(_service_config(sock_dir))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--step-delay-ms" in out.stderr


def test_a_worker_started_before_its_service_connects_when_it_comes(sock_dir):
    engine = ServiceEngine(str(sock_dir / "m.sock"), backoff_s=(0.05, 0.2))
    proc = None
    try:
        assert not engine.connected and engine.admit("early").reason == UNAVAILABLE
        proc = _start_service(_service_config(sock_dir), "--engine", "echo")
        eventually(lambda: engine.connected, 10, "connected once the service is up")
        assert engine.admit("later") is None
    finally:
        engine.close()
        if proc is not None:
            stop_process(proc, 10)


def test_metrics_of_the_service_and_of_a_worker():
    stats = ServiceStats(workers=2, calls=3, reserved=1, limit=4, refused={FRAME_BUDGET: 5},
                         round_s={1: 0.011, 2: 0.023}, dropped={"FrameStages": 7})
    text = ServiceMetrics(lambda: stats).text()
    for line in ("callbot_service_slots_used 4.0", "callbot_service_calls 3.0", "callbot_service_slots_limit 4.0",
                 'callbot_service_refused_total{reason="frame_budget"} 5.0',
                 'callbot_service_round_seconds{batch="2"} 0.023', "callbot_service_workers 2.0",
                 'callbot_service_events_dropped_total{kind="FrameStages"} 7.0'):
        assert line in text, line

    class Client:
        connected = False

        def refusals(self):
            return {UNAVAILABLE: 2, FRAME_BUDGET: 1}

    m = Metrics()
    m.watch_admission(Client())
    text = m.text()
    assert 'callbot_admission_refused_total{reason="unavailable"} 2.0' in text
    assert "callbot_model_service_up 0.0" in text


def test_the_worker_side_never_loads_mlx():
    code = ("import sys, callbot.app.service_worker, callbot.engine.serving.service_client;"
            "print('mlx' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr  # numpy: the imports did run


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_the_config_names_the_socket_relative_to_its_file(tmp_path):
    from callbot.app.settings import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nservice = "run/m.sock"\nmax_calls = 3\n')
    s = load_settings(cfg)
    assert s.model.service == str(tmp_path / "run" / "m.sock") and s.model.max_calls == 3


def test_a_worker_whose_socket_path_cannot_be_is_told_in_one_line(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'[metrics]\nenabled = false\n[model]\nservice = "/tmp/{"x" * 120}.sock"\n')
    out = subprocess.run([*CALLBOT, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "too long for a Unix socket" in out.stderr and "Traceback" not in out.stderr


# ---- a stalled end (SIGSTOP, not dead), bounded queues and sends ---------------------------------------------


def test_liveness_counts_silent_intervals_and_restarts_after_a_stall_of_its_own():
    from callbot.engine.serving.heartbeat import Liveness

    now = [10.0]
    live = Liveness(0.5, 3, clock=lambda: now[0])  # stalled after 1.5 s without a word
    for _ in range(3):  # checked every interval: silent 0.5, 1.0, 1.5 s: not yet more than the limit
        now[0] += 0.5
        assert live.check() is None
    now[0] += 0.5
    assert live.check() == pytest.approx(2.0)
    live.heard()
    now[0] += 0.5
    assert live.check() is None and live.silent_s() == pytest.approx(0.5)
    # this process was stopped for 10 s: its first check after that cannot judge the other end
    now[0] += 10
    assert live.check() is None
    now[0] += 1.2  # nor after a gap of more than two intervals (this side was starved)
    assert live.check() is None
    now[0] += 0.5
    assert live.check() is None and live.silent_s() == pytest.approx(0.5)  # counted from the gap's end
    for _ in range(2):
        now[0] += 0.5
        assert live.check() is None
    now[0] += 0.5
    assert live.check() == pytest.approx(2.0)  # then the other end's silence counts again
    with pytest.raises(ValueError):
        Liveness(0, 3)


def test_a_full_outbox_drops_frame_stages_first_then_events_never_an_answer():
    from callbot.engine.serving.outbox import ESSENTIAL, EVENT, LOW, Outbox

    box = Outbox(limit=4)
    box.put("stages-1", LOW, "FrameStages")
    box.put("text-1", EVENT, "BotText")
    box.put("stages-2", LOW, "FrameStages")
    box.put("closed", ESSENTIAL, "CallClosed")
    box.put("text-2", EVENT, "BotText")  # full: the oldest FrameStages goes
    box.put("text-3", EVENT, "BotText")  # then the next one
    assert box.dropped == {"FrameStages": 2}
    box.put("text-4", EVENT, "BotText")  # no FrameStages left: the oldest event goes
    assert box.dropped == {"FrameStages": 2, "BotText": 1}
    box.put("stages-3", LOW, "FrameStages")  # nothing cheaper queued: the newcomer itself is dropped
    box.put("admission", ESSENTIAL, "Admission")  # an answer is never dropped: the queue holds one more
    assert box.dropped == {"FrameStages": 3, "BotText": 1} and box.dropped_total() == 4 and len(box) == 5
    box.close()
    box.put("late", ESSENTIAL)
    assert [box.get() for _ in range(6)] == ["closed", "text-2", "text-3", "text-4", "admission", None]


def test_the_inference_thread_never_waits_on_a_worker_that_stopped_reading(sock_dir):
    """A worker that reads nothing: the service's words for it pile up to the outbox's limit, then the
    cheapest are dropped and counted; putting never blocks, and the service answers the others."""
    import socket as socket_mod
    from multiprocessing.connection import Connection

    from callbot.engine.contract import FrameStages
    from callbot.engine.serving import service_messages as sm
    from callbot.engine.serving.frame_stats import STAGES
    from callbot.engine.serving.inference_service import _Call

    engine = EchoEngine()
    service = InferenceService(engine, str(sock_dir / "s.sock"), bots=["x"], tx_max_ms=engine.tx_policy()[0],
                               tx_settle=engine.tx_policy()[1], outbox_limit=50).start()
    mute = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    other = None
    try:
        mute.connect(str(sock_dir / "s.sock"))
        sm.send(Connection(os.dup(mute.fileno())), sm.Hello(pid=1, name="mute"))
        eventually(lambda: service.stats().workers == 1, 5, "the mute worker connected")
        with service._lock:
            [w] = service._workers
            service._by_key["mute/c"] = _Call(w, 1, "c", "mute/c")  # a call of its, as _open registers one
        rows = [[1] * len(STAGES)] * 50  # a fat FrameStages: the socket's buffer fills after a few hundred
        for _ in range(3000):  # as the inference thread emits them; each put returns at once
            engine.on_event(FrameStages(call_id="mute/c", t_ms=0, first_frame=0, rows=rows))
        assert len(w.outbox) <= 50 and service.stats().dropped["FrameStages"] > 0
        other = ServiceEngine(str(sock_dir / "s.sock"), name="other")
        assert other.admit("still-answered") is None
    finally:
        if other is not None:
            other.close()
        mute.close()
        service.close()
        engine.close()


STALLING_WORKER = r"""
import sys, threading
sys.path.insert(0, sys.argv[2])
from callbot.engine.contract import CallStart
from callbot.engine.serving.service_client import ServiceEngine
from tests.test_model_service import MediaSide
engine = ServiceEngine(sys.argv[1], name="sleepy", heartbeat_s=0.2, backoff_s=(0.05, 0.2))
engine.hangup = lambda call_id: print("hung up", call_id, flush=True)
assert engine.admit("sleepy-call") is None
s = engine.open_session(CallStart(call_id="sleepy-call", rate=8000))
MediaSide(s.audio, 700).start()
print("open", flush=True)
threading.Event().wait()
"""


def test_a_stalled_worker_loses_its_calls_the_others_go_on_and_it_comes_back_after_sigcont(sock_dir):
    proc = _start_service(_service_config(sock_dir, "heartbeat_misses = 3"), "--engine", "echo")
    path = str(sock_dir / "m.sock")
    mine = ServiceEngine(path, name="awake", heartbeat_s=0.2)
    sleepy = subprocess.Popen([sys.executable, "-c", STALLING_WORKER, path, str(pathlib.Path(__file__).parents[1])],
                              stdout=subprocess.PIPE, text=True)
    out = _Lines(sleepy.stdout, None)
    try:
        out.wait_line("open", 30)
        s = mine.open_session(CallStart(call_id="mine", rate=RATE))
        media = MediaSide(s.audio, 440)
        media.start()
        eventually(lambda: _hears(media, 0, 440), 15, "our call echoed")
        sleepy.send_signal(signal.SIGSTOP)  # alive, its socket open, silent
        line = proc.err_lines.wait_line("stalled (not a word for", 15)
        assert "(sleepy pid" in line and "its 1 open calls closed" in line, line
        at_stall = len(media.heard)
        eventually(lambda: _hears(media, at_stall, 440), 15, "our call still echoed after the other worker stalled")
        assert mine.connected and proc.poll() is None
        sleepy.send_signal(signal.SIGCONT)  # it finds its connection ended, hangs its call up, reconnects
        out.wait_line("hung up sleepy-call", 15)
        eventually(lambda: sum("(sleepy pid" in ln and "connected" in ln for ln in proc.err_lines.lines) == 2, 15,
                   "the resumed worker connected again")
        media.end()
        assert mine.close_session(s).steps > 0
    finally:
        stop_process(sleepy, 5, signal.SIGKILL)
        mine.close()
        stop_process(proc, 10)


def test_a_stalled_service_hangs_up_its_calls_refuses_and_is_found_again_after_sigcont(sock_dir):
    proc = _start_service(_service_config(sock_dir), "--engine", "echo")
    hung_up: list[str] = []
    engine = ServiceEngine(str(sock_dir / "m.sock"), name="w", heartbeat_s=0.2, heartbeat_misses=3,
                           backoff_s=(0.05, 0.2))
    engine.hangup = hung_up.append
    try:
        s = engine.open_session(CallStart(call_id="c1", rate=RATE))
        media = MediaSide(s.audio, 440)
        media.start()
        eventually(lambda: _hears(media, 0, 440), 15, "the call echoed")
        proc.send_signal(signal.SIGSTOP)
        eventually(lambda: hung_up == ["c1"], 10, "the stalled service's call hung up")
        assert not engine.connected
        refusal = engine.admit("c2")  # at once, not after the admission's timeout
        assert refusal is not None and refusal.reason == UNAVAILABLE and refusal.text == "model service unavailable"
        media.end()
        assert engine.close_session(s) is None and _gone(s.audio.shm_name)
        _give_up_a_connection(str(sock_dir / "m.sock"))  # as a reconnect that waited for Ready in vain does
        proc.send_signal(signal.SIGCONT)
        # resumed, the service ends the connection the worker gave up (closing its call), and the worker
        # finds it again
        proc.err_lines.wait_line("its 1 open calls closed", 15)
        eventually(lambda: engine.connected, 15, "reconnected after SIGCONT")
        assert engine.admit("c3") is None
        s = engine.open_session(CallStart(call_id="c3", rate=RATE))
        media = MediaSide(s.audio, 1000)
        media.start()
        eventually(lambda: _hears(media, 0, 1000), 15, "served again")
        media.end()
        assert engine.close_session(s).steps > 0
        # the connection given up while the service was stopped is dropped without a word in its log
        assert not [line for line in proc.err_lines.lines if "(gave-up pid" in line]
        assert sum(line.endswith("(w pid %d) connected\n" % os.getpid()) for line in proc.err_lines.lines) == 2
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        stop_process(proc, 10, signal.SIGKILL)
        engine.close()


def _give_up_a_connection(path: str) -> None:
    """Connects, says Hello and leaves: what a worker's attempt that had no Ready in time leaves behind."""
    import socket as socket_mod
    from multiprocessing.connection import Connection

    from callbot.engine.serving import service_messages as sm

    sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    sock.connect(path)
    conn = Connection(os.dup(sock.fileno()))
    sm.send(conn, sm.Hello(pid=os.getpid(), name="gave-up", heartbeat_s=0.2))
    conn.close()
    sock.close()


def test_a_send_to_a_service_that_stopped_reading_times_out_instead_of_blocking(sock_dir, capsys):
    """The service stopped with the socket's buffer full: each send gives up after send_timeout_s, the
    connection is given up, and admissions are refused as unavailable (the heartbeat is slowed here so
    that the send, not the silence, is what notices)."""
    proc = _start_service(_service_config(sock_dir), "--engine", "echo")
    engine = ServiceEngine(str(sock_dir / "m.sock"), name="w", heartbeat_s=30, send_timeout_s=0.2)
    try:
        assert engine.connected
        proc.send_signal(signal.SIGSTOP)
        big = "x" * 65536
        for _ in range(200):  # a few megabytes at most: far past any socket buffer
            engine.release(big)
            if not engine.connected:
                break
        eventually(lambda: not engine.connected, 5, "the connection given up")
        assert engine.admit("after").reason == UNAVAILABLE
        said: list[str] = []
        eventually(lambda: said.append(capsys.readouterr().err) or "lost (a send timed out after 0.2 s: it stopped "
                   "reading)" in "".join(said), 5, "the reason said")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        stop_process(proc, 10, signal.SIGKILL)
        engine.close()
