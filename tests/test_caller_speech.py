"""The caller recognizer as `callbot serve` wires it (app/caller_speech.py): a real RecognizerService (on a
thread here; the child process is tests/test_speech_live.py's) fed a call's caller leg in the recorder's
100 ms chunks. Speech gives CallerWords on the bus and the record's caller_text; the same speech while
a flow gathers a secret gives nothing (it is fed as silence), and the call's end says when its last
words are in."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import soxr

from callbot.app.caller_speech import CallerSpeech
from callbot.app.event_bus import EventBus
from callbot.engine.contract import CallerWords
from callbot.sip.call_record import CallRecord
from callbot.speech.live import RecognizerService
from callbot.speech.settings import RecognizerSettings
from callbot.speech.tts import EspeakTts
from tests.sip_peers import eventually

pytestmark = pytest.mark.timeout(120)
RATE = 16000


def _sentence(text: str) -> np.ndarray:
    samples, rate = EspeakTts(voice="en-us+klatt2").synthesize(text)
    speech = soxr.resample(samples.astype(np.float32), rate, RATE)
    pad = np.zeros(RATE // 2, np.float32)
    return np.clip(np.concatenate([pad, speech, pad, pad]), -32768, 32767).astype(np.int16)


class Done:
    """Stands in for the Recorder's transcript_done: notes which calls' last words are in."""

    def __init__(self):
        self.calls: set[str] = set()
        self.event = threading.Event()

    def transcript_done(self, call_id):
        self.calls.add(call_id)
        self.event.set()


def test_words_reach_the_bus_and_the_record_and_a_secret_is_never_heard():
    bus: EventBus = EventBus()
    words: list[CallerWords] = []
    bus.attach("test", lambda e: words.append(e) if isinstance(e, CallerWords) else None)
    secret: set[str] = set()
    listener = CallerSpeech(bus, redacting=lambda call_id: call_id in secret)
    service = RecognizerService(RecognizerSettings(process=False), listener.on_result, on_closed=listener.on_closed)
    listener.service = service.start()
    listener.recorder = done = Done()
    speech = _sentence("I want to talk to an agent")
    records = {c: CallRecord(call_id=c, direction="inbound", account="a", local_uri="", remote_uri="", start=0.0)
               for c in ("open", "secret")}
    secret.add("secret")
    try:
        for call_id, record in records.items():
            listener.opened(record, RATE)
        for i in range(0, len(speech), RATE // 10):  # the recorder's chunks, both calls interleaved
            for call_id in records:
                listener.heard(call_id, speech[i:i + RATE // 10])
        for call_id in records:
            listener.closed(call_id)
        eventually(lambda: done.calls == set(records), 60, "both calls' last words")
    finally:
        service.stop()
        bus.close()
    heard = [w for w in words if w.call_id == "open" and w.final]
    assert heard and any("agent" in w.text for w in heard)
    assert 400 <= heard[0].start_ms < heard[0].end_ms <= len(speech) * 1000 / RATE
    assert records["open"].caller_text and "agent" in records["open"].caller_text[-1]["text"]
    assert not [w for w in words if w.call_id == "secret"] and records["secret"].caller_text == []
