"""Memory of the full-size 7B on this CPU: the load, a prepared bot, 1 bot + N calls at a few context
fills, 8- and 4-bit KV caches, two bots, the warm-up; measured, then the 16 GB Mac's figure computed
from it.

Why: bench_memory.py measures a quarter-size LM and projects the 7B from its configuration; this runs
the real loader on arrays of the real sizes (`Model.load(folder, quantize="q4")` on a folder that
`python -m bench.fullsize_checkpoint` writes: random weights in the exact layout), so the load's peak,
the converted model's resident size, a bot's snapshot and a call's ring are the bytes MLX really holds.

Each scenario runs in its own process (a clean peak resident set): the load, then the steps of the
scenario, each recorded as RSS (VmRSS), the peak RSS since the last record (VmHWM, reset through
/proc/self/clear_refs), MLX active memory (arrays alive), MLX peak (since the last record) and MLX's
cache of freed buffers. Stepping the 7B on this CPU takes seconds per frame, so a call's context fill
is set rather than stepped: its rings are grown to the span a call of that many frames holds (what
the step itself does, `KVCache.fit`) and positioned there, then the call takes one real step. The
"grow" scenario does the same on the LM alone at 2048 frames, so that its step grows the ring to the
3000-frame context (the largest growth a call makes) and the peak shows what growing costs. The bytes per
frame come from those measurements; the full-context figure is a measured ring, not an extrapolation.

Skipped unless CALLBOT_FULLSIZE_CKPT names the folder (never in CI: 17 GB of disk, 6-13 GB of memory per
process, about an hour on 2 shared cores, 19 minutes of it the 4-row warm-up):

    python -m bench.fullsize_checkpoint /work/fullsize-ckpt
    CALLBOT_FULLSIZE_CKPT=/work/fullsize-ckpt python -m pytest bench/bench_memory_fullsize.py -p no:cacheprovider -q -s
    python -m bench.bench_memory_fullsize /work/fullsize-ckpt SCENARIO > S.jsonl   # one scenario, JSON lines
    python -m bench.bench_memory_fullsize mac calls-f32=F.jsonl calls-kv8=E.jsonl calls-kv4=Q.jsonl  # the Mac
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

GB = 1e9
MIB = 1024 * 1024
CALLS = (1, 2, 4)
FILLS = ("fresh", 1000, "full")
# no persona text: the test tokenizer spells a persona in ~30 tokens, each a 7B prompt step (seconds here);
# the snapshot's bytes per frame are what the Mac figure scales to a real prompt
PERSONAS = (("NATF0", ""), ("NATM1", ""))
SCENARIOS = ("calls-f32", "calls-kv8", "calls-kv4", "grow", "two-bots", "warmup-1", "warmup-4-kv4")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Records RSS and MLX memory at points of a scenario; each record's peaks are since the last one."""

    def __init__(self, out=sys.stdout):
        import mlx.core as mx

        self.mx = mx
        self.out = out
        self.t = time.monotonic()

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set (VmHWM)
            f.write("5")
        self.mx.reset_peak_memory()
        self.t = time.monotonic()

    def record(self, what: str, **extra) -> dict:
        gc.collect()
        mx = self.mx
        row = {"what": what, "s": round(time.monotonic() - self.t, 1), "rss": _status("VmRSS:"),
               "rss_peak": _status("VmHWM:"), "active": mx.get_active_memory(), "mlx_peak": mx.get_peak_memory(),
               "mlx_cache": mx.get_cache_memory(), **extra}
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        self.reset()
        return row


def _fill(cache, frames: int | str) -> None:
    """Put a call's rings where a call `frames` long holds them: grown to that span ("full": the whole
    ring, rotating), as the step grows them. The next real step then reads and writes them."""
    import mlx.core as mx

    from callbot.engine.model.transformer import ring_span

    for layer in cache.layers:
        cap = layer.capacity
        if frames == "grow":  # 2048 frames written in a 2048-slot ring: the next step grows it to the context
            layer.fit(2048)
            layer.offset = 2048
        else:
            at = cap + 7 if frames == "full" else int(frames)
            layer.fit(ring_span(at, cap))
            layer.offset = at
        # keys and values in buffers of their own, as a call that wrote them holds them
        layer.values = tuple(a + 0 for a in layer.values) if isinstance(layer.values, tuple) else layer.values + 0
        mx.eval(layer.keys, layer.values)


