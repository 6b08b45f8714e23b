"""A call's shared block (engine/serving/shared_block.py): both sides see one layout, only the creator
unlinks, and a block that is not a call's is refused with its reason, leaving nothing mapped."""
from multiprocessing import shared_memory

import numpy as np
import pytest

from callbot.engine.audio import Ring
from callbot.engine.serving.shared_block import SharedCallRings, _block_size, _ring_span


def test_both_sides_see_the_same_rings_and_stamp_logs():
    media = SharedCallRings.create(8000, 1024)
    engine = SharedCallRings.attach(media.shm_name, 8000)
    try:
        assert (engine.rx.capacity, engine.tx.capacity) == (1024, 1024)
        assert engine.frame_samples == media.frame_samples == 160
        media.rx.write(np.arange(160, dtype=np.int16))
        assert np.array_equal(engine.rx.read(160), np.arange(160, dtype=np.int16))
        engine.tx.write(np.full(160, 7, np.int16))
        assert media.tx.read(160)[-1] == 7
        media.tx_stamps.note(160, 123_000)
        assert engine.tx_stamps.find(160) == 123_000
    finally:
        engine.close()
        media.close()


def test_only_the_creator_unlinks():
    media = SharedCallRings.create(16000, 2048)
    engine = SharedCallRings.attach(media.shm_name, 16000)
    engine.close()
    engine.close()  # twice is fine
    assert engine.closed
    shared_memory.SharedMemory(name=media.shm_name).close()  # still there
    media.close()
    media.close()
    assert media.closed
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=media.shm_name)


@pytest.mark.parametrize("size", [64, 4096])
def test_a_block_without_a_ring_is_refused_and_left_unmapped(size):
    shm = shared_memory.SharedMemory(create=True, size=size)
    try:
        with pytest.raises(ValueError, match="ring"):
            SharedCallRings.attach(shm.name, 8000)
    finally:
        shm.close()  # a mapping the failed attach kept would make this raise BufferError
        shm.unlink()


def test_a_block_too_small_for_its_rings_says_so():
    capacity = 1024
    shm = shared_memory.SharedMemory(create=True, size=_ring_span(capacity))  # rx only
    assert shm.size < _block_size(capacity)
    view = shm.buf[:]
    Ring.create_in(view, capacity, "int16").close()
    view.release()
    try:
        with pytest.raises(ValueError, match="too small for a call's rings"):
            SharedCallRings.attach(shm.name, 8000)
    finally:
        shm.close()
        shm.unlink()
