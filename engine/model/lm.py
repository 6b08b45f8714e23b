"""The Moshi-architecture language model (PersonaPlex-7B and its relatives) and its streaming step.

Each 80 ms frame the temporal transformer reads one token per stream (text, the agent's codebooks, the
user's codebooks: 17 for PersonaPlex) and the depformer then predicts the frame's text token and audio
codebooks one after the other, each conditioned on the previous one. The delayed-stream bookkeeping
follows NVIDIA's `LMGen` (personaplex), which the voice prompts were recorded with: a ring of
`max_delay + 3` frames of tokens plus "provided" flags, where forced tokens (the user's audio, the
prompts) win over sampled ones. Differences from NVIDIA's that do not change results:
- slices whose token is forced are not run: in a live call the 8 user slices of the depformer are
  skipped (causal, so they cannot affect the agent's tokens), and a prompt step with every token forced
  runs only the temporal transformer;
- the KV cache is an exact sliding window over `context` frames, so a call has no length limit
  (NVIDIA's ring masks one frame too many once full).
The state of a conversation is an `LmState` the caller owns; `snapshot()`/`restore()` copy it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mlx.core as mx
import mlx.nn as nn

from .lm_config import LmConfig
from .sampling import SamplingConfig, TokenSampler, sample
from .transformer import CacheSnapshot, RMSNorm, Transformer, TransformerCache


class DepformerSlice(nn.Module):
    """What is specific to codebook k: the projection of the temporal output, the embedding of the
    previous slice's token (the text token for slice 0) and the output head."""

    def __init__(self, cfg: LmConfig, in_vocab: int):
        super().__init__()
        self.linear_in = nn.Linear(cfg.dim, cfg.depformer_dim, bias=False)
        self.emb = nn.Embedding(in_vocab, cfg.depformer_dim)
        self.linear_out = nn.Linear(cfg.depformer_dim, cfg.card, bias=False)


