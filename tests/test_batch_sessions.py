"""`BatchedSessions` on the tiny model in the HF layout: every slot of a batched run equals the same call
stepped alone as a `Session` (same snapshot, seed, sampling), bit for bit in audio and text (audio within
float32 rounding where MLX's matmul is not row-exact: tests/batch_compare.py), through
joins and leaves at arbitrary steps, a held slot taken over by another bot's call, idle slots, played clips,
a persona change, and rotation past a 48-frame context (also on a model whose 4-bit KV cache is
attended fused: heads of 64); and the errors a caller gets."""

import dataclasses

import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.batch import BatchedSessions
from callbot.engine.model.sampling import GREEDY, SamplingConfig
from tests.batch_compare import same
from tests.tiny_assets import tiny_model_configs, wide_model_configs, write_tiny_model_dir

CONTEXT = 48  # frames: prompts of 17-41 frames, runs of up to 90 steps: the rings rotate
HOT = SamplingConfig(text_temperature=1.2, text_top_k=10, audio_temperature=1.0, audio_top_k=12)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))
    lm_cfg, mimi_cfg = tiny_model_configs()
    return Model.load(model_dir, lm_config=dataclasses.replace(lm_cfg, context=CONTEXT), mimi_config=mimi_cfg,
                      cache_dir=False, progress=False)


@pytest.fixture(scope="module")
def bots(model):
    return _bots(model)


def _bots(model):
    return [model.prepare("NATF1", "You are Jane."), model.prepare("VARM2", "Sell pizza."),
            model.prepare("NATM0", "")]


@pytest.fixture(scope="module")
def wide_kv4(tmp_path_factory):
    """The tiny model with heads of 64 and a 4-bit KV cache: its calls attend to the packed ring
    (fused quantized attention, tests/test_kv_fused_model.py), the 7B's hot path."""
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("personaplex-wide"), wide=True)
    lm_cfg, mimi_cfg = wide_model_configs()
    model = Model.load(model_dir, lm_config=dataclasses.replace(lm_cfg, context=CONTEXT), mimi_config=mimi_cfg,
                       cache_dir=False, progress=False, kv_bits=4)
    return model, _bots(model)


def _clip(frames, seed):
    t = np.arange(frames * 1920) / 24000
    pcm = 0.3 * np.sin(2 * np.pi * (150 + 40 * t) * t) + 0.02 * np.random.default_rng(seed).standard_normal(t.shape)
    return [f.astype(np.float32) for f in np.split(pcm, frames)]


@dataclasses.dataclass
class Call:
    """One call of the scenario: the slot it takes, its bot, seed and sampling, the steps it is in the
    batch [join, leave), the steps it sits idle, its played clip and persona change."""

    slot: int
    bot: int
    seed: int
    join: int
    leave: int
    sampling: SamplingConfig | None = None
    idle: tuple[int, ...] = ()
    clip_at: int | None = None
    persona_at: int | None = None

    def steps(self):
        return [t for t in range(self.join, self.leave) if t not in self.idle]


CALLS = [
    Call(0, 0, 1, 0, 90, clip_at=20, persona_at=2),  # a clip while a persona change waits, then its tokens
    Call(1, 1, 7, 3, 55, sampling=HOT),
    Call(2, 2, 9, 10, 90, sampling=GREEDY, idle=(30, 31, 32, 60)),
    Call(1, 0, 11, 55, 90, clip_at=75),  # slot 1 again, taken over as the call before leaves
    Call(3, 1, 1, 35, 85),
]
CLIP = _clip(5, seed=3)
STEPS = 90


def _caller(rng):
    return (0.1 * rng.standard_normal((STEPS, 4, 1920))).astype(np.float32)


def _run_alone(model, bots, call: Call, pcm):
    session = model.open_session(snapshot=bots[call.bot], seed=call.seed, sampling=call.sampling)
    out = []
    for t in call.steps():
        if t == call.persona_at:
            session.set_persona("Hello.")
        played = CLIP[t - call.clip_at] if call.clip_at is not None and 0 <= t - call.clip_at < len(CLIP) else None
        audio, piece = session.step(pcm[t, call.slot], agent_pcm=played)
        out.append((audio, piece, session.last_output_played, session.persona_phase))
    return out, session


