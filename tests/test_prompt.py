"""The prompt procedure: layout of the sequence (voice, 6 spacers, persona, 6 spacers), filler codes, and
the replay of a saved voice prompt reproducing the state its recording leaves, on the tiny model."""


import mlx.core as mx
import numpy as np
import pytest

from callbot.engine.model.mimi import Mimi, MimiState, mimi_202407
from callbot.engine.model.prompt import (SILENCE_TOKENS, SINE_TOKENS, SPACER_FRAMES, check_plan, filler_codes, persona_tokens,
                                   plan_prompt, run_prompt, sine_frame, voice_codes)
from callbot.engine.model.session import Model
from callbot.engine.model.tokenizer import PAD_ID
from callbot.engine.model.voices import VoiceEmbeddings, VoiceRecording
from tests.tiny_assets import tiny_model_configs, write_tiny_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    lm_cfg, mimi_cfg = tiny_model_configs()
    directory = write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    return Model.load(directory, lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)


def _recording(seconds=0.4, seed=0):
    rng = np.random.default_rng(seed)
    return VoiceRecording("rec", (0.1 * rng.standard_normal(int(24000 * seconds))).astype(np.float32))


def test_sine_frame_is_a_440hz_tone_at_half_scale():
    s = sine_frame()
    assert s.dtype == np.float32 and s.shape == (1920,)
    assert np.max(np.abs(s)) == pytest.approx(0.5, abs=1e-3)
    assert s[0] == 0.0
    crossings = np.count_nonzero(np.signbit(s[1:]) != np.signbit(s[:-1]))
    assert crossings == 70  # 440 Hz * 80 ms = 35.2 periods


def test_released_codec_uses_nvidias_filler_constants():
    filler = filler_codes(Mimi(mimi_202407()))  # lazy random weights: the constants need no computation
    assert filler.silence.tolist() == list(SILENCE_TOKENS)
    assert filler.sine.tolist() == list(SINE_TOKENS)


def test_small_codec_measures_its_own_filler_codes(model):
    mimi = model.mimi
    filler = filler_codes(mimi)
    # the codes a fresh stream gives after 4 frames of silence / tone (a stream of its own, nothing shared)
    for frame, want in ((np.zeros(1920, np.float32), filler.silence), (sine_frame(), filler.sine)):
        state = MimiState()
        for _ in range(4):
            codes, state = mimi.encode_step(frame, state)
        assert np.array_equal(np.array(codes), want)
    for codes in (filler.silence, filler.sine):
        assert codes.shape == (8,) and codes.min() >= 0 and codes.max() < mimi.cfg.quantizer_bins
    assert not np.array_equal(filler.silence, filler.sine)
    assert np.array_equal(filler_codes(mimi).sine, filler.sine)


def test_layout_of_a_recorded_voice_prompt(model):
    codes = voice_codes(model.mimi, _recording(0.3))  # 7200 samples -> 4 frames, the last one padded
    assert codes.shape == (4, 8)
    ids = persona_tokens(model.tokenizer, "You are Jane.")
    assert ids == model.tokenizer.encode("<system> You are Jane. <system>")
    plan = plan_prompt(codes, ids, model.filler)
    assert plan.phases() == [("voice", 4), ("spacer", SPACER_FRAMES), ("persona", len(ids)), ("spacer", SPACER_FRAMES)]
    silence, sine = model.filler.silence, model.filler.sine
    voice, spacer, persona = plan.frames[:4], plan.frames[4:10], plan.frames[10:10 + len(ids)]
    for f, c in zip(voice, codes):
        assert f.text == PAD_ID and np.array_equal(f.agent, c) and np.array_equal(f.user, sine) and f.embedding is None
    for f in spacer + plan.frames[-SPACER_FRAMES:]:
        assert f.text == PAD_ID and np.array_equal(f.agent, silence) and np.array_equal(f.user, sine)
    assert [f.text for f in persona] == ids
    assert all(np.array_equal(f.agent, silence) and np.array_equal(f.user, sine) for f in persona)
    assert plan.stream_tokens is None


