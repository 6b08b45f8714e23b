"""The first code of ours a SIP request meets: a pjsip module that answers, statelessly, what pjsua must
never take up, before pjsua takes it up.

Why a module of our own: pjsua2 hands the application an INVITE only in `onIncomingCall`, after pjsua has
given it a call slot and opened its RTP and RTCP sockets (2 of the wheel's 64 ioqueue handles, held past
the refusal; a flood of such INVITEs aborts the process). pjsua answers an out-of-dialog MESSAGE 200 before
any callback (2.15.1 has no switch), accepts every SUBSCRIBE to presence (a dialog kept for its Expires,
~43 kB each), and drops PUBLISH, REGISTER and unknown methods without an answer, so the sender retries for
32 s. pjsua2 exposes no hook in front of that; pjsip's own API does (`pjsip_endpt_register_module`), and
the wheel's `_pjsua2` library exports it, so this module is registered through ctypes.

It sits at priority 63: after the transaction layer (retransmissions) and the dialog layer (requests of a
dialog we hold), before pjsua's modules (64). So it sees each new out-of-dialog request once:

- ACK, CANCEL, OPTIONS: left to pjsip/pjsua (OPTIONS gets pjsua's stateless 200).
- INVITE: 503 + Retry-After while its source is blocked (sip/admission.py: answered INVITEs it left
  unacknowledged); then what no account would take: 403 (no account trusts the source), 488 (an offer we
  cannot answer; no offer where no account takes late offers), which spends none of the source's rate;
  then the source's rate and the process-wide intake (503 + Retry-After). What passes goes on to pjsua and
  `onIncomingCall`, which checks again per account. (An offer with no codec in common passes: pjsua
  refuses it itself, 488, before it takes it up.)
- MESSAGE, SUBSCRIBE, PUBLISH, REGISTER, REFER: 405 with our Allow (pjsua's Allow loses them too); a
  request of a dialog we do not hold (To tag, or BYE/INFO/UPDATE/PRACK/NOTIFY): 481; other methods: 501.

Every answer here is stateless (no transaction, dialog or socket), counted and reported by source
(admission.Report). The module reads two things pjsip's API has no getter for, the request's text and its
source address, at fixed offsets of `pjsip_rx_data` (pjproject 2.15.1, PJSIP_MAX_PKT_LEN 4000, 64-bit),
checked on every request; when a check fails the module steps aside for good (one log line) and pjsua
behaves as it did without it. `Gate.terminate` drops an answered INVITE's session whose ACK never came
(pjsua's own hangup keeps the call slot until an ACK or 64 s).
"""
from __future__ import annotations

import ctypes
import ipaddress
import logging
import re
import time
from typing import TYPE_CHECKING

import pjsua2 as pj

from . import admission as adm
from .call_record import CallRecord
from .events import CallRejected, SourceRefused
from .offer import NO_CODEC

if TYPE_CHECKING:
    from .endpoint import Endpoint

log = logging.getLogger(__name__)

PRIORITY = 63  # PJSIP_MOD_PRIORITY_APPLICATION (pjsua's modules) - 1; the dialog layer is 32

# pjsip_rx_data of pjproject 2.15.1 on 64-bit platforms: tp_info (pool, transport, tp_data, op_key of 35
# pointers) is 304 bytes, pkt_info's timestamp 16, then packet[PJSIP_MAX_PKT_LEN = 4000]; pkt_info ends with
# src_name[46] and src_port, msg_info starts with msg_buf and len.
_PACKET = 320
_PACKET_LEN = 4000
_SRC_NAME, _SRC_NAME_LEN = 4368, 46
_SRC_PORT = 4416
_MSG_BUF = 4424
_MSG_LEN = 4432
# pjsip_generic_array_hdr: 64 bytes of pjsip_hdr (name at 24), `unsigned count` at 64, pj_str_t values at 72
_HDR_NAME, _ARRAY_COUNT, _ARRAY_VALUES, _ARRAY_MAX = 24, 64, 72, 32
_H_ALLOW = 4  # pjsip_hdr_e's PJSIP_H_ALLOW ("DO NOT CHANGE THE VALUE/ORDER OF THE HEADER IDs")

