"""The library API: load the model once (`Model.load`), open a `Session` per call, feed it 80 ms of 24 kHz
PCM at a time and get 80 ms of the agent's voice (and the words it speaks) back.

Prompting the model with a voice and a persona takes hundreds of steps (seconds on the 7B), far too long
for a caller to wait through after answering. The state right after the prompt depends only on the
(voice, persona) pair, so `Model.prepare` computes it once into an immutable `PromptSnapshot` (LM KV
cache, delayed-stream ring, codec streams) and a session starts from it in the time it takes to copy a
few references. A session's state (LM + codec streams + sampler) is its own unit, so several sessions
share one loaded model; they take turns on it (one model lock), which is how a batch slot will later
be filled.
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
from callbot.engine.model.prompt import (FillerCodes, check_plan, filler_codes, persona_tokens, plan_prompt,
                                   run_prompt, voice_codes)
from callbot.engine.model.sampling import SamplingConfig, TokenSampler
from callbot.engine.model.tokenizer import TextTokenizer
from callbot.engine.model.voices import VoiceEmbeddings, VoiceLibrary, VoiceRecording
from callbot.engine.model.weights import (MIMI_FILE, TEXT_TOKENIZER_FILE, default_dtype, find_weights, load_lm,
                                    require_file)

__all__ = ["Model", "Session", "PromptSnapshot", "SAMPLE_RATE", "FRAME_SIZE"]

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms model frame
_SNAPSHOT_CACHE_SIZE = 8  # (voice, persona) pairs kept prepared


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
    sessions, one step at a time."""

    def __init__(self, lm: LM, mimi: Mimi, tokenizer: TextTokenizer, voices: VoiceLibrary,
                 sampling: SamplingConfig = SamplingConfig()):
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
        self.lm = lm
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.voices = voices
        self.sampling = sampling
        self.filler: FillerCodes = filler_codes(mimi)
        self._lock = threading.Lock()  # the codec object is shared: one step (or prompt) at a time
        self._prepared: collections.OrderedDict[tuple, tuple[PromptSnapshot, object]] = collections.OrderedDict()

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, quantize: str | None = None, *,
             lm_config: LmConfig | None = None, mimi_config: MimiConfig | None = None,
             download: bool = False, cache_dir: str | os.PathLike | None | bool = None,
             sampling: SamplingConfig = SamplingConfig(), progress: bool = True) -> "Model":
        """Load from a directory of the HF repo's files (`path`), else the Hugging Face cache, else (only
        with `download=True`) the hub. `quantize` None, "q4" or "q8" (the LM; cached converted on disk).
        `lm_config`/`mimi_config` default to PersonaPlex-7B and the released Mimi."""
        directory = find_weights(path, download=download)
        dtype = default_dtype()
        lm = load_lm(directory, lm_config, quantize=quantize, dtype=dtype, cache_dir=cache_dir, progress=progress)
        mimi = load_mimi(require_file(directory, MIMI_FILE), mimi_config, dtype=dtype)
        tokenizer = TextTokenizer(require_file(directory, TEXT_TOKENIZER_FILE))
        return cls(lm, mimi, tokenizer, VoiceLibrary(directory), sampling)

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
                *, use_cache: bool = True) -> PromptSnapshot:
        """The state after prompting with `voice` (a name such as "NATF2", a `.pt`/`.wav` path, or a loaded
        voice) and `persona` (plain text, wrapped in `<system>` tags here). Computed once per pair and
        kept (the last few pairs); `use_cache=False` computes it afresh."""
        if not isinstance(persona, str):
            raise ValueError(f"persona must be a string, got {type(persona).__name__}")
        key = (self._voice_key(voice), persona)
        if use_cache and key in self._prepared:
            self._prepared.move_to_end(key)
            return self._prepared[key][0]
        loaded = voice if isinstance(voice, (VoiceEmbeddings, VoiceRecording)) else self.voices.resolve(voice)
        ids = persona_tokens(self.tokenizer, persona)
        # the model lock is taken per frame inside: live sessions keep stepping while a prompt runs
        source = loaded if isinstance(loaded, VoiceEmbeddings) else voice_codes(self.mimi, loaded, self._lock)
        plan = plan_prompt(source, ids, self.filler)
        check_plan(self.lm, plan, loaded.name)
        state = self.lm.new_state(self.sampling)
        run_prompt(self.lm, state, plan, self._lock)
        # NVIDIA resets the codec after the prompt: a call starts with fresh codec streams.
        snapshot = PromptSnapshot(loaded.name, persona, len(plan.frames), state.snapshot(), MimiState())
        if use_cache:
            self._prepared[key] = (snapshot, voice)  # the voice object too: an id() key must stay valid
            while len(self._prepared) > _SNAPSHOT_CACHE_SIZE:
                self._prepared.popitem(last=False)
        return snapshot

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


