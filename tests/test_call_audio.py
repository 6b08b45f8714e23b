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