class Depformer(nn.Module):
    """The depth transformer: per frame, one position per codebook, each with its own weights.

    A frame is one compiled MLX function (`frame`), per number of slices and sampling settings: the
    slices run back to back with no host round trip (a forced token replaces the sampled one through a
    mask input), which cuts the Python/graph overhead of ~25 ops per slice and layer by about 2.5x
    (measured on the tiny model). The compiled functions capture the modules and weights they first
    saw; they are rebuilt when those are replaced (checked by identity on the first and last slice).
    """

    def __init__(self, cfg: LmConfig):
        super().__init__()
        self.slices = [DepformerSlice(cfg, cfg.text_card + 1 if k == 0 else cfg.card + 1)
                       for k in range(cfg.dep_q)]
        self.transformer = Transformer(cfg.depformer)
        self._compiled: dict = {}

    def _frame_fn(self, n_slices: int, sampling: tuple[tuple[float, int], ...]):
        """Uncompiled frame of m streams: (temporal_out [m,1,D], first tokens [m], forced [m, dep_q],
        forced masks [m, dep_q], keys [m, n_slices, 2]) -> (tokens [m, n], logits [m, n, card]); row j
        samples with `sampling[j]` (temperature, top_k) and its own keys. Attention within the frame needs
        no cache object: position k attends to positions 0..k, whose keys/values were just computed."""
        tcfg = self.transformer.cfg
        heads, head_dim = tcfg.num_heads, tcfg.head_dim
        layers = self.transformer.layers
        rows = len(sampling)
        same = len(set(sampling)) == 1

        def frame(temporal_out, first, forced, forced_mask, keys):
            cache_k = [[] for _ in layers]
            cache_v = [[] for _ in layers]
            prev, tokens, all_logits = first, [], []
            for k in range(n_slices):
                s = self.slices[k]
                x = s.linear_in(temporal_out) + s.emb(prev.reshape(rows, 1))
                for i, layer in enumerate(layers):
                    attn = layer.self_attn
                    qkv = attn.in_projs[k](layer.norm1(x)).reshape(rows, 1, 3, heads, head_dim)
                    qkv = qkv.transpose(2, 0, 3, 1, 4)
                    cache_k[i].append(qkv[1])
                    cache_v[i].append(qkv[2])
                    y = mx.fast.scaled_dot_product_attention(
                        qkv[0], mx.concatenate(cache_k[i], axis=2), mx.concatenate(cache_v[i], axis=2),
                        scale=attn.scale)
                    x = x + attn.out_projs[k](y.transpose(0, 2, 1, 3).reshape(rows, 1, tcfg.d_model))
                    x = x + layer.gating[k](layer.norm2(x))
                logits = s.linear_out(x)[:, 0]
                if same and sampling[0][0] <= 0:  # greedy rows: one argmax (no key drawn)
                    token = sample(logits, 0.0, 0, None)
                else:
                    # each row its own key, drawn exactly as a single stream draws it (MLX's categorical
                    # over [1, V] and over [m, V] draw different noise for the same key)
                    token = mx.concatenate([sample(logits[j:j + 1], t, top_k, keys[j, k])
                                            for j, (t, top_k) in enumerate(sampling)])
                tokens.append(token)
                all_logits.append(logits)
                prev = mx.where(forced_mask[:, k], forced[:, k], token)
            return mx.stack(tokens, axis=1), mx.stack(all_logits, axis=1)

        return frame

    def frame(self, temporal_out: mx.array, first_token: mx.array, forced: mx.array, forced_mask: mx.array,
              n_slices: int, temperature: float, top_k: int, key: mx.array) -> tuple[mx.array, mx.array]:
        """Sample codebooks 0..n_slices-1 of one frame (lazy arrays: tokens [n] int32, logits [n, card])."""
        keys = mx.random.split(key, n_slices)[None]
        tokens, logits = self.frame_rows(temporal_out, first_token, forced[None], forced_mask[None], n_slices,
                                         ((float(temperature), int(top_k)),), keys)
        return tokens[0], logits[0]

    def frame_rows(self, temporal_out: mx.array, first_tokens: mx.array, forced: mx.array, forced_mask: mx.array,
                   n_slices: int, sampling: tuple[tuple[float, int], ...], keys: mx.array,
                   ) -> tuple[mx.array, mx.array]:
        """`frame` for m streams at once (a batch of calls): temporal_out [m,1,D], first_tokens [m],
        forced and forced_mask [m, dep_q], `sampling` one (temperature, top_k) per row, keys [m, n_slices, 2]
        (row j's key for slice k; a single stream's are `mx.random.split(its key, n_slices)`). Lazy:
        (tokens [m, n_slices] int32, logits [m, n_slices, card]). A row's results depend on its own inputs
        only, so a stream that needs fewer slices reads its first ones and ignores the rest."""
        sig = (n_slices, tuple(sampling))
        first, last = self.slices[0], self.transformer.layers[-1].self_attn
        identity = tuple(id(o) for o in (first.linear_in, first.linear_in.weight, last.in_projs[-1],
                                         last.in_projs[-1].weight))
        if self._compiled.get("identity") != identity:  # weights or modules replaced: rebuild
            self._compiled = {"identity": identity}
        fn = self._compiled.get(sig)
        if fn is None:
            fn = self._compiled[sig] = mx.compile(self._frame_fn(*sig))
        return fn(temporal_out, first_tokens, forced, forced_mask, keys)


@dataclass(frozen=True)
class LmSnapshot:
    """A frozen `LmState` (KV cache by reference, token ring by value, sampler key)."""

    cache: CacheSnapshot
    tokens: np.ndarray
    provided: np.ndarray
    offset: int
    key: mx.array
    sampling: SamplingConfig


