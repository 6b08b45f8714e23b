"""A bot's context (issue 13, point 3): `Model.prepare(..., context=N)` gives its calls an N-frame ring,
which attends exactly as a model whose context is N, holds at most N frames, is checked against the
model's context and the prompt's length, and mixes with other contexts in one batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from callbot.engine import Model
from callbot.engine.model.batch import BatchedSessions
from callbot.engine.model.sampling import SamplingConfig
from tests.batch_compare import same
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir

HOT = SamplingConfig(text_temperature=1.2, text_top_k=0, audio_temperature=1.2, audio_top_k=0)
SHORT = 48  # frames: the prompt (< 48) fits, a call passes it within the test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("personaplex"))


def _load(model_dir, context=None):
    lm_cfg, mimi_cfg = tiny_model_configs()
    if context is not None:
        lm_cfg = dataclasses.replace(lm_cfg, context=context)
    return Model.load(model_dir, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False,
                      sampling=HOT)


@pytest.fixture(scope="module")
def model(model_dir):
    return _load(model_dir)


def _caller(frames, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(1920)).astype(np.float32) for _ in range(frames)]


def test_a_bot_context_attends_as_a_model_of_that_context(model, model_dir):
    short_model = _load(model_dir, context=SHORT)
    snapshot = model.prepare("NATF1", "You are Jane.", context=SHORT)
    assert snapshot.lm.cache.capacity == SHORT
    ours = model.open_session(snapshot=snapshot, seed=3)
    theirs = short_model.open_session("NATF1", "You are Jane.", seed=3)
    for t, frame in enumerate(_caller(90)):  # past the 48-frame window
        a, b = ours.step(frame), theirs.step(frame)
        assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1], f"frame {t}"
    layer = ours._lm_state.cache.layers[0]
    assert layer.capacity == layer.allocated == SHORT  # memory: 48 frames, not the model's 128


def test_the_context_is_checked(model):
    with pytest.raises(ValueError, match=r"context must be a whole number of frames from 1 to the model's 128, got 129"):
        model.prepare("NATF0", "", context=129)
    with pytest.raises(ValueError, match="context must be"):
        model.prepare("NATF0", "", context=0)
    with pytest.raises(ValueError, match="longer than the context of 10 frames.*raise the context"):
        model.prepare("NATF0", "You are Jane.", context=10)
    # each context is its own prepared prompt
    assert model.prepare("NATF0", "", context=SHORT) is not model.prepare("NATF0", "")


def test_slots_with_different_contexts_share_a_batch(model):
    """A batch mixing contexts steps each slot within float32 rounding of its call alone (bit for bit
    where MLX's matmul is row-exact)."""
    snaps = [model.prepare("NATF0", "You are Jane.", context=SHORT), model.prepare("NATF2", "You are Bob.")]
    batch = BatchedSessions(model, slots=2)
    alone = []
    for i, snap in enumerate(snaps):
        batch.join(i, snap, seed=i + 7)
        alone.append(model.open_session(snapshot=snap, seed=i + 7))
    frames = [_caller(70, seed=i) for i in range(2)]
    for t in range(70):
        out, pieces = batch.step(np.stack([frames[0][t], frames[1][t]]))
        for i in range(2):
            pcm, piece = alone[i].step(frames[i][t])
            assert same(out[i], pcm) and pieces[i] == piece, f"frame {t}, slot {i}"
    assert batch.session(0)._lm_state.cache.layers[0].allocated == SHORT


def test_warmup_compiles_for_each_context(model):
    model.lm.warmup(HOT, rows=(1, 2), contexts=(None, SHORT))
    BatchedSessions(model, slots=2).warmup([2], contexts=[SHORT])


def test_a_batch_warmup_compiles_each_prepared_bot_with_its_own_context(model_dir):
    """The serving runner warms its rounds with `BatchedSessions.warmup(sizes)` and no contexts: the
    spans compiled are those of every bot prepared on the model, each with its own ring."""
    fresh = _load(model_dir)
    assert {cap for _, cap, _ in BatchedSessions(fresh, slots=2).warmup([1])} == {128}  # no bot yet: the model's
    fresh.prepare("NATF0", "You are Jane.", context=SHORT)
    fresh.prepare("NATF2", "You are Bob.")
    assert fresh.prepared_contexts() == (SHORT, None)
    compiled = BatchedSessions(fresh, slots=2).warmup([2])
    assert [(cap, span) for rows, cap, span in compiled if rows == 2] == [
        (SHORT, 32), (SHORT, SHORT), (128, 32), (128, 64), (128, 128)]


def test_settings_take_a_bot_context_and_kv_bits():
    from callbot.app.settings import ConfigError, parse_settings

    settings = parse_settings('[model]\nkv_bits = 8\n[[bots]]\nname = "a"\ncontext = 1500\n')
    assert settings.bots[0].context == 1500 and settings.model.kv_bits == 8
    assert parse_settings("").bots[0].context is None and parse_settings("").model.kv_bits is None
    with pytest.raises(ConfigError, match=r"\$\.bots\[0\]\.context"):
        parse_settings('[[bots]]\nname = "a"\ncontext = 0\n')
    with pytest.raises(ConfigError, match=r"\$\.model\.kv_bits"):
        parse_settings("[model]\nkv_bits = 2\n")


def test_serve_setup_prepares_each_bot_with_its_context_and_the_model_kv_bits(tmp_path):
    """app/model_setup.py: [[bots]] context and [model] kv_bits reach the prepared prompts (and the
    warm-up compiles each context); a context the model cannot take is the user's one line."""
    from callbot.app.model_setup import ModelSetupError, prepare_model
    from callbot.app.settings import BotSettings, ModelSettings, Settings
    from tests.tiny_assets import write_tiny_model_for_serve

    directory, arch = write_tiny_model_for_serve(tmp_path / "personaplex")
    model = ModelSettings(path=str(directory), architecture=str(arch), quantization="none", download=False,
                          kv_bits=8)
    bots = (BotSettings(name="short", voice="NATM1", persona="You take orders.", context=SHORT),
            BotSettings(name="long", voice="NATF1", persona="You take orders."))
    setup = prepare_model(Settings(model=model, bots=bots))
    short, long = setup.prompts["short"].snapshot.lm.cache, setup.prompts["long"].snapshot.lm.cache
    assert (short.capacity, long.capacity) == (SHORT, 128)
    assert short.kv_bits == long.kv_bits == 8
    setup.warmup()
    too_long = (BotSettings(name="big", voice="NATM1", persona="You take orders.", context=4000),)
    with pytest.raises(ModelSetupError, match=r"^bot 'big': context must be a whole number of frames from 1 to "
                                              r"the model's 128, got 4000$"):
        prepare_model(Settings(model=model, bots=too_long))


def test_serve_builds_its_engine_with_the_model_settings_align_and_resampler_phase(tmp_path):
    """[model] align and resampler_phase reach the engine serve builds (in process here; the inference
    process and the model service take the same two from the same settings)."""
    from callbot.app.model_engine import build_model_engine
    from callbot.app.settings import BotSettings, ConfigError, ModelSettings, Settings, parse_settings
    from tests.tiny_assets import write_tiny_model_for_serve

    assert (parse_settings("").model.align, parse_settings("").model.resampler_phase) == (True, "minimum")
    with pytest.raises(ConfigError, match=r"\$\.model\.resampler_phase"):
        parse_settings('[model]\nresampler_phase = "zero"\n')
    directory, arch = write_tiny_model_for_serve(tmp_path / "personaplex")
    bots = (BotSettings(name="a", voice="NATM1", persona="You take orders."),)
    for align, phase in ((False, "linear"), (True, "minimum")):
        model = ModelSettings(path=str(directory), architecture=str(arch), quantization="none", download=False,
                              process=False, align=align, resampler_phase=phase)
        engine = build_model_engine(Settings(model=model, bots=bots))
        try:
            assert (engine.align, engine.resampler_phase) == (align, phase)
        finally:
            engine.close()
