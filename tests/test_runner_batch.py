"""The batched runner (engine/serving/runner.py with BatchedSessions): four calls on the tiny model in one
engine, one of them joining and leaving mid-run, each with its own bot, seed and live control (a played
clip, a clip cut short, a persona change, the bot held, the caller muted and informed), and each call's audio to the caller
and text equal to that call run alone in a one-by-one engine with the same seed and inputs.

How it stays deterministic with real threads: a driver plays the media side frame by frame (80 ms of
audio written into rx at once, the next only once every call has stepped the last), queues each
control before the frame it must act on, and drains tx after each step; tx has no trim policy and the
watchdog's grace is at its maximum, so no frame is dropped, trimmed or replaced by silence. Equal means
bit for bit where MLX's matmul computes rows alone (mlx-cpu, CI), else within one int16 step of audio
(tests/batch_compare.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from callbot.engine import Model, now_ns
from callbot.engine.contract import (CallStart, HoldBot, Inform, MuteCaller, PersonaChanged, Play, PlayFinished,
                                     SetPersona, StopPlay)
from callbot.engine.serving.call_audio import CallAudio
from callbot.engine.serving.runner import BotPrompt, ModelEngine
from tests.batch_compare import ROW_EXACT
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

pytestmark = pytest.mark.timeout(240)

RATE = 16000
STEP = RATE * 80 // 1000  # call-rate samples per model step


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


@pytest.fixture(scope="module")
def bots(model):
    return {
        "pizza": BotPrompt(model.prepare("NATF2", "You take orders for a pizza shop."), seed=1),
        "bank": BotPrompt(model.prepare("NATM1", "You answer questions about a bank account."), seed=7),
    }


def tone(ms: float, hz: float) -> np.ndarray:
    t = np.arange(int(RATE * ms / 1000)) / RATE
    return np.clip(6000 * np.sin(2 * np.pi * hz * t) + 9000, 1, 32767).astype(np.int16)


@dataclass
class Plan:
    """One call: its bot, when it opens and closes (global step numbers), the caller's signal and the
    controls queued before its own step k."""

    call_id: str
    bot: str
    first: int
    last: int  # its final step (exclusive)
    hz: float
    controls: dict = field(default_factory=dict)

    def frame(self, k: int) -> np.ndarray:
        t = np.arange(k * STEP, (k + 1) * STEP) / RATE
        noise = np.random.default_rng([k, int(self.hz)]).integers(-500, 500, STEP)
        return (4000 * np.sin(2 * np.pi * self.hz * t) + noise).astype(np.int16)


def plans() -> list[Plan]:
    return [
        Plan("a", "pizza", 0, 40, 220.0, {2: [Play(pcm=tone(400, 300.0).tobytes(), rate=RATE, id="hello")],
                                          20: [Inform(pcm=tone(240, 700.0).tobytes(), rate=RATE, id="fact")]}),
        Plan("b", "bank", 0, 100, 330.0, {3: [SetPersona(text="You now take refunds.", id="refunds")]}),
        Plan("c", "pizza", 0, 40, 440.0, {1: [HoldBot(on=True), Play(pcm=tone(160, 500.0).tobytes(), rate=RATE,
                                                                          id="beep")],
                                          9: [HoldBot(on=False)],
                                          12: [Play(pcm=tone(2000, 600.0).tobytes(), rate=RATE, id="menu")],
                                          16: [StopPlay(id="menu")]}),
        # joins mid-run and leaves before the others
        Plan("d", "bank", 12, 30, 550.0, {4: [MuteCaller(on=True)], 8: [MuteCaller(on=False)]}),
    ]


@dataclass
class Heard:
    tx: list = field(default_factory=list)
    session: object = None

    def audio(self) -> np.ndarray:
        return np.concatenate(self.tx) if self.tx else np.zeros(0, np.int16)


def drive(engine: ModelEngine, calls: list[Plan], timeout: float = 120.0) -> dict[str, Heard]:
    """Plays `calls` through `engine` step by step (see the module's docstring)."""
    heard = {p.call_id: Heard() for p in calls}
    deadline = time.monotonic() + timeout
    for k in range(max(p.last for p in calls)):
        now = [p for p in calls if p.first <= k < p.last]
        for p in now:
            h = heard[p.call_id]
            if k == p.first:
                h.session = engine.open_session(CallStart(call_id=p.call_id, rate=RATE, bot=p.bot),
                                                audio=CallAudio(RATE))
            for op in p.controls.get(k - p.first, []):
                h.session.control(op)
        # every call's frame at once: whatever the polls catch, each call's inputs are the same. One
        # arrival time for all of them, as a media tick gives: stamped one by one, a driver preempted
        # between two writes (a loaded CI machine) put a joining call's frames out of the others'
        # phase, and the runner rightly padded its first frame (round_schedule.first_frame_pad)
        arrival = now_ns()
        for p in now:
            a = heard[p.call_id].session.audio
            a.rx_stamps.note(STEP, arrival)
            a.rx.write(p.frame(k - p.first))
        for p in now:
            s = heard[p.call_id].session
            while s.steps < k - p.first + 1:
                if engine.error is not None:
                    raise AssertionError(f"the inference thread died: {engine.error!r}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"call {p.call_id}: step {k - p.first} not done in time")
                time.sleep(0.0005)
            if s.audio.tx.readable:
                heard[p.call_id].tx.append(s.audio.tx.read(s.audio.tx.readable))
        for p in now:
            if k == p.last - 1:
                engine.close_session(heard[p.call_id].session)
    return heard


def run(model, bots, calls, batch: bool, events: list) -> tuple[dict[str, Heard], list]:
    rounds: list[tuple[int, float]] = []
    engine = ModelEngine(model, lambda start: bots[start.bot], realtime=False, grace_ms=1000, batch=batch,
                         slots=4, on_event=events.append, on_round=lambda n, s: rounds.append((n, s)))
    try:
        return drive(engine, calls), rounds
    finally:
        engine.close()


def close_enough(a: np.ndarray, b: np.ndarray) -> bool:
    if ROW_EXACT:
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a.shape == b.shape and int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max(initial=0)) <= 1


def test_each_call_in_a_batch_equals_that_call_alone(model, bots):
    together_events: list = []
    together, rounds = run(model, bots, plans(), True, together_events)
    assert max(n for n, _ in rounds) == 4  # the calls did share rounds
    assert all(n >= 1 and s > 0 for n, s in rounds)
    for p in plans():
        alone_events: list = []
        alone, alone_rounds = run(model, bots, [Plan(p.call_id, p.bot, 0, p.last - p.first, p.hz, p.controls)],
                                  False, alone_events)
        assert alone_rounds == []  # one by one: no rounds to report
        t, a = together[p.call_id], alone[p.call_id]
        ts, as_ = t.session.final_summary, a.session.final_summary
        assert ts.steps == as_.steps == p.last - p.first
        assert ts.silence_fed == as_.silence_fed == 0 and ts.frames_dropped == as_.frames_dropped == 0
        assert close_enough(t.audio(), a.audio()), p.call_id
        assert [x.piece for x in ts.text] == [x.piece for x in as_.text], p.call_id

        def mine(events):
            return [(type(e).__name__, e.id, getattr(e, "ms", None), getattr(e, "interrupted", None)) for e in events
                    if e.call_id == p.call_id and isinstance(e, (PlayFinished, PersonaChanged))]

        assert mine(together_events) == mine(alone_events), p.call_id
    # what each control did, seen in the batched run: the clips sent exact, the persona changed
    a = together["a"].audio()
    clip = tone(400, 300.0)
    assert any(np.array_equal(a[i:i + len(clip)], clip) for i in np.flatnonzero(a == clip[0]))
    assert together["b"].session.session.persona == "You now take refunds."
    assert [e.id for e in together_events if isinstance(e, PersonaChanged)] == ["refunds"]
    assert [(e.id, e.interrupted) for e in together_events if isinstance(e, PlayFinished) and e.call_id == "c"] == [
        ("beep", False), ("menu", True)]


def test_a_full_engine_refuses_the_next_call(model, bots):
    engine = ModelEngine(model, lambda start: bots["pizza"], realtime=False, slots=1)
    try:
        s = engine.open_session(CallStart(call_id="one", rate=RATE))
        with pytest.raises(RuntimeError, match="full"):
            engine.open_session(CallStart(call_id="two", rate=RATE))
        engine.close_session(s)
        engine.close_session(engine.open_session(CallStart(call_id="three", rate=RATE)))  # the slot came back
    finally:
        engine.close()


def test_batch_settings(model, bots):
    with pytest.raises(ValueError, match="slots"):
        ModelEngine(model, lambda start: bots["pizza"], realtime=False, slots=0)
    with pytest.raises(ValueError, match="loaded Model"):
        ModelEngine(object(), lambda start: bots["pizza"], realtime=False, batch=True)


def test_admission_learns_batched_rounds(model, bots):
    """The warm-up measures rounds of B calls in one step, and a running engine reports each round."""
    from callbot.engine.serving.runner import measure_batched_rounds
    from callbot.engine.serving.step_budget import StepTimes

    times = StepTimes()
    measure_batched_rounds(model, bots["pizza"], times, max_batch=3, repeats=1, budget_s=60.0)
    assert sorted(times.measured) == [1, 2, 3] and all(s > 0 for s in times.measured.values())

    live = StepTimes()
    calls = [Plan(c, "pizza", 0, 6, hz) for c, hz in (("x", 200.0), ("y", 300.0))]
    engine = ModelEngine(model, lambda start: bots[start.bot], realtime=False, grace_ms=1000, slots=2,
                         on_round=live.observe)
    try:
        drive(engine, calls)
    finally:
        engine.close()
    assert set(live.measured) <= {1, 2} and 2 in live.measured  # the two calls' frames, due together, shared rounds


def test_model_batch_setting():
    import msgspec

    from callbot.app.settings import ModelSettings

    assert ModelSettings().batch is True
    assert msgspec.convert({"batch": False}, ModelSettings).batch is False


def test_warm_batches_compiles_the_round_sizes_before_the_first_call(model, bots):
    # compiled at start on the inference thread (the first round of a size not compiled would be late)
    engine = ModelEngine(model, lambda start: bots["pizza"], realtime=False, slots=2, warm_batches=3)
    try:
        assert engine.batched and engine._warm_batches == 2  # no more sizes than slots
    finally:
        engine.close()
    one_by_one = ModelEngine(model, lambda start: bots["pizza"], realtime=False, batch=False, warm_batches=3)
    one_by_one.close()
    assert one_by_one._warm_batches == 0


def test_the_model_service_takes_a_batched_engines_rounds(model, bots, tmp_path):
    """The service feeds admission from the engine's own rounds when it batches, else from the calls'
    step times (the one-by-one law)."""
    from callbot.engine.serving.inference_service import InferenceService
    from callbot.engine.serving.step_budget import StepTimes

    for batch in (True, False):
        times = StepTimes()
        engine = ModelEngine(model, lambda start: bots["pizza"], realtime=False, batch=batch)
        service = InferenceService(engine, str(tmp_path / f"m{int(batch)}.sock"), bots=["pizza"], step_times=times)
        try:
            assert (engine.on_round == times.observe) is batch
            assert service._rounds_from_engine is batch
        finally:
            service.close()
            engine.close()
