"""Mimi, the neural audio codec between 24 kHz PCM and the model's 8 codebooks at 12.5 Hz (80 ms).

encode: SEANet encoder (960 samples -> one 25 Hz latent) -> transformer -> stride-2 conv to 12.5 Hz ->
split RVQ (8 codes). decode mirrors it: RVQ -> depthwise transposed conv to 25 Hz -> transformer ->
SEANet decoder. Every layer is causal and streams with explicit state, so `encode_step` / `decode_step`
on 1920-sample frames give exactly what `encode` / `decode` give on the whole signal.

Weights come from NVIDIA's `tokenizer-e351c8d8-checkpoint125.safetensors` (PyTorch key names and
layouts, the same as Kyutai's Mimi except `in_proj_weight` / `out_proj.weight` in the transformers);
`nvidia_to_mlx` is the one place that maps them, `load_mimi` the one place that checks them.

The transformers see 2 positions per frame (25 Hz) over a 250-position window. Our cache attends to
exactly that window, so streaming equals the whole-sequence model forever; Kyutai's PyTorch ring cache
(capacity = context) loses the oldest key of the first query of each 2-position step once the window is
full (after 125 frames = 10 s), so its streamed audio drifts slightly from its own whole-sequence output.

Streaming is functional: `encode_step(pcm, state) -> (codes, state)` and `decode_step(codes, state) ->
(pcm, state)` take an immutable `MimiState` (a fresh stream is `MimiState()`) and return the next one; the
module holds weights only. So one loaded codec serves any number of streams (each call's caller audio in,
agent audio out, a played clip in) from any number of threads without a lock or a state swap, which is
also what a batched step needs. The encoder and decoder halves of a `MimiState` are independent streams.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .conv import ConvState, ConvTransposeState, StreamingConv1d, StreamingConvTranspose1d
from .quantizer import SplitResidualVectorQuantizer
from .seanet import ResidualBlock, SeanetConfig, SeanetDecoder, SeanetEncoder, SeanetState
from .transformer import CacheSnapshot, Transformer, TransformerCache, TransformerConfig


class MimiWeightsError(ValueError):
    """A Mimi weights file is missing, unreadable, or does not hold what the config expects."""


@dataclass(frozen=True)
class MimiTransformerConfig:
    """The two small transformers around the quantizer (LayerNorm, GELU MLP, RoPE, layer scale)."""

    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    layer_scale: float | None = 0.01  # Kyutai's initial value; the checkpoint holds the trained scales
    max_period: float = 10000.0


@dataclass(frozen=True)
class MimiConfig:
    """Any Mimi: `mimi_202407()` is the released size, tests build small ones with the same code."""

    sample_rate: int = 24000
    frame_rate: float = 12.5
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)
    quantizer_dim: int = 256
    quantizer_bins: int = 2048
    num_codebooks: int = 8

    def __post_init__(self):
        if not 2 <= self.num_codebooks:
            raise ValueError(f"num_codebooks must be >= 2 (one semantic + acoustic), got {self.num_codebooks}")
        if self.sample_rate % self.seanet.hop_length:
            raise ValueError(f"sample_rate {self.sample_rate} is not a multiple of the SEANet hop "
                             f"{self.seanet.hop_length}")
        if self.frame_size * self.frame_rate != self.sample_rate or self.frame_size % self.seanet.hop_length:
            raise ValueError(f"frame_rate {self.frame_rate} Hz must split {self.sample_rate} Hz into whole "
                             f"frames of whole SEANet hops ({self.seanet.hop_length} samples)")
        if self.seanet.dimension % self.transformer.num_heads:
            raise ValueError(f"dimension {self.seanet.dimension} is not divisible by "
                             f"{self.transformer.num_heads} heads")

    @property
    def frame_size(self) -> int:
        """PCM samples per codec frame (1920 = 80 ms at 24 kHz)."""
        return round(self.sample_rate / self.frame_rate)

    @property
    def downsample_stride(self) -> int:
        """Latent steps (at the SEANet rate, 25 Hz) per codec frame."""
        return self.frame_size // self.seanet.hop_length


def mimi_202407(num_codebooks: int = 8) -> MimiConfig:
    """The released Mimi (Kyutai 2024-07, used unchanged by PersonaPlex): 96 M parameters."""
    return MimiConfig(num_codebooks=num_codebooks)


def _transformer_config(cfg: MimiConfig) -> TransformerConfig:
    t = cfg.transformer
    return TransformerConfig(
        d_model=cfg.seanet.dimension,
        num_heads=t.num_heads,
        num_layers=t.num_layers,
        dim_feedforward=t.dim_feedforward,
        context=t.context,
        norm="layer_norm",
        gating="none",
        layer_scale=t.layer_scale is not None,
        positional_embedding="rope",
        rope_interleave=True,
        max_period=t.max_period,
    )


@dataclass(frozen=True)
class _HalfState:
    """One direction's stream: conv states plus the transformer cache snapshot (None: fresh)."""

    seanet: SeanetState = field(default_factory=SeanetState)
    resample: ConvState | ConvTransposeState | None = None
    transformer: CacheSnapshot | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class MimiState:
    """Everything Mimi remembers between 80 ms frames of one conversation side: the encoder stream (audio
    in) and the decoder stream (audio out). Immutable, so keeping a reference is a snapshot; `MimiState()`
    starts both afresh. `encode_step` advances only `encoder`, `decode_step` only `decoder`."""

    encoder: _HalfState = field(default_factory=_HalfState)
    decoder: _HalfState = field(default_factory=_HalfState)