class LmState:
    """Everything one conversation carries from frame to frame (a future batch slot).

    `tokens`/`provided` [num_streams, max_delay + 3] are NVIDIA LMGen's `cache`/`provided` rings, so a
    voice prompt's saved `cache` tensor can be loaded as is (`set_stream_tokens`). `offset` counts
    frames, the first of which only primes the streams.
    """

    def __init__(self, lm: "LM", sampling: SamplingConfig, seed: int, context: int | None = None):
        cfg = lm.cfg
        self.cfg = cfg
        self.cache = lm.transformer.make_cache(context=context, kv_bits=lm.kv_bits)
        self.sampler = TokenSampler(sampling, seed)
        ring = cfg.max_delay + 3
        self.tokens = np.full((cfg.num_streams, ring), -2, dtype=np.int64)  # -2: not generated yet
        self.provided = np.zeros((cfg.num_streams, ring), dtype=bool)
        self.offset = 0

    def reset(self, seed: int | None = None) -> None:
        """Back to the start of a conversation (same sampling; a new seed if given)."""
        self.cache.reset()
        self.tokens[:] = -2
        self.provided[:] = False
        self.offset = 0
        if seed is not None:
            self.sampler = TokenSampler(self.sampler.config, seed)

    def snapshot(self, compact: bool = False) -> LmSnapshot:
        """`compact`: the KV cache copied down to the frames written (a prompt kept for many calls)."""
        return LmSnapshot(self.cache.snapshot(compact), self.tokens.copy(), self.provided.copy(), self.offset,
                          self.sampler.key, self.sampler.config)

    def restore(self, snapshot: LmSnapshot) -> None:
        if snapshot.tokens.shape != self.tokens.shape:
            raise ValueError(
                f"LM snapshot has stream tokens of shape {snapshot.tokens.shape}, expected {self.tokens.shape}")
        self.cache.restore(snapshot.cache)
        self.tokens = snapshot.tokens.copy()
        self.provided = snapshot.provided.copy()
        self.offset = snapshot.offset
        self.sampler = TokenSampler(snapshot.sampling)
        self.sampler.key = snapshot.key

    def set_stream_tokens(self, tokens) -> None:
        """Replace the token ring, e.g. with a voice prompt's saved `cache` ([1,] streams, ring)."""
        arr = np.asarray(tokens)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != self.tokens.shape or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"stream tokens must be integers of shape {self.tokens.shape}, got {arr.dtype} {arr.shape}")
        self.tokens = arr.astype(np.int64).copy()

    def arrays(self) -> list[mx.array]:
        return self.cache.arrays() + [self.sampler.key]


@dataclass(frozen=True)
class StepLogits:
    """The distributions a step sampled from (tests and analysis): the text [text_card] and the
    depformer slices that ran [n, card] (n = dep_q with all_slices), computed even where forced."""

    text: np.ndarray
    audio: np.ndarray


_NO_KEY = mx.random.key(0)  # stands in for the key of a greedy depformer (never drawn from)


