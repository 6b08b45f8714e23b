"""Answering-machine detection on the callee's audio, before the bot speaks; then the beep of "leave a
message after the tone".

Why our own code: Asterisk's AMD() is the reference heuristic of the trade, but it lives inside
Asterisk's C modules; no kept Python library does it. The rules below are the facts of that heuristic
(its parameters, same names and defaults, per campaign), worked on 20 ms frames whose voice/silence is
decided by their mean absolute amplitude (`silence_threshold`, Asterisk's 256 of 32768):

- silence from the answer until `initial_silence_ms`: machine (a machine that waits before its greeting);
- once voice began (at least `min_word_ms` of it in all), the greeting goes on: a voiced run of `min_word_ms`
  after a silence of `between_words_silence_ms` counts a word; `max_words` words, or `greeting_ms` of
  voice in all, or one word longer than `max_word_ms`: machine (people answer short: "hello?");
- after the greeting began, a silence of `after_greeting_silence_ms`: human (a person waits for an
  answer after "hello?");
- nothing decided by `total_analysis_ms`: unknown (the dialer then treats the call as a person's).

The beep: after a machine verdict the detector goes on listening (when asked): a beep is a steady tone,
one frequency in 400-2000 Hz holding most of a frame's energy (a Hann-windowed FFT of each 20 ms frame,
the peak's 3 bins against the whole) for at least `min_beep_ms`; its start is known to the frame (20 ms)
and the verdict becomes `machine_end_beep` when it ends. Speech is never that pure for that long.

Pure: `feed` takes int16 samples at any rate from 8 kHz up, in chunks of any size, and the verdict's
times are in ms of audio fed (from the answer), never a wall clock.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from callbot.campaigns.config import Amd

FRAME_MS = 20
HUMAN = "human"
MACHINE = "machine"
MACHINE_END_BEEP = "machine_end_beep"
UNKNOWN = "unknown"
BEEP_BAND_HZ = (400.0, 2000.0)
TONE_PURITY = 0.75  # share of a frame's energy in the peak's 3 bins for a tone frame
TONE_DRIFT_HZ = 60.0  # a beep's frames keep their frequency within this


@dataclass(frozen=True)
class Verdict:
    kind: str  # human | machine | unknown
    at_ms: float  # audio time when it was decided
    cause: str  # Asterisk's words: INITIALSILENCE, LONGGREETING, MAXWORDS, MAXWORDLENGTH, HUMAN, TOOLONG


@dataclass(frozen=True)
class Beep:
    start_ms: float
    end_ms: float
    hz: float


class AmdDetector:
    """Feed it the callee's audio from the answer on; read `verdict`, then `beep` (with listen_for_beep)."""

    def __init__(self, params: Amd, rate: int, listen_for_beep: bool = False):
        if rate < 8000:
            raise ValueError(f"rate {rate} Hz: 8000 or more")
        self.p = params
        self.rate = rate
        self.listen_for_beep = listen_for_beep
        self.frame = rate * FRAME_MS // 1000
        self._buf = np.zeros(0, np.int16)
        self.t_ms = 0.0  # audio fed and framed so far
        self.verdict: Verdict | None = None
        self.beep: Beep | None = None
        self.beep_done = False  # a beep ended, or beep listening gave up
        # the greeting analysis
        self._silence_ms = 0.0
        self._voice_run_ms = 0.0
        self._voice_ms = 0.0
        self._words = 0
        self._in_word = False
        self._initial = True  # still in the silence before any voice
        self._greeting = False
        # the beep
        self._tone: list[tuple[float, float]] = []  # (frame start ms, Hz) of the current tone run
        self._window = np.hanning(self.frame)
        self._freqs = np.fft.rfftfreq(self.frame, 1.0 / rate)
        self._band = (self._freqs >= BEEP_BAND_HZ[0]) & (self._freqs <= BEEP_BAND_HZ[1])

    @property
    def done(self) -> bool:
        """Nothing more to learn: a verdict, and the beep found or not wanted."""
        return self.verdict is not None and (self.verdict.kind != MACHINE or not self.listen_for_beep
                                             or self.beep_done)

    @property
    def answered_by(self) -> str | None:
        """Twilio's words: human, machine (machine_start), machine_end_beep, unknown."""
        if self.verdict is None:
            return None
        if self.verdict.kind == MACHINE and self.beep is not None and self.beep_done:
            return MACHINE_END_BEEP
        return self.verdict.kind

    def feed(self, samples: np.ndarray) -> None:
        x = np.asarray(samples)
        if x.dtype != np.int16:
            x = np.clip(np.rint(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype(np.int16)
        self._buf = np.concatenate([self._buf, x.reshape(-1)])
        n = len(self._buf) // self.frame
        for i in range(n):
            self._frame(self._buf[i * self.frame:(i + 1) * self.frame])
            self.t_ms += FRAME_MS
        self._buf = self._buf[n * self.frame:]

    def give_up_beep(self) -> None:
        """Stop waiting for a beep (the dialer's beep_wait_ms is over)."""
        self.beep_done = True

    # ---- per frame ---------------------------------------------------------------------------------

    def _frame(self, frame: np.ndarray) -> None:
        if self.verdict is None:
            self._greeting_frame(frame)
        elif self.verdict.kind == MACHINE and self.listen_for_beep and not self.beep_done:
            self._beep_frame(frame)

    def _decide(self, kind: str, cause: str) -> None:
        self.verdict = Verdict(kind, self.t_ms + FRAME_MS, cause)

    def _greeting_frame(self, frame: np.ndarray) -> None:
        p = self.p
        voiced = float(np.mean(np.abs(frame.astype(np.int32)))) >= p.silence_threshold
        if self.listen_for_beep:
            self._beep_frame(frame)  # a beep may come while the greeting is still judged
            if self.verdict is not None:
                return
        if not voiced:
            self._silence_ms += FRAME_MS
            self._voice_run_ms = 0.0
            if self._silence_ms >= p.between_words_silence_ms:
                self._in_word = False
            if self._initial and self._silence_ms >= p.initial_silence_ms:
                return self._decide(MACHINE, "INITIALSILENCE")
            if self._greeting and self._silence_ms >= p.after_greeting_silence_ms:
                return self._decide(HUMAN, "HUMAN")
        else:
            self._voice_run_ms += FRAME_MS
            self._voice_ms += FRAME_MS
            if self._voice_run_ms >= p.min_word_ms and not self._in_word:
                self._words += 1
                self._in_word = True
            if self._voice_ms >= p.min_word_ms:  # Asterisk's rule: voice in all, not in one run
                self._silence_ms = 0.0
                self._initial = False
                self._greeting = True
            if self._voice_run_ms >= p.max_word_ms:
                return self._decide(MACHINE, "MAXWORDLENGTH")
            if self._words >= p.max_words:
                return self._decide(MACHINE, "MAXWORDS")
            if self._greeting and self._voice_ms >= p.greeting_ms:
                return self._decide(MACHINE, "LONGGREETING")
        if self.t_ms + FRAME_MS >= p.total_analysis_ms:
            self._decide(UNKNOWN, "TOOLONG")

    def _beep_frame(self, frame: np.ndarray) -> None:
        hz = self._tone_hz(frame)
        start = self.t_ms
        if hz is not None and (not self._tone or abs(hz - self._tone[-1][1]) <= TONE_DRIFT_HZ):
            self._tone.append((start, hz))
            return
        if self._tone and len(self._tone) * FRAME_MS >= self.p.min_beep_ms:
            self.beep = Beep(self._tone[0][0], start, float(np.median([h for _, h in self._tone])))
            self.beep_done = self.verdict is not None
            if self.verdict is None:  # a beep ends any greeting: it was a machine
                self._decide(MACHINE, "BEEP")
                self.beep_done = True
        self._tone = [(start, hz)] if hz is not None else []

    def _tone_hz(self, frame: np.ndarray) -> float | None:
        x = frame.astype(np.float64)
        if float(np.mean(np.abs(x))) < self.p.silence_threshold:
            return None
        spec = np.abs(np.fft.rfft(x * self._window)) ** 2
        total = float(spec.sum())
        if total <= 0:
            return None
        k = int(np.argmax(spec))
        if not self._band[k]:
            return None
        peak = float(spec[max(k - 1, 0):k + 2].sum())
        if peak / total < TONE_PURITY:
            return None
        return float(self._freqs[k])
