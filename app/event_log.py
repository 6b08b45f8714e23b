"""JSON logs: one line per call event, for log shippers and for grep.

Each line is the event's own fields plus `event` (its type name) and `ts` (wall-clock ISO 8601 UTC).
The SIP side's events carry `at` (monotonic seconds, the clock the latency numbers use), the engine's
live events `t_ms` (ms since the call's first frame).

Text from a peer may hold bytes that are not UTF-8 (pjsua2 hands them over as lone surrogates), which a
JSON encoder refuses; one such INVITE must not stop the log, the recorder or the server. `json_bytes`
escapes them the way the call record does (`\\xff`, sip/call_record.py says why) and costs nothing
when there are none: the escaping runs only after the plain encoding has failed.
"""
from __future__ import annotations

import datetime
import sys
from typing import Any, TextIO

import msgspec

from callbot.sip.call_record import REDACTED, peer_text
from callbot.sip.events import DtmfReceived

_encoder = msgspec.json.Encoder()


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return peer_text(value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_escaped(v) for v in value]
    return value


def json_bytes(value: Any) -> bytes:
    """`value` as JSON (msgspec), lone surrogates in any of its strings escaped rather than refused."""
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError:
        return _encoder.encode(_escaped(msgspec.to_builtins(value)))


def event_line(event: msgspec.Struct) -> bytes:
    fields = msgspec.structs.asdict(event)
    if isinstance(event, DtmfReceived) and event.redacted:
        fields["digit"] = REDACTED  # a secret being typed (a call flow's sensitive gather)
    ts = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    return json_bytes({"ts": ts, "event": type(event).__name__, **fields})


class EventLog:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout

    def write(self, event: msgspec.Struct) -> None:
        self.stream.write(event_line(event).decode() + "\n")
        self.stream.flush()
