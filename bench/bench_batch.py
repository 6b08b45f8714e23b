"""The batched step (`BatchedSessions.step`) against the same calls stepped one after another
(`Session.step`, what the runner does today), for B = 1, 2, 4, 8, 16 calls.

Why: a Moshi-architecture step reads all its weights for every frame; B calls in one forward read them
once, so the cost per call should fall with B until the per-call work (attention over each call's own
ring, sampling, the codec's convolutions) dominates. The ratio "batched / B singles" says how much of a
frame's cost batching saves. Both sides step the same B sessions (a Session stepped alone and the batch
share the state), taking turns step by step so the shared machine's load falls on both alike; the
report is the median per step and the ratio in the same run.

Sizes: "tiny" (the tests' model: LM 1.6 M params, the tiny codec) and "quarter" (the LM of
bench_lm.py: a quarter of the 7B's width and depth, dim 1024, 8 layers, depformer 256 x 6, the real
vocabularies; with the tiny codec, because the full Mimi takes ~1 s per frame on this CPU, see
"Mimi codec per 80 ms frame"). Ring states: "fresh" (a call just joined: the ring holds the prompt, a
32-64 frame prefix is read) and "full" (every call past its 3000-frame context, offsets moved there:
the whole ring is read, as after 4 minutes of a call). Run (about 4 min on 2 cores):

    python -m pytest bench/bench_batch.py -p no:cacheprovider -q -s

MLX's CPU wheel (mlx-cpu) runs matmuls on the reference BLAS it bundles, which is compute-bound: B rows
cost B times one row, so batching saves little of the LM on this CPU. To see what a bandwidth-bound
matmul does (as OpenBLAS, Accelerate, Metal or CUDA are), run it again with OpenBLAS in front
(`apt-get install libopenblas0-pthread`; a measurement aid, not how the product runs):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python -m pytest bench/bench_batch.py -p no:cacheprovider -q -s
"""

import dataclasses
import statistics
import time

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.batch import BatchedSessions
from callbot.engine.model.lm import LM
from callbot.engine.model.lm_config import LmConfig
from callbot.engine.model.mimi import load_mimi
from callbot.engine.model.tokenizer import TextTokenizer
from callbot.engine.model.voices import VoiceLibrary, VoiceRecording
from callbot.engine.model.weights import MIMI_FILE, TEXT_TOKENIZER_FILE
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir
from tests.tiny_mimi import tiny_mimi_config, write_tiny_mimi

QUARTER = LmConfig(dim=1024, num_heads=8, num_layers=8, hidden_scale=4.125, context=3000,
                   depformer_dim=256, depformer_num_heads=4, depformer_num_layers=6,
                   depformer_dim_feedforward=int(4.125 * 256))
BATCHES = (1, 2, 4, 8, 16)
STEPS = {"tiny": 12, "quarter": 4}  # measured steps per batch size (after WARMUP)
WARMUP = 2
REPORT: list[str] = []


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))


