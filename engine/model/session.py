"""The library API: load the model once (`Model.load`), open a `Session` per call, feed it 80 ms of 24 kHz
PCM at a time and get 80 ms of the agent's voice (and the words it speaks) back.

Prompting the model with a voice and a persona takes hundreds of steps (seconds on the 7B), far too long
for a caller to wait through after answering. The state right after the prompt depends only on the
(voice, persona) pair, so `Model.prepare` computes it once into an immutable `PromptSnapshot` (LM KV
cache, delayed-stream ring, codec streams) and a session starts from it in the time it takes to copy a
few references. A session's state (LM state, codec streams, sampler) is its own unit and the loaded
model holds weights only, so several sessions share one model and may step from several threads with no
lock and no state swapped in and out: each session is what a batch slot will later hold.

Live control happens at the model level, one 80 ms frame per `step` so the runner keeps its cadence:
`step(pcm, agent_pcm=...)` forces a frame the app plays to the caller into the agent's own stream (the
model hears it as its own words), and `set_persona` takes a new system prompt at the next utterance
boundary (persona_swap.py).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time

import mlx.core as mx
import numpy as np

from callbot.engine.model.lm import LM, LmSnapshot, LmState
from callbot.engine.model.lm_config import LmConfig
from callbot.engine.model.mimi import Mimi, MimiConfig, MimiState, load_mimi
from callbot.engine.model.persona_swap import PersonaSwap, PersonaSwapSchedule
from callbot.engine.model.prompt import (FillerCodes, check_plan, filler_codes, persona_tokens, plan_persona,
                                         plan_prompt, run_prompt, voice_codes)
from callbot.engine.model.sampling import SamplingConfig, TokenSampler
from callbot.engine.model.tokenizer import PAD_ID, TextTokenizer
from callbot.engine.model.transformer import KV_BITS
from callbot.engine.model.voices import VoiceEmbeddings, VoiceLibrary, VoiceRecording
from callbot.engine.model.weights import (MIMI_FILE, TEXT_TOKENIZER_FILE, default_dtype, find_weights, load_lm,
                                    require_file)

__all__ = ["Model", "Session", "PromptSnapshot", "PersonaSwap", "SAMPLE_RATE", "FRAME_SIZE", "bound_buffer_cache"]

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms model frame
_SNAPSHOT_CACHE_SIZE = 8  # (voice, persona) pairs kept prepared
# MLX keeps freed buffers for reuse, unbounded by default: growing KV caches and the prompt's scratch
# arrays would stay held by the process. 512 MiB is ~20 full-context 7B layer rings of bf16 keys, enough
# that a step's temporaries are reused rather than reallocated.
BUFFER_CACHE_LIMIT = 512 * 1024 * 1024  # bytes


def bound_buffer_cache(limit: int = BUFFER_CACHE_LIMIT) -> int:
    """Bound MLX's cache of freed buffers to `limit` bytes; returns the previous limit. `mx.set_cache_limit`
    on MLX >= 0.19 (every backend: CPU, Metal, CUDA); its macOS twin on older MLX is
    `mx.metal.set_cache_limit` (the Metal allocator's)."""
    setter = getattr(mx, "set_cache_limit", None)
    if setter is None:  # older MLX: the Metal allocator only
        setter = mx.metal.set_cache_limit
    return setter(limit)


@dataclasses.dataclass(frozen=True)
class PromptSnapshot:
    """The model's state right after a (voice, persona) prompt; restored at every call start."""

    voice: str
    persona: str
    prompt_frames: int
    lm: LmSnapshot
    mimi: MimiState


class Model:
    """One loaded PersonaPlex-architecture model (LM, codec, tokenizer, voices) serving any number of
    sessions; it holds weights, never a session's state, so sessions step from any thread."""

    def __init__(self, lm: LM, mimi: Mimi, tokenizer: TextTokenizer, voices: VoiceLibrary,
                 sampling: SamplingConfig = SamplingConfig(), kv_bits: int | None = None):
        cfg = lm.cfg
        if mimi.num_codebooks != cfg.agent_codebooks or mimi.cfg.quantizer_bins != cfg.card:
            raise ValueError(
                f"the codec ({mimi.num_codebooks} codebooks of {mimi.cfg.quantizer_bins}) does not match the LM "
                f"({cfg.agent_codebooks} codebooks of {cfg.card} per speaker)")
        if mimi.frame_size != FRAME_SIZE or mimi.sample_rate != SAMPLE_RATE:
            raise ValueError(f"the codec takes {mimi.frame_size} samples at {mimi.sample_rate} Hz; "
                             f"sessions are {FRAME_SIZE} samples at {SAMPLE_RATE} Hz")
        if tokenizer.vocab_size > cfg.text_card:
            raise ValueError(f"{tokenizer.path}: {tokenizer.vocab_size} pieces, more than the LM's text "
                             f"vocabulary of {cfg.text_card}: tokenizer and model do not match")
        if kv_bits not in (None, *KV_BITS):
            raise ValueError(f"kv_bits must be one of {KV_BITS} or None, got {kv_bits!r}")
        lm.kv_bits = kv_bits  # every prompt prepared from here on, and its calls, quantize their KV cache
        self.lm = lm
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.voices = voices
        self.sampling = sampling
        self.filler: FillerCodes = filler_codes(mimi)
        self._prepared_lock = threading.Lock()  # the cache of prepared prompts only, never held for a step
        self._prepared: collections.OrderedDict[tuple, tuple[PromptSnapshot, object]] = collections.OrderedDict()

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, quantize: str | None = None, *,
             lm_config: LmConfig | None = None, mimi_config: MimiConfig | None = None,
             download: bool = False, cache_dir: str | os.PathLike | None | bool = None,
             sampling: SamplingConfig = SamplingConfig(), progress: bool = True,
             kv_bits: int | None = None) -> "Model":
        """Load from a directory of the HF repo's files (`path`), else the Hugging Face cache, else (only
        with `download=True`) the hub. `quantize` None, "q4" or "q8" (the LM; cached converted on disk).
        `kv_bits` 8 or 4: the calls' KV caches quantized (memory per call 0.53x / 0.28x of bf16).
        `lm_config`/`mimi_config` default to PersonaPlex-7B and the released Mimi."""
        directory = find_weights(path, download=download)
        dtype = default_dtype()
        lm = load_lm(directory, lm_config, quantize=quantize, dtype=dtype, cache_dir=cache_dir, progress=progress)
        mimi = load_mimi(require_file(directory, MIMI_FILE), mimi_config, dtype=dtype)
        tokenizer = TextTokenizer(require_file(directory, TEXT_TOKENIZER_FILE))
        bound_buffer_cache()
        return cls(lm, mimi, tokenizer, VoiceLibrary(directory), sampling, kv_bits)

    # -- prompts --------------------------------------------------------------------------------------

    def _voice_key(self, voice) -> tuple:
        if isinstance(voice, (VoiceEmbeddings, VoiceRecording)):
            return ("object", id(voice))
        if not isinstance(voice, (str, os.PathLike)):
            raise ValueError(f"voice must be a name (one of VOICES), a .pt/.wav path or a loaded voice, "
                             f"got {type(voice).__name__}")
        text = os.fspath(voice)
        if os.path.isfile(text):
            st = os.stat(text)
            return ("file", os.path.abspath(text), st.st_mtime_ns, st.st_size)
        return ("name", text)

    def prepare(self, voice: str | os.PathLike | VoiceEmbeddings | VoiceRecording = "NATF0", persona: str = "",
                *, context: int | None = None, use_cache: bool = True, between=None) -> PromptSnapshot:
        """The state after prompting with `voice` (a name such as "NATF2", a `.pt`/`.wav` path, or a loaded
        voice) and `persona` (plain text, wrapped in `<system>` tags here). `context`: the frames a call
        from this prompt attends to (a bot's `context`, at most the model's; fewer = less memory per call
        and fewer bytes read per step), None = the model's. Computed once per (voice, persona, context)
        and kept (the last few); `use_cache=False` computes it afresh. `between()`, if given, is called
        before each prompt frame (run_prompt): the runner serves its calls there when it prepares a bot
        while they run (engine/serving/runner.py, `prepare_bot`)."""
        if not isinstance(persona, str):
            raise ValueError(f"persona must be a string, got {type(persona).__name__}")
        state = self.lm.new_state(self.sampling, context=context)  # ValueError for a context out of range
        key = (self._voice_key(voice), persona, state.cache.capacity)
        if use_cache:
            with self._prepared_lock:
                if key in self._prepared:
                    self._prepared.move_to_end(key)
                    return self._prepared[key][0]
        loaded = voice if isinstance(voice, (VoiceEmbeddings, VoiceRecording)) else self.voices.resolve(voice)
        ids = persona_tokens(self.tokenizer, persona)
        # a prompt writes only its own codec stream and LM state: live sessions keep stepping meanwhile
        source = loaded if isinstance(loaded, VoiceEmbeddings) else voice_codes(self.mimi, loaded, between)
        plan = plan_prompt(source, ids, self.filler)
        check_plan(self.lm, plan, loaded.name, state.cache.capacity)
        run_prompt(self.lm, state, plan, between)
        # NVIDIA resets the codec after the prompt: a call starts with fresh codec streams.
        # the snapshot keeps the prompt's frames only (not the span the last prompt step read): a call
        # copies them at its first step and grows its own cache from there
        lm_snapshot = state.snapshot(compact=True)
        mx.eval(lm_snapshot.cache.arrays())
        snapshot = PromptSnapshot(loaded.name, persona, len(plan.frames), lm_snapshot, MimiState())
        if use_cache:
            with self._prepared_lock:
                self._prepared[key] = (snapshot, voice)  # the voice object too: an id() key must stay valid
                while len(self._prepared) > _SNAPSHOT_CACHE_SIZE:
                    self._prepared.popitem(last=False)
        return snapshot

    def prepared_contexts(self) -> tuple[int | None, ...]:
        """The contexts of the prompts prepared and kept (each bot's `context`; None: the model's own),
        oldest first: what a warm-up compiles the rings' spans for."""
        with self._prepared_lock:
            capacities = [snapshot.lm.cache.capacity for snapshot, _ in self._prepared.values()]
        full = self.lm.cfg.context
        return tuple(dict.fromkeys(None if c == full else c for c in capacities))

    def open_session(self, voice: str | os.PathLike | VoiceEmbeddings | VoiceRecording = "NATF0",
                     persona: str = "", *, snapshot: PromptSnapshot | None = None, seed: int = 0,
                     sampling: SamplingConfig | None = None, sample_rate: int = SAMPLE_RATE) -> "Session":
        """A conversation that starts right after the prompt (`snapshot`, else `prepare(voice, persona)`).

        `seed` makes the sampling reproducible; `sample_rate` must be 24000 (resample first)."""
        _check_rate(sample_rate)
        if snapshot is None:
            snapshot = self.prepare(voice, persona)
        elif not isinstance(snapshot, PromptSnapshot):
            raise ValueError(f"snapshot must be a PromptSnapshot from Model.prepare, got {type(snapshot).__name__}")
        return Session(self, snapshot, seed, sampling if sampling is not None else self.sampling)


