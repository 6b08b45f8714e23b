"""A full disk under the recordings (app/recording.py): calls go on, their audio is held a while and
written once the disk takes writes again, what did not fit is counted and said once, the WAV keeps the
call's time (silence where audio was lost), stays a valid WAV and its events file whole lines, and the
final record is written when the disk takes it."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from callbot.app.recording import Recorder, read_recording
from callbot.engine.contract import CallerWords
from tests.sip_peers import eventually
from tests.small_disk import small_disk

RATE = 8000
FRAME = RATE // 50


def pattern(n: int, seed: int) -> np.ndarray:
    """A known signal with no zero sample (so silence standing in for it is told apart)."""
    k = np.arange(n, dtype=np.int64)
    return ((((k * (7 + seed) + (k * k) % (101 + seed)) % 30000) + 100) * (1 - 2 * (k % 2))).astype(np.int16)


def feed(rec, left: np.ndarray, right: np.ndarray) -> None:
    for i in range(0, len(left), FRAME):  # as the media port does: one frame per channel per tick
        rec.caller.write(left[i:i + FRAME])
        rec.bot.write(right[i:i + FRAME])


def drained(rec) -> None:
    eventually(lambda: rec.caller.readable == 0 and rec.bot.readable == 0, timeout=10, what="the rings drained")


@pytest.fixture
def disk(tmp_path):
    with small_disk(tmp_path / "disk") as d:
        yield d


@pytest.fixture
def recorder(disk):
    r = Recorder(disk.path, sync_interval_s=0.05, poll_ms=10, sidecar_interval_s=0.2, retry_s=0.05, hold_s=0.5)
    yield r
    r.close()


def test_a_call_that_starts_on_a_full_disk_is_recorded_in_time_once_there_is_room(disk, recorder, caplog):
    disk.fill()
    record = {"call_id": "full-1", "start": 1764039000.0, "end": None}
    with caplog.at_level(logging.WARNING, logger="callbot.app.recording"):
        rec = recorder.start(record, RATE)
        assert rec is not None  # the call goes on; its files wait for the disk
        assert not os.path.exists(rec.wav_path) and not os.path.exists(rec.sidecar_path)
        assert rec.write_error == "No space left on device" and recorder.trouble.failing == {"full-1"}
        first = pattern(RATE, 0), pattern(RATE, 1)
        feed(rec, *first)  # a second while the disk is full: its last half second (hold_s) is held
        drained(rec)
        lost = rec.lost_frames
        assert RATE // 2 <= lost < RATE
        assert recorder.error is None  # the recorder thread goes on
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1 and "full-1" in refused[0].getMessage()  # said once, not at every write
        disk.free()
        second = pattern(RATE, 2), pattern(RATE, 3)
        feed(rec, *second)
        eventually(lambda: rec.frames_synced == 2 * RATE, timeout=10, what="the gap, the held audio, the new second")
        record["end"] = 1764039002.0
        recorder.finish(rec, record)
    assert any("takes writes again" in r.getMessage() for r in caplog.records)
    rate, got = read_recording(rec.wav_path)
    assert rate == RATE and got.shape == (2 * RATE, 2)
    assert not got[:lost].any()  # silence where the audio was lost: the rest keeps its time
    assert np.array_equal(got[lost:RATE, 0], first[0][lost:]) and np.array_equal(got[lost:RATE, 1], first[1][lost:])
    assert np.array_equal(got[RATE:, 0], second[0]) and np.array_equal(got[RATE:, 1], second[1])
    final = json.loads(open(rec.sidecar_path).read())
    assert final["recording"]["complete"] is True and final["end"] == 1764039002.0
    assert final["recording"]["lost_s"] == round(lost / RATE, 3) and final["recording"]["write_error"] is None
    assert recorder.trouble.lost_s == pytest.approx(lost / RATE) and recorder.trouble.errors >= 1
    assert recorder.trouble.failing == set()


def test_a_short_hiccup_of_the_disk_loses_no_audio(disk, recorder):
    rec = recorder.start({"call_id": "full-5", "start": 1764039000.0}, RATE)
    sent = pattern(RATE, 0), pattern(RATE, 1)
    tenth = RATE // 10
    feed(rec, sent[0][:tenth], sent[1][:tenth])
    eventually(lambda: rec.frames_synced == tenth, timeout=10, what="the first tenth of a second synced")
    disk.fill()
    feed(rec, sent[0][tenth:4 * tenth], sent[1][tenth:4 * tenth])  # 0.3 s: within hold_s
    drained(rec)
    disk.free()
    feed(rec, sent[0][4 * tenth:], sent[1][4 * tenth:])
    drained(rec)
    recorder.finish(rec, {"call_id": "full-5", "start": 1764039000.0, "end": 1764039001.0})
    rate, got = read_recording(rec.wav_path)
    assert rec.lost_frames == 0 and np.array_equal(got[:, 0], sent[0]) and np.array_equal(got[:, 1], sent[1])


def test_a_disk_full_mid_call_leaves_a_valid_wav_and_whole_event_lines(disk, recorder):
    record = {"call_id": "full-2", "start": 1764039000.0, "end": None}
    rec = recorder.start(record, RATE)
    half = RATE // 2
    sent = [(pattern(4 * half, 0)), (pattern(4 * half, 1))]
    feed(rec, sent[0][:half], sent[1][:half])
    eventually(lambda: rec.frames_synced == half, timeout=10, what="the first half second synced")
    recorder.on_event(CallerWords(call_id="full-2", t_ms=100.0, text="before", final=True, start_ms=0.0, end_ms=90.0))
    disk.fill()
    feed(rec, sent[0][half:3 * half], sent[1][half:3 * half])  # a second: more than hold_s
    # what the recording's last page of the disk still held was written; the rest held, then lost
    drained(rec)
    assert rec.lost_frames > 0
    recorder.on_event(CallerWords(call_id="full-2", t_ms=600.0, text="x" * 8000, final=True, start_ms=0.0,
                                  end_ms=590.0))  # more than a page: refused
    rate, on_disk = read_recording(rec.wav_path)  # valid while the disk is full: whole frames, no torn chunk
    assert on_disk.shape[0] == rec.frames_written and np.array_equal(on_disk[:half, 0], sent[0][:half])
    disk.free()
    feed(rec, sent[0][3 * half:], sent[1][3 * half:])
    recorder.on_event(CallerWords(call_id="full-2", t_ms=1100.0, text="after", final=True, start_ms=0.0, end_ms=1090.0))
    drained(rec)
    recorder.finish(rec, record)
    rate, got = read_recording(rec.wav_path)
    assert got.shape == (4 * half, 2)  # every frame of the call has its place
    assert np.array_equal(got[:half, 0], sent[0][:half]) and np.array_equal(got[3 * half:, 1], sent[1][3 * half:])
    middle = got[half:3 * half, 0]
    kept = middle != 0
    assert np.array_equal(middle[kept], sent[0][half:3 * half][kept])  # each frame: what was sent, or silence
    assert int((~kept).sum()) == rec.lost_frames
    lines = [json.loads(x) for x in open(rec.events_path, "rb").read().splitlines()]
    assert [x["text"] for x in lines] == ["before", "after"]
    final = json.loads(open(rec.sidecar_path).read())
    assert final["events_dropped"] == 1 and final["recording"]["lost_s"] == round(rec.lost_frames / RATE, 3)


def test_the_final_record_waits_for_the_disk_and_then_the_analysis_is_told(disk, recorder):
    told = []
    recorder.on_final.append(lambda rec: told.append(rec.call_id))
    record = {"call_id": "full-3", "start": 1764039000.0, "end": None}
    rec = recorder.start(record, RATE)
    feed(rec, pattern(RATE // 5, 0), pattern(RATE // 5, 1))
    eventually(lambda: json.loads(open(rec.sidecar_path).read())["recording"]["frames"] == RATE // 5,
               timeout=10, what="the sidecar with the audio")
    disk.fill()
    record["end"] = 1764039001.0
    recorder.finish(rec, record)
    assert recorder.unwritten == 1 and told == []  # nothing analyses a call whose record is not final
    assert json.loads(open(rec.sidecar_path).read())["recording"]["complete"] is False  # the last one kept whole
    disk.free()
    eventually(lambda: recorder.unwritten == 0, timeout=10, what="the final record written")
    final = json.loads(open(rec.sidecar_path).read())
    assert final["recording"]["complete"] is True and final["end"] == 1764039001.0
    assert told == ["full-3"]


def test_closing_on_a_full_disk_says_what_was_not_written_and_does_not_raise(disk, recorder, caplog):
    rec = recorder.start({"call_id": "full-4", "start": 1764039000.0}, RATE)
    disk.fill()
    feed(rec, pattern(RATE // 5, 0), pattern(RATE // 5, 1))
    with caplog.at_level(logging.ERROR, logger="callbot.app.recording"):
        recorder.close()
    assert any("full-4" in r.getMessage() and "could not be written" in r.getMessage() for r in caplog.records)
    assert recorder.unwritten == 0 and recorder.trouble.failing == set() and recorder.error is None


def test_a_disk_that_refuses_and_takes_writes_by_turns_is_said_twice_a_minute_at_most(caplog):
    from callbot.app.recording import DiskTrouble

    now = [0.0]
    trouble = DiskTrouble("/calls", clock=lambda: now[0])
    full = OSError(28, "No space left on device")
    with caplog.at_level(logging.WARNING, logger="callbot.app.recording"):
        for t in range(0, 59, 2):  # a nearly full disk: refused, taken, refused... for a minute
            now[0] = float(t)
            trouble.refused("a", "its recording", full)
            trouble.wrote("a")
        now[0] = 61.0
        trouble.refused("a", "its recording", full)
        trouble.refused("b", "its record", full)
        trouble.wrote("a")
        trouble.wrote("b")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4 and trouble.errors == 32, said
    assert ["refused" in x for x in said] == [True, False, True, False]
    assert "of call a (No space left on device)" in said[0] and "takes writes again" in said[3]
