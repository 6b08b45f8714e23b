"""When a new persona is taken during a call, and what each 80 ms step forces meanwhile (`Session.set_persona`).

A persona is a system prompt the model reads as text tokens forced into its text stream, which it can only
take while it is silent: tokens forced over its own words garble them. So a change waits for the end of
the agent's utterance, as NVIDIA/personaplex PR #69 does: from the next step on the caller's audio is no
longer fed (the user stream gets the prompt's 440 Hz tone codes), the agent may finish (until it samples
2 PAD text tokens in a row, at most `MAX_PERSONA_WAIT` steps of its own talking), then the persona's
`<system> ... <system>` tokens run one per step exactly as in the prompt (agent = silence codes, user =
tone), then the prompt's 0.5 s spacer, then the caller is heard again. Every phase is one frame per step,
so the runner keeps its 80 ms cadence throughout.

A frame the app plays to the caller (`Session.step(agent_pcm=...)`) is the agent speaking: it neither
ends the wait (its PAD is forced, not the model's) nor counts toward the limit, so a clip that is playing
finishes first. A clip cannot start while the persona's tokens or spacer run (ValueError): the runner
holds it back until `phase` is None.

A second `set_persona` while one is pending replaces the pending text if its tokens have not started
(phase "waiting"); once they have, it is queued (replacing an earlier queued one) and its tokens follow
right after the current spacer, without a wait: the agent has just been held silent.

This module is the schedule only (no MLX): the session asks it what each step forces and tells it what
the model sampled. It has its own small lock, so `set_persona` may come from another thread than `step`.
"""

from __future__ import annotations

import dataclasses
import threading

from callbot.engine.model.prompt import PromptFrame, PromptPlan

__all__ = ["MAX_PERSONA_WAIT", "PAUSE_PADS", "PersonaSwap", "PersonaSwapSchedule", "StepForcing"]

MAX_PERSONA_WAIT = 48  # steps (3.84 s) of the agent's own talking before a pending persona interrupts it
PAUSE_PADS = 2  # PAD text tokens sampled in a row that end the agent's utterance


@dataclasses.dataclass(frozen=True)
class PersonaSwap:
    """One completed persona change and what it cost the caller (in 80 ms steps)."""

    persona: str
    requested_at: int  # the session's frame count when set_persona was called
    waited: int  # steps the agent was let finish its utterance (the caller unheard)
    boundary: str  # "pause" (2 PADs in a row), "limit" (MAX_PERSONA_WAIT steps) or "chained" (queued)
    prompt_frames: int  # the persona's tokens + the spacer, forced one per step

    @property
    def caller_steps(self) -> int:
        """Steps the caller's audio was not fed to the model for this change."""
        return self.waited + self.prompt_frames


@dataclasses.dataclass(frozen=True)
class StepForcing:
    """What one step does: feed the tone instead of the caller (`mute_caller`) and, on the persona's
    frames, force `frame` (text token, agent silence, user tone)."""

    phase: str | None  # None (no change pending), "waiting", "persona" or "spacer"
    mute_caller: bool
    frame: PromptFrame | None


_LIVE = StepForcing(None, False, None)
_WAIT = StepForcing("waiting", True, None)


@dataclasses.dataclass
class _Pending:
    persona: str
    plan: PromptPlan
    requested_at: int
    waited: int = 0
    talked: int = 0  # waiting steps the model spoke itself (not a played frame): bounded by MAX_PERSONA_WAIT
    boundary: str = ""
    done: int = 0  # frames of `plan` forced so far


class PersonaSwapSchedule:
    """The state machine of persona changes for one session: `request` from set_persona, `next_step`
    before each step, `finished_step` after it."""

    def __init__(self, pad_id: int, max_wait: int = MAX_PERSONA_WAIT):
        self._pad_id = pad_id
        self._max_wait = max_wait
        self._lock = threading.Lock()  # request() may come from a control thread; held for bookkeeping only
        self._current: _Pending | None = None
        self._queued: _Pending | None = None
        self._pads = 0  # PAD text tokens the model sampled in a row, up to the last step
        self._swaps: list[PersonaSwap] = []

    def reset(self) -> None:
        with self._lock:
            self._current = self._queued = None
            self._pads = 0
            self._swaps = []

    @property
    def phase(self) -> str | None:
        """None, or the phase of the change in progress: "waiting" (the agent finishes; the caller is
        not heard) until the step that forces the persona's first token, then "persona", then "spacer"."""
        with self._lock:
            return self._phase(self._current)

    @property
    def swaps(self) -> tuple[PersonaSwap, ...]:
        """The completed changes, oldest first."""
        with self._lock:
            return tuple(self._swaps)

    def request(self, persona: str, plan: PromptPlan, frame: int) -> None:
        """Take `persona` (its `plan_persona` frames) at the next utterance boundary."""
        with self._lock:
            current = self._current
            if current is None:
                self._current = _Pending(persona, plan, frame)
            elif current.done == 0 and not current.boundary:  # its tokens have not started: replace them
                current.persona, current.plan = persona, plan
            else:
                self._queued = _Pending(persona, plan, frame, boundary="chained")

    def next_step(self, played: bool) -> StepForcing:
        """What the coming step forces. `played`: the step carries a frame played to the caller.
        Raises ValueError (and changes nothing) for a played frame while the persona's frames run."""
        with self._lock:
            current = self._current
            if current is None:
                return _LIVE
            if not current.boundary:
                if played:
                    return _WAIT  # the agent is speaking the clip: it finishes first
                if self._pads >= PAUSE_PADS:
                    current.boundary = "pause"
                elif current.talked >= self._max_wait:
                    current.boundary = "limit"
                else:
                    return _WAIT
            if played:
                raise ValueError(f"a played frame cannot be forced while a persona's frames run (phase "
                                 f"{self._phase(current)!r}): hold the clip until the change is done")
            frame = current.plan.frames[current.done]
            return StepForcing(frame.phase, True, frame)

    def finished_step(self, forcing: StepForcing, played: bool, sampled_text: int | None) -> None:
        """After the step: `sampled_text` is the text token the model sampled (None when it was forced)."""
        with self._lock:
            self._pads = self._pads + 1 if sampled_text == self._pad_id else 0
            current = self._current
            if forcing.phase is None or current is None:
                return
            if forcing.frame is None:
                current.waited += 1
                current.talked += 0 if played else 1
                return
            current.done += 1
            if current.done == len(current.plan.frames):
                self._swaps.append(PersonaSwap(current.persona, current.requested_at, current.waited,
                                               current.boundary, len(current.plan.frames)))
                self._current, self._queued = self._queued, None

    def persona(self, default: str) -> str:
        """The persona of the last completed change, else `default` (the prompt's)."""
        with self._lock:
            return self._swaps[-1].persona if self._swaps else default

    @staticmethod
    def _phase(current: _Pending | None) -> str | None:
        if current is None:
            return None
        if not current.boundary:
            return "waiting"
        return current.plan.frames[current.done].phase
