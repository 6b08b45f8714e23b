"""The recognizer service (speech/live.py): many calls' streams in a child process (or on a thread), fed
the way the recorder will feed it (100 ms chunks of bytes), with real espeak-ng speech.

What must hold: the service gives the same finals as the recognizer run directly, for calls fed
interleaved; `close` flushes the last utterance; a killed child costs transcripts, never an exception
on the SIP side; the child dies with its parent; a recognizer that cannot load fails `start()`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import soxr

from callbot.speech.live import RecognizerService
from callbot.speech.recognizer import Hypothesis, PocketsphinxRecognizer, RecognizerError
from callbot.speech.settings import RecognizerSettings
from callbot.speech.tts import EspeakTts
from tests.sip_peers import eventually

VOICE = "en-us+klatt2"  # the espeak-ng voice pocketsphinx hears best (tests/test_speech_recognizer.py)


def spoken(text: str, rate: int, lead_s: float = 0.5, tail_s: float = 1.0) -> np.ndarray:
    speech, espeak_rate = EspeakTts(voice=VOICE).synthesize(text)
    speech = soxr.resample(speech, espeak_rate, rate).astype(np.int16)
    return np.concatenate([np.zeros(int(lead_s * rate), np.int16), speech, np.zeros(int(tail_s * rate), np.int16)])


def direct(settings: RecognizerSettings, pcm: np.ndarray, rate: int) -> list[Hypothesis]:
    stream = PocketsphinxRecognizer(keywords=settings.keywords).open_stream(rate)
    out = []
    for i in range(0, len(pcm), rate // 10):
        out += stream.feed(pcm[i:i + rate // 10])
    return [h for h in out + stream.finish() if h.final]


class Results:
    """What on_result and on_closed receive, per call, from the service's reader thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.hyps: dict[str, list[Hypothesis]] = {}
        self.closed: list[str] = []
        self.closed_after: dict[str, int] = {}  # how many results the call had when on_closed came

    def on_result(self, call_id: str, hyp: Hypothesis) -> None:
        with self.lock:
            self.hyps.setdefault(call_id, []).append(hyp)

    def on_closed(self, call_id: str) -> None:
        with self.lock:
            self.closed.append(call_id)
            self.closed_after[call_id] = len(self.hyps.get(call_id, ()))

    def finals(self, call_id: str) -> list[Hypothesis]:
        with self.lock:
            return [h for h in self.hyps.get(call_id, ()) if h.final]


@pytest.fixture
def service():
    made = []

    def make(settings: RecognizerSettings, results: Results, **kw) -> RecognizerService:
        svc = RecognizerService(settings, results.on_result, on_closed=results.on_closed, **kw)
        made.append(svc)
        return svc.start()

    yield make
    for svc in made:
        svc.stop()


def feed_interleaved(svc: RecognizerService, calls: dict[str, tuple[np.ndarray, int]]) -> None:
    """100 ms of each call in turn, as the recorder thread drains the calls' rings."""
    step = 0
    while True:
        fed = False
        for call_id, (pcm, rate) in calls.items():
            n = rate // 10
            chunk = pcm[step * n:(step + 1) * n]
            if len(chunk):
                svc.feed(call_id, chunk.tobytes())
                fed = True
        if not fed:
            return
        step += 1


@pytest.mark.parametrize("process, keywords", [(True, ()), (False, ("agent",))],
                         ids=["child process, transcripts", "thread, keywords"])
def test_two_calls_fed_interleaved_get_the_finals_of_the_recognizer_alone(service, process, keywords):
    settings = RecognizerSettings(process=process, keywords=keywords)
    a, b = spoken("I want to talk to an agent", 16000), spoken("Yes", 8000)
    results = Results()
    svc = service(settings, results)
    assert (svc.pid is not None and svc.pid != os.getpid()) if process else svc.pid is None
    svc.open("a", 16000)
    svc.open("b", 8000)
    feed_interleaved(svc, {"a": (a, 16000), "b": (b, 8000)})
    svc.close("a")
    svc.close("b")
    eventually(lambda: len(results.closed) == 2, timeout=30, what="both calls closed")
    assert results.finals("a") == direct(settings, a, 16000)
    assert "agent" in results.finals("a")[0].text
    assert results.finals("b") == direct(settings, b, 8000)
    assert [h.text for h in results.finals("b")] == ([] if keywords else ["yes"])
    # on_closed comes after the call's last result
    assert results.closed_after == {c: len(results.hyps.get(c, ())) for c in ("a", "b")}
    assert svc.dropped == 0 and svc.error is None


