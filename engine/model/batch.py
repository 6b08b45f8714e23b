"""Many calls on one model in one forward per 80 ms frame: `BatchedSessions`, B slots stepped together.

Why: the 7B step is bound by reading its weights (bytes per frame), so stepping B calls one after the
other reads them B times; one forward over B rows reads them once. Each slot holds one call's `Session`
(its LM state, codec streams, sampler, persona schedule) and `step` runs for all active slots at once:
Mimi's encoder (the callers' frames and any played clip frames), the temporal transformer, the text
head and the depformer, then Mimi's decoder, each as one batched forward (`Mimi.encode_slots`,
`LM.step_slots`, `Mimi.decode_slots`). Everything per call stays per call: position, rotating KV cache
(its own arrays: a call joined from a prompt snapshot shares the snapshot's until its first write, as
a Session does; joining a held slot replaces its call at once), attention window and mask, RoPE offset, sampling settings and random key chain, codec
history, played-clip stream, persona swap.

Design: the KV caches are not one [B, ...] tensor but one array per slot, and attention runs per slot
inside the one compiled forward, while the weight-bound work (projections, norms, FFNs, embeddings,
heads, convolutions) runs over all rows at once. So an empty or idle slot costs nothing at all (it is
not in the batch), a join or leave is a reference swap (no copy of a cache), and each slot's results
are the same operations on the same values as its Session stepped alone: bit-identical on this CPU,
whose MLX matmul (the mlx-cpu wheel's bundled reference BLAS) computes each row alone
(tests/test_batch_*); an optimized BLAS or a GPU may block rows together, and then a slot equals its
call alone within float rounding (~1e-6 relative per matmul). The price: attention kernels grow with
the number of slots (one per slot and layer) instead of one masked kernel per layer; fine on a CPU, to
be measured on a GPU. What batching saves depends on the backend's matmul: the reference BLAS is
compute-bound (B rows cost B times one row), so on this CPU the gain is in the per-step overheads
only; with a bandwidth-bound matmul (OpenBLAS here, Metal, CUDA) B rows cost about one (BENCHMARKS.md,
"Batched step").

`step` is `Session.step` for many sessions: it reads and writes the sessions' own state (`_lm_state`,
`_codec`, `_played`, `_forced`, `_swap`), so a change there must be mirrored here; the parity tests
compare the two bit for bit. Join, leave and step belong to the thread that steps (MLX arrays live on
their thread's stream); `session(slot).set_persona` may come from any thread, as for a Session.
"""

from __future__ import annotations

import time
from typing import Sequence

import mlx.core as mx
import numpy as np

from callbot.engine.model.mimi import MimiState
from callbot.engine.model.sampling import SamplingConfig
from callbot.engine.model.session import FRAME_SIZE, Model, PromptSnapshot, Session
from callbot.engine.model.tokenizer import PAD_ID

__all__ = ["BatchedSessions"]


