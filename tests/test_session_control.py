"""Live control of a session at the model level, on the tiny model, checked against runs made by hand from
the public pieces (LM state, `lm.step`, the functional codec): a played frame's codes become the agent's
own stream, a persona change waits for the agent's pause and then forces exactly its tokens, and sessions
on one model step from several threads as they do one after another."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.mimi import MimiState
from callbot.engine.model.persona_swap import MAX_PERSONA_WAIT
from callbot.engine.model.prompt import SPACER_FRAMES, persona_tokens
from callbot.engine.model.sampling import TokenSampler
from callbot.engine.model.tokenizer import PAD_ID
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

PERSONA = "You are Jane, a receptionist at a dental clinic."
NEW_PERSONA = "You sell pizza. Be brief."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))


def _load(model_dir) -> Model:
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


@pytest.fixture(scope="module")
def model(model_dir):
    return _load(model_dir)


@pytest.fixture(scope="module")
def pausing_model(model_dir):
    """The tiny model with its PAD logit scaled up 20x: random weights almost never sample PAD twice in a
    row, this one does now and then, so an utterance boundary comes within the wait limit."""
    model = _load(model_dir)
    weight = np.array(model.lm.text_linear.weight)
    weight[PAD_ID] *= 20.0
    model.lm.text_linear.weight = mx.array(weight)
    return model


def _noise(frames, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(1920)).astype(np.float32) for _ in range(frames)]


def _clip(frames, seed):
    """Something speech-like to play: a gliding tone with noise."""
    t = np.arange(frames * 1920) / 24000
    rng = np.random.default_rng(seed)
    pcm = 0.3 * np.sin(2 * np.pi * (150 + 40 * t) * t) + 0.02 * rng.standard_normal(t.shape)
    return [f.astype(np.float32) for f in np.split(pcm, frames)]


class HandRun:
    """`Session.step` done by hand from the public pieces, with every forcing chosen by the caller of
    `step`: the reference the session must equal."""

    def __init__(self, model, snapshot, seed):
        self.model = model
        self.state = model.lm.new_state(model.sampling, seed)
        self.state.restore(snapshot.lm)
        self.state.sampler = TokenSampler(model.sampling, seed)
        self.codec = snapshot.mimi
        self.text_forced = [False]  # per step; a step returns the frame of the step before
        self.sampled = []  # the text token each step wrote (sampled or forced)

    def step(self, pcm, user=None, agent=None, text=None):
        model = self.model
        caller, self.codec = model.mimi.encode_step(pcm, self.codec)
        user = np.array(caller, dtype=np.int64) if user is None else user
        ring = self.state.tokens.shape[1]
        position = self.state.offset % ring
        token, codes = model.lm.step(self.state, user, agent_codes=agent, text_token=text)
        self.sampled.append(int(self.state.tokens[0, position]))
        audio, self.codec = model.mimi.decode_step(codes, self.codec)
        piece = None if self.text_forced[-1] else model.tokenizer.piece(token)
        self.text_forced.append(text is not None)
        return np.array(audio), piece


def release_mlx_streams():
    """What a thread that used MLX does before it ends: MLX 0.32 keeps a stream per thread and, when a
    finished thread's streams are still alive at interpreter exit, aborts the process now and then
    ("terminate called without an active exception", ml-explore/mlx#3126; measured 13 of 40 runs of a
    two-thread script here, 0 of 40 with this)."""
    mx.synchronize()
    mx.clear_streams()


def _same(a, b):
    return all(pa.tobytes() == pb.tobytes() and ta == tb for (pa, ta), (pb, tb) in zip(a, b, strict=True))


def _written_text(session):
    state = session._lm_state
    return int(state.tokens[0, (state.offset - 1) % state.tokens.shape[1]])


# -- played frames ----------------------------------------------------------------------------------

def test_a_played_frame_is_forced_into_the_agent_stream_with_pad_text(model):
    snapshot = model.prepare("NATF1", PERSONA)
    session = model.open_session(snapshot=snapshot, seed=3)
    hand = HandRun(model, snapshot, seed=3)
    caller = _noise(16, seed=1)
    first, second = _clip(5, seed=2), _clip(3, seed=3)
    # each run of consecutive played frames is one fresh encoder stream, as a voice recording is
    expected = []
    for clip in (first, second):
        state, codes = MimiState(), []
        for frame in clip:
            c, state = model.mimi.encode_step(frame, state)
            codes.append(np.array(c, dtype=np.int64))
        expected.append(codes)
    plan = [None] * 3 + list(zip(first, expected[0])) + [None] * 2 + list(zip(second, expected[1])) + [None] * 3
    assert len(plan) == len(caller)
    lm_cfg = model.lm.cfg
    delays = np.array(lm_cfg.delays)
    got, want, played_out = [], [], []
    for pcm, forced in zip(caller, plan):
        state = session._lm_state
        ring, offset = state.tokens.shape[1], state.offset
        if forced is None:
            got.append(session.step(pcm))
            want.append(hand.step(pcm))
        else:
            clip_frame, codes = forced
            got.append(session.step(pcm, agent_pcm=clip_frame))
            want.append(hand.step(pcm, agent=codes, text=PAD_ID))
            # the frame's codes sit in the agent's streams where this step wrote them, the text is PAD
            state = session._lm_state
            agent_streams = np.arange(1, lm_cfg.agent_codebooks + 1)
            in_ring = state.tokens[agent_streams, (offset + delays[agent_streams]) % ring]
            assert np.array_equal(in_ring, codes)
            assert state.tokens[0, offset % ring] == PAD_ID
        played_out.append(session.last_output_played)
    assert _same(got, want)
    # a played frame comes back one step later (the acoustic delay), as its decode, with no text
    was_played = [p is not None for p in plan]
    assert played_out == [False] + was_played[:-1]
    assert all(text is None for (_, text), out in zip(got, played_out) if out)


def test_played_frames_need_the_frame_shape(model):
    session = model.open_session("NATF0", PERSONA)
    with pytest.raises(ValueError, match="agent_pcm is 1920 samples"):
        session.step(np.zeros(1920, np.float32), agent_pcm=np.zeros(960, np.float32))
    with pytest.raises(ValueError, match="agent_pcm must be a float32"):
        session.step(np.zeros(1920, np.float32), agent_pcm=np.zeros(1920, np.int16))
    assert session.frames == 0


# -- persona changes --------------------------------------------------------------------------------

def _run_swap(model, seed, before, after):
    """A session that talks `before` frames, gets NEW_PERSONA, and steps on until the change is done and
    `after` frames more; and the same done by hand with the rule applied from the hand run's own tokens.
    Returns (session, outputs, hand outputs, phases after each step, texts written, hand's wait)."""
    snapshot = model.prepare("NATM2", PERSONA)
    session = model.open_session(snapshot=snapshot, seed=seed)
    hand = HandRun(model, snapshot, seed=seed)
    ids = persona_tokens(model.tokenizer, NEW_PERSONA)
    forced_tail = ids + [PAD_ID] * SPACER_FRAMES
    caller = _noise(before + MAX_PERSONA_WAIT + len(forced_tail) + after, seed=seed + 100)
    silence, sine = model.filler.silence, model.filler.sine
    got = [session.step(pcm) for pcm in caller[:before]]
    want = [hand.step(pcm) for pcm in caller[:before]]
    session.set_persona(NEW_PERSONA)
    assert session.persona_phase == "waiting" and session.persona == PERSONA
    i, waited = before, 0
    # the hand run's wait: until its last 2 sampled text tokens are PAD, or MAX_PERSONA_WAIT steps
    while hand.sampled[-2:] != [PAD_ID, PAD_ID] and waited < MAX_PERSONA_WAIT:
        want.append(hand.step(caller[i], user=sine))
        i, waited = i + 1, waited + 1
    for token in forced_tail:
        want.append(hand.step(caller[i], user=sine, agent=silence, text=token))
        i += 1
    for pcm in caller[i:i + after]:
        want.append(hand.step(pcm))
    phases, written = [], []
    for pcm in caller[before:i + after]:
        got.append(session.step(pcm))
        phases.append(session.persona_phase)
        written.append(_written_text(session))
    return session, got, want, phases, written, waited, ids


@pytest.mark.parametrize("which, seed, boundary", [("pausing_model", 2, "pause"), ("model", 1, "limit")])
def test_a_persona_change_waits_for_the_pause_then_forces_its_tokens(request, which, seed, boundary):
    model = request.getfixturevalue(which)
    after = 12
    session, got, want, phases, written, waited, ids = _run_swap(model, seed=seed, before=4, after=after)
    assert _same(got, want)  # every step, the change's and the next `after`, equals the hand run
    swaps = session.persona_swaps
    assert len(swaps) == 1
    swap = swaps[0]
    assert swap.boundary == boundary and swap.waited == waited and swap.requested_at == 4
    if boundary == "pause":
        assert 0 < waited < MAX_PERSONA_WAIT
    else:
        assert waited == MAX_PERSONA_WAIT
    assert swap.prompt_frames == len(ids) + SPACER_FRAMES and swap.caller_steps == waited + len(ids) + SPACER_FRAMES
    assert session.persona == NEW_PERSONA and session.persona_phase is None
    # the forced frames wrote exactly the persona's tokens, then the spacer's PADs
    forced = written[waited:waited + swap.prompt_frames]
    assert forced == ids + [PAD_ID] * SPACER_FRAMES
    assert phases == (["waiting"] * waited + ["persona"] * (len(ids) - 1) + ["spacer"] * SPACER_FRAMES
                      + [None] * (after + 1))
    # no persona token comes back as the agent's words
    texts = [t for _, t in got[4 + waited:4 + waited + swap.prompt_frames + 1]]
    assert texts == [texts[0]] + [None] * swap.prompt_frames


def test_a_second_persona_replaces_a_pending_one_or_queues_behind_a_running_one(model):
    session = model.open_session("NATF2", PERSONA, seed=2)
    caller = iter(_noise(3 * MAX_PERSONA_WAIT + 80, seed=5))
    session.set_persona("First.")
    session.set_persona(NEW_PERSONA)  # its tokens have not started: it replaces "First."
    while session.persona_phase != "persona":
        session.step(next(caller))
    session.set_persona("Third.")  # tokens are running: it is queued
    with pytest.raises(ValueError, match="played frame cannot be forced"):
        session.step(next(caller), agent_pcm=_clip(1, seed=1)[0])
    while session.persona_phase is not None:
        session.step(next(caller))
    first, second = session.persona_swaps
    assert first.persona == NEW_PERSONA and second.persona == "Third."
    assert second.boundary == "chained" and second.waited == 0
    assert second.prompt_frames == len(persona_tokens(model.tokenizer, "Third.")) + SPACER_FRAMES
    assert session.persona == "Third."
    session.reset()
    assert session.persona_swaps == () and session.persona == PERSONA and session.persona_phase is None


def test_a_clip_playing_when_the_persona_is_set_finishes_first(pausing_model):
    model = pausing_model
    session = model.open_session("NATF2", PERSONA, seed=1)
    caller = _noise(MAX_PERSONA_WAIT + 4, seed=9)
    clip = _clip(MAX_PERSONA_WAIT + 4, seed=4)  # longer than the wait limit: played frames do not count
    session.set_persona(NEW_PERSONA)
    for pcm, frame in zip(caller, clip):
        session.step(pcm, agent_pcm=frame)
        assert session.persona_phase == "waiting"
    for pcm in _noise(MAX_PERSONA_WAIT + 60, seed=10):
        session.step(pcm)
        if session.persona_phase is None:
            break
    (swap,) = session.persona_swaps
    assert swap.waited > len(clip)  # the clip, then the agent's own pause


@pytest.mark.parametrize("persona, message", [
    ("", "empty"), ("   ", "empty"), (None, "persona must be a string"),
    (" ".join(["word"] * 200), "longer than the model's context"),
])
def test_bad_personas_are_value_errors(model, persona, message):
    session = model.open_session("NATF0", PERSONA)
    with pytest.raises(ValueError, match=message):
        session.set_persona(persona)
    assert session.persona_phase is None


# -- sessions on several threads ----------------------------------------------------------------------

def test_sessions_stepping_on_two_threads_equal_stepping_one_after_another(model):
    """No model-wide lock: two calls step at once on one Model (codec and LM shared, states their own)
    and get what each gets alone, played frames and a persona change included."""
    frames = 40
    inputs = {"a": (_noise(frames, seed=21), "NATF3", 11), "b": (_noise(frames, seed=22), "VARM1", 12)}
    clip = _clip(6, seed=7)

    def run(name, barrier=None):
        caller, voice, seed = inputs[name]
        session = model.open_session(voice, PERSONA, seed=seed)
        if barrier is not None:
            barrier.wait()
        out = []
        for i, pcm in enumerate(caller):
            if name == "a" and i == 5:
                session.set_persona(NEW_PERSONA)
            played = clip[i - 20] if name == "b" and 20 <= i < 26 else None
            out.append(session.step(pcm, agent_pcm=played))
        return out

    alone = {name: run(name) for name in inputs}
    together, errors = {}, []
    barrier = threading.Barrier(2)

    def worker(name):
        try:
            together[name] = run(name, barrier)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
        finally:
            release_mlx_streams()

    threads = [threading.Thread(target=worker, args=(name,)) for name in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and not errors
    assert _same(alone["a"], together["a"]) and _same(alone["b"], together["b"])
    assert not _same(alone["a"], alone["b"])
