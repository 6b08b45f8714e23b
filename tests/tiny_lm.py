"""A tiny PersonaPlex-architecture LM written in the exact layout of the HF repo's `model.safetensors`.

Same code path as the 7B, small dims, random weights. Written with numpy only (no torch), in float32 or
bfloat16 (the real file is bf16), under NVIDIA's PyTorch key names: 67 + 6L + 36Ld tensors, RMSNorm
gains as `*.alpha` [1, 1, d], the depformer's attention projections stacked for its 16 slices.
The tiny config is handed to the loader explicitly (`load_lm(dir, TINY_LM)`): the real repo carries no
LM config, so the loader defaults to the built-in PersonaPlex-7B one and takes any other size as an
argument.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np

from callbot.engine.model.lm_config import LmConfig
from callbot.engine.model.weights import LM_FILE, checkpoint_layout

# Dims chosen so that every linear/embedding input width (64, 128) is a multiple of both q4 group sizes.
TINY_LM = LmConfig(dim=64, num_heads=4, num_layers=2, hidden_scale=3.0, context=32, text_card=96, card=32,
                   depformer_dim=64, depformer_num_heads=4, depformer_num_layers=2,
                   depformer_dim_feedforward=192)


def tiny_lm_tensors(cfg: LmConfig = TINY_LM, seed: int = 0, bf16: bool = False) -> dict[str, np.ndarray]:
    """Random weights in NVIDIA's layout (float32; rounded to bf16 values when `bf16`)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in checkpoint_layout(cfg).items():
        if name.endswith(".alpha"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif "emb" in name.split(".")[0]:  # emb.*, text_emb, depformer_emb.*, depformer_text_emb
            a = rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        a = a.astype(np.float32)
        out[name] = _round_to_bf16(a) if bf16 else a
    return out


def _round_to_bf16(a: np.ndarray) -> np.ndarray:
    return (_bf16_bits(a).astype(np.uint32) << 16).view(np.float32)


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], bf16: bool = False) -> None:
    """safetensors.numpy for float32; a direct writer for bfloat16 (numpy has no bf16 dtype)."""
    if not bf16:
        from safetensors.numpy import save_file
        save_file(tensors, str(path))
        return
    header: dict[str, dict] = {}
    blobs, offset = [], 0
    for name, a in tensors.items():
        raw = _bf16_bits(a).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in blobs:
            f.write(raw)


def write_tiny_lm(directory: str | Path, cfg: LmConfig = TINY_LM, seed: int = 0, bf16: bool = False) -> Path:
    """Write `model.safetensors` into `directory`; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LM_FILE
    write_safetensors(path, tiny_lm_tensors(cfg, seed, bf16), bf16)
    return path


def kyutai_lm_kwargs(cfg: LmConfig) -> dict:
    """Keyword arguments of Kyutai's `LMModel` for `cfg` (NVIDIA's `_lm_kwargs` shape, dep_q included,
    depformer_causal dropped): the test-only reference builds the same network from them."""
    d = dataclasses.asdict(cfg)
    d["delays"] = list(cfg.delays)
    d.update(causal=True, layer_scale=None, gating="silu", positional_embedding="rope",
             depformer_layer_scale=None, depformer_multi_linear=True, depformer_context=8,
             depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
             depformer_weights_per_step=True)
    return d
