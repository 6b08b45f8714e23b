"""Calls that join a running batched engine on different media ticks are put in phase (their first
frame padded, once, by under 80 ms) and stepped in the same rounds, and each call's audio to the caller
still equals that call stepped alone (with the same pad in front of its input).

The media side is played by the test on a synthetic 20 ms clock: each tick, every open call gets
20 ms of audio in rx with the tick's time in its stamp log (ext/stamps.h), as pjmedia's clock thread
stamps it. The ticks lie in the past, so every round's planned start has passed and the rounds start
at once: what is decided depends on the stamps, not on how fast this machine runs. After each tick the
driver waits (bounded) until each call has stepped every frame that tick completed, so calls whose
frames complete on different ticks can never share a round, and calls in phase share one unless a
poll falls between two calls' writes of the same tick (asserted over many frames, not each).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.audio import now_ns
from callbot.engine.contract import CallStart
from callbot.engine.serving.call_audio import CallAudio
from callbot.engine.serving.round_schedule import TICK_NS, first_frame_pad
from callbot.engine.serving.runner import BotPrompt, ModelEngine
from tests.batch_compare import ROW_EXACT
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

pytestmark = pytest.mark.timeout(240)

RATE = 16000
CHUNK = RATE // 50  # one 20 ms tick at the call's rate
PER_TICK_24K = 480
TICKS = 52


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


@pytest.fixture(scope="module")
def bot(model):
    return BotPrompt(model.prepare("NATF2", "You take orders for a pizza shop."), seed=3)


def chunk(call: str, k: int) -> np.ndarray:
    t = np.arange(k * CHUNK, (k + 1) * CHUNK) / RATE
    hz = {"a": 220.0, "b": 330.0, "c": 440.0}[call]
    noise = np.random.default_rng([k, int(hz)]).integers(-400, 400, CHUNK)
    return (4000 * np.sin(2 * np.pi * hz * t) + noise).astype(np.int16)


def wait_until(cond, what: str, engine: ModelEngine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if engine.error is not None:
            raise AssertionError(f"the inference thread died: {engine.error!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.0005)


def play(engine: ModelEngine, joins: dict[str, int], lead: dict[str, int] | None = None):
    """Ticks 0..TICKS-1 of a synthetic media clock; call X opens at tick joins[X] (with lead[X] ticks of
    silence in front of its audio). Returns {call: (session, tx audio)}."""
    lead = lead or {}
    base = now_ns() - 600 * 10**9  # in the past: every planned start has passed
    sessions, heard, sent = {}, {c: [] for c in joins}, {c: 0 for c in joins}
    for k in range(TICKS):
        for c, first in joins.items():
            if k == first:
                sessions[c] = engine.open_session(CallStart(call_id=c, rate=RATE), audio=CallAudio(RATE))
        for c, s in sessions.items():  # one tick: every open call's 20 ms, stamped with the tick's time
            n = k - joins[c]
            pcm = np.zeros(CHUNK, np.int16) if n < lead.get(c, 0) else chunk(c, n - lead.get(c, 0))
            s.audio.rx_stamps.note(CHUNK, base + k * TICK_NS)
            s.audio.rx.write(pcm)
            sent[c] += PER_TICK_24K
        for c, s in sessions.items():
            wait_until(lambda: s.aligned, f"call {c} aligned", engine)
            wait_until(lambda: s.steps == (sent[c] + s.pad_samples) // 1920 and not s.audio.rx.readable,
                       f"call {c}: tick {k} stepped", engine)
            if s.audio.tx.readable:
                heard[c].append(s.audio.tx.read(s.audio.tx.readable))
    for s in sessions.values():
        engine.close_session(s)
    return {c: (sessions[c], np.concatenate(heard[c]) if heard[c] else np.zeros(0, np.int16)) for c in joins}


def close_enough(a: np.ndarray, b: np.ndarray) -> bool:
    if ROW_EXACT:
        return a.shape == b.shape and a.tobytes() == b.tobytes()
    return a.shape == b.shape and int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max(initial=0)) <= 1


def test_calls_joining_on_different_ticks_share_rounds_and_each_equals_itself_alone(model, bot):
    joins = {"a": 0, "b": 1, "c": 7}  # b one tick after a, c three ticks after a's frame tick
    rounds: list[int] = []
    engine = ModelEngine(model, lambda start: bot, realtime=False, grace_ms=1000, slots=3,
                         on_round=lambda n, s: rounds.append(n))
    try:
        together = play(engine, joins)
    finally:
        engine.close()
    a, b, c = (together[x][0] for x in "abc")
    assert a.pad_samples == 0  # the first call sets the phase
    # b's first chunk (tick 1) is 2 ticks before a's frame tick (3): padded by 1 tick, c's (tick 7) by 3
    assert b.pad_samples == first_frame_pad(PER_TICK_24K, 1, 3, per_tick=PER_TICK_24K, frame=1920, period_ns=1,
                                            tolerance_ns=0) == 480
    assert c.pad_samples == 1440
    assert all(p < 1920 for p in (a.pad_samples, b.pad_samples, c.pad_samples))  # under 80 ms, once
    assert a.frame_tick_ns == b.frame_tick_ns == c.frame_tick_ns  # their last frames came on one tick
    assert 3 in rounds  # in phase, the three shared rounds (one by one with a poll between them: 1s)
    assert sum(rounds) == sum(s.steps for s in (a, b, c))

    for name, s in together.items():
        pad_ticks = s[0].pad_samples // PER_TICK_24K
        alone_engine = ModelEngine(model, lambda start: bot, realtime=False, grace_ms=1000, batch=False)
        try:
            alone = play(alone_engine, {name: 0}, lead={name: pad_ticks})
        finally:
            alone_engine.close()
        got, want = s[1], alone[name][1]
        assert alone[name][0].pad_samples == 0
        n = min(len(got), len(want))  # the lone call ran on from tick 0: as long, or longer by its ticks
        assert n > 0 and close_enough(got[:n], want[:n]), name


def test_without_alignment_calls_on_other_ticks_never_share_a_round(model, bot):
    rounds: list[int] = []
    engine = ModelEngine(model, lambda start: bot, realtime=False, grace_ms=1000, slots=3, align=False,
                         on_round=lambda n, s: rounds.append(n))
    try:
        heard = play(engine, {"a": 0, "b": 1})
    finally:
        engine.close()
    assert heard["b"][0].pad_samples == 0 and rounds and set(rounds) == {1}
