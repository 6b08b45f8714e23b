"""Scripted callee audio for the campaign tests and bench/bench_amd.py: what a person or an answering
machine sends after answering, built from espeak-ng speech and a synthetic beep placed at known sample
positions, so that the truth (who answered, where the beep starts) is known exactly.

Imported as `from tests.campaign_calls import ...`; writes WAVs for pjsua2 peers to play.
"""
from __future__ import annotations

import functools
import os
import wave
from dataclasses import dataclass

import numpy as np
import soxr

from callbot.speech.tts import EspeakTts

RATE = 16000
MACHINE_GREETINGS = (
    "Hi, you've reached Alex. I can't take your call right now. Please leave a message after the tone.",
    "Hello, this is the voicemail of Jordan Smith. Leave your name and number and I will call you back.",
    "You have reached the office of Doctor Lee. We are closed. Please leave a message after the beep.",
    "The person you are calling is not available. At the tone, please record your message.",
    "Hey, it's Sam, sorry I missed you. Leave a message.",
)
HUMAN_ANSWERS = ("hello?", "hello", "yes?", "hi, who is this?", "speaking", "hello, yes?")
VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3")


@functools.lru_cache(maxsize=None)
def speech(text: str, voice: str = "en-us", speed_wpm: int = 165, rate: int = RATE) -> np.ndarray:
    """espeak-ng's clip, trimmed of its leading and trailing silence, int16 at `rate` (read-only)."""
    pcm, r = EspeakTts(voice=voice, speed_wpm=speed_wpm).synthesize(text)
    out = soxr.resample(pcm.astype(np.float32), r, rate) if r != rate else pcm.astype(np.float32)
    out = np.clip(np.rint(out), -32768, 32767).astype(np.int16)
    loud = np.nonzero(np.abs(out.astype(np.int32)) > 300)[0]
    out = out[loud[0]:loud[-1] + 1] if len(loud) else out
    out.flags.writeable = False
    return out


def tone(hz: float, ms: float, rate: int = RATE, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(rate * ms / 1000)) / rate
    return np.rint(level * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def silence(ms: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(rate * ms / 1000), np.int16)


@dataclass
class Callee:
    """Audio a callee sends from the answer on, and the truth about it."""

    label: str  # "human" | "machine"
    samples: np.ndarray
    beep_ms: float | None = None  # where the beep starts (machines with one)
    beep_end_ms: float | None = None
    greeting_ms: float = 0.0  # length of its speech

    def write(self, path: str | os.PathLike, rate: int = RATE) -> str:
        with wave.open(os.fspath(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(self.samples.astype("<i2").tobytes())
        return os.fspath(path)


def machine(text: str = MACHINE_GREETINGS[0], voice: str = "en-us", speed_wpm: int = 165, lead_ms: float = 300,
            gap_ms: float = 500, beep_hz: float = 1000, beep_len_ms: float = 500, tail_ms: float = 4000,
            rate: int = RATE) -> Callee:
    """An answering machine: `lead_ms` of silence, the greeting, `gap_ms`, a beep, silence."""
    words = speech(text, voice, speed_wpm, rate)
    head = np.concatenate([silence(lead_ms, rate), words, silence(gap_ms, rate)])
    beep_ms = len(head) * 1000 / rate
    samples = np.concatenate([head, tone(beep_hz, beep_len_ms, rate), silence(tail_ms, rate)])
    return Callee("machine", samples, beep_ms, beep_ms + beep_len_ms, len(words) * 1000 / rate)


def human(text: str = "hello?", voice: str = "en-us", speed_wpm: int = 165, lead_ms: float = 400,
          tail_ms: float = 4000, rate: int = RATE) -> Callee:
    """A person: a short answer after `lead_ms`, then waiting in silence."""
    words = speech(text, voice, speed_wpm, rate)
    samples = np.concatenate([silence(lead_ms, rate), words, silence(tail_ms, rate)])
    return Callee("human", samples, greeting_ms=len(words) * 1000 / rate)


def labelled_set() -> list[Callee]:
    """The labelled set of bench/bench_amd.py and the accuracy test: machines and people over voices,
    speeds and greeting lengths (deterministic)."""
    calls: list[Callee] = []
    for i, text in enumerate(MACHINE_GREETINGS):
        for j, voice in enumerate(VOICES[:3]):
            calls.append(machine(text, voice, speed_wpm=(150, 175, 200)[(i + j) % 3], lead_ms=200 + 150 * j,
                                 beep_hz=(800, 1000, 1400)[(i + j) % 3]))
    for i, text in enumerate(HUMAN_ANSWERS):
        for j, voice in enumerate(VOICES[:2] + VOICES[3:]):
            calls.append(human(text, voice, speed_wpm=(150, 175, 200)[(i + j) % 3], lead_ms=250 + 200 * j))
    return calls
