"""A test and diagnostic aid: a model whose every step takes `delay_s` longer.

Why: admission control (engine/serving/step_budget.py) refuses the call that would make a round of
steps miss the 80 ms frame. On a fast machine with a small model that takes dozens of calls; a test that
wants to see the refusal with two callers needs a step as slow as a 7B's on a small Mac. This wraps a
loaded Model so that each call's step sleeps first (`callbot model-service --step-delay-ms`), on the
inference thread, inside the span the runner times: the warm-up measurement, the live step times and
the calls themselves all see the slow step. Never for production.
"""
from __future__ import annotations

import time


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
