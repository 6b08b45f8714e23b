"""The library API on the tiny model in the HF layout: load -> prepare -> open a session -> step; snapshots;
quantized loads; the errors a library user gets for wrong input."""

import os
import shutil
import wave

import numpy as np
import pytest

from callbot.engine import VOICES, Model, Session
from callbot.engine.model.weights import WeightsError
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

PERSONA = "You are Jane, a receptionist at a dental clinic."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))


@pytest.fixture(scope="module")
def model(model_dir):
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


def _caller(frames, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(frames)]


def _run(session, frames):
    return [session.step(f) for f in frames]


def _same(a, b):
    return all(pa.tobytes() == pb.tobytes() and ta == tb for (pa, ta), (pb, tb) in zip(a, b, strict=True))


def test_load_prepare_open_and_step(model):
    snapshot = model.prepare("NATF0", PERSONA)
    session = model.open_session(snapshot=snapshot, seed=1)
    assert isinstance(session, Session)
    outs = _run(session, _caller(20))
    assert len(outs) == 20
    for pcm, text in outs:
        assert isinstance(pcm, np.ndarray) and pcm.dtype == np.float32 and pcm.shape == (1920,)
        assert text is None or (isinstance(text, str) and text)
    assert any(np.abs(pcm).max() > 0 for pcm, _ in outs)
    assert any(text is not None for _, text in outs)  # random weights talk a lot


def test_every_named_voice_prompts(model):
    assert len(VOICES) == 18
    frames = {model.prepare(v, "").prompt_frames for v in VOICES}
    assert frames == {5 + 12}  # 5 replayed voice frames + 2 x 6 spacers


def test_snapshot_restore_equals_a_fresh_prompt(model):
    caller = _caller(12, seed=2)
    snapshot = model.prepare("VARF3", PERSONA)
    assert model.prepare("VARF3", PERSONA) is snapshot  # prepared once per (voice, persona)
    first = _run(model.open_session(snapshot=snapshot, seed=7), caller)
    # a session that ran on first, then starts over from the same snapshot
    session = model.open_session(snapshot=snapshot, seed=7)
    _run(session, _caller(5, seed=9))
    session.reset()
    again = _run(session, caller)
    # the prompt computed from scratch
    fresh = model.prepare("VARF3", PERSONA, use_cache=False)
    assert fresh is not snapshot
    from_scratch = _run(model.open_session(snapshot=fresh, seed=7), caller)
    assert _same(first, again)
    assert _same(first, from_scratch)
    # the seed matters (so the equalities above say something)
    assert not _same(first, _run(model.open_session(snapshot=snapshot, seed=8), caller))


def test_sessions_do_not_share_state(model):
    a_in, b_in = _caller(8, seed=3), _caller(8, seed=4)
    alone_a = _run(model.open_session("NATM1", PERSONA, seed=1), a_in)
    alone_b = _run(model.open_session("VARM0", "Be brief.", seed=2), b_in)
    a = model.open_session("NATM1", PERSONA, seed=1)
    b = model.open_session("VARM0", "Be brief.", seed=2)
    inter_a, inter_b = [], []
    for fa, fb in zip(a_in, b_in):
        inter_a.append(a.step(fa))
        inter_b.append(b.step(fb))
    assert _same(alone_a, inter_a) and _same(alone_b, inter_b)


