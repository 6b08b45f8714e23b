"""Prompt prefill vs restoring its snapshot: what a caller would wait for at call start without snapshots.

Why: a session starts from `Model.prepare(voice, persona)`'s snapshot instead of running the prompt
(hundreds of steps on the 7B). This measures both, in the same run, on models of the same code at two
sizes, and prints the ratio prefill / restore (and restore against one live step). Run (about 1 min):

    python -m pytest bench/bench_prompt.py -p no:cacheprovider -q -s

The prompt: a saved voice of VOICE_FRAMES replayed frames, 6 spacers, the persona below (one frame per
SentencePiece token of the test tokenizer), 6 spacers. "restore" is `open_session(snapshot=...)`: a new
session state with the snapshot's KV cache, stream ring and codec state put in; "reset" puts them back
into an existing session.
"""
import dataclasses
import statistics
import time

import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.voices import VOICES
from callbot.engine.model.weights import MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_FILE
from tests.tiny_assets import tiny_model_configs, train_sentencepiece, write_voices_tgz
from tests.tiny_lm import write_tiny_lm
from tests.tiny_mimi import write_tiny_mimi

PERSONA = "You are a friendly receptionist at a dental clinic. Your name is Jane."
VOICE_FRAMES = 100
RESULTS: dict[str, dict[str, float]] = {}


def _configs(size: str):
    lm, mimi = tiny_model_configs()
    lm = dataclasses.replace(lm, context=256)
    if size == "small":  # 4x the tiny width, 4 layers
        lm = dataclasses.replace(lm, dim=256, num_heads=4, num_layers=4, depformer_dim=128,
                                 depformer_dim_feedforward=384)
    return lm, mimi


def _model_dir(path, size):
    lm, mimi = _configs(size)
    write_tiny_lm(path, lm)
    write_tiny_mimi(path, mimi, filename=MIMI_FILE)
    train_sentencepiece(path / TEXT_TOKENIZER_FILE, vocab_size=lm.text_card)
    write_voices_tgz(path / VOICES_FILE, VOICES[:1], dim=lm.dim, frames=VOICE_FRAMES, streams=lm.num_streams,
                     width=lm.max_delay + 3, card=lm.card, text_card=lm.text_card)
    return path


def _median_s(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_prefill_vs_restore(tmp_path, size):
    lm_cfg, mimi_cfg = _configs(size)
    model = Model.load(_model_dir(tmp_path, size), lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False,
                       progress=False)
    snapshot = model.prepare(VOICES[0], PERSONA)  # also warms up
    session = model.open_session(snapshot=snapshot)
    frame = np.zeros(1920, np.float32)
    session.step(frame)
    r = RESULTS[size] = {
        "prompt_frames": snapshot.prompt_frames,
        "prefill_s": _median_s(lambda: model.prepare(VOICES[0], PERSONA, use_cache=False), 3),
        "restore_s": _median_s(lambda: model.open_session(snapshot=snapshot), 50),
        "reset_s": _median_s(session.reset, 50),
        "step_s": _median_s(lambda: session.step(frame), 10),
    }
    assert r["prefill_s"] > 0 and r["restore_s"] > 0


def test_report(capsys):
    if len(RESULTS) < 2:
        pytest.skip("run the whole file: the report needs both sizes")
    lines = [f"{'model':<7}{'frames':>7}{'prefill ms':>12}{'restore ms':>12}{'reset ms':>10}{'step ms':>9}"
             f"{'prefill/restore':>17}{'restore/step':>14}"]
    for size, r in RESULTS.items():
        lines.append(f"{size:<7}{r['prompt_frames']:>7}{r['prefill_s'] * 1e3:>12.1f}{r['restore_s'] * 1e3:>12.3f}"
                     f"{r['reset_s'] * 1e3:>10.3f}{r['step_s'] * 1e3:>9.1f}{r['prefill_s'] / r['restore_s']:>17.0f}"
                     f"{r['restore_s'] / r['step_s']:>14.4f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
