"""Token sampling for the LM: temperature + top-k over logits, reproducible from a seed.

The random key lives in the caller's state (`TokenSampler`), not in a global generator, so a session
can be snapshotted and replayed exactly and two sessions never disturb each other's draws. Everything
stays lazy (MLX arrays), so a whole LM step, depformer slices included, evaluates at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Defaults are PersonaPlex's: text temperature 0.7, top-k 25; audio 0.8, top-k 250.

    A temperature of 0 means greedy (argmax); a top_k of 0 means the whole vocabulary.
    """

    text_temperature: float = 0.7
    text_top_k: int = 25
    audio_temperature: float = 0.8
    audio_top_k: int = 250

    def __post_init__(self) -> None:
        for name in ("text_temperature", "audio_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"SamplingConfig.{name} must be a number >= 0, got {value!r}")
        for name in ("text_top_k", "audio_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SamplingConfig.{name} must be an integer >= 0, got {value!r}")


GREEDY = SamplingConfig(text_temperature=0.0, audio_temperature=0.0)


def sample(logits: mx.array, temperature: float, top_k: int, key: mx.array | None) -> mx.array:
    """One token id per row of `logits` [..., V] (int32 [...])."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    if key is None:
        raise ValueError("sampling with a temperature > 0 needs a random key")
    vocab = logits.shape[-1]
    scaled = logits.astype(mx.float32) / temperature
    if 0 < top_k < vocab:
        top = mx.argpartition(-scaled, kth=top_k - 1, axis=-1)[..., :top_k]
        choice = mx.random.categorical(mx.take_along_axis(scaled, top, axis=-1), axis=-1, key=key)
        return mx.take_along_axis(top, choice[..., None], axis=-1).squeeze(-1).astype(mx.int32)
    return mx.random.categorical(scaled, axis=-1, key=key).astype(mx.int32)


class TokenSampler:
    """Samples text and audio tokens with one seeded key chain; the key is part of a session's state."""

    def __init__(self, config: SamplingConfig = SamplingConfig(), seed: int = 0):
        if not isinstance(config, SamplingConfig):
            raise ValueError(f"TokenSampler needs a SamplingConfig, got {type(config).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.config = config
        self.key = mx.random.key(seed)

    def next_key(self) -> mx.array:
        """A fresh key, advancing the chain (for draws made elsewhere, e.g. a compiled depformer frame)."""
        self.key, sub = mx.random.split(self.key)
        return sub

    def text(self, logits: mx.array) -> mx.array:
        c = self.config
        key = self.next_key() if c.text_temperature > 0 else None
        return sample(logits, c.text_temperature, c.text_top_k, key)

    def audio(self, logits: mx.array) -> mx.array:
        c = self.config
        key = self.next_key() if c.audio_temperature > 0 else None
        return sample(logits, c.audio_temperature, c.audio_top_k, key)