NOT_SERVED = frozenset({"MESSAGE", "SUBSCRIBE", "PUBLISH", "REGISTER", "REFER"})
DIALOG_ONLY = frozenset({"BYE", "INFO", "UPDATE", "PRACK", "NOTIFY"})
# methods pjsua announces in Allow that we answer 405 (its IM, presence and transfer modules add them;
# a REFER within a call is declined 603, sip/call.py)
_NOT_ALLOWED = frozenset({"MESSAGE", "SUBSCRIBE", "PUBLISH", "REFER"})
_COMPACT = {"t": "to", "f": "from", "l": "content-length", "c": "content-type", "i": "call-id"}
REJECTED_EVENTS_PER_S = 20.0  # CallRejected events for INVITEs refused here (403/488): beyond, only counted


class _PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("slen", ctypes.c_ssize_t)]


_ON_RX = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class _PjsipModule(ctypes.Structure):
    # struct pjsip_module (sip_module.h), unchanged since pjsip 1.x
    _fields_ = [("prev", ctypes.c_void_p), ("next", ctypes.c_void_p), ("name", _PjStr), ("id", ctypes.c_int),
                ("priority", ctypes.c_int), ("load", ctypes.c_void_p), ("start", ctypes.c_void_p),
                ("stop", ctypes.c_void_p), ("unload", ctypes.c_void_p), ("on_rx_request", _ON_RX),
                ("on_rx_response", ctypes.c_void_p), ("on_tx_request", ctypes.c_void_p),
                ("on_tx_response", ctypes.c_void_p), ("on_tsx_state", ctypes.c_void_p)]


class _ListHead(ctypes.Structure):
    # a pjsip_hdr list head: pjsip_endpt_respond_stateless reads only its prev/next links
    _fields_ = [("prev", ctypes.c_void_p), ("next", ctypes.c_void_p), ("rest", ctypes.c_char * 48)]


def _library() -> ctypes.CDLL | None:
    """The wheel's own library (the same instance pjsua2 runs in), with the few functions used here."""
    try:
        lib = ctypes.CDLL(pj._pjsua2.__file__)
        lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
        lib.pjsip_endpt_register_module.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_endpt_unregister_module.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_endpt_respond_stateless.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_generic_string_hdr_create.restype = ctypes.c_void_p
        lib.pjsip_generic_string_hdr_create.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.pjsip_endpt_get_capability.restype = ctypes.c_void_p
        lib.pjsip_endpt_get_capability.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.pjsip_rx_data_get_info.restype = ctypes.c_char_p
        lib.pjsip_rx_data_get_info.argtypes = [ctypes.c_void_p]
        lib.pjsip_ua_find_dialog.restype = ctypes.c_void_p
        lib.pjsip_ua_find_dialog.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.pjsip_dlg_get_inv_session.restype = ctypes.c_void_p
        lib.pjsip_dlg_get_inv_session.argtypes = [ctypes.c_void_p]
        lib.pjsip_inv_terminate.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.pjsip_dlg_dec_lock.argtypes = [ctypes.c_void_p]
        return lib
    except (AttributeError, OSError) as exc:
        log.warning("SIP gate unavailable (pjsip symbols not found in the pjsua2 library: %s); floods and "
                    "unserved methods reach pjsua unfiltered", exc)
        return None


class Request:
    """What the gate reads of one request: its method, source and the few headers it decides on."""

    __slots__ = ("method", "source_ip", "source", "uri_user", "to_tag", "from_uri", "to_uri", "call_id", "body")

    def __init__(self, method: str, source_ip: str, source: str, uri_user: str, to_tag: bool, from_uri: str,
                 to_uri: str, call_id: str, body: str):
        self.method, self.source_ip, self.source, self.uri_user = method, source_ip, source, uri_user
        self.to_tag, self.from_uri, self.to_uri, self.call_id, self.body = to_tag, from_uri, to_uri, call_id, body


