"""The call's words per leg, with times: the bot's from the model's own text stream, the caller's from the
live recognizer or from a post-call engine, and the turns they make.

Bot: the events file's `BotText` events (engine/contract.py): one text piece per 80 ms model frame at
`t_ms` (ms since the call's first frame, which is the recording's first sample to within a frame); a
piece that begins with a space begins a word (SentencePiece's "▁"), the others continue the word before.
A word runs from its first piece's frame to the end of its last piece's frame (+80 ms). Without such
events (a crash before the file was written), the record's `engine.text` (the summary's pieces) is used.

Caller, live: the final `CallerWords` events (the live recognizer's utterances, times since the caller
stream's first sample = the recording's), or the record's `caller_text`. They carry an utterance's text
and its start and end, not each word's: the utterance is moved onto the caller's VAD segments it
overlaps (the endpointer reports its edges ~0.3 s late) and the words are spread over it by their
length in letters (an estimate; a post-call engine gives real word times).

Caller, post-call: any `Transcriber` (`transcribe(int16 mono, rate) -> [TimedWord]`). `StreamTranscriber`
wraps a streaming recognizer with `open_stream(rate)` -> `feed(pcm)` / `finish()` returning hypotheses
with words (callbot.speech's pocketsphinx and Vosk recognizers; the app passes one, since analytics does
not import callbot.speech). `WhisperTranscriber` runs faster-whisper with a model folder the user
supplies (imported only when built; a missing package or model is one line).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Protocol, Sequence, TypeVar

import msgspec
import numpy as np

from callbot.analytics.result import Leg, Segment, Turn, Word
from callbot.engine.contract import BotSpeech, BotText, CallerSpeech, CallerWords, FlowTransition

E = TypeVar("E", bound=msgspec.Struct)
FRAME_MS = 80.0  # the model's text frame
TURN_GAP_MS = 1500.0  # a silence this long inside one leg's words starts a new turn


class TranscriptError(Exception):
    """A transcriber cannot be built or run; the text is the one line to show."""


class TimedWord(msgspec.Struct, frozen=True):
    text: str
    start_ms: float
    end_ms: float


class Transcriber(Protocol):
    name: str

    def transcribe(self, pcm: np.ndarray, rate: int) -> list[TimedWord]:
        """Words with times (ms from the first sample) of int16 mono audio at `rate`."""
        ...


# ---- the events file ------------------------------------------------------------------------------------


def read_events(path: str | os.PathLike) -> tuple[list[dict], int]:
    """The events file's lines as dicts, and how many lines were not JSON objects (a crash can cut the
    last one short; they are skipped, never fatal)."""
    events: list[dict] = []
    bad = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(value, dict):
                events.append(value)
            else:
                bad += 1
    return events, bad


def typed_events(events: Sequence[dict], cls: type[E]) -> list[E]:
    """The events file's lines of one contract type (engine/contract.py), decoded and checked by msgspec
    (`event` names the type; `ts` is the log's own): a line whose fields do not fit is skipped."""
    out: list[E] = []
    for e in events:
        if e.get("event") != cls.__name__:
            continue
        try:
            out.append(msgspec.convert({k: v for k, v in e.items() if k not in ("event", "ts")}, type=cls))
        except msgspec.ValidationError:
            continue
    return out


def speech_event_segments(events: Sequence[dict], duration_ms: float) -> list[Segment]:
    """Segments from the engine's live BotSpeech/CallerSpeech events (energy with hysteresis, reported
    late: a start ~160 ms, a stop ~480 ms after the sound): coarse, for a call whose recording is lost."""
    out: list[Segment] = []
    for cls, leg in ((CallerSpeech, "caller"), (BotSpeech, "bot")):
        since: float | None = None
        for e in sorted(typed_events(events, cls), key=lambda e: e.t_ms):
            if e.speaking and since is None:
                since = e.t_ms
            elif not e.speaking and since is not None:
                out.append(Segment(leg=leg, start_ms=round(since, 1), end_ms=round(e.t_ms, 1)))
                since = None
        if since is not None and duration_ms > since:
            out.append(Segment(leg=leg, start_ms=round(since, 1), end_ms=round(duration_ms, 1)))
    return sorted(out, key=lambda s: (s.start_ms, s.leg))


def flow_transitions(events: Sequence[dict]) -> list[FlowTransition]:
    return typed_events(events, FlowTransition)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def bot_words(pieces: Iterable[tuple[float, str]]) -> list[Word]:
    """The bot's words from (t_ms, piece) in frame order (see the module's docstring)."""
    words: list[list] = []  # [start, end, text]
    joins = False  # the next piece continues the last word (no space between them)
    for t, piece in sorted(pieces, key=lambda p: p[0]):
        parts = piece.split()
        if not parts:
            joins = False
            continue
        for k, part in enumerate(parts):
            if k == 0 and joins and not piece[0].isspace():
                words[-1][1] = t + FRAME_MS
                words[-1][2] += part
            else:
                words.append([t, t + FRAME_MS, part])
        joins = not piece[-1].isspace()
    return [Word(leg="bot", start_ms=round(a, 1), end_ms=round(b, 1), text=text) for a, b, text in words]


def bot_pieces(events: Sequence[dict], record: dict | None = None) -> list[tuple[float, str]]:
    pieces = [(e.t_ms, e.piece) for e in typed_events(events, BotText)]
    if pieces or not record:
        return pieces
    text = (record.get("engine") or {}).get("text") or []
    return [(t, p["piece"]) for p in text if isinstance(p, dict) and (t := _num(p.get("t_ms"))) is not None
            and isinstance(p.get("piece"), str)]


def spread_words(text: str, start_ms: float, end_ms: float, leg: Leg) -> list[Word]:
    """An utterance's words with times spread over it by their length in letters."""
    parts = text.split()
    if not parts:
        return []
    span = max(0.0, end_ms - start_ms)
    weights = np.array([len(p) + 1 for p in parts], np.float64)
    edges = start_ms + span * np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum()
    return [Word(leg=leg, start_ms=round(float(edges[i]), 1), end_ms=round(float(edges[i + 1]), 1), text=p)
            for i, p in enumerate(parts)]


def caller_utterances(events: Sequence[dict], record: dict | None = None) -> list[tuple[float, float, str]]:
    """(start_ms, end_ms, text) of the live recognizer's final utterances; from the record without events."""
    out = [(e.start_ms, e.end_ms, e.text) for e in typed_events(events, CallerWords) if e.final]
    if not out and record:
        for u in record.get("caller_text") or []:
            if isinstance(u, dict) and isinstance(u.get("text"), str):
                a, b = _num(u.get("start_ms")), _num(u.get("end_ms"))
                if a is not None and b is not None:
                    out.append((a, b, u["text"]))
    return sorted(set(out))


ALIGN_SLACK_MS = 400.0  # how far the live recognizer's utterance edges may lie from the caller's speech


def align_utterance(start_ms: float, end_ms: float, speech: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """An utterance's span moved onto the caller's speech segments (the VAD's, sorted) it overlaps within
    ALIGN_SLACK_MS: the live recognizer's endpointer reports utterances ~0.3 s late at each edge and its
    words carry no times of their own, so the VAD's edges are the better estimate. Unchanged without any."""
    hits = [(a, b) for a, b in speech if a < end_ms + ALIGN_SLACK_MS and b > start_ms - ALIGN_SLACK_MS]
    if not hits:
        return start_ms, end_ms
    return hits[0][0], hits[-1][1]


def live_caller_words(events: Sequence[dict], record: dict | None = None,
                      speech: Sequence[tuple[float, float]] = ()) -> list[Word]:
    """The live recognizer's words, spread over each utterance (aligned to `speech`, the caller's segments,
    when given)."""
    out = []
    for a, b, text in caller_utterances(events, record):
        a, b = align_utterance(a, b, speech) if speech else (a, b)
        out += spread_words(text, a, b, "caller")
    return out


def transcribe_leg(transcriber: Transcriber, pcm: np.ndarray, rate: int, leg: Leg) -> list[Word]:
    return [Word(leg=leg, start_ms=round(float(w.start_ms), 1), end_ms=round(float(w.end_ms), 1), text=w.text)
            for w in transcriber.transcribe(np.ascontiguousarray(pcm, np.int16), rate) if w.text.strip()]


def build_turns(words: Sequence[Word], gap_ms: float = TURN_GAP_MS) -> list[Turn]:
    """Runs of one leg's words in time order: a word of the other leg, or a silence over `gap_ms`, ends a
    turn. Sentiment is filled in later (analytics/sentiment.py)."""
    turns: list[Turn] = []
    run: list[Word] = []

    def close() -> None:
        if run:
            turns.append(Turn(leg=run[0].leg, start_ms=run[0].start_ms, end_ms=max(w.end_ms for w in run),
                              text=" ".join(w.text for w in run)))
            run.clear()

    for w in sorted(words, key=lambda w: (w.start_ms, w.leg)):
        if run and (w.leg != run[0].leg or w.start_ms - max(x.end_ms for x in run) > gap_ms):
            close()
        run.append(w)
    close()
    return turns


# ---- post-call engines ----------------------------------------------------------------------------------


class StreamTranscriber:
    """A streaming recognizer (`open_stream(rate)` -> `feed(pcm)`, `finish()` -> hypotheses with `final`
    and `words`) run over a whole leg: callbot.speech's PocketsphinxRecognizer or VoskRecognizer."""

    def __init__(self, recognizer: Any, name: str = "pocketsphinx", chunk_ms: int = 100):
        if not hasattr(recognizer, "open_stream"):
            raise TranscriptError(f"{type(recognizer).__name__} is no streaming recognizer (no open_stream)")
        self.recognizer = recognizer
        self.name = name
        self.chunk_ms = chunk_ms

    def transcribe(self, pcm: np.ndarray, rate: int) -> list[TimedWord]:
        stream = self.recognizer.open_stream(rate)
        n = max(1, rate * self.chunk_ms // 1000)
        hyps = []
        for i in range(0, len(pcm), n):
            hyps += stream.feed(pcm[i:i + n])
        hyps += stream.finish()
        out: list[TimedWord] = []
        for h in hyps:
            if not getattr(h, "final", False):
                continue
            words = getattr(h, "words", ()) or ()
            if words:
                out += [TimedWord(w.text, float(w.start_ms), float(w.end_ms)) for w in words]
            elif getattr(h, "text", "").strip():
                out += [TimedWord(w.text, w.start_ms, w.end_ms)
                        for w in spread_words(h.text, float(h.start_ms), float(h.end_ms), "caller")]
        return out


class WhisperTranscriber:
    """faster-whisper (`pip install faster-whisper`) with a CTranslate2 model folder the user supplies
    (e.g. a converted whisper-small); word timestamps on. Not run in the tests (no model): only its errors
    are."""

    def __init__(self, model_path: str, language: str | None = None, device: str = "cpu",
                 compute_type: str = "int8", threads: int = 1):
        self.name = "whisper"
        self.language = language
        if not os.path.isdir(model_path):
            raise TranscriptError(f"the Whisper model folder {model_path} does not exist (a CTranslate2 model "
                                  "for faster-whisper, e.g. Systran/faster-whisper-small)")
        try:
            from faster_whisper import WhisperModel  # type: ignore[import-not-found]
        except ImportError:
            raise TranscriptError("faster-whisper is not installed: pip install faster-whisper") from None
        try:
            self._model = WhisperModel(model_path, device=device, compute_type=compute_type, cpu_threads=threads)
        except Exception as err:
            raise TranscriptError(f"faster-whisper could not load {model_path}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None

    def transcribe(self, pcm: np.ndarray, rate: int) -> list[TimedWord]:
        audio = np.asarray(pcm, np.float32) / 32768.0
        if rate != 16000:
            import soxr

            audio = soxr.resample(audio, rate, 16000)
        segments, _ = self._model.transcribe(audio, language=self.language, word_timestamps=True,
                                             vad_filter=False)
        return [TimedWord(w.word.strip(), w.start * 1000.0, w.end * 1000.0)
                for s in segments for w in (s.words or ()) if w.word.strip()]
