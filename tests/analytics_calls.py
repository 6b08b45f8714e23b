"""Scripted stereo calls for the analytics tests: espeak-ng sentences placed at known times on each leg of a
recording (caller left, bot right), with overlaps and silences where the script puts them.

What a test compares against is the speech actually placed: each clip's own speech spans are measured
first (10 ms frames above -50 dBFS; pauses shorter than the VAD's minimum silence inside a sentence do
not split it), never assumed from the clip's length (espeak-ng pads its clips with silence).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import soxr

from callbot.analytics.result import Segment
from callbot.app.recording import WavStreamWriter
from callbot.speech.tts import EspeakTts

VOICE = "en-us+klatt2"  # the espeak-ng voice pocketsphinx hears best (docs/speech.md)
RATE = 16000
FLOOR_DBFS = -50.0
MIN_SILENCE_MS = 300.0  # the VAD's default min_silence_ms: pauses shorter than this stay inside a segment


@functools.lru_cache(maxsize=None)
def clip(text: str, rate: int = RATE, voice: str = VOICE) -> np.ndarray:
    """The sentence spoken by espeak-ng, int16 at `rate` (read-only, cached)."""
    pcm, r = EspeakTts(voice=voice).synthesize(text)
    out = soxr.resample(pcm.astype(np.float32), r, rate) if r != rate else pcm.astype(np.float32)
    out = np.clip(np.rint(out), -32768, 32767).astype(np.int16)
    out.flags.writeable = False
    return out


def speech_spans(pcm: np.ndarray, rate: int = RATE) -> list[tuple[float, float]]:
    """The clip's own speech in ms from its first sample: 10 ms frames above FLOOR_DBFS, gaps shorter
    than MIN_SILENCE_MS joined."""
    n = rate // 100
    k = len(pcm) // n
    frames = pcm[:k * n].reshape(k, n).astype(np.float64) / 32768.0
    loud = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-12) > FLOOR_DBFS
    spans: list[list[float]] = []
    for i in np.nonzero(loud)[0]:
        t = float(i) * 10.0
        if spans and t - spans[-1][1] < MIN_SILENCE_MS:
            spans[-1][1] = t + 10.0
        else:
            spans.append([t, t + 10.0])
    return [(a, b) for a, b in spans]


@dataclass
class Placed:
    leg: str
    text: str
    start_ms: float   # where the clip's first sample goes
    speech: list[tuple[float, float]]  # its speech, in call time

    @property
    def speech_start(self) -> float:
        return self.speech[0][0]

    @property
    def speech_end(self) -> float:
        return self.speech[-1][1]


@dataclass
class ScriptedCall:
    """Build with `say(leg, text, at_ms=...)` or `after(...)`; `write(path)` makes the stereo WAV."""
    rate: int = RATE
    noise_dbfs: float | None = -70.0  # a faint line noise on both legs (None: digital silence)
    placed: list[Placed] = field(default_factory=list)
    duration_ms: float = 0.0

    def say(self, leg: str, text: str, at_ms: float) -> Placed:
        """Places the sentence so that its speech (not the clip's padding) starts at `at_ms`."""
        pcm = clip(text, self.rate)
        own = speech_spans(pcm, self.rate)
        start = at_ms - own[0][0]
        p = Placed(leg, text, start, [(start + a, start + b) for a, b in own])
        self.placed.append(p)
        self.duration_ms = max(self.duration_ms, start + len(pcm) * 1000.0 / self.rate)
        return p

    def after(self, leg: str, text: str, prev: Placed, gap_ms: float) -> Placed:
        """The sentence's speech starts `gap_ms` after `prev`'s speech ends (negative: it overlaps)."""
        return self.say(leg, text, prev.speech_end + gap_ms)

    def end(self, tail_ms: float) -> None:
        self.duration_ms = max(p.speech_end for p in self.placed) + tail_ms

    def samples(self) -> np.ndarray:
        n = int(round(self.duration_ms * self.rate / 1000.0))
        out = np.zeros((n, 2), np.float64)
        for p in self.placed:
            pcm = clip(p.text, self.rate)
            i = int(round(p.start_ms * self.rate / 1000.0))
            ch = 0 if p.leg == "caller" else 1
            k = min(len(pcm), n - i)
            out[i:i + k, ch] += pcm[:k]
        if self.noise_dbfs is not None:
            rng = np.random.default_rng(7)
            out += rng.standard_normal(out.shape) * 32768.0 * 10 ** (self.noise_dbfs / 20)
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)

    def expected_segments(self) -> list[Segment]:
        segs = [Segment(leg=p.leg, start_ms=a, end_ms=b) for p in self.placed for a, b in p.speech]
        return sorted(segs, key=lambda s: (s.start_ms, s.leg))

    def write(self, path: str | os.PathLike) -> str:
        w = WavStreamWriter(path, self.rate, 2)
        w.write(self.samples())
        w.close()
        return os.fspath(path)


def agent_call(disclosure_at_ms: float = 500.0) -> ScriptedCall:
    """A 25 s support call: the bot's recording disclosure, a question, an answer the caller barges into,
    4 s of dead air, a check-in and a thank-you."""
    c = ScriptedCall()
    greet = c.say("bot", "This call may be recorded for quality.", disclosure_at_ms)
    ask = c.after("caller", "I want to talk to an agent", greet, 600)
    answer = c.after("bot", "Sure, I can help you with that today.", ask, 400)
    barge = c.say("caller", "wait a moment please", answer.speech_start + 1000)
    check = c.after("bot", "Are you still there", max(answer, barge, key=lambda p: p.speech_end), 4000)
    thanks = c.after("caller", "yes thank you", check, 700)
    c.end(1500)
    assert thanks.speech_end < c.duration_ms
    return c


def bot_text_events(call: ScriptedCall, call_id: str = "scripted") -> list[dict]:
    """The BotText events a model would have sent for the bot's sentences: each word's piece at the 80 ms
    frame where it falls, the words spread evenly over the sentence's speech."""
    out = []
    for p in call.placed:
        if p.leg != "bot":
            continue
        parts = p.text.split()
        span = p.speech_end - p.speech_start
        for i, part in enumerate(parts):
            t = p.speech_start + span * i / len(parts)
            out.append({"event": "BotText", "call_id": call_id, "t_ms": round(t // 80 * 80, 1), "piece": " " + part})
    return sorted(out, key=lambda e: e["t_ms"])


def write_call(call: ScriptedCall, folder, name: str = "call", record: dict | None = None,
               events: list[dict] | None = None) -> tuple[str, str, str]:
    """The call as the recorder leaves it: <name>.wav, <name>.json (its record), <name>.events.jsonl."""
    import json

    folder = os.fspath(folder)
    wav = call.write(os.path.join(folder, name + ".wav"))
    rec = {"call_id": name, "recording": {"seconds": call.duration_ms / 1000.0, "complete": True}, **(record or {})}
    side = os.path.join(folder, name + ".json")
    with open(side, "w") as f:
        json.dump(rec, f)
    ev = os.path.join(folder, name + ".events.jsonl")
    with open(ev, "w") as f:
        for e in (events if events is not None else bot_text_events(call, name)):
            f.write(json.dumps(e) + "\n")
    return wav, side, ev


def pocketsphinx_transcriber():
    """The post-call engine the app would pass: callbot.speech's pocketsphinx behind the analytics protocol
    (module-level, so that a pool's spawned worker can build its own)."""
    from callbot.analytics.transcript import StreamTranscriber
    from callbot.speech.recognizer import PocketsphinxRecognizer

    return StreamTranscriber(PocketsphinxRecognizer(), name="pocketsphinx")
