"""Thin binding of ext/resampler.c: one polyphase FIR stream, one entry point per dtype. Rates, dtypes
and shapes are validated by callbot.engine.audio.resampler; the GIL is released around all C work."""
from typing import Self

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

ERR_OUT_TOO_SMALL: str
ERR_ARRAY: str

ERR_LENGTHS: str

def f32_to_s16(x: npt.NDArray[np.float32], scale: float, out: npt.NDArray[np.int16]) -> None:
    """out[i] = x[i] * scale, rounded to nearest (ties to even) and saturated to int16; NaN -> 0."""
def s16_to_f32(x: npt.NDArray[np.int16], scale: float, out: npt.NDArray[np.float32]) -> None:
    """out[i] = x[i] * scale."""

@disjoint_base
class PolyphaseFir:
    """Streaming resampler by up/down with the low-pass prototype `taps` (at input rate * up)."""

    @property
    def up(self) -> int: ...
    @property
    def down(self) -> int: ...
    def __new__(cls, taps: npt.NDArray[np.float32], up: int, down: int, delay: int) -> Self: ...
    def output_count(self, n: int) -> int:
        """Samples the next process call with n input samples writes."""
    def flush_count(self) -> int:
        """Samples the next flush writes."""
    def process_f32(self, x: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> int:
        """Resamples float32 x into out; returns how many samples were written."""
    def process_s16(self, x: npt.NDArray[np.int16], out: npt.NDArray[np.int16]) -> int:
        """Resamples int16 x into out; returns how many samples were written."""
    def flush_f32(self, out: npt.NDArray[np.float32]) -> int:
        """Writes what the delay holds (float32) into out, then resets; returns how many samples."""
    def flush_s16(self, out: npt.NDArray[np.int16]) -> int:
        """Writes what the delay holds (int16) into out, then resets; returns how many samples."""
    def reset(self) -> None:
        """Forgets all input."""