def test_close_flushes_the_utterance_still_open(service):
    settings = RecognizerSettings(keywords=("agent",))
    pcm = spoken("I want to talk to an agent", 8000, tail_s=0.0)  # the call ends on the last word
    results = Results()
    svc = service(settings, results)
    svc.open("c", 8000)
    feed_interleaved(svc, {"c": (pcm, 8000)})
    svc.close("c")
    eventually(lambda: results.closed == ["c"], timeout=30, what="the call closed")
    (final,) = results.finals("c")
    assert final.text == "agent" and final == direct(settings, pcm, 8000)[0]


def test_a_killed_child_sets_error_and_later_audio_is_dropped_quietly(service):
    results = Results()
    svc = service(RecognizerSettings(keywords=("agent",)), results)
    svc.open("d", 8000)
    chunk = np.zeros(800, np.int16).tobytes()
    svc.feed("d", chunk)
    os.kill(svc.pid, signal.SIGKILL)
    eventually(lambda: svc.error is not None, timeout=10, what="the death noticed")
    assert "ended unexpectedly" in svc.error and "-9" in svc.error
    before = svc.dropped
    for _ in range(20):
        svc.feed("d", chunk)  # the SIP side goes on: no exception, no wait
    svc.open("e", 16000)
    svc.feed("e", chunk)
    svc.close("d")
    assert svc.dropped == before + 21
    assert results.closed == ["d"]  # at once: whoever waits for the transcript to be complete goes on
    svc.stop()  # returns, with a dead child
    assert results.closed == ["d", "e"]  # stop() completes the calls still open


def test_a_recognizer_that_cannot_load_fails_start_with_its_reason(tmp_path):
    bad = RecognizerSettings(model=str(tmp_path / "no-model-here"))
    with pytest.raises(RecognizerError, match="does not exist"):
        RecognizerService(bad, lambda c, h: None).start()
    with pytest.raises(RecognizerError, match="not in the pronunciation dictionary"):
        RecognizerService(RecognizerSettings(keywords=("zzyzxq",), process=False), lambda c, h: None).start()


def test_the_child_dies_with_its_parent(tmp_path):
    # a parent of its own (killed with SIGKILL: no atexit, no stop) whose child must not outlive it
    script = textwrap.dedent("""
        import sys, time
        from callbot.speech.live import RecognizerService
        from callbot.speech.settings import RecognizerSettings
        if __name__ == "__main__":
            svc = RecognizerService(RecognizerSettings(keywords=("agent",)), lambda c, h: None).start()
            print(svc.pid, flush=True)
            time.sleep(60)
    """)
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.kill()
        parent.wait(10)
        parent.stdout.close()
    eventually(lambda: not _alive(child), timeout=10, what="the orphaned child gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) is gone for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def test_feeds_before_open_after_close_or_of_odd_length(service):
    results = Results()
    svc = service(RecognizerSettings(keywords=("agent",), process=False), results)
    svc.feed("never-opened", b"\0\0" * 80)  # ignored: not a call of ours
    svc.open("f", 8000)
    with pytest.raises(ValueError, match="odd"):
        svc.feed("f", b"\0" * 3)
    with pytest.raises(ValueError, match="rate"):
        svc.open("g", 7000)
    svc.close("f")
    svc.feed("f", b"\0\0" * 80)  # after close: ignored
    eventually(lambda: results.closed == ["f"], timeout=10, what="the call closed")
    assert svc.dropped == 0 and results.hyps == {}


def test_stop_flushes_the_calls_still_open(service):
    settings = RecognizerSettings(keywords=("agent",))
    pcm = spoken("I want to talk to an agent", 16000, tail_s=0.0)
    results = Results()
    svc = service(settings, results)
    svc.open("h", 16000)
    with pytest.raises(ValueError, match="unique"):
        svc.open("h", 16000)
    feed_interleaved(svc, {"h": (pcm, 16000)})
    svc.stop()
    assert [h.text for h in results.finals("h")] == ["agent"] and results.closed == ["h"]
    svc.feed("h", pcm[:1600].tobytes())  # after stop: ignored, no exception
