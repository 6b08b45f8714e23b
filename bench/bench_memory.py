"""Memory per call: RSS and MLX memory for one bot and N calls (N = 1, 2, 4), for each KV cache option
(the model's dtype, `kv_bits` 8 and 4) and a bot context of the model's 3000 frames or 1500.

Why: a call's memory is its KV cache (on the 7B 0.5 MiB per frame in bf16, 1.6 GB at the full
3000-frame context), and that decides how many calls and bots one machine holds. Before issue 13 every
prepared prompt and every open call allocated the whole ring up front and each snapshot kept its own;
now a snapshot keeps its prompt's frames, a call grows its ring with the call (engine/model/transformer.py,
KVCache) and may quantize it. This bench measures what a call costs in the states that matter:
"fresh" (4 frames after the prompt: the ring holds a 64-frame span) and "full" (past its context: the
whole ring), on the quarter LM of bench_lm.py (8 layers of dim 1024, context 3000: 64 KiB per frame in
float32, the same shape per layer as a quarter of the 7B) with the tiny codec, and on the tiny model.

MLX memory is `mx.get_active_memory()` (arrays alive) and `mx.get_cache_memory()` (freed buffers kept
for reuse, bounded by `bound_buffer_cache`); RSS is the process's resident set (/proc/self/status).
Deltas are against the model loaded and the bot prepared. Run (about 2 min on 2 cores):

    python -m pytest bench/bench_memory.py -p no:cacheprovider -q -s

The 7B figures here are computed from the configuration (layers x 2 x heads x head_dim x bytes per
value, the weights from their shapes with MLX's quantization); bench_memory_fullsize.py measures them on
a full-size checkpoint of random weights (`python -m bench.fullsize_checkpoint`), and they agree (the
loaded q4 model's MLX memory equals the count from the shapes to the byte; a call's ring is 1 MiB per
frame in float32 here, 512 KiB in bf16 on a Mac).
"""

from __future__ import annotations

import dataclasses
import gc

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from callbot.engine import Model
from callbot.engine.model.lm import LM
from callbot.engine.model.lm_config import LmConfig, personaplex_7b
from callbot.engine.model.mimi import load_mimi
from callbot.engine.model.tokenizer import TextTokenizer
from callbot.engine.model.transformer import KV_GROUP_SIZE
from callbot.engine.model.voices import VoiceLibrary, VoiceRecording
from callbot.engine.model.weights import MIMI_FILE, TEXT_TOKENIZER_FILE, Quantization, quantize_lm
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir
from tests.tiny_mimi import tiny_mimi_config, write_tiny_mimi

QUARTER = LmConfig(dim=1024, num_heads=8, num_layers=8, hidden_scale=4.125, context=3000,
                   depformer_dim=256, depformer_num_heads=4, depformer_num_layers=6,
                   depformer_dim_feedforward=int(4.125 * 256))
CALLS = (1, 2, 4)
MIB = 1024 * 1024
GB = 1e9
MIMI_PARAMS = 96.2e6  # the released Mimi (BENCHMARKS.md "Mimi codec per 80 ms frame")
REPORT: list[str] = []


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _settle() -> tuple[int, int, int]:
    gc.collect()
    return _rss(), mx.get_active_memory(), mx.get_cache_memory()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))


def _model(size: str, tiny_dir, tmp_path, kv_bits) -> Model:
    if size == "tiny":
        lm_cfg, mimi_cfg = tiny_model_configs()
        return Model.load(tiny_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False,
                          kv_bits=kv_bits)
    mx.random.seed(0)
    lm = LM(QUARTER)
    mx.eval(lm.parameters())
    mimi_cfg = dataclasses.replace(tiny_mimi_config(), quantizer_bins=QUARTER.card)
    mimi = load_mimi(write_tiny_mimi(tmp_path, mimi_cfg, seed=0, filename=MIMI_FILE), mimi_cfg)
    return Model(lm, mimi, TextTokenizer(tiny_dir / TEXT_TOKENIZER_FILE), VoiceLibrary(tiny_dir), kv_bits=kv_bits)


def _measure(model: Model, label: str, context: int | None) -> None:
    rng = np.random.default_rng(0)
    voice = VoiceRecording("noise", (0.1 * rng.standard_normal(5 * 1920)).astype(np.float32))
    snapshot = model.prepare(voice, "You are Jane.", context=context)
    snap_bytes = sum(a.nbytes for a in snapshot.lm.cache.arrays())
    cfg = model.lm.cfg
    cap = snapshot.lm.cache.capacity
    # what one full ring of this model would hold in float32 (the cache before this change, per call
    # and per snapshot)
    full_f32 = cfg.num_layers * 2 * cfg.dim * 4 * cap
    REPORT.append(f"{label:28} snapshot {snap_bytes / MIB:7.2f} MiB ({snapshot.lm.cache.offset} prompt frames; "
                  f"a full-size ring {full_f32 / MIB:.1f} MiB)")
    for n in CALLS:
        for state in ("fresh", "full"):
            rss0, act0, _ = _settle()
            sessions = [model.open_session(snapshot=snapshot, seed=i) for i in range(n)]
            for s in sessions:
                if state == "full":  # as after 4 minutes of a call: the ring filled and rotating
                    for layer in s._lm_state.cache.layers:
                        layer.fit(layer.capacity)
                        layer.offset = layer.capacity + 7
                for _ in range(4):
                    s.step((0.1 * rng.standard_normal(1920)).astype(np.float32))
            rss1, act1, cache1 = _settle()
            per_call = (act1 - act0) / n
            REPORT.append(f"{label:28} {n} call{'s' if n > 1 else ' '} {state:5}: MLX active +{(act1 - act0) / MIB:8.1f} MiB "
                          f"({per_call / MIB:6.1f} per call), MLX cache {cache1 / MIB:6.1f} MiB, "
                          f"RSS +{(rss1 - rss0) / MIB:8.1f} MiB")
            del sessions, s  # the loop's name holds the last session too
            mx.clear_cache()


