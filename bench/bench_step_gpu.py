"""The full-size 7B's batched step at B = 1 .. 64 calls on MLX's CUDA build (issue 13, point 8), each
row against B steps of one call alone, measured in the same run (the baseline: `Session.step` of one of
the batch's calls, interleaved step by step with the batched step, so the machine's state falls on both
alike).

Why a script of its own, not bench_batch.py: a GPU machine is lent for minutes (the device tool: 15
minutes a session, nothing downloadable there), so this one builds the 7B in memory with random weights
in the exact configuration (`LM(personaplex_7b())` cast to bf16 and quantized as `Model.load(...,
quantize="q4")` does: `quantize_lm`), the released Mimi's configuration with random weights through the
real Mimi loader, and prints one table; writing and reading the 16.7 GB checkpoint
(bench/fullsize_checkpoint.py) would take most of the lease (`--folder` loads one instead, through
`Model.load`). The outputs of random weights mean nothing; the step's cost is the same arrays' cost.

Rings: "short" (every call 200 frames in: a 256-slot ring read, as 16 s into a call) and "full" (every
call past its 3000-frame context: the whole ring read, as after 4 minutes), positioned as
bench_memory_fullsize.py does (the rings grown to that span, then really stepped). A "full" row whose
rings would not fit in 80 % of the device's memory is skipped and said. Per row: the batched step's
median and p90 (ms), the B singles' median, their ratio, ms per call, and the device memory peak.

    python -m bench.bench_step_gpu --size 7b --quantize q4 --json $OUT/step.json   # on the GPU machine
    python -m bench.bench_step_gpu --size tiny --batches 1,2,4 --steps 3           # anywhere (CPU): a check

bench/device_step.sh runs it on the device machine, bench/device_pack.py packs MLX's CUDA build for it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RINGS = {"short": 200, "full": "full"}
WARMUP = 3  # steps per row before the measured ones (the first compiles the batch size's graphs)


def _configs(size: str):
    if size == "7b":
        from callbot.engine.model.lm_config import personaplex_7b
        from callbot.engine.model.mimi import mimi_202407

        return personaplex_7b(), mimi_202407()
    from tests.tiny_assets import tiny_model_configs

    return tiny_model_configs()


def build_model(size: str, quantize: str | None, kv_bits: int | None, folder: str | None, tmp: Path):
    """The model: loaded from `folder` through `Model.load`, else built in memory with random weights."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from callbot.engine.model.lm import LM
    from callbot.engine.model.mimi import load_mimi
    from callbot.engine.model.session import Model
    from callbot.engine.model.tokenizer import TextTokenizer
    from callbot.engine.model.voices import VoiceLibrary
    from callbot.engine.model.weights import (MIMI_FILE, TEXT_TOKENIZER_FILE, default_dtype, parse_quantization,
                                              quantize_lm)
    from tests.tiny_assets import train_sentencepiece

    lm_cfg, mimi_cfg = _configs(size)
    if folder is not None:
        return Model.load(folder, quantize, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False,
                          progress=False, kv_bits=kv_bits)
    dtype = default_dtype()
    mx.random.seed(0)
    lm = LM(lm_cfg)
    lm.update(tree_map(lambda a: a.astype(dtype), lm.parameters()))
    q = parse_quantization(quantize)
    if q is not None:
        quantize_lm(lm, q)
    mx.eval(lm.parameters())
    if size == "7b":
        from bench.fullsize_checkpoint import write_mimi

        write_mimi(tmp / MIMI_FILE, mimi_cfg)
    else:
        from tests.tiny_mimi import write_tiny_mimi

        write_tiny_mimi(tmp, mimi_cfg, seed=0, filename=MIMI_FILE)
    mimi = load_mimi(tmp / MIMI_FILE, mimi_cfg, dtype=dtype)
    train_sentencepiece(tmp / TEXT_TOKENIZER_FILE, vocab_size=96)
    return Model(lm, mimi, TextTokenizer(tmp / TEXT_TOKENIZER_FILE), VoiceLibrary(tmp), kv_bits=kv_bits)


def _place(batch, slots: int, frames) -> None:
    """Every call's rings where a call `frames` long holds them (bench_memory_fullsize._fill)."""
    from bench.bench_memory_fullsize import _fill

    for slot in range(slots):
        _fill(batch.session(slot)._lm_state.cache, frames)


def ring_bytes(model, frames) -> int:
    """Bytes of one call's rings at `frames` (the whole ring for "full"): one call's state, placed there."""
    import mlx.core as mx

    from bench.bench_memory_fullsize import _fill

    state = model.lm.new_state(model.sampling)
    _fill(state.cache, frames)
    size = sum(a.nbytes for a in state.cache.arrays())
    del state
    mx.clear_cache()
    return size


