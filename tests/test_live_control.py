"""Live control of a running call (play, inform, mute_caller, set_persona) and its live events, through the
in-process runner, the inference process and the echo line, on the tiny model with real threads and rings.

What is checked mechanically: a played clip reaches the caller sample-exact (tx holds it, in order, as
the media side reads it) and it is what the model's agent stream was given; an informed clip reaches the
model's input and never the caller; a muted caller is not heard by the model; a persona request is
reported done; text pieces, speech start/stop and clip ends arrive as events while the call runs. The
model's own side of play and set_persona (codes forced, tokens at a boundary) is tested on the session
(tests/test_session_control.py). A tap records what each real step was given and returned: the model
is the real one.
"""
from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest

from callbot.app.model_setup import prepare_model
from callbot.app.settings import BotSettings, ModelSettings, Settings
from callbot.engine import Model
from callbot.engine.contract import (BotSpeech, BotText, CallerSpeech, CallStart, HoldBot, Inform, InformFinished,
                                     MuteCaller, PersonaChanged, Play, PlayFinished, SessionClosed, SetPersona,
                                     StopPlay)
from callbot.engine.serving.echo import EchoEngine
from callbot.engine.serving.frame_stats import STAGES
from callbot.engine.serving.inference_process import InferenceProcess
from callbot.engine.serving.runner import BotPrompt, ModelEngine
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir, write_tiny_model_for_serve

pytestmark = pytest.mark.timeout(180)

RATE = 16000
STEP = RATE * 80 // 1000  # call-rate samples per model step


def clip16(ms: float, rate: int = RATE, hz: float = 300.0) -> np.ndarray:
    """A clip with no zero sample (so it can be found again in a stream that has underrun silence)."""
    t = np.arange(int(rate * ms / 1000)) / rate
    x = 6000 * np.sin(2 * np.pi * hz * t) + 9000
    return np.clip(x, 1, 32767).astype(np.int16)


def found_exactly(clip: np.ndarray, stream: np.ndarray) -> bool:
    """`clip` appears, whole and unchanged, in `stream` once its underrun zeros are dropped."""
    s = stream[stream != 0]
    if len(s) < len(clip):
        return False
    hits = np.flatnonzero(s == clip[0])
    return any(np.array_equal(s[i:i + len(clip)], clip) for i in hits if i + len(clip) <= len(s))


