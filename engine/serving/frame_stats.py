"""Per-frame timestamps of the audio path, one row of `STAGES` per 80 ms frame of a call.

Why a module of its own: the runner writes them in the inference process, and the SIP process reads a
closed call's rows (summaries, Prometheus) without importing MLX.
"""
from __future__ import annotations

import numpy as np

# ring_in: the frame's last sample entered rx (the media callback, in the bridge tick that took it from
# pjmedia's jitter buffer) -> resampled: the up-resampler made that sample at 24 kHz, completing the frame
# (a frame fed as silence: when the watchdog made it) -> released: when the schedule let it go, the
# planned start of its round (so that the round ends just before the tick its audio leaves on; = resampled
# when the round was not held), so resampled -> released is the schedule's wait and released ->
# step_start our own (the wake, the thread's lateness) -> step_start -> encoded (Mimi) -> lm_stepped ->
# decoded (Mimi; the step ends) -> ring_out: resampled down and written to tx -> rtp_out: its first
# sample left tx (the media callback; pjmedia encodes and sends it as RTP in that same bridge tick).
# 0: unknown. The network half before ring_in, pjmedia's jitter buffer, is reported per call by the SIP
# side from pjmedia's own statistics (sip/call.py), not per frame.
STAGES = ("ring_in", "resampled", "released", "step_start", "encoded", "lm_stepped", "decoded", "ring_out",
          "rtp_out")
STATS_FRAMES = 1 << 14  # frames of timestamps kept per call: 22 minutes at 12.5 Hz, then the oldest go


class FrameStats:
    """Per-frame stage timestamps (ns, monotonic) in a preallocated ring: written by the runner thread only."""

    def __init__(self, capacity: int = STATS_FRAMES):
        self.t = np.zeros((capacity, len(STAGES)), dtype=np.int64)
        self.silence = np.zeros(capacity, dtype=bool)  # the frame was fed by the watchdog
        self.count = 0

    @classmethod
    def of(cls, rows: np.ndarray, silence: np.ndarray) -> FrameStats:
        """The stats whose held frames are `rows` and `silence` (what `held()` gave elsewhere: the
        inference process sends a closed call's frames to the SIP process this way)."""
        rows, silence = np.asarray(rows, np.int64), np.asarray(silence, bool)
        if rows.ndim != 2 or rows.shape[1] != len(STAGES) or silence.shape != (len(rows),):
            raise ValueError(f"expected ({len(STAGES)} stages) rows and one silence flag per row, "
                             f"got {rows.shape} and {silence.shape}")
        stats = cls.__new__(cls)
        stats.t, stats.silence, stats.count = rows.copy(), silence.copy(), len(rows)
        return stats

    def row(self, silence: bool = False) -> np.ndarray:
        i = self.count % len(self.t)
        self.silence[i] = silence
        self.t[i] = 0
        self.count += 1
        return self.t[i]

    def fill(self, frame: int, stage: int, ns: int) -> None:
        """Sets stage `stage` of frame number `frame` (the count before its row()), if still held."""
        if self.count - len(self.t) <= frame < self.count:
            self.t[frame % len(self.t), stage] = ns

    def rows(self, first: int, end: int) -> np.ndarray:
        """The rows of frame numbers first..end-1 (a copy), all of which must still be held."""
        if not (self.count - len(self.t) <= first <= end <= self.count):
            raise ValueError(f"frames {first}..{end} are not all held (held: "
                             f"{max(0, self.count - len(self.t))}..{self.count})")
        return self.t[np.arange(first, end) % len(self.t)]

    def held(self) -> tuple[np.ndarray, np.ndarray]:
        """(timestamps, silence flags) of the frames still held, oldest first."""
        n = min(self.count, len(self.t))
        order = np.arange(self.count - n, self.count) % len(self.t)
        return self.t[order], self.silence[order]

    def durations_s(self) -> dict[str, np.ndarray]:
        """Seconds spent in each stage transition, over the frames still held that know both ends
        (a transition no frame knows both ends of is left out)."""
        rows, _ = self.held()
        out = {}
        for i, (a, b) in enumerate(zip(STAGES, STAGES[1:])):
            known = (rows[:, i] != 0) & (rows[:, i + 1] != 0)
            if known.any():
                out[f"{a}->{b}"] = (rows[known, i + 1] - rows[known, i]) / 1e9
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """p50/p99/max in ms per stage transition."""
        result = {}
        for name, d in self.durations_s().items():
            if len(d):
                result[name] = {"p50_ms": float(np.percentile(d, 50) * 1e3), "p99_ms": float(np.percentile(d, 99) * 1e3),
                                "max_ms": float(d.max() * 1e3)}
        return result
