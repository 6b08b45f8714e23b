"""Mimi's split residual vector quantizer: 12.5 Hz latents <-> integer codes, one per codebook.

Codebook 0 (`rvq_first`, the "semantic" one) and codebooks 1.. (`rvq_rest`, "acoustic") each have their
own input and output projections; `rvq_rest` quantizes the residual of its own projection, not of the
first codebook. The checkpoint trains 1 + 31 codebooks; PersonaPlex uses the first 8, so only
`num_codebooks - 1` of `rvq_rest` are built. A code is the index of the nearest centroid (Euclidean).
Tensors are `[batch, time, dim]`; codes are `[batch, num_codebooks, time]` int32.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class Codebook(nn.Module):
    """`bins` centroids of size `dim`; the checkpoint stores them as `embedding_sum / cluster_usage`."""

    def __init__(self, dim: int, bins: int):
        super().__init__()
        self.embedding = mx.zeros((bins, dim))
        self._norms_of = (None, None)  # (embedding it was computed from, its squared norms / 2)

    def _half_norms(self) -> mx.array:
        # Cached per embedding array: loading weights replaces the array, which invalidates this.
        source, norms = self._norms_of
        if source is not self.embedding:
            norms = (self.embedding * self.embedding).sum(axis=-1) / 2
            mx.eval(norms)
            self._norms_of = (self.embedding, norms)
        return norms

    def encode(self, x: mx.array) -> mx.array:
        """Nearest centroid of each vector of `x` `[..., dim]` -> `[...]` int32."""
        # |x - e|^2 / 2 = |x|^2 / 2 - x.e + |e|^2 / 2; the |x|^2 term is the same for every centroid.
        distances = self._half_norms() - x @ self.embedding.T
        return mx.argmin(distances, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:
        return self.embedding[codes]


class ResidualVectorQuantizer(nn.Module):
    """Project in, quantize the residual codebook by codebook, project out."""

    def __init__(self, dim: int, input_dim: int, output_dim: int, num_codebooks: int, bins: int):
        super().__init__()
        self.input_proj = nn.Linear(input_dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, output_dim, bias=False)
        self.codebooks = [Codebook(dim, bins) for _ in range(num_codebooks)]

    def encode(self, x: mx.array) -> mx.array:
        residual = self.input_proj(x)
        codes = []
        for codebook in self.codebooks:
            code = codebook.encode(residual)
            residual = residual - codebook.decode(code)
            codes.append(code)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        quantized = self.codebooks[0].decode(codes[:, 0])
        for index in range(1, codes.shape[1]):
            quantized = quantized + self.codebooks[index].decode(codes[:, index])
        return self.output_proj(quantized)


class SplitResidualVectorQuantizer(nn.Module):
    """Codebook 0 from `rvq_first`, codebooks 1..num_codebooks-1 from `rvq_rest`."""

    def __init__(self, dim: int, input_dim: int, output_dim: int, num_codebooks: int, bins: int):
        super().__init__()
        if num_codebooks < 2:
            raise ValueError(f"the split quantizer needs at least 2 codebooks, got {num_codebooks}")
        self.num_codebooks = num_codebooks
        self.bins = bins
        self.rvq_first = ResidualVectorQuantizer(dim, input_dim, output_dim, 1, bins)
        self.rvq_rest = ResidualVectorQuantizer(dim, input_dim, output_dim, num_codebooks - 1, bins)

    def encode(self, x: mx.array) -> mx.array:
        """Latents `[B, T, input_dim]` -> codes `[B, num_codebooks, T]` int32."""
        return mx.concatenate([self.rvq_first.encode(x), self.rvq_rest.encode(x)], axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        """Codes `[B, num_codebooks, T]` -> latents `[B, T, output_dim]`."""
        return self.rvq_first.decode(codes[:, :1]) + self.rvq_rest.decode(codes[:, 1:])
