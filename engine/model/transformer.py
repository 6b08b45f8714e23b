"""Causal streaming transformer shared by the LM (temporal transformer, depformer) and Mimi.

Both models are Kyutai transformers that differ only in switches (norm, FFN kind, layer scale, per-step
weights), so one implementation serves them and one set of parity tests covers it. Streaming is the
normal mode: `step()` takes the next T >= 1 positions and a `TransformerCache` that the caller owns; the
cache is a ring over the last `context` positions, so attention is an exact sliding window and a stream
can run forever (a phone call is not bounded by the 3000-step context). Caches update functionally
(new arrays, never writes into shared ones), which makes `snapshot()`/`restore()` reference copies:
milliseconds, whatever the cache size.

Conventions, all as in Kyutai's PyTorch `moshi.modules.transformer` (the parity reference):
- attention is causal; a query at position t sees positions t-context+1 .. t (`context` of them);
- RoPE is "interleaved" (pairs of adjacent features rotate together: MLX's traditional=True), base
  `max_period`, applied to queries and keys before they are cached;
- the gated FFN splits `linear_in`'s 2*hidden outputs as [gate, value]: silu(gate) * value;
  its hidden size follows Kyutai: 21*d/8 when dim_feedforward == 4*d, else 2*dim_feedforward/3;
- the plain MLP (Mimi) is linear1 -> exact (erf) GELU -> linear2, without biases;
- "rms_norm_f32" is RMSNorm computed in float32 with eps 1e-8; "rms_norm" and "layer_norm" use 1e-5;
- with `weights_per_step` = N (the depformer), position i of a stream uses the i-th attention
  projections and FFN, while the norms are shared.

One deliberate difference: when a streaming step carries T > 1 positions past the context, Kyutai's
ring (capacity = context) is written before it is read, so the earlier queries of the step lose up to
T-1 of their oldest keys. Our default is the exact window (streaming == whole sequence, which is what
the model was trained on); `kyutai_ring=True` reproduces Kyutai's streaming for parity tests (Mimi steps
2 positions per 80 ms frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mlx.core as mx
import mlx.nn as nn

NORMS = ("rms_norm_f32", "rms_norm", "layer_norm")
GATINGS = ("silu", "none")
POSITIONAL_EMBEDDINGS = ("rope", "none")


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Shape and switches of one transformer stack; derived sizes are properties."""

    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int | None = None
    norm: str = "rms_norm_f32"
    gating: str = "silu"
    layer_scale: bool = False
    positional_embedding: str = "rope"
    rope_interleave: bool = True
    max_period: float = 10000.0
    weights_per_step: int = 0
    kyutai_ring: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "num_layers", "dim_feedforward"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TransformerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig: d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 and self.positional_embedding == "rope":
            raise ValueError(f"TransformerConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if self.norm not in NORMS:
            raise ValueError(f"TransformerConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.gating not in GATINGS:
            raise ValueError(f"TransformerConfig.gating must be one of {GATINGS}, got {self.gating!r}")
        if self.positional_embedding not in POSITIONAL_EMBEDDINGS:
            raise ValueError(
                f"TransformerConfig.positional_embedding must be one of {POSITIONAL_EMBEDDINGS}, "
                f"got {self.positional_embedding!r}")
        if self.context is not None and self.context <= 0:
            raise ValueError(f"TransformerConfig.context must be > 0 or None, got {self.context}")
        if self.weights_per_step < 0:
            raise ValueError(f"TransformerConfig.weights_per_step must be >= 0, got {self.weights_per_step}")
        if self.weights_per_step and self.gating == "none":
            raise ValueError("TransformerConfig: weights_per_step needs the gated FFN (as in Kyutai's)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def norm_eps(self) -> float:
        return 1e-8 if self.norm == "rms_norm_f32" else 1e-5

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the gated FFN (Kyutai's `ActivationGating` rule)."""
        if self.dim_feedforward == 4 * self.d_model:
            return (21 * self.d_model) // 8
        return (2 * self.dim_feedforward) // 3

    @property
    def cache_capacity(self) -> int:
        """Positions a streaming cache keeps: the context, else one per step weight."""
        if self.context is not None:
            return self.context
        if self.weights_per_step:
            return self.weights_per_step
        raise ValueError("TransformerConfig: streaming needs a context (or weights_per_step) to size its cache")


class RMSNorm(nn.Module):
    """RMSNorm; Kyutai stores the weight as `alpha` [1, 1, d], we keep it as `weight` [d]."""

    def __init__(self, dims: int, eps: float, compute_f32: bool):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps
        self.compute_f32 = compute_f32

    def __call__(self, x: mx.array) -> mx.array:
        if self.compute_f32 and x.dtype != mx.float32:
            y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
            return y.astype(x.dtype)
        return mx.fast.rms_norm(x, self.weight, self.eps)


class LayerScale(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.scale = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "layer_norm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps, compute_f32=cfg.norm == "rms_norm_f32")


class GatedFFN(nn.Module):
    """silu(gate) * value, Kyutai's `ActivationGating`."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.linear_in(x)
        gate, value = mx.split(h, 2, axis=-1)
        return self.linear_out(nn.silu(gate) * value)


KV_BITS = (8, 4)
KV_GROUP_SIZE = 64  # values per quantization group (mlx-lm's QuantizedKVCache default)


def kv_head_major(head_dim: int, group_size: int = KV_GROUP_SIZE) -> bool:
    """Whether a quantized ring of heads this wide is stored head-major (groups inside one head), which
    the fused attention (`kv_fused_attention`) reads; else position-major (groups across heads)."""
    return head_dim % group_size == 0


def kv_encode(x: mx.array, bits: int | None, group_size: int = KV_GROUP_SIZE):
    """Keys or values [B, heads, T, head_dim] as a ring stores them: the array itself, or with `bits` a
    tuple (packed uint32, scales, biases) in one of two layouts, slots on axis 2 in both (as in the float
    ring, so cutting, joining and writing slots is the same code for all three forms):

    - head-major, when head_dim is a multiple of the group (the 7B: 128 and 64): packed
      [B, heads, T, head_dim*bits/32], scales and biases [B, heads, T, head_dim/group], mlx-lm's
      QuantizedKVCache layout. `mx.quantized_matmul` takes it batched over [B, heads], so attention
      reads the packed ring itself (`kv_fused_attention`), never a dequantized copy;
    - position-major, for heads narrower than a group (the tiny test model's 16): one row of
      heads*head_dim values per position, [B, 1, T, heads*head_dim*bits/32] and [B, 1, T, heads*head_dim/group]
      (a head shares its group's scale with its neighbours), read dequantized (`kv_decode`).

    A group of the position-major row never straddles two heads when head_dim is a multiple of the
    group, so both layouts quantize the same values to the same codes, scales and biases: the layout
    changes, the numbers do not (tests/test_kv_fused.py checks it)."""
    if not bits:
        return x
    if kv_head_major(x.shape[3], group_size):
        return tuple(mx.quantize(x, group_size=group_size, bits=bits))
    b, h, t, d = x.shape
    return tuple(mx.quantize(x.transpose(0, 2, 1, 3).reshape(b, 1, t, h * d), group_size=group_size, bits=bits))


def kv_format(stored, heads: int, head_dim: int) -> tuple[int, int]:
    """(bits, group size) of a quantized ring, read off its arrays' shapes."""
    packed, scales = stored[0], stored[1]
    width = heads * head_dim // packed.shape[1]  # values per row: head_dim (head-major) or heads*head_dim
    return packed.shape[-1] * 32 // width, width // scales.shape[-1]


def kv_decode(stored, heads: int, head_dim: int) -> mx.array:
    """`kv_encode`'s inverse: [B, heads, T, head_dim] in the dtype the values were quantized from."""
    if not isinstance(stored, tuple):
        return stored
    packed, scales, biases = stored
    if packed.shape[2] == 0:  # mx.dequantize cannot reshape an empty array
        return mx.zeros((packed.shape[0], heads, 0, head_dim), dtype=scales.dtype)
    bits, group_size = kv_format(stored, heads, head_dim)
    x = mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    if packed.shape[1] == heads:  # head-major (or one head: both layouts are the same)
        return x
    b, t = packed.shape[0], packed.shape[2]
    return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3)


def kv_fusable(stored, heads: int) -> bool:
    """Whether `kv_fused_attention` can read this ring: quantized and head-major."""
    return isinstance(stored, tuple) and stored[0].shape[1] == heads


def kv_fused_attention(q: mx.array, keys: tuple, values: tuple, scale: float,
                       mask: mx.array | None = None) -> mx.array:
    """Attention of queries q [B, heads, T, head_dim] over a head-major quantized ring without
    dequantizing it: scores = quantized_matmul(q * scale, keys^T), softmax in float32 over the slots
    where `mask` (broadcast to [B, heads, T, slots]) is true (all when None), then
    quantized_matmul(probs, values). Each matmul reads the packed codes, scales and biases once, so a
    step reads bits/16 + 2/group of the bf16 ring's bytes (kv8: 0.53x) instead of that plus a float copy
    written and read again (kv8 dequantized: 2.53x). The result is in q's dtype; it equals the
    dequantize-then-SDPA path within float rounding (scores and probabilities are rounded to q's dtype
    between the two matmuls, as in mlx-lm's quantized attention; tests/test_kv_fused.py states the
    tolerance)."""
    bits, group = kv_format(keys, q.shape[1], q.shape[3])
    scores = mx.quantized_matmul(q * scale, *keys, transpose=True, group_size=group, bits=bits)
    scores = scores.astype(mx.float32)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    probs = mx.softmax(scores, axis=-1).astype(q.dtype)
    return mx.quantized_matmul(probs, *values, transpose=False, group_size=group, bits=bits)


def _slots(stored) -> int:
    return stored[0].shape[2] if isinstance(stored, tuple) else stored.shape[2]


def _cut(stored, start: int, stop: int):
    if isinstance(stored, tuple):
        return tuple(a[:, :, start:stop] for a in stored)
    return stored[:, :, start:stop]


def _cat(parts: list):
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate([p[i] for p in parts], axis=2) for i in range(3))
    return mx.concatenate(parts, axis=2)


def _put(stored, new, start: mx.array):
    if isinstance(stored, tuple):
        return tuple(mx.slice_update(a, n, start, axes=(2,)) for a, n in zip(stored, new))
    return mx.slice_update(stored, new, start, axes=(2,))


def _copy(stored):
    return tuple(mx.contiguous(a) for a in stored) if isinstance(stored, tuple) else mx.contiguous(stored)


def _arrays(stored) -> list[mx.array]:
    return list(stored) if isinstance(stored, tuple) else [stored]


def ring_span(offset: int, capacity: int) -> int:
    """Ring slots a one-position step at absolute position `offset` reads: the whole ring once it has
    filled, else a power-of-two prefix (>= 32) holding positions 0..offset. A cache's arrays grow to
    exactly these sizes (few compiled shapes, and the same values read as with a full-size ring)."""
    if offset + 1 >= capacity:
        return capacity
    return min(capacity, max(32, 1 << offset.bit_length()))


class KVCache:
    """Keys and values of one attention layer over the last `capacity` positions (a ring).

    `offset` is the absolute position of the next entry; the entry of position p lives in slot
    p % capacity. Updates build new arrays (never write into the old ones), so holding a reference
    is a snapshot.

    The arrays grow with the stream instead of holding `capacity` slots from the start: their length
    (`allocated`) is 0 when fresh, then the span the next step reads (`ring_span`: 32, 64, ... slots,
    then `capacity`), so a short call or a prompt snapshot holds only what it has written (on the 7B a
    full 3000-frame ring is 1.5 GB of bf16 per call). Slots past `offset` hold zeros and are never
    read unmasked, so outputs are the same as with a full-size ring. `shape` is the full ring's.

    With `bits` (8 or 4) the ring holds keys and values quantized as mlx-lm's QuantizedKVCache does
    (`kv_encode`: groups of `group_size` values, a scale and a bias each); a position is quantized once,
    when it is written, and every read sees the same values. A one-position step over a head-major ring
    (head_dim a multiple of the group: the 7B) attends to it with `kv_fused_attention`, reading the
    packed ring itself; the other steps (a prompt of T > 1 positions, a ring with a mask of absolute
    positions, heads narrower than a group, `fused=False`) read it dequantized (`kv_decode`).
    """

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, capacity: int, dtype: mx.Dtype,
                 kyutai_ring: bool = False, bits: int | None = None, group_size: int = KV_GROUP_SIZE):
        if bits is not None and bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS} or None, got {bits!r}")
        if bits and (num_heads * head_dim) % group_size:
            raise ValueError(f"a quantized KV cache needs heads x head_dim ({num_heads * head_dim}) divisible "
                             f"by its group size {group_size}")
        self.capacity = capacity
        self.kyutai_ring = kyutai_ring
        self.shape = (batch_size, num_heads, capacity, head_dim)
        self.dtype = dtype
        self.bits, self.group_size = bits, group_size
        self.keys = self._zeros(0)
        self.values = self._zeros(0)
        self.offset = 0

    def _zeros(self, slots: int):
        b, h, _, d = self.shape
        return kv_encode(mx.zeros((b, h, slots, d), dtype=self.dtype), self.bits, self.group_size)

    @property
    def allocated(self) -> int:
        """Ring slots the arrays hold now (<= capacity)."""
        return _slots(self.keys)

    def reset(self) -> None:
        # Slots at or past `offset` are never read, so the old contents can stay.
        self.offset = 0

    def fit(self, length: int) -> None:
        """Make the arrays exactly `length` slots long: zeros appended, or unwritten slots cut off (only
        slots at or past `offset` of a ring that has not wrapped, which hold nothing)."""
        have = self.allocated
        if length == have:
            return
        if length < have:
            if self.offset > length:
                raise ValueError(f"cannot cut a ring holding {self.offset} positions to {length} slots")
            self.keys, self.values = _cut(self.keys, 0, length), _cut(self.values, 0, length)
            return
        pad = self._zeros(length - have)
        self.keys = _cat([self.keys, pad]) if have else pad
        self.values = _cat([self.values, pad]) if have else pad

    def _reserve(self, positions: int) -> None:
        """Room for absolute positions 0..positions-1 (all of the ring once they reach its capacity)."""
        need = self.capacity if positions >= self.capacity else ring_span(positions - 1, self.capacity)
        if need > self.allocated:
            self.fit(need)

    def slot_positions(self) -> np.ndarray:
        """Absolute position held by each allocated slot now (-1: empty)."""
        cap, end = self.capacity, self.offset
        slots = np.arange(self.allocated)
        if end <= cap:
            return np.where(slots < end, slots, -1)
        return end - 1 - ((end - 1 - slots) % cap)

    def _read(self, stored) -> mx.array:
        return kv_decode(stored, self.shape[1], self.shape[3])

    def _write(self, k, v) -> None:
        """Store T new positions, given as the ring stores them (`kv_encode`d)."""
        cap, t = self.capacity, _slots(k)
        if t >= cap:
            # Only the last `cap` entries survive; lay them out so position p sits in slot p % cap.
            k, v = _cut(k, t - cap, t), _cut(v, t - cap, t)
            first = (self.offset + t - cap) % cap
            cut = cap - first
            self.keys = _cat([_cut(k, cut, cap), _cut(k, 0, cut)]) if first else k
            self.values = _cat([_cut(v, cut, cap), _cut(v, 0, cut)]) if first else v
        else:
            self._reserve(self.offset + t)
            start = self.offset % cap
            head = min(t, cap - start)
            self.keys = _put(self.keys, _cut(k, 0, head), mx.array([start]))
            self.values = _put(self.values, _cut(v, 0, head), mx.array([start]))
            if head < t:
                self.keys = _put(self.keys, _cut(k, head, t), mx.array([0]))
                self.values = _put(self.values, _cut(v, head, t), mx.array([0]))
        self.offset += t

    def update_and_attend(self, q: mx.array, k: mx.array, v: mx.array, window: int | None,
                          scale: float, fused: bool = True) -> mx.array:
        """Store the new keys/values and attend the new queries to their window (causal). `fused`: a
        one-position step over a head-major quantized ring reads it packed (`kv_fused_attention`);
        False reads it dequantized (the reference the fused path is tested against)."""
        t = q.shape[2]
        sk, sv = kv_encode(k, self.bits, self.group_size), kv_encode(v, self.bits, self.group_size)
        if t == 1 and (window is None or window >= self.capacity):
            # Hot path (one LM step): after the write the ring holds exactly the window.
            self._write(sk, sv)
            n = min(self.offset, self.capacity)
            keys = self.keys if n == self.allocated else _cut(self.keys, 0, n)
            values = self.values if n == self.allocated else _cut(self.values, 0, n)
            if fused and kv_fusable(keys, self.shape[1]):
                return kv_fused_attention(q, keys, values, scale)
            return mx.fast.scaled_dot_product_attention(q, self._read(keys), self._read(values), scale=scale)
        if self.bits:  # attend to the values the ring will hold
            k, v = self._read(sk), self._read(sv)
        q_pos = self.offset + np.arange(t)
        if self.kyutai_ring:
            # Kyutai's order: write, then read what the ring still holds.
            self._write(sk, sv)
            k_pos, keys, values = self.slot_positions(), self._read(self.keys), self._read(self.values)
        else:
            # Exact window: old ring + new entries, masked by absolute position.
            k_pos = np.concatenate([self.slot_positions(), q_pos])
            keys = mx.concatenate([self._read(self.keys), k], axis=2)
            values = mx.concatenate([self._read(self.values), v], axis=2)
        mask = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
        if window is not None:
            mask &= (q_pos[:, None] - k_pos[None, :]) < window
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mx.array(mask))
        if not self.kyutai_ring:
            self._write(sk, sv)
        return out


@dataclass(frozen=True)
class CacheSnapshot:
    """Frozen state of a `TransformerCache`: per layer (keys, values, offset), and the ring's capacity
    (a cache restored from it takes that capacity: a bot's context travels with its prompt). Cheap:
    references only."""

    layers: tuple[tuple[object, object, int], ...]  # keys, values (arrays, or kv_encode's tuples), offset
    capacity: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = KV_GROUP_SIZE

    @property
    def offset(self) -> int:
        return self.layers[0][2] if self.layers else 0

    def arrays(self) -> list[mx.array]:
        return [a for keys, values, _ in self.layers for a in _arrays(keys) + _arrays(values)]


class TransformerCache:
    """The streaming state of one `Transformer`: one `KVCache` per layer, owned by the caller."""

    def __init__(self, layers: list[KVCache]):
        self.layers = layers

    @property
    def offset(self) -> int:
        """Positions consumed since the last reset."""
        return self.layers[0].offset if self.layers else 0

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity if self.layers else 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def snapshot(self, compact: bool = False) -> CacheSnapshot:
        """References to the arrays (milliseconds). `compact`: copies holding only the written slots
        when the ring has not wrapped (a prompt snapshot: its prompt's frames, not the span read)."""
        layers = []
        for c in self.layers:
            keys, values = c.keys, c.values
            if compact and c.offset < _slots(keys):
                # a slice shares its parent's buffer: a contiguous copy lets the longer arrays go
                keys, values = _copy(_cut(keys, 0, c.offset)), _copy(_cut(values, 0, c.offset))
            layers.append((keys, values, c.offset))
        first = self.layers[0] if self.layers else None
        return CacheSnapshot(tuple(layers), first.capacity if first else None, first.bits if first else None,
                             first.group_size if first else KV_GROUP_SIZE)

    def restore(self, snapshot: CacheSnapshot) -> None:
        if len(snapshot.layers) != len(self.layers):
            raise ValueError(
                f"cache snapshot has {len(snapshot.layers)} layers, this cache has {len(self.layers)}")
        capacity = snapshot.capacity
        for c, (keys, values, offset) in zip(self.layers, snapshot.layers):
            cap = capacity if capacity is not None else c.capacity
            b, h, _, d = c.shape
            # what this cache would store for no position, in the snapshot's format: every axis but
            # the slots' must match (the layout, packing and groups follow from bits and group size)
            expected = _arrays(kv_encode(mx.zeros((b, h, 0, d), dtype=c.dtype), snapshot.kv_bits,
                                         snapshot.kv_group_size))
            held = _arrays(keys) + _arrays(values)
            ok = len(held) == 2 * len(expected) and all(
                a.shape[:2] + a.shape[3:] == e.shape[:2] + e.shape[3:] and a.shape[2] == held[0].shape[2]
                for a, e in zip(held, expected + expected))
            if not ok or _slots(keys) > cap:
                shape = tuple(held[0].shape)
                want = tuple(expected[0].shape[:2]) + (f"<= {cap}",) + tuple(expected[0].shape[3:])
                raise ValueError(f"cache snapshot holds keys of shape {shape}, expected "
                                 f"({', '.join(map(str, want))}){'' if not snapshot.kv_bits else ' quantized'}")
            c.capacity, c.shape = cap, (b, h, cap, d)
            c.bits, c.group_size = snapshot.kv_bits, snapshot.kv_group_size
            c.keys, c.values, c.offset = keys, values, offset

    def arrays(self) -> list[mx.array]:
        """Every array of the cache, e.g. for `mx.eval` after a long prompt."""
        return [a for c in self.layers for a in _arrays(c.keys) + _arrays(c.values)]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; per-step projections when weights_per_step > 0."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        if cfg.weights_per_step:
            self.in_projs = [nn.Linear(d, 3 * d, bias=False) for _ in range(cfg.weights_per_step)]
            self.out_projs = [nn.Linear(d, d, bias=False) for _ in range(cfg.weights_per_step)]
        else:
            self.in_proj = nn.Linear(d, 3 * d, bias=False)
            self.out_proj = nn.Linear(d, d, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def _project(self, x: mx.array, offset: int, out: bool) -> mx.array:
        n = self.cfg.weights_per_step
        if not n:
            return (self.out_proj if out else self.in_proj)(x)
        projs = self.out_projs if out else self.in_projs
        if offset + x.shape[1] > n:
            raise ValueError(f"per-step weights cover {n} positions, asked for position {offset + x.shape[1] - 1}")
        if x.shape[1] == 1:
            return projs[offset](x)
        return mx.concatenate([projs[offset + i](x[:, i:i + 1]) for i in range(x.shape[1])], axis=1)

    def __call__(self, x: mx.array, cache: KVCache | None, fused: bool = True) -> mx.array:
        cfg = self.cfg
        if cache is not None and not cfg.weights_per_step:
            return self.attend_slots(x, [cache], fused)
        b, t, _ = x.shape
        offset = cache.offset if cache is not None else 0
        qkv = self._project(x, offset, out=False).reshape(b, t, 3, cfg.num_heads, cfg.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cfg.positional_embedding == "rope":
            q = mx.fast.rope(q, cfg.head_dim, traditional=cfg.rope_interleave, base=cfg.max_period,
                             scale=1.0, offset=offset)
            k = mx.fast.rope(k, cfg.head_dim, traditional=cfg.rope_interleave, base=cfg.max_period,
                             scale=1.0, offset=offset)
        if cache is not None:
            y = cache.update_and_attend(q, k, v, cfg.context, self.scale)
        else:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=_full_mask(t, cfg.context))
        y = y.transpose(0, 2, 1, 3).reshape(b, t, cfg.d_model)
        return self._project(y, offset, out=True)


    def attend_slots(self, x: mx.array, caches: list[KVCache], fused: bool = True) -> mx.array:
        """The next T positions of several streams at once: x [rows, T, d], the rows of stream i are the
        next `caches[i].shape[0]` ones. The projections run on all rows together (one read of the
        weights); RoPE positions, ring writes and the attention window are each stream's own. `fused`:
        see `KVCache.update_and_attend`."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.in_proj(x).reshape(b, t, 3, cfg.num_heads, cfg.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        ys, row = [], 0
        for cache in caches:
            n = cache.shape[0]
            qi, ki, vi = (q, k, v) if n == b else (q[row:row + n], k[row:row + n], v[row:row + n])
            if cfg.positional_embedding == "rope":
                qi = mx.fast.rope(qi, cfg.head_dim, traditional=cfg.rope_interleave, base=cfg.max_period,
                                  scale=1.0, offset=cache.offset)
                ki = mx.fast.rope(ki, cfg.head_dim, traditional=cfg.rope_interleave, base=cfg.max_period,
                                  scale=1.0, offset=cache.offset)
            ys.append(cache.update_and_attend(qi, ki, vi, cfg.context, self.scale, fused))
            row += n
        if row != b:
            raise ValueError(f"the caches hold {row} streams, the input {b}")
        y = ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=0)
        y = y.transpose(0, 2, 1, 3).reshape(b, t, cfg.d_model)
        return self.out_proj(y)

    def step_one(self, x: mx.array, keys: list[mx.array], values: list[mx.array], slots: mx.array,
                 offsets: mx.array, masks: list[mx.array], fused: bool = True,
                 ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
        """One position of several streams against their own rings (pure: returns the updated keys and
        values). x [rows, 1, d]; stream i owns the next `keys[i].shape[0]` rows, writes its position at
        ring slot `slots[i]` and may see the first `masks[i].shape[0]` slots where `masks[i]` is true;
        `offsets` [rows] are the rows' absolute positions (RoPE). The ring fills from slot 0, so until it
        is full only a prefix (rounded up to a power of two, few compiled shapes) needs reading. The
        projections and the FFN see every row at once: a batch reads the weights once. A head-major
        quantized ring is attended packed (`kv_fused_attention`) unless `fused` is False."""
        cfg = self.cfg
        b = x.shape[0]
        qkv = self.in_proj(x).reshape(b, 1, 3, cfg.num_heads, cfg.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cfg.positional_embedding == "rope":
            q = mx.fast.rope(q, cfg.head_dim, traditional=cfg.rope_interleave, base=cfg.max_period,
                             scale=1.0, offset=offsets)
            k = mx.fast.rope(k, cfg.head_dim, traditional=cfg.rope_interleave, base=cfg.max_period,
                             scale=1.0, offset=offsets)
        ys, new_keys, new_values, row = [], [], [], 0
        for i, (ck, cv, mask) in enumerate(zip(keys, values, masks)):
            n = _arrays(ck)[0].shape[0]
            qi, ki, vi = (q, k, v) if n == b else (q[row:row + n], k[row:row + n], v[row:row + n])
            if isinstance(ck, tuple):  # a quantized ring (kv_encode's layout): bits and groups from its shapes
                bits, group = kv_format(ck, cfg.num_heads, cfg.head_dim)
                ki, vi = kv_encode(ki, bits, group), kv_encode(vi, bits, group)
            ck = _put(ck, ki, slots[i:i + 1])
            cv = _put(cv, vi, slots[i:i + 1])
            span = mask.shape[0]
            seen_k = ck if span == _slots(ck) else _cut(ck, 0, span)
            seen_v = cv if span == _slots(cv) else _cut(cv, 0, span)
            if fused and kv_fusable(seen_k, cfg.num_heads):
                ys.append(kv_fused_attention(qi, seen_k, seen_v, self.scale, mask))
            else:
                seen_k = kv_decode(seen_k, cfg.num_heads, cfg.head_dim)
                seen_v = kv_decode(seen_v, cfg.num_heads, cfg.head_dim)
                ys.append(mx.fast.scaled_dot_product_attention(qi, seen_k, seen_v, scale=self.scale, mask=mask))
            new_keys.append(ck)
            new_values.append(cv)
            row += n
        y = ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=0)
        return self.out_proj(y.transpose(0, 2, 1, 3).reshape(b, 1, cfg.d_model)), new_keys, new_values


def _full_mask(t: int, context: int | None) -> mx.array | str:
    if context is None or t <= context:
        return "causal"
    pos = np.arange(t)
    delta = pos[:, None] - pos[None, :]
    return mx.array((delta >= 0) & (delta < context))


_ALL_VISIBLE: dict[int, mx.array] = {}  # per capacity: the mask of a full ring


class TransformerLayer(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x))). Kyutai's parameter names."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.self_attn = Attention(cfg)
        if cfg.gating == "silu":
            if cfg.weights_per_step:
                self.gating = [GatedFFN(cfg.d_model, cfg.ffn_hidden) for _ in range(cfg.weights_per_step)]
            else:
                self.gating = GatedFFN(cfg.d_model, cfg.ffn_hidden)
        else:
            self.linear1 = nn.Linear(cfg.d_model, cfg.dim_feedforward, bias=False)
            self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.d_model, bias=False)
        if cfg.layer_scale:
            self.layer_scale_1 = LayerScale(cfg.d_model)
            self.layer_scale_2 = LayerScale(cfg.d_model)

    def _ffn(self, x: mx.array, offset: int) -> mx.array:
        cfg = self.cfg
        if cfg.gating == "none":
            return self.linear2(nn.gelu(self.linear1(x)))
        if not cfg.weights_per_step:
            return self.gating(x)
        if x.shape[1] == 1:
            return self.gating[offset](x)
        return mx.concatenate([self.gating[offset + i](x[:, i:i + 1]) for i in range(x.shape[1])], axis=1)

    def __call__(self, x: mx.array, cache: KVCache | None = None, fused: bool = True) -> mx.array:
        offset = cache.offset if cache is not None else 0
        update = self.self_attn(self.norm1(x), cache, fused)
        if self.cfg.layer_scale:
            update = self.layer_scale_1(update)
        x = x + update
        update = self._ffn(self.norm2(x), offset)
        if self.cfg.layer_scale:
            update = self.layer_scale_2(update)
        return x + update


    def step_one(self, x, keys, values, slots, offsets, masks, fused: bool = True):
        update, keys, values = self.self_attn.step_one(self.norm1(x), keys, values, slots, offsets, masks, fused)
        return self._residual_ffn(x, update), keys, values

    def step_slots(self, x: mx.array, caches: list[KVCache], fused: bool = True) -> mx.array:
        """The next T positions of several streams (`Attention.attend_slots`); no per-step weights."""
        return self._residual_ffn(x, self.self_attn.attend_slots(self.norm1(x), caches, fused))

    def _residual_ffn(self, x: mx.array, update: mx.array) -> mx.array:
        if self.cfg.layer_scale:
            update = self.layer_scale_1(update)
        x = x + update
        update = self._ffn(self.norm2(x), 0)
        if self.cfg.layer_scale:
            update = self.layer_scale_2(update)
        return x + update


class Transformer(nn.Module):
    """A stack of `TransformerLayer`s: `__call__` for a whole sequence, `step` for streaming.

    A one-position `step` (the LM's frame) runs as one compiled MLX function over the ring with a
    validity mask, which removes most of the Python/graph overhead of ~20 ops per layer; while the ring
    fills it reads only a power-of-two prefix (on the 7B a full ring is 1.5 GB of bf16 per frame). The compiled
    function captures the layers as they are at the first step: it is rebuilt when the layers' modules
    or weights are replaced (load_weights, nn.quantize), checked by identity on the first and last layer,
    and when `fused_kv` changes.

    `fused_kv` (default True): one-position steps over a head-major quantized ring attend to it packed
    (`kv_fused_attention`); False dequantizes it first, as before (kept as the reference for tests and
    benches). It changes nothing for float rings or heads narrower than a quantization group.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]
        self._compiled_step = None
        self._compiled_for: tuple = ()
        self.fused_kv = True

    def __call__(self, x: mx.array) -> mx.array:
        """Whole sequence [B, T, d] from position 0, no state kept."""
        for layer in self.layers:
            x = layer(x)
        return x

    def step(self, x: mx.array, cache: TransformerCache) -> mx.array:
        """The next T >= 1 positions [B, T, d] of a stream whose state is `cache` (updated)."""
        self._check_caches([cache])
        if self._compiled_path(x, [cache]):
            return self._step_one(x, [cache])
        for layer, c in zip(self.layers, cache.layers):
            x = layer(x, c, self.fused_kv)
        return x

    def step_slots(self, x: mx.array, caches: list[TransformerCache]) -> mx.array:
        """The next T >= 1 positions of several streams in one forward (a batch of calls): x [rows, T, d],
        stream i owns the next `batch_size` rows of its cache (1 for a call), and each stream keeps its
        own position, ring, window and RoPE offset. Every stream's rows equal what `step` gives for that
        stream alone: the same operations on the same values, with the weight-bound ones (projections,
        norms, FFN) run over all rows at once."""
        if not caches:
            raise ValueError("step_slots needs at least one stream")
        if self.cfg.weights_per_step:
            raise ValueError("step_slots: per-step weights (the depformer) have no streaming batch")
        self._check_caches(caches)
        rows = sum(c.layers[0].shape[0] if c.layers else 0 for c in caches)
        if rows != x.shape[0]:
            raise ValueError(f"the caches hold {rows} streams, the input {x.shape[0]}")
        if self._compiled_path(x, caches):
            return self._step_one(x, caches)
        for i, layer in enumerate(self.layers):
            x = layer.step_slots(x, [c.layers[i] for c in caches], self.fused_kv)
        return x

    def _check_caches(self, caches: list[TransformerCache]) -> None:
        for cache in caches:
            if len(cache.layers) != len(self.layers):
                raise ValueError(f"cache has {len(cache.layers)} layers, the transformer {len(self.layers)}")

    def _compiled_path(self, x: mx.array, caches: list[TransformerCache]) -> bool:
        if x.shape[1] != 1 or self.cfg.weights_per_step or not self.layers:
            return False
        caps = {c.layers[0].capacity for c in caches}
        return len(caps) == 1 and (self.cfg.context is None or self.cfg.context >= caps.pop())

    def _layers_identity(self) -> tuple:
        ends = (self.layers[0], self.layers[-1])
        return tuple(id(o) for layer in ends for o in (layer.self_attn.in_proj, layer.self_attn.in_proj.weight,
                                                        layer.norm2.weight)) + (bool(self.fused_kv),)

    def _step_one(self, x: mx.array, caches: list[TransformerCache]) -> mx.array:
        """One position of each stream as one compiled function. Every stream reads the same span of its
        ring (the largest any of them needs, masked per stream), so the compiled shapes depend on the
        number of streams and that span only: at most streams x ~log2(capacity) graphs."""
        identity = self._layers_identity()
        if self._compiled_step is None or self._compiled_for != identity:
            layers, fused = list(self.layers), bool(self.fused_kv)

            def step_all(x, keys, values, slots, offsets, masks):
                new_keys, new_values = [], []
                for layer, k, v in zip(layers, keys, values):
                    x, k, v = layer.step_one(x, k, v, slots, offsets, masks, fused)
                    new_keys.append(k)
                    new_values.append(v)
                return x, new_keys, new_values

            # mx.compile traces once per input structure and shapes (streams, span read)
            self._compiled_step, self._compiled_for = mx.compile(step_all), identity
        cap = caches[0].layers[0].capacity
        offsets = [c.layers[0].offset for c in caches]
        # Still filling: read only a power-of-two prefix holding positions 0..offset.
        span = ring_span(max(offsets), cap)
        for c in caches:
            # every ring passed in holds exactly `span` slots (grown, or cut where nothing is written),
            # so the compiled shapes depend on (streams, span) only
            for layer in c.layers:
                layer.fit(span)
        masks = []
        for offset in offsets:
            if offset + 1 >= cap:
                mask = _ALL_VISIBLE.get(cap)
                if mask is None:
                    mask = _ALL_VISIBLE[cap] = mx.ones((cap,), dtype=mx.bool_)
            else:
                mask = mx.array(np.arange(span) <= offset)
            masks.append(mask)
        rows = [c.layers[0].shape[0] for c in caches]
        row_offsets = np.repeat(np.array(offsets, dtype=np.int32), rows)
        x, keys, values = self._compiled_step(
            x, [[c.layers[i].keys for c in caches] for i in range(len(self.layers))],
            [[c.layers[i].values for c in caches] for i in range(len(self.layers))],
            mx.array([o % cap for o in offsets], dtype=mx.int32), mx.array(row_offsets), masks)
        for i, (lk, lv) in enumerate(zip(keys, values)):
            for c, k, v in zip(caches, lk, lv):
                layer = c.layers[i]
                layer.keys, layer.values, layer.offset = k, v, layer.offset + 1
        return x

    def make_cache(self, batch_size: int = 1, dtype: mx.Dtype | None = None, context: int | None = None,
                   kv_bits: int | None = None) -> TransformerCache:
        """A fresh streaming state; `dtype` defaults to the dtype of the model's norms. `context`: a ring
        shorter than the model's (a bot's `context`: attention sees that many positions; less memory and
        fewer bytes read per step); None = the model's. `kv_bits`: 8 or 4 for a quantized ring (KVCache)."""
        cfg = self.cfg
        if dtype is None:
            dtype = self.layers[0].norm1.weight.dtype if self.layers else mx.float32
        capacity = cfg.cache_capacity
        if context is not None:
            if not isinstance(context, int) or isinstance(context, bool) or not 1 <= context <= capacity:
                raise ValueError(f"context must be a whole number of frames from 1 to the model's {capacity}, "
                                 f"got {context!r}")
            capacity = context
        return TransformerCache([
            KVCache(batch_size, cfg.num_heads, cfg.head_dim, capacity, dtype, cfg.kyutai_ring, kv_bits)
            for _ in self.layers
        ])
