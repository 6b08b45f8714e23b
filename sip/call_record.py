"""What is known about one call, as plain data: the recording's JSON sidecar is written from it.

The call object fills it from pjsua2 callbacks; the recorder (app/recording.py) reads it and never
needs to know pjsua2. Times are wall-clock (time.time(), seconds since the epoch) so that a sidecar
means something after the process is gone; DTMF keeps the monotonic stamp of its event too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
    dtmf: list[DtmfRecord] = field(default_factory=list)
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

    def to_dict(self) -> dict:
        """The sidecar's content: JSON-ready (only str, int, float, bool, None, lists, dicts)."""
        return dataclasses.asdict(self)
