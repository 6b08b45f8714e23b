"""The model in its own process (engine/serving/inference_process.py): a real child with the tiny model, calls
whose rings live in shared memory, a media-like thread on this side, and a child killed mid-call."""
from __future__ import annotations

import functools
import os
import signal
import threading
import time
from multiprocessing import shared_memory

import msgspec
import numpy as np
import pytest

from callbot.engine.serving.frame_stats import STAGES
from callbot.engine.serving.inference_process import InferenceProcess, InferenceStartupError
from callbot.app.model_setup import prepare_model
from callbot.engine.contract import CallStart
from callbot.app.settings import BotSettings, ModelSettings, Settings
from tests.media_side import play_media_side, play_through
from tests.tiny_assets import write_tiny_model_for_serve

pytestmark = pytest.mark.timeout(180)


def _Call(call_id: str, rate: int, bot: str | None = None) -> CallStart:
    return CallStart(call_id=call_id, rate=rate, bot=bot)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    directory, arch = write_tiny_model_for_serve(tmp_path_factory.mktemp("personaplex"))
    model = ModelSettings(path=str(directory), architecture=str(arch), quantization="none", download=False)
    bot = BotSettings(name="pizza", voice="NATM1", persona="You take orders for a pizza shop.")
    return Settings(model=model, bots=(bot,))


def _start(settings: Settings, **kw) -> InferenceProcess:
    return InferenceProcess(functools.partial(prepare_model, settings), realtime=False, **kw)


def _gone(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name=name).close()
    except FileNotFoundError:
        return True
    return False


