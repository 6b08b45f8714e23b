"""ext/stamps.h via callbot.engine.audio._stamps, and CallAudio's mapping of frames to the media side's stamps."""
import numpy as np
import pytest

from callbot.engine import now_ns
from callbot.engine.audio._stamps import HELD, NBYTES, StampLog
from callbot.engine.serving.call_audio import CallAudio


def _words():
    return np.zeros(NBYTES // 8, np.int64)


def test_find_answers_the_callback_that_moved_a_sample_while_it_is_held():
    buf = _words()
    writer, reader = StampLog.create_in(buf), StampLog.attach(buf)
    assert reader.find(1) == 0  # nothing moved yet
    times = []
    for _ in range(HELD + 10):
        writer.note(160)
        times.append(reader.find(160 * len(times) + 160))
    assert all(t > 0 for t in times) and times == sorted(times)
    # the last HELD pairs are held; the oldest of them only bounds the next one's start, so the positions
    # of the last HELD - 1 callbacks are answered and older ones are unknown (0)
    assert reader.find(160 * (HELD + 10)) == times[-1]
    assert reader.find(160 * 12) == times[11] and reader.find(160 * 11 + 1) == times[11]
    assert reader.find(160 * 11) == 0 and reader.find(1) == 0
    assert reader.find(160 * (HELD + 10) + 1) == 0  # not yet


def test_bad_buffers_are_value_errors():
    with pytest.raises(ValueError, match="needs"):
        StampLog.create_in(bytearray(16))
    with pytest.raises(ValueError, match="8-byte"):
        StampLog.create_in(memoryview(_words()).cast("B")[4:])
    with pytest.raises(ValueError, match="no stamp log"):
        StampLog.attach(_words())
    with pytest.raises(ValueError, match=">= 0"):
        StampLog.create_in(_words()).note(-1)
    with pytest.raises(ValueError, match="time in ns"):
        StampLog.create_in(_words()).note(1, -5)
    given = StampLog.create_in(_words())
    given.note(10, 12345)  # a test's own clock
    assert given.find(10) == 12345
    log = StampLog.create_in(_words())
    log.close()
    log.note(1)  # a closed log takes and answers nothing
    assert log.closed and log.find(1) == 0


def test_call_audio_maps_a_frame_to_when_its_last_sample_came_in_and_left():
    audio = CallAudio(8000)
    stamps = []
    for _ in range(4):  # 4 x 20 ms at 8 kHz = 640 samples -> 1920 at 24 kHz, minus the resampler's delay
        audio.rx_stamps.note(160)
        stamps.append(now_ns())
        audio.rx.write(np.ones(160, np.int16))
    while True:
        pull_start = now_ns()
        if audio.pull(1920) is not None:
            break
        before = now_ns()
        audio.rx_stamps.note(160)
        audio.rx.write(np.ones(160, np.int16))
        stamps.append(before)
    assert 0 < audio.last_arrival_ns <= now_ns() and audio.last_arrival_ns >= stamps[-2]
    # the frame was completed by the resampler in the pull that returned it
    assert audio.last_arrival_ns <= pull_start <= audio.last_resampled_ns <= now_ns()
    assert audio.push(np.ones(1920, np.int16)) == 640 and audio.last_push_pos == 0
    pushed = audio.last_push_ns
    assert audio.departure_ns(0) == 0  # not read yet
    audio.tx.read(160)
    audio.tx_stamps.note(160)
    assert audio.departure_ns(0) >= pushed and audio.departure_ns(160) == 0
    audio.tx.read(160)  # read, its stamp not appended yet (the pump stamps just after reading): pending
    assert audio.departure_ns(160) == 0
    audio.tx_stamps.note(160)
    assert audio.departure_ns(160) >= audio.departure_ns(0) > 0
    # asked about too late: the log holds the last HELD pairs only
    for _ in range(HELD + 2):
        audio.push(np.ones(480, np.int16))
        audio.tx.read(160)
        audio.tx_stamps.note(160)
    assert audio.departure_ns(0) == -1
    audio.close()
    # a media side that keeps no stamps: read is read, and no stamp will ever come
    silent = CallAudio(8000)
    silent.push(np.ones(1920, np.int16))
    silent.tx.read(160)
    assert silent.tx_stamps.appended() == 0 and silent.departure_ns(0) == -1
    silent.close()
    audio.close()
