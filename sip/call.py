"""One SIP call: its state machine as events, its media attached to an engine session, its record.

pjsua2 invokes these callbacks on the endpoint's SIP thread (DTMF over RTP on the media thread):
each one reads what it needs, updates the plain-data CallRecord, puts an event on the endpoint's
queue and returns. Anything that would drop a pjsua2 object is deferred to the SIP thread's loop,
because deleting a Call inside its own callback is unsafe.
"""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import pjsua2 as pj

from .call_record import REDACTED, CallRecord, DtmfRecord, TransferRecord, peer_text
from .callbacks import guarded
from .codecs import narrow_answer
from .events import (CallConfirmed, CallEnded, CallMedia, CallProgress, DtmfReceived, TransferProgress)
from .gate import dialog_tags

if TYPE_CHECKING:
    from .account import SipAccount
    from .endpoint import Endpoint
    from .media_session import MediaSession

log = logging.getLogger(__name__)

INBOUND, OUTBOUND = "inbound", "outbound"
_MEDIA_CHECK_S = 0.5  # how often an active call's stream statistics are read (RTP timeout, the record)
_DTMF_IS_END = 2  # PJMEDIA_STREAM_DTMF_IS_END, not exported by the SWIG module
_NOTIFY_KEPT = 100  # a transfer's NOTIFYs a record keeps (a few are normal: 100 Trying, 180, 200)
# attended transfer: how long a replaced consultation leg may stay up after the transfer succeeded (the
# target's UA drops it when the caller's INVITE with Replaces arrives; this is for one that does not)
_REPLACED_GRACE_S = 2.0
_SRTP_PROTOS = {pj.PJMEDIA_TP_PROTO_RTP_SAVP, pj.PJMEDIA_TP_PROTO_RTP_SAVPF,
                pj.PJMEDIA_TP_PROTO_DTLS_SRTP, pj.PJMEDIA_TP_PROTO_DTLS_SRTPF}


def weakly(call: SipCall, method: str, *args) -> Callable[[], None]:
    """A timer action that does not keep the call alive and does nothing once the call has ended.

    Why: pjsua2's Call keeps its pjsua slot number after DISCONNECTED, and its destructor clears (and
    hangs up) whatever call holds that slot when the Python object finally goes. A timer holding the
    object for its full delay (a 30 s dial timeout) could drop it after pjsua gave the slot to a new
    call; so only the endpoint's call table holds calls, and they go right after DISCONNECTED.
    """
    ref = weakref.ref(call)

    def run() -> None:
        obj = ref()
        if obj is not None and not obj.ended:
            getattr(obj, method)(*args)
    return run


def call_op(code: int = 0, reason: str = "", headers: tuple[tuple[str, str], ...] = ()) -> pj.CallOpParam:
    """`headers`: (name, value) pairs added to the message (a refusal's Retry-After)."""
    op = pj.CallOpParam(True)
    if code:
        op.statusCode = code
    if reason:
        op.reason = reason
    for name, value in headers:
        h = pj.SipHeader()
        h.hName, h.hValue = name, value
        op.txOption.headers.append(h)
    return op


def stream_summary(stat) -> dict:
    """The record's view of a pjsua2 StreamStat: what the network and pjmedia's jitter buffer did to the
    caller's audio before our media port saw it (RTP in -> our port), and what we sent."""
    rx, jb = stat.rtcp.rxStat, stat.jbuf
    return {
        "rx_packets": int(rx.pkt), "rx_lost": int(rx.loss), "rx_discarded": int(rx.discard),
        "rx_reordered": int(rx.reorder), "rx_duplicates": int(rx.dup),
        "rx_jitter_ms": {"mean": rx.jitterUsec.mean / 1000, "max": rx.jitterUsec.max / 1000},
        "tx_packets": int(stat.rtcp.txStat.pkt),
        # time a frame spent in the jitter buffer, from arrival to playout into the bridge (pjmedia's own
        # running statistics); frames it played out as concealment (`empty`) or dropped (`discarded`)
        "jitter_buffer_ms": {"avg": int(jb.avgDelayMsec), "min": int(jb.minDelayMsec), "max": int(jb.maxDelayMsec),
                             "dev": int(jb.devDelayMsec)},
        "jitter_buffer_frames": {"now": int(jb.size), "prefetch": int(jb.prefetch)},
        "jitter_buffer_lost": int(jb.lost), "jitter_buffer_discarded": int(jb.discard),
        "jitter_buffer_empty": int(jb.empty),
    }