def test_voice_from_a_wav_file(model, tmp_path):
    rng = np.random.default_rng(5)
    with wave.open(str(tmp_path / "me.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((rng.standard_normal(8000) * 3000).astype("<i2").tobytes())
    snapshot = model.prepare(tmp_path / "me.wav", "Be kind.")
    assert snapshot.voice == "me"
    assert snapshot.prompt_frames == 7 + 12 + len(model.tokenizer.encode("<system> Be kind. <system>"))
    pcm, _ = model.open_session(snapshot=snapshot).step(np.zeros(1920, np.float32))
    assert pcm.shape == (1920,)


@pytest.mark.parametrize("quantize", ["q8", "q4"])
def test_quantized_model_runs(model_dir, tmp_path, quantize):
    lm_cfg, mimi_cfg = tiny_model_configs()
    model = Model.load(model_dir, quantize, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=tmp_path, progress=False)
    outs = _run(model.open_session("NATF2", PERSONA, seed=1), _caller(3))
    assert all(pcm.shape == (1920,) and np.isfinite(pcm).all() for pcm, _ in outs)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())  # the conversion is cached on disk


def test_model_found_in_the_hugging_face_cache(model_dir, tmp_path, monkeypatch):
    snapshot_dir = tmp_path / "hub" / "models--nvidia--personaplex-7b-v1" / "snapshots" / "0123abc"
    shutil.copytree(model_dir, snapshot_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    lm_cfg, mimi_cfg = tiny_model_configs()
    model = Model.load(None, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)
    assert model.voices.model_dir == snapshot_dir


@pytest.mark.parametrize("frame, message", [
    (np.zeros(1919, np.float32), "1920 samples"),
    (np.zeros(3840, np.float32), "1920 samples"),
    (np.zeros((2, 1920), np.float32), "1920 samples"),
    (np.zeros(1920, np.float64), "float32"),
    (np.zeros(1920, np.int16), "float32"),
    ([0.0] * 1920, "float32"),
    (np.full(1920, np.nan, np.float32), "NaN"),
])
def test_wrong_frames_are_value_errors(model, frame, message):
    session = model.open_session("NATF0", PERSONA)
    with pytest.raises(ValueError, match=message):
        session.step(frame)
    assert session.frames == 0


def test_wrong_rate_is_a_value_error(model):
    with pytest.raises(ValueError, match="24000 Hz PCM, got 16000 Hz"):
        model.open_session("NATF0", PERSONA, sample_rate=16000)
    with pytest.raises(ValueError, match="24000 Hz PCM, got 8000 Hz"):
        model.open_session("NATF0", PERSONA).step(np.zeros(1920, np.float32), sample_rate=8000)


def test_bad_voice_and_persona(model):
    with pytest.raises(ValueError, match="unknown voice 'Bob'.*NATF0.*VARM4"):
        model.open_session("Bob", PERSONA)
    with pytest.raises(ValueError, match="persona must be a string"):
        model.prepare("NATF0", 42)
    with pytest.raises(ValueError, match="voice must be a name"):
        model.prepare(3, PERSONA)
    with pytest.raises(ValueError, match="snapshot must be a PromptSnapshot"):
        model.open_session(snapshot="NATF0")


def test_missing_model_files_are_named(model_dir, tmp_path):
    lm_cfg, mimi_cfg = tiny_model_configs()
    for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model"):
        broken = tmp_path / name.split(".")[0]
        shutil.copytree(model_dir, broken)
        os.remove(broken / name)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            Model.load(broken, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)
    with pytest.raises(WeightsError, match="model.safetensors"):
        Model.load(tmp_path / "nowhere", lm_config=lm_cfg, cache_dir=False, progress=False)


def test_codec_that_does_not_fit_the_lm_is_refused(model):
    import dataclasses

    from callbot.engine.model.mimi import Mimi
    wrong = Mimi(dataclasses.replace(model.mimi.cfg, quantizer_bins=64))
    with pytest.raises(ValueError, match="the codec \\(8 codebooks of 64\\) does not match the LM"):
        Model(model.lm, wrong, model.tokenizer, model.voices)


def test_preparing_a_prompt_while_a_call_runs_leaves_the_call_unchanged(model, tmp_path):
    """prepare() runs on another thread while a live session steps, with no lock between them: each
    writes only its own state (the shared codec and LM hold weights only)."""
    import threading

    import mlx.core as mx

    rng = np.random.default_rng(6)
    with wave.open(str(tmp_path / "other.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes((rng.standard_normal(24000) * 3000).astype("<i2").tobytes())
    caller = _caller(10, seed=11)
    alone = _run(model.open_session("NATF3", PERSONA, seed=4), caller)
    quiet_prompt = model.prepare(tmp_path / "other.wav", "Be brief.", use_cache=False)

    session = model.open_session("NATF3", PERSONA, seed=4)
    result = {}

    def prepare():
        try:
            result["snap"] = model.prepare(tmp_path / "other.wav", "Be brief.", use_cache=False)
        finally:  # MLX aborts at exit now and then if a finished thread's streams live on (ml-explore/mlx#3126)
            mx.synchronize()
            mx.clear_streams()

    worker = threading.Thread(target=prepare)
    worker.start()
    during = _run(session, caller)
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert _same(alone, during)
    busy_prompt = result["snap"]
    check = _caller(3, seed=12)
    assert _same(_run(model.open_session(snapshot=quiet_prompt, seed=1), check),
                 _run(model.open_session(snapshot=busy_prompt, seed=1), check))
