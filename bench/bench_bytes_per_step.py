"""Bytes read per batched step of the 7B, vs the number of calls B and how full their KV caches are, and
the step-time floor that implies on an M4, an M4 Pro and an H100/H200-class GPU: a PROJECTION from the
configuration, not a measurement.

Why: the 7B step is bound by memory bandwidth (a vector times each weight matrix), so the floor of a
step is the bytes it must read over the chip's bandwidth. A batch of B calls reads the weights once and
each call's own state (KV cache, embedding rows, the codec's transformer caches) once per call: this is
what decides how many calls one model steps within the 80 ms frame. Counted here:

- the temporal transformer (every layer's projections, FFN and norms), its output norm and text head;
- the embeddings: only the rows a step looks up (text + n_q audio streams per call);
- the depformer: per slice that runs, its input projection, embedding rows, output head and its weights
  in every layer (the norms are shared and read again per slice). A live call runs the agent's
  codebooks only (`LmConfig.agent_codebooks`: 8 of the 16 slices; the user's 8 are forced and skipped,
  engine/model/lm.py); NVIDIA's server runs all 16, shown for reference;
- Mimi: every parameter of the codec as loaded (8 codebooks, codebooks in float32) once per step
  (encoder side for the callers' frames, decoder side for the agent's), plus each call's two codec
  transformer caches (250 positions each, read every step once a call is 20 s old);
- the KV cache read per call: the ring span our step reads (`transformer.ring_span`: a power-of-two
  prefix while the ring fills, the whole context after), as bf16 or quantized (`kv_bits` 8 / 4, a bf16
  scale and bias per 64 values). The 7B's heads (128) hold whole quantization groups, so its ring is
  head-major and a step attends to it packed (`transformer.kv_fused_attention`: two quantized matmuls),
  reading exactly those bytes. The dequantizing path (before the fused attention; still the path of
  heads narrower than a group) also writes and reads a bf16 copy of the span: shown for comparison.

Quantized matrices: `bits` per value plus a scale and a bias per group of 64 values in the model's
float dtype (bf16 on Metal/CUDA), exactly as `weights.quantize_lm` stores them. The counting code is
checked against the byte sizes of the tiny model's loaded arrays (tests/test_bytes_per_step.py).
Activations, compute and kernel launches are not modelled: at large B a GPU is compute- or launch-bound
before it is bandwidth-bound, so the floor is a lower bound only.

    python bench/bench_bytes_per_step.py
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from callbot.engine.model.lm_config import LmConfig, personaplex_7b
from callbot.engine.model.mimi import MimiConfig, mimi_202407
from callbot.engine.model.transformer import KV_GROUP_SIZE, kv_head_major, ring_span
from callbot.engine.model.weights import Q4_GROUP_SIZE, Q8_GROUP_SIZE

# memory bandwidth, bytes per second (vendors' figures)
CHIPS = {"M4": 120e9, "M4 Pro": 273e9, "H100": 3.35e12, "H200": 4.8e12}
BATCHES = (1, 2, 4, 8, 16, 32, 64)
FILLS = (0, 750, 1500, 3000)
FRAME_MS = 80.0
GB = 1e9


@dataclass(frozen=True)
class Precision:
    """How the weights are stored: `bits` None = the float dtype itself; else quantized in groups."""

    name: str
    bits: int | None
    group_size: int = 64
    float_bytes: int = 2  # bf16 on Metal and CUDA; 4 on a CPU (float32)


Q4 = Precision("q4", 4, Q4_GROUP_SIZE)
Q8 = Precision("q8", 8, Q8_GROUP_SIZE)
BF16 = Precision("bf16", None)


def matrix_bytes(rows: int, cols: int, p: Precision) -> float:
    """A linear or embedding weight [rows, cols] as `quantize_lm` stores it: packed values plus a scale
    and a bias per group when its input width `cols` splits into groups, else the float array."""
    if p.bits is None or cols % p.group_size:
        return rows * cols * p.float_bytes
    return rows * cols * p.bits / 8 + 2 * rows * (cols // p.group_size) * p.float_bytes


def row_bytes(cols: int, p: Precision) -> float:
    """One looked-up row of an embedding of width `cols`."""
    return matrix_bytes(1, cols, p)


def lm_resident_bytes(cfg: LmConfig, p: Precision) -> dict[str, float]:
    """Bytes the loaded LM holds, by part (the same parts tests/test_bytes_per_step.py sums from the
    arrays of a loaded model): embeddings, temporal layers, output norm, text head, depformer."""
    t, dd = cfg.transformer, cfg.depformer_dim
    d, h = cfg.dim, t.ffn_hidden
    layer = (matrix_bytes(3 * d, d, p) + matrix_bytes(d, d, p) + matrix_bytes(2 * h, d, p)
             + matrix_bytes(d, h, p) + 2 * d * p.float_bytes)
    return {
        "text_emb": matrix_bytes(cfg.text_card + 1, d, p),
        "audio_embs": cfg.n_q * matrix_bytes(cfg.card + 1, d, p),
        "transformer": cfg.num_layers * layer,
        "out_norm": d * p.float_bytes,
        "text_linear": matrix_bytes(cfg.text_card, d, p),
        "depformer": sum(depformer_slice_bytes(cfg, p, k) for k in range(cfg.dep_q))
        + cfg.depformer_num_layers * 2 * dd * p.float_bytes,
    }


def depformer_slice_bytes(cfg: LmConfig, p: Precision, k: int, emb_rows: float | None = None) -> float:
    """The weights of depformer slice `k` (in every layer), without the shared norms; `emb_rows`: count
    that many rows of its embedding instead of the whole table (what a step reads)."""
    dd, hd = cfg.depformer_dim, cfg.depformer.ffn_hidden
    vocab = cfg.text_card + 1 if k == 0 else cfg.card + 1
    emb = matrix_bytes(vocab, dd, p) if emb_rows is None else emb_rows * row_bytes(dd, p)
    per_layer = (matrix_bytes(3 * dd, dd, p) + matrix_bytes(dd, dd, p) + matrix_bytes(2 * hd, dd, p)
                 + matrix_bytes(dd, hd, p))
    return matrix_bytes(dd, cfg.dim, p) + emb + matrix_bytes(cfg.card, dd, p) + cfg.depformer_num_layers * per_layer


def mimi_resident_bytes(cfg: MimiConfig, float_bytes: int = 2) -> float:
    """The codec as `load_mimi` holds it: its parameters in the float dtype, the codebooks in float32.
    Counted from the module's own arrays (lazy: nothing is allocated)."""
    from mlx.utils import tree_flatten

    from callbot.engine.model.mimi import Mimi

    total = 0.0
    for name, a in tree_flatten(Mimi(cfg).parameters()):
        total += a.size * (4 if ".codebooks." in name else float_bytes)
    return total


