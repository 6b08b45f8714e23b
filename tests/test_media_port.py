"""sip/media_port.py on pjmedia's real conference bridge: a peer port plays a known signal into our port,
the echo engine sends it back, and the peer finds it in what it hears; the recording holds both sides.

The peer is a plain AudioMediaPort standing for a call's AudioMedia (what the bridge sees of a call is
exactly such a port), so this runs the media path with no SIP. Calls over SIP are in test_media_call.py.
"""

import gc
import time

import numpy as np
import pjsua2 as pj
import pytest

from callbot.engine.contract import CallStart
from callbot.engine.serving.echo import EchoEngine
from callbot.sip.media_port import attach_media
from callbot.app.recording import Recorder, read_recording

FRAMES = 75  # 1.5 s


@pytest.fixture(scope="module")
def bridge():
    """An endpoint with a null sound device whose bridge runs at 16 kHz; destroyed in the right order."""
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = 1
    cfg.logConfig.consoleLevel = 1
    cfg.uaConfig.threadCnt = 0
    cfg.medConfig.clockRate = 16000
    cfg.medConfig.sndClockRate = 16000
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    ep.libStart()
    yield ep
    gc.collect()
    ep.libDestroy()


def chirp(rate, frames):
    t = np.arange(frames * rate // 50) / rate
    return (8000 * np.sin(2 * np.pi * (300 * t + 1300 * t * t / (frames / 50)))).astype(np.int16)


class PeerPort(pj.AudioMediaPort):
    """Plays `signal` once, then silence; keeps every frame it hears."""

    def __init__(self, rate, signal):
        super().__init__()
        self.n = rate // 50
        self.signal = signal
        self.k = 0
        self.heard = []
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, rate, 1, 20000, 16)
        self.createPort("peer", fmt)

    def onFrameRequested(self, frame):
        chunk = self.signal[self.k * self.n : (self.k + 1) * self.n]
        data = chunk.tobytes() + bytes(2 * self.n - 2 * len(chunk))
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = pj.ByteVector(data)
        frame.size = len(data)
        self.k += 1

    def onFrameReceived(self, frame):
        self.heard.append(bytes(frame.buf))


def find(sent, heard):
    x, y = sent.astype(np.float64), heard.astype(np.float64)
    c = np.correlate(y, x, "valid")
    lag = int(np.argmax(c))
    w = y[lag : lag + len(x)]
    return float(c[lag] / np.sqrt(np.sum(x * x) * np.sum(w * w) + 1e-9)), lag


def without_gaps(x, run=4):
    """x with every run of >= `run` exact zeros taken out: the silence an underrun inserts when the
    engine thread is scheduled late (a loaded machine), which shifts the rest without changing it."""
    zero = np.concatenate([[False], x == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    keep = np.ones(len(x), bool)
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a >= run:
            keep[a:b] = False
    return x[keep]


class CallInfo:
    def __init__(self, rate):
        self.clock_rate = rate
        self.call_id = f"bridge-{rate}"
        self.start = time.time()

    def to_dict(self):
        return {"call_id": self.call_id, "start": self.start, "clock_rate": self.clock_rate}


@pytest.mark.timeout(30)
def test_echo_through_the_bridge_and_the_recording(bridge, tmp_path):
    rate = 16000
    signal = chirp(rate, FRAMES)
    engine = EchoEngine()
    recorder = Recorder(tmp_path, poll_ms=20)
    peer = PeerPort(rate, signal)
    info = CallInfo(rate)
    session = engine.open_session(CallStart(call_id=info.call_id, rate=rate))
    recording = recorder.start(info, rate)
    att = attach_media(peer, rate, session, recording)
    try:
        deadline = time.monotonic() + 10  # a generous bound for a 2 s exchange, not a measurement
        while peer.k < FRAMES + 25 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        att.detach()
        att.detach()  # twice is harmless
    stats = att.stats
    recorder.finish(recording, info)
    engine.close_session(session)
    engine.close()
    recorder.close()
    assert engine.error is None and recorder.error is None
    assert stats["frames_received"] >= FRAMES and stats["frames_requested"] >= FRAMES
    assert stats["rx_overruns"] == 0 and stats["recorder_overruns"] == 0

    heard = np.frombuffer(b"".join(peer.heard), np.int16)
    corr, _ = find(signal, without_gaps(heard))
    assert corr > 0.99, (corr, stats)  # all of it came back, in order
    _, lag = find(signal, heard)
    # the echo leaves one bridge tick after it came in (20 ms), plus the resamplers' delay
    resampler = round(session.audio.delay_ms * rate / 1000)
    assert lag >= resampler and (lag - resampler) % (rate // 50) == 0, (lag, resampler)

    got_rate, rec = read_recording(recording.wav_path)
    assert got_rate == rate and len(rec) >= FRAMES * rate // 50
    c_corr, c_lag = find(signal, rec[:, 0])  # left: the caller, as our port received it
    b_corr, b_lag = find(signal, rec[:, 1])  # right: the bot, as our port sent it
    assert c_corr > 0.99 and find(signal, without_gaps(rec[:, 1]))[0] > 0.99
    # time-aligned: in the recording the bot's echo follows the caller's words exactly as far as the
    # peer heard it follow its own (the bridge moves port to port within one tick)
    assert b_lag - c_lag == lag


def test_rate_mismatches_are_value_errors(bridge, tmp_path):
    engine = EchoEngine()
    try:
        session = engine.open_session(CallStart(call_id="c", rate=8000))
        peer = PeerPort(16000, chirp(16000, 1))
        with pytest.raises(ValueError, match="8000 Hz"):
            attach_media(peer, 16000, session)
        with pytest.raises(ValueError, match="clock_rate"):
            attach_media(peer, 8001, session)
        recorder = Recorder(tmp_path)
        rec = recorder.start(CallInfo(16000), 16000)
        with pytest.raises(ValueError, match="recording runs at 16000"):
            attach_media(peer, 8000, session, rec)
        recorder.close()
        del peer
    finally:
        engine.close()
