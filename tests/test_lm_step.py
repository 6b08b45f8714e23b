"""The LM's streaming step on the tiny model: samplers, state snapshot/restore/reset, input checks,
and the Moshiko layout (8 depformer slices) through the same code."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import mlx.core as mx

from callbot.engine.model.lm import LM
from callbot.engine.model.sampling import GREEDY, SamplingConfig, TokenSampler, sample
from callbot.engine.model.weights import load_lm

from tests.tiny_lm import TINY_LM, kyutai_lm_kwargs, write_tiny_lm

HOT = SamplingConfig(text_temperature=1.5, text_top_k=0, audio_temperature=1.5, audio_top_k=0)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> LM:
    d = tmp_path_factory.mktemp("tiny_lm")
    write_tiny_lm(d)
    return load_lm(d, TINY_LM, progress=False)


def _run(lm, state, frames, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        r = lm.step(state, rng.integers(0, TINY_LM.card, TINY_LM.agent_codebooks))
        out.append(None if r is None else (r[0], r[1].tolist()))
    return out


def test_greedy_is_argmax_and_top_k_stays_in_the_top_k():
    logits = mx.array(np.random.default_rng(0).standard_normal((200, 50)).astype(np.float32))
    np.testing.assert_array_equal(np.array(sample(logits, 0.0, 5, None)), np.argmax(np.array(logits), -1))
    got = np.array(sample(logits, 1.0, 5, mx.random.key(1)))
    top5 = np.argsort(-np.array(logits), axis=-1)[:, :5]
    assert all(g in row for g, row in zip(got, top5))
    assert len(set(got.tolist())) > 5  # it does sample


def test_sampling_follows_the_distribution_and_the_seed():
    logits = mx.array(np.log(np.array([[0.25, 0.75]] * 4000, dtype=np.float32)))
    draws = np.array(sample(logits, 1.0, 0, mx.random.key(3)))
    assert abs(draws.mean() - 0.75) < 0.03  # 4000 draws: standard error 0.007
    cooler = np.array(sample(logits, 0.5, 0, mx.random.key(3)))  # p ~ 0.9 at temperature 0.5
    assert abs(cooler.mean() - 0.9) < 0.03
    a, b = TokenSampler(HOT, seed=5), TokenSampler(HOT, seed=5)
    x = mx.array(np.zeros((1, 64), np.float32))
    assert [a.audio(x).item() for _ in range(20)] == [b.audio(x).item() for _ in range(20)]


def test_sampling_config_is_checked():
    assert SamplingConfig() == SamplingConfig(text_temperature=0.7, text_top_k=25, audio_temperature=0.8,
                                              audio_top_k=250)
    with pytest.raises(ValueError, match="text_temperature must be a number >= 0"):
        SamplingConfig(text_temperature=-1)
    with pytest.raises(ValueError, match="audio_top_k must be an integer >= 0"):
        SamplingConfig(audio_top_k=2.5)
    with pytest.raises(ValueError, match="seed"):
        TokenSampler(seed=-1)


def test_same_seed_same_frames_other_seed_other_frames(lm):
    a = _run(lm, lm.new_state(HOT, seed=1), 12)
    assert a == _run(lm, lm.new_state(HOT, seed=1), 12)
    assert a != _run(lm, lm.new_state(HOT, seed=2), 12)
    assert a[:2] == [None, None] and all(f is not None for f in a[2:])


def test_snapshot_restore_gives_the_same_next_frames_as_prompting_afresh(lm):
    def prompted(seed):
        state = lm.new_state(HOT, seed=seed)
        rng = np.random.default_rng(4)
        for i in range(40):  # a "prompt" longer than the 32-frame context: the ring has wrapped
            lm.step(state, rng.integers(0, 32, 8), agent_codes=rng.integers(0, 32, 8),
                    text_token=3 if i < 30 else int(rng.integers(0, 96)))
        return state

    state = prompted(seed=9)
    snap = state.snapshot()
    first = _run(lm, state, 10, seed=1)
    assert first == _run(lm, prompted(seed=9), 10, seed=1)  # afresh
    state.restore(snap)
    assert _run(lm, state, 10, seed=1) == first  # restored in place
    other = lm.new_state(HOT, seed=123)
    other.restore(snap)
    assert _run(lm, other, 10, seed=1) == first  # restored into another state
    assert state.offset == other.offset == 50


def test_reset_starts_a_conversation_over(lm):
    state = lm.new_state(HOT, seed=4)
    first = _run(lm, state, 8)
    state.reset(seed=4)
    assert state.offset == 0 and state.cache.offset == 0
    assert _run(lm, state, 8) == first


def test_bad_inputs_are_value_errors(lm):
    state = lm.new_state(GREEDY)
    with pytest.raises(ValueError, match="user_codes must be 8 integer codes"):
        lm.step(state, [1, 2, 3])
    with pytest.raises(ValueError, match="user_codes must be 8 integer codes"):
        lm.step(state, np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"agent_codes must lie in \[0, 32\]"):
        lm.step(state, np.zeros(8, int), agent_codes=np.full(8, 33))
    with pytest.raises(ValueError, match=r"text_token must lie in \[0, 96\]"):
        lm.step(state, np.zeros(8, int), text_token=-1)
    with pytest.raises(ValueError, match="stream tokens must be integers of shape"):
        state.set_stream_tokens(np.zeros((17, 3), int))
    with pytest.raises(ValueError, match="must hold 64 values"):
        lm.step_embedding(state, np.zeros(10, np.float32))
    assert state.offset == 0  # nothing was consumed by the rejected calls


def test_moshiko_layout_8_slices_matches_kyutai(tmp_path):
    """dep_q=8 (Kyutai's Moshiko): the same code with a smaller depformer, against Kyutai's LMModel."""
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    pytest.importorskip("torch")
    kyutai_lm = pytest.importorskip("moshi.models.lm")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from test_lm_parity import ReferenceGen, _check_step

    cfg = dataclasses.replace(TINY_LM, dep_q=8)
    assert cfg.checkpoint_tensor_count == 43 + 6 * 2 + 20 * 2  # Moshiko's 355 at 32 + 6 layers
    path = write_tiny_lm(tmp_path, cfg, seed=5)
    model = kyutai_lm.LMModel(**kyutai_lm_kwargs(cfg)).eval()
    model.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    ref = ReferenceGen(model, cfg)
    ours = load_lm(path, cfg, progress=False)
    state = ours.new_state(GREEDY)
    rng = np.random.default_rng(11)
    try:
        for i in range(12):
            user = rng.integers(0, cfg.card, 8)
            _check_step(ours.step_with_logits(state, user), ref.step(user), i)
    finally:
        ref.close()


def test_depformer_follows_new_weights(tmp_path):
    """The compiled depformer frame is rebuilt when the weights are replaced after a first step."""
    write_tiny_lm(tmp_path / "a", seed=1)
    write_tiny_lm(tmp_path / "b", seed=2)
    a, b = load_lm(tmp_path / "a", TINY_LM, progress=False), load_lm(tmp_path / "b", TINY_LM, progress=False)
    _run(a, a.new_state(GREEDY), 4)
    from mlx.utils import tree_flatten
    a.load_weights(tree_flatten(b.parameters()))
    assert _run(a, a.new_state(GREEDY), 8) == _run(b, b.new_state(GREEDY), 8)


def test_warmup_leaves_states_alone(lm):
    """warmup() compiles on a scratch state: a conversation gives the same frames with or without it."""
    before = _run(lm, lm.new_state(HOT, seed=6), 10)
    lm.warmup(HOT)
    assert _run(lm, lm.new_state(HOT, seed=6), 10) == before
