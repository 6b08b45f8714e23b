"""Every call `callbot serve` records, analysed once its files are final, and the analysis kept.

Why here: callbot.analytics knows how to analyse one call's files (analyze_call) in a pool of its own
low-priority processes (AnalysisPool), and callbot.store how to keep the result; neither knows when a
call of a running server is over, which rules its tenant has, or which recognizer the app has. This
module is that glue and nothing else: the Recorder tells it (`Recorder.on_final`) when a call's WAV is
closed and its events file and complete sidecar are written (after the caller recognizer's last words);
it hands the call to the pool with the options of the call's tenant and bot; each result goes to the
store's writer (`StoreWriter.save_analysis`) and beside the recording as `<name>.analysis.json`
(replaced atomically), so the files alone stay complete without the database.

Never in the way of a live call: the recorder's hook only puts a small item on a bounded queue (a full
queue drops the call, counted); this module's own thread passes it to the pool, whose `submit` never
waits (past `max_pending` it refuses, counted). The analysis itself runs in the pool's processes at a
lower priority (nice +10). A call that was not analysed (refused, a worker that died, still waiting at
shutdown) is counted and left for `callbot calls analyze` (its files are all there).

The post-call transcriber ([analytics] caller_transcript = "post") is callbot.speech's recognizer behind
analytics' Transcriber protocol, built in each worker by `post_call_transcriber` (module level, so the
spawned worker can import it): callbot.analytics never imports callbot.speech.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import msgspec

from callbot.analytics.analyze import AnalysisOptions
from callbot.analytics.metrics import MetricParams
from callbot.analytics.pool import DEFAULT_NICE, AnalysisPool
from callbot.analytics.result import CallAnalysis
from callbot.app.atomic_file import replace_file

log = logging.getLogger(__name__)

QUEUE_MAX = 10_000  # finished calls waiting to be handed to the pool (the pool bounds what it holds itself)
COMPLAIN_S = 60.0  # at most one log line this often about calls not analysed
ANALYSIS_SUFFIX = ".analysis.json"

# (result, seconds): "done" with the analysis's seconds, "failed" / "dropped" / "left" with None
Observer = Callable[[str, float | None], None]


def post_call_transcriber(recognizer: Any):
    """The caller's words after the call: the configured recognizer ([recognizer]; pocketsphinx when it
    is "none"), transcribing everything (no keyword spotting), as an analytics Transcriber. Built in each
    pool worker."""
    from callbot.analytics.transcript import StreamTranscriber
    from callbot.speech.recognizer import build_recognizer

    engine = "pocketsphinx" if recognizer.engine == "none" else recognizer.engine
    settings = msgspec.structs.replace(recognizer, engine=engine, keywords=())
    return StreamTranscriber(build_recognizer(settings), name=engine)


def analysis_options(settings: Any, rules: str | None = None, language: str = "en") -> AnalysisOptions:
    """[analytics] as the analysis's options, with a call's rules file and language."""
    a = settings.analytics
    return AnalysisOptions(metrics=MetricParams(dead_air_ms=a.dead_air_s * 1000.0),
                           caller_transcript=a.caller_transcript, redacted_recording=a.redacted_recording,
                           rules=rules, language=language)


def transcriber_factory(settings: Any) -> Callable[[], Any] | None:
    """What each worker builds its post-call transcriber with; None with caller_transcript "live"."""
    if settings.analytics.caller_transcript != "post":
        return None
    return functools.partial(post_call_transcriber, settings.recognizer)


def analysis_path(wav_or_sidecar: str) -> str:
    """`<name>.analysis.json` beside the call's recording."""
    stem = wav_or_sidecar
    for suffix in (".wav", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem + ANALYSIS_SUFFIX


def write_analysis_file(path: str, analysis: CallAnalysis) -> None:
    """The analysis as indented JSON, replacing the file atomically (a reader sees the old or the new)."""
    replace_file(path, msgspec.json.format(msgspec.json.encode(analysis), indent=2) + b"\n")


class _Call(msgspec.Struct, frozen=True):
    call_id: str
    wav: str
    sidecar: str
    events: str


class AnalysisHost:
    """Analyses each finished call of a server: `watch(recorder)`, `close()` at shutdown."""

    def __init__(self, settings: Any, writer: Any = None, observe: Observer | None = None,
                 nice: int = DEFAULT_NICE, queue_max: int = QUEUE_MAX):
        self.settings = settings
        self.writer = writer  # app/store_writer.py StoreWriter, or None without the store
        self.observe = observe or (lambda result, seconds: None)
        self.done = 0
        self.failed = 0  # a worker died on the call, or its analysis could not be handed on
        self.dropped = 0  # not taken: the queue or the pool was full
        self.left = 0  # still waiting or running when serve stopped
        self._calls: dict[str, _Call] = {}
        self._lock = threading.Lock()
        self._complained_at = -COMPLAIN_S
        self._queue: queue.Queue = queue.Queue(queue_max)
        self._nice = nice
        self._broken = False  # a worker died: the pool is made anew before the next call
        self.pool = self._new_pool()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="analysis-host", daemon=True)
        self._thread.start()

    def _new_pool(self) -> AnalysisPool:
        a = self.settings.analytics
        return AnalysisPool(self._on_result, analysis_options(self.settings, a.rules), workers=a.workers,
                            max_pending=a.max_pending, nice=self._nice,
                            transcriber_factory=transcriber_factory(self.settings))

    # ---- the recorder's side: never waits ------------------------------------------------------------

    def watch(self, recorder: Any) -> None:
        recorder.on_final.append(self.call_final)

    def call_final(self, recording: Any) -> None:
        """A call's files are final (Recorder.on_final: its thread, under its lock)."""
        item = _Call(str(recording.call_id), recording.wav_path, recording.sidecar_path, recording.events_path)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._not_analysed("dropped", item.call_id, "the analysis queue is full")

    # ---- this module's thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            self._submit(item)

    def _submit(self, item: _Call) -> None:
        if self._broken:
            # a worker died (a crash in a native library on one call): the executor refuses everything
            # after that, so the next call gets a new pool; the old one's calls were counted as failed
            self._broken = False
            old, self.pool = self.pool, self._new_pool()
            old.close(wait=False)
            log.warning("analysis: a worker died; its pool is replaced")
        try:
            record = _read_record(item.sidecar)
            labels = record.get("labels") if isinstance(record.get("labels"), dict) else {}
            options = self._options_for(labels)
        except (OSError, ValueError) as err:  # analysed all the same, without the tenant's rules
            log.warning("analysis of call %s: its record cannot be read (%s)", item.call_id, _one_line(err))
            options = None
        key = f"{item.call_id}\n{item.wav}"
        with self._lock:
            self._calls[key] = item
        try:
            taken = self.pool.submit(key, item.wav if os.path.exists(item.wav) else None, item.sidecar,
                                     item.events if os.path.exists(item.events) else None, options)
        except Exception as err:  # noqa: BLE001 - a broken pool: the call is left for `callbot calls analyze`
            if isinstance(err, BrokenProcessPool):
                self._broken = True
            taken = False
            with self._lock:
                self._calls.pop(key, None)
            self._not_analysed("failed", item.call_id, f"the analysis pool failed ({_one_line(err)})")
            return
        if not taken:
            with self._lock:
                self._calls.pop(key, None)
            self._not_analysed("dropped", item.call_id,
                               f"{self.pool.max_pending} analyses are already waiting ([analytics] max_pending)")

    def _options_for(self, labels: dict) -> AnalysisOptions:
        tenant = labels.get("tenant") if isinstance(labels.get("tenant"), str) else None
        language = "en"
        bot = labels.get("bot")
        for b in self.settings.bots:
            if b.name == bot:
                language = b.language
        return analysis_options(self.settings, self.settings.rules_for(tenant), language)

    # ---- the pool's thread ---------------------------------------------------------------------------

    def _on_result(self, key: str, analysis: CallAnalysis | None, error: BaseException | None) -> None:
        with self._lock:
            item = self._calls.pop(key, None)
        call_id = item.call_id if item is not None else key.split("\n", 1)[0]
        if analysis is None:
            if isinstance(error, BrokenProcessPool):
                self._broken = True
            if self._stop.is_set():
                self._not_analysed("left", call_id, "serve stopped before its analysis finished")
            else:
                self._not_analysed("failed", call_id, f"its analysis failed ({_one_line(error)})")
            return
        if item is not None:
            try:
                write_analysis_file(analysis_path(item.wav), analysis)
            except OSError as err:  # the store still gets it; the files lack it until `callbot calls analyze`
                log.warning("call %s: %s not written (%s)", call_id, analysis_path(item.wav), err.strerror or err)
        if self.writer is not None:
            self.writer.save_analysis(call_id, analysis)
        with self._lock:
            self.done += 1
        self.observe("done", analysis.seconds)

    def _not_analysed(self, result: str, call_id: str, why: str) -> None:
        with self._lock:
            setattr(self, result, getattr(self, result) + 1)
            now = time.monotonic()
            say = now - self._complained_at >= COMPLAIN_S
            if say:
                self._complained_at = now
        self.observe(result, None)
        if say or result == "left":
            log.warning("call %s is not analysed: %s; `callbot calls analyze --missing` analyses it later",
                        call_id, why)

    # ---- control -------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Calls waiting for the pool or being analysed."""
        return self._queue.qsize() + self.pool.pending

    def close(self, wait_s: float | None = None) -> None:
        """Hands the calls still queued to the pool, waits at most `wait_s` ([analytics] shutdown_wait_s)
        for the analyses going on, stops the rest (counted as left) and the workers."""
        wait_s = self.settings.analytics.shutdown_wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        self._stop.set()
        self._thread.join(max(1.0, wait_s))
        finished = self.pool.close(wait=True, timeout=max(0.0, deadline - time.monotonic()))
        if not finished:
            log.warning("analysis: %d call(s) left unanalysed at shutdown ([analytics] shutdown_wait_s = %g): "
                        "`callbot calls analyze --missing` analyses them", self.left, wait_s)


def _read_record(path: str) -> dict:
    with open(path, "rb") as f:
        value = json.loads(f.read())
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _one_line(err: BaseException | None) -> str:
    text = str(err or "").strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
