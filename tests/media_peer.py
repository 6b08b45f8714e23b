"""A pjsua2 caller that plays a WAV into a call and records what it hears, for media tests and benches.

Its own process (pjsip allows one endpoint per process), written on pjsua2 directly so the endpoint
under test meets an independent implementation. The player and the recorder are pjmedia's C ports: no
Python runs on this side's media path.

    python tests/media_peer.py --uri sip:echo@127.0.0.1:5070 --codec PCMU --play in.wav --record out.wav
        [--seconds 3]   hang up this long after the media starts (default: stay until stdin closes)

Events on stdout, one JSON object a line: ready, media {codec, rate}, jitter_buffer {avg_delay_ms, ...}
(every second, with rx_packets: RTP packets received so far), disconnected {code}, done.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import select
import sys
import time

import pjsua2 as pj

# pjlib writes to fd 1 before its log settings apply: events go to a private copy of stdout
_events = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)


def emit(ev: str, **fields) -> None:
    _events.write(json.dumps({"ev": ev, **fields}) + "\n")


class Call(pj.Call):
    def __init__(self, acc, args):
        super().__init__(acc)
        self.args = args
        self.player = None
        self.recorder = None
        self.media_at = None
        self.ended = False

    def onCallState(self, prm):
        ci = self.getInfo()
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.ended = True
            emit("disconnected", code=ci.lastStatusCode)

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status != pj.PJSUA_CALL_MEDIA_ACTIVE or self.player:
                continue
            audio = self.getAudioMedia(mi.index)
            self.recorder = pj.AudioMediaRecorder()
            self.recorder.createRecorder(self.args.record)
            audio.startTransmit(self.recorder)
            self.player = pj.AudioMediaPlayer()
            self.player.createPlayer(self.args.play, pj.PJMEDIA_FILE_NO_LOOP)
            self.player.startTransmit(audio)
            si = self.getStreamInfo(mi.index)
            self.media_at = time.monotonic()
            emit("media", codec=si.codecName, rate=si.codecClockRate)


def emit_stream_stats(call: Call) -> None:
    """This side's jitter buffer as the call ends (a part of the round trip the echo test measures)."""
    ci = call.getInfo()  # kept: iterating the media of a temporary CallInfo reads freed memory
    for mi in ci.media:
        if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
            try:
                stat = call.getStreamStat(mi.index)
            except pj.Error as exc:
                emit("error", message=exc.info())
                return
            jb = stat.jbuf
            emit("jitter_buffer", avg_delay_ms=jb.avgDelayMsec, min_delay_ms=jb.minDelayMsec,
                 max_delay_ms=jb.maxDelayMsec, prefetch=jb.prefetch, lost=jb.lost, discard=jb.discard, empty=jb.empty,
                 rx_packets=stat.rtcp.rxStat.pkt)


def main() -> int:
    faulthandler.enable()
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--codec", required=True, help="PCMU, PCMA or G722: the only codec offered")
    p.add_argument("--play", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--seconds", type=float, default=0.0)
    args = p.parse_args()

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.logConfig.level = 2
    cfg.logConfig.consoleLevel = 2
    cfg.medConfig.clockRate = 16000
    cfg.medConfig.sndClockRate = 16000
    cfg.medConfig.sndAutoCloseTime = -1
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    tc = pj.TransportConfig()
    tc.port = 0
    tc.boundAddress = "127.0.0.1"
    tid = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
    port = int(ep.transportGetInfo(tid).localName.rpartition(":")[2])
    ep.libStart()
    for c in ep.codecEnum2():
        ep.codecSetPriority(c.codecId, 255 if c.codecId.upper().startswith(args.codec.upper() + "/") else 0)
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:media-peer@127.0.0.1:{port}"
    acfg.sipConfig.transportId = tid
    acc = pj.Account()
    acc.create(acfg)
    emit("ready", port=port)

    call = Call(acc, args)
    prm = pj.CallOpParam(True)
    call.makeCall(args.uri, prm)
    next_stats = 0.0
    while not call.ended:
        ep.libHandleEvents(10)
        if call.media_at and not call.ended and time.monotonic() >= next_stats:
            emit_stream_stats(call)  # every second: the last one before the end stands
            next_stats = time.monotonic() + 1.0
        if args.seconds and call.media_at and time.monotonic() - call.media_at >= args.seconds:
            emit_stream_stats(call)  # the whole call's numbers, just before the hangup
            call.hangup(pj.CallOpParam(True))
            args.seconds = 0.0
        if not args.seconds and select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.buffer.read1(1024):
            if call.isActive():
                call.hangup(pj.CallOpParam(True))  # the test went away: hang up and leave
            break
    end = time.monotonic() + 3
    while call.isActive() and time.monotonic() < end:
        ep.libHandleEvents(10)
    call.player = call.recorder = None  # the recorder's destructor finishes its WAV header
    del call
    acc.shutdown()
    del acc
    gc.collect()
    ep.libDestroy()
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