def mimi_kv_bytes(cfg: MimiConfig, float_bytes: int = 2) -> float:
    """A call's two codec transformer caches (encoder and decoder), full (`context` positions)."""
    t = cfg.transformer
    return 2 * t.num_layers * 2 * t.context * cfg.seanet.dimension * float_bytes


def kv_value_bytes(kv_bits: int | None, float_bytes: int = 2) -> float:
    """Bytes per cached key or value element: the float, or `kv_bits` plus a scale and bias per group."""
    if kv_bits is None:
        return float_bytes
    return kv_bits / 8 + 2 * float_bytes / KV_GROUP_SIZE


def kv_dequantizes(cfg: LmConfig) -> bool:
    """Whether a quantized ring of this model is read through a dequantized copy (heads narrower than a
    quantization group: position-major layout) rather than attended packed (the fused path)."""
    return not kv_head_major(cfg.transformer.head_dim, KV_GROUP_SIZE)


def kv_read_bytes(cfg: LmConfig, fill: int, kv_bits: int | None, float_bytes: int = 2,
                  dequantized: bool = False) -> float:
    """One call's KV cache read by one step at `fill` frames: the span the step reads (ring_span) x
    layers x keys and values x heads x head_dim. `dequantized`: plus the float copy of a quantized span,
    written and read back (the dequantize-then-SDPA path: `fused_kv = False`, or narrow heads)."""
    t = cfg.transformer
    span = ring_span(fill, cfg.context)
    values = cfg.num_layers * 2 * t.num_heads * t.head_dim * span
    total = values * kv_value_bytes(kv_bits, float_bytes)
    if dequantized and kv_bits is not None:
        total += 2 * values * float_bytes
    return total


