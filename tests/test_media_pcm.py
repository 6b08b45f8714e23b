"""ext/_pcm.pyx: PCM between real pjsua2 MediaFrame/ByteVector objects and rings, frame by frame."""

import numpy as np
import pjsua2 as pj
import pytest

from callbot.engine import Ring, now_ns
from callbot.sip._pcm import MediaPump, check_layout, vector_to_bytes
from callbot.engine.audio._stamps import NBYTES, StampLog

N = 160  # 20 ms at 8 kHz

check_layout(pj)


def received_frame(samples):
    """A frame as pjsua2 hands it to onFrameReceived."""
    f = pj.MediaFrame()
    f.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    f.buf = pj.ByteVector(np.asarray(samples, np.int16).tobytes())
    f.size = 2 * len(samples)
    return f


def requested_frame(n=N):
    """A frame as pjsua2 hands it to onFrameRequested: empty buffer, the wanted size in bytes."""
    f = pj.MediaFrame()
    f.size = 2 * n
    return f


def samples_of(frame):
    return np.frombuffer(vector_to_bytes(frame.buf), np.int16)


def rings(n=4, capacity=1024):
    return [Ring(capacity, "int16") for _ in range(n)]


def test_layout_check_passes_on_pjsua2_and_fails_on_impostors():
    check_layout(pj)  # again: idempotent

    class NotSwig:
        class ByteVector:
            def __init__(self, data):
                self.this = object()

    with pytest.raises(ValueError, match="SwigPyObject"):
        check_layout(NotSwig)


def test_frames_must_be_pjsua2_objects():
    rx, tx = rings(2)
    pump = MediaPump(rx, tx, N)

    class Fake:
        this = object()

    with pytest.raises(ValueError, match="pjsua2 object"):
        pump.received(Fake())
    with pytest.raises(AttributeError):
        pump.requested(object())


def test_a_reused_frame_buffer_is_grown_only_when_too_small():
    rx, tx = rings(2)
    pump = MediaPump(rx, tx, N)
    tx.write(np.arange(3 * N, dtype=np.int16))
    f = requested_frame(N)
    pump.requested(f)
    f.size = 2 * N * 2  # a bigger frame: the buffer grows
    pump.requested(f)
    assert f.buf.size() == 4 * N and np.array_equal(samples_of(f), np.arange(N, 3 * N, dtype=np.int16))
    f.size = N  # a smaller one: the buffer shrinks in place
    pump.requested(f)
    assert f.buf.size() == N


def test_received_frames_go_to_rx_and_the_recorder():
    rx, tx, rc, rb = rings()
    pump = MediaPump(rx, tx, N, rc, rb)
    x = np.arange(N, dtype=np.int16) - 80
    pump.received(received_frame(x))
    assert np.array_equal(rx.read(N), x) and np.array_equal(rc.read(N), x)
    assert pump.frames_received == 1 and pump.rx_overruns == 0


def test_requested_frames_come_from_tx_and_go_to_the_recorder():
    rx, tx, rc, rb = rings()
    pump = MediaPump(rx, tx, N, rc, rb)
    y = (np.arange(N, dtype=np.int16) * 3) - 200
    tx.write(y)
    f = requested_frame()
    pump.requested(f)
    assert f.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and f.buf.size() == 2 * N
    assert np.array_equal(samples_of(f), y) and np.array_equal(rb.read(N), y)
    assert pump.tx_underruns == 0


def test_silence_before_the_engine_speaks_is_no_underrun_but_a_gap_after_is():
    rx, tx = rings(2)
    pump = MediaPump(rx, tx, N)
    f = requested_frame()
    pump.requested(f)
    assert not samples_of(f).any() and pump.tx_underruns == 0 and tx.underruns == 0
    tx.write(np.full(N + 40, 7, np.int16))
    pump.requested(f := requested_frame())
    assert (samples_of(f) == 7).all()
    pump.requested(f := requested_frame())  # 40 left: 40 of them, then silence
    s = samples_of(f)
    assert (s[:40] == 7).all() and not s[40:].any()
    assert pump.tx_underruns == 1 and tx.underruns == 1


def test_full_rings_count_overruns_and_never_block():
    rx, tx = Ring(256, "int16"), Ring(256, "int16")
    rc, rb = Ring(256, "int16"), Ring(256, "int16")
    pump = MediaPump(rx, tx, N, rc, rb)
    pump.received(received_frame(np.ones(N)))
    pump.received(received_frame(np.ones(N)))  # 320 > 256
    assert pump.rx_overruns == 1 and rx.overruns == 1 and pump.recorder_overruns == 1
    assert rx.readable == 256


