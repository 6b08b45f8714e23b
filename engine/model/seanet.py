"""SEANet encoder and decoder: Mimi's convolutional halves between 24 kHz audio and 25 Hz latents.

The encoder downsamples by the product of its ratios (4*5*6*8 = 960 samples per latent step) and the
decoder mirrors it. Both are stacks of causal streaming convolutions (engine/model/conv.py) with ELU
activations and residual blocks, so they keep a tuple of per-layer states between 80 ms steps.
Tensors are `[batch, time, channels]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .conv import ConvState, ConvTransposeState, StreamingConv1d, StreamingConvTranspose1d


@dataclass(frozen=True)
class SeanetConfig:
    """The SEANet hyper-parameters; `ratios` are in decoder order (the encoder uses them reversed)."""

    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    n_residual_layers: int = 1
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2
    pad_mode: str = "constant"

    @property
    def hop_length(self) -> int:
        """Audio samples per latent step."""
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


class ResidualBlock(nn.Module):
    """`x + conv2(elu(conv1(elu(x))))`, conv1 dilated and narrowing by `compress`, conv2 of size 1."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, pad_mode: str):
        super().__init__()
        hidden = dim // compress
        self.conv1 = StreamingConv1d(dim, hidden, kernel_size, dilation=dilation, pad_mode=pad_mode)
        self.conv2 = StreamingConv1d(hidden, dim, 1, pad_mode=pad_mode)

    def step(self, x: mx.array, state: tuple[ConvState, ConvState]) -> tuple[mx.array, tuple]:
        h, s1 = self.conv1.step(nn.elu(x), state[0])
        h, s2 = self.conv2.step(nn.elu(h), state[1])
        return x + h, (s1, s2)

    def step_slots(self, x: mx.array, states: list[tuple[ConvState, ConvState]], rows: list[int]):
        h, s1 = self.conv1.step_slots(nn.elu(x), [s[0] for s in states], rows)
        h, s2 = self.conv2.step_slots(nn.elu(h), [s[1] for s in states], rows)
        return x + h, list(zip(s1, s2))


def _fresh(layer: nn.Module):
    if isinstance(layer, ResidualBlock):
        return (ConvState(), ConvState())
    if isinstance(layer, StreamingConvTranspose1d):
        return ConvTransposeState()
    return ConvState()


@dataclass(frozen=True)
class SeanetState:
    """One state per layer, in the order of `layers`; empty means a fresh stream."""

    layers: tuple = field(default_factory=tuple)


class _Stack(nn.Module):
    """A sequence of streaming layers with an ELU before each (strided or final) convolution."""

    def step(self, x: mx.array, state: SeanetState) -> tuple[mx.array, SeanetState]:
        states = state.layers or tuple(_fresh(layer) for layer in self.layers)
        new_states = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, states)):
            if index > 0 and not isinstance(layer, ResidualBlock):
                x = nn.elu(x)
            x, layer_state = layer.step(x, layer_state)
            new_states.append(layer_state)
        return x, SeanetState(tuple(new_states))

    def step_slots(self, x: mx.array, states: list[SeanetState], rows: list[int]) -> tuple[mx.array, list[SeanetState]]:
        """`step` for several streams at once: stream i owns the next `rows[i]` rows of `x` and its own
        state (fresh or not); each layer runs once over all rows (ConvState.step_slots)."""
        per_stream = [s.layers or tuple(_fresh(layer) for layer in self.layers) for s in states]
        new_states: list[list] = [[] for _ in states]
        for index, layer in enumerate(self.layers):
            if index > 0 and not isinstance(layer, ResidualBlock):
                x = nn.elu(x)
            x, layer_states = layer.step_slots(x, [p[index] for p in per_stream], rows)
            for mine, layer_state in zip(new_states, layer_states):
                mine.append(layer_state)
        return x, [SeanetState(tuple(s)) for s in new_states]


class SeanetEncoder(_Stack):
    """Audio `[B, T, channels]` -> latents `[B, T / hop_length, dimension]`."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        pad = cfg.pad_mode
        width = cfg.n_filters
        layers: list[nn.Module] = [StreamingConv1d(cfg.channels, width, cfg.kernel_size, pad_mode=pad)]
        for ratio in reversed(cfg.ratios):
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(width, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, pad)
                )
            layers.append(StreamingConv1d(width, width * 2, ratio * 2, stride=ratio, pad_mode=pad))
            width *= 2
        layers.append(StreamingConv1d(width, cfg.dimension, cfg.last_kernel_size, pad_mode=pad))
        self.layers = layers


class SeanetDecoder(_Stack):
    """Latents `[B, T, dimension]` -> audio `[B, T * hop_length, channels]`."""

    def __init__(self, cfg: SeanetConfig):
        super().__init__()
        pad = cfg.pad_mode
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [StreamingConv1d(cfg.dimension, width, cfg.kernel_size, pad_mode=pad)]
        for ratio in cfg.ratios:
            layers.append(StreamingConvTranspose1d(width, width // 2, ratio * 2, stride=ratio))
            width //= 2
            for j in range(cfg.n_residual_layers):
                layers.append(
                    ResidualBlock(width, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress, pad)
                )
        layers.append(StreamingConv1d(width, cfg.channels, cfg.last_kernel_size, pad_mode=pad))
        self.layers = layers
