"""Mimi per-frame cost (encode_step, decode_step) against Kyutai's `moshi_mlx` 0.3.0, in one run.

Why: the codec runs twice per 80 ms frame (caller in, agent out) beside the 7B step, so its cost is
part of the real-time budget. Both implementations load the same random NVIDIA-layout checkpoint and
take turns frame by frame (ours encode, theirs encode, ours decode, theirs decode), so the shared
machine's load falls on both alike; the report is the median per frame and the ratio ours / theirs.
The comparison is of cost only: moshi_mlx 0.3.0's Mimi transformers use `nn.gelu_approx` where Kyutai's
PyTorch (and ours) use the exact GELU, and attend without a causal mask inside a call (a streaming step
carries 2 positions), so its codes and audio differ from PyTorch's; ours equal PyTorch's. (Fed one
position per call with the exact GELU patched in, its transformer equals ours to 0.0.)
Sizes: "tiny" (the tests' codec) and "full" (the released Mimi, 96 M parameters; slow on CPU).
Run (about 1 min on 2 cores):

    python -m pytest bench/bench_mimi.py -p no:cacheprovider -q -s
"""

import statistics
import time

import mlx.core as mx
import numpy as np
import pytest

from callbot.engine.model.mimi import MimiState, load_mimi, mimi_202407
from tests.tiny_mimi import tiny_mimi_config, write_tiny_mimi

moshi_mimi = pytest.importorskip("moshi_mlx.models.mimi")

FRAMES = {"tiny": 40, "full": 10}
WARMUP = 2
RESULTS: dict[str, dict[str, float]] = {}


def _reference(cfg, path):
    """Kyutai's MLX Mimi of the same shape with the same weights (it builds 8 of the 32 codebooks)."""
    base = moshi_mimi.mimi_202407(cfg.num_codebooks)
    sea, t = cfg.seanet, cfg.transformer
    base.seanet.dimension, base.seanet.nfilters = sea.dimension, sea.n_filters
    base.transformer.d_model, base.transformer.num_heads = sea.dimension, t.num_heads
    base.transformer.num_layers, base.transformer.dim_feedforward = t.num_layers, t.dim_feedforward
    base.quantizer_dim, base.quantizer_bins = cfg.quantizer_dim, cfg.quantizer_bins
    model = moshi_mimi.Mimi(base)
    model.load_pytorch_weights(path, strict=False)
    return model


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    mx.eval(out[0] if isinstance(out, tuple) else out)  # ours returns (result, state): evaluate the result
    return time.perf_counter() - start, out


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_frame_cost(tmp_path, size):
    cfg = tiny_mimi_config() if size == "tiny" else mimi_202407()
    path = write_tiny_mimi(tmp_path, cfg, seed=0)
    ours, theirs = load_mimi(path, cfg), _reference(cfg, path)
    n = FRAMES[size]
    pcm = (0.1 * np.random.default_rng(0).normal(size=n * cfg.frame_size)).astype(np.float32)
    times = {key: [] for key in ("ours encode", "moshi_mlx encode", "ours decode", "moshi_mlx decode")}
    state = MimiState()
    for i in range(n):
        frame = pcm[i * cfg.frame_size:(i + 1) * cfg.frame_size]
        t, (codes, state) = _timed(lambda: ours.encode_step(frame, state))
        times["ours encode"].append(t)
        t, _ = _timed(lambda: theirs.encode_step(mx.array(frame)[None, None]))
        times["moshi_mlx encode"].append(t)
        t, (_, state) = _timed(lambda: ours.decode_step(codes, state))
        times["ours decode"].append(t)
        t, _ = _timed(lambda: theirs.decode_step(codes[None, :, None].astype(mx.uint32)))
        times["moshi_mlx decode"].append(t)
    RESULTS[size] = {key: statistics.median(values[WARMUP:]) * 1e3 for key, values in times.items()}


def test_report(capsys):
    if not RESULTS:
        pytest.skip("no sizes ran")
    lines = [f"{'size':6}{'step':8}{'ours ms':>10}{'moshi_mlx ms':>14}{'ours/theirs':>13}"]
    for size, r in RESULTS.items():
        for step in ("encode", "decode"):
            a, b = r[f"ours {step}"], r[f"moshi_mlx {step}"]
            lines.append(f"{size:6}{step:8}{a:10.1f}{b:14.1f}{a / b:13.2f}")
    with capsys.disabled():
        print("\nMimi per 80 ms frame (median, frames after the first 2)\n" + "\n".join(lines))
