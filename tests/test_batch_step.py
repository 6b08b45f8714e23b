"""The batched forward pieces, each against the same stream stepped alone, bit for bit (within float32
rounding where MLX's matmul is not row-exact: tests/batch_compare.py): the transformer's
`step_slots` (one position per stream: the compiled LM path; two: Mimi's), `LM.step_slots` (streams at
different positions, past the context, with their own sampling, seeds and forcing), Mimi's
`encode_slots`/`decode_slots` (fresh and running streams, past the codec's window). test_batch_parity.py
checks `LM.step_slots` against Kyutai's PyTorch model."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from callbot.engine.model.mimi import MimiState, load_mimi
from callbot.engine.model.sampling import GREEDY, SamplingConfig
from callbot.engine.model.transformer import Transformer, TransformerConfig
from callbot.engine.model.weights import load_lm
from tests.batch_compare import ROW_EXACT, bundled_reference_blas, same
from tests.tiny_lm import TINY_LM, write_tiny_lm
from tests.tiny_mimi import tiny_mimi_config, write_tiny_mimi

HOT = SamplingConfig(text_temperature=1.5, text_top_k=0, audio_temperature=1.5, audio_top_k=0)
TOPK = SamplingConfig(text_temperature=0.9, text_top_k=5, audio_temperature=1.1, audio_top_k=7)
CFG = dataclasses.replace(TINY_LM, context=16)  # a short context: every stream rotates within the test


def _same(a: mx.array, b: mx.array) -> bool:
    return same(np.array(a), np.array(b))


def test_mlx_cpu_compares_bit_for_bit():
    """On the mlx-cpu wheel's own BLAS (CI) every comparison here is bit for bit (tests/batch_compare.py)."""
    if not bundled_reference_blas():
        pytest.skip("MLX runs on another BLAS here: comparisons are within float32 rounding")
    assert ROW_EXACT


@pytest.mark.parametrize("positions, context", [(1, 16), (2, 12)], ids=["one-position", "two-positions"])
def test_transformer_step_slots_equals_each_stream_alone(positions, context):
    """Streams that started at different times (one still filling, others past the context) step
    together; each one's output and cache equal those of the same stream stepped alone."""
    mx.random.seed(3)
    cfg = TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=96, context=context)
    model = Transformer(cfg)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    starts = [0, 3, 9, 30]
    alone = [model.make_cache() for _ in starts]
    batched = [model.make_cache() for _ in starts]
    for t in range(60):
        steps = [i for i, s in enumerate(starts) if t >= s]
        xs = [mx.array(rng.standard_normal((1, positions, 32)).astype(np.float32)) for _ in steps]
        expected = [model.step(x, alone[i]) for x, i in zip(xs, steps)]
        got = model.step_slots(mx.concatenate(xs), [batched[i] for i in steps])
        for row, (i, want) in enumerate(zip(steps, expected)):
            assert _same(got[row:row + 1], want), f"step {t}, stream {i}"
    for a, b in zip(alone, batched):
        assert a.offset == b.offset
        assert all(_same(x, y) for x, y in zip(a.arrays(), b.arrays()))


def test_transformer_step_slots_refuses_what_it_cannot_batch():
    model = Transformer(TransformerConfig(d_model=32, num_heads=4, num_layers=2, dim_feedforward=96, context=8))
    with pytest.raises(ValueError, match="the caches hold 2 streams, the input 3"):
        model.step_slots(mx.zeros((3, 1, 32)), [model.make_cache(), model.make_cache()])
    with pytest.raises(ValueError, match="at least one stream"):
        model.step_slots(mx.zeros((0, 1, 32)), [])
    per_step = Transformer(TransformerConfig(d_model=32, num_heads=4, num_layers=1, dim_feedforward=96,
                                             weights_per_step=4))
    with pytest.raises(ValueError, match="per-step weights"):
        per_step.step_slots(mx.zeros((1, 1, 32)), [per_step.make_cache()])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = write_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), CFG, seed=4)
    return load_lm(path, CFG, progress=False), path


def _forcing(rng, t, stream):
    """What a stream forces at frame t: a prompt-like start (agent audio and text), clips now and then."""
    n, cfg = CFG.agent_codebooks, CFG
    user = rng.integers(0, cfg.card, n)
    if t < 6 or (stream == 1 and 20 <= t < 24):
        return user, rng.integers(0, cfg.card, n), int(rng.integers(0, cfg.text_card))
    if stream == 2 and 30 <= t < 33:
        return user, rng.integers(0, cfg.card, n), cfg.text_padding_token
    return user, None, None