def test_the_pump_stamps_when_samples_entered_rx_and_left_tx():
    rx, tx = Ring(256, "int16"), Ring(1024, "int16")
    rx_log, tx_log = (StampLog.create_in(np.zeros(NBYTES // 8, np.int64)) for _ in range(2))
    pump = MediaPump(rx, tx, N, rx_stamps=rx_log, tx_stamps=tx_log)
    t0 = now_ns()
    pump.received(received_frame(np.ones(N)))
    t1 = now_ns()
    assert t0 <= rx_log.find(N) <= t1 and rx_log.find(N + 1) == 0  # sample N - 1 came in then; N not yet
    pump.received(received_frame(np.ones(N)))  # 96 of 160 fit: the stamp counts what went in
    t2 = now_ns()
    assert t1 <= rx_log.find(N + 1) == rx_log.find(256) <= t2 and rx_log.find(257) == 0
    pump.requested(requested_frame())  # the engine has not spoken: nothing left tx, nothing stamped
    assert tx_log.find(1) == 0
    tx.write(np.full(N + 40, 7, np.int16))
    t3 = now_ns()
    pump.requested(requested_frame())
    pump.requested(requested_frame())  # 40 left
    t4 = now_ns()
    assert t3 <= tx_log.find(1) <= tx_log.find(N + 1) == tx_log.find(N + 40) <= t4 and tx_log.find(N + 41) == 0


def test_recorder_channels_stay_in_step_when_a_received_frame_is_missing():
    rx, tx, rc, rb = rings()
    pump = MediaPump(rx, tx, N, rc, rb)
    tx.write(np.full(4 * N, 5, np.int16))
    # tick 1: received then requested; tick 2: pjmedia skips put_frame; tick 3: both again
    pump.received(received_frame(np.full(N, 1)))
    pump.requested(requested_frame())
    pump.requested(requested_frame())
    pump.received(received_frame(np.full(N, 3)))
    pump.requested(requested_frame())
    assert rc.readable == rb.readable == 3 * N
    caller = rc.read(3 * N)
    assert (caller[:N] == 1).all() and not caller[N : 2 * N].any() and (caller[2 * N :] == 3).all()


def test_an_empty_received_frame_is_a_tick_of_silence():
    rx, tx, rc, rb = rings()
    pump = MediaPump(rx, tx, N, rc, rb)
    f = pj.MediaFrame()  # type NONE, no bytes
    pump.received(f)
    assert pump.empty_received == 1 and rx.readable == N and not rx.read(N).any()
    assert rc.readable == N


def test_bad_construction_is_a_value_error():
    rx, tx, rc, _ = rings()
    with pytest.raises(ValueError, match="frame_samples"):
        MediaPump(rx, tx, 0)
    with pytest.raises(ValueError, match="frame_samples"):
        MediaPump(rx, tx, 100000)
    with pytest.raises(ValueError, match="both"):
        MediaPump(rx, tx, N, rc, None)
    with pytest.raises(ValueError, match="int16"):
        MediaPump(Ring(256, "float32"), tx, N)
    with pytest.raises(ValueError, match="rx and tx"):
        MediaPump(None, tx, N)
    with pytest.raises(TypeError):
        MediaPump("not a ring", tx, N)


def test_the_thread_hook_runs_once_on_each_new_thread_and_never_breaks_a_frame():
    import threading

    from callbot.sip._pcm import set_media_thread_hook

    pump = MediaPump(Ring(1024, "int16"), Ring(1024, "int16"), N)
    seen = []

    def hook():
        seen.append(threading.get_ident())
        raise RuntimeError("a failing hook must not cost the frame")

    set_media_thread_hook(hook)
    try:
        for _ in range(3):
            f = requested_frame()
            pump.requested(f)
            assert len(samples_of(f)) == N
        other = threading.Thread(target=lambda: [pump.requested(requested_frame()) for _ in range(3)])
        other.start()
        other.join(10)
        assert seen == [threading.get_ident(), other.ident]
        set_media_thread_hook(None)
        pump.requested(requested_frame())
        assert len(seen) == 2
    finally:
        set_media_thread_hook(None)
