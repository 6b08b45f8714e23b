"""bench/bench_bytes_per_step.py counts the 7B's bytes per step from its configuration; these tests hold
that counting code to measurement: the same functions applied to the tiny model's configuration must
give the byte sizes of the tiny model's arrays as the real loader holds them (float32 on this CPU, and
q4/q8 as `load_lm` quantizes), and of the KV cache a stepped call holds (float32, 8 and 4 bits)."""

from __future__ import annotations

import collections

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from bench.bench_bytes_per_step import (Precision, kv_dequantizes, kv_read_bytes, lm_resident_bytes,
                                        mimi_resident_bytes, mimi_kv_bytes, step_bytes)
from callbot.engine.model.mimi import MimiState, load_mimi
from callbot.engine.model.sampling import SamplingConfig
from callbot.engine.model.weights import load_lm
from tests.tiny_assets import tiny_model_configs, wide_model_configs
from tests.tiny_lm import write_tiny_lm
from tests.tiny_mimi import write_tiny_mimi

GREEDY = SamplingConfig(text_temperature=0.0, audio_temperature=0.0)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    lm_cfg, mimi_cfg = tiny_model_configs()
    d = tmp_path_factory.mktemp("tiny")
    return lm_cfg, mimi_cfg, write_tiny_lm(d, lm_cfg), write_tiny_mimi(d, mimi_cfg)


def _by_part(model) -> dict[str, int]:
    parts: dict[str, int] = collections.Counter()
    for name, a in tree_flatten(model.parameters()):
        parts[name.split(".")[0]] += a.nbytes
    return dict(parts)


@pytest.mark.parametrize("quantize, bits", [(None, None), ("q8", 8), ("q4", 4)])
def test_the_lm_count_equals_the_loaded_arrays(tiny_files, quantize, bits):
    lm_cfg, _, lm_path, _ = tiny_files
    lm = load_lm(lm_path, lm_cfg, quantize=quantize, dtype=mx.float32, cache_dir=False, progress=False)
    counted = lm_resident_bytes(lm_cfg, Precision("cpu", bits, 64, float_bytes=4))
    assert counted == _by_part(lm)


def test_the_codec_count_equals_the_loaded_arrays(tiny_files):
    _, mimi_cfg, _, mimi_path = tiny_files
    mimi = load_mimi(mimi_path, mimi_cfg, dtype=mx.float32)
    assert mimi_resident_bytes(mimi_cfg, float_bytes=4) == sum(a.nbytes for _, a in tree_flatten(mimi.parameters()))
    # and in bf16 (as on a GPU) the codebooks stay float32, as load_mimi keeps them
    mimi16 = load_mimi(mimi_path, mimi_cfg, dtype=mx.bfloat16)
    assert mimi_resident_bytes(mimi_cfg, float_bytes=2) == sum(a.nbytes for _, a in tree_flatten(mimi16.parameters()))


@pytest.fixture(scope="module")
def wide_lm_file(tmp_path_factory):
    lm_cfg, _ = wide_model_configs()
    return lm_cfg, write_tiny_lm(tmp_path_factory.mktemp("wide"), lm_cfg)


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
@pytest.mark.parametrize("heads", ["narrow", "wide"])
def test_the_kv_read_count_equals_what_a_stepped_call_holds(request, heads, kv_bits):
    """After each step a call's rings hold exactly the span that step read: their bytes are what the
    bench counts for that fill (a power-of-two prefix while filling, the whole context after). Both
    quantized layouts: heads of 16 (position-major, read dequantized) and of 64 (head-major, the 7B's,
    attended packed: the count is then all a step reads of the ring)."""
    if heads == "narrow":
        lm_cfg, _, lm_path, _ = request.getfixturevalue("tiny_files")
    else:
        lm_cfg, lm_path = request.getfixturevalue("wide_lm_file")
    assert kv_dequantizes(lm_cfg) == (heads == "narrow")
    lm = load_lm(lm_path, lm_cfg, dtype=mx.float32, cache_dir=False, progress=False)
    lm.kv_bits = kv_bits
    state = lm.new_state(GREEDY)
    rng = np.random.default_rng(0)
    checked = set()
    for _ in range(lm_cfg.context + 40):
        lm.step(state, rng.integers(0, lm_cfg.card, lm_cfg.agent_codebooks))
        written = state.cache.offset
        if written == 0:
            continue
        fill = written - 1  # frames in the ring when the last step ran
        held = sum(a.nbytes for a in state.cache.arrays())
        assert held == kv_read_bytes(lm_cfg, fill, kv_bits, float_bytes=4), fill
        checked.add(held)
    assert len(checked) >= 3  # the 32, 64 and 128 (= context) spans were all seen


def test_the_codec_cache_count_equals_a_full_codec_cache(tiny_files):
    """A call's two codec transformer caches, once full, hold what the bench counts per call."""
    _, mimi_cfg, _, mimi_path = tiny_files
    mimi = load_mimi(mimi_path, mimi_cfg, dtype=mx.float32)
    state = MimiState()
    pcm = np.zeros(mimi.frame_size, np.float32)
    frames = mimi_cfg.transformer.context // mimi_cfg.downsample_stride + 4
    for _ in range(frames):
        codes, state = mimi.encode_step(pcm, state)
        _, state = mimi.decode_step(codes, state)
    held = sum(a.nbytes for half in (state.encoder, state.decoder) for a in half.transformer.arrays())
    assert held == mimi_kv_bytes(mimi_cfg, float_bytes=4)


def test_a_batch_reads_the_weights_once_and_each_call_its_own_state():
    from callbot.engine.model.lm_config import personaplex_7b
    from callbot.engine.model.mimi import mimi_202407
    from bench.bench_bytes_per_step import Q4

    sb = step_bytes(personaplex_7b(), mimi_202407(), Q4, 3000, None)
    assert sb.total(4) - sb.total(1) == pytest.approx(3 * sum(sb.per_call.values()))
    # the full 3000-frame bf16 ring of one call: 32 layers x 2 x 4096 values x 2 bytes x 3000
    assert sb.per_call["KV cache"] == 32 * 2 * 4096 * 2 * 3000
    # 8 bits, attended packed (heads of 128): a byte per value and a bf16 scale and bias per 64 values;
    # dequantizing added a bf16 copy written and read (4 bytes per value)
    assert not kv_dequantizes(personaplex_7b())
    kv8 = step_bytes(personaplex_7b(), mimi_202407(), Q4, 3000, 8).per_call["KV cache"]
    assert kv8 == 32 * 2 * 4096 * (1 + 4 / 64) * 3000
    deq = step_bytes(personaplex_7b(), mimi_202407(), Q4, 3000, 8, dequantized=True).per_call["KV cache"]
    assert deq == kv8 + 32 * 2 * 4096 * 4 * 3000
    assert "depformer (8 slices)" in sb.shared
