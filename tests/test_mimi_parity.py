"""Mimi in MLX against Kyutai's PyTorch `moshi` 0.2.13 (test-only reference), same random weights.

The checkpoint is written once in NVIDIA's layout (tests/tiny_mimi.py) and loaded by both: torch with
`strict=True` (which also proves the writer's key layout is the real one), ours through `load_mimi`.
Codes must be equal and audio equal within float32 tolerance, for whole signals and frame by frame.
"""

import numpy as np
import pytest


from callbot.engine.model.mimi import MimiState, load_mimi, mimi_202407

from tests.tiny_mimi import random_mimi_weights, tiny_mimi_config, write_tiny_mimi

torch = pytest.importorskip("torch")
loaders = pytest.importorskip("moshi.models.loaders")
safetensors_torch = pytest.importorskip("safetensors.torch")


def torch_config(cfg):
    """Kyutai's `mimi_config` dict for one of our configs."""
    sea, t = cfg.seanet, cfg.transformer
    seanet = dict(loaders._seanet_kwargs, dimension=sea.dimension, n_filters=sea.n_filters,
                  ratios=list(sea.ratios), n_residual_layers=sea.n_residual_layers)
    return {
        "sample_rate": cfg.sample_rate, "channels": 1, "frame_rate": cfg.frame_rate, "seanet": seanet,
        "quantizer": dict(loaders._quantizer_kwargs, dimension=cfg.quantizer_dim, bins=cfg.quantizer_bins,
                          input_dimension=sea.dimension, output_dimension=sea.dimension),
        "transformer": dict(loaders._transformer_kwargs, d_model=sea.dimension, num_heads=t.num_heads,
                            num_layers=t.num_layers, dim_feedforward=t.dim_feedforward, context=t.context,
                            layer_scale=t.layer_scale, input_dimension=sea.dimension,
                            output_dimensions=[sea.dimension]),
    }


def reference_mimi(cfg, path):
    torch.manual_seed(0)
    model = loaders.get_mimi(None, mimi_config=torch_config(cfg), device="cpu", num_codebooks=cfg.num_codebooks)
    model.load_state_dict(safetensors_torch.load_file(path), strict=True)
    return model.eval()


def reference_run(model, pcm, frame_size):
    """Kyutai's codes and audio, whole and streamed frame by frame."""
    x = torch.from_numpy(pcm)[None, None]
    with torch.no_grad():
        codes = model.encode(x)
        audio = model.decode(codes)
        streamed_codes, streamed_audio = [], []
        with model.streaming(1):
            for start in range(0, pcm.shape[0], frame_size):
                streamed_codes.append(model.encode(x[..., start:start + frame_size]))
        with model.streaming(1):
            for i in range(codes.shape[-1]):
                streamed_audio.append(model.decode(codes[..., i:i + 1]))
    return (codes[0].numpy(), audio[0, 0].numpy(), torch.cat(streamed_codes, -1)[0].numpy(),
            torch.cat(streamed_audio, -1)[0, 0].numpy())


def stream_encode(mimi, frames):
    """Our codes of consecutive PCM frames, one fresh encoder stream: a list of [8] arrays."""
    state, out = MimiState(), []
    for frame in frames:
        codes, state = mimi.encode_step(frame, state)
        out.append(np.array(codes))
    return out


def stream_decode(mimi, codes):
    """Our audio of consecutive frames of codes, one fresh decoder stream: a list of [1920] arrays."""
    state, out = MimiState(), []
    for frame in codes:
        pcm, state = mimi.decode_step(frame, state)
        out.append(np.array(pcm))
    return out


def speechlike(n, seed):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (tone + 0.05 * rng.normal(size=n)).astype(np.float32)


def check_parity(cfg, path, frames, audio_tol):
    ref = reference_mimi(cfg, path)
    ours = load_mimi(path, cfg)
    pcm = speechlike(frames * cfg.frame_size, seed=frames)
    codes, audio, streamed_codes, streamed_audio = reference_run(ref, pcm, cfg.frame_size)
    np.testing.assert_array_equal(streamed_codes, codes)  # the reference agrees with itself
    assert all(len(np.unique(row)) > 1 for row in codes), "degenerate weights: every frame has one code"

    got_codes = np.array(ours.encode(pcm))
    np.testing.assert_array_equal(got_codes, codes)
    got_streamed = np.stack(stream_encode(ours, [pcm[i * cfg.frame_size:(i + 1) * cfg.frame_size]
                                                 for i in range(frames)]), axis=1)
    np.testing.assert_array_equal(got_streamed, codes)

    scale = float(np.abs(audio).max())
    got_audio = np.array(ours.decode(codes))
    np.testing.assert_allclose(got_audio, audio, atol=audio_tol * scale, rtol=0)
    got_streamed_audio = np.concatenate(stream_decode(ours, [codes[:, i] for i in range(frames)]))
    np.testing.assert_allclose(got_streamed_audio, streamed_audio, atol=audio_tol * scale, rtol=0)


def test_tiny_mimi_matches_reference(tmp_path):
    cfg = tiny_mimi_config()
    check_parity(cfg, write_tiny_mimi(tmp_path, cfg, seed=1), frames=12, audio_tol=1e-4)


def test_tiny_mimi_with_short_context_matches_reference_whole_sequence(tmp_path):
    # A 4-step context (2 frames at 25 Hz) is crossed many times in 8 frames; the whole-sequence
    # reference masks exactly the window, as our streaming cache does.
    cfg = tiny_mimi_config(context=4)
    path = write_tiny_mimi(tmp_path, cfg, seed=2)
    ref, ours = reference_mimi(cfg, path), load_mimi(path, cfg)
    pcm = speechlike(8 * cfg.frame_size, seed=3)
    with torch.no_grad():
        codes = ref.encode(torch.from_numpy(pcm)[None, None])
        audio = ref.decode(codes)[0, 0].numpy()
    codes = codes[0].numpy()
    got = np.stack(stream_encode(ours, [pcm[i * 1920:(i + 1) * 1920] for i in range(8)]), axis=1)
    np.testing.assert_array_equal(got, codes)
    got_audio = np.concatenate(stream_decode(ours, [codes[:, i] for i in range(8)]))
    np.testing.assert_allclose(got_audio, audio, atol=1e-4 * float(np.abs(audio).max()), rtol=0)


def test_full_size_mimi_matches_reference(tmp_path):
    cfg = mimi_202407()
    path = str(tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors")
    weights = random_mimi_weights(cfg, seed=4)
    assert len(weights) == 318  # docs/model.md, "Checkpoint keys": 62 + 20 * 8 layers + 3 * 32 codebooks
    safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    del weights
    check_parity(cfg, path, frames=3, audio_tol=1e-4)
