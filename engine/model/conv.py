"""Streaming causal 1-d convolutions, the building blocks of the Mimi codec.

A causal convolution fed chunk by chunk must give the same output as when fed the whole signal at once,
so each layer carries a small state between calls: the last `kernel - stride` input samples for a
convolution, the not-yet-complete output tail for a transposed convolution. A whole sequence is simply
one big step from a fresh state, which makes "whole == streamed" true by construction (as in Kyutai's
PyTorch `moshi`, whose checkpoints these layers load).

Layout: MLX convolutions are channels-last, so every tensor here is `[batch, time, channels]`.
States are immutable (a new state object per step): a snapshot is just a reference to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PAD_MODES = ("constant", "replicate")


@dataclass(frozen=True)
class ConvState:
    """What a causal convolution remembers between steps.

    `previous` holds the last `kernel_span - stride` input samples `[B, span - stride, C_in]`; `None`
    means a fresh stream, whose history is zeros ("constant") or the first sample repeated ("replicate").
    """

    previous: mx.array | None = None


@dataclass(frozen=True)
class ConvTransposeState:
    """The `kernel - stride` output samples `[B, K - S, C_out]` a transposed convolution has started but
    not finished (bias excluded); `None` means a fresh stream."""

    partial: mx.array | None = None


class StreamingConv1d(nn.Module):
    """Causal `Conv1d` whose left padding is the previous step's input.

    Weight layout is MLX's `[C_out, K, C_in / groups]`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels} -> {out_channels}) must be divisible by groups={groups}")
        scale = (in_channels // groups * kernel_size) ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.pad_mode = pad_mode

    @property
    def history(self) -> int:
        """Input samples (at this layer's rate) carried from one step to the next."""
        return (self.kernel_size - 1) * self.dilation + 1 - self.stride

    def step(self, x: mx.array, state: ConvState) -> tuple[mx.array, ConvState]:
        """Convolve `x` `[B, T, C_in]` (T a multiple of the stride) -> `[B, T / stride, C_out]`."""
        if x.shape[1] % self.stride:
            raise ValueError(f"a step must hold a multiple of {self.stride} samples, got {x.shape[1]}")
        span = self.history
        if span > 0:
            previous = state.previous
            if previous is None:
                if self.pad_mode == "replicate":
                    previous = mx.repeat(x[:, :1, :], span, axis=1)
                else:
                    previous = mx.zeros((x.shape[0], span, x.shape[2]), dtype=x.dtype)
            x = mx.concatenate([previous, x], axis=1)
            state = ConvState(x[:, x.shape[1] - span :, :])
        y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation, groups=self.groups)
        if "bias" in self:
            y = y + self.bias
        return y, state

    def step_slots(self, x: mx.array, states: list[ConvState], rows: list[int]) -> tuple[mx.array, list[ConvState]]:
        """`step` for several streams at once (a batch of calls): stream i owns the next `rows[i]` rows of
        `x` and has its own state (a fresh one starts from its own zeros or first sample). One
        convolution over all rows; each stream's rows and state equal what `step` gives it alone."""
        if x.shape[1] % self.stride:
            raise ValueError(f"a step must hold a multiple of {self.stride} samples, got {x.shape[1]}")
        span = self.history
        if span <= 0:
            out_states = list(states)
        else:
            previous, row = [], 0
            for state, n in zip(states, rows):
                p = state.previous
                if p is None:
                    if self.pad_mode == "replicate":
                        p = mx.repeat(x[row:row + n, :1, :], span, axis=1)
                    else:
                        p = mx.zeros((n, span, x.shape[2]), dtype=x.dtype)
                previous.append(p)
                row += n
            x = mx.concatenate([previous[0] if len(previous) == 1 else mx.concatenate(previous, axis=0), x], axis=1)
            tail = x.shape[1] - span
            out_states, row = [], 0
            for n in rows:
                out_states.append(ConvState(x[row:row + n, tail:, :]))
                row += n
        y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation, groups=self.groups)
        if "bias" in self:
            y = y + self.bias
        return y, out_states


