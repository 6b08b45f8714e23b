"""One call analysed: its recording, record and events file in, a CallAnalysis out.

Each part (the recording, the VAD, loudness, the transcripts, redaction, sentiment, the metrics, the
redacted copy, the rules) runs on its own: a part that fails adds one line to `errors` ("vad: ...") and
the others go on with what there is (no recording: the words from the events still give a transcript,
sentiment and phrase categories; no events: segments and metrics still come from the audio). Nothing
here raises for a bad input, so a batch over past calls never stops at one broken call. Without a
usable recording, the segments come from the engine's live BotSpeech/CallerSpeech events (energy,
reported late: coarse; `segments_source` says which).

The caller's words come from the live recognizer (`caller_transcript = "live"`: the events file's
final CallerWords) or from a post-call `Transcriber` run on the caller's leg ("post"; the app passes one,
e.g. callbot.speech's pocketsphinx behind analytics.transcript.StreamTranscriber). "auto": post when a
transcriber is given, else live. The bot's words always come from the model's own text (BotText).
"""
from __future__ import annotations

import json
import os
import time
from typing import Literal

import msgspec
import numpy as np

from callbot.analytics import redact as redaction
from callbot.analytics.metrics import MetricParams, compute_metrics, leg_spans, loudness_dbfs
from callbot.analytics.result import CallAnalysis, CallMetrics, Segment, Turn, Word
from callbot.analytics.rules import RulesFile, call_facts, evaluate, load_rules
from callbot.analytics.sentiment import SentimentScorer, by_quarter, score_turns
from callbot.analytics.transcript import (Transcriber, bot_pieces, bot_words, build_turns, live_caller_words,
                                          read_events, speech_event_segments, transcribe_leg)
from callbot.analytics.vad import SileroVad, VadParams, detect_segments
from callbot.analytics.wavfile import read_wav, write_wav

LEGS = ("caller", "bot")  # the recording's channels, left and right


class AnalysisOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    vad: VadParams = VadParams()
    metrics: MetricParams = MetricParams()
    language: str = "en"                # the call's language: sentiment only for English
    caller_transcript: Literal["auto", "live", "post"] = "auto"
    redact: bool = True                 # PII out of the words (and so out of turns and the store)
    redacted_recording: bool = False    # also write a copy of the WAV with the PII silenced
    redacted_dir: str | None = None     # where that copy goes (None: beside the recording)
    redact_pad_ms: float = 150.0        # silence this much more on each side of a redacted word
    rules: str | None = None            # a rules file (TOML) to evaluate; None: no categories or scores


class Tools:
    """What an analysis builds once and reuses across calls (a pool's worker keeps one): the VAD's
    session, VADER's lexicon, the rules, the post-call transcriber."""

    def __init__(self, options: AnalysisOptions, transcriber: Transcriber | None = None,
                 rules: RulesFile | None = None):
        self.options = options
        self.transcriber = transcriber
        self._rules = rules
        self._vad: SileroVad | None = None
        self._scorer: SentimentScorer | None = None

    def with_options(self, options: AnalysisOptions) -> Tools:
        """Tools for other options (a tenant's rules, another language) sharing VADER, the transcriber
        and, for the same model file, the VAD session."""
        other = Tools(options, self.transcriber)
        try:  # built once for both; one that cannot be built fails in the analysis, as one error line
            other._scorer = self.scorer
            if options.vad.model_path == self.options.vad.model_path:
                other._vad = self.vad
        except Exception:  # noqa: BLE001
            pass
        return other

    @property
    def vad(self) -> SileroVad:
        if self._vad is None:
            self._vad = SileroVad(self.options.vad.model_path)
        return self._vad

    @property
    def scorer(self) -> SentimentScorer:
        if self._scorer is None:
            self._scorer = SentimentScorer()
        return self._scorer

    @property
    def rules(self) -> RulesFile | None:
        if self._rules is None and self.options.rules is not None:
            self._rules = load_rules(self.options.rules)
        return self._rules


