"""Mimi through the product's own loader, no reference needed: streaming equals whole-sequence,
functional streaming state (a kept MimiState replays, the module holds none), input checks, and the
errors for bad weight files."""

import dataclasses
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import mlx.core as mx
from mlx.utils import tree_flatten

from callbot.engine.model.mimi import Mimi, MimiState, MimiWeightsError, load_mimi, nvidia_to_mlx

from tests.tiny_mimi import mimi_shapes, random_mimi_weights, tiny_mimi_config, write_tiny_mimi

FRAME = 1920


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_mimi(tmp_path_factory.mktemp("mimi"), tiny_mimi_config(), seed=7)


@pytest.fixture
def mimi(tiny_path):
    return load_mimi(tiny_path, tiny_mimi_config())


def noise(frames, seed=0, batch=None):
    shape = (frames * FRAME,) if batch is None else (batch, frames * FRAME)
    return (0.2 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def stream_encode(mimi, pcm, state=None):
    state = MimiState() if state is None else state
    out = []
    for i in range(0, pcm.shape[-1], FRAME):
        codes, state = mimi.encode_step(pcm[..., i:i + FRAME], state)
        out.append(np.array(codes))
    return np.stack(out, axis=-1)


def stream_decode(mimi, codes, state=None):
    state = MimiState() if state is None else state
    out = []
    for i in range(codes.shape[-1]):
        pcm, state = mimi.decode_step(codes[..., i], state)
        out.append(np.array(pcm))
    return np.concatenate(out, axis=-1)


def test_streaming_equals_whole_sequence(mimi):
    pcm = noise(10)
    codes = np.array(mimi.encode(pcm))
    assert codes.shape == (8, 10) and codes.dtype == np.int32
    np.testing.assert_array_equal(stream_encode(mimi, pcm), codes)
    audio = np.array(mimi.decode(codes))
    assert audio.shape == (10 * FRAME,)
    np.testing.assert_allclose(stream_decode(mimi, codes), audio, atol=1e-5, rtol=0)


def test_streaming_past_the_transformer_context_equals_whole_sequence(tmp_path):
    # context 6 positions = 3 frames at 25 Hz; 16 frames cross it many times.
    cfg = tiny_mimi_config(context=6)
    mimi = load_mimi(write_tiny_mimi(tmp_path, cfg, seed=3), cfg)
    pcm = noise(16, seed=1)
    codes = np.array(mimi.encode(pcm))
    np.testing.assert_array_equal(stream_encode(mimi, pcm), codes)
    np.testing.assert_allclose(stream_decode(mimi, codes), np.array(mimi.decode(codes)), atol=1e-5, rtol=0)


def test_batched_streams_equal_single_streams(mimi):
    pcm = noise(4, seed=2, batch=2)
    codes = stream_encode(mimi, pcm)
    assert codes.shape == (2, 8, 4)
    for b in range(2):
        np.testing.assert_array_equal(np.array(mimi.encode(pcm[b])), codes[b])
    audio = stream_decode(mimi, codes)
    assert audio.shape == (2, 4 * FRAME)
    np.testing.assert_allclose(audio[1], np.array(mimi.decode(codes[1])), atol=1e-5, rtol=0)


def test_encode_pads_a_partial_last_frame_with_zeros(mimi):
    pcm = noise(3)[: 2 * FRAME + 100]
    padded = np.concatenate([pcm, np.zeros(FRAME - 100, np.float32)])
    np.testing.assert_array_equal(np.array(mimi.encode(pcm)), np.array(mimi.encode(padded)))


def test_empty_signals_are_rejected(mimi):
    with pytest.raises(ValueError, match="empty"):
        mimi.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="no frames"):
        mimi.decode(np.zeros((8, 0), np.int32))


def _steps(mimi, state, pcm, codes, frames):
    out = []
    for i in frames:
        c, state = mimi.encode_step(pcm[i * FRAME:(i + 1) * FRAME], state)
        a, state = mimi.decode_step(codes[:, i], state)
        out.append((np.array(c), np.array(a)))
    return out, state


def test_a_kept_state_replays_the_same_frames(mimi):
    pcm, codes = noise(6, seed=4), np.array(mimi.encode(noise(6, seed=5)))
    _, saved = _steps(mimi, MimiState(), pcm, codes, range(3))
    first, _ = _steps(mimi, saved, pcm, codes, range(3, 6))
    again, _ = _steps(mimi, saved, pcm, codes, range(3, 6))
    for (c1, a1), (c2, a2) in zip(first, again):
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(a1, a2)
    # The continuation depends on the history: a fresh stream decodes frame 3 differently.
    assert not np.allclose(np.array(mimi.decode_step(codes[:, 3], MimiState())[0]), first[0][1])


