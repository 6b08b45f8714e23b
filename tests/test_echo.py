"""The echo line through CallAudio's rings and resamplers, with real threads (engine/serving/echo.py, call_audio.py).

A thread plays the media callback's part: every 20 ms (absolute deadlines) it writes one frame of a known
signal into rx and reads one frame out of tx, silence when tx is short, exactly as the media port does.
The echo must come back whole: the cross-correlation of what went in with what came out peaks near 1, at
a lag of the resamplers' delay plus whole frames.
"""

import threading
import time

import numpy as np
import pytest

from callbot.engine import PeriodicClock
from callbot.engine.serving.call_audio import CallAudio
from callbot.engine.contract import CallStart
from callbot.engine.serving.echo import EchoEngine


def CallInfo(rate: int) -> CallStart:
    return CallStart(call_id=f"echo-{rate}", rate=rate)


def chirp(rate, seconds, f0=300.0, f1=3000.0, level=8000):
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (level * np.sin(phase)).astype(np.int16)


def media_thread(audio: CallAudio, signal: np.ndarray, tail_frames: int, out: list):
    """Plays the media callback: one frame in and one frame out per 20 ms tick."""
    n = audio.frame_samples
    frame = np.zeros(n, np.int16)
    clock = PeriodicClock(20.0)
    frames_in = len(signal) // n
    for k in range(frames_in + tail_frames):
        clock.wait()
        frame[:] = 0
        if audio.tx.readable:
            audio.tx.read_into(frame)
        out.append(frame.copy())
        if k < frames_in:
            audio.rx.write(signal[k * n : (k + 1) * n])


def find_echo(sent: np.ndarray, received: np.ndarray) -> tuple[float, int]:
    """(peak normalised cross-correlation, lag in samples) of `sent` inside `received`."""
    x = sent.astype(np.float64)
    y = received.astype(np.float64)
    c = np.correlate(y, x, "valid") if len(y) >= len(x) else np.correlate(y, x, "full")
    lag = int(np.argmax(c))
    window = y[lag : lag + len(x)]
    return float(c[lag] / np.sqrt(np.sum(x * x) * np.sum(window * window) + 1e-9)), lag


def without_gaps(x, run=4):
    """x with every run of >= `run` exact zeros taken out: the silence an underrun inserts when a
    thread is scheduled late (a loaded machine), which shifts the rest of the echo without changing it."""
    zero = np.concatenate([[False], x == 0, [False]])
    edges = np.flatnonzero(np.diff(zero.astype(np.int8)))
    keep = np.ones(len(x), bool)
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a >= run:
            keep[a:b] = False
    return x[keep]