def live_slices(cfg: LmConfig) -> int:
    """Depformer slices a live step runs: up to the last one not forced. The user's codebooks are forced
    (the caller's audio), so the agent's `agent_codebooks` run."""
    return cfg.agent_codebooks


@dataclass(frozen=True)
class StepBytes:
    shared: dict[str, float]  # read once per step, whatever B
    per_call: dict[str, float]  # read once per call in the batch

    def total(self, batch: int) -> float:
        return sum(self.shared.values()) + batch * sum(self.per_call.values())


def step_bytes(cfg: LmConfig, mimi: MimiConfig, p: Precision, fill: int, kv_bits: int | None,
               slices: int | None = None, dequantized: bool | None = None) -> StepBytes:
    """What one live step of B calls reads (B calls at the same `fill`). `dequantized`: whether a
    quantized ring is read through a float copy; None = as implemented for this model (`kv_dequantizes`)."""
    if dequantized is None:
        dequantized = kv_dequantizes(cfg)
    resident = lm_resident_bytes(cfg, p)
    n = live_slices(cfg) if slices is None else slices
    dd = cfg.depformer_dim
    depformer = sum(depformer_slice_bytes(cfg, p, k, emb_rows=0) for k in range(n)) \
        + n * cfg.depformer_num_layers * 2 * dd * p.float_bytes
    shared = {
        "temporal": resident["transformer"] + resident["out_norm"] + resident["text_linear"],
        f"depformer ({n} slices)": depformer,
        "Mimi": mimi_resident_bytes(mimi, p.float_bytes),
    }
    per_call = {
        "embedding rows": cfg.num_streams * row_bytes(cfg.dim, p) + n * row_bytes(dd, p),
        "KV cache": kv_read_bytes(cfg, fill, kv_bits, p.float_bytes, dequantized),
        "Mimi caches": mimi_kv_bytes(mimi, p.float_bytes),
    }
    return StepBytes(shared, per_call)


