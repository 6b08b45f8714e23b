"""The prompt that turns the bare model into a persona with a voice, built and run as NVIDIA's `LMGen` does.

PersonaPlex learned to take its voice and its role from a prefix of the conversation, in this order:
1. the voice: either a saved `.pt` prompt, whose per-frame input embeddings are replayed and whose
   token ring is then put back, or a recording's Mimi codes forced into the agent's audio stream with
   the text stream held at PAD and the user's stream fed a 440 Hz tone;
2. 6 spacer frames (0.5 s): agent audio = silence codes, text = PAD, user = the tone;
3. the persona text `<system> ... <system>`, one SentencePiece token per frame forced into the text stream
   (agent audio = silence codes, user = the tone);
4. 6 spacer frames again.
The tone and the silence are fixed codes: NVIDIA's measured constants for the released Mimi (2048 bins,
8 codebooks); a codec of another size (the tests' tiny one) gets its own by encoding a zero frame and a
tone frame. A prompt is data (`PromptPlan`) first and is run second, so its layout is testable alone.
Steps 3-4 (`plan_persona`) are also what a live persona change forces (`Session.set_persona`).

Checked once against NVIDIA's own `LMGen` (personaplex repo code, imported from a checkout; not
installable, so not a CI test) on the tiny model's weights, greedy, fillers set to the tiny codec's:
after `step_system_prompts` with a saved voice, with a recording's codes, and with the `.pt` NVIDIA
saved from that recording (read by `ptfile`), the stream ring and offset are equal and the next 60
frames (text + 8 agent codes) are identical, text logits within 1.3e-6.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np

from callbot.engine.model.lm import LM, LmState
from callbot.engine.model.mimi import Mimi, MimiState
from callbot.engine.model.tokenizer import PAD_ID, TextTokenizer, wrap_with_system_tags
from callbot.engine.model.voices import VoiceEmbeddings, VoiceRecording

__all__ = ["SILENCE_TOKENS", "SINE_TOKENS", "SPACER_FRAMES", "FillerCodes", "PromptFrame", "PromptPlan",
           "filler_codes", "sine_frame", "voice_codes", "persona_tokens", "plan_persona", "plan_prompt", "run_prompt"]

# NVIDIA's codes of a silent frame and of a tone frame under the released Mimi (personaplex lm.py)
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SPACER_FRAMES = 6  # int(0.5 s * 12.5 Hz)
SINE_HZ = 440.0
SINE_AMPLITUDE = 0.5
# frames of tone fed to a fresh codec before its tone codes are read, so the encoder's history is tone
_FILLER_WARMUP_FRAMES = 4


def sine_frame(frame_size: int = 1920, sample_rate: int = 24000) -> np.ndarray:
    """One frame of the user-side tone (float32): each frame starts at phase 0, as NVIDIA's does."""
    t = np.arange(frame_size, dtype=np.float64) / sample_rate
    return (SINE_AMPLITUDE * np.sin(2.0 * np.pi * SINE_HZ * t)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FillerCodes:
    """The codes that stand for "nobody talks" on the agent side and "a tone" on the user side."""

    silence: np.ndarray  # int64 [codebooks]
    sine: np.ndarray  # int64 [codebooks]


def filler_codes(mimi: Mimi) -> FillerCodes:
    """NVIDIA's constants for the released codec; codes measured with `mimi` (fresh streams of its own)
    for any other size."""
    cfg = mimi.cfg
    if cfg.num_codebooks == len(SILENCE_TOKENS) and cfg.quantizer_bins == 2048:
        return FillerCodes(np.array(SILENCE_TOKENS, np.int64), np.array(SINE_TOKENS, np.int64))
    found = []
    for frame in (np.zeros(mimi.frame_size, np.float32), sine_frame(mimi.frame_size, mimi.sample_rate)):
        state = MimiState()
        for _ in range(_FILLER_WARMUP_FRAMES):
            codes, state = mimi.encode_step(frame, state)
        found.append(np.array(codes, dtype=np.int64))
    return FillerCodes(silence=found[0], sine=found[1])


def voice_codes(mimi: Mimi, recording: VoiceRecording, between=None) -> np.ndarray:
    """The recording's codes, int64 [frames, codebooks], from a fresh codec stream of its own (the last
    frame zero-padded); live sessions on the same codec keep stepping meanwhile. `between()`, if given,
    is called before each frame (a runner serves its calls there: run_prompt)."""
    pcm = np.asarray(recording.pcm, dtype=np.float32)
    n = mimi.frame_size
    frames = -(-len(pcm) // n)
    if frames == 0:
        raise ValueError(f"voice {recording.name}: the recording is empty")
    padded = np.zeros(frames * n, np.float32)
    padded[: len(pcm)] = pcm
    state = MimiState()
    out = []
    for i in range(frames):
        if between is not None:
            between()
        codes, state = mimi.encode_step(padded[i * n:(i + 1) * n], state)
        out.append(np.array(codes, dtype=np.int64))
    return np.stack(out)


def persona_tokens(tokenizer: TextTokenizer, persona: str) -> list[int]:
    """The text prompt's ids: `<system> {persona} <system>`, or none for an empty persona (as NVIDIA)."""
    if not isinstance(persona, str):
        raise ValueError(f"persona must be a string, got {type(persona).__name__}")
    if not persona:  # NVIDIA's test is the length: a blank persona still gets its (empty) tags
        return []
    return tokenizer.encode(wrap_with_system_tags(persona))


@dataclasses.dataclass(frozen=True)
class PromptFrame:
    """One frame of the prompt: what is forced into each stream (or the embedding replayed instead)."""

    phase: str  # "voice", "spacer" or "persona"
    text: int
    agent: np.ndarray | None  # forced agent codes; None on a replayed frame
    user: np.ndarray | None  # the user's codes; None on a replayed frame
    embedding: np.ndarray | None = None  # a saved voice prompt's input embedding [dim]


@dataclasses.dataclass(frozen=True)
class PromptPlan:
    """The prompt as data: its frames, and for a saved voice the token ring restored after its replay."""

    frames: tuple[PromptFrame, ...]
    stream_tokens: np.ndarray | None = None

    def phases(self) -> list[tuple[str, int]]:
        """(phase, frames) runs, e.g. [("voice", 120), ("spacer", 6), ("persona", 40), ("spacer", 6)]."""
        runs: list[tuple[str, int]] = []
        for f in self.frames:
            if runs and runs[-1][0] == f.phase:
                runs[-1] = (f.phase, runs[-1][1] + 1)
            else:
                runs.append((f.phase, 1))
        return runs


def _spacer(filler: FillerCodes, pad_id: int) -> tuple[PromptFrame, ...]:
    return tuple(PromptFrame("spacer", pad_id, filler.silence, filler.sine) for _ in range(SPACER_FRAMES))


def plan_persona(persona_ids: list[int], filler: FillerCodes, pad_id: int = PAD_ID) -> PromptPlan:
    """The persona's tokens and the spacer after them: the prompt's tail, and all that a persona change
    in a live call (`Session.set_persona`) forces."""
    persona = tuple(PromptFrame("persona", int(t), filler.silence, filler.sine) for t in persona_ids)
    return PromptPlan(persona + _spacer(filler, pad_id))


def plan_prompt(voice: VoiceEmbeddings | np.ndarray, persona_ids: list[int], filler: FillerCodes,
                pad_id: int = PAD_ID) -> PromptPlan:
    """The full prompt: `voice` is a saved prompt or a recording's codes [frames, codebooks]."""
    if isinstance(voice, VoiceEmbeddings):
        voice_frames = tuple(PromptFrame("voice", pad_id, None, None, e) for e in voice.embeddings)
        stream_tokens = voice.cache
    else:
        codes = np.asarray(voice)
        if codes.ndim != 2 or codes.shape[1] != filler.silence.shape[0] or codes.shape[0] == 0:
            raise ValueError(f"voice codes must be [frames, {filler.silence.shape[0]}], got {codes.shape}")
        voice_frames = tuple(PromptFrame("voice", pad_id, c, filler.sine) for c in codes.astype(np.int64))
        stream_tokens = None
    return PromptPlan(voice_frames + _spacer(filler, pad_id) + plan_persona(persona_ids, filler, pad_id).frames,
                      stream_tokens)


def check_plan(lm: LM, plan: PromptPlan, voice_name: str, context: int | None = None) -> None:
    """ValueError when the prompt does not fit this model (a voice made for another size, ids out of range)
    or its context (`context` frames, default the model's)."""
    cfg = lm.cfg
    for f in plan.frames:
        if f.embedding is not None and f.embedding.shape != (cfg.dim,):
            raise ValueError(f"voice {voice_name}: its embeddings have {f.embedding.shape[-1]} values per frame, "
                             f"this model takes {cfg.dim}: the voice was made for another model")
        if not 0 <= f.text < cfg.text_card:
            raise ValueError(f"prompt text id {f.text} is outside this model's vocabulary (< {cfg.text_card}): "
                             "the tokenizer does not match the model")
    ring = (cfg.num_streams, cfg.max_delay + 3)
    if plan.stream_tokens is not None:
        t = plan.stream_tokens
        if t.shape != ring:
            raise ValueError(f"voice {voice_name}: its token cache is {t.shape}, this model keeps {ring}: "
                             "the voice was made for another model")
        # -2 marks a slot NVIDIA's ring had not written yet; anything else must be a token of its stream
        if t.min() < -2 or t[0].max() > cfg.text_card or t[1:].max() > cfg.card:
            raise ValueError(f"voice {voice_name}: its token cache holds ids outside this model's vocabularies")
    window = cfg.context if context is None else context
    if len(plan.frames) > window:
        whose = "the model's" if context is None or context == cfg.context else "the"
        raise ValueError(f"the prompt is {len(plan.frames)} frames, longer than {whose} context of "
                         f"{window} frames: its start would be forgotten (shorten the voice or persona"
                         f"{'' if context is None else ', or raise the context'})")


def run_prompt(lm: LM, state: LmState, plan: PromptPlan, between=None) -> None:
    """Feed the whole prompt into `state` (which should be fresh) and evaluate its caches.

    `state` is the only thing written: live sessions on the same `lm` keep stepping meanwhile.
    `between()`, if given, is called before each frame (each frame is evaluated as it is stepped): a
    runner preparing a bot on its own inference thread steps its calls' due rounds there
    (engine/serving/runner.py), so that the prompt never holds a call's frame for more than one step."""
    replayed = False
    for f in plan.frames:
        if between is not None:
            between()
        if f.embedding is not None:
            lm.step_embedding(state, f.embedding)
            replayed = True
            continue
        if replayed and plan.stream_tokens is not None:
            # NVIDIA puts the saved token ring back once the embeddings are replayed
            state.set_stream_tokens(plan.stream_tokens)
            replayed = False
        lm.step(state, f.user, agent_codes=f.agent, text_token=f.text)
    # Leave nothing lazy for the first live step: an unevaluated prompt would stall it for seconds.
    mx.eval(state.arrays())