def parse_request(raw: bytes, method: str, source_ip: str, source_port: int) -> Request:
    """The request in `raw`, one SIP message pjsip has parsed already as a `method` request. Text that is
    not UTF-8 is kept as backslash escapes (\\xff), which every encoder takes."""
    head, sep, body = raw.lstrip(b"\r\n").partition(b"\r\n\r\n")
    if not sep:
        head, _, body = head.partition(b"\n\n")
    lines = head.decode("utf-8", "backslashreplace").replace("\r\n", "\n").split("\n")
    start = lines[0].split()
    uri = start[1] if len(start) > 1 else ""
    headers: dict[str, str] = {}
    name = None
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and name is not None:  # a folded line continues the last header
            headers[name] += " " + line.strip()
            continue
        key, colon, value = line.partition(":")
        if not colon:
            continue
        name = _COMPACT.get(key.strip().lower(), key.strip().lower())
        headers.setdefault(name, value.strip())
    length = headers.get("content-length", "")
    if length.isdigit():
        body = body[:int(length)]
    shown = f"[{source_ip}]" if ":" in source_ip else source_ip
    to = headers.get("to", "")
    return Request(method, source_ip, f"{shown}:{source_port}", uri.partition(":")[2].partition("@")[0]
                   if "@" in uri else "", _has_tag(to), _uri_of(headers.get("from", "")), _uri_of(to),
                   headers.get("call-id", ""), body.decode("utf-8", "backslashreplace"))


def _header_params(value: str) -> str:
    """The header's own parameters: after the <URI> when there is one, else after the URI's first ';'."""
    if "<" in value and ">" in value:
        return value[value.index(">") + 1:]
    return value.partition(";")[2]


def _has_tag(to: str) -> bool:
    return _tag_of(to) is not None  # RFC 3261 25.1: "tag = x" (spaces around the "=") is a tag too


def _tag_of(value: str) -> str | None:
    for p in _header_params(value).split(";"):
        name, eq, tag = p.partition("=")
        if eq and name.strip().lower() == "tag":
            return tag.strip()
    return None


def dialog_tags(message: str) -> tuple[str | None, str | None]:
    """(From tag, To tag) of a SIP message's text (pjsua2's wholeMsg); None for a tag it lacks."""
    found: dict[str, str] = {}
    # a header may be folded onto continuation lines (RFC 3261 7.3.1; RFC 4475's wsinv): unfolded first,
    # else a folded From loses its tag and the call cannot be dropped by its dialog
    head = re.sub(r"\r\n[ \t]+", " ", message.split("\r\n\r\n", 1)[0])
    for line in head.split("\r\n")[1:]:
        key, colon, value = line.partition(":")
        name = _COMPACT.get(key.strip().lower(), key.strip().lower())
        if colon and name in ("from", "to") and name not in found:
            found[name] = value.strip()
    return _tag_of(found.get("from", "")), _tag_of(found.get("to", ""))


def _uri_of(value: str) -> str:
    if "<" in value and ">" in value:
        return value[value.index("<") + 1:value.index(">")].strip()
    return value.partition(";")[0].strip()


