"""Clips the app plays or informs with, turned into what a call's step consumes: the call's rate for
the caller (sample-exact when the clip is already at that rate) and 24 kHz float for the model.

Why here and not on the inference thread's hot path: a clip is converted once, when the app asks
(`control`), with python-soxr's one-shot resampler (high quality; its delay does not matter for a whole
clip); each step then only slices it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import soxr

from callbot.engine.contract import ENGINE_RATE, Inform, Play

_INT16_SCALE = 32768.0


def _resample_int16(pcm: np.ndarray, rate: int, to: int) -> np.ndarray:
    if rate == to:
        return pcm
    out = soxr.resample(pcm.astype(np.float32) / _INT16_SCALE, rate, to, quality="HQ")
    return np.clip(np.rint(out * _INT16_SCALE), -32768, 32767).astype(np.int16)


@dataclass
class Clip:
    """One queued clip: `call` (int16 at the call's rate) for the caller, `model` (float32 24 kHz) for the
    model; `pos` counts the model frames consumed so far."""

    id: str
    call: np.ndarray
    model: np.ndarray
    call_frame: int  # call-rate samples per step (80 ms)
    model_frame: int  # 24 kHz samples per step
    pos: int = 0  # steps consumed

    @classmethod
    def of(cls, op: Play | Inform, call_rate: int, frame_ms: float = 80.0) -> Clip:
        pcm = np.frombuffer(op.pcm, dtype="<i2").astype(np.int16)
        call = _resample_int16(pcm, op.rate, call_rate) if isinstance(op, Play) else np.zeros(0, np.int16)
        model = _resample_int16(pcm, op.rate, ENGINE_RATE).astype(np.float32) / _INT16_SCALE
        return cls(op.id, call, model, round(call_rate * frame_ms / 1000), round(ENGINE_RATE * frame_ms / 1000))

    @property
    def done(self) -> bool:
        return self.pos * self.call_frame >= len(self.call) and self.pos * self.model_frame >= len(self.model)

    @property
    def played_ms(self) -> float:
        return min(self.pos * self.model_frame, len(self.model)) * 1000.0 / ENGINE_RATE

    def next_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """The next step's audio: (call-rate int16 [call_frame], 24 kHz float32 [model_frame]), zero-padded
        past the clip's end."""
        c0, m0 = self.pos * self.call_frame, self.pos * self.model_frame
        self.pos += 1
        return (_padded(self.call[c0:c0 + self.call_frame], self.call_frame),
                _padded(self.model[m0:m0 + self.model_frame], self.model_frame))


def cut_clips(queue: deque, id: str) -> list[Clip]:
    """Removes the clips a StopPlay names from `queue` (id "": every one) and returns them, in order."""
    cut = [c for c in queue if not id or c.id == id]
    for clip in cut:
        queue.remove(clip)
    return cut


def _padded(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
        return x
    out = np.zeros(n, dtype=x.dtype)
    out[:len(x)] = x
    return out
