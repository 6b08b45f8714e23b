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

An inbound call's record also keeps what the app routes it by (app/routes.py), read from the INVITE's
text: the Request-URI and its user part (`called`: the DID a trunk puts there), the From user
(`caller`), and a bounded selection of headers (`headers`: X-* headers, P-Asserted-Identity, Diversion,
Accept-Language; at most HEADERS_KEPT of at most HEADER_CHARS each - a peer chooses them). `labels` are
the app's (tenant, bot, route): the SIP side never reads them, the sidecar shows them.
"""
from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass, field

REDACTED = "x"  # a digit the record does not keep (not a DTMF symbol, so never mistaken for one)
DTMF_KEPT = 1000  # digits a record keeps; later ones are counted in dtmf_dropped (a flood: 1,800 -> 208 KB)
CALLER_TEXT_KEPT = 2000  # utterances a record keeps (hours of talk)
# headers of an INVITE a record keeps for routing and for the sidecar: every X-* header and these
KEPT_HEADERS = ("p-asserted-identity", "diversion", "accept-language")
HEADERS_KEPT = 32  # headers at most; later ones are left out
HEADER_CHARS = 256  # characters of a kept header's value (a longer one is cut); names up to 64
_NAME_CHARS = 64
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")  # RFC 3261's token: what a header name is made of

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
    # the call flow's course, kept current by the app as it moves (app/flow_host.py): its name, the states
    # entered in order, the state it is in, and the last transition's reason and detail
    flow: dict | None = None
    # what the caller said, from the app's live recognizer (app/caller_speech.py): final hypotheses with
    # their times (ms since the caller leg's first sample), at most CALLER_TEXT_KEPT
    caller_text: list[dict] = field(default_factory=list)
    # an inbound call's INVITE (fill_from_invite): the Request-URI, its user part (the number dialled),
    # the From user part, and the kept headers (KEPT_HEADERS, X-*) by the name the first one was sent with
    request_uri: str = ""
    called: str = ""
    caller: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # the app's: tenant, bot, route

    def __post_init__(self) -> None:
        # not a field (not in the sidecar): bumped by every change worth writing out at once; read by the
        # recorder's thread, which only asks whether it moved (a lost bump between two threads still moves it)
        self.revision = 0
        # not a field either: set by the app while the caller types a secret (a card number in a call flow);
        # digits that arrive meanwhile are kept as REDACTED in the record and flagged in their event
        self.redact_dtmf = False

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

    def fill_from_invite(self, message: str) -> None:
        """Takes the Request-URI, `called`, `caller` and the kept headers from an INVITE's text (pjsua2's
        rdata.wholeMsg: a peer's bytes that are not UTF-8 come as lone surrogates and are escaped here)."""
        self.request_uri, self.called, self.caller, self.headers = invite_facts(message)

    def to_dict(self) -> dict:
        """The sidecar's content: JSON-ready (only str, int, float, bool, None, lists, dicts)."""
        return dataclasses.asdict(self)


def uri_user(uri: str) -> str:
    """The user part of a sip:/sips:/tel: URI, or of a header value holding one ("Name" <sip:u@h>;tag=x),
    percent-escapes decoded; "" when it has none."""
    if "<" in uri:
        uri = uri[uri.index("<") + 1:].partition(">")[0]
    uri = uri.strip()
    scheme, colon, rest = uri.partition(":")
    if not colon:
        return ""
    scheme = scheme.lower()
    if scheme == "tel":
        user = rest.partition(";")[0]
    elif scheme in ("sip", "sips") and "@" in rest:
        user = rest.partition("@")[0].partition(";")[0].partition(":")[0]  # no user params, no password
    else:
        return ""
    return urllib.parse.unquote(user, errors="surrogateescape")


def invite_facts(message: str) -> tuple[str, str, str, dict[str, str]]:
    """(Request-URI, its user, the From user, kept headers) of a SIP request's text, all through peer_text."""
    head = message.lstrip("\r\n").replace("\r\n", "\n").partition("\n\n")[0]
    lines = head.split("\n")
    start = lines[0].split()
    request_uri = start[1] if len(start) > 1 else ""
    caller: str | None = None
    headers: dict[str, str] = {}
    seen: dict[str, str] = {}  # lower-case name -> the name kept
    name = None  # the last kept header's name: a folded line continues it
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if name is not None:
                headers[name] = (headers[name] + " " + line.strip())[:HEADER_CHARS]
            continue
        name = None
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon or not _TOKEN.fullmatch(key) or len(key) > _NAME_CHARS:
            continue
        lower = key.lower()
        if lower in ("from", "f"):
            if caller is None:  # the first From counts
                caller = uri_user(value)
            continue
        if not (lower.startswith("x-") or lower in KEPT_HEADERS):
            continue
        if lower in seen:  # a repeated header (Diversion: one per redirection): its values joined, RFC 3261 7.3
            name = seen[lower]
            headers[name] = (headers[name] + ", " + value)[:HEADER_CHARS]
        elif len(headers) < HEADERS_KEPT:
            name = seen[lower] = peer_text(key)
            headers[name] = value[:HEADER_CHARS]
    headers = {k: peer_text(v) for k, v in headers.items()}
    return (peer_text(request_uri), peer_text(uri_user(request_uri)), peer_text(caller or ""),
            headers)
