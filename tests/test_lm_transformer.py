"""engine.transformer against Kyutai's PyTorch StreamingTransformer (test-only reference), same weights.

Covers the three flavours the product uses: the LM's temporal transformer (RMSNorm f32, gated SiLU, RoPE,
sliding context), Mimi's (LayerNorm, layer scale, GELU MLP) and the depformer's (per-step weights, no
positional embedding); whole-sequence and streaming (1 and several positions per step), past the context.
"""

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten

from callbot.engine.model.transformer import Transformer, TransformerConfig

torch = pytest.importorskip("torch")
kyutai_transformer = pytest.importorskip("moshi.modules.transformer")

ATOL = 2e-5

LM_LIKE = dict(d_model=64, num_heads=4, num_layers=2, dim_feedforward=192, context=16,
               norm="rms_norm_f32", gating="silu", positional_embedding="rope")
MIMI_LIKE = dict(d_model=64, num_heads=4, num_layers=2, dim_feedforward=128, context=12,
                 norm="layer_norm", gating="none", layer_scale=True, positional_embedding="rope")
DEPFORMER_LIKE = dict(d_model=32, num_heads=2, num_layers=2, dim_feedforward=96, context=None,
                      norm="rms_norm_f32", gating="silu", positional_embedding="none", weights_per_step=5)


def _kyutai(cfg: dict, seed: int):
    torch.manual_seed(seed)
    kwargs = dict(d_model=cfg["d_model"], num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
                  dim_feedforward=cfg["dim_feedforward"], causal=True, context=cfg["context"],
                  norm=cfg["norm"], gating=cfg["gating"], positional_embedding=cfg["positional_embedding"],
                  max_period=10000, layer_scale=0.3 if cfg.get("layer_scale") else None)
    if cfg.get("weights_per_step"):
        kwargs["weights_per_step"] = cfg["weights_per_step"]
    model = kyutai_transformer.StreamingTransformer(**kwargs).eval()
    with torch.no_grad():  # random norms and scales too, so a swapped weight cannot hide
        for name, p in model.named_parameters():
            if name.endswith(("alpha", "scale")) or ".norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def _ours_from(model, cfg: dict) -> Transformer:
    ours = Transformer(TransformerConfig(**cfg))
    per_step = bool(cfg.get("weights_per_step"))
    weights = []
    for name, p in model.state_dict().items():
        a = p.detach().numpy()
        if name.endswith(".alpha"):
            name, a = name[: -len("alpha")] + "weight", a.reshape(-1)
        if not per_step:
            name = name.replace("in_projs.0.", "in_proj.").replace("out_projs.0.", "out_proj.")
        weights.append((name, mx.array(a)))
    ours.load_weights(weights, strict=True)
    return ours