def _check_state(state, what: str) -> None:
    if not isinstance(state, MimiState):
        raise ValueError(f"{what} takes the stream's MimiState (MimiState() for a fresh stream), "
                         f"got {type(state).__name__}")


class Mimi(nn.Module):
    """The codec. `encode`/`decode` take whole signals; `encode_step`/`decode_step` stream one 80 ms frame
    at a time from a `MimiState` the caller owns. Neither keeps state on the module. PCM is float in
    [-1, 1], shaped `[T]` or `[B, T]`; codes are int32 `[num_codebooks, frames]` or
    `[B, num_codebooks, frames]`. Results are lazy `mx.array`s.

        mimi = load_mimi("tokenizer-e351c8d8-checkpoint125.safetensors")
        state = MimiState()
        codes, state = mimi.encode_step(frame, state)          # 1920 float32 samples -> [8] int32
        pcm, state = mimi.decode_step(codes, state)            # [8] -> 1920 samples
        # keeping `state` is a snapshot: stepping on from it again repeats the same output
    """

    def __init__(self, cfg: MimiConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else mimi_202407()
        self.cfg = cfg
        dim = cfg.seanet.dimension
        stride = cfg.downsample_stride
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.encoder_transformer = Transformer(_transformer_config(cfg))
        self.decoder_transformer = Transformer(_transformer_config(cfg))
        self.downsample = StreamingConv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate")
        # Depthwise (groups = dim): Kyutai's "upsample_channel_wise_bug", which the checkpoint keeps.
        self.upsample = StreamingConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)
        self.quantizer = SplitResidualVectorQuantizer(
            cfg.quantizer_dim, dim, dim, cfg.num_codebooks, cfg.quantizer_bins)

    @property
    def frame_size(self) -> int:
        return self.cfg.frame_size

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype of the convolutions and transformers (float32 on CPU, bf16 on a GPU)."""
        return self.decoder.layers[-1].weight.dtype

    # -- input checks ------------------------------------------------------------------------------

    def _pcm(self, pcm, what: str) -> tuple[mx.array, bool]:
        if isinstance(pcm, mx.array):
            x, floating = pcm, mx.issubdtype(pcm.dtype, mx.floating)
        else:
            array = np.asarray(pcm)
            floating = np.issubdtype(array.dtype, np.floating)
            x = mx.array(array.astype(np.float32, copy=False)) if floating else array
        if not floating:
            raise ValueError(f"{what}: PCM must be float samples in [-1, 1], got dtype {x.dtype}")
        if x.ndim not in (1, 2):
            raise ValueError(f"{what}: PCM must be shaped [samples] or [batch, samples], got {tuple(x.shape)}")
        single = x.ndim == 1
        x = x.astype(self.dtype)
        return (x[None] if single else x), single

    def _codes(self, codes, what: str, frames: int | None) -> tuple[mx.array, bool]:
        c = codes if isinstance(codes, mx.array) else mx.array(np.asarray(codes))
        k = self.cfg.num_codebooks
        want = 1 if frames == 1 else 2
        single = c.ndim == want
        if c.ndim not in (want, want + 1) or c.shape[-want] != k:
            shape = f"[{k}] or [batch, {k}]" if frames == 1 else f"[{k}, frames] or [batch, {k}, frames]"
            raise ValueError(f"{what}: codes must be shaped {shape}, got {tuple(c.shape)}")
        if mx.issubdtype(c.dtype, mx.floating):
            raise ValueError(f"{what}: codes must be integers, got dtype {c.dtype}")
        if c.size and (mx.min(c).item() < 0 or mx.max(c).item() >= self.cfg.quantizer_bins):
            raise ValueError(f"{what}: codes must lie in [0, {self.cfg.quantizer_bins}), got "
                             f"[{mx.min(c).item()}, {mx.max(c).item()}]")
        c = c.astype(mx.int32)
        if frames == 1:
            c = c[..., None]
        return (c[None] if single else c), single

    # -- whole sequences ---------------------------------------------------------------------------

    def encode(self, pcm) -> mx.array:
        """Codes of a whole signal; a partial last frame is padded with zeros (as Kyutai's encode)."""
        x, single = self._pcm(pcm, "encode")
        if x.shape[1] == 0:
            raise ValueError("encode: the signal is empty (0 samples)")
        extra = -x.shape[1] % self.frame_size
        if extra:
            x = mx.pad(x, [(0, 0), (0, extra)])
        codes, _ = self._encode(x, _HalfState(), None)
        return codes[0] if single else codes

    def decode(self, codes) -> mx.array:
        """PCM of whole code sequences: frames * 1920 samples."""
        c, single = self._codes(codes, "decode", None)
        if c.shape[2] == 0:
            raise ValueError("decode: the codes hold no frames")
        pcm, _ = self._decode(c, _HalfState(), None)
        return pcm[0] if single else pcm

    # -- streaming ---------------------------------------------------------------------------------

    def encode_step(self, pcm, state: MimiState) -> tuple[mx.array, MimiState]:
        """(codes `[num_codebooks]` (or `[B, num_codebooks]`) of the next 1920-sample frame, the state
        after it): `state`'s encoder stream advances, its decoder stream is passed on untouched."""
        _check_state(state, "encode_step")
        x, single = self._pcm(pcm, "encode_step")
        if x.shape[1] != self.frame_size:
            raise ValueError(f"encode_step takes one frame of {self.frame_size} samples, got {x.shape[1]}")
        codes, half = self._encode(x, state.encoder, self._streaming_cache(self.encoder_transformer,
                                                                          state.encoder, x.shape[0]))
        return (codes[0, :, 0] if single else codes[:, :, 0]), replace(state, encoder=half)

    def decode_step(self, codes, state: MimiState) -> tuple[mx.array, MimiState]:
        """(the next 1920 samples (or `[B, 1920]`) from one frame of codes `[num_codebooks]`, the state
        after it): `state`'s decoder stream advances, its encoder stream is passed on untouched."""
        _check_state(state, "decode_step")
        c, single = self._codes(codes, "decode_step", 1)
        pcm, half = self._decode(c, state.decoder, self._streaming_cache(self.decoder_transformer,
                                                                         state.decoder, c.shape[0]))
        return (pcm[0] if single else pcm), replace(state, decoder=half)

    def encode_slots(self, pcm, states: list[MimiState]) -> tuple[mx.array, list[MimiState]]:
        """`encode_step` for several streams in one forward (a batch of calls): `pcm` [n, 1920], one
        single-stream `MimiState` per row (fresh or not, at any position). Returns (codes [n, num_codebooks],
        the states after): each row's codes and state equal what `encode_step` gives that stream alone."""
        x, rows = self._slots_input(pcm, states, "encode_slots")
        if x.shape[1] != self.frame_size:
            raise ValueError(f"encode_slots takes frames of {self.frame_size} samples, got {x.shape[1]}")
        halves = [s.encoder for s in states]
        h, seanet = self.encoder.step_slots(x[:, :, None], [half.seanet for half in halves], rows)
        caches = [self._streaming_cache(self.encoder_transformer, half, 1) for half in halves]
        h = self.encoder_transformer.step_slots(h, caches)
        h, resample = self.downsample.step_slots(h, [half.resample or ConvState() for half in halves], rows)
        codes = self.quantizer.encode(h.astype(mx.float32))
        return codes[:, :, 0], [replace(s, encoder=_HalfState(seanet[i], resample[i], caches[i].snapshot(), 1))
                                for i, s in enumerate(states)]

    def decode_slots(self, codes, states: list[MimiState]) -> tuple[mx.array, list[MimiState]]:
        """`decode_step` for several streams in one forward: codes [n, num_codebooks], one single-stream
        `MimiState` per row. Returns (pcm [n, 1920] float32, the states after), row by row equal to
        `decode_step` on each stream alone."""
        for s in states:
            _check_state(s, "decode_slots")
        c, single = self._codes(codes, "decode_slots", 1)
        if single or c.shape[0] != len(states):
            raise ValueError(f"decode_slots: {len(states)} streams need codes [{len(states)}, "
                             f"{self.cfg.num_codebooks}], got {tuple(codes.shape)}")
        rows = [1] * len(states)
        halves = [s.decoder for s in states]
        for half in halves:
            self._check_single(half, "decode_slots")
        h = self.quantizer.decode(c).astype(self.dtype)
        h, resample = self.upsample.step_slots(h, [half.resample or ConvTransposeState() for half in halves], rows)
        caches = [self._streaming_cache(self.decoder_transformer, half, 1) for half in halves]
        h = self.decoder_transformer.step_slots(h, caches)
        pcm, seanet = self.decoder.step_slots(h, [half.seanet for half in halves], rows)
        return pcm[:, :, 0].astype(mx.float32), [
            replace(s, decoder=_HalfState(seanet[i], resample[i], caches[i].snapshot(), 1))
            for i, s in enumerate(states)]

    def _slots_input(self, pcm, states: list[MimiState], what: str) -> tuple[mx.array, list[int]]:
        for s in states:
            _check_state(s, what)
            self._check_single(s.encoder, what)
        x, single = self._pcm(pcm, what)
        if single or x.shape[0] != len(states):
            raise ValueError(f"{what}: {len(states)} streams need PCM [{len(states)}, {self.frame_size}], "
                             f"got {tuple(x.shape)}")
        return x, [1] * len(states)

    @staticmethod
    def _check_single(half: _HalfState, what: str) -> None:
        if half.batch_size not in (None, 1):
            raise ValueError(f"{what} takes single-stream states, got one of batch size {half.batch_size}")

    def _streaming_cache(self, transformer: Transformer, half: _HalfState, batch: int) -> TransformerCache:
        if half.batch_size is not None and half.batch_size != batch:
            raise ValueError(f"this stream has batch size {half.batch_size}, got a frame of batch {batch}; "
                             "start a fresh MimiState() to change it")
        # a scratch cache object around the state's (immutable) arrays: stepping it never touches `half`
        cache = transformer.make_cache(batch)
        if half.transformer is not None:
            cache.restore(half.transformer)
        return cache

    # -- the two paths -----------------------------------------------------------------------------

    def _encode(self, x: mx.array, half: _HalfState, cache: TransformerCache | None):
        h, seanet = self.encoder.step(x[:, :, None], half.seanet)
        if cache is None:
            h = self.encoder_transformer(h)
        else:
            h = self.encoder_transformer.step(h, cache)
        h, resample = self.downsample.step(h, half.resample or ConvState())
        # Nearest-centroid search in float32 whatever the model dtype: bf16 ties would change codes.
        codes = self.quantizer.encode(h.astype(mx.float32))
        snap = cache.snapshot() if cache is not None else None
        return codes, _HalfState(seanet, resample, snap, x.shape[0])

    def _decode(self, codes: mx.array, half: _HalfState, cache: TransformerCache | None):
        h = self.quantizer.decode(codes).astype(self.dtype)
        h, resample = self.upsample.step(h, half.resample or ConvTransposeState())
        if cache is None:
            h = self.decoder_transformer(h)
        else:
            h = self.decoder_transformer.step(h, cache)
        pcm, seanet = self.decoder.step(h, half.seanet)
        snap = cache.snapshot() if cache is not None else None
        return pcm[:, :, 0].astype(mx.float32), _HalfState(seanet, resample, snap, codes.shape[0])


# -- weights: NVIDIA / Kyutai PyTorch layout -> ours ---------------------------------------------------

def convert_conv_weight(w):
    """PyTorch Conv1d `[C_out, C_in / g, K]` -> MLX `[C_out, K, C_in / g]`."""
    return w.transpose(0, 2, 1)


def convert_convtr_weight(w, groups: int):
    """PyTorch ConvTranspose1d `[C_in, C_out / g, K]` -> MLX `[C_out, K, C_in / g]`."""
    c_in, c_out_g, k = w.shape
    w = w.reshape(groups, c_in // groups, c_out_g, k).transpose(0, 2, 3, 1)
    return w.reshape(groups * c_out_g, k, c_in // groups)


def _convtr_shape(ours: tuple, groups: int) -> tuple:
    c_out, k, c_in_g = ours
    return (c_in_g * groups, c_out // groups, k)


def seanet_layer_paths(stack, prefix: str) -> list[tuple[str, str, nn.Module]]:
    """(PyTorch module path, our module path, conv) for every convolution of a SEANet stack.

    Kyutai's `nn.Sequential` numbers the ELUs too: one sits before every layer but the first that is
    not a residual block; inside a residual block the convs are `block.1` and `block.3`.
    """
    out = []
    index = -1
    for i, layer in enumerate(stack.layers):
        index += 1 if (i == 0 or isinstance(layer, ResidualBlock)) else 2
        ours = f"layers.{i}"
        theirs = f"{prefix}.{index}"
        if isinstance(layer, ResidualBlock):
            out.append((f"{theirs}.block.1.conv.conv", f"{ours}.conv1", layer.conv1))
            out.append((f"{theirs}.block.3.conv.conv", f"{ours}.conv2", layer.conv2))
        elif isinstance(layer, StreamingConvTranspose1d):
            out.append((f"{theirs}.convtr.convtr", ours, layer))
        else:
            out.append((f"{theirs}.conv.conv", ours, layer))
    return out


_TRANSFORMER_ALIASES = {
    # NVIDIA's name, Kyutai's name -> ours
    "self_attn.in_proj_weight": "self_attn.in_proj.weight",
    "self_attn.in_projs.0.weight": "self_attn.in_proj.weight",
    "self_attn.out_proj.weight": "self_attn.out_proj.weight",
    "self_attn.out_projs.0.weight": "self_attn.out_proj.weight",
}
_CODEBOOK_KEY = re.compile(r"quantizer\.(rvq_first|rvq_rest)\.vq\.layers\.(\d+)\._codebook\."
                           r"(embedding_sum|cluster_usage|_initialized)$")
_CODEBOOK_EPSILON = 1e-5  # Kyutai's EuclideanCodebook clamps cluster_usage to this before dividing


def _key_table(model: Mimi) -> dict[str, tuple[str, object, tuple]]:
    """NVIDIA key -> (our key, conversion, expected NVIDIA shape), codebooks excepted."""
    table = {}
    ours = dict(nn.utils.tree_flatten(model.parameters()))

    def add(theirs, mine, convert, shape):
        table[theirs] = (mine, convert, tuple(shape))

    identity = lambda w: w  # noqa: E731
    for half in ("encoder", "decoder"):
        for theirs, mine, layer in seanet_layer_paths(getattr(model, half), f"{half}.model"):
            w = tuple(layer.weight.shape)
            if isinstance(layer, StreamingConvTranspose1d):
                add(f"{theirs}.weight", f"{half}.{mine}.weight", lambda v: convert_convtr_weight(v, 1),
                    _convtr_shape(w, 1))
            else:
                add(f"{theirs}.weight", f"{half}.{mine}.weight", convert_conv_weight, (w[0], w[2], w[1]))
            add(f"{theirs}.bias", f"{half}.{mine}.bias", identity, layer.bias.shape)
    for key, value in ours.items():
        half, _, rest = key.partition(".")
        if half in ("encoder_transformer", "decoder_transformer"):
            _, layer, name = rest.split(".", 2)  # layers.{l}.{name}
            for theirs_name in [t for t, m in _TRANSFORMER_ALIASES.items() if m == name] or [name]:
                add(f"{half}.transformer.layers.{layer}.{theirs_name}", key, identity, value.shape)
    w = tuple(model.downsample.weight.shape)
    add("downsample.conv.conv.conv.weight", "downsample.weight", convert_conv_weight, (w[0], w[2], w[1]))
    groups = model.upsample.groups
    add("upsample.convtr.convtr.convtr.weight", "upsample.weight",
        lambda v: convert_convtr_weight(v, groups), _convtr_shape(tuple(model.upsample.weight.shape), groups))
    for rvq in ("rvq_first", "rvq_rest"):
        for proj in ("input_proj", "output_proj"):
            key = f"quantizer.{rvq}.{proj}.weight"
            add(key, key, lambda v: v[:, :, 0], ours[key].shape + (1,))
    return table


def nvidia_to_mlx(weights: dict, cfg: MimiConfig) -> dict[str, mx.array]:
    """The one key conversion: a Mimi checkpoint in NVIDIA's (or Kyutai's) PyTorch layout -> our
    parameter names and layouts. Raises MimiWeightsError naming the first missing, unexpected or
    mis-shaped key; codebooks beyond `cfg.num_codebooks` are dropped."""
    model = _skeleton(cfg)
    table = _key_table(model)
    converted: dict[str, mx.array] = {}
    sums: dict[tuple[str, int], object] = {}
    usages: dict[tuple[str, int], object] = {}
    aliases_seen: dict[str, str] = {}
    for key, value in sorted(weights.items()):  # sorted: the same error for the same file
        match = _CODEBOOK_KEY.match(key)
        if match:
            rvq, index, part = match.group(1), int(match.group(2)), match.group(3)
            if part == "embedding_sum":
                sums[(rvq, index)] = value
            elif part == "cluster_usage":
                usages[(rvq, index)] = value
            continue
        if key not in table:
            raise MimiWeightsError(f"unexpected key {key!r}: not part of a Mimi with this config")
        mine, convert, shape = table[key]
        if mine in aliases_seen:
            raise MimiWeightsError(f"keys {aliases_seen[mine]!r} and {key!r} both hold {mine!r}")
        aliases_seen[mine] = key
        if tuple(value.shape) != shape:
            raise MimiWeightsError(f"key {key!r} has shape {tuple(value.shape)}, expected {shape}")
        converted[mine] = mx.array(convert(value))
    for theirs, (mine, _, _) in table.items():
        if mine not in converted:
            raise MimiWeightsError(f"missing key {theirs!r}")
    bins, dim = cfg.quantizer_bins, cfg.quantizer_dim
    for rvq, count in (("rvq_first", 1), ("rvq_rest", cfg.num_codebooks - 1)):
        for index in range(count):
            prefix = f"quantizer.{rvq}.vq.layers.{index}._codebook"
            for part, table_, shape in (("embedding_sum", sums, (bins, dim)), ("cluster_usage", usages, (bins,))):
                if (rvq, index) not in table_:
                    raise MimiWeightsError(f"missing key {prefix + '.' + part!r}")
                if tuple(table_[(rvq, index)].shape) != shape:
                    raise MimiWeightsError(f"key {prefix + '.' + part!r} has shape "
                                           f"{tuple(table_[(rvq, index)].shape)}, expected {shape}")
            embedding_sum = mx.array(sums[(rvq, index)]).astype(mx.float32)
            usage = mx.maximum(mx.array(usages[(rvq, index)]).astype(mx.float32), _CODEBOOK_EPSILON)
            converted[f"quantizer.{rvq}.codebooks.{index}.embedding"] = embedding_sum / usage[:, None]
    return converted


def _skeleton(cfg: MimiConfig) -> Mimi:
    # For parameter names and shapes only: MLX initialisers are lazy, so nothing here is computed.
    return Mimi(cfg)


def load_mimi(path: str | os.PathLike, config: MimiConfig | None = None, dtype: mx.Dtype = mx.float32) -> Mimi:
    """A Mimi with the weights of a safetensors checkpoint in NVIDIA's layout (Kyutai's works too).

    float32 on CPU; bf16 is for GPUs. Raises MimiWeightsError (a ValueError) naming the file and what
    was expected when the file is missing, unreadable, truncated or does not match `config`.
    """
    cfg = config if config is not None else mimi_202407()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MimiWeightsError(f"Mimi weights file not found: {path}")
    try:
        weights = mx.load(path)
    except (RuntimeError, ValueError, OSError) as error:
        raise MimiWeightsError(f"cannot read Mimi weights {path} (truncated or not safetensors?): {error}") from None
    if not isinstance(weights, dict):
        raise MimiWeightsError(f"Mimi weights {path} is not a safetensors file of named tensors")
    try:
        converted = nvidia_to_mlx(weights, cfg)
    except MimiWeightsError as error:
        raise MimiWeightsError(f"Mimi weights {path}: {error}") from None
    model = Mimi(cfg)
    model.load_weights([(k, v if ".codebooks." in k else v.astype(dtype)) for k, v in converted.items()],
                       strict=True)
    mx.eval(model.parameters())
    return model
