"""What is known about one call, as plain data: the recording's JSON sidecar is written from it.

The call object fills it from pjsua2 callbacks; the recorder (app/recording.py) reads it and never
needs to know pjsua2. Times are wall-clock (time.time(), seconds since the epoch) so that a sidecar
means something after the process is gone; DTMF keeps the monotonic stamp of its event too.

The record is read while the call goes on (the recorder rewrites the sidecar from it a few times a
minute, so a killed process leaves the call's facts): whoever changes it calls `changed()`, which the
recorder notices without comparing contents. Its lists are bounded: a peer can send digits without end.

Text a peer wrote (Call-ID, URIs with their display names, reason phrases) can hold bytes that are not
UTF-8; pjsua2 hands them over as lone surrogates (U+DC80..U+DCFF, Python's surrogateescape), which no
UTF-8 encoder (JSON, msgpack, a file) accepts. `peer_text` turns them into backslash escapes of the bytes
(`\\xff`): lossless, so two Call-IDs that differ in one bad byte stay two calls, ASCII, so every JSON
reader takes it, and the same bytes a packet capture shows. U+FFFD would merge such Call-IDs.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

DTMF_KEPT = 1000  # digits a record keeps; later ones are counted in dtmf_dropped (a flood: 1,800 -> 208 KB)

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    code = ord(m.group())
    # U+DC80..U+DCFF is the byte 0x80..0xFF that would not decode; any other lone surrogate is shown as is
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def peer_text(text: str) -> str:
    """`text` with every lone surrogate as a backslash escape (\\xff for the byte 0xFF): encodable as UTF-8."""
    return _SURROGATE.sub(_escape, text)


@dataclass
class DtmfRecord:
    digit: str
    method: str  # "rfc4733" | "info"
    at: float  # wall clock, when the digit began
    duration_ms: int  # RFC 4733: filled in when the digit ends; SIP INFO: as the INFO says (0 if absent)


@dataclass
class TransferRecord:
    target: str
    notifications: list[tuple[int, str]] = field(default_factory=list)  # (code, reason) per NOTIFY
    succeeded: bool | None = None  # None while in progress


@dataclass
class CallRecord:
    call_id: str  # SIP Call-ID
    direction: str  # "inbound" | "outbound"
    account: str
    local_uri: str
    remote_uri: str
    start: float  # INVITE sent or received
    answered: float | None = None
    end: float | None = None
    codec: str | None = None
    codec_rate: int | None = None  # the negotiated codec's clock rate (Hz): G.722 16000, G.711 8000
    # the rate of the call's audio as the engine, the media port and the recording see it: the
    # conference bridge's (engine/contract.py reads it as the media port's rate)
    clock_rate: int | None = None
    srtp: bool = False
    dtmf: list[DtmfRecord] = field(default_factory=list)  # the first DTMF_KEPT digits
    dtmf_dropped: int = 0  # digits after those, counted and not kept
    transfer: TransferRecord | None = None
    # pjmedia's statistics of the audio stream, last read while it flowed (call.stream_summary): packets,
    # losses, jitter and the jitter buffer's delay, the half of the audio path before our media port
    stream: dict | None = None
    hangup_cause: str | None = None  # events.CallEnded.cause, or "rejected" (answered with an error)
    hangup_code: int | None = None
    hangup_reason: str | None = None
    # what the engine reports at the call's end: the model's text pieces with their times, step and
    # stage timings, underruns/overruns (engine/serving/runner.py ModelCallSession.summary)
    engine: dict | None = None

    def __post_init__(self) -> None:
        # not a field (not in the sidecar): bumped by every change worth writing out at once; read by the
        # recorder's thread, which only asks whether it moved (a lost bump between two threads still moves it)
        self.revision = 0

    def changed(self) -> None:
        """Something a reader of the sidecar should see soon happened (answer, media, a digit, a transfer)."""
        self.revision += 1

    def add_dtmf(self, digit: DtmfRecord) -> bool:
        """Keeps the digit if fewer than DTMF_KEPT are kept, else counts it in dtmf_dropped; True if kept."""
        if len(self.dtmf) < DTMF_KEPT:
            self.dtmf.append(digit)
            kept = True
        else:
            self.dtmf_dropped += 1
            kept = False
        self.changed()
        return kept

    def to_dict(self) -> dict:
        """The sidecar's content: JSON-ready (only str, int, float, bool, None, lists, dicts)."""
        return dataclasses.asdict(self)
