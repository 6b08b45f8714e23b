"""The app's control API on a real SIP call: `running_server` (the echo engine) answers a pjsua2 caller in
another process; the test steers the call through `Server.call(call_id)` (play a WAV, hang up) and reads
the event bus, as a flow, the analytics or the web panel will."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest

from callbot.app.calls import CallControlError
from callbot.app.event_log import EventLog
from callbot.app.recording import read_recording
from callbot.app.serve import running_server
from callbot.app.settings import MetricsSettings, Settings
from callbot.engine.contract import BotSpeech, PlayFinished, SessionClosed
from callbot.sip import events as ev
from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
from tests.sip_peers import MEDIA_PEER, stop_process, sidecars
from tests.test_live_control import found_exactly

pytestmark = pytest.mark.timeout(120)

RATE = 16000


def _write_wav(path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate), w.writeframes(samples.astype("<i2").tobytes())


def _next(sub, kind, seen: list, timeout=30.0, **fields):
    """The next event of `kind` with `fields` on the subscription; what came before it goes to `seen`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = sub.get(0.1)
        if e is not None:
            seen.append(e)
        if isinstance(e, kind) and all(getattr(e, k) == v for k, v in fields.items()):
            return e
    raise TimeoutError(f"no {kind.__name__} {fields} on the bus in {timeout} s")


def test_play_and_hangup_steer_a_real_call_and_its_events_reach_every_subscriber(tmp_path):
    settings = Settings(
        sip=EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),),
                           accounts=(AccountConfig(name="default", user="bot"),), codecs=("G722/16000",)),
        recordings_dir=str(tmp_path / "calls"), metrics=MetricsSettings(enabled=False))
    t = np.arange(int(RATE * 0.6)) / RATE
    greeting = (8000 * np.sin(2 * np.pi * 440 * t) * np.sin(np.pi * t / 0.6)).astype(np.int16)  # a 0.6 s swell
    _write_wav(tmp_path / "greeting.wav", greeting, RATE)
    _write_wav(tmp_path / "quiet.wav", np.zeros(RATE * 8, np.int16), RATE)  # the caller says nothing
    log = io.StringIO()
    with running_server(settings, "echo", log=EventLog(log)) as server:
        mine = server.bus.subscribe("test")
        seen: list = []
        stop = threading.Event()
        pump = threading.Thread(target=server.pump, kwargs={"stop": stop}, daemon=True)
        pump.start()  # the main thread's job in `serve`: the endpoint's events onto the bus
        peer = subprocess.Popen([sys.executable, str(MEDIA_PEER), "--uri", server.endpoint.account_uri(), "--codec", "G722",
                                 "--play", str(tmp_path / "quiet.wav"), "--record", str(tmp_path / "heard.wav")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            media = _next(mine, ev.CallMedia, seen)
            call_id = media.call_id
            deadline = time.monotonic() + 10  # CallMedia is emitted just before the session is opened
            while call_id not in server.calls and time.monotonic() < deadline:
                time.sleep(0.01)
            live = server.call(call_id)
            assert live.start.rate == settings.sip.conference_clock_rate and live.start.bot == "default"
            with pytest.raises(CallControlError, match="no call"):
                server.call("nobody")
            # a second of audio in first: the caller's jitter buffer has settled before the greeting starts
            while (server.endpoint.media_stats(call_id) or {}).get("frames_received", 0) < 50:
                assert time.monotonic() < deadline + 10, "no audio from the caller"
                time.sleep(0.02)
            play_id = live.play(tmp_path / "greeting.wav")
            done = _next(mine, PlayFinished, seen, call_id=call_id, id=play_id)
            assert done.ms == pytest.approx(600.0, abs=1.0) and not done.interrupted
            # the clip's last frame is queued, not yet heard: hang up once the bot's leg is quiet again
            _next(mine, BotSpeech, seen, call_id=call_id, speaking=False)
            live.hangup()
            _next(mine, ev.CallEnded, seen, call_id=call_id)
            # the session closes as the call's audio goes, before or after the call's end is reported
            closed = next((e for e in seen if isinstance(e, SessionClosed) and e.call_id == call_id), None)
            closed = closed or _next(mine, SessionClosed, seen, call_id=call_id)
            with pytest.raises(CallControlError, match="ended"):
                live.play(tmp_path / "greeting.wav")
            peer.stdin.close()
            assert peer.wait(30) == 0
        finally:
            stop.set()
            pump.join(10)
            stop_process(peer)
        assert call_id not in server.calls
    # the caller heard the greeting (G.722 is lossy: by correlation, not sample by sample)
    with wave.open(str(tmp_path / "heard.wav")) as w:
        heard = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
        heard_rate = w.getframerate()
    ref = greeting.astype(np.float64) - greeting.mean()
    if heard_rate != RATE:
        import soxr

        heard = soxr.resample(heard, heard_rate, RATE)
    heard -= heard.mean()
    corr = np.correlate(heard, ref, "valid") / (np.linalg.norm(ref) * np.sqrt(
        np.convolve(heard ** 2, np.ones(len(ref)), "valid")) + 1e-9)
    assert corr.max() > 0.9
    # the bot's channel of the recording holds it too, and the record has the engine's summary
    [sidecar] = [p for p in sidecars(tmp_path / "calls")]
    record = json.loads(sidecar.read_text())
    assert record["engine"]["steps"] == closed.summary.steps > 0
    rate, frames = read_recording(tmp_path / "calls" / record["recording"]["wav"])
    assert rate == RATE and found_exactly(greeting[greeting != 0], frames[:, 1])  # what left for RTP: exact
    # the recorder subscriber kept the call's live events beside its recording, as they came
    kept = [json.loads(line) for line in (tmp_path / "calls" / record["events"]).read_text().splitlines()]
    assert [k["id"] for k in kept if k["event"] == "PlayFinished"] == [play_id]
    assert {k["call_id"] for k in kept} == {call_id} and "FrameStages" not in {k["event"] for k in kept}
    # the JSON log subscriber got the SIP and the engine's events, in order, one line each
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    kinds = [line["event"] for line in lines]
    assert kinds.index("CallMedia") < kinds.index("PlayFinished") < kinds.index("SessionClosed")
    assert "CallEnded" in kinds and "FrameStages" not in kinds
    assert mine.dropped == 0
    # the greeting made the bot speak, live: a BotSpeech start for this call came before its end
    assert any(isinstance(e, BotSpeech) and e.speaking and e.call_id == call_id for e in seen)