def _wait(cond, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def test_a_call_through_the_process_gets_model_audio_back_and_its_summary(settings):
    closed = []
    engine = _start(settings, on_closed=closed.append)
    try:
        assert engine.info.pjsua2_loaded is False and engine.info.bots == ["pizza"]
        # what the child's inference thread got from make_realtime (privileges decide which)
        assert engine.info.realtime in ("SCHED_FIFO", "SCHED_OTHER", "unchanged",
                                           "THREAD_TIME_CONSTRAINT_POLICY", "QOS_CLASS_USER_INTERACTIVE")
        assert engine.pid != os.getpid()
        # a terminal's Ctrl-C or a service manager's SIGTERM to the process group: only the SIP side
        # stops the model (after its calls), so the child ignores both
        os.kill(engine.pid, signal.SIGINT)
        os.kill(engine.pid, signal.SIGTERM)
        s = engine.open_session(_Call("c1", 16000))
        name = s.audio.shm_name
        stop, received = threading.Event(), []
        media = threading.Thread(target=play_media_side, args=(s.audio, 100, stop, received))
        media.start()
        try:
            _wait(lambda: any(np.any(f != 0) for f in list(received)) or not media.is_alive())
        finally:
            stop.set()
            media.join(30)
        engine.close_session(s)
        engine.close_session(s)  # once is enough; twice is harmless
    finally:
        engine.close()
    assert engine.error is None
    assert any(np.any(f != 0) for f in received), "the model's audio never came back through shared memory"
    assert closed == [s] and _gone(name)
    summary = msgspec.to_builtins(s.final_summary)
    assert summary["steps"] >= 1 and len(summary["step_s"]) == summary["steps"]
    assert all(isinstance(t["piece"], str) for t in summary["text"])
    durations = s.stats.durations_s()
    assert "step_start->encoded" in durations and len(durations["step_start->encoded"]) == summary["steps"]
    assert not engine._proc.is_alive()


def test_the_media_sides_stamps_give_each_frame_its_arrival_and_departure(settings):
    """ring_in (the frame's last sample entered rx, stamped by the media side in shared memory) comes
    before resampled, and rtp_out (its first sample left tx) after ring_out, for every frame that has them."""
    engine = _start(settings)
    try:
        s = engine.open_session(_Call("c4", 16000))
        play_through(s.audio, 50)
        engine.close_session(s)
    finally:
        engine.close()
    summary, durations = msgspec.to_builtins(s.final_summary), s.stats.durations_s()
    arrived, departed = durations["ring_in->resampled"], durations["ring_out->rtp_out"]
    # one duration per frame that knows both ends: every frame of caller audio, and some frames out
    assert len(arrived) == summary["steps"] - summary["silence_fed"] >= 1
    assert (arrived >= 0).all() and arrived.max() > 0
    assert 1 <= len(departed) <= summary["steps"]
    assert (departed >= 0).all() and departed.max() > 0
    assert {"ring_in->resampled", "ring_out->rtp_out"} <= set(summary["stages_ms"])
    # the parent holds every frame's row, as the runner wrote it in the child
    rows, silence = s.stats.held()
    assert rows.shape == (summary["steps"], len(STAGES)) and silence.sum() == summary["silence_fed"]
    starts = rows[:, STAGES.index("step_start")]
    assert (starts > 0).all() and (np.diff(starts) > 0).all()  # step starts, in order


def test_a_killed_child_sets_error_leaves_calls_silent_and_frees_their_blocks(settings):
    engine = _start(settings)
    try:
        s = engine.open_session(_Call("c2", 8000))
        name = s.audio.shm_name
        os.kill(engine.pid, signal.SIGKILL)
        _wait(lambda: engine.error is not None, timeout=30)
        assert "ended unexpectedly" in str(engine.error)
        # the media side goes on: its rings are ours, they just stay empty
        s.audio.rx.write(np.zeros(160, np.int16))
        assert s.audio.tx.read(160) is None
        with pytest.raises(RuntimeError, match="inference process has stopped"):
            engine.open_session(_Call("c3", 8000))
        engine.close_session(s)
        assert s.final_summary is None and _gone(name)
    finally:
        engine.close()


def test_missing_weights_reach_the_parent_as_one_line(settings, tmp_path):
    model = msgspec.structs.replace(settings.model, path=str(tmp_path / "nothing-here"))
    with pytest.raises(InferenceStartupError, match=r"^model weights: .*nothing-here.*Next: .*--engine echo") as info:
        _start(msgspec.structs.replace(settings, model=model))
    assert "\n" not in str(info.value)


def test_a_bad_architecture_file_reaches_the_parent(settings, tmp_path):
    bad = tmp_path / "arch.json"
    bad.write_text('{"lm": {}, "wat": 1}')
    model = msgspec.structs.replace(settings.model, architecture=str(bad))
    with pytest.raises(InferenceStartupError, match="model architecture"):
        _start(msgspec.structs.replace(settings, model=model))


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _shm_blocks(pid: int) -> set[str]:
    """The shared_memory blocks process `pid` has mapped (its calls' rings)."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/dev/shm/psm_" in line}


def test_serve_runs_the_model_in_a_child_and_ends_with_status_1_when_it_dies(tmp_path, settings):
    """`callbot serve` with the tiny model: the model runs in a child process that never imports pjsua2;
    a call's rings are mapped by both; killing the child mid-call ends the server with status 1 and the
    call's block is unlinked."""
    from tests.sip_peers import PjsuaPeer, free_port, stop_process
    from test_serve import _config, _model_toml, _serve, _wait_line

    sip_port, metrics_port = free_port(), free_port()
    cfg = _config(tmp_path, sip_port, metrics_port)
    # the caller recognizer is serve's other spawn child: off here, the model's child is the one
    cfg.write_text(cfg.read_text() + _model_toml(settings.model.path, settings.model.architecture)
                   + '\n[recognizer]\nengine = "none"\n')
    proc = _serve("--config", str(cfg))
    try:
        _wait_line(proc, "listening", timeout=90)
        [child] = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
        with PjsuaPeer(user="kim", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("media", call_id=call_id, timeout=15)
            _wait(lambda: _shm_blocks(proc.pid) and _shm_blocks(proc.pid) <= _shm_blocks(child), timeout=15)
            blocks = _shm_blocks(proc.pid)
            with open(f"/proc/{child}/maps") as f:
                assert "pjsua2" not in f.read(), "the inference process loaded pjsua2"
            os.kill(child, signal.SIGKILL)
            assert proc.wait(60) == 1
        _wait_line(proc, "the engine failed", timeout=10)
    finally:
        stop_process(proc, timeout=10, sig=signal.SIGKILL)
    assert blocks and all(_gone(name) for name in blocks)


def test_serve_reports_a_bot_the_child_cannot_prepare_as_one_line_and_exits_2(tmp_path, settings):
    """A problem found in the child while preparing a bot (here: a persona too long for the tiny model's
    context) reaches the user as serve's one error line, exit status 2, no traceback."""
    import subprocess
    import sys

    cfg = tmp_path / "callbot.toml"
    cfg.write_text(f"""
[metrics]
enabled = false
[model]
path = "{settings.model.path}"
architecture = "{settings.model.architecture}"
quantization = "none"
download = false
[[bots]]
name = "talker"
persona = "{'You talk a lot. ' * 40}"
""")
    out = subprocess.run([sys.executable, "-m", "callbot.app.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stderr
    [line] = [ln for ln in out.stderr.splitlines() if ln.startswith("callbot: error:")]
    assert line.startswith("callbot: error: bot 'talker': the prompt is")
    assert "Traceback" not in out.stderr


def test_serve_builds_the_process_engine_by_default_and_the_thread_one_on_request(settings, tmp_path):
    from callbot.engine.serving.runner import ModelEngine
    from callbot.app.model_engine import build_model_engine
    from callbot.app.serve import StartupError

    for process, kind in ((True, InferenceProcess), (False, ModelEngine)):
        model = msgspec.structs.replace(settings.model, process=process)
        engine = build_model_engine(msgspec.structs.replace(settings, model=model))
        try:
            assert isinstance(engine, kind)
            s = engine.open_session(_Call("c4", 16000))
            engine.close_session(s)
            assert s.final_summary is not None and s.audio.rx.closed
        finally:
            engine.close()
        missing = msgspec.structs.replace(model, path=str(tmp_path / "nothing-here"))
        with pytest.raises(StartupError, match="^model weights: "):
            build_model_engine(msgspec.structs.replace(settings, model=missing))
