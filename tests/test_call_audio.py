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


def test_the_resamplers_phase_is_chosen_before_the_first_audio_and_then_stays():
    from callbot.engine import Resampler

    audio = CallAudio(8000)
    try:
        assert audio.resampler_phase == "linear" and audio.untouched
        audio.use_resampler_phase("minimum")
        assert audio.delay_ms == pytest.approx(2 * Resampler(8000, 24000, "minimum").delay_ms, rel=0.3)
        assert audio.delay_ms < CallAudio(8000).delay_ms / 3
        impulse = np.zeros(640, np.int16)
        impulse[100] = 20000
        audio.rx.write(impulse)
        frame = audio.pull(1920)
        want = Resampler(8000, 24000, "minimum").process(impulse)
        assert frame is not None and np.array_equal(frame, want)  # the minimum-phase filter did it
        assert not audio.untouched
        with pytest.raises(ValueError, match="before the call's first audio"):
            audio.use_resampler_phase("linear")
        audio.use_resampler_phase("minimum")  # the same phase: nothing to change
        with pytest.raises(ValueError, match="phase"):
            CallAudio(8000, resampler_phase="maximum")
    finally:
        audio.close()


def test_pad_start_puts_silence_before_the_first_sample_and_keeps_the_stamps_right():
    audio = CallAudio(16000)
    try:
        assert audio.rx_tick() == (0, 0)
        audio.pad_start(480)
        audio.rx_stamps.note(320, 5_000_000_000)
        audio.rx.write(np.full(320, 1000, np.int16))
        assert audio.rx_tick() == (320, 5_000_000_000)
        assert audio.pull(1920) is None  # 480 + 480 of 1920
        for k in range(1, 3):
            audio.rx_stamps.note(320, 5_000_000_000 + k * 20_000_000)
            audio.rx.write(np.full(320, 1000, np.int16))
        frame = audio.pull(1920)  # the third tick completes the frame: 480 silence + 3 x 480
        assert frame is not None and not frame[:480].any() and audio.last_arrival_ns == 5_040_000_000
        with pytest.raises(ValueError, match="first audio"):
            audio.pad_start(480)
        with pytest.raises(ValueError, match="pad_start takes"):
            CallAudio(16000).pad_start(-1)
    finally:
        audio.close()


def test_push_can_skip_the_front_of_its_audio_and_counts_it_trimmed():
    audio = CallAudio(16000)
    try:
        assert audio.push(np.full(1920, 1000, np.int16), skip=320) == 960
        assert audio.tx_trimmed == 320 and audio.tx.readable == 960
    finally:
        audio.close()


def test_a_planned_round_drops_one_tick_per_tick_the_media_side_found_tx_empty():
    """ModelEngine._missed_samples: the ticks that played silence since the call's last push."""
    from types import SimpleNamespace

    from callbot.engine.audio import now_ns
    from callbot.engine.serving.runner import ModelEngine

    audio = CallAudio(16000)
    try:
        s = SimpleNamespace(audio=audio, underruns_seen=0, frame_tick_ns=0)
        audio.frames_pushed = 1  # the call has spoken: the media side reads its tx every tick
        audio.tx.write(np.zeros(320, np.int16))
        audio.tx.read(320)
        audio.tx_stamps.note(320)
        assert ModelEngine._missed_samples(s, end_tick=1) == 0  # nothing missed
        assert audio.tx.read(320) is None and audio.tx.read(320) is None  # two ticks found tx empty
        future = now_ns() + 10**9
        assert ModelEngine._missed_samples(s, end_tick=future) == 0  # the round is on time: not its ticks
        assert audio.tx.read(320) is None and audio.tx.read(320) is None
        assert ModelEngine._missed_samples(s, end_tick=now_ns() - 10_000_000) == 320  # one tick past it
        assert audio.tx.read(320) is None and audio.tx.read(320) is None
        assert ModelEngine._missed_samples(s, end_tick=1) == 640
        assert ModelEngine._missed_samples(s, end_tick=1) == 0  # counted once
        assert audio.tx.read(320) is None
        assert ModelEngine._missed_samples(s, end_tick=0) == 0  # no planned round: as before
        assert ModelEngine._missed_samples(s, end_tick=1) == 0  # and that tick is not counted later
        assert audio.tx.read(320) is None
        audio.tx.write(np.zeros(400, np.int16))  # audio still queued covers the missed tick
        assert ModelEngine._missed_samples(s, end_tick=1) == 0
        # on time with earlier audio queued: its whole ticks go, once
        assert ModelEngine._missed_samples(s, end_tick=future) == 320
        assert ModelEngine._missed_samples(s, end_tick=0) == 0  # no planned round: nothing
    finally:
        audio.close()