@pytest.mark.timeout(30)
def test_echo_line_returns_the_signal_at_8k_and_16k_together():
    rates = (8000, 16000)
    with EchoEngine() as engine:
        sessions = {rate: engine.open_session(CallInfo(rate)) for rate in rates}
        signals = {rate: chirp(rate, 1.0) for rate in rates}
        outs = {rate: [] for rate in rates}
        threads = [
            threading.Thread(target=media_thread, args=(sessions[r].audio, signals[r], 15, outs[r]))
            for r in rates
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
        assert engine.error is None
        for rate in rates:
            audio = sessions[rate].audio
            heard = np.concatenate(outs[rate])
            corr, _ = find_echo(signals[rate], without_gaps(heard))
            assert corr > 0.99, (rate, corr)  # all of it came back, in order
            _, lag = find_echo(signals[rate], heard)
            delay = round(audio.delay_ms * rate / 1000)
            # the resamplers' delay plus whole ticks spent in the rings
            assert lag >= delay and (lag - delay) % audio.frame_samples == 0, (rate, lag, delay)
            assert sessions[rate].frames_echoed >= len(signals[rate]) // audio.frame_samples
            assert audio.overruns == 0
            engine.close_session(sessions[rate])
        assert engine.sessions == 0


def test_frame_size_is_configurable():
    with EchoEngine(frame_samples=1920) as engine:  # 80 ms, the model's frame
        s = engine.open_session(CallInfo(16000))
        s.audio.rx.write(chirp(16000, 0.2))  # 3200 samples = 4800 at 24 kHz: two whole 80 ms frames
        clock = PeriodicClock(5.0)
        # nobody drains tx here: beyond the limit (one frame + 40 ms) the echo is trimmed and counted
        while s.audio.tx.readable + s.audio.tx_trimmed < 2 * 1280:  # bounded by the test timeout
            clock.wait()
        assert s.frames_echoed == 2
        assert s.audio.tx.readable == s.audio.tx_max == 1920
        assert engine.error is None


def test_call_audio_pull_and_push_round_trip():
    audio = CallAudio(8000)
    x = chirp(8000, 0.1)
    audio.rx.write(x)
    assert audio.pull(2401) is None  # 800 samples at 8 kHz make 2400 at 24 kHz
    frame = audio.pull(2400)
    assert frame is not None and frame.dtype == np.int16 and len(frame) == 2400
    assert audio.push(frame) == 800
    assert audio.tx.readable == 800
    audio.close()


@pytest.mark.parametrize("rate", [0, 11025, 44100, "8000", None, 8000.0, True])
def test_call_audio_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match="call_rate"):
        CallAudio(rate)


def test_call_audio_rejects_bad_frames():
    audio = CallAudio(16000)
    with pytest.raises(ValueError, match="int16"):
        audio.push(np.zeros(480, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        audio.push(np.zeros((2, 480), np.int16))
    with pytest.raises(ValueError, match="sample count"):
        audio.pull(0)
    audio.close()


@pytest.mark.parametrize("kwargs", [{"frame_samples": 0}, {"frame_samples": 480.0}, {"frame_samples": True}, {"poll_ms": 0}])
def test_echo_engine_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        EchoEngine(**kwargs)


def test_echo_engine_needs_a_call_start_and_refuses_after_close():
    engine = EchoEngine()
    with pytest.raises(TypeError, match="CallStart"):
        engine.open_session(object())
    s = engine.open_session(CallInfo(8000))
    engine.close_session(s)
    engine.close_session(s)  # twice is harmless
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.open_session(CallInfo(8000))


def test_stop_play_cuts_the_clip_playing_and_the_queued_ones():
    """A key pressed during a menu prompt: StopPlay ends the clip mid-way and drops the next one, each
    reported interrupted with what was played; the echo comes back after."""
    from callbot.engine.contract import Play, PlayFinished, StopPlay
    from tests.media_side import play_media_side

    events: list = []
    with EchoEngine(on_event=events.append) as engine:
        s = engine.open_session(CallStart(call_id="menu", rate=8000))
        long = np.full(8000 * 10, 3000, np.int16).tobytes()  # 10 s: still playing when it is cut
        s.control(Play(pcm=long, rate=8000, id="menu"))
        s.control(Play(pcm=long, rate=8000, id="after"))
        stop, received = threading.Event(), []
        media = threading.Thread(target=play_media_side, args=(s.audio, 500, stop, received), daemon=True)
        media.start()
        try:
            deadline = time.monotonic() + 20
            while len(received) < 25:  # half a second of the clip out
                assert time.monotonic() < deadline
                time.sleep(0.01)
            s.control(StopPlay())
            while not any(isinstance(e, PlayFinished) and e.id == "after" for e in events):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            n = len(received)
            while len(received) < n + 25:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            stop.set()
            media.join(5)
            engine.close_session(s)
    done = {e.id: e for e in events if isinstance(e, PlayFinished)}
    assert done["menu"].interrupted and 0 < done["menu"].ms < 10000
    assert done["after"].interrupted and done["after"].ms == 0
    tail = np.concatenate(received[-10:])
    assert not (tail == 3000).all()  # the clip is gone: the caller's tone echoes back
