"""CallAudio's tx limit: a late engine or an extra frame never turns into delay for the rest of a call."""
import numpy as np
import pytest

from callbot.engine.call_audio import CallAudio


def test_push_beyond_the_limit_drops_the_oldest_of_what_it_brings():
    audio = CallAudio(8000, tx_max_ms=60.0)  # 480 samples at 8 kHz
    frame = np.arange(1920, dtype=np.int16)  # 80 ms at 24 kHz -> 640 samples at 8 kHz
    accepted = audio.push(frame)
    assert accepted == audio.tx.readable <= 480
    assert audio.tx_trimmed > 0 and audio.tx_trimmed + accepted == 640 - 0  # every sample kept or counted
    # the media side drains 20 ms, the engine pushes again: the queue never exceeds the limit
    audio.tx.read(160)
    audio.push(frame)
    assert audio.tx.readable == 480


def test_without_a_limit_everything_queues():
    audio = CallAudio(8000)
    audio.push(np.zeros(1920, dtype=np.int16))
    audio.push(np.zeros(1920, dtype=np.int16))
    assert audio.tx_trimmed == 0 and audio.tx.readable > 480 * 2


def _media_tick(audio, n=160):
    """What the media callback does once a tick: read one 20 ms frame from tx (8 kHz here)."""
    return audio.tx.read(min(n, audio.tx.readable))


def test_a_lasting_backlog_in_tx_is_cut_once_and_a_passing_one_is_not():
    audio = CallAudio(8000, tx_settle=4)
    frame = np.ones(1920, dtype=np.int16)  # 80 ms -> 640 samples at 8 kHz = 4 media ticks
    audio.push(frame)
    for _ in range(4):
        _media_tick(audio)
    # steady state: each push finds tx drained, four ticks drain it again
    for _ in range(6):
        audio.push(frame)
        for _ in range(4):
            _media_tick(audio)
    assert audio.tx_settled == 0 and audio.tx_trimmed == 0
    # one tick missed (an underrun's phase shift): from now on every push finds 20 ms still queued
    audio.push(frame)
    for _ in range(3):
        _media_tick(audio)
    queued = []
    for _ in range(4):
        queued.append(audio.tx.readable)
        audio.push(frame)
        for _ in range(4):
            _media_tick(audio)
    assert queued[:3] == [160, 160, 160]
    # the fourth push in a row that found a backlog cut it (only it: one 20 ms cut), and tx is back in phase
    assert audio.tx_settled == 1 and audio.tx_trimmed == 160
    assert audio.tx.readable == 0
    # a single push finding a backlog (a fast step after a slow one) is left alone
    audio.push(frame)
    audio.push(frame)
    for _ in range(8):
        _media_tick(audio)
    assert audio.tx_settled == 1


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_bad_settle(bad):
    with pytest.raises(ValueError, match="tx_settle"):
        CallAudio(16000, tx_settle=bad)


@pytest.mark.parametrize("bad", [0, -5, 10_000])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="tx_max_ms"):
        CallAudio(16000, ring_seconds=2.0, tx_max_ms=bad)


def test_shared_rings_carry_audio_to_the_engine_side_and_unlink_at_close():
    """The SIP side's rx/tx in one shared block; the engine side opens it by name with its resamplers."""
    from multiprocessing import shared_memory

    media = CallAudio.shared(16000)
    engine = CallAudio.attach_engine_side(media.shm_name, 16000, tx_max_ms=120.0)
    try:
        media.rx.write(np.full(1280, 1000, np.int16))  # 80 ms at 16 kHz, and the resampler's delay more
        frame = engine.pull(1920)
        assert frame is not None and frame[-1] == 1000
        engine.push(np.full(1920, -2000, np.int16))
        assert media.tx.read(320)[-1] == -2000
    finally:
        engine.close()
        media.close()
    media.close()  # twice is fine
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=media.shm_name)


def test_attach_to_a_missing_block_says_so():
    with pytest.raises(ValueError, match="no shared call audio named"):
        CallAudio.attach_engine_side("callbot-no-such-block", 16000)
