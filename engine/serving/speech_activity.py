"""Who is talking, live, from the energy of each leg: the start/stop events of the caller and the bot.

Why energy and not a neural VAD here: it runs on the inference thread once per 80 ms frame per leg, must
cost microseconds, and only has to say when a leg starts and stops being loud (flows wait for the
caller to finish; the panel shows who speaks). The call store's analytics run a real VAD (silero) on the
recording afterwards, where time is free. The hysteresis is the usual one for telephone speech: a
start needs `start_ms` above the threshold (a click or a breath is not speech), a stop `hangover_ms`
below it (the gaps between words are not the end of a turn).
"""
from __future__ import annotations

import math

import numpy as np

THRESHOLD_DBFS = -40.0  # RMS of a frame, dB re full scale: quiet speech on a phone line is ~ -35 dBFS
START_MS = 160.0  # two 80 ms frames
HANGOVER_MS = 480.0  # six 80 ms frames: a pause between sentences, not between words


def frame_dbfs(pcm: np.ndarray) -> float:
    """RMS level of a frame in dBFS (float samples in [-1, 1], or int16); -inf for digital silence."""
    x = np.asarray(pcm, dtype=np.float32)
    if pcm.dtype == np.int16:
        x = x / 32768.0
    if x.size == 0:
        return -math.inf
    ms = float(np.dot(x, x)) / x.size
    return 10.0 * math.log10(ms) if ms > 0 else -math.inf


class SpeechActivity:
    """Feeds on one leg's frames; `update` returns True/False when the leg starts/stops talking, else None."""

    def __init__(self, frame_ms: float, threshold_dbfs: float = THRESHOLD_DBFS, start_ms: float = START_MS,
                 hangover_ms: float = HANGOVER_MS):
        if not frame_ms > 0:
            raise ValueError(f"frame_ms must be > 0, got {frame_ms!r}")
        self.threshold_dbfs = threshold_dbfs
        self._start_frames = max(1, math.ceil(start_ms / frame_ms))
        self._stop_frames = max(1, math.ceil(hangover_ms / frame_ms))
        self.speaking = False
        self._run = 0  # frames in a row on the other side of the threshold

    def update(self, pcm: np.ndarray) -> bool | None:
        loud = frame_dbfs(pcm) >= self.threshold_dbfs
        if loud != self.speaking:
            self._run += 1
            if self._run >= (self._start_frames if loud else self._stop_frames):
                self.speaking, self._run = loud, 0
                return loud
        else:
            self._run = 0
        return None