class MediaSide:
    """pjmedia's clock thread, as tests/media_side.py plays it, for as long as the test needs: every 20 ms
    one frame of `caller` (looped; silence when None) into rx and one frame out of tx."""

    def __init__(self, audio, caller: np.ndarray | None = None):
        from callbot.engine.audio import PeriodicClock

        self.audio = audio
        self.caller = caller
        self.received: list[np.ndarray] = []
        self.taken: list[np.ndarray] = []  # what was read out of tx, without an underrun's silence
        self._stop = threading.Event()
        self._clock = PeriodicClock(20.0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        a, n, i = self.audio, self.audio.frame_samples, 0
        while not self._stop.is_set():
            self._clock.wait()
            frame = np.zeros(n, np.int16)
            if self.caller is not None:
                idx = (np.arange(i * n, (i + 1) * n)) % len(self.caller)
                frame = self.caller[idx]
            i += 1
            a.rx_stamps.note(n)
            a.rx.write(frame)
            out = np.zeros(n, np.int16)
            have = min(n, a.tx.readable)
            if have:
                out[:have] = a.tx.read(have)
                a.tx_stamps.note(have)
                self.taken.append(out[:have].copy())
            self.received.append(out)

    def heard(self) -> np.ndarray:
        return np.concatenate(self.received) if self.received else np.zeros(0, np.int16)

    def sent(self) -> np.ndarray:
        """What the engine sent, in order, without the silence of the ticks it was late for (a loaded
        machine's underruns would split a clip in what is heard)."""
        return np.concatenate(self.taken) if self.taken else np.zeros(0, np.int16)

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def wait_for(cond, timeout=60.0, engine=None):
    deadline = time.monotonic() + timeout
    while not cond():
        if engine is not None and engine.error is not None:
            raise AssertionError(f"the engine died: {engine.error!r}")
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def play_and_hear(engine, events, s, clip: np.ndarray, clip_id: str, tail_steps: int) -> np.ndarray:
    """Plays `clip` on session `s` from its first step and returns what the media side read, up to
    `tail_steps` steps past the clip's end (its PlayFinished in `events` first)."""
    s.control(Play(pcm=clip.astype("<i2").tobytes(), rate=RATE, id=clip_id))
    media = MediaSide(s.audio)
    try:
        wait_for(lambda: events.of(PlayFinished), engine=engine)
        wait_for(lambda: len(media.heard()) >= len(clip) + tail_steps * STEP, engine=engine)
    finally:
        media.stop()
    return media.heard()


class Events(list):
    def of(self, kind):
        return [e for e in list(self) if isinstance(e, kind)]


# ---- the tiny model, with a tap on its sessions -------------------------------------------------------


class TapModel:
    """The real Model; its sessions record what each step was given and gave back."""

    def __init__(self, model: Model):
        self._model = model
        self.sessions: list[TapSession] = []

    def steps(self) -> int:
        """Steps of the first session so far (0 until the inference thread has opened it)."""
        return len(self.sessions[0].steps) if self.sessions else 0

    def open_session(self, **kw):
        s = TapSession(self._model.open_session(**kw))
        self.sessions.append(s)
        return s

    def __getattr__(self, name):
        return getattr(self._model, name)


class TapSession:
    def __init__(self, inner):
        self.inner = inner
        self.steps: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []

    def step(self, pcm, agent_pcm=None):
        out, piece = self.inner.step(pcm, agent_pcm=agent_pcm)
        self.steps.append((pcm.copy(), None if agent_pcm is None else agent_pcm.copy(), out))
        return out, piece

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


@pytest.fixture
def runner(model):
    tap = TapModel(model)
    prompt = BotPrompt(model.prepare("NATF2", "You take orders for a pizza shop."), seed=1)
    events = Events()
    engine = ModelEngine(tap, lambda start: prompt, realtime=False, on_event=events.append)
    yield engine, tap, events
    engine.close()


def test_a_played_clip_reaches_the_caller_sample_exact_and_the_agent_stream(runner):
    engine, tap, events = runner
    s = engine.open_session(CallStart(call_id="play", rate=RATE))
    clip = clip16(400)  # 5 steps
    try:
        heard = play_and_hear(engine, events, s, clip, "hello", 10)
    finally:
        engine.close_session(s)
    assert found_exactly(clip, heard)
    done = events.of(PlayFinished)
    assert [(e.id, e.ms, e.interrupted) for e in done] == [("hello", 400.0, False)]
    # the model was given the clip (24 kHz) as its own audio for exactly the clip's steps, from the start
    given = [agent for _, agent, _ in tap.sessions[0].steps if agent is not None]
    assert len(given) == 5 and all(a.shape == (1920,) and a.dtype == np.float32 for a in given)
    from callbot.engine.serving.clips import Clip

    ref = Clip.of(Play(pcm=clip.astype("<i2").tobytes(), rate=RATE), RATE)
    assert np.array_equal(np.concatenate(given)[:len(ref.model)], ref.model)
    assert tap.sessions[0].steps[0][1] is not None  # the first step already played
    assert events.of(SessionClosed)[-1].call_id == "play"


def test_stop_play_cuts_the_clip_out_of_the_agent_stream_and_the_callers_ear(runner):
    engine, tap, events = runner
    s = engine.open_session(CallStart(call_id="cut", rate=RATE))
    s.control(Play(pcm=clip16(4000).astype("<i2").tobytes(), rate=RATE, id="menu"))  # 50 steps
    media = MediaSide(s.audio)
    try:
        wait_for(lambda: tap.steps() >= 5, engine=engine)
        s.control(StopPlay(id="menu"))
        wait_for(lambda: events.of(PlayFinished), engine=engine)
        n = tap.steps()
        wait_for(lambda: tap.steps() >= n + 3, engine=engine)
    finally:
        media.stop()
        engine.close_session(s)
    [done] = events.of(PlayFinished)
    assert done.id == "menu" and done.interrupted and 400.0 <= done.ms < 4000.0
    steps = tap.sessions[0].steps
    given = [agent is not None for _, agent, _ in steps]
    assert given[0] and not any(given[n:])  # forced from the first step, never again after the cut
    assert sum(given) == done.ms / 80.0


def test_hold_bot_forces_a_silent_agent_and_silence_to_the_caller_between_clips(runner):
    engine, tap, events = runner
    s = engine.open_session(CallStart(call_id="held", rate=RATE))
    s.control(HoldBot(on=True))
    s.control(Play(pcm=clip16(160).astype("<i2").tobytes(), rate=RATE, id="beep"))  # 2 steps
    media = MediaSide(s.audio)
    try:
        wait_for(lambda: tap.steps() >= 8, engine=engine)
        s.control(HoldBot(on=False))
        n = tap.steps()
        wait_for(lambda: tap.steps() >= n + 3, engine=engine)
    finally:
        media.stop()
        engine.close_session(s)
    steps = tap.sessions[0].steps
    agents = [agent for _, agent, _ in steps]
    assert agents[0] is not None and agents[0].any()  # the clip, forced
    held = agents[2:n - 1]
    assert held and all(a is not None and not a.any() for a in held)  # then a silent agent, forced
    assert all(a is None for a in agents[n + 1:])  # released: the model speaks for itself again
    heard, beep = media.sent(), clip16(160)
    at = next(i for i in range(len(heard) - len(beep)) if np.array_equal(heard[i:i + len(beep)], beep))
    after = heard[at + len(beep):at + len(beep) + 4 * STEP]
    assert len(after) == 4 * STEP and not after.any()  # silence, not the decode of the forced silence
    assert [e.id for e in events.of(PlayFinished)] == ["beep"]


def test_inform_reaches_the_model_and_never_the_caller(runner):
    engine, tap, events = runner
    s = engine.open_session(CallStart(call_id="inform", rate=RATE))
    fact = clip16(240, hz=700.0)  # 3 steps
    s.control(MuteCaller(on=True))  # so that what the model hears is the fact alone
    s.control(Inform(pcm=fact.astype("<i2").tobytes(), rate=RATE, id="fact"))
    media = MediaSide(s.audio, caller=clip16(1000, hz=200.0))
    try:
        wait_for(lambda: events.of(InformFinished), engine=engine)
        wait_for(lambda: tap.steps() >= 6, engine=engine)
        s.control(MuteCaller(on=False))
        n = tap.steps()
        wait_for(lambda: tap.steps() >= n + 3, engine=engine)
    finally:
        media.stop()
        engine.close_session(s)
    from callbot.engine.serving.clips import Clip

    ref = Clip.of(Inform(pcm=fact.astype("<i2").tobytes(), rate=RATE), RATE).model
    heard = [pcm for pcm, _, _ in tap.sessions[0].steps]
    assert np.array_equal(np.concatenate(heard[:3])[:len(ref)], ref)  # the model heard the fact, exactly
    assert all(not pcm.any() for pcm in heard[3:6])  # then silence: the caller is muted
    assert any(pcm.any() for pcm in heard[-2:])  # unmuted: the caller is heard again
    assert [e.id for e in events.of(InformFinished)] == ["fact"]
    assert not found_exactly(fact[:STEP], media.heard())  # the caller never got the fact


def test_live_events_while_the_call_runs(runner):
    engine, tap, events = runner
    s = engine.open_session(CallStart(call_id="events", rate=RATE))
    talk = np.concatenate([clip16(800, hz=250.0), np.zeros(RATE, np.int16)])  # 0.8 s of voice, 1 s of silence
    media = MediaSide(s.audio, caller=talk)
    try:
        wait_for(lambda: len(events.of(CallerSpeech)) >= 2 and events.of(BotText), engine=engine)
        wait_for(lambda: s.stages_sent >= 12, engine=engine)
        assert s.closed is False  # all of it arrived while the call runs
    finally:
        media.stop()
        engine.close_session(s)
    speech = events.of(CallerSpeech)
    assert [e.speaking for e in speech[:2]] == [True, False] and speech[0].t_ms < speech[1].t_ms
    texts = events.of(BotText)
    assert [(round(t.t_ms, 1), t.piece) for t in texts] == [(t.t_ms, t.piece) for t in s.final_summary.text]
    assert all(b.t_ms >= a.t_ms for a, b in zip(texts, texts[1:]))
    from callbot.engine.contract import FrameStages

    stages = events.of(FrameStages)
    assert stages and stages[0].first_frame == 0 and all(len(r) == len(STAGES) for st in stages for r in st.rows)
    got = sum(len(st.rows) for st in stages)
    assert got == s.stats.count  # every frame's stamps went out, the last ones as the call closed
    bot = events.of(BotSpeech)
    assert all(e.call_id == "events" for e in bot)


def test_set_persona_is_reported_when_the_caller_is_heard_again(runner):
    engine, tap, events = runner
    s = engine.open_session(CallStart(call_id="persona", rate=RATE))
    media = MediaSide(s.audio, caller=clip16(1000, hz=220.0))
    try:
        wait_for(lambda: tap.steps() >= 3, engine=engine)
        s.control(SetPersona(text="You now take refunds.", id="refunds"))
        s.control(SetPersona(text="You now take complaints.", id="complaints"))  # before the first one ran
        wait_for(lambda: len(events.of(PersonaChanged)) == 2, timeout=120, engine=engine)
    finally:
        media.stop()
        engine.close_session(s)
    replaced, changed = events.of(PersonaChanged)
    assert (replaced.id, replaced.replaced) == ("refunds", True)
    assert (changed.id, changed.replaced) == ("complaints", False) and changed.waited_ms > 0
    assert tap.sessions[0].persona == "You now take complaints."


# ---- through the inference process: the same words over its pipe -------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    directory, arch = write_tiny_model_for_serve(tmp_path_factory.mktemp("personaplex-serve"))
    model = ModelSettings(path=str(directory), architecture=str(arch), quantization="none", download=False)
    return Settings(model=model, bots=(BotSettings(name="pizza", voice="NATM1", persona="Pizza orders."),))


def test_control_and_events_cross_the_process_boundary(settings):
    events = Events()
    engine = InferenceProcess(functools.partial(prepare_model, settings), realtime=False, on_event=events.append)
    try:
        s = engine.open_session(CallStart(call_id="proc", rate=RATE, bot="pizza", variables={"name": "Ana"}))
        clip = clip16(240)
        heard = play_and_hear(engine, events, s, clip, "greeting", 6)
        summary = engine.close_session(s)
    finally:
        engine.close()
    assert found_exactly(clip, heard)
    assert [e.id for e in events.of(PlayFinished)] == ["greeting"]
    closed = events.of(SessionClosed)
    assert len(closed) == 1 and closed[0].summary == summary and summary.steps >= 3
    assert all(e.call_id == "proc" for e in events)


# ---- the echo line takes the same control ------------------------------------------------------------


def test_the_echo_line_plays_clips_sample_exact_and_mutes():
    events = Events()
    with EchoEngine(on_event=events.append) as engine:
        s = engine.open_session(CallStart(call_id="echo", rate=8000))
        clip = clip16(300, rate=8000)
        s.control(Play(pcm=clip.astype("<i2").tobytes(), rate=8000, id="beep"))
        s.control(Inform(pcm=clip.astype("<i2").tobytes(), rate=8000, id="no-model"))
        media = MediaSide(s.audio, caller=clip16(1000, rate=8000, hz=440.0))
        try:
            wait_for(lambda: events.of(PlayFinished) and len(media.heard()) >= 8000)
            s.control(MuteCaller(on=True))
            n = len(media.received)
            wait_for(lambda: len(media.received) >= n + 20)
        finally:
            media.stop()
            engine.close_session(s)
    assert found_exactly(clip, media.heard())
    assert not np.concatenate(media.received[-5:]).any()  # muted: nothing echoed back
    assert [e.id for e in events.of(PlayFinished)] == ["beep"]
    assert [e.id for e in events.of(InformFinished)] == ["no-model"]  # no model to tell: done at once
    assert events.of(CallerSpeech)[0].speaking is True
