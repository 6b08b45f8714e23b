"""Real SIP calls into the echo line, per codec: a pjsua2 peer process plays a known signal and records
what comes back; the signal must be in it. And kill -9 of a serving process mid-call leaves a playable
recording holding the caller's audio.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest
from tests.sip_peers import MEDIA_PEER, free_port, serve_config, stop_process, sidecars

from callbot.sip.events import CallEnded
from callbot.app.recording import read_recording

pytestmark = pytest.mark.timeout(120)
RATE = 16000  # the peer's bridge and WAV files
SEGMENTS = 16  # the signal is looked for in pieces: a jitter buffer may drop or stretch a frame between them


def mostly_found(matches) -> bool:
    """Three pieces in four found whole, in order. A frame a jitter buffer drops or conceals, or an echo
    played a tick late on a loaded machine, spoils the piece it falls in, not the rest; a signal that is
    not there at all matches no piece (white noise or silence score well under 0.5)."""
    good = [lag for c, lag in matches if c > 0.9]
    return len(good) >= 3 * len(matches) // 4 and good == sorted(good)


def chirp(seconds=2.0, f0=300.0, f1=3000.0, level=6000):
    t = np.arange(int(RATE * seconds)) / RATE
    return (level * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))).astype(np.int16)


def write_wav(path, samples):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.astype("<i2").tobytes())


def read_wav(path):
    with wave.open(str(path)) as r:
        assert r.getframerate() == RATE and r.getnchannels() == 1
        return np.frombuffer(r.readframes(r.getnframes()), "<i2")


def find(piece, heard):
    """(normalised correlation, lag) of the best match of `piece` in `heard`."""
    x, y = piece.astype(np.float64), heard.astype(np.float64)
    if len(y) < len(x):
        return 0.0, -1
    c = np.correlate(y, x, "valid")
    lag = int(np.argmax(c))
    w = y[lag : lag + len(x)]
    return float(c[lag] / np.sqrt(np.sum(x * x) * np.sum(w * w) + 1e-9)), lag


def found_everywhere(signal, heard):
    """Correlation and lag of each of SEGMENTS pieces of `signal` in `heard`."""
    size = len(signal) // SEGMENTS
    return [find(signal[i * size : (i + 1) * size], heard) for i in range(SEGMENTS)]


def run_peer(uri, codec, play, record, seconds, log):
    proc = subprocess.Popen([sys.executable, str(MEDIA_PEER), "--uri", uri, "--codec", codec, "--play", str(play),
                             "--record", str(record), "--seconds", str(seconds)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    return proc


def events_until(proc, last: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stdout:  # bounded by the peer's own --seconds and the test timeout
        seen.append(json.loads(line))
        if seen[-1]["ev"] == last or time.monotonic() > deadline:
            break
    return seen


@pytest.mark.parametrize("codec", ["PCMU", "PCMA", "G722"])
def test_echo_call_returns_the_callers_signal(echo_line, tmp_path, codec):
    signal_ = chirp()
    play, record = tmp_path / "play.wav", tmp_path / "heard.wav"
    write_wav(play, np.concatenate([np.zeros(RATE // 2, np.int16), signal_, np.zeros(RATE, np.int16)]))
    with open(tmp_path / "peer.log", "w") as log:
        peer = run_peer(echo_line.account_uri(), codec, play, record, 4.0, log)
        try:
            events = events_until(peer, "done", 60)
        finally:
            stop_process(peer, 10)
    media = [e for e in events if e["ev"] == "media"]
    assert media and media[0]["codec"] == codec, events
    heard = read_wav(record)
    matches = found_everywhere(signal_, heard)
    assert mostly_found(matches), matches
    lag = next(lag for c, lag in matches if c > 0.9)
    print(f"{codec}: echo round trip about {(lag - RATE // 2) / RATE * 1000:.1f} ms")

    # our recording: the caller's signal on the left, the echo on the right, after it
    ended = echo_line.wait_for(CallEnded, timeout=15)
    [sidecar] = [json.loads(p.read_text()) for p in sidecars(tmp_path) if p.name != "peer.json"]
    assert sidecar["call_id"] == ended.call_id and sidecar["codec"] == codec
    rate, rec = read_recording(tmp_path / sidecar["recording"]["wav"])
    left, right = rec[:, 0], rec[:, 1]
    if rate != RATE:  # the port ran at the codec's rate: compare at that rate
        signal_ = signal_[:: RATE // rate]
    caller = found_everywhere(signal_, left)
    bot = found_everywhere(signal_, right)
    assert mostly_found(caller) and mostly_found(bot), (caller, bot)
    # the echo follows the caller's words (compare pieces both sides found whole)
    assert all(b[1] > c[1] for b, c in zip(bot, caller) if b[0] > 0.9 and c[0] > 0.9)
    # pjmedia's clock thread was made as real-time as this machine permits, from its first frame; the
    # threads of ours that never ran a media callback (this one) were left alone
    got = echo_line.media_clock_realtime
    assert got is not None and got.policy in ("SCHED_FIFO", "SCHED_OTHER", "unchanged"), got
    if hasattr(os, "sched_getscheduler"):
        assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_kill_9_mid_call_leaves_a_playable_recording(tmp_path):
    """`callbot serve --engine echo` killed with SIGKILL while a call plays: the WAV is readable by the
    stdlib as it is, and holds the caller's signal up to about the last second."""
    sip_port = free_port()
    cfg = serve_config(tmp_path, sip_port)
    signal_ = chirp(seconds=6.0, f1=2000.0)
    play, record = tmp_path / "play.wav", tmp_path / "heard.wav"
    write_wav(play, np.concatenate([np.zeros(RATE // 2, np.int16), signal_]))
    serve = subprocess.Popen([sys.executable, "-m", "callbot.app.cli", "serve", "--engine", "echo", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = open(tmp_path / "peer.log", "w")
    peer = None
    try:
        deadline = time.monotonic() + 30
        while "listening" not in (serve.stderr.readline() or "listening") and time.monotonic() < deadline:
            pass
        # keep draining its log so that it never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in serve.stderr], daemon=True).start()
        peer = run_peer(f"sip:echo@127.0.0.1:{sip_port}", "PCMU", play, record, 0, log)
        events_until(peer, "media", 30)
        calls = tmp_path / "calls"
        # until the recording's header covers 3 s of the call (a condition on the file, bounded in time)
        deadline = time.monotonic() + 30
        frames = 0
        while frames < 3 * 8000 and time.monotonic() < deadline:
            wavs = list(calls.glob("*.wav")) if calls.exists() else []
            if wavs:
                with wave.open(str(wavs[0])) as r:
                    frames = r.getnframes() * 16000 // r.getframerate() // 2
            time.sleep(0.1)
        serve.send_signal(signal.SIGKILL)
        assert serve.wait(10) == -signal.SIGKILL
    finally:
        stop_process(serve, 10, signal.SIGKILL)
        if peer is not None:
            stop_process(peer, 10)
        log.close()
    [wav] = list((tmp_path / "calls").glob("*.wav"))
    with wave.open(str(wav)) as r:  # no repair: the stdlib reads it as it was left
        rate, n = r.getframerate(), r.getnframes()
        assert r.getnchannels() == 2 and n >= 3 * rate
    rate, rec = read_recording(wav)
    sent = signal_[:: RATE // rate] if rate != RATE else signal_
    # the caller's first two seconds are on the left channel
    assert mostly_found(found_everywhere(sent[: 2 * rate], rec[:, 0]))
    [sidecar] = [json.loads(p.read_text()) for p in sidecars(tmp_path / "calls")]
    assert sidecar["recording"]["complete"] is False and sidecar["end"] is None
    out = subprocess.run(["soxi", "-D", str(wav)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and float(out.stdout) >= 3.0