class BatchedSessions:
    """`slots` call slots on one model, stepped together.

        batch = BatchedSessions(model, slots=8)
        batch.join(0, model.prepare("NATF0", persona), seed=1)
        out, pieces = batch.step(pcm)            # pcm float32 [8, 1920]; out [8, 1920], pieces [8]
        batch.session(0).set_persona("...")      # live control, as on a Session
        batch.leave(0)
    """

    frame_size = FRAME_SIZE

    def __init__(self, model: Model, slots: int):
        if not isinstance(model, Model):
            raise ValueError(f"BatchedSessions needs a loaded Model, got {type(model).__name__}")
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self.model = model
        self._slots: list[Session | None] = [None] * slots
        self.last_encoded_ns = self.last_stepped_ns = 0

    @property
    def slots(self) -> int:
        return len(self._slots)

    @property
    def joined(self) -> tuple[int, ...]:
        """The slots that hold a call."""
        return tuple(i for i, s in enumerate(self._slots) if s is not None)

    def _check_slot(self, slot) -> int:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(self._slots):
            raise ValueError(f"slot must be an integer in [0, {len(self._slots)}), got {slot!r}")
        return slot

    def join(self, slot: int, snapshot: PromptSnapshot, seed: int = 0, sampling: SamplingConfig | None = None) -> None:
        """A call takes `slot`, starting right after `snapshot`'s prompt (any bot's: slots may hold
        different voices and personas) with its own seed and sampling (default: the model's). A slot
        that holds a call is taken over by the new one at once (the old call's Session object is left
        as it was, for whoever still reads it). Milliseconds: the state is the snapshot's arrays by
        reference, copied layer by layer as the call writes them."""
        self._check_slot(slot)
        if not isinstance(snapshot, PromptSnapshot):
            raise ValueError(f"snapshot must be a PromptSnapshot from Model.prepare, got {type(snapshot).__name__}")
        self._slots[slot] = Session(self.model, snapshot, seed,
                                    sampling if sampling is not None else self.model.sampling)

    def leave(self, slot: int) -> None:
        """The call in `slot` ends; its state goes (the slot costs nothing until a call joins it)."""
        self._check_slot(slot)
        if self._slots[slot] is None:
            raise ValueError(f"slot {slot} holds no call")
        self._slots[slot] = None

    def session(self, slot: int) -> Session:
        """The call in `slot`, for live control and its state: `set_persona`, `persona_phase`,
        `persona_swaps`, `persona`, `last_output_played`, `frames`. Step it through the batch."""
        self._check_slot(slot)
        session = self._slots[slot]
        if session is None:
            raise ValueError(f"slot {slot} holds no call")
        return session

    def warmup(self, sizes: Sequence[int] | None = None, contexts: Sequence[int | None] | None = None,
               ) -> list[tuple[int, int, int]]:
        """Compile, on scratch states, what a batch of each size in `sizes` (default 1..slots) needs:
        the temporal step for every span the rings read (rings of each of `contexts`: the bots'
        contexts, None = the model's; by default the contexts of the prompts prepared on the model, so
        each bot's spans are compiled with its own context) and the depformer frame (the model's
        sampling). Call it on the stepping thread, after the bots are prepared; a mix of sampling
        settings in one batch compiles on first use. A batch whose slots have different contexts steps
        through the uncompiled path (slower per step). Returns what was compiled: (rows, ring, span)."""
        sizes = range(1, len(self._slots) + 1) if sizes is None else sizes
        if contexts is None:
            contexts = self.model.prepared_contexts() or (None,)
        return self.model.lm.warmup(self.model.sampling, rows=tuple(sizes), contexts=tuple(contexts))

    def _active(self, active) -> list[int]:
        if active is None:
            return list(self.joined)
        flags = np.asarray(active)
        if flags.shape != (len(self._slots),) or flags.dtype != np.bool_:
            raise ValueError(f"active must be {len(self._slots)} booleans, got {flags.dtype} of shape {flags.shape}")
        which = [int(i) for i in np.flatnonzero(flags)]
        for i in which:
            if self._slots[i] is None:
                raise ValueError(f"slot {i} is active but holds no call")
        return which

    def step(self, pcm: np.ndarray, active=None, agent_pcm: Sequence[np.ndarray | None] | None = None,
             ) -> tuple[np.ndarray, list[str | None]]:
        """One 80 ms frame of every active slot in one forward: `pcm` float32 [slots, 1920] (the callers'
        frames at 24 kHz; rows of other slots are ignored), `active` [slots] booleans (default: every slot
        that holds a call), `agent_pcm` one entry per slot, None or a float32 [1920] frame played to that
        caller (see `Session.step`). Returns (agent PCM float32 [slots, 1920], zeros where not stepped;
        the text piece each slot spoke, None where none or not stepped). Each slot's results equal its
        Session stepped alone. ValueError (nothing stepped) for a malformed input or a played frame in a
        slot whose persona tokens run."""
        size = len(self._slots)
        if not isinstance(pcm, np.ndarray) or pcm.dtype != np.float32 or pcm.shape != (size, FRAME_SIZE):
            raise ValueError(f"pcm must be a float32 numpy array of shape ({size}, {FRAME_SIZE}), got "
                             f"{getattr(pcm, 'dtype', type(pcm).__name__)} {getattr(pcm, 'shape', '')}")
        which = self._active(active)
        agents = [None] * size if agent_pcm is None else list(agent_pcm)
        if len(agents) != size:
            raise ValueError(f"agent_pcm must hold {size} entries (None or a frame), got {len(agents)}")
        for i, a in enumerate(agents):
            if a is None:
                continue
            if i not in which:
                raise ValueError(f"slot {i}: agent_pcm for a slot that is not stepped")
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != (FRAME_SIZE,):
                raise ValueError(f"slot {i}: agent_pcm must be a float32 numpy array of shape ({FRAME_SIZE},)")
            if not np.isfinite(a).all():
                raise ValueError(f"slot {i}: agent_pcm holds NaN or infinite samples")
        out = np.zeros((size, FRAME_SIZE), np.float32)
        pieces: list[str | None] = [None] * size
        if not which:
            return out, pieces
        heard = pcm[which]
        if not np.isfinite(heard).all():
            bad = which[int(np.flatnonzero(~np.isfinite(heard).all(axis=1))[0])]
            raise ValueError(f"slot {bad}: the frame holds NaN or infinite samples")
        sessions: list[Session] = [self._slots[i] for i in which]
        played = [agents[i] is not None for i in which]
        forcings = []
        for i, s, p in zip(which, sessions, played):
            try:
                forcings.append(s._swap.next_step(p))  # raises before anything changes
            except ValueError as err:
                raise ValueError(f"slot {i}: {err}") from None

        model = self.model
        mimi, lm, filler = model.mimi, model.lm, model.filler
        n = len(sessions)
        # One encoder forward: the callers' frames (every frame, heard or not, so that each encoder
        # resumes on its real history), then the played frames (a fresh stream per run of them).
        replayed = [j for j in range(n) if played[j]]
        frames = heard if not replayed else np.concatenate([heard, np.stack([agents[which[j]] for j in replayed])])
        states = [s._codec for s in sessions] + [
            sessions[j]._played if sessions[j]._forced[-1][0] else MimiState() for j in replayed]
        codes, states = mimi.encode_slots(frames, states)
        codes = np.array(codes, dtype=np.int64)
        for j, s in enumerate(sessions):
            s._codec = states[j]
        for r, j in enumerate(replayed):
            sessions[j]._played = states[n + r]

        users, agent_codes, text_tokens = [], [], []
        for j, forcing in enumerate(forcings):
            users.append(filler.sine if forcing.mute_caller else codes[j])
            if played[j]:
                agent_codes.append(codes[n + replayed.index(j)])
                text_tokens.append(PAD_ID)
            elif forcing.frame is not None:
                agent_codes.append(forcing.frame.agent)
                text_tokens.append(forcing.frame.text)
            else:
                agent_codes.append(None)
                text_tokens.append(None)
        encoded_ns = time.monotonic_ns()
        lm_states = [s._lm_state for s in sessions]
        positions = [st.offset % st.tokens.shape[1] for st in lm_states]  # where each text token is written
        results = lm.step_slots(lm_states, users, agent_codes, text_tokens)
        stepped_ns = time.monotonic_ns()
        for i, j, result in zip(which, range(n), results):
            if result is None:  # cannot happen after a prompt (>= 12 frames fill the delayed streams)
                raise RuntimeError(f"slot {i}: the LM returned no frame: the session was not prompted")
            forced_text = text_tokens[j] is not None
            sessions[j]._forced.append((played[j], forced_text))
            sessions[j]._swap.finished_step(forcings[j], played[j],
                                            None if forced_text else int(lm_states[j].tokens[0, positions[j]]))
        audio, states = mimi.decode_slots(np.stack([r[1] for r in results]), [s._codec for s in sessions])
        mx.eval(audio)
        # numpy has no bfloat16: a GPU codec's output is widened first
        out[which] = np.array(audio.astype(mx.float32))
        self.last_encoded_ns, self.last_stepped_ns = encoded_ns, stepped_ns
        for i, j, s in zip(which, range(n), sessions):
            s._codec = states[j]
            s.last_encoded_ns, s.last_stepped_ns = encoded_ns, stepped_ns
            s.frames += 1
            pieces[i] = None if s._forced[0][1] else model.tokenizer.piece(results[j][0])
        return out, pieces
