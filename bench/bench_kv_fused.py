"""Step time of the temporal transformer over a full quantized KV ring: fused attention (the packed ring
read by `mx.quantized_matmul`, engine/model/transformer.py `kv_fused_attention`) against the
dequantize-then-SDPA path it replaced (`Transformer.fused_kv = False`) and against a float ring.

Why: on an Apple chip the 7B step is bound by the bytes it reads, and at full context a call's ring is
a large share of them (bench_bytes_per_step.py: 0.5 GB of bf16 KV read per call per step at 3000
frames, next to 3.8 GB of q4 temporal weights shared by the batch). The dequantizing path wrote and
read a float copy of the ring every step, so `kv_bits = 8` read more than a bf16 ring; the fused path
reads the packed ring once. This measures what that does to the step on this CPU, for a model whose heads
hold whole quantization groups (the quarter LM of bench_lm.py: dim 1024, 8 heads of 128 as the 7B's,
8 layers, context 3000), B = 1 and 4 calls, each ring full (as after 4 minutes of a call: the whole
3000-frame ring is read). All variants share the same weights and take turns step by step, so the
shared machine's load falls on all alike; the report is the median per step and the ratios in the same
run. fp32 on this CPU (bf16 matmuls are ~10x slower on MLX's CPU backend): the float ring holds 4 bytes
per value here, 2 on a Mac, so the CPU's kv/float ratios overstate what quantizing saves there.
Run (about 2 min on 2 cores):

    python -m pytest bench/bench_kv_fused.py -p no:cacheprovider -q -s
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from bench.bench_lm import QUARTER
from callbot.engine.model.lm_config import personaplex_7b
from callbot.engine.model.transformer import Transformer, kv_decode, kv_encode, kv_fusable, kv_fused_attention

BATCHES = (1, 4)
STEPS = 8  # measured steps per variant and batch size (after WARMUP)
WARMUP = 2
VARIANTS = {  # name -> (kv_bits, fused)
    "float32": (None, True),
    "kv8 fused": (8, True),
    "kv8 dequantizing": (8, False),
    "kv4 fused": (4, True),
    "kv4 dequantizing": (4, False),
}
REPORT: list[str] = []


def _transformers() -> tuple[Transformer, Transformer]:
    """(fused, dequantizing): the same weights (shared arrays), each its own compiled step."""
    mx.random.seed(0)
    fused = Transformer(QUARTER.transformer)
    mx.eval(fused.parameters())
    plain = Transformer(QUARTER.transformer)
    plain.load_weights(tree_flatten(fused.parameters()))
    plain.fused_kv = False
    return fused, plain


def _full_cache(transformer: Transformer, bits: int | None, rng: np.random.Generator):
    """A call's ring after more than `context` frames: every slot written (random keys and values of a
    magnitude like the model's), the next position past the context."""
    cache = transformer.make_cache(kv_bits=bits)
    for layer in cache.layers:
        b, h, cap, d = layer.shape
        layer.fit(cap)
        k, v = (mx.array(rng.standard_normal((b, h, cap, d)).astype(np.float32)) for _ in range(2))
        layer.keys, layer.values = kv_encode(k, bits), kv_encode(v, bits)
        layer.offset = cap + 7
    mx.eval(cache.arrays())
    return cache


def test_fused_kv_step_time():
    fused, plain = _transformers()
    rng = np.random.default_rng(1)
    cfg = QUARTER.transformer
    REPORT.append(f"\nquarter LM temporal transformer ({cfg.num_layers} layers, dim {cfg.d_model}, {cfg.num_heads} heads "
                  f"of {cfg.head_dim}), every ring full ({cfg.context} frames), fp32 on this CPU, median ms per step "
                  f"of {STEPS}:")
    REPORT.append(f"{'B':>2} {'variant':17} {'ms':>8} {'/float32':>9} {'/dequantizing':>14} {'ring MB per call':>17}")
    for batch in BATCHES:
        states = {}
        for name, (bits, use_fused) in VARIANTS.items():
            caches = [_full_cache(fused, bits, rng) for _ in range(batch)]
            if bits:
                assert kv_fusable(caches[0].layers[0].keys, cfg.num_heads)
            states[name] = (fused if use_fused else plain, caches)
        times = {name: [] for name in VARIANTS}
        for i in range(STEPS + WARMUP):
            x = mx.array(rng.standard_normal((batch, 1, cfg.d_model)).astype(np.float32))
            for name, (transformer, caches) in states.items():
                t0 = time.perf_counter()
                out = transformer.step_slots(x, caches)
                mx.eval(out, [a for c in caches for a in c.arrays()])
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) for name, v in times.items()}
        for name, (bits, use_fused) in VARIANTS.items():
            ring = sum(a.nbytes for a in states[name][1][0].arrays()) / 1e6
            deq = f"{bits and 'kv%d dequantizing' % bits}"
            vs = f"{med[name] / med[deq]:14.2f}" if bits else f"{'-':>14}"
            REPORT.append(f"{batch:2d} {name:17} {med[name] * 1e3:8.2f} {med[name] / med['float32']:9.2f} {vs} "
                          f"{ring:17.1f}")
        del states


def test_one_7b_layer_attention_time():
    """The attention alone of one 7B layer (32 heads of 128) over a full 3000-frame ring, one call: what
    the step spends on the ring, without the weights' matmuls."""
    cfg = personaplex_7b().transformer
    rng = np.random.default_rng(2)
    h, d, cap = cfg.num_heads, cfg.head_dim, cfg.context
    q = mx.array(rng.standard_normal((1, h, 1, d)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((1, h, cap, d)).astype(np.float32)) for _ in range(2))
    scale = d ** -0.5
    calls = {"float32": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)}
    for bits in (8, 4):
        ks, vs = kv_encode(k, bits), kv_encode(v, bits)
        mx.eval(ks, vs)
        calls[f"kv{bits} fused"] = lambda ks=ks, vs=vs: kv_fused_attention(q, ks, vs, scale)
        calls[f"kv{bits} dequantizing"] = lambda ks=ks, vs=vs: mx.fast.scaled_dot_product_attention(
            q, kv_decode(ks, h, d), kv_decode(vs, h, d), scale=scale)
    times = {name: [] for name in calls}
    for i in range(30 + WARMUP):
        for name, call in calls.items():
            t0 = time.perf_counter()
            mx.eval(call())
            if i >= WARMUP:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    REPORT.append(f"\none 7B layer's attention ({h} heads of {d}, {cap}-frame ring, 1 call), fp32 on this CPU, "
                  f"median ms of 30:")
    for name in calls:
        deq = name.replace("fused", "dequantizing")
        vs = f"{med[name] / med[deq]:5.2f} of dequantizing" if "fused" in name else ""
        REPORT.append(f"  {name:17} {med[name] * 1e3:7.2f} ms  {med[name] / med['float32']:5.2f} of float32  {vs}")


def test_report(capsys):
    with capsys.disabled():
        print("\n".join(REPORT))


if __name__ == "__main__":
    pytest.main([__file__, "-p", "no:cacheprovider", "-q", "-s"])
