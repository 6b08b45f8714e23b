"""JSON logs: one line per call event, for log shippers and for grep.

Each line is the event's own fields plus `event` (its type name) and `ts` (wall-clock ISO 8601 UTC).
The SIP side's events carry `at` (monotonic seconds, the clock the latency numbers use), the engine's
live events `t_ms` (ms since the call's first frame).
"""
from __future__ import annotations

import datetime
import sys
from typing import TextIO

import msgspec


_encoder = msgspec.json.Encoder()


def event_line(event: msgspec.Struct) -> bytes:
    fields = msgspec.structs.asdict(event)
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    return _encoder.encode({"ts": ts, "event": type(event).__name__, **fields})


class EventLog:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout

    def write(self, event: msgspec.Struct) -> None:
        self.stream.write(event_line(event).decode() + "\n")
        self.stream.flush()
