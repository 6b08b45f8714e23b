"""Call recordings (app/recording.py): a WAV that is valid while it grows and survives kill -9, a sidecar kept
current during the call, bounded lists, text that is not UTF-8."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import wave

import numpy as np
import pytest

from callbot.app.recording import Recorder, WavStreamWriter, read_recording, recording_name
from tests.sip_peers import eventually

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
    assert final["recording"].pop("updated") == pytest.approx(time.time(), abs=60)
    assert final["events_dropped"] == 0
    assert final["recording"] == {"wav": os.path.basename(rec.wav_path), "rate": RATE, "channels": ["caller", "bot"],
                                  "frames": len(left) + 80, "seconds": round((len(left) + 80) / RATE, 3),
                                  "complete": True, "dropped": 0, "lost_s": 0.0, "write_error": None}
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
# time that grows, and is killed with SIGKILL in the middle of the call. Its record is a live CallRecord:
# a digit arrives at 0.5 s, as the SIP side would add it.
CHILD = textwrap.dedent(
    """
    import sys, time, numpy as np
    from callbot.engine import PeriodicClock
    from callbot.app.recording import Recorder
    from callbot.sip.call_record import CallRecord, DtmfRecord
    sys.path.insert(0, sys.argv[2])
    from test_recording import pattern
    recorder = Recorder(sys.argv[1], sync_interval_s=1.0, poll_ms=50)
    record = CallRecord(call_id="killed-mid-call", direction="inbound", account="line", local_uri="sip:bot@h",
                        remote_uri="sip:alice@h", start=1764039000.0, codec="PCMU", codec_rate=8000)
    rec = recorder.start(record, 8000)
    print(rec.wav_path, flush=True)
    left, right = pattern(8000 * 60, 0), pattern(8000 * 60, 1)
    clock = PeriodicClock(20.0)
    reported = 0
    for i in range(0, len(left), 160):
        clock.wait()
        rec.caller.write(left[i:i + 160])
        rec.bot.write(right[i:i + 160])
        if i == 8000 // 2:
            record.add_dtmf(DtmfRecord(digit="7", method="rfc4733", at=time.time(), duration_ms=0))
        if rec.frames_synced != reported:
            reported = rec.frames_synced
            print(reported, flush=True)
    """
)


def _sidecar(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@pytest.mark.timeout(60)
def test_kill_9_mid_call_leaves_a_playable_recording(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), os.path.dirname(__file__)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        wav_path = child.stdout.readline().strip()
        sidecar_path = wav_path[:-4] + ".json"
        synced = 0
        while synced < 2 * RATE:  # two syncs, two seconds of call
            line = child.stdout.readline()
            assert line, "the recording process ended before it was killed"
            synced = int(line)
        # the digit of 0.5 s is on disk within a second of it (the sidecar follows the record's changes)
        deadline = time.monotonic() + 10
        while not (_sidecar(sidecar_path) or {}).get("dtmf"):
            assert time.monotonic() < deadline, f"the digit never reached the sidecar: {_sidecar(sidecar_path)}"
            time.sleep(0.05)
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
    sidecar = _sidecar(sidecar_path)
    assert sidecar["call_id"] == "killed-mid-call" and sidecar["recording"]["complete"] is False
    assert sidecar["codec"] == "PCMU" and [d["digit"] for d in sidecar["dtmf"]] == ["7"]
    # what the sidecar says was safe is there: never more than the header covers
    assert 0 < sidecar["recording"]["frames"] <= n and sidecar["recording"]["seconds"] > 0
    assert not os.path.exists(sidecar_path + ".tmp")


def _header_frames(path):
    with wave.open(str(path)) as r:
        return r.getnframes()


def test_wav_header_covers_audio_well_before_the_first_full_sync_interval(tmp_path):
    rec_er = Recorder(tmp_path)  # the defaults serve runs with: a 1 s sync, a 100 ms poll
    try:
        started = time.monotonic()
        rec = rec_er.start({"call_id": "early", "start": 1.0}, RATE)
        rec.caller.write(pattern(160, 0))  # one 20 ms frame, as the media port writes at once
        rec.bot.write(pattern(160, 1))
        eventually(lambda: _header_frames(rec.wav_path) > 0, what="the header covering the first frame")
        covered_after = time.monotonic() - started
        # FIRST_SYNC_S then the next poll: ~0.2 s; the 1 s interval alone would need 1 s
        assert covered_after < 0.9, covered_after
        seconds = eventually(lambda: json.loads(open(rec.sidecar_path).read())["recording"]["seconds"],
                        what="the sidecar saying how much is safe")
        assert seconds == pytest.approx(160 / RATE)
    finally:
        rec_er.close()


def test_sidecar_follows_the_live_record_during_the_call(tmp_path):
    from callbot.sip.call_record import CallRecord, DtmfRecord

    record = CallRecord(call_id="live", direction="inbound", account="line", local_uri="sip:bot@h",
                        remote_uri="sip:alice@h", start=1764039000.0)
    rec_er = Recorder(tmp_path, sync_interval_s=0.1, poll_ms=10, sidecar_interval_s=0.3)
    try:
        rec = rec_er.start(record, RATE)
        read = lambda: json.loads(open(rec.sidecar_path).read())  # noqa: E731
        assert read()["answered"] is None and read()["recording"]["complete"] is False
        record.answered = 1764039000.5
        record.codec = "G722"
        record.add_dtmf(DtmfRecord(digit="1", method="info", at=1764039001.0, duration_ms=100))
        current = eventually(lambda: (lambda s: s if s["dtmf"] else None)(read()), what="the digit in the sidecar")
        assert current["answered"] == 1764039000.5 and current["codec"] == "G722"
        assert current["recording"]["complete"] is False
        # without any change, it is still rewritten (sidecar_interval_s): the seconds safe on disk grow
        frames = pattern(RATE, 0)
        for i in range(0, RATE, 160):
            rec.caller.write(frames[i:i + 160])
            rec.bot.write(frames[i:i + 160])
        eventually(lambda: read()["recording"]["frames"] == RATE, what="the periodic rewrite")
        assert read()["recording"]["seconds"] == 1.0
    finally:
        rec_er.close()
    final = json.loads(open(rec.sidecar_path).read())
    assert final["recording"]["complete"] is True and final["dtmf"][0]["digit"] == "1"


def test_dtmf_kept_in_a_record_is_bounded():
    from callbot.sip.call_record import DTMF_KEPT, CallRecord, DtmfRecord

    record = CallRecord(call_id="flood", direction="inbound", account="line", local_uri="l", remote_uri="r",
                        start=1.0)
    kept = [record.add_dtmf(DtmfRecord(digit="5", method="info", at=2.0, duration_ms=0))
            for _ in range(DTMF_KEPT + 800)]
    assert kept.count(True) == DTMF_KEPT == len(record.dtmf) and record.dtmf_dropped == 800
    assert record.to_dict()["dtmf_dropped"] == 800 and "revision" not in record.to_dict()


def test_events_file_is_bounded_and_what_was_cut_is_counted(tmp_path):
    from callbot.sip.events import DtmfReceived

    rec_er = Recorder(tmp_path, poll_ms=10, events_max_bytes=1000)
    try:
        rec = rec_er.start({"call_id": "chatty", "start": 1.0}, RATE)
        for i in range(50):
            rec_er.on_event(DtmfReceived(at=float(i), call_id="chatty", digit="9", method="info", duration_ms=0))
        rec_er.on_event(DtmfReceived(at=0.0, call_id="someone-else", digit="9", method="info", duration_ms=0))
        rec_er.finish(rec, {"call_id": "chatty", "start": 1.0})
    finally:
        rec_er.close()
    data = open(rec.events_path, "rb").read()
    lines = [json.loads(line) for line in data.splitlines()]  # whole lines only
    assert 0 < len(data) <= 1000 and all(e["event"] == "DtmfReceived" for e in lines)
    assert json.loads(open(rec.sidecar_path).read())["events_dropped"] == 50 - len(lines)


def test_text_that_is_not_utf8_is_escaped_not_refused(tmp_path):
    """pjsua2 hands a peer's undecodable bytes over as lone surrogates (\udcff for the byte 0xff)."""
    from callbot.sip.events import CallRejected, DtmfReceived

    call_id = "bad\udcff\udcfe-1"
    record = {"call_id": call_id, "remote_uri": '"\udcff\udcfeName" <sip:evil@127.0.0.1>', "start": 1.0,
              "hangup_reason": "Bye \udcc0\udcaf"}
    rec_er = Recorder(tmp_path, poll_ms=10)
    try:
        rec = rec_er.start(record, RATE)
        rec_er.on_event(DtmfReceived(at=1.0, call_id=call_id, digit="\udcff", method="info", duration_ms=0))
        rec_er.finish(rec, record)
    finally:
        rec_er.close()
    assert rec_er.error is None
    sidecar = json.loads(open(rec.sidecar_path, encoding="utf-8").read())
    assert sidecar["call_id"] == "bad\\xff\\xfe-1" and sidecar["hangup_reason"] == "Bye \\xc0\\xaf"
    assert sidecar["remote_uri"] == '"\\xff\\xfeName" <sip:evil@127.0.0.1>'
    [line] = open(rec.events_path, encoding="utf-8").read().splitlines()
    assert json.loads(line)["digit"] == "\\xff"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert "/" not in rec.name and "\\" not in rec.name  # the file name stays plain
    from callbot.app.event_log import event_line

    refused = CallRejected(at=1.0, account="line", remote_uri="\udcff", code=486, reason="Busy Here")
    assert json.loads(event_line(refused))["remote_uri"] == "\\xff"


