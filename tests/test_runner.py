"""The inference runner on the tiny model: real threads, a media-like producer at 20 ms, real rings."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import msgspec

from callbot.engine import Model
from callbot.engine.contract import CallStart
from callbot.engine.serving.frame_stats import FrameStats
from callbot.engine.serving.runner import FRAME_NS, STAGES, BotPrompt, ModelEngine
from tests.media_side import play_through
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

pytestmark = pytest.mark.timeout(120)


def _Call(call_id: str, rate: int) -> CallStart:
    return CallStart(call_id=call_id, rate=rate)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


@pytest.fixture(scope="module")
def prompt(model):
    return BotPrompt(model.prepare("NATF2", "You take orders for a pizza shop."), seed=1)


def _wait(engine, cond, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if engine.error is not None:
            raise AssertionError(f"the inference thread died: {engine.error!r}")
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_runner_steps_a_call_from_its_rings(model, prompt, rate):
    closed = []
    engine = ModelEngine(model, lambda call: prompt, realtime=False, on_closed=closed.append)
    try:
        s = engine.open_session(_Call("c1", rate))
        received = play_through(s.audio, 50)
        _wait(engine, lambda: s.steps >= 10)  # 50 frames of 20 ms = 12.5 model frames, minus what is still in flight
        engine.close_session(s)
        # under load a frame may be fed as silence or dropped; what matters is that it is counted
        frames_in = s.audio.frames_pulled
    finally:
        engine.close()
    assert closed == [s]
    summary = msgspec.to_builtins(s.final_summary)
    assert summary["steps"] == s.steps >= 10
    assert summary["steps"] == frames_in - summary["frames_dropped"] + summary["silence_fed"]
    assert set(summary["stages_ms"]) == {"ring_in->resampled", "resampled->released", "released->step_start",
                                         "step_start->encoded",
                                         "encoded->lm_stepped", "lm_stepped->decoded", "decoded->ring_out",
                                         "ring_out->rtp_out"}
    assert all(v["p50_ms"] >= 0 for v in summary["stages_ms"].values())
    # the media side's stamps: every real frame knows when its last sample came in, before it was ready;
    # every frame the media side read back knows when it left, after it was pushed
    rows, silence = s.stats.held()
    col = {name: rows[:, i] for i, name in enumerate(STAGES)}
    assert (col["ring_in"][~silence] > 0).all() and (col["ring_in"][silence] == 0).all()
    assert (col["ring_in"][~silence] <= col["resampled"][~silence]).all()
    # released: the round's planned start (the schedule's wait before it), at or before the step's
    assert (col["resampled"] > 0).all() and (col["resampled"] <= col["released"]).all()
    assert (col["released"] <= col["step_start"]).all()
    assert ((col["step_start"] <= col["encoded"]) & (col["encoded"] <= col["lm_stepped"])
            & (col["lm_stepped"] <= col["decoded"]) & (col["decoded"] <= col["ring_out"])).all()
    out = col["rtp_out"] > 0
    assert out.any() and (col["ring_out"][out] <= col["rtp_out"][out]).all()
    assert len(summary["step_s"]) == s.steps
    # the model's audio reached the media side: some 20 ms frames the "callback" read were not silence
    assert any(np.any(f != 0) for f in received)
    assert all(isinstance(t["piece"], str) and t["t_ms"] >= 0 for t in summary["text"])


def test_watchdog_feeds_silence_when_the_caller_stalls(model, prompt):
    engine = ModelEngine(model, lambda call: prompt, realtime=False)
    try:
        s = engine.open_session(_Call("c2", 16000))
        marks = {}
        # 40 frames (0.8 s), of which frames 10..29 (400 ms) bring no audio: a hold
        play_through(s.audio, 40, pause_after=10, pause_frames=20, marks=marks)
        engine.close_session(s)  # at once: silence after the caller's last frame is not the hold's
    finally:
        engine.close()
    rows, silence = s.stats.held()
    assert s.final_summary.silence_fed == silence.sum() >= 1
    # every silence frame was fed during the hold (its watchdog fires one frame + grace after the
    # last real frame, so up to that long after the audio came back)
    late = FRAME_NS + engine.grace_ns
    ready = rows[silence, STAGES.index("resampled")]
    assert ((ready > marks["pause_start"]) & (ready < marks["pause_end"] + late)).all(), (ready, marks)


def test_open_session_needs_a_call_start(model, prompt):
    engine = ModelEngine(model, lambda call: prompt, realtime=False)
    try:
        with pytest.raises(TypeError, match="CallStart"):
            engine.open_session(object())
        with pytest.raises(msgspec.ValidationError, match="rate"):  # a CallStart refuses a rate we cannot serve
            msgspec.convert({"call_id": "x", "rate": 11025}, CallStart)
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.open_session(_Call("y", 8000))


def test_bad_runner_settings(model, prompt):
    with pytest.raises(ValueError, match="max_backlog"):
        ModelEngine(model, lambda call: prompt, max_backlog=0)
    with pytest.raises(ValueError, match="grace_ms"):
        ModelEngine(model, lambda call: prompt, grace_ms=-1)


def test_warmup_runs_on_the_inference_thread_and_its_error_surfaces(model, prompt):
    seen = []
    engine = ModelEngine(model, lambda call: prompt, realtime=False,
                         warmup=lambda: seen.append(threading.current_thread().name))
    engine.close()
    assert seen == ["inference"]

    def broken():
        raise ValueError("no such voice")

    with pytest.raises(ValueError, match="no such voice"):
        ModelEngine(model, lambda call: prompt, realtime=False, warmup=broken)


def test_frame_stats_rebuilt_from_held_rows_summarise_the_same():
    stats = FrameStats(4)
    for k in range(6):  # wraps: the oldest two go
        row = stats.row(silence=k == 3)
        row[:] = 1000 * k + np.arange(len(STAGES)) * (k + 1)
    rebuilt = FrameStats.of(*stats.held())
    assert rebuilt.count == 4 and rebuilt.summary() == stats.summary()
    assert (rebuilt.held()[1] == [False, True, False, False]).all()
    with pytest.raises(ValueError, match="stages"):
        FrameStats.of(np.zeros((3, 5), np.int64), np.zeros(3, bool))


def test_the_watch_finds_frames_before_the_coarse_poll(model, prompt):
    """Around the tick a call's next frame is expected on, the runner looks every 0.1 ms
    (arrival_watch.py): with a media side writing every 20 ms, frames are found by those looks, not only
    by the 1 ms poll, and every frame is still stepped."""
    engine = ModelEngine(model, lambda start: prompt, realtime=False)
    try:
        s = engine.open_session(_Call("watched", 16000))
        play_through(s.audio, 60)
        _wait(engine, lambda: s.steps >= 12)
        engine.close_session(s)
    finally:
        engine.close()
    summary = msgspec.to_builtins(s.final_summary)
    assert summary["steps"] == s.audio.frames_pulled - summary["frames_dropped"] + summary["silence_fed"]
    assert engine.early_looks >= 1


def test_a_steady_model_steps_as_the_model_does_and_takes_its_fixed_time(model, prompt):
    """SteadyModel (engine/serving/step_delay.py), the latency bench's stand-in for a steady accelerator:
    the same outputs as the model's own session, each step at least its fixed length."""
    from callbot.engine.audio import now_ns
    from callbot.engine.serving.step_delay import SteadyModel

    steady = SteadyModel(model, 0.05)
    plain = model.open_session(snapshot=prompt.snapshot, seed=5)
    wrapped = steady.open_session(snapshot=prompt.snapshot, seed=5)
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(1920) / 24000)).astype(np.float32)
    for _ in range(4):
        started = now_ns()
        out, piece = wrapped.step(tone)
        took = now_ns() - started
        want, want_piece = plain.step(tone)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
        assert piece == want_piece
        assert took >= 50_000_000
    assert steady.sessions == [wrapped]
    # a step longer than the fixed length keeps its own and is counted
    short = SteadyModel(model, 1e-6).open_session(snapshot=prompt.snapshot, seed=5)
    for _ in range(3):
        short.step(tone)
    assert short.overran == 3
    with pytest.raises(ValueError, match="steady step"):
        SteadyModel(model, 0)