def test_layout_of_a_saved_voice_prompt(model):
    voice = model.voices.load("VARM2")
    plan = plan_prompt(voice, [], model.filler)
    assert plan.phases() == [("voice", voice.frames), ("spacer", 2 * SPACER_FRAMES)]
    assert all(np.array_equal(f.embedding, e) and f.agent is None and f.user is None
               for f, e in zip(plan.frames, voice.embeddings))
    assert plan.stream_tokens is voice.cache


def test_empty_persona_has_no_text_prompt(model):
    assert persona_tokens(model.tokenizer, "") == []
    assert persona_tokens(model.tokenizer, "   ") == model.tokenizer.encode("<system>  <system>")
    with pytest.raises(ValueError, match="persona must be a string"):
        persona_tokens(model.tokenizer, None)


def test_replaying_a_saved_voice_equals_prompting_with_its_recording(model):
    """A `.pt` voice is what NVIDIA saves while prompting with a recording: the input embedding of every
    step after the priming one, and the token ring at the end. Saving one here the same way and
    replaying it must leave the model where the recording left it."""
    lm = model.lm
    codes = voice_codes(model.mimi, _recording(0.8, seed=3))
    ids = persona_tokens(model.tokenizer, "Be brief.")

    recorded = lm.new_state(model.sampling, seed=5)
    ring = recorded.tokens.shape[1]
    embeddings = []
    for c in codes:
        o = recorded.offset
        before = recorded.tokens[:, (o - 1) % ring].copy() if o > 0 else None
        lm.step(recorded, model.filler.sine, agent_codes=c, text_token=PAD_ID)
        if before is not None:  # the priming step feeds nothing
            embeddings.append(np.array(lm.embed(mx.array(before.reshape(1, -1, 1).astype(np.int32))))[0, 0])
    saved = VoiceEmbeddings("saved", np.stack(embeddings), recorded.tokens.copy())
    assert saved.frames == len(codes) - 1

    via_audio = lm.new_state(model.sampling, seed=5)
    run_prompt(lm, via_audio, plan_prompt(codes, ids, model.filler))
    via_replay = lm.new_state(model.sampling, seed=5)
    run_prompt(lm, via_replay, plan_prompt(saved, ids, model.filler))

    assert via_replay.offset == via_audio.offset
    assert np.array_equal(via_replay.tokens, via_audio.tokens)
    for a, b in zip(via_audio.cache.arrays(), via_replay.cache.arrays()):
        assert np.allclose(np.array(a), np.array(b), atol=1e-5)
    # and a different saved ring leads elsewhere: the ring is really put back
    other = VoiceEmbeddings("other", saved.embeddings, np.roll(saved.cache, 1, axis=1))
    elsewhere = lm.new_state(model.sampling, seed=5)
    run_prompt(lm, elsewhere, plan_prompt(other, [], model.filler))
    short = lm.new_state(model.sampling, seed=5)
    run_prompt(lm, short, plan_prompt(saved, [], model.filler))
    assert not all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(short.cache.arrays(), elsewhere.cache.arrays()))


def test_voice_made_for_another_model_is_refused(model):
    voice = model.voices.load("NATF0")
    wide = VoiceEmbeddings("wide", np.zeros((3, model.lm.cfg.dim * 2), np.float32), voice.cache)
    with pytest.raises(ValueError, match="voice wide: its embeddings have 128 values.*takes 64"):
        check_plan(model.lm, plan_prompt(wide, [], model.filler), "wide")
    narrow = VoiceEmbeddings("narrow", voice.embeddings, voice.cache[:9])
    with pytest.raises(ValueError, match="voice narrow: its token cache is \\(9, 4\\)"):
        check_plan(model.lm, plan_prompt(narrow, [], model.filler), "narrow")


def test_prompt_longer_than_the_context_is_refused(model):
    codes = np.tile(model.filler.silence, (model.lm.cfg.context, 1))
    with pytest.raises(ValueError, match="longer than the model's context of 128 frames"):
        check_plan(model.lm, plan_prompt(codes, [], model.filler), "long")


def test_persona_ids_beyond_the_vocabulary_are_refused(model):
    plan = plan_prompt(np.tile(model.filler.silence, (2, 1)), [model.lm.cfg.text_card], model.filler)
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        check_plan(model.lm, plan, "v")
