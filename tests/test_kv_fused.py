"""Fused quantized attention (issue 13, points 2-3): a one-position step over a quantized KV ring whose
heads are as wide as a quantization group (the 7B's 128) reads the packed ring with
`mx.quantized_matmul` (engine/model/transformer.py `kv_fused_attention`) instead of dequantizing it to a
float copy first. Checked here against the dequantize-then-SDPA path it replaces:

- on random arrays, fp32 and bf16, 8 and 4 bits, with and without the filling ring's mask (tolerances
  in TOL: what this CPU measured, with room);
- the head-major layout quantizes exactly the values, codes, scales and biases of the old
  position-major one when head_dim is a multiple of the group, and narrow heads keep the old layout;
- a snapshot of one layout is refused by a cache of the other.

The same at model level: tests/test_kv_fused_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from callbot.engine.model.transformer import (KV_GROUP_SIZE, KVCache, TransformerCache, kv_decode, kv_encode,
                                              kv_fusable, kv_fused_attention)

# relative RMS error of the fused output against the dequantized values' attention computed in float32.
# Measured on this CPU (mlx 0.32, 300 slots): fp32 0 (the same sums in the same order), bf16 0.030 (8
# bits) / 0.028 (4 bits), where bf16 SDPA on the dequantized copy gives 0.004: the fused path rounds the
# scores and the probabilities to bf16 between its two matmuls, as mlx-lm's quantized attention does.
TOL = {mx.float32: 1e-5, mx.bfloat16: 0.05}


def _normal(shape, dtype, seed):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def _rel(a: mx.array, ref: mx.array) -> float:
    a, ref = np.array(a.astype(mx.float32)), np.array(ref.astype(mx.float32))
    return float(np.sqrt(((a - ref) ** 2).sum() / (ref ** 2).sum()))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim, slots, written", [(128, 300, 300), (64, 37, 37), (128, 64, 33), (64, 1, 1)])
def test_fused_attention_equals_dequantize_then_sdpa(dtype, bits, head_dim, slots, written):
    b, h = 2, 4
    q = _normal((b, h, 1, head_dim), dtype, 1)
    k = _normal((b, h, slots, head_dim), dtype, 2)
    v = _normal((b, h, slots, head_dim), dtype, 3)
    if written < slots:  # a filling ring: zeros past the written slots, masked out
        keep = (np.arange(slots) < written)[None, None, :, None]
        k, v = k * mx.array(keep).astype(dtype), v * mx.array(keep).astype(dtype)
    mask = mx.array(np.arange(slots) < written) if written < slots else None
    keys, values = kv_encode(k, bits), kv_encode(v, bits)
    assert kv_fusable(keys, h) and keys[0].shape == (b, h, slots, head_dim * bits // 32)
    scale = head_dim ** -0.5
    fused = kv_fused_attention(q, keys, values, scale, mask)
    assert fused.shape == (b, h, 1, head_dim) and fused.dtype == dtype
    kd, vd = kv_decode(keys, h, head_dim), kv_decode(values, h, head_dim)
    truth = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kd.astype(mx.float32),
                                                 vd.astype(mx.float32), scale=scale, mask=mask)
    unfused = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=scale, mask=mask)
    err = _rel(fused, truth)
    print(f"\n{dtype} kv{bits} head_dim {head_dim} slots {slots}: fused rel-RMS err {err:.2e}, "
          f"dequantized SDPA {_rel(unfused, truth):.2e}")
    assert err <= TOL[dtype]


@pytest.mark.parametrize("bits", [8, 4])
def test_head_major_groups_hold_the_values_of_the_position_major_layout(bits):
    """With head_dim a multiple of the group, no group of a position's heads x head_dim row straddles
    two heads: grouping within a head quantizes the same values to the same codes, scales, biases."""
    b, h, t, d = 2, 4, 33, 128
    x = _normal((b, h, t, d), mx.float32, 5)
    head_major = kv_encode(x, bits)
    row = mx.quantize(x.transpose(0, 2, 1, 3).reshape(b, t, h * d), group_size=KV_GROUP_SIZE, bits=bits)
    assert [a.shape for a in head_major] == [(b, h, t, d * bits // 32), (b, h, t, d // KV_GROUP_SIZE),
                                             (b, h, t, d // KV_GROUP_SIZE)]
    for ours, theirs in zip(head_major, row):
        assert mx.array_equal(ours, theirs.reshape(b, t, h, -1).transpose(0, 2, 1, 3)).item()
    old = mx.dequantize(*row, group_size=KV_GROUP_SIZE, bits=bits).reshape(b, t, h, d).transpose(0, 2, 1, 3)
    assert mx.array_equal(kv_decode(head_major, h, d), old).item()


@pytest.mark.parametrize("bits", [8, 4])
def test_heads_narrower_than_a_group_keep_the_position_major_layout(bits):
    b, h, t, d = 1, 4, 9, 16  # the tiny model's heads: 16 values, a group of 64 spans 4 heads
    x = _normal((b, h, t, d), mx.float32, 6)
    stored = kv_encode(x, bits)
    assert stored[0].shape == (b, 1, t, h * d * bits // 32) and not kv_fusable(stored, h)
    row = mx.quantize(x.transpose(0, 2, 1, 3).reshape(b, t, h * d), group_size=KV_GROUP_SIZE, bits=bits)
    old = mx.dequantize(*row, group_size=KV_GROUP_SIZE, bits=bits).reshape(b, t, h, d).transpose(0, 2, 1, 3)
    assert mx.array_equal(kv_decode(stored, h, d), old).item()


def test_a_snapshot_of_the_other_layout_is_refused():
    """Both layouts hold heads x head_dim = 128 values per position; restoring one into the other is an
    error, not a silent misread."""
    narrow = TransformerCache([KVCache(1, 8, 16, 64, mx.float32, bits=8)])
    wide = TransformerCache([KVCache(1, 2, 64, 64, mx.float32, bits=8)])
    for cache, heads, d in ((narrow, 8, 16), (wide, 2, 64)):
        layer = cache.layers[0]
        layer.update_and_attend(*(_normal((1, heads, 3, d), mx.float32, i) for i in range(3)), None, d ** -0.5)
    with pytest.raises(ValueError, match=r"expected \(1, 2, <= 64, 16\) quantized"):
        wide.restore(narrow.snapshot())
    with pytest.raises(ValueError, match=r"expected \(1, 1, <= 64, 32\) quantized"):
        narrow.restore(wide.snapshot())
    wide.restore(wide.snapshot(compact=True))  # its own layout is taken back
    assert wide.offset == 3 and wide.layers[0].allocated == 3
