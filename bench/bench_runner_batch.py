"""The serving runner (engine/serving/runner.py, ModelEngine) with 1 and 4 calls on the tiny model, batched
and one by one: CPU per call, rounds by size, late steps.

Why: BENCHMARKS.md "Batched step" measures `BatchedSessions.step` alone; this measures what serving
pays around it (polls, rings, resamplers, events, controls) with calls fed in real time, as pjmedia
feeds them: every 20 ms one 20 ms frame per call into rx, tx drained. "in phase": all calls' frames
complete on the same tick (one round of 4); "out of phase": call i starts one tick after call i-1, so
their 80 ms frames would complete on 4 different ticks: with `align=False` the runner steps each alone,
with the schedule (the default) it pads each new call's first frame so that its frames complete on the
others' tick (engine/serving/round_schedule.py) and they share rounds. CPU is the process's (user + system, the feeding thread included) over
`SECONDS` after a 1 s warm-up. Run (about 1 min):

    python bench/bench_runner_batch.py
"""
from __future__ import annotations

import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from callbot.engine import Model  # noqa: E402
from callbot.engine.contract import CallStart  # noqa: E402
from callbot.engine.serving.call_audio import CallAudio  # noqa: E402
from callbot.engine.serving.runner import BotPrompt, ModelEngine  # noqa: E402
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir  # noqa: E402

RATE = 16000
TICK = RATE // 50  # call-rate samples per 20 ms media tick
SECONDS = 8.0


def run(model, prompt, calls: int, batch: bool, in_phase: bool, align: bool = True) -> str:
    rounds: list[tuple[int, float]] = []
    engine = ModelEngine(model, lambda start: prompt, realtime=False, batch=batch, slots=8, warm_batches=calls,
                         on_round=lambda n, s: rounds.append((n, s)), align=align)
    sessions = [engine.open_session(CallStart(call_id=f"c{i}", rate=RATE), audio=CallAudio(RATE))
                for i in range(calls)]
    frame = (3000 * np.sin(np.arange(TICK) / 5)).astype(np.int16)
    start, warm = time.monotonic(), 50
    cpu0 = wall0 = steps0 = rounds0 = None
    for tick in range(1, warm + int(SECONDS * 50) + 1):
        time.sleep(max(0.0, start + tick * 0.020 - time.monotonic()))
        for i, s in enumerate(sessions):
            if in_phase or tick > i:
                s.audio.rx_stamps.note(TICK)
                s.audio.rx.write(frame)
            if s.audio.tx.readable:
                s.audio.tx.read(s.audio.tx.readable)
        if tick == warm:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            cpu0, wall0 = ru.ru_utime + ru.ru_stime, time.monotonic()
            steps0, rounds0 = sum(s.steps for s in sessions), len(rounds)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = ru.ru_utime + ru.ru_stime - cpu0, time.monotonic() - wall0
    steps = sum(s.steps for s in sessions) - steps0
    late = sum(s.steps_late for s in sessions)
    silence = sum(s.silence_fed for s in sessions)
    for s in sessions:
        engine.close_session(s)
    engine.close()
    sizes: dict[int, list[float]] = {}
    for n, sec in rounds[rounds0:]:
        sizes.setdefault(n, []).append(sec)
    shown = ", ".join(f"{len(v)} of {n} ({1000 * float(np.median(v)):.1f} ms)" for n, v in sorted(sizes.items()))
    mode = "batched" if batch else "one by one"
    phase = ("in phase" if in_phase else "out of phase") + ("" if align else " (align=False)")
    return (f"{calls} calls {phase:26s} {mode:10s}: CPU {100 * cpu / wall:4.0f}% of a core, "
            f"{100 * cpu / wall / calls:5.1f}% per call, {1000 * cpu / steps:5.1f} ms per step; steps {steps}, "
            f"late {late}, silence {silence}; rounds {shown or '-'}")


def main() -> None:
    model_dir = write_tiny_model_dir(pathlib.Path(tempfile.mkdtemp()))
    lm_cfg, mimi_cfg = tiny_model_configs()
    model = Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)
    prompt = BotPrompt(model.prepare("NATF2", "You take orders for a pizza shop."), seed=1)
    for calls, in_phase, align in ((1, True, True), (4, True, True), (4, False, False), (4, False, True)):
        for batch in (False, True):
            print(run(model, prompt, calls, batch, in_phase, align), flush=True)


if __name__ == "__main__":
    main()