def measure(model, snapshot, batch_size: int, frames, steps: int) -> dict:
    """One row: `steps` batched steps of `batch_size` calls, each followed by one call's step alone."""
    import mlx.core as mx

    from callbot.engine.model.batch import BatchedSessions

    batch = BatchedSessions(model, batch_size)
    for slot in range(batch_size):
        batch.join(slot, snapshot, seed=slot)
    _place(batch, batch_size, frames)
    alone = batch.session(0)
    rng = np.random.default_rng(batch_size)
    mx.reset_peak_memory()
    batched, single = [], []
    for i in range(steps + WARMUP):
        pcm = (0.1 * rng.standard_normal((batch_size, 1920))).astype(np.float32)
        t0 = time.perf_counter()
        batch.step(pcm)
        t1 = time.perf_counter()
        alone.step(pcm[0])
        t2 = time.perf_counter()
        if i >= WARMUP:
            batched.append(t1 - t0)
            single.append(t2 - t1)
    one, many = statistics.median(batched), statistics.median(single) * batch_size
    row = {"ring": "full" if frames == "full" else f"{frames} frames", "batch": batch_size,
           "batched_ms": one * 1e3, "batched_p90_ms": float(np.percentile(batched, 90)) * 1e3,
           "singles_ms": many * 1e3, "ratio": one / many, "per_call_ms": one / batch_size * 1e3,
           "peak_gb": mx.get_peak_memory() / 1e9}
    del batch, alone
    mx.clear_cache()
    return row


def _device() -> str:
    import mlx.core as mx

    info = {}
    try:
        info = mx.device_info()
    except (AttributeError, RuntimeError):
        pass
    name = info.get("device_name") or info.get("architecture") or platform.processor() or platform.machine()
    return f"{mx.default_device()} ({name}), mlx {mx.__version__}"


def _memory_bytes() -> int | None:
    import mlx.core as mx

    try:
        return int(mx.device_info().get("memory_size")) or None
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None


def run(size: str, quantize: str | None, kv_bits: int | None, batches: list[int], rings: list[str], steps: int,
        folder: str | None = None, say=print) -> dict:
    import mlx.core as mx

    from callbot.engine.model.voices import VoiceRecording

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(size, quantize, kv_bits, folder, Path(tmp))
    built = time.perf_counter() - t0
    weights_gb = mx.get_active_memory() / 1e9
    rng = np.random.default_rng(0)
    voice = VoiceRecording("noise", (0.1 * rng.standard_normal(5 * 1920)).astype(np.float32))
    t0 = time.perf_counter()
    snapshot = model.prepare(voice, "You are Jane.")
    prepared = time.perf_counter() - t0
    memory = _memory_bytes()
    report = {"device": _device(), "size": size, "quantize": quantize or "none", "kv_bits": kv_bits,
              "context": model.lm.cfg.context, "built_s": built, "prompt_s": prepared, "weights_gb": weights_gb,
              "device_memory_gb": memory / 1e9 if memory else None, "rows": [], "skipped": []}
    say(f"{report['device']}: {size} {report['quantize']}, KV {kv_bits or 'bf16/fp32'}, built in {built:.1f} s "
        f"({weights_gb:.2f} GB), prompt {prepared:.1f} s")
    say(f"{'ring':11} {'B':>3} {'batched':>9} {'p90':>8} {'B singles':>10} {'ratio':>6} {'per call':>9} {'peak GB':>8}")
    for ring in rings:
        frames = RINGS[ring]
        for b in batches:
            need = b * ring_bytes(model, frames)
            if memory and weights_gb * 1e9 + need > 0.8 * memory:
                report["skipped"].append({"ring": ring, "batch": b, "rings_gb": need / 1e9})
                say(f"{ring:11} {b:3} skipped: {need / 1e9:.1f} GB of rings over 80 % of the device's memory")
                continue
            try:
                row = measure(model, snapshot, b, frames, steps)
            except (RuntimeError, MemoryError) as err:  # the device out of memory: the rows before it stand
                report["skipped"].append({"ring": ring, "batch": b, "error": str(err).splitlines()[0][:200]})
                say(f"{ring:11} {b:3} failed: {str(err).splitlines()[0][:200]}")
                mx.clear_cache()
                continue
            report["rows"].append(row)
            say(f"{row['ring']:11} {b:3} {row['batched_ms']:9.1f} {row['batched_p90_ms']:8.1f} {row['singles_ms']:10.1f} "
                f"{row['ratio']:6.2f} {row['per_call_ms']:9.2f} {row['peak_gb']:8.2f}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_step_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--quantize", choices=["q4", "q8", "none"], default="q4")
    parser.add_argument("--kv-bits", type=int, choices=[8, 4], default=None)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--rings", default="short,full")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per row")
    parser.add_argument("--folder", default=None, help="a model folder to load (Model.load) instead")
    parser.add_argument("--json", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rings = args.rings.split(",")
    if any(b < 1 for b in batches) or any(r not in RINGS for r in rings) or args.steps < 1:
        print("bench_step_gpu: batches >= 1, rings among short,full, steps >= 1", file=sys.stderr)
        return 2
    report = run(args.size, None if args.quantize == "none" else args.quantize, args.kv_bits, batches, rings,
                 args.steps, args.folder, say=lambda line: print(line, flush=True))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