class StreamingConvTranspose1d(nn.Module):
    """Causal `ConvTranspose1d`: each step emits `stride` samples per input sample and keeps the overlap.

    Weight layout is MLX's `[C_out, K, C_in / groups]`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels} -> {out_channels}) must be divisible by groups={groups}")
        if kernel_size < stride:
            raise ValueError(f"kernel_size {kernel_size} must be at least the stride {stride}")
        scale = (in_channels // groups * kernel_size) ** -0.5
        self.weight = mx.random.uniform(-scale, scale, (out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups

    def step(self, x: mx.array, state: ConvTransposeState) -> tuple[mx.array, ConvTransposeState]:
        """Upsample `x` `[B, T, C_in]` -> `[B, T * stride, C_out]`."""
        y = self._convolve(x)
        overlap = self.kernel_size - self.stride
        if overlap > 0:
            if state.partial is not None:
                y = mx.concatenate([y[:, :overlap, :] + state.partial, y[:, overlap:, :]], axis=1)
            tail = y[:, y.shape[1] - overlap :, :]
            y = y[:, : y.shape[1] - overlap, :]
            state = ConvTransposeState(tail)
        if "bias" in self:
            y = y + self.bias
        return y, state

    def step_slots(self, x: mx.array, states: list[ConvTransposeState], rows: list[int],
                   ) -> tuple[mx.array, list[ConvTransposeState]]:
        """`step` for several streams at once (see `StreamingConv1d.step_slots`); a fresh stream adds no
        partial tail (selected, not added as zeros, so its samples are exactly those of `step`)."""
        y = self._convolve(x)
        overlap = self.kernel_size - self.stride
        out_states = list(states)
        if overlap > 0:
            partials = [s.partial for s in states]
            if all(p is not None for p in partials):
                partial = partials[0] if len(partials) == 1 else mx.concatenate(partials, axis=0)
                y = mx.concatenate([y[:, :overlap, :] + partial, y[:, overlap:, :]], axis=1)
            elif any(p is not None for p in partials):
                filled = [p if p is not None else mx.zeros((n, overlap, y.shape[2]), dtype=y.dtype)
                          for p, n in zip(partials, rows)]
                has = mx.array(np.repeat([p is not None for p in partials], rows))[:, None, None]
                head = y[:, :overlap, :]
                y = mx.concatenate([mx.where(has, head + mx.concatenate(filled, axis=0), head), y[:, overlap:, :]],
                                   axis=1)
            tail = y.shape[1] - overlap
            out_states, row = [], 0
            for n in rows:
                out_states.append(ConvTransposeState(y[row:row + n, tail:, :]))
                row += n
            y = y[:, :tail, :]
        if "bias" in self:
            y = y + self.bias
        return y, out_states

    def _convolve(self, x: mx.array) -> mx.array:
        """Full (untrimmed) transposed convolution: `[B, T, C_in]` -> `[B, (T - 1) * S + K, C_out]`."""
        b, t, _ = x.shape
        k, s, c_out = self.kernel_size, self.stride, self.out_channels
        if self.groups == 1:
            # Every input sample writes K output samples: one matmul, then overlap-add. On this CPU
            # that ran 1.4-2.3x faster than MLX 0.32's conv_transpose1d for Mimi's decoder shapes.
            taps = (x @ self.weight.reshape(c_out * k, self.in_channels).T).reshape(b, t, c_out, k)
            taps = taps.transpose(0, 1, 3, 2)
        elif self.groups == self.in_channels == c_out:
            taps = x[:, :, None, :] * self.weight[:, :, 0].T  # depthwise: [B, T, K, C]
        else:
            return mx.conv_transpose1d(x, self.weight, stride=s, groups=self.groups)
        blocks = -(-k // s)
        if blocks * s != k:
            taps = mx.pad(taps, [(0, 0), (0, 0), (0, blocks * s - k), (0, 0)])
        taps = taps.reshape(b, t, blocks, s, c_out)
        y = taps[:, :, 0]
        if blocks > 1:
            y = mx.pad(y, [(0, 0), (0, blocks - 1), (0, 0), (0, 0)])
            for j in range(1, blocks):
                y = y + mx.pad(taps[:, :, j], [(0, 0), (j, blocks - 1 - j), (0, 0), (0, 0)])
        y = y.reshape(b, (t + blocks - 1) * s, c_out)
        return y[:, : (t - 1) * s + k]
