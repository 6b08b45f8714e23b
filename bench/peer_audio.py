"""The phone in the latency suite: a bare pjsua2 process that calls a URI, speaks a train of clicks and
keeps what it hears, with the monotonic time of every 20 ms frame it handed out and got back.

Why a process of its own: pjsip allows one endpoint per process, and the peer must be an independent
user agent with its own jitter buffer and clock, as a real phone is. Its conference bridge runs at the
codec's rate (8 kHz for PCMU, 16 kHz for G.722) so that the peer itself resamples nothing: whatever
delay is measured beyond its jitter buffer and ptime belongs to the far side.

Usage (bench/bench_latency.py runs it):
    python bench/peer_audio.py --uri sip:bench@127.0.0.1:5070 --codec PCMU --clicks 100 --out result.npz

The result (.npz): `sent` (int64 click start positions in the stream the peer sent, samples),
`heard` (int16, everything the peer received, in order), `t_req` / `t_rcv` (int64 ns, CLOCK_MONOTONIC,
one per frame requested / received), `rate`, `frame`, and `jbuf` (the peer's jitter buffer state at the
end: prefetch, min/avg/max delay ms). It prints one JSON line, {"ev": "done", ...}, when it has written it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import pjsua2 as pj

CODEC_RATES = {"PCMU": 8000, "PCMA": 8000, "G722": 16000}
WARMUP_S = 1.0  # silence first: the jitter buffers settle before the first click


def click(rate: int) -> np.ndarray:
    """A 4 ms Hann-windowed 1 kHz burst: survives G.711 and G.722 and any band-limited resampler
    intact enough for a matched filter to place it to a sample."""
    n = int(rate * 0.004)
    t = np.arange(n) / rate
    return (12000 * np.hanning(n) * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)


class ClickPort(pj.AudioMediaPort):
    def __init__(self, rate: int, clicks: int, interval_s: float, total_frames: int):
        super().__init__()
        self.rate = rate
        self.n = rate // 50
        self.signal = np.zeros(total_frames * self.n, np.int16)
        burst = click(rate)
        start = int(WARMUP_S * rate)
        self.sent = np.array([start + int(round(i * interval_s * rate)) for i in range(clicks)], np.int64)
        for s in self.sent:
            self.signal[s:s + len(burst)] = burst
        self.t_req = np.zeros(total_frames + 64, np.int64)
        self.t_rcv = np.zeros(total_frames + 64, np.int64)
        self.heard = bytearray()
        self.k_req = 0
        self.k_rcv = 0
        self.total_frames = total_frames
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, rate, 1, 20000, 16)
        self.createPort("clicks", fmt)

    def onFrameRequested(self, frame):
        k = self.k_req
        if k < len(self.t_req):
            self.t_req[k] = time.monotonic_ns()
        chunk = self.signal[k * self.n:(k + 1) * self.n]
        data = chunk.tobytes() + bytes(2 * self.n - 2 * len(chunk))
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = pj.ByteVector(data)
        frame.size = len(data)
        self.k_req = k + 1

    def onFrameReceived(self, frame):
        k = self.k_rcv
        if k >= len(self.t_rcv):
            return
        self.t_rcv[k] = time.monotonic_ns()
        data = bytes(frame.buf)
        if len(data) != 2 * self.n:  # an empty frame (nothing decoded yet) still takes its 20 ms
            data = bytes(2 * self.n)
        self.heard += data
        self.k_rcv = k + 1


def _disconnect(am, port) -> None:
    """Takes `port` off the bridge while the call is up: a port collected while the bridge still calls
    it loses its attributes first (AttributeError in the callback, then a crash). A function of its own
    so that no loop variable keeps a reference past libDestroy."""
    for src, dst in ((am, port), (port, am)):
        try:
            src.stopTransmit(dst)
        except pj.Error:
            pass


class PeerCall(pj.Call):
    def __init__(self, peer, acc):
        super().__init__(acc)
        self.peer = peer
        self.state = None

    def onCallState(self, prm):
        ci = self.getInfo()
        self.state = ci.state

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE and self.peer.port is None:
                self.peer.media_index = mi.index
                si = self.getStreamInfo(mi.index)
                self.peer.codec = str(si.codecName)
                a = self.peer.args
                port = ClickPort(self.peer.rate, a.clicks, a.interval_ms / 1000, self.peer.total_frames)
                am = self.getAudioMedia(mi.index)
                am.startTransmit(port)
                port.startTransmit(am)
                self.peer.port = port


class Peer:
    def __init__(self, args):
        self.args = args
        self.rate = CODEC_RATES[args.codec]
        self.total_frames = int((WARMUP_S + args.clicks * args.interval_ms / 1000 + 1.0) * 50)
        self.port = None
        self.codec = None
        self.media_index = 0

    def run(self) -> int:
        a = self.args
        ep = pj.Endpoint()
        ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.logConfig.level = 0
        cfg.logConfig.consoleLevel = 0
        cfg.medConfig.clockRate = self.rate
        cfg.medConfig.sndClockRate = self.rate
        cfg.medConfig.sndAutoCloseTime = -1
        # a click between silences is what a voice activity detector drops: the phone sends every frame
        cfg.medConfig.noVad = True
        ep.libInit(cfg)
        ep.audDevManager().setNullDev()
        tc = pj.TransportConfig()
        tc.port = 0
        tc.boundAddress = "127.0.0.1"
        ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
        ep.libStart()
        for c in ep.codecEnum2():
            ep.codecSetPriority(c.codecId, 250 if c.codecId.upper().startswith(a.codec) else 0)
        acfg = pj.AccountConfig()
        acfg.idUri = "sip:phone@127.0.0.1"
        acc = pj.Account()
        acc.create(acfg)
        call = PeerCall(self, acc)
        call.makeCall(a.uri, pj.CallOpParam(True))
        deadline = time.monotonic() + self.total_frames / 50 + 20
        result = {"ev": "done"}
        jbuf = np.zeros(4)
        try:
            while time.monotonic() < deadline:
                ep.libHandleEvents(10)
                if call.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                    result = {"ev": "error", "message": "the call ended early"}
                    break
                if self.port is not None and self.port.k_rcv >= self.total_frames:
                    break
            else:
                result = {"ev": "error", "message": "timed out"}
            if self.port is not None:
                j = call.getStreamStat(self.media_index).jbuf
                jbuf = np.array([j.prefetch, j.minDelayMsec, j.avgDelayMsec, j.maxDelayMsec], np.float64)
                p = self.port
                np.savez(a.out, sent=p.sent, heard=np.frombuffer(bytes(p.heard), np.int16),
                         t_req=p.t_req[:p.k_req], t_rcv=p.t_rcv[:p.k_rcv], rate=self.rate, frame=p.n, jbuf=jbuf)
                result["codec"] = self.codec
                # off the bridge while the call is up: a port collected while the bridge still calls it
                # loses its attributes first (AttributeError in the callback, then a crash)
                _disconnect(call.getAudioMedia(self.media_index), p)
                del p  # every reference to the port must be gone before libDestroy
            try:
                call.hangup(pj.CallOpParam(True))
            except pj.Error:
                pass
            end = time.monotonic() + 3
            while call.state != pj.PJSIP_INV_STATE_DISCONNECTED and time.monotonic() < end:
                ep.libHandleEvents(10)
        finally:
            if self.port is not None:
                del self.port
                self.port = None
            del call
            acc.shutdown()
            del acc
            gc.collect()
            ep.libDestroy()
        print(json.dumps(result), flush=True)
        return 0 if result["ev"] == "done" else 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--uri", required=True)
    p.add_argument("--codec", choices=sorted(CODEC_RATES), default="PCMU")
    p.add_argument("--clicks", type=int, default=100)
    p.add_argument("--interval-ms", type=float, default=217.0)
    p.add_argument("--out", required=True)
    # pjlib writes to fd 1: keep stdout for the one JSON line
    args = p.parse_args()
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(saved, "w", buffering=1)
    return Peer(args).run()


if __name__ == "__main__":
    sys.exit(main())