class Session:
    """One conversation: `step` takes the caller's next 80 ms (float32 [1920] at 24 kHz) and returns the
    agent's next 80 ms and the text piece it spoke in that frame (None for most frames)."""

    frame_size = FRAME_SIZE
    sample_rate = SAMPLE_RATE

    def __init__(self, model: Model, snapshot: PromptSnapshot, seed: int, sampling: SamplingConfig):
        self.model = model
        self.snapshot = snapshot
        self.seed = seed
        self.sampling = sampling
        self._lm_state: LmState = model.lm.new_state(sampling, seed)
        self._mimi_state: MimiState = snapshot.mimi
        self.reset()

    def reset(self) -> None:
        """Back to the moment after the prompt, with the session's seed: the next steps repeat exactly."""
        self._lm_state.restore(self.snapshot.lm)
        # the prompt's draws are not the call's: every call from a snapshot samples from its own seed
        self._lm_state.sampler = TokenSampler(self.sampling, self.seed)
        self._mimi_state = self.snapshot.mimi
        self.frames = 0
        self.last_encoded_ns = self.last_stepped_ns = 0

    def step(self, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, str | None]:
        """(agent PCM float32 [1920], text piece or None) for the caller's next frame `pcm` float32 [1920]."""
        _check_rate(sample_rate)
        if not isinstance(pcm, np.ndarray) or pcm.dtype != np.float32:
            raise ValueError(f"a frame must be a float32 numpy array in [-1, 1], got "
                             f"{getattr(pcm, 'dtype', type(pcm).__name__)}")
        if pcm.shape != (FRAME_SIZE,):
            raise ValueError(f"a frame is {FRAME_SIZE} samples (80 ms at {SAMPLE_RATE} Hz), got shape {pcm.shape}")
        if not np.isfinite(pcm).all():
            raise ValueError("the frame holds NaN or infinite samples")
        model = self.model
        with model._lock:
            mimi = model.mimi
            mimi.restore(self._mimi_state)
            user = np.array(mimi.encode_step(pcm), dtype=np.int64)  # evaluated here: the codes are needed
            encoded_ns = time.monotonic_ns()
            out = model.lm.step(self._lm_state, user)
            if out is None:  # cannot happen after a prompt (>= 12 frames fill the delayed streams)
                raise RuntimeError("the LM returned no frame: the session was not prompted")
            stepped_ns = time.monotonic_ns()  # lm.step evaluates its tokens before it returns
            text, agent = out
            audio = mimi.decode_step(agent)
            mx.eval(audio)
            self._mimi_state = mimi.snapshot()
        # where the step's time went (monotonic ns): the runner's per-stage statistics read these
        self.last_encoded_ns, self.last_stepped_ns = encoded_ns, stepped_ns
        self.frames += 1
        # numpy has no bfloat16: a GPU codec's output is widened first
        return np.array(audio.astype(mx.float32)), model.tokenizer.piece(text)