def max_calls(sb: StepBytes, bandwidth: float, budget_ms: float = FRAME_MS) -> int:
    """Most calls whose step floor fits `budget_ms` (0: not even one)."""
    room = budget_ms / 1e3 * bandwidth - sum(sb.shared.values())
    return max(0, int(room // sum(sb.per_call.values())))


def report(cfg: LmConfig | None = None, mimi: MimiConfig | None = None) -> list[str]:
    cfg = cfg if cfg is not None else personaplex_7b()
    mimi = mimi if mimi is not None else mimi_202407()
    kvs = ((None, "bf16"), (8, "kv8"), (4, "kv4"))
    lines = ["7B bytes read per live step and the bandwidth floor: PROJECTION from the configuration "
             "(engine/model/lm_config.py personaplex_7b), not a measurement", ""]
    for p in (Q4, Q8):
        sb = step_bytes(cfg, mimi, p, 0, None)
        nvidia = step_bytes(cfg, mimi, p, 0, None, slices=cfg.dep_q)
        shared = ", ".join(f"{k} {v / GB:.3f}" for k, v in sb.shared.items())
        lines.append(f"{p.name}: read once per step {sum(sb.shared.values()) / GB:.3f} GB ({shared}); "
                     f"all {cfg.dep_q} slices as NVIDIA runs them: depformer "
                     f"{nvidia.shared[f'depformer ({cfg.dep_q} slices)'] / GB:.3f} GB")
    per = step_bytes(cfg, mimi, Q4, 0, None).per_call
    lines.append(f"per call: embedding rows {per['embedding rows'] / 1e3:.1f} kB, Mimi caches "
                 f"{per['Mimi caches'] / 1e6:.1f} MB, KV cache per frame of span: bf16 "
                 f"{kv_read_bytes(cfg, cfg.context, None) / cfg.context / 1024:.0f} KiB, kv8 "
                 f"{kv_read_bytes(cfg, cfg.context, 8) / cfg.context / 1024:.0f} KiB, kv4 "
                 f"{kv_read_bytes(cfg, cfg.context, 4) / cfg.context / 1024:.0f} KiB")
    lines.append("fill = frames in each call's ring; span = what the step reads (ring_span)")
    lines.append("")
    lines.append("GB read per step, by B calls:")
    lines.append(f"{'weights':7} {'KV':5} {'fill':>5} {'span':>5} " + " ".join(f"{'B=' + str(b):>7}" for b in BATCHES))
    for p in (Q4, Q8):
        for kv_bits, kv_name in kvs:
            for fill in FILLS:
                sb = step_bytes(cfg, mimi, p, fill, kv_bits)
                span = ring_span(fill, cfg.context)
                lines.append(f"{p.name:7} {kv_name:5} {fill:5} {span:5} "
                             + " ".join(f"{sb.total(b) / GB:7.2f}" for b in BATCHES))
    lines.append("")
    lines.append(f"quantized KV read {'through a dequantized copy' if kv_dequantizes(cfg) else 'packed (fused attention)'} "
                 "above; the dequantize-then-SDPA path (fused_kv = False) also writes and reads a bf16 copy of "
                 "the span: GB per step at B = 1 / 16 / 64, fused vs dequantizing, and bf16 KV for reference")
    for p in (Q4,):
        for kv_bits, kv_name in kvs[1:]:
            for fill in (1500, 3000):
                fused = step_bytes(cfg, mimi, p, fill, kv_bits, dequantized=False)
                deq = step_bytes(cfg, mimi, p, fill, kv_bits, dequantized=True)
                ref = step_bytes(cfg, mimi, p, fill, None)
                lines.append(f"{p.name:7} {kv_name:5} {fill:5}: fused "
                             + " / ".join(f"{fused.total(b) / GB:.2f}" for b in (1, 16, 64))
                             + "   dequantizing " + " / ".join(f"{deq.total(b) / GB:.2f}" for b in (1, 16, 64))
                             + "   bf16 KV " + " / ".join(f"{ref.total(b) / GB:.2f}" for b in (1, 16, 64)))
    lines.append("")
    lines.append("step floor, ms (bytes / bandwidth: M4 120 GB/s, M4 Pro 273 GB/s, H100 3.35 TB/s, "
                 "H200 4.8 TB/s); 'calls' = most calls whose floor fits the 80 ms frame")
    lines.append(f"{'weights':7} {'KV':5} {'fill':>5} {'chip':7} "
                 + " ".join(f"{'B=' + str(b):>7}" for b in BATCHES) + f" {'calls':>6}")
    for p in (Q4, Q8):
        for kv_bits, kv_name in kvs:
            for fill in FILLS:
                sb = step_bytes(cfg, mimi, p, fill, kv_bits)
                for chip, bw in CHIPS.items():
                    lines.append(f"{p.name:7} {kv_name:5} {fill:5} {chip:7} "
                                 + " ".join(f"{sb.total(b) / bw * 1e3:7.2f}" for b in BATCHES)
                                 + f" {max_calls(sb, bw):6d}")
    return lines


def test_report(capsys):
    lines = report()
    with capsys.disabled():
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.stdout.write("\n".join(report()) + "\n")
