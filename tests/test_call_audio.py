"""CallAudio across two processes: the SIP side's rings in a shared block, the engine side's resamplers
over the same block (engine/serving/call_audio.py, shared_block.py)."""
import numpy as np
import pytest

from callbot.engine.serving.call_audio import CallAudio


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


def test_a_bad_setting_on_the_engine_side_leaves_the_block_to_its_creator():
    media = CallAudio.shared(16000)
    try:
        with pytest.raises(ValueError, match="tx_max_ms"):
            CallAudio.attach_engine_side(media.shm_name, 16000, tx_max_ms=0)
        engine = CallAudio.attach_engine_side(media.shm_name, 16000)  # the block is still whole
        engine.close()
    finally:
        media.close()
    assert media.closed
