"""What the caller says, live: the caller leg of every recorded call goes to the recognizer service
(speech/live.py, off the media clock), and its words come back as CallerWords events on the bus (for
call flows' `on_caller_said`, the JSON log, the call's events file) and as the record's `caller_text`.

Why the recorder's thread feeds it: the recorder already drains each call's caller leg every 100 ms,
away from pjmedia's clock, so the recognizer costs the media path nothing (it runs in its own process).
While a flow gathers a secret (a card number read out), the caller's audio is replaced by silence of
the same length: the recognizer keeps its timing and never hears the secret.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import numpy as np

from callbot.app.event_bus import EventBus
from callbot.engine.contract import CallerWords
from callbot.engine.serving.stderr_line import say
from callbot.sip.call_record import CALLER_TEXT_KEPT

log = logging.getLogger(__name__)


class CallerSpeech:
    """The Recorder's CallerListener: feeds the recognizer service, publishes what it hears."""

    def __init__(self, bus: EventBus, redacting: Callable[[str], bool] = lambda call_id: False):
        self.service: Any = None  # speech.live.RecognizerService: on_result, on_closed = ours (start_caller_speech)
        self.recorder: Any = None  # told when a call's last words are in (Recorder.transcript_done)
        self.bus = bus
        self.redacting = redacting
        self._records: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ---- the recorder's thread ---------------------------------------------------------------------

    def opened(self, record: Any, rate: int) -> None:
        call_id = record.call_id
        with self._lock:
            self._records[call_id] = record
        self.service.open(call_id, rate)

    def heard(self, call_id: str, samples: np.ndarray) -> None:
        if self.redacting(call_id):
            samples = np.zeros_like(samples)  # a secret may be read out: the recognizer hears its length only
        self.service.feed(call_id, samples.astype("<i2").tobytes())

    def closed(self, call_id: str) -> None:
        self.service.close(call_id)  # its last words still come back through on_result

    # ---- the service's reader thread ---------------------------------------------------------------

    def on_result(self, call_id: str, hyp: Any) -> None:
        text = hyp.text.strip()
        if not text:
            return
        self.bus.publish(CallerWords(call_id=call_id, t_ms=float(hyp.end_ms), text=text, final=bool(hyp.final),
                                     start_ms=float(hyp.start_ms), end_ms=float(hyp.end_ms)))
        if not hyp.final:
            return
        with self._lock:
            record = self._records.get(call_id)
        if record is not None and len(record.caller_text) < CALLER_TEXT_KEPT:
            record.caller_text.append({"start_ms": round(float(hyp.start_ms), 1),
                                       "end_ms": round(float(hyp.end_ms), 1), "text": text})
            record.changed()

    def on_closed(self, call_id: str) -> None:
        """The call's last words are delivered: its record is finished (the recorder writes it out)."""
        with self._lock:
            self._records.pop(call_id, None)
        if self.recorder is not None:
            self.recorder.transcript_done(call_id)


def start_caller_speech(settings: Any, bus: EventBus) -> tuple[CallerSpeech, Any] | None:
    """The caller recognizer of `callbot serve` ([recognizer]; None with engine "none"): (the listener
    for the Recorder, the started service to stop at the end). A recognizer that cannot load is one line."""
    from callbot.app.errors import StartupError
    from callbot.speech.live import RecognizerService
    from callbot.speech.recognizer import RecognizerError

    if settings.recognizer.engine == "none":
        return None
    listener = CallerSpeech(bus)
    service = RecognizerService(settings.recognizer, listener.on_result, on_closed=listener.on_closed, say=say)
    try:
        service.start()
    except RecognizerError as err:
        raise StartupError(f"the caller recognizer ([recognizer]): {err}") from None
    listener.service = service
    return listener, service
