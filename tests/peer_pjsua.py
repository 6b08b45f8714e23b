"""A second SIP user agent for tests: a bare pjsua2 process driven over stdin/stdout (JSON lines).

It is written on pjsua2 directly, not on callbot.sip, so the endpoint under test talks to an
independent implementation. pjsip allows one endpoint per process, hence a process per peer.

Commands (one JSON object per stdin line): {"cmd": "call", "uri": ...}, {"cmd": "answer", "code": 200},
{"cmd": "hangup"}, {"cmd": "dtmf", "digits": "12#", "method": "rfc4733"|"info"},
{"cmd": "record", "path": "heard.wav"} (what the call's audio brings, from now until quit),
{"cmd": "play", "path": "said.wav"} (into the call, once; pjmedia's file player), {"cmd": "quit"}.
Commands act on the newest call unless "call_id" (the SIP Call-ID) names one.
Events (stdout): {"ev": "ready", "uri": ...}, "incoming", "progress", "state", "media", "dtmf",
"transfer_request", "disconnected" - each with "call_id" and details. Each command done answers
{"ev": "ok", "cmd": ..., "t": ...}: `t` is this host's monotonic clock (s, time.monotonic) when the command
took effect (dtmf: the digits handed to the stream; record: the recorder connected), so a bench can put
a key press and the recording's first sample on one clock.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import select
import sys
import threading

import pjsua2 as pj

_out_lock = threading.Lock()
# pjlib logs to fd 1 before any log configuration applies: events get a private copy of stdout and
# fd 1 is pointed at stderr, so that nothing but events reaches the test
_events = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)


def emit(ev: str, **fields) -> None:
    with _out_lock:
        _events.write(json.dumps({"ev": ev, **fields}) + "\n")
        _events.flush()


class PeerCall(pj.Call):
    def __init__(self, peer: "Peer", acc: pj.Account, call_id: int = pj.PJSUA_INVALID_ID):
        super().__init__(acc, call_id)
        self.peer = peer
        self.sip_id = ""

    def onCallState(self, prm):
        ci = self.getInfo()
        self.sip_id = ci.callIdString
        emit("state", call_id=self.sip_id, state=ci.stateText, code=ci.lastStatusCode, reason=ci.lastReason)
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            emit("disconnected", call_id=self.sip_id, code=ci.lastStatusCode, reason=ci.lastReason)
            # the object stays referenced until exit: after a transfer pjsua reuses it for the new call

    def onCallTsxState(self, prm):
        if prm.e.type != pj.PJSIP_EVENT_TSX_STATE:
            return
        tsx = prm.e.body.tsxState.tsx
        if tsx.method == "INVITE" and tsx.role == pj.PJSIP_ROLE_UAC and tsx.statusCode:
            emit("progress", call_id=self.getInfo().callIdString, code=tsx.statusCode, reason=tsx.statusText)

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                si = self.getStreamInfo(mi.index)
                emit("media", call_id=ci.callIdString, codec=si.codecName, rate=si.codecClockRate,
                     srtp=si.proto == pj.PJMEDIA_TP_PROTO_RTP_SAVP)
            elif mi.type == pj.PJMEDIA_TYPE_AUDIO:
                emit("media_status", call_id=ci.callIdString, status=int(mi.status))

    def onDtmfDigit(self, prm):
        method = "info" if prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc4733"
        emit("dtmf", call_id=self.sip_id, digit=prm.digit, method=method)

    def onCallTransferRequest(self, prm):
        emit("transfer_request", call_id=self.sip_id, dest=prm.dstUri)
        # accept (202); pjsua places the new call through this same object (setting prm.newCall to a
        # fresh Python Call crashes this wheel)
        prm.statusCode = 202

    def onCallTransferStatus(self, prm):
        emit("transfer_status", call_id=self.sip_id, code=prm.statusCode, final=prm.finalNotify)


class PeerAccount(pj.Account):
    def __init__(self, peer: "Peer"):
        super().__init__()
        self.peer = peer

    def onIncomingCall(self, prm):
        call = PeerCall(self.peer, self, prm.callId)
        ci = call.getInfo()
        call.sip_id = ci.callIdString
        self.peer.calls.append(call)
        emit("incoming", call_id=ci.callIdString, remote=ci.remoteUri)
        mode = self.peer.args.answer
        if mode == "busy":
            call.answer(_op(486))
        elif mode == "auto":
            call.answer(_op(180))
            self.peer.schedule(self.peer.args.ring_ms / 1000, lambda: _safe(call.answer, _op(200)))
        elif mode == "early":
            call.answer(_op(183))  # with SDP: early media
            self.peer.schedule(self.peer.args.ring_ms / 1000, lambda: _safe(call.answer, _op(200)))
        else:  # manual / never: ring until told
            call.answer(_op(180))

    def onRegState(self, prm):
        emit("reg", code=prm.code, reason=prm.reason, expires=prm.expiration)


def _op(code: int = 0) -> pj.CallOpParam:
    op = pj.CallOpParam(True)
    if code:
        op.statusCode = code
    return op


def _safe(fn, *a):
    try:
        fn(*a)
    except pj.Error as exc:
        emit("error", message=exc.info())


class Peer:
    def __init__(self, args):
        import time

        self.time = time
        self.args = args
        self.calls: list[PeerCall] = []
        self.timers: list = []
        self.media_ports: list = []  # recorders and players: released before the library goes

    def schedule(self, delay: float, fn) -> None:
        self.timers.append((self.time.monotonic() + delay, fn))

    def find(self, cmd: dict) -> PeerCall:
        want = cmd.get("call_id")
        for call in reversed(self.calls):
            if not call.isActive():
                continue
            if want is None or call.getInfo().callIdString == want:
                return call
        raise LookupError(f"no call {want!r}")

    def run(self) -> int:
        a = self.args
        ep = pj.Endpoint()
        ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.userAgent = "callbot-test-peer"
        cfg.logConfig.level = a.log_level
        cfg.logConfig.consoleLevel = a.log_level
        cfg.medConfig.clockRate = 16000
        cfg.medConfig.noVad = True  # RTP without pauses, as phones send it
        cfg.medConfig.sndAutoCloseTime = -1  # keep the null device clock running: RFC 4733 digits ride on it
        ep.libInit(cfg)
        ep.audDevManager().setNullDev()
        kinds = {"udp": pj.PJSIP_TRANSPORT_UDP, "tcp": pj.PJSIP_TRANSPORT_TCP, "tls": pj.PJSIP_TRANSPORT_TLS}
        tc = pj.TransportConfig()
        tc.port = a.port
        tc.boundAddress = "127.0.0.1"
        if a.transport == "tls":
            tc.tlsConfig.certFile = a.cert
            tc.tlsConfig.privKeyFile = a.key
            tc.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
        tid = ep.transportCreate(kinds[a.transport], tc)
        port = int(ep.transportGetInfo(tid).localName.rpartition(":")[2])
        ep.libStart()
        if a.codecs:
            wanted = a.codecs.split(",")
            for c in ep.codecEnum2():
                ep.codecSetPriority(c.codecId, 0)
            for i, w in enumerate(wanted):
                for c in ep.codecEnum2():
                    if c.codecId.lower().startswith(w.lower()):
                        ep.codecSetPriority(c.codecId, 250 - i)
        acfg = pj.AccountConfig()
        params = "" if a.transport == "udp" else f";transport={a.transport}"
        if a.registrar:
            acfg.idUri = f"sip:{a.user}@127.0.0.1"
            acfg.regConfig.registrarUri = a.registrar
            acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", a.user, 0, a.password))
        else:
            acfg.idUri = f"sip:{a.user}@127.0.0.1:{port}{params}"
        acfg.sipConfig.transportId = tid
        acfg.mediaConfig.srtpUse = {"off": pj.PJMEDIA_SRTP_DISABLED, "optional": pj.PJMEDIA_SRTP_OPTIONAL,
                                    "mandatory": pj.PJMEDIA_SRTP_MANDATORY}[a.srtp]
        acfg.mediaConfig.srtpSecureSignaling = 0
        self.acc = PeerAccount(self)
        self.acc.create(acfg)
        emit("ready", uri=f"sip:{a.user}@127.0.0.1:{port}{params}", port=port)

        buf = b""
        running = True
        while running:
            ep.libHandleEvents(10)
            now = self.time.monotonic()
            due = [t for t in self.timers if t[0] <= now]
            self.timers = [t for t in self.timers if t[0] > now]
            for _, fn in due:
                fn()
            r, _, _ = select.select([sys.stdin], [], [], 0)
            if not r:
                continue
            chunk = sys.stdin.buffer.read1(65536)
            if not chunk:  # the test went away: leave too
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    running = self.command(json.loads(line)) and running
        for call in self.calls:
            if call.isActive():
                _safe(call.hangup, _op())
        end = self.time.monotonic() + 2
        while any(c.isActive() for c in self.calls) and self.time.monotonic() < end:
            ep.libHandleEvents(10)
        self.calls.clear()
        self.media_ports.clear()
        self.acc.shutdown()
        del self.acc
        gc.collect()
        ep.libDestroy()
        return 0

    def command(self, cmd: dict) -> bool:
        name = cmd["cmd"]
        t = self.time.monotonic()  # when the command took effect (re-stamped where its action comes later)
        try:
            if name == "quit":
                return False
            if name == "call":
                call = PeerCall(self, self.acc)
                call.makeCall(cmd["uri"], _op())
                call.sip_id = call.getInfo().callIdString
                self.calls.append(call)
                emit("calling", call_id=call.sip_id, seq=cmd.get("seq"))
            elif name == "answer":
                self.find(cmd).answer(_op(cmd.get("code", 200)))
            elif name == "hangup":
                self.find(cmd).hangup(_op(cmd.get("code", 0)))
            elif name == "hold":
                self.find(cmd).setHold(_op())
            elif name == "unhold":
                op = _op()
                op.opt.flag = pj.PJSUA_CALL_UNHOLD
                self.find(cmd).reinvite(op)
            elif name == "transfer":
                self.find(cmd).xfer(cmd["uri"], _op())
            elif name == "dtmf":
                call = self.find(cmd)
                prm = pj.CallSendDtmfParam()
                prm.digits = cmd["digits"]
                prm.method = (pj.PJSUA_DTMF_METHOD_SIP_INFO if cmd.get("method") == "info"
                              else pj.PJSUA_DTMF_METHOD_RFC2833)
                t = self.time.monotonic()
                call.sendDtmf(prm)
            elif name == "record":
                rec = pj.AudioMediaRecorder()
                rec.createRecorder(cmd["path"])
                media = self.find(cmd).getAudioMedia(-1)
                t = self.time.monotonic()  # the recorder's first frame is the bridge's next tick after this
                media.startTransmit(rec)
                self.media_ports.append(rec)
            elif name == "play":
                player = pj.AudioMediaPlayer()
                player.createPlayer(cmd["path"], pj.PJMEDIA_FILE_NO_LOOP)
                player.startTransmit(self.find(cmd).getAudioMedia(-1))
                self.media_ports.append(player)
            else:
                emit("error", message=f"unknown command {name!r}")
            emit("ok", cmd=name, t=t)
        except (pj.Error, LookupError) as exc:
            emit("error", cmd=name, message=exc.info() if isinstance(exc, pj.Error) else str(exc))
        return True


def main() -> int:
    faulthandler.enable()
    p = argparse.ArgumentParser()
    p.add_argument("--transport", choices=["udp", "tcp", "tls"], default="udp")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--user", default="peer")
    p.add_argument("--answer", choices=["auto", "early", "busy", "manual"], default="auto")
    p.add_argument("--ring-ms", type=int, default=0)
    p.add_argument("--srtp", choices=["off", "optional", "mandatory"], default="off")
    p.add_argument("--codecs", default="")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--registrar")
    p.add_argument("--password", default="")
    p.add_argument("--log-level", type=int, default=0)
    return Peer(p.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
