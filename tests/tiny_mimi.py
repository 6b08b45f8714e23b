"""Writes a Mimi checkpoint with random weights in the exact key layout of NVIDIA's
`tokenizer-e351c8d8-checkpoint125.safetensors` (PyTorch names and shapes), without torch.

The key walk here is written from Kyutai's PyTorch module tree (SEANet `nn.Sequential` indices with the
ELUs counted, `in_proj_weight` / `out_proj.weight` attention names, 1 + 31 codebooks stored as
`embedding_sum` / `cluster_usage`), independently of `callbot.engine.model.mimi`'s conversion, so loading
these files tests that conversion; test_mimi_parity checks this walk against torch's own state_dict.
"""

from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import save_file

from callbot.engine.model.mimi import MimiConfig, MimiTransformerConfig
from callbot.engine.model.seanet import SeanetConfig


def tiny_mimi_config(context: int = 250, num_codebooks: int = 8) -> MimiConfig:
    """A small Mimi with the real frame geometry (24 kHz, 1920-sample frames, ratios 8,6,5,4)."""
    return MimiConfig(
        seanet=SeanetConfig(dimension=32, n_filters=4),
        transformer=MimiTransformerConfig(num_heads=2, num_layers=2, dim_feedforward=64, context=context),
        quantizer_dim=16,
        quantizer_bins=64,
        num_codebooks=num_codebooks,
    )


def mimi_shapes(cfg: MimiConfig, total_codebooks: int = 32) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a Mimi checkpoint in NVIDIA's layout."""
    shapes: dict[str, tuple[int, ...]] = {}
    sea = cfg.seanet

    def conv(prefix, c_in, c_out, k):
        shapes[f"{prefix}.conv.conv.weight"] = (c_out, c_in, k)
        shapes[f"{prefix}.conv.conv.bias"] = (c_out,)

    def resblock(prefix, dim):
        hidden = dim // sea.compress
        conv(f"{prefix}.block.1", dim, hidden, sea.residual_kernel_size)
        conv(f"{prefix}.block.3", hidden, dim, 1)

    # Encoder: conv, then per ratio [resblocks..., ELU, strided conv], then ELU, conv.
    width, i = sea.n_filters, 0
    conv(f"encoder.model.{i}", sea.channels, width, sea.kernel_size)
    for ratio in reversed(sea.ratios):
        for _ in range(sea.n_residual_layers):
            i += 1
            resblock(f"encoder.model.{i}", width)
        i += 2
        conv(f"encoder.model.{i}", width, width * 2, ratio * 2)
        width *= 2
    i += 2
    conv(f"encoder.model.{i}", width, sea.dimension, sea.last_kernel_size)
    # Decoder: conv, then per ratio [ELU, transposed conv, resblocks...], then ELU, conv.
    width, i = sea.n_filters * 2 ** len(sea.ratios), 0
    conv(f"decoder.model.{i}", sea.dimension, width, sea.kernel_size)
    for ratio in sea.ratios:
        i += 2
        shapes[f"decoder.model.{i}.convtr.convtr.weight"] = (width, width // 2, ratio * 2)
        shapes[f"decoder.model.{i}.convtr.convtr.bias"] = (width // 2,)
        width //= 2
        for _ in range(sea.n_residual_layers):
            i += 1
            resblock(f"decoder.model.{i}", width)
    i += 2
    conv(f"decoder.model.{i}", width, sea.channels, sea.last_kernel_size)

    d, t = sea.dimension, cfg.transformer
    for half in ("encoder_transformer", "decoder_transformer"):
        for layer in range(t.num_layers):
            p = f"{half}.transformer.layers.{layer}"
            shapes[f"{p}.self_attn.in_proj_weight"] = (3 * d, d)
            shapes[f"{p}.self_attn.out_proj.weight"] = (d, d)
            for norm in ("norm1", "norm2"):
                shapes[f"{p}.{norm}.weight"] = (d,)
                shapes[f"{p}.{norm}.bias"] = (d,)
            shapes[f"{p}.linear1.weight"] = (t.dim_feedforward, d)
            shapes[f"{p}.linear2.weight"] = (d, t.dim_feedforward)
            if t.layer_scale is not None:
                shapes[f"{p}.layer_scale_1.scale"] = (d,)
                shapes[f"{p}.layer_scale_2.scale"] = (d,)
    q = cfg.quantizer_dim
    for rvq, count in (("rvq_first", 1), ("rvq_rest", total_codebooks - 1)):
        shapes[f"quantizer.{rvq}.input_proj.weight"] = (q, d, 1)
        shapes[f"quantizer.{rvq}.output_proj.weight"] = (d, q, 1)
        for n in range(count):
            p = f"quantizer.{rvq}.vq.layers.{n}._codebook"
            shapes[f"{p}._initialized"] = (1,)
            shapes[f"{p}.cluster_usage"] = (cfg.quantizer_bins,)
            shapes[f"{p}.embedding_sum"] = (cfg.quantizer_bins, q)
    stride = cfg.downsample_stride
    shapes["downsample.conv.conv.conv.weight"] = (d, d, 2 * stride)
    shapes["upsample.convtr.convtr.convtr.weight"] = (d, 1, 2 * stride)
    return shapes


def random_mimi_weights(cfg: MimiConfig, seed: int = 0, total_codebooks: int = 32) -> dict[str, np.ndarray]:
    """Random float32 weights, scaled so activations stay O(1) through the network."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in mimi_shapes(cfg, total_codebooks).items():
        if name.endswith("_initialized"):
            value = np.ones(shape)
        elif name.endswith("cluster_usage"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("embedding_sum"):
            value = rng.normal(0.0, 1.0, shape)
        elif name.endswith(".scale"):
            value = np.full(shape, 0.1) + rng.normal(0.0, 0.01, shape)
        elif "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight"):
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            value = rng.normal(0.0, 0.05, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if "convtr" not in name else shape[0] * shape[2] // 2
            value = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape)
        weights[name] = value.astype(np.float32)
    return weights


def write_tiny_mimi(directory: str | os.PathLike, cfg: MimiConfig | None = None, seed: int = 0,
                    filename: str = "tokenizer-e351c8d8-checkpoint125.safetensors") -> str:
    """Write a random Mimi checkpoint in NVIDIA's layout; returns its path."""
    cfg = cfg if cfg is not None else tiny_mimi_config()
    path = os.path.join(os.fspath(directory), filename)
    save_file(random_mimi_weights(cfg, seed), path)
    return path