def run(folder: str, scenario: str) -> None:
    import mlx.core as mx
    import numpy as np

    from callbot.engine import Model
    from callbot.engine.model.batch import BatchedSessions

    kv_bits = {"calls-kv8": 8, "calls-kv4": 4, "warmup-4-kv4": 4}.get(scenario)
    meter = Meter()
    meter.reset()
    model = Model.load(folder, "q4", cache_dir=str(Path(folder) / "cache"), progress=False, kv_bits=kv_bits)
    meter.record("load", kv_bits=kv_bits)
    if scenario.startswith("warmup"):
        rows = (1,) if scenario == "warmup-1" else (1, 2, 3, 4)
        compiled = model.lm.warmup(model.sampling, rows=rows)
        meter.record("warmup", rows=list(rows), spans=len(compiled))
        return
    if scenario == "grow":
        # the largest growth a call's ring makes, 2048 slots to the 3000-frame context, on the LM alone
        from callbot.engine.model.sampling import SamplingConfig

        state = model.lm.new_state(SamplingConfig(text_temperature=0.0, audio_temperature=0.0))
        state.offset, state.tokens[:] = 5, 1
        _fill(state.cache, "grow")
        meter.record("ring at 2048", ring_bytes=sum(a.nbytes for a in state.cache.arrays()))
        for what in ("grown to 3000", "next step"):
            t0 = time.monotonic()
            model.lm.step_slots([state], [np.ones(model.lm.cfg.agent_codebooks, np.int64)])
            meter.record(what, step_s=round(time.monotonic() - t0, 2), ring_bytes=sum(a.nbytes for a in state.cache.arrays()),
                         allocated=state.cache.layers[0].allocated)
        return
    snapshots = []
    for voice, persona in PERSONAS[: 2 if scenario == "two-bots" else 1]:
        snap = model.prepare(voice, persona)
        snapshots.append(snap)
        meter.record("bot prepared", prompt_frames=snap.lm.cache.offset,
                     snapshot_bytes=sum(a.nbytes for a in snap.lm.cache.arrays()))
    if scenario == "two-bots":
        return
    rng = np.random.default_rng(0)
    batch = BatchedSessions(model, slots=max(CALLS))
    for n in CALLS:
        for fill in FILLS:
            if n == 4 and fill == "full" and kv_bits is None:
                # 4 float32 rings of 3.15 GB + the model: 18 GB, more than this shared 24 GB machine
                # lends one bench; per call it is the 1- and 2-call figure (measured linear)
                meter.record("skipped", calls=n, fill=fill, reason="4 full float32 rings: 18 GB")
                continue
            for slot in range(n):
                batch.join(slot, snapshots[0], seed=slot)
                if fill != "fresh":
                    _fill(batch.session(slot)._lm_state.cache, fill)
            pcm = (0.05 * rng.standard_normal((batch.slots, 1920))).astype(np.float32)
            active = np.arange(batch.slots) < n
            t0 = time.monotonic()
            batch.step(pcm, active)
            step_s = time.monotonic() - t0
            ring = sum(a.nbytes for slot in range(n) for a in batch.session(slot)._lm_state.cache.arrays())
            meter.record("calls", calls=n, fill=fill, step_s=round(step_s, 2), ring_bytes=ring,
                         allocated=batch.session(0)._lm_state.cache.layers[0].allocated)
            for slot in range(n):
                batch.leave(slot)
            mx.clear_cache()
            meter.record("calls left", calls=n, fill=fill)


PROMPT_FRAMES = 300  # a real bot's prompt: a saved voice prompt (~20 s) + spacers + a persona of ~100 tokens
MAC_CALLS, MAC_BOTS, MAC_LIMIT = 4, 2, 8e9