def test_lm_step_slots_equals_each_state_stepped_alone(lm):
    """Four conversations at different positions (joined at frames 0, 2, 7 and 25 of the run, one
    leaving at 40), with different sampling settings and seeds, some forcing the agent's streams; 70
    frames with a 16-frame context. Frames, token rings, caches and key chains all equal."""
    lm, _ = lm
    samplings = [HOT, TOPK, GREEDY, HOT]
    seeds = [1, 2, 3, 1]
    spans = [(0, 70), (2, 70), (7, 40), (25, 70)]
    alone = [lm.new_state(s, seed) for s, seed in zip(samplings, seeds)]
    batched = [lm.new_state(s, seed) for s, seed in zip(samplings, seeds)]
    rngs = [np.random.default_rng(10 + i) for i in range(4)]
    frames = 0
    for t in range(70):
        steps = [i for i, (a, b) in enumerate(spans) if a <= t < b]
        inputs = [_forcing(rngs[i], t - spans[i][0], i) for i in steps]
        expected = [lm.step(alone[i], u, agent_codes=a, text_token=x) for i, (u, a, x) in zip(steps, inputs)]
        got = lm.step_slots([batched[i] for i in steps], [u for u, _, _ in inputs], [a for _, a, _ in inputs],
                            [x for _, _, x in inputs])
        for i, want, have in zip(steps, expected, got):
            assert (want is None) == (have is None), f"frame {t}, state {i}"
            if want is not None:
                assert want[0] == have[0] and want[1].tolist() == have[1].tolist(), f"frame {t}, state {i}"
                frames += 1
    assert frames > 150
    for a, b in zip(alone, batched):
        assert a.offset == b.offset and a.cache.offset > CFG.context
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.provided, b.provided)
        assert all(_same(x, y) for x, y in zip(a.arrays(), b.arrays()))


def test_lm_step_slots_checks_every_input_before_stepping_any(lm):
    lm, _ = lm
    states = [lm.new_state(GREEDY), lm.new_state(GREEDY)]
    good = np.zeros(CFG.agent_codebooks, int)
    with pytest.raises(ValueError, match=r"agent_codes must lie in \[0, 32\]"):
        lm.step_slots(states, [good, good], [None, np.full(CFG.agent_codebooks, 99)], [None, None])
    with pytest.raises(ValueError, match="2 states need 2 user_codes"):
        lm.step_slots(states, [good])
    with pytest.raises(ValueError, match="a state appears twice"):
        lm.step_slots([states[0], states[0]], [good, good])
    assert all(s.offset == 0 and not s.provided.any() for s in states)


@pytest.fixture(scope="module")
def mimi(tmp_path_factory):
    cfg = tiny_mimi_config(context=8)  # 4 frames of window: the test runs far past it
    return load_mimi(write_tiny_mimi(tmp_path_factory.mktemp("mimi"), cfg, seed=2), cfg)


def test_mimi_slots_equal_each_stream_alone(mimi):
    """Four codec streams (one fresh at every frame it joins) encode and decode together: codes,
    samples and states equal each stream's own `encode_step` / `decode_step`."""
    rng = np.random.default_rng(5)
    starts = [0, 1, 6, 13]
    alone = [MimiState() for _ in starts]
    batched = [MimiState() for _ in starts]
    for t in range(20):
        steps = [i for i, s in enumerate(starts) if t >= s]
        pcm = (0.2 * rng.standard_normal((len(steps), 1920))).astype(np.float32)
        codes, states = mimi.encode_slots(pcm, [batched[i] for i in steps])
        want_codes = []
        for row, i in enumerate(steps):
            c, alone[i] = mimi.encode_step(pcm[row], alone[i])
            want_codes.append(c)
            batched[i] = states[row]
        assert _same(codes, mx.stack(want_codes)), f"frame {t}"
        out, states = mimi.decode_slots(codes, [batched[i] for i in steps])
        for row, i in enumerate(steps):
            p, alone[i] = mimi.decode_step(want_codes[row], alone[i])
            assert _same(out[row], p), f"frame {t}, stream {i}"
            batched[i] = states[row]
    for a, b in zip(alone, batched):
        for half_a, half_b in ((a.encoder, b.encoder), (a.decoder, b.decoder)):
            assert half_a.transformer.offset == half_b.transformer.offset
            assert all(_same(x[0], y[0]) and _same(x[1], y[1])
                       for x, y in zip(half_a.transformer.layers, half_b.transformer.layers))


def test_mimi_slots_check_their_input(mimi):
    with pytest.raises(ValueError, match=r"2 streams need PCM \[2, 1920\]"):
        mimi.encode_slots(np.zeros((3, 1920), np.float32), [MimiState(), MimiState()])
    _, batch_state = mimi.encode_step(np.zeros((2, 1920), np.float32), MimiState())
    with pytest.raises(ValueError, match="single-stream states, got one of batch size 2"):
        mimi.encode_slots(np.zeros((1, 1920), np.float32), [batch_state])
    with pytest.raises(ValueError, match=r"2 streams need codes \[2, 8\]"):
        mimi.decode_slots(np.zeros((1, 8), np.int32), [MimiState(), MimiState()])