def _split_host(entry: str) -> str:
    # "host", "host:port", "[v6]", "[v6]:port" -> host (brackets kept)
    if entry.startswith("["):
        return entry[: entry.index("]") + 1] if "]" in entry else entry
    return entry.partition(":")[0] if entry.count(":") == 1 else entry


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Gate:
    """The module, bound to one running endpoint. Installed and removed on its SIP thread."""

    def __init__(self, hub: Endpoint):
        self.hub = hub
        # the hosts accounts trust by name (trusted_sources, a registrar): a PBX or trunk carries many callers
        trusted = tuple(h.strip("[]") for acc in hub._accounts.values() for h in
                        (_split_host(t) for t in (acc.trusted or ())) if _is_ip(h.strip("[]")))
        self.admission = adm.Admission(hub.config.admission, time.monotonic(), exempt=trusted)
        self.active = False
        self._lib = None
        self._endpt = None
        self._cb = _ON_RX(self._on_rx_request)  # kept: pjsip holds only the C pointer
        self._name = ctypes.create_string_buffer(b"mod-callbot-gate")
        self._module = _PjsipModule(name=_PjStr(ctypes.addressof(self._name), 16), id=-1, priority=PRIORITY,
                                    on_rx_request=self._cb)
        self._allow = "INVITE, ACK, CANCEL, OPTIONS, BYE"
        self._events = adm.TokenBucket(REJECTED_EVENTS_PER_S, REJECTED_EVENTS_PER_S, time.monotonic())

    def install(self) -> bool:
        """Registers the module (after libStart); False, with one log line, where the wheel lacks the API."""
        lib = _library()
        if lib is None:
            return False
        endpt = lib.pjsua_get_pjsip_endpt()
        status = lib.pjsip_endpt_register_module(endpt, ctypes.byref(self._module))
        if status != 0:
            log.warning("SIP gate not registered (pjsip status %d); floods reach pjsua unfiltered", status)
            return False
        self._lib, self._endpt, self.active = lib, endpt, True
        self._allow = self._trim_allow()
        return True

    def uninstall(self) -> None:
        """Before libDestroy: no Python callback runs inside pjsua's own shutdown."""
        if self._lib is not None and self._module.id >= 0:
            self._lib.pjsip_endpt_unregister_module(self._endpt, ctypes.byref(self._module))
        self.active = False

    # ---- the endpoint's Allow header

    def _trim_allow(self) -> str:
        """Drops MESSAGE, SUBSCRIBE, PUBLISH and REFER from the Allow pjsua sends (OPTIONS, 200s): we answer them
        405 now. Returns the Allow value our 405s carry (the same list)."""
        fallback = "INVITE, ACK, CANCEL, OPTIONS, BYE, INFO, UPDATE, PRACK, NOTIFY, REFER"
        hdr = self._lib.pjsip_endpt_get_capability(self._endpt, _H_ALLOW, None)
        if not hdr:
            return fallback
        name = _PjStr.from_address(hdr + _HDR_NAME)
        count = ctypes.c_uint.from_address(hdr + _ARRAY_COUNT)
        if name.slen != 5 or ctypes.string_at(name.ptr, 5) != b"Allow" or not 0 < count.value <= _ARRAY_MAX:
            log.warning("SIP gate: pjsip's Allow header is not laid out as expected; left as it is")
            return fallback
        values = (_PjStr * _ARRAY_MAX).from_address(hdr + _ARRAY_VALUES)
        methods = [ctypes.string_at(v.ptr, v.slen).decode("ascii", "replace") for v in values[:count.value]]
        if not all(m.isalpha() and m.isupper() for m in methods):
            log.warning("SIP gate: pjsip's Allow header holds %r; left as it is", methods)
            return fallback
        kept = [i for i, m in enumerate(methods) if m not in _NOT_ALLOWED]
        entries = [(values[i].ptr, values[i].slen) for i in kept]
        for slot, (ptr, slen) in enumerate(entries):
            values[slot].ptr, values[slot].slen = ptr, slen
        count.value = len(entries)
        return ", ".join(methods[i] for i in kept)

    # ---- requests

    def _read(self, rdata: int) -> Request | None:
        """The request at `rdata`, after checking that pjsip_rx_data is laid out as this module assumes."""
        msg_buf = ctypes.c_void_p.from_address(rdata + _MSG_BUF).value or 0
        length = ctypes.c_int.from_address(rdata + _MSG_LEN).value
        port = ctypes.c_int.from_address(rdata + _SRC_PORT).value
        name = ctypes.string_at(rdata + _SRC_NAME, _SRC_NAME_LEN)
        packet = rdata + _PACKET
        if (not packet <= msg_buf < packet + _PACKET_LEN or not 0 < length <= packet + _PACKET_LEN - msg_buf
                or not 0 <= port <= 65535 or b"\0" not in name):
            return self._layout_failed(rdata)
        # the method as pjsip parsed it: "Request msg INVITE/cseq=1 (rdata0x...)"
        info = self._lib.pjsip_rx_data_get_info(rdata) or b""
        if not info.startswith(b"Request msg "):
            return None
        method = info[12:].partition(b"/")[0].decode("ascii", "replace").upper()
        ip = name.partition(b"\0")[0].decode("ascii", "replace")
        return parse_request(ctypes.string_at(msg_buf, length), method, ip, port)

    def _layout_failed(self, rdata: int) -> None:
        self.active = False
        log.error("SIP gate: a request (rdata %s) is not where pjsip 2.15.1 keeps it; the gate steps aside and "
                  "pjsua answers everything itself from now on", hex(rdata))
        return None

    def _on_rx_request(self, rdata: int) -> int:
        # pjsip calls this on the SIP thread; returning 1 means answered here, 0 means pjsua goes on
        if not self.active or self.hub._closing:
            return 0
        try:
            req = self._read(rdata)
            if req is None:
                return 0
            answer = self._decide(req, time.monotonic())
            if answer is None:
                return 0
            code, reason, headers = answer
            self._respond(rdata, code, headers)
            return 1
        except Exception:  # a failure here costs this one request its filtering, never the process
            log.exception("SIP gate: request not filtered")
            return 0

    def _decide(self, req: Request, now: float) -> tuple[int, str, list[tuple[str, str]]] | None:
        method = req.method
        if method in ("ACK", "CANCEL"):
            return None
        if req.to_tag or method in DIALOG_ONLY:
            return self._refuse(req, now, 481, adm.NO_DIALOG)
        if method == "OPTIONS":
            return None
        if method in NOT_SERVED:
            return self._refuse(req, now, 405, adm.NOT_SERVED, [("Allow", self._allow)])
        if method != "INVITE":
            return self._refuse(req, now, 501, adm.UNKNOWN_METHOD)
        # a blocked source first; then what no account would take (stateless, so it spends none of the
        # source's rate: a caller behind the same address still gets through); then the rates, which
        # guard what pjsua spends on an INVITE it takes up
        a = self.admission
        refusal = a.blocked(req.source_ip, now)
        if refusal is None:
            answer, taken_up = self._invite_problem(req, now)
            if answer is not None:
                return answer
            refusal = a.check_invite(req.source_ip, now)
            if refusal is None and taken_up:
                refusal = a.take_intake(now)
            if refusal is None:
                return None
        return self._refuse(req, now, refusal.code, refusal.reason, [("Retry-After", str(refusal.retry_after_s))])

    def _invite_problem(self, req: Request, now: float):
        """(403/488 answer, None) for what no account of ours would take (each account checks again in
        onIncomingCall); else (None, whether pjsua will take the INVITE up: opening its media)."""
        accounts = list(self.hub._accounts.values())
        if not accounts:
            return None, True
        if not any(acc.trusts(req.source) for acc in accounts):
            why = f"INVITE from {req.source}, which no account trusts (trusted_sources)"
            return self._refuse(req, now, 403, adm.UNTRUSTED, rejected=why), False
        if not req.body.strip():
            if not any(acc.accepts_late_offer for acc in accounts):
                why = "INVITE without an SDP offer (late offer), which no account accepts (accept_late_offer)"
                return self._refuse(req, now, 488, adm.OFFER, rejected=why), False
            return None, True
        problem = self.hub._offer_problem(req.body)
        if problem == NO_CODEC:
            return None, False  # pjsua refuses it itself (488) before taking it up, and says so (by="pjsip")
        if problem is not None:
            return self._refuse(req, now, 488, adm.OFFER, rejected=problem), False
        return None, True

    def _refuse(self, req: Request, now: float, code: int, reason: str, headers=(), rejected: str | None = None):
        report = self.admission.refused(req.source_ip, reason, now)
        if report is not None:
            self.hub._source_report(report)
        if rejected is not None and self._events.take(now):
            # as onIncomingCall's own refusals: an INVITE answered with an error before it became a call
            account = next((name for name, acc in self.hub._accounts.items() if acc.cfg.user == req.uri_user),
                           next(iter(self.hub._accounts), ""))
            log.info("INVITE %s from %s refused (%d): %s", req.call_id, req.source, code, rejected)
            rec = CallRecord(call_id=req.call_id, direction="inbound", account=account, local_uri=req.to_uri,
                             remote_uri=req.from_uri, start=time.time())
            rec.end, rec.hangup_cause, rec.hangup_code = rec.start, "rejected", code
            rec.hangup_reason = "Forbidden" if code == 403 else "Not Acceptable Here"
            self.hub._keep_record(rec)
            self.hub._emit(CallRejected(at=now, account=account, remote_uri=req.from_uri, code=code, reason=rejected))
        return code, reason, list(headers)

    @staticmethod
    def _pj_str(buf: ctypes.Array) -> _PjStr:
        return _PjStr(ctypes.addressof(buf), len(buf.value))

    def _respond(self, rdata: int, code: int, headers: list[tuple[str, str]]) -> None:
        head = _ListHead()
        head.prev = head.next = ctypes.addressof(head)
        if headers:
            pool = ctypes.c_void_p.from_address(rdata).value  # tp_info.pool: the first field
            last = ctypes.addressof(head)
            for name, value in headers:
                # pjsip copies both strings into the pool: the buffers may go when this returns
                name_buf = ctypes.create_string_buffer(name.encode())
                value_buf = ctypes.create_string_buffer(value.encode())
                hdr = self._lib.pjsip_generic_string_hdr_create(pool, ctypes.byref(self._pj_str(name_buf)),
                                                                ctypes.byref(self._pj_str(value_buf)))
                if not hdr:
                    continue
                # append to the list: hdr.prev = last, hdr.next = head, last.next = hdr, head.prev = hdr
                ctypes.c_void_p.from_address(hdr).value = last
                ctypes.c_void_p.from_address(hdr + 8).value = ctypes.addressof(head)
                ctypes.c_void_p.from_address(last + 8).value = hdr
                head.prev = hdr
                last = hdr
        self._lib.pjsip_endpt_respond_stateless(self._endpt, rdata, code, None, ctypes.byref(head), None)

    def terminate(self, call_id: str, local_tag: str, remote_tag: str, code: int) -> bool:
        """Ends the INVITE session of that dialog at once (pjsip_inv_terminate: DISCONNECTED now, no BYE, the
        2xx retransmissions stop), as pjsua does itself only when a hangup failed 5 times. False when pjsip
        has no such dialog (or the gate is not installed): then the caller hangs up the usual way."""
        if self._lib is None:
            return False
        keep = [ctypes.create_string_buffer(t.encode("utf-8", "surrogateescape"))
                for t in (call_id, local_tag, remote_tag)]
        strs = [_PjStr(ctypes.addressof(b), len(b.value)) for b in keep]
        dlg = self._lib.pjsip_ua_find_dialog(*(ctypes.byref(s) for s in strs), 1)  # locked when found
        if not dlg:
            return False
        try:
            inv = self._lib.pjsip_dlg_get_inv_session(dlg)
            if not inv:
                return False
            return self._lib.pjsip_inv_terminate(inv, code, 1) == 0
        finally:
            self._lib.pjsip_dlg_dec_lock(dlg)

    def stats(self) -> dict:
        return {"active": self.active, **self.admission.stats()}

    def sweep(self) -> None:
        for report in self.admission.sweep(time.monotonic()):
            self.hub._source_report(report)


def report_event(report: adm.Report, cfg) -> SourceRefused:
    return SourceRefused(at=time.monotonic(), source=report.source, counts=report.counts, first=report.first,
                         message=report.message(cfg))
