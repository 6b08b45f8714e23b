"""How long a caller goes unheard while `set_persona` swaps the system prompt in a running call.

Why: a persona change (engine/model/persona_swap.py) stops feeding the caller's audio, lets the agent
finish its utterance (2 PADs in a row, at most 48 steps), forces the persona's tokens one per step and
0.5 s of spacer, then resumes. The caller's wait is counted in 80 ms steps, so it is the same on any
machine whose step keeps up with real time; what varies is the number of steps. This measures, on the
tiny model, the steps waited and forced for two personas, with the random weights (which never pause:
the 48-step limit) and with the PAD logit scaled 20x (an agent that does pause), and the cost of a swap
step against a normal step in the same run (ratio). Run (about 1 min):

    python -m pytest bench/bench_persona.py -p no:cacheprovider -q -s

The 7B projection is (W + N + 6) x 80 ms: W the steps until the agent pauses (0..48), N the persona's
tokens under the real 32k SentencePiece model (the tiny tokenizer has 96 pieces and makes ~4 tokens a
word; the real one ~1.3 a word, so N is about 1.3 x words + 2 system tags).
"""
import statistics
import time

import mlx.core as mx
import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.tokenizer import PAD_ID
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

PERSONAS = {
    "short (7 words)": "You now take complaints about late deliveries.",
    "long (20 words)": ("You are Ana from billing. Confirm the caller's account number, explain the last "
                        "invoice, and offer a payment plan."),
}
SEEDS = range(6)
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))
    lm_cfg, mimi_cfg = tiny_model_configs()

    def load():
        return Model.load(directory, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)

    plain, pausing = load(), load()
    weight = np.array(pausing.lm.text_linear.weight)
    weight[PAD_ID] *= 20.0
    pausing.lm.text_linear.weight = mx.array(weight)
    return {"random weights": plain, "PAD x20": pausing}


@pytest.mark.parametrize("kind", ["random weights", "PAD x20"])
@pytest.mark.parametrize("persona", list(PERSONAS))
def test_caller_wait(models, kind, persona):
    model = models[kind]
    snapshot = model.prepare("NATF2", "You take orders for a pizza shop.")
    rng = np.random.default_rng(0)
    caller = [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(400)]
    waits, forced, normal_s, swap_s = [], [], [], []
    for seed in SEEDS:
        session = model.open_session(snapshot=snapshot, seed=seed)
        frames = iter(caller)
        for _ in range(10):  # a call under way
            t0 = time.perf_counter()
            session.step(next(frames))
            normal_s.append(time.perf_counter() - t0)
        session.set_persona(PERSONAS[persona])
        while session.persona_phase is not None or not session.persona_swaps:
            t0 = time.perf_counter()
            session.step(next(frames))
            swap_s.append(time.perf_counter() - t0)
        (swap,) = session.persona_swaps
        waits.append(swap.waited)
        forced.append(swap.prompt_frames)
    RESULTS.append({"model": kind, "persona": persona, "waited": waits, "forced": forced[0],
                    "caller_ms": [80 * (w + forced[0]) for w in waits],
                    "normal_ms": 1000 * statistics.median(normal_s), "swap_ms": 1000 * statistics.median(swap_s)})
    assert all(0 <= w <= 48 for w in waits)


def test_report(capsys):
    with capsys.disabled():
        print("\nmodel           persona          waited (steps, per seed)   forced  caller waits (ms)   "
              "step ms: normal / swap (ratio)")
        for r in RESULTS:
            print(f"{r['model']:15} {r['persona']:16} {str(r['waited']):26} {r['forced']:6}  "
                  f"{min(r['caller_ms'])}-{max(r['caller_ms'])} ms{'':6} "
                  f"{r['normal_ms']:.1f} / {r['swap_ms']:.1f} ({r['swap_ms'] / r['normal_ms']:.2f})")