@pytest.mark.parametrize("kind", ["tiny", "wide-kv4"])
def test_every_slot_equals_its_call_stepped_alone(request, kind):
    model, bots = ((request.getfixturevalue("model"), request.getfixturevalue("bots")) if kind == "tiny"
                   else request.getfixturevalue("wide_kv4"))
    pcm = _caller(np.random.default_rng(1))
    batch = BatchedSessions(model, slots=4)
    got = {i: [] for i in range(len(CALLS))}
    for t in range(STEPS):
        for call in CALLS:
            if t == call.leave and not any(c.join == t and c.slot == call.slot for c in CALLS):
                batch.leave(call.slot)
        for call in CALLS:
            if t == call.join:
                batch.join(call.slot, bots[call.bot], seed=call.seed, sampling=call.sampling)
        here = {call.slot: (i, call) for i, call in enumerate(CALLS) if call.join <= t < call.leave}
        active = np.array([s in here and t not in here[s][1].idle for s in range(4)])
        agents = [None] * 4
        for s, (i, call) in here.items():
            if t == call.persona_at:
                batch.session(s).set_persona("Hello.")
            if call.clip_at is not None and 0 <= t - call.clip_at < len(CLIP):
                agents[s] = CLIP[t - call.clip_at]
        out, pieces = batch.step(pcm[t], active, agents)
        for s in range(4):
            if not active[s]:
                assert not out[s].any() and pieces[s] is None
                continue
            i, call = here[s]
            session = batch.session(s)
            got[i].append((out[s].copy(), pieces[s], session.last_output_played, session.persona_phase))
        assert batch.joined == tuple(sorted(here))
    alone = []
    for i, call in enumerate(CALLS):
        want, session = _run_alone(model, bots, call, pcm)
        alone.append(session)
        assert len(got[i]) == len(want) == len(call.steps())
        for k, (a, b) in enumerate(zip(want, got[i])):
            assert same(a[0], b[0]) and a[1:] == b[1:], f"call {i} (slot {call.slot}), its step {k}"
    # what the scenario is meant to cover did happen
    first = alone[0]
    assert [s.persona for s in first.persona_swaps] == ["Hello."]
    assert any(played for _, _, played, _ in got[0]) and any(played for _, _, played, _ in got[3])
    assert any(piece for _, piece, _, _ in got[1])
    assert first.frames == STEPS and first._lm_state.cache.offset > 2 * CONTEXT


def test_idle_and_empty_slots_do_not_move(model, bots):
    batch = BatchedSessions(model, slots=3)
    batch.join(0, bots[0], seed=2)
    batch.join(2, bots[1], seed=3)
    idle = batch.session(2)
    offset = idle._lm_state.offset
    pcm = np.zeros((3, 1920), np.float32)
    pcm[1] = np.nan  # an empty slot's row is never read
    for _ in range(3):
        out, pieces = batch.step(pcm, np.array([True, False, False]))
        assert not out[1:].any() and pieces[1:] == [None, None]
    assert batch.session(0).frames == 3 and idle.frames == 0 and idle._lm_state.offset == offset
    out, _ = batch.step(np.zeros((3, 1920), np.float32))  # default: every joined slot
    assert idle.frames == 1 and batch.joined == (0, 2)


def test_wrong_input_is_a_value_error_and_steps_nothing(model, bots):
    batch = BatchedSessions(model, slots=2)
    batch.join(0, bots[0])
    good = np.zeros((2, 1920), np.float32)
    frame = np.zeros(1920, np.float32)
    cases = [
        (lambda: batch.step(np.zeros((2, 1920), np.float64)), r"float32 numpy array of shape \(2, 1920\)"),
        (lambda: batch.step(np.zeros((3, 1920), np.float32)), r"shape \(2, 1920\)"),
        (lambda: batch.step(good, np.array([True, True])), "slot 1 is active but holds no call"),
        (lambda: batch.step(good, np.array([1, 0])), "active must be 2 booleans"),
        (lambda: batch.step(good, None, [None, frame]), "slot 1: agent_pcm for a slot that is not stepped"),
        (lambda: batch.step(good, None, [frame]), "agent_pcm must hold 2 entries"),
        (lambda: batch.step(good, None, [frame.astype(np.float64), None]), "slot 0: agent_pcm must be a float32"),
        (lambda: batch.step(np.full((2, 1920), np.nan, np.float32)), "slot 0: the frame holds NaN"),
        (lambda: batch.join(2, bots[0]), r"slot must be an integer in \[0, 2\)"),
        (lambda: batch.join(0, "NATF0"), "snapshot must be a PromptSnapshot"),
        (lambda: batch.leave(1), "slot 1 holds no call"),
        (lambda: batch.session(1), "slot 1 holds no call"),
        (lambda: BatchedSessions(model, slots=0), "slots must be an integer >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert batch.session(0).frames == 0


def test_a_clip_during_a_persona_change_names_its_slot(model, bots):
    batch = BatchedSessions(model, slots=2)
    batch.join(0, bots[0], seed=1)
    batch.join(1, bots[1], seed=1)
    batch.session(1).set_persona("Be brief.")
    pcm = np.zeros((2, 1920), np.float32)
    while batch.session(1).persona_phase == "waiting":
        batch.step(pcm)
    frames = (batch.session(0).frames, batch.session(1).frames)
    with pytest.raises(ValueError, match="slot 1: a played frame cannot be forced while a persona"):
        batch.step(pcm, None, [None, np.zeros(1920, np.float32)])
    assert (batch.session(0).frames, batch.session(1).frames) == frames


def test_warmup_compiles_without_touching_calls(model, bots):
    batch = BatchedSessions(model, slots=2)
    batch.join(0, bots[2], seed=4)
    batch.warmup()
    pcm = (0.1 * np.random.default_rng(2).standard_normal((2, 1920))).astype(np.float32)
    out, _ = batch.step(pcm)
    alone, _ = model.open_session(snapshot=bots[2], seed=4).step(pcm[0])
    assert same(out[0], alone)


def test_joining_a_held_slot_replaces_its_call(model, bots):
    batch = BatchedSessions(model, slots=1)
    batch.join(0, bots[0], seed=1)
    batch.step(np.zeros((1, 1920), np.float32))
    old = batch.session(0)
    batch.join(0, bots[1], seed=2)
    new = batch.session(0)
    assert new is not old and old.frames == 1 and new.frames == 0
    assert new.snapshot is bots[1] and new.seed == 2 and new.sampling == model.sampling