@pytest.mark.parametrize("cfg", [LM_LIKE, MIMI_LIKE, DEPFORMER_LIKE], ids=["lm", "mimi", "depformer"])
def test_whole_sequence_matches_kyutai(cfg):
    ref = _kyutai(cfg, seed=1)
    ours = _ours_from(ref, cfg)
    t = cfg.get("weights_per_step") or 40  # longer than the context: the window must slide
    x = np.random.default_rng(0).standard_normal((2, t, cfg["d_model"])).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.array(ours(mx.array(x)))
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def _stream(model_step, x: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([model_step(x[:, s:s + chunk]) for s in range(0, x.shape[1], chunk)], axis=1)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("cfg", [LM_LIKE, MIMI_LIKE], ids=["lm", "mimi"])
def test_streaming_past_the_context_is_the_exact_window(cfg, chunk):
    """Streaming (ring wraps several times) equals Kyutai's whole-sequence output: an exact window."""
    ref = _kyutai(cfg, seed=2)
    ours = _ours_from(ref, cfg)
    x = np.random.default_rng(1).standard_normal((1, 60, cfg["d_model"])).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    cache = ours.make_cache()
    got = _stream(lambda xs: np.array(ours.step(mx.array(xs), cache)), x, chunk)
    assert cache.offset == 60
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("cfg", [LM_LIKE, MIMI_LIKE], ids=["lm", "mimi"])
def test_kyutai_ring_matches_kyutai_streaming(cfg, chunk):
    """kyutai_ring=True reproduces Kyutai's streaming, which differs from the window when chunk > 1."""
    ref = _kyutai(cfg, seed=2)
    ours = _ours_from(ref, {**cfg, "kyutai_ring": True})
    x = np.random.default_rng(1).standard_normal((1, 60, cfg["d_model"])).astype(np.float32)
    with torch.no_grad(), ref.streaming(1):
        expected = _stream(lambda xs: ref(torch.from_numpy(xs)).numpy(), x, chunk)
    cache = ours.make_cache()
    got = _stream(lambda xs: np.array(ours.step(mx.array(xs), cache)), x, chunk)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    if chunk > 1:  # the difference is real, so the switch matters
        with torch.no_grad():
            assert np.abs(ref(torch.from_numpy(x)).numpy() - expected).max() > 1e-3


def test_depformer_like_streaming_uses_one_weight_set_per_position():
    cfg = DEPFORMER_LIKE
    ref = _kyutai(cfg, seed=3)
    ours = _ours_from(ref, cfg)
    n = cfg["weights_per_step"]
    x = np.random.default_rng(2).standard_normal((1, n, cfg["d_model"])).astype(np.float32)
    cache = ours.make_cache()
    with torch.no_grad(), ref.streaming(1):
        for i in range(n):
            expected = ref(torch.from_numpy(x[:, i:i + 1])).numpy()
            np.testing.assert_allclose(np.array(ours.step(mx.array(x[:, i:i + 1]), cache)), expected,
                                       atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="per-step weights cover 5 positions"):
        ours.step(mx.array(x[:, :1]), cache)
    cache.reset()
    assert cache.offset == 0


def test_snapshot_restore_replays_the_same_outputs():
    ours = Transformer(TransformerConfig(**LM_LIKE))
    mx.eval(ours.parameters())
    x = mx.array(np.random.default_rng(3).standard_normal((1, 40, 64)).astype(np.float32))
    cache = ours.make_cache()
    ours.step(x[:, :25], cache)
    snap = cache.snapshot()
    first = np.array(ours.step(x[:, 25:], cache))
    assert cache.offset == 40
    cache.restore(snap)
    assert cache.offset == 25
    np.testing.assert_array_equal(np.array(ours.step(x[:, 25:], cache)), first)
    other = Transformer(TransformerConfig(**{**LM_LIKE, "num_layers": 3})).make_cache()
    with pytest.raises(ValueError, match="2 layers"):
        other.restore(snap)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="not divisible"):
        TransformerConfig(**{**LM_LIKE, "num_heads": 5})
    with pytest.raises(ValueError, match="norm must be one of"):
        TransformerConfig(**{**LM_LIKE, "norm": "batch_norm"})
    with pytest.raises(ValueError, match="context"):
        Transformer(TransformerConfig(**{**LM_LIKE, "context": None})).make_cache()


def test_parameter_names_follow_kyutai():
    names = {k for k, _ in tree_flatten(Transformer(TransformerConfig(**MIMI_LIKE)).parameters())}
    assert "layers.0.self_attn.in_proj.weight" in names
    assert "layers.1.layer_scale_2.scale" in names
    assert "layers.0.linear1.weight" in names and "layers.0.norm1.bias" in names
    names = {k for k, _ in tree_flatten(Transformer(TransformerConfig(**DEPFORMER_LIKE)).parameters())}
    assert "layers.0.self_attn.in_projs.4.weight" in names
    assert "layers.1.gating.4.linear_out.weight" in names


def test_compiled_step_follows_new_weights():
    """The one-position step is compiled with the weights it first saw; replacing them rebuilds it."""
    cfg = TransformerConfig(**LM_LIKE)
    a, b = Transformer(cfg), Transformer(cfg)
    mx.eval(a.parameters(), b.parameters())
    x = mx.array(np.random.default_rng(4).standard_normal((1, 1, 64)).astype(np.float32))
    first = np.array(a.step(x, a.make_cache()))
    a.load_weights(tree_flatten(b.parameters()))
    np.testing.assert_array_equal(np.array(a.step(x, a.make_cache())), np.array(b.step(x, b.make_cache())))
    assert np.abs(first - np.array(b.step(x, b.make_cache()))).max() > 1e-3


def test_one_position_steps_read_growing_prefixes_then_the_ring():
    """Context 100: while the ring fills, a step reads a 32-, 64-, then the 100-slot prefix; 130
    positions in, the ring has wrapped. All equal Kyutai's whole-sequence output."""
    cfg = {**LM_LIKE, "context": 100}
    ref = _kyutai(cfg, seed=5)
    ours = _ours_from(ref, cfg)
    x = np.random.default_rng(6).standard_normal((1, 130, 64)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    cache = ours.make_cache()
    got = _stream(lambda xs: np.array(ours.step(mx.array(xs), cache)), x, 1)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