class LM(nn.Module):
    def __init__(self, cfg: LmConfig):
        super().__init__()
        if not isinstance(cfg, LmConfig):
            raise ValueError(f"LM needs an LmConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.audio_embs = [nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.transformer = Transformer(cfg.transformer)
        self.out_norm = RMSNorm(cfg.dim, cfg.transformer.norm_eps, compute_f32=cfg.norm == "rms_norm_f32")
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer = Depformer(cfg)
        self._initial = np.array([cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q, dtype=np.int64)
        self._delays = np.array(cfg.delays, dtype=np.int64)
        # 8 or 4: the conversations' KV caches are quantized (transformer.KVCache); None = the model's dtype
        self.kv_bits: int | None = None

    # -- the network ----------------------------------------------------------------------------------

    def embed(self, tokens: mx.array) -> mx.array:
        """Sum of the stream embeddings: tokens [B, num_streams, T] -> [B, T, dim]."""
        x = self.text_emb(tokens[:, 0])
        for k, emb in enumerate(self.audio_embs):
            x = x + emb(tokens[:, k + 1])
        return x

    def temporal(self, x: mx.array, cache: TransformerCache) -> mx.array:
        """Embedded frames [B, T, dim] -> normalised temporal output [B, T, dim] (cache advances)."""
        return self.out_norm(self.transformer.step(x, cache))

    def __call__(self, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """Whole-sequence temporal pass: tokens [B, streams, T] -> (output [B, T, dim], text logits)."""
        out = self.out_norm(self.transformer(self.embed(tokens)))
        return out, self.text_linear(out)

    def new_state(self, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                  context: int | None = None) -> LmState:
        """A fresh conversation; `context` (frames) a window shorter than the model's (see make_cache)."""
        return LmState(self, sampling, seed, context)

    def warmup(self, sampling: SamplingConfig = SamplingConfig(), rows: tuple[int, ...] = (1,),
               contexts: tuple[int | None, ...] = (None,)) -> list[tuple[int, int, int]]:
        """Compile, on a scratch state, every graph a call will need, so that no live frame waits for
        a compilation: the temporal step for each span the filling ring reads (32, 64, ... frames, then
        the full ring) and the depformer frame for the first live frame (1 slice) and the others
        (the agent's codebooks) with `sampling`'s audio settings. `rows`: the batch sizes to compile
        for (`step_slots`; 1 = a single call); `contexts`: the rings' sizes (bots' contexts, None = the
        model's). Call it once after loading, on the thread that will step
        the model (MLX caches compiled graphs per stream, and streams per thread). Returns the temporal
        steps compiled: (rows, ring capacity, span read).

        Memory: the last span of each context is the whole ring, for `n` rows at once (what n calls at
        full context hold), freed when the warm-up returns."""
        cfg = self.cfg
        compiled: list[tuple[int, int, int]] = []
        forced = mx.zeros((cfg.dep_q,), dtype=mx.int32)
        for n in rows:
            x = mx.zeros((n, 1, cfg.dim), dtype=self.out_norm.weight.dtype)
            out = None
            for context in dict.fromkeys(contexts):
                caches = [self.transformer.make_cache(context=context, kv_bits=self.kv_bits) for _ in range(n)]
                cap = caches[0].capacity
                spans = [1 << b for b in range(5, cap.bit_length()) if (1 << b) < cap] + [cap]
                for span in spans:
                    for cache in caches:
                        for layer in cache.layers:
                            layer.offset = span - 1  # a position whose step reads exactly `span` slots
                    out = self.out_norm(self.transformer.step_slots(x, caches))
                    mx.eval(out)
                    compiled.append((n, cap, span))
                del caches  # the full rings of the last span: not kept past the warm-up
            sampler = TokenSampler(sampling)
            for k in sorted({1, cfg.agent_codebooks}):
                mask = mx.array(np.arange(cfg.dep_q) >= k)
                key = sampler.next_key() if sampling.audio_temperature > 0 else _NO_KEY
                keys = mx.stack([mx.random.split(key, k)] * n)
                mx.eval(self.depformer.frame_rows(
                    out, mx.zeros((n,), dtype=mx.int32), mx.stack([forced] * n), mx.stack([mask] * n), k,
                    ((float(sampling.audio_temperature), int(sampling.audio_top_k)),) * n, keys))
        return compiled

    # -- the streaming step ---------------------------------------------------------------------------

    def _check_codes(self, name: str, codes, count: int, high: int) -> np.ndarray:
        arr = np.asarray(codes)
        if arr.shape != (count,) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be {count} integer codes, got {arr.dtype} of shape {arr.shape}")
        if arr.min() < 0 or arr.max() > high:
            raise ValueError(f"{name} must lie in [0, {high}], got {arr.tolist()}")
        return arr.astype(np.int64)

    def _forced_tokens(self, user_codes, agent_codes, text_token) -> list[tuple[int, int]]:
        """(stream, token) pairs a step forces; ValueError for codes outside the model's vocabularies."""
        cfg = self.cfg
        n = cfg.agent_codebooks
        forced: list[tuple[int, int]] = []
        if user_codes is not None:
            codes = self._check_codes("user_codes", user_codes, n, cfg.card)
            forced += [(1 + n + q, int(c)) for q, c in enumerate(codes)]
        if agent_codes is not None:
            codes = self._check_codes("agent_codes", agent_codes, n, cfg.card)
            forced += [(1 + q, int(c)) for q, c in enumerate(codes)]
        if text_token is not None:
            token = self._check_codes("text_token", [text_token], 1, cfg.text_card)[0]
            forced.append((0, int(token)))
        return forced

    def _provide(self, state: LmState, forced: list[tuple[int, int]]) -> None:
        """Write forced tokens where their stream will read them: frame `offset` + the stream's delay."""
        ring = state.tokens.shape[1]
        for stream, token in forced:
            pos = (state.offset + self._delays[stream]) % ring
            state.tokens[stream, pos] = token
            state.provided[stream, pos] = True
        # Streams delayed past the start read their initial token until they begin.
        pos = state.offset % ring
        starting = state.offset <= self._delays
        state.tokens[starting, pos] = self._initial[starting]
        state.provided[starting, pos] = True

    def step(self, state: LmState, user_codes=None, *, agent_codes=None, text_token=None,
             ) -> tuple[int, np.ndarray] | None:
        """One 80 ms frame: the user's 8 codes in, (text token, the agent's 8 codes) out.

        `agent_codes` / `text_token` force the agent's streams (prompts). Returns None while the
        delayed streams fill (the first `max_delay + 1` frames).
        """
        return self._step(state, user_codes, agent_codes, text_token, None, None)[0]

    def step_with_logits(self, state: LmState, user_codes=None, *, agent_codes=None, text_token=None,
                         all_slices: bool = True,
                         ) -> tuple[tuple[int, np.ndarray] | None, StepLogits | None]:
        """`step`, also returning the logits of the frame it predicted (None on the priming frame).

        The text logits are always computed; the depformer runs all its slices when `all_slices`,
        else only up to the last slice whose token is not forced (as `step` does)."""
        return self._step(state, user_codes, agent_codes, text_token, None, "all" if all_slices else "text")

    def step_slots(self, states: list[LmState], user_codes, agent_codes=None, text_tokens=None,
                   ) -> list[tuple[int, np.ndarray] | None]:
        """`step` for several conversations in one forward (a batch of calls): one entry per state in
        each of `user_codes`, `agent_codes`, `text_tokens` (None: nothing forced for anyone). The states
        may sit at any positions, with any sampling and seed; each result equals what `step` gives for
        that state alone. The weight-bound work (embeddings, temporal projections and FFN, text head,
        depformer) runs over all rows at once; a state whose text or audio is forced skips that part."""
        n = len(states)
        agent_codes = [None] * n if agent_codes is None else list(agent_codes)
        text_tokens = [None] * n if text_tokens is None else list(text_tokens)
        user_codes = list(user_codes)
        if not len(user_codes) == len(agent_codes) == len(text_tokens) == n:
            raise ValueError(f"step_slots: {n} states need {n} user_codes, agent_codes and text_tokens, got "
                             f"{len(user_codes)}, {len(agent_codes)}, {len(text_tokens)}")
        if len({id(s) for s in states}) != n:
            raise ValueError("step_slots: a state appears twice in one step")
        return [r[0] for r in self._step_slots(states, user_codes, agent_codes, text_tokens, [None] * n, None)]

    def step_embedding(self, state: LmState, embedding) -> None:
        """Replay one frame of a saved voice prompt: its summed input embedding [dim] replaces the
        embedded tokens; the streams advance as NVIDIA's `step_embeddings` does (text PAD, the other
        streams their initial token), and nothing is sampled since every token is forced."""
        cfg = self.cfg
        x = mx.array(np.asarray(embedding, dtype=np.float32)) if not isinstance(embedding, mx.array) else embedding
        if x.size != cfg.dim:
            raise ValueError(f"a prompt embedding must hold {cfg.dim} values, got shape {tuple(x.shape)}")
        initial = [cfg.audio_initial_token] * cfg.agent_codebooks
        if state.offset == 0:
            self._step(state, initial, initial, cfg.text_padding_token, None, None)
        self._step(state, initial, initial, cfg.text_padding_token, x.reshape(1, 1, cfg.dim), None)

    def _step(self, state: LmState, user_codes, agent_codes, text_token, embedding, want_logits: str | None):
        """`want_logits`: None (just tokens), "text" (text logits too) or "all" (every depformer slice)."""
        return self._step_slots([state], [user_codes], [agent_codes], [text_token], [embedding], want_logits)[0]

    def _step_slots(self, states: list[LmState], user_codes, agent_codes, text_tokens, embeddings,
                    want_logits: str | None) -> list[tuple]:
        """One frame of every state: [(frame or None, StepLogits or None)], one per state."""
        cfg = self.cfg
        forced = [self._forced_tokens(u, a, t) for u, a, t in zip(user_codes, agent_codes, text_tokens)]
        results: list[tuple] = [(None, None)] * len(states)
        live: list[int] = []
        for i, state in enumerate(states):
            self._provide(state, forced[i])
            if state.offset == 0:
                # The priming frame (as in NVIDIA's LMGen): every stream starts from its initial token.
                state.tokens[:, 0] = self._initial
                state.offset = 1
            else:
                live.append(i)
        if not live:
            return results
        ring = states[0].tokens.shape[1]
        inputs, targets, provided = [], [], []
        for i in live:
            state, o = states[i], states[i].offset
            inp = state.tokens[:, (o - 1) % ring]
            if (inp < 0).any():
                raise RuntimeError(f"LM stream ring holds ungenerated tokens at frame {o}: {inp.tolist()}")
            inputs.append(inp)
            targets.append(state.tokens[:, o % ring].copy())
            provided.append(state.provided[:, o % ring].copy())

        # the temporal transformer, every live state's row at once (a replayed prompt embedding in place
        # of the embedded tokens where given)
        rows = []
        tokens = [j for j, i in enumerate(live) if embeddings[i] is None]
        embedded = (self.embed(mx.array(np.stack([inputs[j] for j in tokens]).astype(np.int32)[:, :, None]))
                    if tokens else None)
        if len(tokens) == len(live):
            x = embedded
        else:
            for j, i in enumerate(live):
                rows.append(embedded[tokens.index(j):tokens.index(j) + 1] if embeddings[i] is None
                            else embeddings[i])
            x = rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)
        dtype = self.out_norm.weight.dtype
        out = self.out_norm(self.transformer.step_slots(x.astype(dtype), [states[i].cache for i in live]))

        # the text token: sampled for the rows that do not force it (or want its logits)
        text_rows = [j for j in range(len(live)) if want_logits or not provided[j][0]]
        text_logits: dict[int, mx.array] = {}
        sampled_text: dict[int, mx.array] = {}
        if text_rows:
            head = self.text_linear(out if len(text_rows) == len(live) else out[mx.array(text_rows)])[:, 0]
            for r, j in enumerate(text_rows):
                text_logits[j] = head if len(text_rows) == 1 else head[r:r + 1]
                sampled_text[j] = states[live[j]].sampler.text(text_logits[j])

        # the depformer: every row that samples a codebook, up to its last unforced slice
        n_slices = []
        for j in range(len(live)):
            audio_forced = provided[j][1:cfg.dep_q + 1]
            n_slices.append(cfg.dep_q if want_logits == "all" else (
                0 if audio_forced.all() else int(np.flatnonzero(~audio_forced)[-1]) + 1))
        dep_rows = [j for j in range(len(live)) if n_slices[j]]
        audio_tokens = audio_logits = None
        if dep_rows:
            most = max(n_slices[j] for j in dep_rows)
            firsts, keys, sampling = [], [], []
            for j in dep_rows:
                c = states[live[j]].sampler.config
                firsts.append(mx.array([int(targets[j][0])], dtype=mx.int32) if provided[j][0] else sampled_text[j])
                key = states[live[j]].sampler.next_key() if c.audio_temperature > 0 else _NO_KEY
                row_keys = mx.random.split(key, n_slices[j])
                if n_slices[j] < most:  # slices this row does not need (never drawn from)
                    row_keys = mx.concatenate([row_keys, mx.zeros((most - n_slices[j], 2), dtype=row_keys.dtype)])
                keys.append(row_keys)
                sampling.append((float(c.audio_temperature), int(c.audio_top_k)))
            forced_codes = np.stack([np.where(provided[j], targets[j], 0)[1:cfg.dep_q + 1] for j in dep_rows])
            forced_mask = np.stack([provided[j][1:cfg.dep_q + 1] for j in dep_rows])
            temporal = out if len(dep_rows) == len(live) else out[mx.array(dep_rows)]
            audio_tokens, audio_logits = self.depformer.frame_rows(
                temporal, firsts[0] if len(firsts) == 1 else mx.concatenate(firsts),
                mx.array(forced_codes.astype(np.int32)), mx.array(forced_mask), most, tuple(sampling),
                keys[0][None] if len(keys) == 1 else mx.stack(keys))
        pending = list(sampled_text.values()) + ([audio_tokens] if audio_tokens is not None else [])
        if want_logits:
            pending += list(text_logits.values()) + ([audio_logits] if audio_logits is not None else [])
        mx.eval(pending + [a for i in live for a in states[i].arrays()])

        codes = np.array(audio_tokens) if audio_tokens is not None else None
        for j, i in enumerate(live):
            state, o = states[i], states[i].offset
            tgt_pos = o % ring
            if j in sampled_text and not provided[j][0]:
                state.tokens[0, tgt_pos] = int(sampled_text[j].item())
            if n_slices[j]:
                row = codes[dep_rows.index(j)]
                sampled_rows = np.flatnonzero(~provided[j][1:n_slices[j] + 1])
                state.tokens[1 + sampled_rows, tgt_pos] = row[sampled_rows]
            state.provided[:, (o - 1) % ring] = False
            logits = None
            if want_logits:
                # numpy has no bfloat16: widen on the MLX side first (the GPU dtype).
                audio = (np.array(audio_logits[dep_rows.index(j), :n_slices[j]].astype(mx.float32))
                         if n_slices[j] else np.zeros((0, cfg.card), np.float32))
                logits = StepLogits(np.array(text_logits[j][0].astype(mx.float32)), audio)
            state.offset = o + 1
            if o <= cfg.max_delay:
                results[i] = (None, logits)
                continue
            # The frame now complete in every stream: `max_delay` frames back, shifted by each delay.
            agent = range(cfg.agent_codebooks + 1)
            frame = np.array([state.tokens[k, (o - cfg.max_delay + self._delays[k]) % ring] for k in agent])
            results[i] = ((int(frame[0]), frame[1:].copy()), logits)
        return results