def test_a_sidecar_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    from callbot.app.recording import _write_json_atomically

    target = tmp_path / "taken"
    target.mkdir()  # a directory where the sidecar should go: the rename fails
    with pytest.raises(OSError):
        _write_json_atomically(str(target), {"call_id": "x"})
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_a_tap_gets_both_legs_as_recorded_the_caller_blanked_for_a_secret_and_a_failing_one_costs_nothing(tmp_path):
    class Record(dict):
        redact_dtmf = False

    record = Record(call_id="tapped", start=1.0)
    rec_er = Recorder(tmp_path, poll_ms=10)
    try:
        assert rec_er.tap("no-such-call", lambda f: None) is None
        rec = rec_er.start(record, RATE)
        got: list[np.ndarray] = []
        rate, untap = rec_er.tap("tapped", got.append)
        _, untap_broken = rec_er.tap("tapped", lambda f: 1 / 0)  # a listener that fails: logged, nothing more
        assert rate == RATE
        left, right = pattern(RATE, 0), pattern(RATE, 1)
        rec.caller.write(left)
        rec.bot.write(right)
        eventually(lambda: sum(len(f) for f in got) == RATE, 10, "a second of both legs through the tap")
        heard = np.concatenate(got)
        assert np.array_equal(heard[:, 0], left) and np.array_equal(heard[:, 1], right)
        record.redact_dtmf = True  # a sensitive gather: the caller is blanked in the file and for the tap
        rec.caller.write(left[:800])
        rec.bot.write(right[:800])
        eventually(lambda: sum(len(f) for f in got) == RATE + 800, 10, "the gather's audio through the tap")
        assert not np.concatenate(got)[RATE:, 0].any()
        record.redact_dtmf = False
        untap()
        untap_broken()
        rec.caller.write(left[:800])
        rec.bot.write(right[:800])
        rec_er.finish(rec, record)
    finally:
        rec_er.close()
    assert sum(len(f) for f in got) == RATE + 800  # nothing after the untap
    assert read_recording(rec.wav_path)[1].shape == (RATE + 1600, 2) and rec_er.error is None