class SipCall(pj.Call):
    """A call of ours. Created, operated and dropped only on the endpoint's SIP thread."""

    def __init__(self, hub: Endpoint, account: SipAccount, direction: str, pj_call_id: int = pj.PJSUA_INVALID_ID):
        super().__init__(account, pj_call_id)
        self.hub = hub
        self.account = account
        self.direction = direction
        self.record: CallRecord | None = None
        self.attachment = None  # media_port.MediaAttachment while media is attached
        self.session: MediaSession | None = None  # the session serving this call's audio
        self.recording = None  # recording.CallRecording while the call is recorded
        self.ended = False
        self.rejected = False  # answered with an error by our policy: never a call of ours
        self.ok_sent = False  # we answered 200 (inbound): until its ACK, pjsua's own hangup holds the slot
        self._hanging_up = False  # end() called pjsua's hangup: the stream is being torn down
        self.confirmed = False
        self.source: str | None = None  # inbound: where the INVITE came from ("host:port")
        # inbound: the dialog's tags (the INVITE's From tag, our answers' To tag), by which pjsip finds the
        # session when it must be dropped (sip/gate.py terminate)
        self.remote_tag: str | None = None
        self.local_tag: str | None = None
        self._local_cause: str | None = None
        self._last_progress = 0
        self._progress_done = False  # a final answer to our INVITE was reported
        # while audio flows: (media index, packets seen, when they last grew)
        self._media_watch: tuple[int, int, float] | None = None
        self._watch_chain = 0  # the timer chain that owns the watch (a hold/unhold within one period starts a new one)
        self.dial_limit_s: float | None = None  # outbound: how long it may ring before it is cancelled
        # attended transfer, kept as Call-IDs (a reference would keep a forgotten Call alive: see `weakly`).
        # On the call being transferred: its consultation leg. On that leg: the call it is for, when the REFER
        # with Replaces goes after the answer (None: when the app says), and whether it went.
        self.consult_id: str | None = None
        self.transfer_of: str | None = None
        self.refer_after_s: float | None = None
        self.referred = False

    @property
    def call_id(self) -> str:
        return self.record.call_id

    def init_record(self) -> CallRecord:
        ci = self.getInfo()
        # the peer's own text, bytes that are not UTF-8 included: escaped once here, so that the ids and
        # URIs every event, record, log line and engine message carries can be encoded (call_record.py)
        self.record = CallRecord(call_id=peer_text(ci.callIdString), direction=self.direction,
                                 account=self.account.name, local_uri=peer_text(ci.localUri),
                                 remote_uri=peer_text(ci.remoteUri), start=time.time())
        return self.record

    # ---- operations (SIP thread) ----

    def end(self, cause: str, code: int = 0, reason: str = "", force: bool = False) -> None:
        """Hang up (BYE, CANCEL or a final error to an unanswered INVITE), remembering why. `force`: drop the
        session at once, no BYE (an answered INVITE never ACKed, whose BYE pjsip holds until an ACK)."""
        if self.ended:
            return
        if self._local_cause is None:
            self._local_cause = cause
        # answered, not yet ACKed (e.g. the RTP timeout came first): pjsua would send its BYE only after an
        # ACK and keep the call slot meanwhile (up to 64 s), as at the ACK timeout
        force = force or (self.ok_sent and not self.confirmed)
        if self.attachment is not None:
            # our port leaves the bridge while the call's media is still there to disconnect from (by the
            # DISCONNECTED callback pjsua has removed the call's slot already); the recording and the
            # session are finished there, once the record holds the hangup cause
            try:
                self.attachment.detach()
            except Exception:
                log.exception("call %s: detaching media failed", self.call_id)
        if self._media_watch is not None and self.record is not None and not self.rejected:
            # the stream's final numbers now, while it is whole (from inside our own hangup, its
            # onStreamDestroyed callback, the stream is being torn down). The two SIGSEGVs once blamed
            # on this read were heap corruption from the media port's teardown (sip/media_port.py).
            self._read_stream(self._media_watch[0])
        self._hanging_up = True
        if force and self.hub._terminate(self, code or 408):
            return  # DISCONNECTED has come already
        try:
            self.hangup(call_op(code, reason))
        except pj.Error as exc:  # already going away: the DISCONNECTED callback still comes
            log.debug("hangup of %s: %s", self.record.call_id if self.record else "?", exc.info())
            return
        if self.confirmed:
            self.hub._drop_if_lingering(self, code or 408)

    def _dial_timeout(self) -> None:
        if not self.confirmed:
            self.end("timeout")

    def answer_now(self) -> None:
        if not self.ended and not self.confirmed:
            try:
                self.answer(call_op(200))
            except pj.Error as exc:
                log.warning("answer of %s failed: %s", self.call_id, exc.info())
                return
            self.ok_sent = self.direction == INBOUND
            if self.direction == INBOUND:
                self.hub._after(self.hub.config.admission.ack_timeout_s, weakly(self, "_ack_timeout"))

    def _ack_timeout(self) -> None:
        # our 200 was never ACKed (a spoofed or broken caller, or one that means to hold the slot): pjsip
        # would keep the call for 32 s and retransmit the 200; the slot goes now, the source is counted
        if not self.confirmed:
            log.warning("call %s from %s: no ACK %.1f s after our 200, hanging up", self.call_id, self.source,
                        self.hub.config.admission.ack_timeout_s)
            self.hub._unacked(self)
            # pjsua's own hangup sends its BYE only after the ACK and keeps the slot meanwhile: up to 64 s
            # (32 s of 200s, 32 s of BYE); dropped instead, the slot is free now
            self.end("no_ack", force=True)

    # ---- pjsua2 callbacks ----

    @guarded
    def onCallState(self, prm):
        if self.record is None:
            # pjsua reports a state from inside makeCall when the INVITE could not leave (e.g. a URI's
            # transport we do not listen on): makeCall then raises, and Endpoint._dial says why
            return
        ci = self.getInfo()
        now = time.monotonic()
        if self.rejected:
            if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self.hub._soon(lambda: self.hub._forget(self))
            return
        if self.direction == OUTBOUND and not self._progress_done and ci.lastStatusCode >= 200:
            # a final answer can reach onCallState before (or instead of) onCallTsxState
            self._report_progress(int(ci.lastStatusCode), str(ci.lastReason))
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED and not self.confirmed:
            self.confirmed = True
            self.record.answered = time.time()
            self.record.changed()
            self.hub._emit(CallConfirmed(at=now, call_id=self.call_id, direction=self.direction))
            limit = self.account.cfg.max_call_duration_s
            if limit is not None:
                self.hub._after(limit, weakly(self, "end", "max_duration"))
            if self.transfer_of is not None and self.refer_after_s is not None:
                # not from inside this callback: pjsua is still updating the dialog that the REFER names
                self.hub._after(self.refer_after_s, weakly(self, "refer_replacing"))
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED and not self.ended:
            self.ended = True
            code, reason = int(ci.lastStatusCode), peer_text(str(ci.lastReason))
            if self._local_cause is not None:
                cause = self._local_cause
            elif self.referred:
                cause = "transfer"  # the target dropped the consultation leg it replaced
            elif self.direction == OUTBOUND and not self.confirmed:
                cause = "failed"
            else:
                cause = "remote"
            rec = self.record
            rec.end = time.time()
            rec.hangup_cause, rec.hangup_code, rec.hangup_reason = cause, code, reason
            if self._media_watch is not None:
                self._read_stream(self._media_watch[0])  # the final numbers, while the stream is still there
            self._detach()
            self.hub._emit(CallEnded(at=now, call_id=self.call_id, code=code, reason=reason, cause=cause,
                                     stream=rec.stream))
            if self.transfer_of is not None:
                self._consultation_ended(cause, code, reason)
            if self.consult_id is not None:
                self._transferred_call_ended()
            self.hub._soon(lambda: self.hub._forget(self))

    @guarded
    def onCallTsxState(self, prm):
        if self.direction == INBOUND:
            # our answer to the INVITE carries the dialog's local tag (pjsua2 shows it nowhere else)
            if self.local_tag is None and prm.e.type == pj.PJSIP_EVENT_TSX_STATE:
                tsx = prm.e.body.tsxState.tsx
                if tsx.method == "INVITE" and tsx.role == pj.PJSIP_ROLE_UAS and int(tsx.statusCode) >= 100:
                    self.local_tag = dialog_tags(str(tsx.lastTx.wholeMsg))[1]
            return
        # responses to our INVITE, provisional ones included (onCallState skips a 100 Trying)
        if self._progress_done or prm.e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx = prm.e.body.tsxState.tsx
        code = int(tsx.statusCode)
        if tsx.method == "INVITE" and tsx.role == pj.PJSIP_ROLE_UAC and code:
            self._report_progress(code, str(tsx.statusText))

    def _report_progress(self, code: int, reason: str) -> None:
        if code == self._last_progress:
            return
        self._last_progress = code
        self._progress_done = code >= 200
        self.hub._emit(CallProgress(at=time.monotonic(), call_id=self.call_id, code=code, reason=reason))
        if self.transfer_of is not None and code < 200:  # the target ringing is the transfer's progress
            self.hub._emit(TransferProgress(at=time.monotonic(), call_id=self.transfer_of, code=code,
                                            reason=peer_text(reason), final=False))

    @guarded
    def onCallRxOffer(self, prm):
        # a re-INVITE's or UPDATE's offer: pjsua would accept one it cannot use (an address like
        # 999.1.1.1), fail to update the stream and leave the call without audio. The check a first
        # INVITE gets (offer.validate_offer), with 488 as the answer; the call goes on as it was.
        reason = self.hub._offer_problem(str(prm.offer.wholeSdp))
        if reason is not None:
            log.info("call %s: offer refused (488): %s", self.call_id, reason)
            prm.statusCode = 488

    @guarded
    def onCallSdpCreated(self, prm):
        # answering: make the negotiation choose by our codec priority, not the caller's
        offer = prm.remSdp.wholeSdp
        if offer:
            narrowed = narrow_answer(prm.sdp.wholeSdp, offer, self.hub.codecs)
            if narrowed is not None:
                prm.sdp.wholeSdp = narrowed

    @guarded
    def onCallMediaState(self, prm):
        if self.ended or self._local_cause is not None:
            return  # going away: no port to (re)attach
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE:
                continue
            si = self.getStreamInfo(mi.index)
            rec = self.record
            srtp = si.proto in _SRTP_PROTOS
            if (rec.codec, rec.codec_rate, rec.srtp) != (si.codecName, si.codecClockRate, srtp):
                rec.codec, rec.codec_rate, rec.srtp = str(si.codecName), int(si.codecClockRate), srtp
                rec.changed()
                self.hub._emit(CallMedia(at=time.monotonic(), call_id=self.call_id, codec=rec.codec,
                                         clock_rate=rec.codec_rate, srtp=srtp))
            audio = self.getAudioMedia(mi.index)
            if self.attachment is None:
                # the port runs at the bridge's rate whatever the codec (sip/media_port.py says why)
                rec.clock_rate = self.hub.config.conference_clock_rate
                self._attach(audio, rec.clock_rate)
            elif not self._port_connected(audio):
                self._reattach(audio)
            if self._media_watch is None:
                self._media_watch = (mi.index, -1, time.monotonic())
                self._watch_chain += 1
                self.hub._after(_MEDIA_CHECK_S, weakly(self, "_watch_media", self._watch_chain))
            return
        self._media_watch = None  # on hold or no audio: silence is expected

    def _read_stream(self, index: int) -> int | None:
        """Reads the audio stream's statistics into the record; the packets received so far (None if the
        stream is gone)."""
        try:
            stat = self.getStreamStat(index)
        except pj.Error:
            return None
        self.record.stream = stream_summary(stat)
        return self.record.stream["rx_packets"]

    def _watch_media(self, chain: int) -> None:
        """A timer on the SIP thread, every _MEDIA_CHECK_S while audio flows: keeps the stream's statistics
        in the record (the network half of the audio path: pjmedia's jitter buffer, losses) and ends a
        call whose RTP stopped for `rtp_timeout_s`."""
        if self.ended or self._media_watch is None or chain != self._watch_chain:
            return
        index, seen, since = self._media_watch
        packets = self._read_stream(index)
        if packets is None:  # the stream is being rebuilt (re-INVITE): look again next time
            self.hub._after(_MEDIA_CHECK_S, weakly(self, "_watch_media", chain))
            return
        now = time.monotonic()
        timeout = self.account.cfg.rtp_timeout_s
        if packets != seen:
            self._media_watch = (index, packets, now)
        elif timeout is not None and now - since >= timeout:
            log.info("call %s: no RTP for %.1f s, hanging up", self.call_id, now - since)
            self.end("rtp_timeout")
            return
        self.hub._after(_MEDIA_CHECK_S, weakly(self, "_watch_media", chain))

    @guarded
    def onStreamDestroyed(self, prm):
        # the last reading of the stream's statistics, as it goes (hold, re-INVITE, the peer's hang-up);
        # not during our own hangup, which read them just before (end)
        if self.record is not None and not self.rejected and not self._hanging_up:
            self._read_stream(int(prm.streamIdx))

    @guarded
    def onDtmfDigit(self, prm):
        # RFC 4733 digits arrive on the media thread, SIP INFO ones on the SIP thread: both only append
        # (the record keeps the first DTMF_KEPT; every digit is still an event)
        method = "info" if prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc4733"
        duration = int(prm.duration) if prm.duration < 0xFFFF else 0
        digit = peer_text(str(prm.digit))  # an INFO body's Signal= is the peer's text
        redacted = self.record.redact_dtmf
        self.record.add_dtmf(DtmfRecord(digit=REDACTED if redacted else digit, method=method, at=time.time(),
                                        duration_ms=duration))
        self.hub._emit(DtmfReceived(at=time.monotonic(), call_id=self.call_id, digit=digit,
                                    method=method, duration_ms=duration, redacted=redacted))

    @guarded
    def onDtmfEvent(self, prm):
        # pjsua2 also reports each RFC 4733 digit as it goes on; its end carries the length, which the
        # record (the sidecar) keeps. The event for the digit went out at its start (onDtmfDigit).
        if not prm.flags & _DTMF_IS_END or prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO:
            return
        for d in reversed(self.record.dtmf):
            if d.digit in (str(prm.digit), REDACTED) and d.method == "rfc4733" and d.duration_ms == 0:
                d.duration_ms = int(prm.duration)
                self.record.changed()
                break

    @guarded
    def onCallTransferStatus(self, prm):
        code, reason, final = int(prm.statusCode), peer_text(str(prm.reason)), bool(prm.finalNotify)
        xfer = self.record.transfer
        if xfer is not None:
            if len(xfer.notifications) < _NOTIFY_KEPT:  # one per NOTIFY the peer chooses to send
                xfer.notifications.append((code, reason))
            if final or code >= 200:
                xfer.succeeded = 200 <= code < 300
            self.record.changed()
        self.hub._emit(TransferProgress(at=time.monotonic(), call_id=self.call_id, code=code, reason=reason,
                                        final=final or code >= 200))
        leg = self._consultation()
        if 200 <= code < 300:
            prm.cont = False  # no further NOTIFYs wanted: the transfer is done, and so is this call
            self.hub._soon(weakly(self, "end", "transfer"))
            if leg is not None:  # replaced: its target drops it; if it does not, we do
                self.hub._after(_REPLACED_GRACE_S, weakly(leg, "end", "transfer"))
        elif code >= 300:
            prm.cont = False
            if leg is not None:  # the caller could not reach the target: the target's leg has no use now
                log.info("call %s: attended transfer failed (%d %s); hanging up leg %s", self.call_id, code,
                         reason, leg.call_id)
                self.hub._soon(weakly(leg, "end", "local"))

    @guarded
    def onCallTransferRequest(self, prm):
        # A REFER asking US to call someone else. pjsua would dial the target through this same Call
        # object (its events would then carry another call's ids and ending one leg would drop the
        # other), and handing it a fresh Python Call crashes this wheel: a bot declines.
        log.info("call %s: declining a transfer of us to %s", self.call_id, prm.dstUri)
        prm.statusCode = 603

    @guarded
    def onCallReplaceRequest(self, prm):
        # An INVITE with Replaces (attended transfer) aimed at this call: pjsua would move this Call
        # object onto the new call, the same hazard as above; declined too.
        log.info("call %s: declining an INVITE that would replace it", self.call_id)
        prm.statusCode = 603
        prm.reason = "Decline"

    # ---- transfer and DTMF out ----

    def blind_transfer(self, target: str) -> None:
        self.record.transfer = TransferRecord(target=target)
        self.record.changed()
        self.xfer(target, call_op())

    # ---- attended transfer (Endpoint.transfer_attended): this call is the consultation leg ----

    def _consultation(self) -> SipCall | None:
        """This call's consultation leg while it is up (on the call being transferred)."""
        leg = self.hub._calls.get(self.consult_id) if self.consult_id is not None else None
        return leg if leg is not None and not leg.ended else None

    def _transferred(self) -> SipCall | None:
        """The call this consultation leg is for, while it is up."""
        call = self.hub._calls.get(self.transfer_of) if self.transfer_of is not None else None
        return call if call is not None and not call.ended else None

    def refer_replacing(self) -> None:
        """REFER with Replaces to the caller of the call being transferred: call the target, replacing this
        leg (pjsua builds Refer-To from this leg's dialog: the target's URI, `Replaces` with its Call-ID and
        tags, `Require: replaces`). Once only; the caller's NOTIFYs then come to that call."""
        if self.referred or self.ended:
            return
        if not self.confirmed:
            raise ValueError(f"consultation leg {self.call_id} is not answered yet")
        call = self._transferred()
        if call is None:
            self.end("local")  # the caller is gone: nobody to connect the target to
            return
        self.referred = True
        try:
            call.xferReplaces(self, call_op())
        except pj.Error as exc:  # the call's dialog cannot send it (being re-INVITEd, going away)
            self.referred = False
            info = peer_text(exc.info())
            log.warning("call %s: REFER with Replaces failed: %s", call.call_id, info)
            self._transfer_failed(call, 500, f"REFER failed: {info}"[:200])
            self.end("local")
            return
        log.info("call %s: REFER with Replaces sent (consultation leg %s)", call.call_id, self.call_id)

    def _consultation_ended(self, cause: str, code: int, reason: str) -> None:
        """This leg is gone before its REFER went: the transfer failed, the call it is for goes on."""
        call = self._transferred()
        if call is None or self.referred or call.consult_id != self.call_id:
            return  # after the REFER the caller's NOTIFYs say how it went; a failure is reported once
        if cause == "timeout":
            code, reason = 408, f"no answer within {self.dial_limit_s:g} s"
        elif cause == "local":
            code, reason = 487, "consultation ended by us"
        elif self.confirmed or code < 300:
            code, reason = 480, "the transfer target hung up"
        self._transfer_failed(call, code, reason)

    @staticmethod
    def _transfer_failed(call: SipCall, code: int, reason: str) -> None:
        call.consult_id = None
        if call.record.transfer is not None:
            call.record.transfer.succeeded = False
            call.record.changed()
        call.hub._emit(TransferProgress(at=time.monotonic(), call_id=call.call_id, code=code, reason=reason,
                                        final=True))

    def _transferred_call_ended(self) -> None:
        """The call being transferred is gone: a leg still ringing or talking to the target is hung up (the
        caller left); one already referred is left to the target, which drops it on the INVITE/Replaces."""
        leg = self._consultation()
        if leg is not None and not leg.referred:
            self.hub._soon(weakly(leg, "end", "local"))

    def send_digits(self, digits: str, method: str) -> None:
        prm = pj.CallSendDtmfParam()
        prm.digits = digits
        prm.method = pj.PJSUA_DTMF_METHOD_SIP_INFO if method == "info" else pj.PJSUA_DTMF_METHOD_RFC2833
        self.sendDtmf(prm)

    # ---- media ----

    def _attach(self, audio: pj.AudioMedia, clock_rate: int) -> None:
        attach = self.hub._attach_media
        sessions = self.hub.sessions
        if attach is None or sessions is None:
            return  # nothing serves the audio: the call stays silent
        recorder = self.hub.recorder
        try:
            self.session = sessions.open_session(self.record)
            if recorder is not None:
                try:
                    self.recording = recorder.start(self.record, clock_rate)
                except Exception as err:  # the bot answers all the same: only the recording is lost
                    log.error("call %s: its recording did not start (%s); the call goes on unrecorded",
                              self.call_id, err)
            self.attachment = attach(audio, clock_rate, self.session, self.recording)
        except Exception:
            log.exception("call %s: attaching media failed; the call goes on silent", self.call_id)
            self._detach()

    def _port_connected(self, audio: pj.AudioMedia) -> bool:
        # after a hold/unhold (or any re-INVITE that rebuilds the stream) pjsua gives the call's audio
        # a new bridge slot - sometimes with the old number - and our port's links are gone
        port = getattr(self.attachment, "port", None)
        if port is None:
            return False
        try:
            mine, theirs = port.getPortId(), audio.getPortId()
            return mine in audio.getPortInfo().listeners and theirs in port.getPortInfo().listeners
        except pj.Error:
            return False

    def _reattach(self, audio: pj.AudioMedia) -> None:
        """A new port on the call's new slot, bound to the same engine session and recording."""
        old, self.attachment = self.attachment, None
        try:
            old.detach()
            self.attachment = self.hub._attach_media(audio, self.record.clock_rate, self.session, self.recording)
            log.info("call %s: media port re-attached after the call's audio changed", self.call_id)
        except Exception:
            log.exception("call %s: re-attaching media failed; the call goes on silent", self.call_id)

    def _detach(self) -> None:
        """Port off the bridge first (before the call's media goes: pjmedia_conf_remove_port), then the
        session closes (what it reports - what the model said, its step times - joins the record),
        then the recording is finished from the record as it stands."""
        attachment, self.attachment = self.attachment, None
        recording, self.recording = self.recording, None
        session, self.session = self.session, None
        if attachment is not None:
            try:
                attachment.detach()
            except Exception:
                log.exception("call %s: detaching media failed", self.call_id)
        if session is not None:
            try:
                self.hub.sessions.close_session(session, self.record)
            except Exception:
                log.exception("call %s: closing the call's session failed", self.call_id)
        if recording is not None:
            try:
                self.hub.recorder.finish(recording, self.record)
            except Exception:
                log.exception("call %s: finishing the recording failed", self.call_id)