def _check_rate(sample_rate) -> None:
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the model takes {SAMPLE_RATE} Hz PCM, got {sample_rate} Hz: resample the audio first "
                         "(callbot.engine.Resampler)")


def _check_frame(pcm, what: str) -> None:
    if not isinstance(pcm, np.ndarray) or pcm.dtype != np.float32:
        raise ValueError(f"{what} must be a float32 numpy array in [-1, 1], got "
                         f"{getattr(pcm, 'dtype', type(pcm).__name__)}")
    if pcm.shape != (FRAME_SIZE,):
        raise ValueError(f"{what} is {FRAME_SIZE} samples (80 ms at {SAMPLE_RATE} Hz), got shape {pcm.shape}")
    if not np.isfinite(pcm).all():
        raise ValueError(f"{what} holds NaN or infinite samples")


class Session:
    """One conversation: `step` takes the caller's next 80 ms (float32 [1920] at 24 kHz) and returns the
    agent's next 80 ms and the text piece it spoke in that frame (None for most frames).

    What a step returns is the agent frame the LM completed in that step, which is the frame of the
    step before: the model's acoustic delay (its audio codebooks 1-7 lag codebook 0 and the text by one
    frame). So a frame forced at step t (a played clip, a persona token) comes back from step t + 1;
    `last_output_played` says when the returned audio is the decode of a played frame.
    """

    frame_size = FRAME_SIZE
    sample_rate = SAMPLE_RATE

    def __init__(self, model: Model, snapshot: PromptSnapshot, seed: int, sampling: SamplingConfig):
        self.model = model
        self.snapshot = snapshot
        self.seed = seed
        self.sampling = sampling
        self._lm_state: LmState = model.lm.new_state(sampling, seed)
        self._swap = PersonaSwapSchedule(PAD_ID)
        self.reset()

    def reset(self) -> None:
        """Back to the moment after the prompt, with the session's seed: the next steps repeat exactly."""
        self._lm_state.restore(self.snapshot.lm)
        # the prompt's draws are not the call's: every call from a snapshot samples from its own seed
        self._lm_state.sampler = TokenSampler(self.sampling, self.seed)
        # encoder: the caller's audio in; decoder: the agent's audio out (every frame of its stream, forced
        # or sampled, in order, so the decoded voice never jumps)
        self._codec: MimiState = self.snapshot.mimi
        # encoder only: frames played to the caller as the agent's words; a fresh stream per run of
        # consecutive played frames (a clip), as a voice recording is encoded
        self._played: MimiState | None = None
        # per step, oldest first: was the agent frame forced by a played frame / was its text forced?
        # (a step returns the frame of `max_delay` steps back)
        depth = self.model.lm.cfg.max_delay + 1
        self._forced = collections.deque([(False, False)] * depth, maxlen=depth)
        self._swap.reset()
        self.frames = 0
        self.last_encoded_ns = self.last_stepped_ns = 0

    # -- live control ---------------------------------------------------------------------------------

    def set_persona(self, persona: str) -> None:
        """Take `persona` (plain text, wrapped in `<system>` tags here) as the system prompt at the next
        utterance boundary: see persona_swap.py for the steps it takes (`persona_phase`) and what a
        second call does while one is pending. ValueError for an empty persona or one that does not fit
        the model (ids outside its vocabulary, longer than its context)."""
        ids = persona_tokens(self.model.tokenizer, persona)
        if not persona.strip():
            raise ValueError("set_persona needs a persona text, got an empty one")
        plan = plan_persona(ids, self.model.filler)
        check_plan(self.model.lm, plan, "set_persona", self._lm_state.cache.capacity)
        self._swap.request(persona, plan, self.frames)

    @property
    def persona_phase(self) -> str | None:
        """None when no persona change is pending, else "waiting" (the agent finishes its utterance, the
        caller is not heard), "persona" (its tokens are forced) or "spacer" (0.5 s of silence after)."""
        return self._swap.phase

    @property
    def persona_swaps(self) -> tuple[PersonaSwap, ...]:
        """Completed persona changes, oldest first, each with the steps the caller went unheard."""
        return self._swap.swaps

    @property
    def persona(self) -> str:
        """The persona in effect: the last one a completed change took, else the prompt's."""
        return self._swap.persona(self.snapshot.persona)

    @property
    def last_output_played(self) -> bool:
        """True when the audio the last step returned is the decode of a played frame's codes (the
        `agent_pcm` of the step before): the runner sends the clip itself in its place."""
        return self._forced[0][0]

    # -- the step -------------------------------------------------------------------------------------

    def step(self, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE, *,
             agent_pcm: np.ndarray | None = None) -> tuple[np.ndarray, str | None]:
        """(agent PCM float32 [1920], text piece or None) for the caller's next frame `pcm` float32 [1920].

        `agent_pcm` (float32 [1920]): a frame of a clip the app plays to the caller. It is Mimi-encoded
        and its codes are forced into the agent's audio stream with the text stream at PAD, so the model's
        context holds the clip as its own words (the voice-prompt mechanism); the step after returns their
        decode (`last_output_played`) and no text. ValueError while a persona's tokens or spacer run
        (`persona_phase` "persona" or "spacer"): hold a clip back until the change is done."""
        _check_rate(sample_rate)
        _check_frame(pcm, "a frame")
        played = agent_pcm is not None
        if played:
            _check_frame(agent_pcm, "agent_pcm")
        forcing = self._swap.next_step(played)  # raises before anything changes
        model = self.model
        mimi, lm, filler = model.mimi, model.lm, model.filler
        # The caller's encoder runs on every frame, heard or not, so that it resumes on its real history.
        caller, self._codec = mimi.encode_step(pcm, self._codec)
        caller = np.array(caller, dtype=np.int64)  # evaluated here: the codes are needed
        user = filler.sine if forcing.mute_caller else caller
        agent_codes = text_token = None
        if played:
            played_codes, self._played = mimi.encode_step(
                agent_pcm, self._played if self._forced[-1][0] else MimiState())
            agent_codes, text_token = np.array(played_codes, dtype=np.int64), PAD_ID
        elif forcing.frame is not None:
            agent_codes, text_token = forcing.frame.agent, forcing.frame.text
        encoded_ns = time.monotonic_ns()
        state = self._lm_state
        position = state.offset % state.tokens.shape[1]  # where this step's text token is written
        out = lm.step(state, user, agent_codes=agent_codes, text_token=text_token)
        if out is None:  # cannot happen after a prompt (>= 12 frames fill the delayed streams)
            raise RuntimeError("the LM returned no frame: the session was not prompted")
        stepped_ns = time.monotonic_ns()  # lm.step evaluates its tokens before it returns
        self._forced.append((played, text_token is not None))
        self._swap.finished_step(forcing, played, None if text_token is not None else int(state.tokens[0, position]))
        text, agent = out
        audio, self._codec = mimi.decode_step(agent, self._codec)
        mx.eval(audio)
        # where the step's time went (monotonic ns): the runner's per-stage statistics read these
        self.last_encoded_ns, self.last_stepped_ns = encoded_ns, stepped_ns
        self.frames += 1
        piece = None if self._forced[0][1] else model.tokenizer.piece(text)
        # numpy has no bfloat16: a GPU codec's output is widened first
        return np.array(audio.astype(mx.float32)), piece