def test_a_fresh_state_starts_a_fresh_stream_and_the_module_keeps_none(mimi):
    pcm = noise(2, seed=6)
    fresh = stream_encode(mimi, pcm)
    np.testing.assert_array_equal(stream_encode(mimi, pcm), fresh)
    # interleaving a second stream on the same module does not disturb the first
    _, other = mimi.encode_step(noise(1, seed=7), MimiState())
    a, state_a = mimi.encode_step(pcm[:FRAME], MimiState())
    _, other = mimi.encode_step(noise(1, seed=8), other)
    b, _ = mimi.encode_step(pcm[FRAME:], state_a)
    np.testing.assert_array_equal(np.stack([np.array(a), np.array(b)], axis=-1), fresh)


def test_encode_and_decode_advance_only_their_own_half(mimi):
    state = MimiState()
    _, after_encode = mimi.encode_step(noise(1, seed=9), state)
    assert after_encode.decoder is state.decoder and after_encode.encoder is not state.encoder
    _, after_decode = mimi.decode_step(np.zeros(8, np.int32), after_encode)
    assert after_decode.encoder is after_encode.encoder and after_decode.decoder is not state.decoder


@pytest.mark.parametrize("samples", [0, 1, FRAME - 1, FRAME + 1, 2 * FRAME])
def test_encode_step_rejects_a_wrong_frame_size(mimi, samples):
    with pytest.raises(ValueError, match="1920 samples"):
        mimi.encode_step(np.zeros(samples, np.float32), MimiState())


def test_encode_step_rejects_bad_pcm(mimi):
    with pytest.raises(ValueError, match="float"):
        mimi.encode_step(np.zeros(FRAME, np.int16), MimiState())
    with pytest.raises(ValueError, match="shaped"):
        mimi.encode_step(np.zeros((1, 1, FRAME), np.float32), MimiState())


@pytest.mark.parametrize("codes,match", [
    (np.zeros(7, np.int32), "shaped"),
    (np.zeros((8, 2), np.int32), "shaped"),
    (np.full(8, 64, np.int32), r"\[0, 64\)"),
    (np.full(8, -1, np.int32), r"\[0, 64\)"),
    (np.zeros(8, np.float32), "integers"),
])
def test_decode_step_rejects_bad_codes(mimi, codes, match):
    with pytest.raises(ValueError, match=match):
        mimi.decode_step(codes, MimiState())


def test_a_stream_keeps_its_batch_size(mimi):
    _, state = mimi.encode_step(np.zeros(FRAME, np.float32), MimiState())
    with pytest.raises(ValueError, match="batch size 1"):
        mimi.encode_step(np.zeros((2, FRAME), np.float32), state)
    assert mimi.encode_step(np.zeros((2, FRAME), np.float32), MimiState())[0].shape == (2, 8)


def test_a_step_rejects_something_else_than_a_state(mimi):
    with pytest.raises(ValueError, match="MimiState"):
        mimi.encode_step(np.zeros(FRAME, np.float32), {"encoder": None})
    with pytest.raises(ValueError, match="MimiState"):
        mimi.decode_step(np.zeros(8, np.int32), None)


# -- weight files -------------------------------------------------------------------------------