@pytest.mark.parametrize("size, kv_bits, context", [
    ("tiny", None, None),
    ("quarter", None, None), ("quarter", 8, None), ("quarter", 4, None), ("quarter", None, 1500),
])
def test_memory_per_call(size, kv_bits, context, tiny_dir, tmp_path):
    model = _model(size, tiny_dir, tmp_path, kv_bits)
    label = f"{size} kv {kv_bits or 'f32'} ctx {context or model.lm.cfg.context}"
    _measure(model, label, context)
    del model
    gc.collect()
    mx.clear_cache()


def kv_bytes_per_frame(cfg: LmConfig, value_bytes: float, kv_bits: int | None) -> float:
    """Bytes one frame adds to a call's ring: layers x (keys + values) x heads x head_dim, each value
    `value_bytes` wide, or `kv_bits` wide plus a scale and a bias (`value_bytes` each) per group."""
    t = cfg.transformer
    values = cfg.num_layers * 2 * t.num_heads * t.head_dim
    if kv_bits is None:
        return values * value_bytes
    return values * kv_bits / 8 + values / KV_GROUP_SIZE * 2 * value_bytes


def weight_bytes_7b(quantize: str | None) -> float:
    """Resident bytes of the 7B LM (bf16, or q4/q8 as `load_lm` quantizes: every linear and embedding),
    from its shapes (lazy arrays: nothing is allocated), plus the released Mimi in bf16."""
    lm = LM(personaplex_7b())
    lm.set_dtype(mx.bfloat16)
    if quantize:
        quantize_lm(lm, Quantization(4 if quantize == "q4" else 8, 64))
    return sum(a.nbytes for _, a in tree_flatten(lm.parameters())) + 2 * MIMI_PARAMS


def test_7b_on_a_mac_computed():
    """1 model + 2 bots + 4 calls at full context in bf16 on Metal (half the float32 KV bytes measured
    here), per option: does it fit in 8 GB? PROJECTION from the configuration, not a measurement."""
    cfg = personaplex_7b()
    prompt_frames = 300  # a saved voice prompt (~20 s) + spacers + a persona of ~100 tokens
    REPORT.append("\n7B on a Mac (Metal, bf16), 1 model + 2 bots + 4 calls at full context: PROJECTION from "
                  "the configuration")
    for kv_bits in (None, 8, 4):
        per_frame = kv_bytes_per_frame(cfg, 2, kv_bits)
        REPORT.append(f"KV {('bf16' if kv_bits is None else f'{kv_bits}-bit'):6}: {per_frame / 1024:6.1f} KiB per frame, "
                      f"{per_frame * cfg.context / GB:5.2f} GB per call at 3000 frames, "
                      f"{per_frame * 1500 / GB:5.2f} GB at 1500")
    weights = {q: weight_bytes_7b(q) for q in ("q4", "q8")}
    REPORT.append(f"weights: q4 {weights['q4'] / GB:.2f} GB, q8 {weights['q8'] / GB:.2f} GB (LM + Mimi bf16); "
                  f"MLX buffer cache bound 0.54 GB")
    for q in ("q4",):
        for kv_bits in (None, 8, 4):
            for context in (3000, 2000, 1500):
                per_frame = kv_bytes_per_frame(cfg, 2, kv_bits)
                calls = 4 * per_frame * context
                bots = 2 * per_frame * prompt_frames
                total = weights[q] + bots + calls + 512 * MIB
                REPORT.append(f"{q} kv {('bf16' if kv_bits is None else kv_bits):>4} context {context}: weights "
                              f"{weights[q] / GB:.2f} + 2 bots {bots / GB:.2f} + 4 calls {calls / GB:.2f} + cache 0.54 "
                              f"= {total / GB:5.2f} GB -> {'fits' if total < 8 * GB else 'over'} 8 GB")
    before = weights["q4"] + (2 + 4 + 1) * kv_bytes_per_frame(cfg, 2, None) * cfg.context
    REPORT.append(f"before (every prompt and call a whole bf16 ring, one more at warm-up): {before / GB:.2f} GB")


def test_report(capsys):
    with capsys.disabled():
        print("\n" + "\n".join(REPORT))
