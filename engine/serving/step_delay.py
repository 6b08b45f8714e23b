"""Test and diagnostic aids: a model whose every step takes `delay_s` longer, and one whose every step
takes the same time.

Why: admission control (engine/serving/step_budget.py) refuses the call that would make a round of
steps miss the 80 ms frame. On a fast machine with a small model that takes dozens of calls; a test that
wants to see the refusal with two callers needs a step as slow as a 7B's on a small Mac. This wraps a
loaded Model so that each call's step sleeps first (`callbot model-service --step-delay-ms`), on the
inference thread, inside the span the runner times: the warm-up measurement, the live step times and
the calls themselves all see the slow step. Never for production.

SteadyModel: the round schedule (round_schedule.py) plans a round's end from the length of the last
rounds, so the audio's wait for its tick is the margin plus how much shorter this round was than the
longest of the last ones: the step's own spread. On this project's shared 2-core CPU the tiny model's
step spreads by 3-11 ms (p99 - p50) from the load around it; a GPU or an Apple chip stepping the 7B
runs the same graph every frame. This wraps a loaded Model so that each step runs for real and then
waits until `step_s` after it began, which measures the schedule itself with a step as steady as a
dedicated accelerator's (bench/bench_latency.py, case "steady"). Never for production.
"""
from __future__ import annotations

import time

from callbot.engine.audio import now_ns, sleep_until


class SlowSession:
    """A model Session whose `step` first sleeps `delay_s`; everything else is the session's own."""

    def __init__(self, session, delay_s: float):
        self._session = session
        self._delay_s = delay_s

    def step(self, *args, **kwargs):
        time.sleep(self._delay_s)
        return self._session.step(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class SlowModel:
    """A loaded Model whose sessions step `delay_s` (seconds, > 0) slower."""

    def __init__(self, model, delay_s: float):
        if not 0 < delay_s <= 10:
            raise ValueError(f"a step delay must be in (0, 10] s, got {delay_s!r}")
        self._model = model
        self.delay_s = delay_s

    def open_session(self, *args, **kwargs) -> SlowSession:
        return SlowSession(self._model.open_session(*args, **kwargs), self.delay_s)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class SteadySession:
    """A model Session whose `step` runs, then waits until `step_ns` after it began; `overran` counts
    the steps that took longer by themselves (their length is then their own)."""

    def __init__(self, session, step_ns: int):
        self._session = session
        self._step_ns = step_ns
        self.overran = 0

    def step(self, *args, **kwargs):
        ends = now_ns() + self._step_ns
        result = self._session.step(*args, **kwargs)
        if now_ns() < ends:
            sleep_until(ends)
        else:
            self.overran += 1
        return result

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class SteadyModel:
    """A loaded Model whose sessions' steps each take `step_s` (seconds, > 0), the real step included."""

    def __init__(self, model, step_s: float):
        if not 0 < step_s <= 10:
            raise ValueError(f"a steady step must be in (0, 10] s, got {step_s!r}")
        self._model = model
        self.step_s = step_s
        self.sessions: list[SteadySession] = []

    def open_session(self, *args, **kwargs) -> SteadySession:
        session = SteadySession(self._model.open_session(*args, **kwargs), int(self.step_s * 1e9))
        self.sessions.append(session)
        return session

    def __getattr__(self, name: str):
        return getattr(self._model, name)
