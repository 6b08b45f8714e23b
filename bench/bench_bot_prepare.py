"""What preparing a bot again (PrepareBot: engine/serving/runner.py `prepare_bot`, app/bot_reload.py) does to
a call in progress on the same engine, against the same call with no preparation, in the same process.

A call on a ModelEngine (in-process, batched, realtime=False) is driven by a media-like thread at pjmedia's
20 ms tick (tests/media_side.py: a tone into rx, tx read, both stamped) for SECONDS; in the second run
the engine prepares the bot again back to back the whole time (a new persona each time, so none comes
from the prompt cache). Compared: the call's steps late (over 80 ms), silence fed by the watchdog,
frames dropped, tx underruns (a tick found less than its audio), the step's p50/p99/max, and the
frame's time inside the engine (rx's last sample in -> its answer's first sample out), p50/p99; with
the preparations done and their mean seconds. The tiny model and the 4x wider one of
bench/bench_prompt.py, CPU fp32. Run (about 1 min):

    .venv/bin/python -m pytest bench/bench_bot_prepare.py -p no:cacheprovider -q -s
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.contract import BotSampling, CallStart, PrepareBot
from callbot.engine.model.voices import VOICES
from callbot.engine.model.weights import MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_FILE
from callbot.engine.serving.frame_stats import STAGES
from callbot.engine.serving.runner import BotPrompt, BotPrompts, ModelEngine
from tests.media_side import play_media_side
from tests.tiny_assets import tiny_model_configs, train_sentencepiece, write_voices_tgz
from tests.tiny_lm import write_tiny_lm
from tests.tiny_mimi import write_tiny_mimi

SECONDS = 8.0
VOICE_FRAMES = 100
PERSONA = "You are a friendly receptionist at a dental clinic. Your name is Jane."
RESULTS: list[dict] = []
_RING_IN, _STEP_START, _DECODED, _RTP_OUT = (STAGES.index(s) for s in ("ring_in", "step_start", "decoded",
                                                                        "rtp_out"))


def _model(path, size: str) -> Model:
    lm, mimi = tiny_model_configs()
    lm = dataclasses.replace(lm, context=256)
    if size == "small":  # 4x the tiny width, 4 layers (bench/bench_prompt.py)
        lm = dataclasses.replace(lm, dim=256, num_heads=4, num_layers=4, depformer_dim=128,
                                 depformer_dim_feedforward=384)
    write_tiny_lm(path, lm)
    write_tiny_mimi(path, mimi, filename=MIMI_FILE)
    train_sentencepiece(path / TEXT_TOKENIZER_FILE, vocab_size=lm.text_card)
    write_voices_tgz(path / VOICES_FILE, VOICES[:1], dim=lm.dim, frames=VOICE_FRAMES, streams=lm.num_streams,
                     width=lm.max_delay + 3, card=lm.card, text_card=lm.text_card)
    return Model.load(path, lm_config=lm, mimi_config=mimi, cache_dir=False, progress=False)


def _run(model: Model, prepare: bool) -> dict:
    voice = VOICES[0]
    engine = ModelEngine(model, BotPrompts({"a": BotPrompt(model.prepare(voice, PERSONA), seed=1)}), realtime=False,
                         slots=4, warm_batches=1)
    done: list = []
    try:
        s = engine.open_session(CallStart(call_id="c", rate=16000, bot="a"))
        stop, received = threading.Event(), []
        media = threading.Thread(target=play_media_side, args=(s.audio, int(SECONDS * 50), stop, received))
        n = 0

        def again(result=None) -> None:  # the inference thread: queue the next one at once
            nonlocal n
            if result is not None:
                done.append(result)
            if prepare and media.is_alive():
                n += 1
                engine.prepare_bot(PrepareBot(name="a", voice=voice, persona=f"{PERSONA} Call number {n}.",
                                              sampling=BotSampling(seed=1)), again)

        media.start()
        again()
        media.join(SECONDS + 30)
        summary = engine.close_session(s)
        rows, _ = s.stats.held()
    finally:
        engine.close()
    step = np.asarray(summary.step_s) * 1e3
    inside = rows[(rows[:, _RING_IN] > 0) & (rows[:, _RTP_OUT] > 0)]
    inside = (inside[:, _RTP_OUT] - inside[:, _RING_IN]) / 1e6
    ok = [r for r in done if r.ok]
    return {"steps": summary.steps, "late": summary.steps_late, "silence": summary.silence_fed,
            "dropped": summary.frames_dropped, "underruns": summary.underruns,
            "step_p50": float(np.percentile(step, 50)), "step_p99": float(np.percentile(step, 99)),
            "step_max": float(step.max()), "in_p50": float(np.percentile(inside, 50)),
            "in_p99": float(np.percentile(inside, 99)), "prepared": len(ok),
            "prep_s": float(np.mean([r.seconds for r in ok])) if ok else 0.0,
            # the one in progress when the call ended is abandoned as the engine closes: not a failure
            "failed": [r.error for r in done if not r.ok and "closed" not in r.error]}


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_a_call_while_its_bot_is_prepared_again(tmp_path, size):
    model = _model(tmp_path, size)
    base = _run(model, prepare=False)
    busy = _run(model, prepare=True)
    assert busy["prepared"] > 0 and not busy["failed"], busy["failed"]
    RESULTS.append({"size": size, "base": base, "busy": busy})


def test_report(capsys):
    with capsys.disabled():
        print()
        print("model  run         prepared (mean s)  steps late silence dropped underruns  step ms p50/p99/max"
              "   in-engine ms p50/p99")
        for r in RESULTS:
            for name in ("base", "busy"):
                x = r[name]
                prep = f"{x['prepared']:4d} ({x['prep_s']:.3f})" if name == "busy" else "   -"
                print(f"{r['size']:6s} {'preparing' if name == 'busy' else 'alone':10s} {prep:>18s} "
                      f"{x['steps']:5d} {x['late']:4d} {x['silence']:7d} {x['dropped']:7d} {x['underruns']:9d}  "
                      f"{x['step_p50']:6.1f} / {x['step_p99']:6.1f} / {x['step_max']:6.1f}   "
                      f"{x['in_p50']:6.1f} / {x['in_p99']:6.1f}")
            b, p = r["base"], r["busy"]
            print(f"{r['size']:6s} ratio preparing/alone: step p99 {p['step_p99'] / b['step_p99']:.2f}, "
                  f"in-engine p99 {p['in_p99'] / b['in_p99']:.2f}")
