"""Call recordings (app/recording.py): a WAV that is valid while it grows, survives kill -9, and a sidecar."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import wave

import numpy as np
import pytest

from callbot.app.recording import Recorder, WavStreamWriter, read_recording, recording_name

RATE = 8000


def pattern(n, seed):
    """A deterministic, non-periodic int16 signal: sample k of channel `seed` is known exactly."""
    k = np.arange(n, dtype=np.int64)
    return (((k * (7 + seed) + (k * k) % (101 + seed)) % 30000) - 15000).astype(np.int16)


def soxi_seconds(path):
    out = subprocess.run(["soxi", "-D", path], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_stream_writer_header_covers_exactly_what_was_synced(tmp_path):
    path = str(tmp_path / "a.wav")
    w = WavStreamWriter(path, RATE, 2)
    with wave.open(path) as r:  # valid and empty from the start
        assert (r.getnchannels(), r.getframerate(), r.getsampwidth(), r.getnframes()) == (2, RATE, 2, 0)
    left, right = pattern(3000, 0), pattern(3000, 1)
    w.write(np.stack([left[:2000], right[:2000]], axis=1))
    w.sync()
    w.write(np.stack([left[2000:], right[2000:]], axis=1))
    w._f.flush()  # on disk but not yet synced: as if the process died right here
    with wave.open(path) as r:
        assert r.getnframes() == 2000
        got = np.frombuffer(r.readframes(2000), "<i2").reshape(-1, 2)
    assert np.array_equal(got[:, 0], left[:2000]) and np.array_equal(got[:, 1], right[:2000])
    rate, everything = read_recording(path)  # the tolerant reader takes the unsynced tail too
    assert rate == RATE and np.array_equal(everything[:, 0], left) and np.array_equal(everything[:, 1], right)
    w.close()
    with wave.open(path) as r:
        assert r.getnframes() == 3000
    assert soxi_seconds(path) == pytest.approx(3000 / RATE)


def test_reader_drops_a_torn_last_frame(tmp_path):
    path = str(tmp_path / "b.wav")
    w = WavStreamWriter(path, RATE, 2)
    w.write(np.zeros((10, 2), np.int16))
    w.close()
    with open(path, "ab") as f:
        f.write(b"\x01\x02\x03")  # a frame cut in the middle
    _, samples = read_recording(path)
    assert samples.shape == (10, 2)


@pytest.mark.parametrize("content", [b"", b"RIFF", b"x" * 60])
def test_reader_rejects_what_is_not_a_recording(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.wav"):
        read_recording(path)


@pytest.mark.parametrize("args", [(0, 2), (8000.0, 2), (8000, 3)])
def test_stream_writer_rejects_bad_settings(tmp_path, args):
    with pytest.raises(ValueError):
        WavStreamWriter(tmp_path / "c.wav", *args)


def test_recorder_writes_both_channels_in_step_and_a_sidecar(tmp_path):
    record = {"call_id": "abc/123@host", "remote_uri": "sip:alice@127.0.0.1", "start": 1764039000.0,
              "end": None, "codec": "PCMU", "dtmf": [], "transfer": None, "hangup_cause": None}
    rec_er = Recorder(tmp_path, sync_interval_s=0.2, poll_ms=10)
    try:
        rec = rec_er.start(record, RATE)
        assert os.path.basename(rec.wav_path) == recording_name("abc/123@host", 1764039000.0) + ".wav"
        assert "/" not in rec.name[16:]  # the Call-ID's slash cannot escape the directory
        started = json.loads(open(rec.sidecar_path).read())
        assert started["end"] is None and started["recording"]["complete"] is False
        left, right = pattern(RATE * 2, 0), pattern(RATE * 2, 1)
        for i in range(0, len(left), 160):  # as the media port does: one frame per channel per tick
            rec.caller.write(left[i : i + 160])
            rec.bot.write(right[i : i + 160])
        rec.bot.write(right[:80])  # half a frame more on one side: padded with silence at the end
        record.update(end=1764039002.0, hangup_cause="remote", dtmf=[{"digit": "5", "method": "rfc4733"}])
        rec_er.finish(rec, record)
    finally:
        rec_er.close()
    assert rec_er.error is None
    with wave.open(rec.wav_path) as r:
        assert (r.getnchannels(), r.getframerate(), r.getnframes()) == (2, RATE, len(left) + 80)
        got = np.frombuffer(r.readframes(r.getnframes()), "<i2").reshape(-1, 2)
    assert np.array_equal(got[: len(left), 0], left) and np.array_equal(got[: len(left), 1], right)
    assert not got[len(left):, 0].any() and np.array_equal(got[len(left):, 1], right[:80])
    final = json.loads(open(rec.sidecar_path).read())
    assert final["end"] == 1764039002.0 and final["hangup_cause"] == "remote" and final["dtmf"][0]["digit"] == "5"
    assert final["recording"] == {"wav": os.path.basename(rec.wav_path), "rate": RATE, "channels": ["caller", "bot"],
                                  "frames": len(left) + 80, "seconds": round((len(left) + 80) / RATE, 3),
                                  "complete": True, "dropped": 0}
    assert not os.path.exists(rec.sidecar_path + ".tmp")


def test_recorder_close_finishes_open_calls(tmp_path):
    rec_er = Recorder(tmp_path, poll_ms=10)
    rec = rec_er.start({"call_id": "x", "start": 1.0}, 16000)
    rec.caller.write(pattern(320, 0))
    rec.bot.write(pattern(320, 1))
    rec_er.close()
    assert read_recording(rec.wav_path)[1].shape == (320, 2)
    assert json.loads(open(rec.sidecar_path).read())["recording"]["complete"] is True
    with pytest.raises(RuntimeError, match="closed"):
        rec_er.start({"call_id": "y"}, 8000)


def test_recorder_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Recorder(tmp_path / "missing")
    with pytest.raises(ValueError, match="sync_interval_s"):
        Recorder(tmp_path, sync_interval_s=0)


# A process recording a call at real-time pace; it prints how many frames the WAV header covers each
# time that grows, and is killed with SIGKILL in the middle of the call.
CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from callbot.engine import PeriodicClock
    from callbot.app.recording import Recorder
    sys.path.insert(0, sys.argv[2])
    from test_recording import pattern
    recorder = Recorder(sys.argv[1], sync_interval_s=1.0, poll_ms=50)
    rec = recorder.start({"call_id": "killed-mid-call", "start": 1764039000.0}, 8000)
    print(rec.wav_path, flush=True)
    left, right = pattern(8000 * 60, 0), pattern(8000 * 60, 1)
    clock = PeriodicClock(20.0)
    reported = 0
    for i in range(0, len(left), 160):
        clock.wait()
        rec.caller.write(left[i:i + 160])
        rec.bot.write(right[i:i + 160])
        if rec.frames_synced != reported:
            reported = rec.frames_synced
            print(reported, flush=True)
    """
)


