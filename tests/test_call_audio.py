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
