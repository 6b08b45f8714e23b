"""LmConfig: one description for every size of the Moshi-architecture LM (PersonaPlex-7B, Moshiko, tiny).

The temporal transformer, the depformer and the delayed-stream layout are the same code for all sizes;
only these numbers change. Field names follow Kyutai's `LMModel` keyword arguments (and NVIDIA's
`loaders._lm_kwargs`), so `from_dict` reads their configs directly and fails loudly, naming the key,
on anything it would otherwise have to ignore.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .transformer import TransformerConfig

# 17 streams: text, the agent's 8 codebooks, the user's 8. The agent's codebooks 1-7 lag one frame (80 ms).
PERSONAPLEX_DELAYS = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

# Kyutai/NVIDIA keys whose only supported value is fixed by this implementation.
_FIXED_KEYS: dict[str, Any] = {
    "causal": True,
    "layer_scale": None,
    "gating": "silu",
    "positional_embedding": "rope",
    "depformer_causal": True,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "norm_emb": False,
    "bias_proj": False,
    "demux_second_text_stream": False,
}
# Keys that do not change the network we build: Kyutai and NVIDIA force the depformer's context to None
# (it only ever sees the dep_q positions of one frame), and without RoPE its max_period is unused.
_IGNORED_KEYS = ("depformer_context", "depformer_max_period")


@dataclass(frozen=True, kw_only=True)
class LmConfig:
    dim: int
    num_heads: int
    num_layers: int
    hidden_scale: float
    context: int
    max_period: float = 10000.0
    norm: str = "rms_norm_f32"
    text_card: int = 32000
    existing_text_padding_id: int = 3
    card: int = 2048
    n_q: int = 16
    dep_q: int = 16
    delays: tuple[int, ...] = PERSONAPLEX_DELAYS
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = int(4.125 * 1024)

    def __post_init__(self) -> None:
        object.__setattr__(self, "delays", tuple(int(d) for d in self.delays))
        positive = ("dim", "num_heads", "num_layers", "context", "text_card", "card", "n_q", "dep_q",
                    "depformer_dim", "depformer_num_heads", "depformer_num_layers", "depformer_dim_feedforward")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LmConfig.{name} must be a positive integer, got {value!r}")
        if not self.hidden_scale > 0:
            raise ValueError(f"LmConfig.hidden_scale must be > 0, got {self.hidden_scale!r}")
        if self.n_q % 2:
            raise ValueError(f"LmConfig.n_q must be even (agent + user codebooks), got {self.n_q}")
        if self.dep_q < self.agent_codebooks or self.dep_q > self.n_q:
            raise ValueError(
                f"LmConfig.dep_q must be between {self.agent_codebooks} and n_q={self.n_q}, got {self.dep_q}")
        if len(self.delays) != self.num_streams:
            raise ValueError(
                f"LmConfig.delays needs one delay per stream ({self.num_streams}), got {len(self.delays)}")
        if any(d < 0 for d in self.delays):
            raise ValueError(f"LmConfig.delays must be >= 0, got {self.delays}")
        if not 0 <= self.existing_text_padding_id < self.text_card:
            raise ValueError(
                f"LmConfig.existing_text_padding_id must be a text id below text_card={self.text_card}, "
                f"got {self.existing_text_padding_id}")
        # Building the transformer configs validates heads, norms and widths.
        self.transformer
        self.depformer

    # -- derived values -------------------------------------------------------------------------------

    @property
    def num_streams(self) -> int:
        """Text + all audio codebooks (17 for PersonaPlex)."""
        return self.n_q + 1

    @property
    def agent_codebooks(self) -> int:
        """Codebooks per audio stream (8): the agent's are streams 1..8, the user's the next 8."""
        return self.n_q // 2

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_initial_token(self) -> int:
        """Fed for the text stream before anything was generated (one past the vocabulary)."""
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.card

    @property
    def text_padding_token(self) -> int:
        return self.existing_text_padding_id

    @property
    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), context=self.context, norm=self.norm,
            gating="silu", positional_embedding="rope", max_period=self.max_period)

    @property
    def depformer(self) -> TransformerConfig:
        return TransformerConfig(
            d_model=self.depformer_dim, num_heads=self.depformer_num_heads,
            num_layers=self.depformer_num_layers, dim_feedforward=self.depformer_dim_feedforward,
            context=None, norm=self.norm, gating="silu", positional_embedding="none",
            weights_per_step=self.dep_q)

    @property
    def checkpoint_tensor_count(self) -> int:
        """Tensors in a PyTorch checkpoint of this config (475 for PersonaPlex, 355 for Moshiko)."""
        fixed = self.n_q + 3 + 3 * self.dep_q  # emb.*, text_emb, text_linear, out_norm; depformer_in/emb/linears
        return fixed + 6 * self.num_layers + (4 + 2 * self.dep_q) * self.depformer_num_layers

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LmConfig":
        """Read Kyutai/NVIDIA LM keyword arguments (or `to_dict()` output); unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"LmConfig.from_dict expects a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in _FIXED_KEYS:
                if value != _FIXED_KEYS[key]:
                    raise ValueError(
                        f"LmConfig: {key}={value!r} is not supported (this implementation needs "
                        f"{_FIXED_KEYS[key]!r})")
            elif key not in _IGNORED_KEYS:
                raise ValueError(f"LmConfig: unknown key {key!r}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"LmConfig: missing keys {missing}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["delays"] = list(self.delays)
        return d


def personaplex_7b() -> LmConfig:
    """NVIDIA PersonaPlex-7B-v1: Moshi's temporal transformer, a 16-slice depformer (user audio too)."""
    return LmConfig(dim=4096, num_heads=32, num_layers=32, hidden_scale=4.125, context=3000)


def moshiko_7b() -> LmConfig:
    """Kyutai's Moshiko: the same temporal transformer, a depformer of 8 slices (agent audio only)."""
    return LmConfig(dim=4096, num_heads=32, num_layers=32, hidden_scale=4.125, context=3000, dep_q=8)