def mac_figure(runs: dict[str, list[dict]]) -> list[str]:
    """The 16 GB Mac's memory for 1 model q4 + 2 bots + 4 calls at full context (bf16 on Metal), from
    what was measured here: the model's bytes as counted from its shapes (equal to the bytes measured
    here, float32 scales and codec, to within a few bytes), each KV option's measured bytes per frame
    scaled to bf16 scales and values, the measured transient of a step (MLX's peak over its active
    memory, per call: float temporaries, so half on a Mac) for 4 calls, MLX's cache at its bound and the
    process's own overhead as measured (RSS beyond MLX). An upper bound: the cache's freed buffers are
    what the next step's temporaries reuse, and both are counted."""
    from bench.bench_bytes_per_step import Precision, kv_value_bytes, lm_resident_bytes, mimi_resident_bytes
    from callbot.engine.model.lm_config import personaplex_7b
    from callbot.engine.model.mimi import mimi_202407
    from callbot.engine.model.session import BUFFER_CACHE_LIMIT

    cfg = personaplex_7b()
    lines = []
    counted_cpu = sum(lm_resident_bytes(cfg, Precision("q4", 4, 64, 4)).values()) + mimi_resident_bytes(mimi_202407(), 4)
    weights = sum(lm_resident_bytes(cfg, Precision("q4", 4, 64, 2)).values()) + mimi_resident_bytes(mimi_202407(), 2)
    load = next(r for rows in runs.values() for r in rows if r["what"] == "load")
    overhead = load["rss"] - load["active"] - load["mlx_cache"]
    lines.append(f"q4 model: measured here {load['active'] / GB:.3f} GB of MLX arrays, counted from the shapes "
                 f"{counted_cpu / GB:.3f} GB (float32 scales and codec); on a Mac (bf16) {weights / GB:.3f} GB; "
                 f"process overhead beyond MLX {overhead / GB:.2f} GB")
    for scenario, kv_bits in (("calls-f32", None), ("calls-kv8", 8), ("calls-kv4", 4)):
        rows = [r for r in runs.get(scenario, []) if r["what"] == "calls" and r["fill"] == "full"]
        if not rows:
            continue
        scale = kv_value_bytes(kv_bits, 2) / kv_value_bytes(kv_bits, 4)
        per_frame = rows[0]["ring_bytes"] / (rows[0]["calls"] * rows[0]["allocated"]) * scale
        # a step's temporaries (the dequantized spans of a quantized ring, activations) are float: half here
        transient = max((r["mlx_peak"] - r["active"]) / r["calls"] for r in rows) / 2 * MAC_CALLS
        calls = MAC_CALLS * per_frame * cfg.context
        bots = MAC_BOTS * per_frame * PROMPT_FRAMES
        total = weights + bots + calls + transient + BUFFER_CACHE_LIMIT + overhead
        name = "bf16" if kv_bits is None else f"kv_bits {kv_bits}"
        lines.append(f"{name:9}: {per_frame / 1024:5.0f} KiB/frame; model {weights / GB:.2f} + {MAC_BOTS} bots "
                     f"{bots / GB:.2f} + {MAC_CALLS} calls {calls / GB:.2f} + step transient {transient / GB:.2f} + "
                     f"MLX cache {BUFFER_CACHE_LIMIT / GB:.2f} + overhead {overhead / GB:.2f} = {total / GB:5.2f} GB "
                     f"-> {'under' if total < MAC_LIMIT else 'OVER'} 8 GB")
        room = MAC_LIMIT - (weights + bots + transient + BUFFER_CACHE_LIMIT + overhead)
        lines.append(f"{'':11}longest context for 4 calls under 8 GB: {int(room / (MAC_CALLS * per_frame))} frames")
    return lines


def _scenario(folder: str, scenario: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "bench.bench_memory_fullsize", folder, scenario],
                          capture_output=True, text=True, timeout=3600, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        raise RuntimeError(f"{scenario}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


FOLDER = os.environ.get("CALLBOT_FULLSIZE_CKPT")


RUNS: dict[str, list[dict]] = {}


@pytest.mark.skipif(not FOLDER, reason="CALLBOT_FULLSIZE_CKPT not set (a folder written by bench.fullsize_checkpoint)")
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fullsize_memory(scenario, capsys):
    rows = RUNS[scenario] = _scenario(FOLDER, scenario)
    with capsys.disabled():
        print(f"\n{scenario}:")
        for r in rows:
            extra = {k: v for k, v in r.items() if k not in ("what", "s", "rss", "rss_peak", "active", "mlx_peak",
                                                             "mlx_cache")}
            print(f"  {r['what']:13} {r['s']:6.1f} s  RSS {r['rss'] / GB:6.2f} GB (peak {r['rss_peak'] / GB:6.2f})  "
                  f"MLX active {r['active'] / GB:6.2f} GB (peak {r['mlx_peak'] / GB:6.2f}, cache "
                  f"{r['mlx_cache'] / GB:5.2f})  {json.dumps(extra)}")


@pytest.mark.skipif(not FOLDER, reason="CALLBOT_FULLSIZE_CKPT not set")
def test_mac_figure(capsys):
    with capsys.disabled():
        print("\n16 GB Mac, 1 model q4 + 2 bots + 4 calls at full context, computed from the measurements above:")
        print("\n".join(mac_figure(RUNS)))


if __name__ == "__main__":
    if sys.argv[1] == "mac":  # the Mac figure from saved runs: mac SCENARIO=FILE.jsonl ...
        saved = {a.split("=")[0]: [json.loads(x) for x in open(a.split("=")[1])] for a in sys.argv[2:]}
        print("\n".join(mac_figure(saved)))
    else:
        run(sys.argv[1], sys.argv[2])