def _tiny(tiny_dir) -> Model:
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(tiny_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


def _quarter(tiny_dir, tmp_path) -> Model:
    mx.random.seed(0)
    lm = LM(QUARTER)
    mx.eval(lm.parameters())
    mimi_cfg = dataclasses.replace(tiny_mimi_config(), quantizer_bins=QUARTER.card)
    mimi = load_mimi(write_tiny_mimi(tmp_path, mimi_cfg, seed=0, filename=MIMI_FILE), mimi_cfg)
    return Model(lm, mimi, TextTokenizer(tiny_dir / TEXT_TOKENIZER_FILE), VoiceLibrary(tiny_dir))


def _blas() -> str:
    """The BLAS MLX's CPU matmuls run on: the reference BLAS the mlx-cpu wheel bundles, unless another
    one was preloaded in front of it (numpy's own OpenBLAS has suffixed symbols and does not count)."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "blas" in line.lower()}
    preloaded = sorted(p for p in paths if "numpy.libs" not in p and "mlx_cpu.libs" not in p)
    return f"a preloaded BLAS ({', '.join(preloaded)})" if preloaded else "mlx-cpu's bundled reference BLAS"


def _stages(t0: int, encoded: int, stepped: int, t1: int) -> np.ndarray:
    return np.array([t1 - t0, encoded - t0, stepped - encoded, t1 - stepped], dtype=np.float64) / 1e9


def _measure(model: Model, snapshot, batch_size: int, steps: int, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """Median (total, Mimi encode, LM, Mimi decode) seconds of the batched step and of the B single
    steps (summed), over `steps` alternating rounds."""
    batch = BatchedSessions(model, batch_size)
    for slot in range(batch_size):
        batch.join(slot, snapshot, seed=slot)
        if full:
            for layer in batch.session(slot)._lm_state.cache.layers:
                layer.offset += layer.capacity  # the ring as after a long call (its contents do not matter here)
    rng = np.random.default_rng(batch_size)
    batched, singles = [], []
    for i in range(steps + WARMUP):
        pcm = (0.1 * rng.standard_normal((batch_size, 1920))).astype(np.float32)
        t0 = time.monotonic_ns()
        batch.step(pcm)
        one = _stages(t0, batch.last_encoded_ns, batch.last_stepped_ns, time.monotonic_ns())
        many = np.zeros(4)
        for slot in range(batch_size):
            session = batch.session(slot)
            t0 = time.monotonic_ns()
            session.step(pcm[slot])
            many += _stages(t0, session.last_encoded_ns, session.last_stepped_ns, time.monotonic_ns())
        if i >= WARMUP:
            batched.append(one)
            singles.append(many)
    return np.median(batched, axis=0), np.median(singles, axis=0)


@pytest.mark.parametrize("size", ["tiny", "quarter"])
def test_batched_step_against_single_steps(size, tiny_dir, tmp_path):
    model = _tiny(tiny_dir) if size == "tiny" else _quarter(tiny_dir, tmp_path)
    rng = np.random.default_rng(0)
    voice = VoiceRecording("noise", (0.1 * rng.standard_normal(5 * 1920)).astype(np.float32))
    snapshot = model.prepare(voice, "You are Jane.")
    params = sum(a.size for _, a in tree_flatten(model.lm.parameters())) / 1e6
    cap = model.lm.transformer.make_cache().layers[0].capacity
    spans = len([b for b in range(5, cap.bit_length()) if (1 << b) < cap]) + 1
    t0 = time.perf_counter()
    BatchedSessions(model, 16).warmup([16])  # before anything else ran: every graph is compiled here
    warmup = time.perf_counter() - t0
    REPORT.append(f"\n{size} (LM {params:.1f} M params, context {model.lm.cfg.context}), median ms per step, "
                  f"{STEPS[size]} steps per row; warmup([16]) {warmup:.1f} s (compiles {spans} ring spans and 2 "
                  f"depformer frames for 16 calls, one step each):")
    REPORT.append(f"{'ring':5} {'B':>3} {'batched':>9} {'B singles':>10} {'ratio':>6} {'per call':>9} "
                  f"{'encode':>7} {'LM':>6} {'decode':>7}  (stage ratios)")
    for full in (False, True):
        for b in BATCHES:
            one, many = _measure(model, snapshot, b, STEPS[size], full)
            ratio = one / many
            REPORT.append(f"{'full' if full else 'fresh':5} {b:3} {one[0] * 1e3:9.1f} {many[0] * 1e3:10.1f} "
                          f"{ratio[0]:6.2f} {one[0] / b * 1e3:9.1f} {ratio[1]:7.2f} {ratio[2]:6.2f} {ratio[3]:7.2f}")


def test_report(capsys):
    with capsys.disabled():
        print(f"\nMLX {mx.__version__} on {_blas()}")
        print("\n".join(REPORT))