def _line(part: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{part}: {text[:300]}"


def _load_record(record: str | os.PathLike | dict | None) -> dict:
    if record is None:
        return {}
    if isinstance(record, dict):
        return record
    with open(record, "rb") as f:
        value = json.loads(f.read())
    if not isinstance(value, dict):
        raise ValueError(f"{os.fspath(record)}: not a JSON object")
    return value


def analyze_call(wav_path: str | os.PathLike | None, record: str | os.PathLike | dict | None = None,
                 events_path: str | os.PathLike | None = None, options: AnalysisOptions = AnalysisOptions(),
                 transcriber: Transcriber | None = None, tools: Tools | None = None) -> CallAnalysis:
    """Everything analytics knows about one call (see the module's docstring); never raises for bad input."""
    t0 = time.perf_counter()
    tools = tools or Tools(options, transcriber)
    transcriber = transcriber or tools.transcriber
    errors: list[str] = []

    try:
        rec = _load_record(record)
    except (OSError, ValueError) as err:
        errors.append(_line("record", err))
        rec = {}
    call_id = str(rec.get("call_id") or (os.path.basename(os.fspath(wav_path)).rsplit(".", 1)[0] if wav_path else "call"))

    events: list[dict] = []
    if events_path is not None:
        try:
            events, bad = read_events(events_path)
            if bad:
                errors.append(f"events: {bad} line(s) that are not JSON objects skipped")
        except OSError as err:
            errors.append(_line("events", err))

    rate, samples = 0, None
    if wav_path is not None:
        try:
            rate, samples = read_wav(wav_path)
            if samples.shape[1] != 2:
                errors.append(f"recording: {samples.shape[1]} channel(s); a call's is stereo (caller, bot): "
                              "taken as the caller's leg alone")
                samples = np.concatenate([samples[:, :1], np.zeros_like(samples[:, :1])], axis=1)
        except (OSError, ValueError) as err:
            errors.append(_line("recording", err))
            samples = None
    if samples is not None:
        duration_ms = len(samples) * 1000.0 / rate
    else:
        seconds = (rec.get("recording") or {}).get("seconds") if isinstance(rec.get("recording"), dict) else None
        duration_ms = float(seconds) * 1000.0 if isinstance(seconds, (int, float)) else 0.0

    segments: list[Segment] = []
    segments_source = ""
    loudness: dict[str, float | None] = {}
    if samples is not None:
        try:
            segments = detect_segments(samples, rate, LEGS, options.vad, tools.vad)
            segments_source = "vad"
        except Exception as err:  # noqa: BLE001 - one part fails alone
            errors.append(_line("vad", err))
        try:
            loudness = {leg: loudness_dbfs(samples[:, i], rate, leg_spans(segments, leg))
                        for i, leg in enumerate(LEGS)}
        except Exception as err:  # noqa: BLE001
            errors.append(_line("loudness", err))

    if not segments_source and events:  # no recording (or no VAD): the engine's live speech events
        segments = speech_event_segments(events, duration_ms)
        segments_source = "events" if segments else ""

    words: list[Word] = []
    try:
        words += bot_words(bot_pieces(events, rec))
    except Exception as err:  # noqa: BLE001
        errors.append(_line("bot transcript", err))
    engine = "live"
    use_post = options.caller_transcript == "post" or (options.caller_transcript == "auto" and transcriber is not None)
    caller_words: list[Word] | None = None
    if use_post:
        if transcriber is None:
            errors.append("caller transcript: caller_transcript is 'post' but no transcriber was given; "
                          "the live recognizer's words are used")
        elif samples is None:
            errors.append("caller transcript: no recording to transcribe; the live recognizer's words are used")
        else:
            try:
                caller_words = transcribe_leg(transcriber, samples[:, 0], rate, "caller")
                engine = getattr(transcriber, "name", type(transcriber).__name__)
            except Exception as err:  # noqa: BLE001
                errors.append(_line("caller transcript", err) + " (the live recognizer's words are used)")
    if caller_words is None:
        try:
            caller_words = live_caller_words(events, rec, leg_spans(segments, "caller"))
        except Exception as err:  # noqa: BLE001
            errors.append(_line("caller transcript", err))
            caller_words = []
    words += caller_words
    words.sort(key=lambda w: (w.start_ms, w.leg))

    if options.redact:
        try:
            words = redaction.redact_words(words)
        except Exception as err:  # noqa: BLE001 - the words are kept out rather than kept unredacted
            errors.append(_line("redaction", err) + " (the words are left out)")
            words = []

    turns: list[Turn] = build_turns(words)
    try:
        turns = score_turns(turns, options.language, tools.scorer)
    except Exception as err:  # noqa: BLE001
        errors.append(_line("sentiment", err))

    try:
        metrics = compute_metrics(segments, duration_ms, words, loudness, turns, options.metrics)
        metrics = msgspec.structs.replace(
            metrics,
            caller=msgspec.structs.replace(metrics.caller, sentiment_by_quarter=by_quarter(turns, "caller", duration_ms)),
            bot=msgspec.structs.replace(metrics.bot, sentiment_by_quarter=by_quarter(turns, "bot", duration_ms)))
    except Exception as err:  # noqa: BLE001
        errors.append(_line("metrics", err))
        metrics = CallMetrics(duration_ms=duration_ms)

    redacted_path = None
    if options.redacted_recording and samples is not None and wav_path is not None:
        try:
            stem = os.path.basename(os.fspath(wav_path)).rsplit(".", 1)[0]
            folder = options.redacted_dir or os.path.dirname(os.path.abspath(os.fspath(wav_path)))
            redacted_path = os.path.join(folder, stem + ".redacted.wav")
            write_wav(redacted_path, rate, redaction.silence_spans(samples, rate, words, options.redact_pad_ms, LEGS))
        except Exception as err:  # noqa: BLE001
            errors.append(_line("redacted recording", err))
            redacted_path = None

    analysis = CallAnalysis(call_id=call_id, segments=segments, words=words, turns=turns, metrics=metrics,
                            transcript_engine=engine, redacted_recording=redacted_path,
                            segments_source=segments_source)
    categories, scores = [], []
    try:
        rules = tools.rules
        if rules is not None:
            categories, scores = evaluate(rules, analysis, call_facts(rec, events))
    except Exception as err:  # noqa: BLE001
        errors.append(_line("rules", err))
    return msgspec.structs.replace(analysis, categories=categories, scores=scores, errors=errors,
                                   analyzed_at=round(time.time(), 3), seconds=round(time.perf_counter() - t0, 3))


def recording_files(sidecar: str | os.PathLike) -> tuple[str | None, str, str | None]:
    """(wav, sidecar, events) paths of a call from its sidecar JSON's path (the recorder's names)."""
    side = os.fspath(sidecar)
    stem = side[:-5] if side.endswith(".json") else side
    wav = stem + ".wav"
    events = stem + ".events.jsonl"
    return (wav if os.path.exists(wav) else None, side, events if os.path.exists(events) else None)
