"""LM per-frame cost (temporal transformer, depformer) for fp32 / q8 / q4 (group 32 and 64), and what
quantization does to the logits; plus the 7B's bytes read per frame (a projection, not a measurement).

Why: the 7B step must fit the 80 ms frame beside Mimi, and the q4 group size is a trade between logit
error (smaller groups: closer to fp32) and speed/size (larger groups). All variants share the same random
weights and take turns frame by frame, so the shared machine's load falls on all alike; the report is
the median per frame and the ratio to fp32 of the same size. Sizes: "tiny" (the tests' LM) and
"quarter" (a quarter of the 7B's width and depth: dim 1024, 8 layers, depformer 256 x 6, 16 slices,
the real vocabularies). The KV cache holds only the frames of the run (short context).
Run (about 1 min on 2 cores):

    python -m pytest bench/bench_lm.py -p no:cacheprovider -q -s
"""

import statistics
import time

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from callbot.engine.model.lm import LM
from callbot.engine.model.lm_config import LmConfig, personaplex_7b
from callbot.engine.model.sampling import SamplingConfig, TokenSampler
from callbot.engine.model.weights import Quantization, quantize_lm
from tests.tiny_lm import TINY_LM

QUARTER = LmConfig(dim=1024, num_heads=8, num_layers=8, hidden_scale=4.125, context=3000,
                   depformer_dim=256, depformer_num_heads=4, depformer_num_layers=6,
                   depformer_dim_feedforward=int(4.125 * 256))
SIZES = {"tiny": (TINY_LM, 30), "quarter": (QUARTER, 12)}
VARIANTS = {"fp32": None, "q8g64": Quantization(8, 64), "q4g64": Quantization(4, 64),
            "q4g32": Quantization(4, 32)}
WARMUP = 2
REPORT: list[str] = []


def _variants(cfg: LmConfig) -> dict[str, LM]:
    mx.random.seed(0)
    base = LM(cfg)
    mx.eval(base.parameters())
    weights = tree_flatten(base.parameters())
    out = {}
    for name, q in VARIANTS.items():
        lm = LM(cfg)
        lm.load_weights(weights)
        if q is not None:
            quantize_lm(lm, q)
        mx.eval(lm.parameters())
        out[name] = lm
    return out


def _frame(lm: LM, cache, sampler, tokens, forced):
    """One live frame as `LM.step` computes it: temporal + text, then the agent's 8 slices (teacher
    forced, so that every variant sees the same depformer inputs)."""
    t0 = time.perf_counter()
    out = lm.temporal(lm.embed(tokens), cache)
    text_logits = lm.text_linear(out)[:, 0]
    text = sampler.text(text_logits)
    mx.eval(text, cache.arrays())
    t1 = time.perf_counter()
    c = sampler.config
    n = lm.cfg.agent_codebooks
    mask = mx.array(np.arange(lm.cfg.dep_q) < n)
    _, audio_logits = lm.depformer.frame(out, text, forced, mask, n, c.audio_temperature, c.audio_top_k,
                                         sampler.next_key())
    mx.eval(audio_logits)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.concatenate([np.array(text_logits[0]), np.array(audio_logits).ravel()])


@pytest.mark.parametrize("size", list(SIZES))
def test_frame_cost_and_logit_error(size):
    cfg, frames = SIZES[size]
    models = _variants(cfg)
    rng = np.random.default_rng(1)
    sampling = SamplingConfig()
    state = {name: (lm.transformer.make_cache(), TokenSampler(sampling)) for name, lm in models.items()}
    times = {name: ([], []) for name in models}
    errors = {name: [] for name in models}
    for i in range(frames + WARMUP):
        tokens = mx.array(rng.integers(0, cfg.card, (1, cfg.num_streams, 1)).astype(np.int32))
        # Teacher-forced depformer inputs: every variant sees the same tokens, so logits compare.
        forced = mx.array(rng.integers(0, cfg.card, cfg.dep_q).astype(np.int32))
        ref = None
        for name, lm in models.items():
            cache, sampler = state[name]
            t_temporal, t_dep, logits = _frame(lm, cache, sampler, tokens, forced)
            if i >= WARMUP:
                times[name][0].append(t_temporal)
                times[name][1].append(t_dep)
            if ref is None:
                ref = logits
            else:
                errors[name].append(np.sqrt(np.mean((logits - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))
    base_t, base_d = (statistics.median(v) for v in times["fp32"])
    REPORT.append(f"\n{size} ({sum(a.size for _, a in tree_flatten(models['fp32'].parameters())) / 1e6:.1f} M "
                  f"params), {frames} frames, median ms per frame:")
    REPORT.append(f"{'variant':8} {'temporal':>9} {'/fp32':>6} {'depformer8':>10} {'/fp32':>6} "
                  f"{'logit rel-RMS err':>18}")
    for name in models:
        t, d = (statistics.median(v) for v in times[name])
        err = f"{np.median(errors[name]):.4f}" if errors[name] else "-"
        REPORT.append(f"{name:8} {t * 1e3:9.2f} {t / base_t:6.2f} {d * 1e3:10.2f} {d / base_d:6.2f} {err:>18}")


def _bytes_per_frame(cfg: LmConfig, bits: int | None, group: int, context_frames: int) -> dict[str, float]:
    """Weights read per live frame (temporal layers + text head + 8 depformer slices) and KV cache read."""
    def matrix(n_in, n_out):
        if bits is None:
            return 2 * n_in * n_out  # bf16
        return n_in * n_out * bits / 8 + 2 * 2 * n_in * n_out / group  # + bf16 scale and bias per group
    t, d = cfg.transformer, cfg.depformer
    layer = matrix(cfg.dim, 3 * cfg.dim) + matrix(cfg.dim, cfg.dim) + matrix(cfg.dim, 2 * t.ffn_hidden) \
        + matrix(t.ffn_hidden, cfg.dim)
    dep_slice_layer = matrix(cfg.depformer_dim, 3 * cfg.depformer_dim) + matrix(cfg.depformer_dim, cfg.depformer_dim) \
        + matrix(cfg.depformer_dim, 2 * d.ffn_hidden) + matrix(d.ffn_hidden, cfg.depformer_dim)
    dep_slice = matrix(cfg.dim, cfg.depformer_dim) + matrix(cfg.depformer_dim, cfg.card) \
        + cfg.depformer_num_layers * dep_slice_layer
    return {
        "temporal": cfg.num_layers * layer + matrix(cfg.dim, cfg.text_card),
        "depformer (8 slices)": cfg.agent_codebooks * dep_slice,
        "KV cache (bf16)": 2 * 2 * cfg.num_layers * cfg.dim * context_frames,
    }


def test_7b_bytes_per_frame_projection():
    cfg = personaplex_7b()
    REPORT.append("\n7B bytes read per live frame and the M4 floor at 120 GB/s (PROJECTION from shapes, "
                  "not a measurement):")
    for label, bits, group in (("bf16", None, 64), ("q8g64", 8, 64), ("q4g64", 4, 64), ("q4g32", 4, 32)):
        for frames in (1, 3000):
            parts = _bytes_per_frame(cfg, bits, group, frames)
            total = sum(parts.values())
            detail = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in parts.items())
            REPORT.append(f"{label:6} context {frames:4} frames: {total / 1e9:5.2f} GB ({detail}) "
                          f"-> floor {total / 120e9 * 1e3:5.1f} ms")


def test_report(capsys):
    with capsys.disabled():
        print("\n".join(REPORT))
