"""The caller recognizer for many calls at once, off the SIP process's threads.

Why a child process: BENCHMARKS.md "Media callback" measured that a Python thread busy beside pjmedia's
clock makes the media clock late (it takes the GIL between the clock's ticks). Recognition is CPU work
in Python and C (pocketsphinx ~0.15 s of CPU per second of caller audio), so by default it runs in a
child process ("spawn": a fresh interpreter that loads pocketsphinx, never pjsua2) and the SIP process
only hands it bytes. `process=False` runs the same work on a thread of this process instead, for one
call on a laptop or a debugger.

The SIP side must never wait on it: `feed` puts the chunk on a queue and returns; a sender thread writes
the queue to the pipe. At most `max_pending` chunks wait (60 s of 100 ms chunks over all calls); past
that, and after the child has died, chunks are dropped and counted in `dropped`. `open` and `close` are
never dropped (they are tiny, and a lost close would keep a stream open for good). `close` flushes: the
last utterance's final is still delivered, then `on_closed(call_id)`. Results come to `on_result` on a
reader thread of this process, in each call's order. `on_closed` comes exactly once for every call
opened, once it is closed (or the service stopped) and no more results will come for it, also when the
recognizer has died (then from the thread that closes, or from the reader as it notices the death), so
whoever waits for a call's transcript to be complete never waits for good.

Lifetimes: a crashed child costs transcripts, never calls: the reader sees the pipe end, sets `error`,
and every later feed is dropped without raising. The child dies with its parent: on Linux by
PR_SET_PDEATHSIG (SIGKILL), set first thing in the child; everywhere (macOS has no such call) its main
loop sits in a read on the pipe, which ends at EOF when the parent is gone. PR_SET_PDEATHSIG fires when
the *thread* that forked the child ends, so the child is started from the sender thread, which lives as
long as the service and, at stop, until the child has sent its last finals and exited. The child ignores SIGINT/SIGTERM: a Ctrl-C or a service manager's SIGTERM reaches
the whole process group, and the SIP process decides when recognition stops (after its calls' finals).
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Callable

import msgspec
import numpy as np

from callbot.speech.recognizer import RATES, Hypothesis, RecognizerError, build_recognizer
from callbot.speech.settings import RecognizerSettings

MAX_PENDING_CHUNKS = 600  # chunks waiting for the recognizer over all calls: 60 s of 100 ms chunks
READY_TIMEOUT_S = 60.0  # spawning Python and loading pocketsphinx's model takes ~1-2 s
STOP_TIMEOUT_S = 10.0  # flushing every open call's last utterance


# ---- the words on the pipe (msgpack arrays, tagged) ---------------------------------------------------


class _Msg(msgspec.Struct, array_like=True, tag=True, frozen=True):
    pass


class Open(_Msg, tag="open"):
    call_id: str
    rate: int


class Feed(_Msg, tag="feed"):
    call_id: str
    pcm: bytes


class Close(_Msg, tag="close"):
    call_id: str


class Stop(_Msg, tag="stop"):
    pass


class Ready(_Msg, tag="ready"):
    pid: int


class Result(_Msg, tag="result"):
    call_id: str
    hyp: Hypothesis


class Closed(_Msg, tag="closed"):
    call_id: str


class StreamFailed(_Msg, tag="stream_failed"):
    call_id: str
    text: str


class Failed(_Msg, tag="failed"):
    text: str


_encode = msgspec.msgpack.Encoder().encode
_to_child = msgspec.msgpack.Decoder(Open | Feed | Close | Stop)
_to_parent = msgspec.msgpack.Decoder(Ready | Result | Closed | StreamFailed | Failed)


# ---- the work, wherever it runs ----------------------------------------------------------------------


class _Calls:
    """Every open call's stream; `handle` runs one message and says False at Stop. A stream that fails
    is reported and dropped: that call loses its transcript, the others go on."""

    def __init__(self, recognizer, emit: Callable[[_Msg], None]):
        self._recognizer = recognizer
        self._emit = emit
        self._streams: dict[str, object] = {}

    def handle(self, msg: _Msg) -> bool:
        if isinstance(msg, Feed):
            s = self._streams.get(msg.call_id)
            if s is not None:
                self._run(msg.call_id, lambda: s.feed(np.frombuffer(msg.pcm, dtype=np.int16)))
        elif isinstance(msg, Open):
            if msg.call_id in self._streams:
                self._finish(msg.call_id)
            try:
                self._streams[msg.call_id] = self._recognizer.open_stream(msg.rate)
            except Exception as err:
                self._emit(StreamFailed(call_id=msg.call_id, text=f"{type(err).__name__}: {err}"))
        elif isinstance(msg, Close):
            self._finish(msg.call_id)
        elif isinstance(msg, Stop):
            for call_id in list(self._streams):
                self._finish(call_id)
            return False
        return True

    def _finish(self, call_id: str) -> None:
        s = self._streams.get(call_id)
        if s is not None:
            self._run(call_id, s.finish)
            self._streams.pop(call_id, None)
        self._emit(Closed(call_id=call_id))

    def _run(self, call_id: str, work) -> None:
        try:
            hyps = work()
        except Exception as err:
            self._streams.pop(call_id, None)
            self._emit(StreamFailed(call_id=call_id, text=f"{type(err).__name__}: {err}"))
            return
        for h in hyps:
            self._emit(Result(call_id=call_id, hyp=h))


# ---- the service (the SIP process's side) ------------------------------------------------------------


class RecognizerService:
    """Recognizer streams for many calls, in a child process (`settings.process`) or on a thread.

    `start()` returns once the recognizer is loaded (RecognizerError with its one line if it cannot be);
    then `open(call_id, rate)`, `feed(call_id, pcm)` (int16 mono bytes at that rate; never blocks),
    `close(call_id)` (flushes; `on_closed(call_id)` follows the call's last result), `stop()`.
    `on_result(call_id, hypothesis)` runs on a reader thread; it should not block for long (the results
    of every call wait behind it). `error` says what stopped the recognizer, if anything. `say(line)`
    writes its stderr lines (the app passes its own, which keeps one process's lines whole across threads).
    """

    def __init__(self, settings: RecognizerSettings, on_result: Callable[[str, Hypothesis], None], *,
                 on_closed: Callable[[str], None] | None = None, max_pending: int = MAX_PENDING_CHUNKS,
                 ready_timeout_s: float = READY_TIMEOUT_S, say: Callable[[str], None] | None = None):
        if settings.engine == "none":
            raise ValueError("the recognizer engine is \"none\": there is nothing to run")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.settings = settings
        self.on_result = on_result
        self.on_closed = on_closed
        self.say = say or _say
        self.max_pending = max_pending
        self.ready_timeout_s = ready_timeout_s
        self.error: str | None = None
        self.dropped = 0  # chunks of audio that never reached a recognizer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # Feed messages in the queue
        self._open: set[str] = set()  # opened, not yet closed
        self._closing: set[str] = set()  # closed, on_closed not yet called
        self._started = False
        self._stopping = False
        self._stop_timeout_s = STOP_TIMEOUT_S
        self._dead = False
        self._proc = None
        self._conn = None
        self._sender: threading.Thread | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (None on a thread)."""
        return self._proc.pid if self._proc is not None else None

    # ---- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> RecognizerService:
        if self._started:
            raise RuntimeError("the recognizer service is already started")
        self._started = True
        if self.settings.process:
            self._start_process()
        else:
            self._start_thread()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Flushes every open call (their finals are delivered), then ends the child or thread. Idempotent."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._stop_timeout_s = timeout
        self._queue.put(Stop())
        deadline = time.monotonic() + timeout + 1.0
        for t in (self._sender, self._reader):
            if t is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        if self._proc is not None:
            self._proc.join(max(0.1, deadline - time.monotonic()))
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)
        if self._conn is not None and (self._reader is None or not self._reader.is_alive()):
            self._conn.close()
        with self._lock:
            left = self._open | self._closing  # a dead or stuck child did not answer for these
        for call_id in sorted(left):
            self._settle(call_id)

    # ---- calls (any thread of the SIP side) ---------------------------------------------------------------

    def open(self, call_id: str, rate: int) -> None:
        """Start a call's stream. After the recognizer has died the call is still taken, so that its audio
        counts in `dropped`."""
        if isinstance(rate, bool) or not isinstance(rate, int) or rate not in RATES:
            raise ValueError(f"rate must be one of {RATES} Hz, got {rate!r}")
        if not self._started or self._stopping:
            return
        with self._lock:
            if call_id in self._open or call_id in self._closing:
                raise ValueError(f"call {call_id!r} is open, or its close is not through yet: call ids are unique")
            self._open.add(call_id)
        if not self._dead:
            self._queue.put(Open(call_id=call_id, rate=rate))

    def feed(self, call_id: str, pcm: bytes) -> None:
        """Queue a chunk of the call's audio; drops it (counted) when the queue is full or the recognizer
        has died. Audio of a call that is not open is ignored."""
        if call_id not in self._open:
            return
        if self._dead or self._stopping:
            with self._lock:
                self.dropped += 1
            return
        pcm = bytes(pcm)
        if len(pcm) % 2:
            raise ValueError(f"pcm must be int16 samples: {len(pcm)} bytes is an odd number")
        with self._lock:
            if self._pending >= self.max_pending:
                self.dropped += 1
                return
            self._pending += 1
        self._queue.put(Feed(call_id=call_id, pcm=pcm))

    def close(self, call_id: str) -> None:
        with self._lock:
            if call_id not in self._open:
                return
            self._open.discard(call_id)
            self._closing.add(call_id)
        if self._running():
            self._queue.put(Close(call_id=call_id))
        else:
            self._settle(call_id)  # no recognizer to flush it: complete now

    def _running(self) -> bool:
        return self._started and not self._stopping and not self._dead

    # ---- a thread in this process ------------------------------------------------------------------------

    def _start_thread(self) -> None:
        recognizer = build_recognizer(self.settings)  # RecognizerError for the caller, now
        calls = _Calls(recognizer, self._deliver)
        self._sender = threading.Thread(target=self._work, args=(calls,), name="speech-recognizer", daemon=True)
        self._sender.start()

    def _work(self, calls: _Calls) -> None:
        while True:
            msg = self._take()
            try:
                if not calls.handle(msg):
                    return
            except Exception as err:  # a bug in the service itself: the calls go on without transcripts
                traceback.print_exc()
                self._fail(f"the recognizer thread failed: {type(err).__name__}: {err}")
                return

    def _take(self) -> _Msg:
        msg = self._queue.get()
        if isinstance(msg, Feed):
            with self._lock:
                self._pending -= 1
        return msg

    # ---- a child process ------------------------------------------------------------------------------------

    def _start_process(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=_child_main, args=(child_conn, self.settings, os.getpid()),
                                 name="callbot-recognizer", daemon=True)
        launched = threading.Event()
        failure: list[BaseException] = []
        self._sender = threading.Thread(target=self._send_loop, args=(child_conn, launched, failure),
                                        name="speech-sender", daemon=True)
        self._sender.start()
        launched.wait()
        if failure:
            self._stopping = True
            raise RecognizerError(f"the recognizer process could not start: {failure[0]}")
        try:
            self._await_ready()
        except BaseException:
            self._stopping = True
            self._queue.put(Stop())
            self._proc.join(1.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)
            self._conn.close()
            raise
        self._reader = threading.Thread(target=self._read_loop, name="speech-results", daemon=True)
        self._reader.start()

    def _send_loop(self, child_conn, launched: threading.Event, failure: list) -> None:
        # the child is forked from this thread: its PR_SET_PDEATHSIG lasts as long as this thread does
        try:
            self._proc.start()
        except BaseException as err:
            failure.append(err)
            launched.set()
            return
        finally:
            child_conn.close()  # ours, so that the child's exit reads as EOF in the reader
        launched.set()
        while True:
            msg = self._take()
            if self._dead:
                if isinstance(msg, Feed):
                    with self._lock:
                        self.dropped += 1
                elif isinstance(msg, Close):
                    self._settle(msg.call_id)
                elif isinstance(msg, Stop):
                    return
                continue
            try:
                self._conn.send_bytes(_encode(msg))
            except (OSError, ValueError):  # the child is gone: the reader says why
                self._dead = True
                if isinstance(msg, Feed):
                    with self._lock:
                        self.dropped += 1
            if isinstance(msg, Stop):
                # this thread's end would SIGKILL the child (PR_SET_PDEATHSIG) in the middle of its last
                # finals: it waits for the child to finish them and exit
                self._proc.join(self._stop_timeout_s)
                return

    def _await_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RecognizerError(f"the recognizer process was not ready within {self.ready_timeout_s:g} s")
            if not self._conn.poll(min(left, 0.5)):
                continue
            try:
                msg = _to_parent.decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._proc.join(5.0)
                raise RecognizerError("the recognizer process ended while starting "
                                      f"(exit status {self._proc.exitcode})") from None
            if isinstance(msg, Failed):
                raise RecognizerError(msg.text)
            if isinstance(msg, Ready):
                return

    def _read_loop(self) -> None:
        while True:
            try:
                data = self._conn.recv_bytes()
            except (EOFError, OSError):
                if not self._stopping:
                    self._proc.join(2.0)
                    self._fail(f"the recognizer process ended unexpectedly (exit status {self._proc.exitcode})")
                return
            try:
                msg = _to_parent.decode(data)
            except msgspec.DecodeError as err:  # a bug on one side: say it, keep going
                self.say(f"callbot: recognizer: a message did not decode: {err}")
                continue
            if isinstance(msg, Failed):
                self._fail(msg.text)
            else:
                self._deliver(msg)

    # ---- both ------------------------------------------------------------------------------------------------

    def _deliver(self, msg: _Msg) -> None:
        try:
            if isinstance(msg, Result):
                self.on_result(msg.call_id, msg.hyp)
            elif isinstance(msg, Closed):
                self._settle(msg.call_id)
            elif isinstance(msg, StreamFailed):
                self.say(f"callbot: recognizer: call {msg.call_id}: {msg.text} (no more transcript for it)")
        except Exception:  # the app's callback: its bug must not end every call's recognition
            traceback.print_exc()

    def _fail(self, text: str) -> None:
        if self.error is None:  # the first word is the cause
            self.error = text
            self.say(f"callbot: recognizer: {text}; calls go on without caller transcripts")
        self._dead = True
        with self._lock:
            waiting = sorted(self._closing)
        for call_id in waiting:  # closed, but their Closed will never come
            self._settle(call_id)

    def _settle(self, call_id: str) -> None:
        """on_closed(call_id), once per call: whichever of Closed, a death or stop() comes first."""
        with self._lock:
            if call_id not in self._closing and call_id not in self._open:
                return
            self._closing.discard(call_id)
            self._open.discard(call_id)
        if self.on_closed is not None:
            try:
                self.on_closed(call_id)
            except Exception:  # the app's callback: its bug must not end the others'
                traceback.print_exc()


# ---- the child ------------------------------------------------------------------------------------------


def _say(line: str) -> None:
    """A line to stderr in one write (print() makes two, between which another thread's line can land)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _die_with_parent(parent_pid: int) -> bool:
    """PR_SET_PDEATHSIG(SIGKILL) on Linux; False if the parent is already gone (it died before the call)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the pipe's EOF still ends us
    return os.getppid() == parent_pid


def _child_main(conn, settings: RecognizerSettings, parent_pid: int) -> None:
    if not _die_with_parent(parent_pid):
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    os.dup2(2, 1)  # our stdout would land in serve's JSON log: anything a library prints goes to stderr

    def emit(msg: _Msg) -> None:
        conn.send_bytes(_encode(msg))

    try:
        recognizer = build_recognizer(settings)
    except RecognizerError as err:
        emit(Failed(text=str(err)))
        return
    except BaseException as err:  # unexpected: the traceback for a developer, one line for the user
        traceback.print_exc()
        emit(Failed(text=f"the recognizer did not start: {type(err).__name__}: {err}"))
        return
    try:
        emit(Ready(pid=os.getpid()))
        calls = _Calls(recognizer, emit)
        while True:
            try:
                msg = _to_child.decode(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent is gone (or closed the pipe)
            except msgspec.DecodeError as err:
                _say(f"callbot: recognizer process: a message did not decode: {err}")
                continue
            if not calls.handle(msg):
                return
    except (OSError, ValueError):
        return  # the pipe broke: the parent is gone