@pytest.mark.timeout(60)
def test_kill_9_mid_call_leaves_a_playable_recording(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), os.path.dirname(__file__)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        wav_path = child.stdout.readline().strip()
        synced = 0
        while synced < 2 * RATE:  # two syncs, two seconds of call
            line = child.stdout.readline()
            assert line, "the recording process ended before it was killed"
            synced = int(line)
        child.send_signal(signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
    with wave.open(wav_path) as r:  # the stdlib reads it as it is, no repair
        assert (r.getnchannels(), r.getframerate()) == (2, RATE)
        n = r.getnframes()
        got = np.frombuffer(r.readframes(n), "<i2").reshape(-1, 2)
    # everything up to (at least) the last sync the child reported, sample for sample
    assert n >= synced
    assert np.array_equal(got[:, 0], pattern(n, 0)) and np.array_equal(got[:, 1], pattern(n, 1))
    assert soxi_seconds(wav_path) == pytest.approx(n / RATE)
    sox = subprocess.run(["sox", wav_path, "-n", "stat"], capture_output=True, text=True, timeout=10)
    assert sox.returncode == 0, sox.stderr
    _, everything = read_recording(wav_path)
    assert len(everything) >= n and np.array_equal(everything[:, 0], pattern(len(everything), 0))
    sidecar = json.loads(open(wav_path[:-4] + ".json").read())
    assert sidecar["call_id"] == "killed-mid-call" and sidecar["recording"]["complete"] is False