def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors"
    with pytest.raises(MimiWeightsError, match="not found.*tokenizer-e351c8d8") as info:
        load_mimi(path, tiny_mimi_config())
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_clear_error(tmp_path, tiny_path, damage):
    data = open(tiny_path, "rb").read()
    data = {"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data)
    with pytest.raises(MimiWeightsError, match="broken.safetensors"):
        load_mimi(path, tiny_mimi_config())


def write(tmp_path, weights):
    path = str(tmp_path / "mimi.safetensors")
    save_file(weights, path)
    return path


def test_missing_key_is_named(tmp_path):
    weights = random_mimi_weights(tiny_mimi_config())
    del weights["decoder_transformer.transformer.layers.1.linear2.weight"]
    with pytest.raises(MimiWeightsError, match=r"mimi.safetensors.*missing key "
                                               r"'decoder_transformer.transformer.layers.1.linear2.weight'"):
        load_mimi(write(tmp_path, weights), tiny_mimi_config())


def test_missing_codebook_is_named(tmp_path):
    weights = random_mimi_weights(tiny_mimi_config(), total_codebooks=4)  # 1 + 3 < the 8 used
    with pytest.raises(MimiWeightsError, match=r"missing key 'quantizer.rvq_rest.vq.layers.3._codebook"):
        load_mimi(write(tmp_path, weights), tiny_mimi_config())


def test_unexpected_key_is_named(tmp_path):
    weights = random_mimi_weights(tiny_mimi_config())
    weights["encoder.model.99.conv.conv.weight"] = np.zeros((1, 1, 1), np.float32)
    with pytest.raises(MimiWeightsError, match=r"unexpected key 'encoder.model.99.conv.conv.weight'"):
        load_mimi(write(tmp_path, weights), tiny_mimi_config())


def test_wrong_config_names_the_mismatched_key_and_shapes(tiny_path):
    other = tiny_mimi_config(num_codebooks=8)
    other = type(other)(seanet=type(other.seanet)(dimension=48, n_filters=4), transformer=other.transformer,
                        quantizer_dim=16, quantizer_bins=64)
    with pytest.raises(MimiWeightsError, match=r"key 'decoder.model.0.conv.conv.weight' has shape "
                                               r"\(64, 32, 7\), expected \(64, 48, 7\)"):
        load_mimi(tiny_path, other)


def test_kyutai_attention_names_load_the_same_model(tmp_path, mimi):
    weights = random_mimi_weights(tiny_mimi_config(), seed=7)
    renamed = {k.replace("in_proj_weight", "in_projs.0.weight").replace("out_proj.weight", "out_projs.0.weight"): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    kyutai = load_mimi(write(tmp_path, renamed), tiny_mimi_config())
    pcm = noise(2, seed=9)
    np.testing.assert_array_equal(np.array(kyutai.encode(pcm)), np.array(mimi.encode(pcm)))


def test_codebooks_are_embedding_sum_over_clamped_usage():
    cfg = tiny_mimi_config()
    weights = random_mimi_weights(cfg, seed=1)
    usage_key = "quantizer.rvq_rest.vq.layers.2._codebook.cluster_usage"
    weights[usage_key][:3] = [0.0, 1e-9, 4.0]
    converted = nvidia_to_mlx(weights, cfg)
    got = np.array(converted["quantizer.rvq_rest.codebooks.2.embedding"])[:3]
    total = weights["quantizer.rvq_rest.vq.layers.2._codebook.embedding_sum"][:3]
    np.testing.assert_allclose(got, total / np.array([1e-5, 1e-5, 4.0])[:, None], rtol=1e-6)
    assert "quantizer.rvq_rest.codebooks.7.embedding" not in converted  # 31 stored, 7 used


def test_a_default_mimi_is_the_full_size():
    model = Mimi()
    assert model.frame_size == FRAME and model.sample_rate == 24000 and model.num_codebooks == 8
    ours = sum(v.size for _, v in tree_flatten(model.parameters()))
    stored = {k: int(np.prod(s)) for k, s in mimi_shapes(model.cfg).items()}
    codebooks = [k for k in stored if "._codebook." in k]
    assert len(stored) == 318  # docs/model.md, "Checkpoint keys": 62 + 20 * 8 layers + 3 * 32 codebooks
    # Each used codebook is one [2048, 256] table here; the file keeps 32 as (sum, usage, flag).
    assert ours == sum(stored.values()) - sum(stored[k] for k in codebooks) + 8 * 2048 * 256


def test_bfloat16_weights_stream_float32_audio(tiny_path, mimi):
    half = load_mimi(tiny_path, tiny_mimi_config(), dtype=mx.bfloat16)
    assert half.dtype == mx.bfloat16
    codes = np.array(mimi.encode(noise(3, seed=11)))
    audio = np.array(half.decode_step(codes[:, 0], MimiState())[0])
    assert audio.dtype == np.float32 and audio.shape == (FRAME,)
    reference = np.array(mimi.decode_step(codes[:, 0], MimiState())[0])
    assert np.corrcoef(audio, reference)[0, 1] > 0.99
    assert np.array(half.encode_step(noise(1, seed=12), MimiState())[0]).shape == (8,)


def test_a_mimi_without_layer_scale_loads_and_streams(tmp_path):
    base = tiny_mimi_config()
    cfg = dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, layer_scale=None))
    mimi = load_mimi(write_tiny_mimi(tmp_path, cfg, seed=5), cfg)
    pcm = noise(2, seed=13)
    np.testing.assert_array_equal(stream_encode(mimi, pcm), np.array(mimi.encode(pcm)))
    with pytest.raises(MimiWeightsError, match="unexpected key .*layer_scale"):
        load_mimi(write_tiny_mimi(tmp_path, base, seed=5, filename="scaled.safetensors"), cfg)


def test_config_rejects_geometry_that_does_not_stream():
    with pytest.raises(ValueError, match="num_codebooks"):
        dataclasses.replace(tiny_mimi_config(), num_codebooks=1)
    with pytest.raises(ValueError, match="frame_rate"):
        dataclasses.replace(tiny_mimi_config(), frame_rate=11.0)
