"""Analyses off the hot path: a pool of low-priority processes, fed a bounded queue, results by callback.

Why processes: the analysis is CPU-bound numpy/onnxruntime/pocketsphinx work; in the SIP process it
would hold the GIL and take cores from pjmedia's clock and the model, and a live call would go late. In
child processes ("spawn": no copy of the parent's pjsua2 or threads), each started at a lower priority
(os.nice, the same POSIX call on Linux and macOS), the scheduler gives live calls the CPU first and an
analysis only what is left. onnxruntime is held to one thread per worker (VadParams / SileroVad).

Bounded: at most `max_pending` calls wait or run; `submit` returns False beyond that (counted in
`refused`) rather than queueing without end behind a burst of hang-ups; the store can analyse those
later, on demand. Each worker builds its tools once (the VAD's session, VADER, the rules, the post-call
transcriber from `transcriber_factory`, a picklable callable such as a module-level function) and
reuses them for every call it gets; a call may come with options of its own (a tenant's rules file, the
bot's language), for which the worker keeps another Tools sharing the VAD session, VADER and transcriber.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable

from callbot.analytics.analyze import AnalysisOptions, Tools, analyze_call
from callbot.analytics.result import CallAnalysis

DEFAULT_NICE = 10
PARENT_CHECK_S = 1.0  # a worker looks this often whether its parent is still there

# one per worker process: built by _start_worker; a Tools per other options met, sharing its parts
_TOOLS: Tools | None = None
_BY_OPTIONS: dict[AnalysisOptions, Tools] = {}


def _die_with_parent(parent: int) -> None:
    """A worker whose parent died (SIGKILL of serve) stops too, rather than wait for work forever: the
    executor's queue never reports its writer gone (the worker holds a copy of its write end)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _start_worker(options: AnalysisOptions, nice: int, transcriber_factory: Callable[[], Any] | None) -> None:
    global _TOOLS
    threading.Thread(target=_die_with_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass  # not allowed to change it: run at the parent's priority rather than not at all
    transcriber = transcriber_factory() if transcriber_factory is not None else None
    _TOOLS = Tools(options, transcriber)


def _analyze(wav: str | None, record: Any, events: str | None, options: AnalysisOptions | None) -> CallAnalysis:
    assert _TOOLS is not None
    tools = _TOOLS
    if options is not None and options != _TOOLS.options:
        tools = _BY_OPTIONS.get(options)
        if tools is None:
            tools = _BY_OPTIONS[options] = _TOOLS.with_options(options)
    return analyze_call(wav, record, events, tools.options, tools=tools)


def worker_niceness() -> int:
    """The niceness of the process it runs in (for a test: a worker's own)."""
    return os.nice(0)


Callback = Callable[[str, CallAnalysis | None, BaseException | None], None]


class AnalysisPool:
    """`submit(key, wav, record, events)` -> the analysis, later, as `on_result(key, analysis, None)`, or
    `on_result(key, None, error)` when the worker died (or `close(wait=False)` dropped it: CancelledError).
    Called on a pool thread: must not block long."""

    def __init__(self, on_result: Callback, options: AnalysisOptions = AnalysisOptions(), workers: int = 1,
                 max_pending: int = 64, nice: int = DEFAULT_NICE,
                 transcriber_factory: Callable[[], Any] | None = None):
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be >= 1")
        self.on_result = on_result
        self.options = options
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending = 0
        self._futures: set[cf.Future] = set()
        self.refused = 0
        self.done = 0
        self._executor = cf.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(options, nice, transcriber_factory))

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, key: str, wav: str | os.PathLike | None, record: Any = None,
               events: str | os.PathLike | None = None, options: AnalysisOptions | None = None) -> bool:
        """Queues one call; False (and `refused` + 1) when `max_pending` are already waiting or running.
        `options`: this call's own (a tenant's rules file, the bot's language); None: the pool's."""
        with self._lock:
            if self._pending >= self.max_pending:
                self.refused += 1
                return False
            self._pending += 1
        try:
            future = self._executor.submit(_analyze, os.fspath(wav) if wav is not None else None,
                                           os.fspath(record) if isinstance(record, os.PathLike) else record,
                                           os.fspath(events) if events is not None else None, options)
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(lambda f: self._finished(key, f))
        return True

    def _finished(self, key: str, future: cf.Future) -> None:
        with self._lock:
            self._pending -= 1
            self.done += 1
            self._futures.discard(future)
        err = cf.CancelledError(f"{key}: dropped at close") if future.cancelled() else future.exception()
        try:
            self.on_result(key, None if err is not None else future.result(), err)
        except Exception:  # noqa: BLE001 - a callback's bug must not stop the pool's thread
            pass

    def niceness(self) -> int:
        """A worker's niceness (runs a tiny job in one)."""
        return self._executor.submit(worker_niceness).result(timeout=60)

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (those started so far)."""
        # the executor keeps its processes by pid in `_processes`, the one place the stdlib keeps them
        return sorted(getattr(self._executor, "_processes", None) or {})

    def close(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stops the workers; with `wait`, after the queued analyses are done (else they are dropped). With
        a `timeout`, waits that long at most: then the analyses still queued are dropped and the workers
        still busy are stopped (SIGTERM); their calls get `on_result(key, None, error)`. True when
        every analysis submitted had finished."""
        if not wait or timeout is None:
            with self._lock:
                futures = set(self._futures)
            self._executor.shutdown(wait=wait, cancel_futures=not wait)
            return wait or not futures
        with self._lock:
            futures = set(self._futures)
        _, late = cf.wait(futures, timeout=timeout)
        if late:
            for future in late:
                future.cancel()
            for pid in self.worker_pids():
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass
        self._executor.shutdown(wait=True, cancel_futures=True)
        return not late

    def __enter__(self) -> AnalysisPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
