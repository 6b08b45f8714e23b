"""Events the endpoint reports: registration, call progress, media, DTMF, transfer, shutdown.

pjsua2 callbacks run on pjsip threads and must return quickly, so they only build one of these small
immutable records and put it on the endpoint's queue; the application reads them from there. Every
event carries `at`, a time.monotonic() stamp taken in the callback.
"""
from __future__ import annotations

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True):
    at: float


class RegistrationChanged(Event, frozen=True, kw_only=True):
    """A REGISTER (or un-REGISTER) got a final answer; `registered` is the account's state after it."""

    account: str
    code: int
    reason: str
    expires_s: int
    registered: bool


class RegistrationFailed(Event, frozen=True, kw_only=True):
    """The registrar refused the account; `message` names the account and the likely cause."""

    account: str
    code: int
    reason: str
    message: str


class IncomingCall(Event, frozen=True, kw_only=True):
    call_id: str  # the SIP Call-ID
    account: str
    remote_uri: str
    local_uri: str


class CallRejected(Event, frozen=True, kw_only=True):
    """An INVITE answered with a final error before it became a call of ours (busy, bad offer). `by`:
    "callbot" (our own checks) or "pjsip" (pjsua refused it before our code saw it: 486 when every one of
    the wheel's call slots is taken)."""

    account: str
    remote_uri: str
    code: int
    reason: str
    by: str = "callbot"


class CallProgress(Event, frozen=True, kw_only=True):
    """A response to our outgoing INVITE: 100, 180, 183, 200 or a failure code."""

    call_id: str
    code: int
    reason: str


class CallConfirmed(Event, frozen=True, kw_only=True):
    """The call is up (ACK sent or received)."""

    call_id: str
    direction: str  # "inbound" | "outbound"


class CallMedia(Event, frozen=True, kw_only=True):
    """Audio media became active: the negotiated codec and its clock rate (Hz)."""

    call_id: str
    codec: str
    clock_rate: int
    srtp: bool


class CallEnded(Event, frozen=True, kw_only=True):
    """The call is gone. `cause`: remote, local, timeout (unanswered), max_duration, rtp_timeout, transfer,
    shutdown, failed (our INVITE got an error)."""

    call_id: str
    code: int
    reason: str
    cause: str
    # the audio stream's statistics as last read (sip/call.py stream_summary); None: no audio flowed
    stream: dict | None = None


class DtmfReceived(Event, frozen=True, kw_only=True):
    call_id: str
    digit: str
    method: str  # "rfc4733" | "info"
    duration_ms: int
    # typed while the app redacts the call's digits (a secret): logs and files show call_record.REDACTED,
    # only live subscribers (a call flow gathering it) get the digit itself
    redacted: bool = False


class TransferProgress(Event, frozen=True, kw_only=True):
    """How a transfer goes: a NOTIFY about our REFER (the target's answer so far), or, for an attended
    transfer, the consultation leg's provisional answers and its failure (its own code, 408 unanswered,
    480 the target hung up before the REFER, 487 cancelled); `final` when it is the last."""

    call_id: str
    code: int
    reason: str
    final: bool


class SourceRefused(Event, frozen=True, kw_only=True):
    """Requests from one source (an IP address) refused before pjsua took them up (sip/gate.py), by reason
    (sip/admission.py: rate, blocked, overload, unacked, untrusted, offer, not_served, unknown_method,
    no_dialog). At a source's first refusal, then at most once a minute with the counts since: a flood is
    counted, never an event per packet."""

    source: str  # an IP address; "N sources" sums up sources beyond the report budget (a spoofed flood)
    counts: dict[str, int]
    first: bool
    message: str


class EndpointStopped(Event, frozen=True, kw_only=True):
    pass
