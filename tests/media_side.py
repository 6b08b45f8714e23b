"""A stand-in for pjmedia's clock thread, for tests that run an engine without SIP: it feeds a call's
rx and drains its tx every 20 ms, stamping both as ext/_pcm.pyx's media pump does."""
from __future__ import annotations

import threading

import numpy as np

from callbot.engine import PeriodicClock, now_ns


def play_media_side(audio, frames: int, stop: threading.Event, received: list, pause_after: int | None = None,
                    pause_frames: int = 0, marks: dict | None = None):
    """Every 20 ms one frame of a 440 Hz tone into rx and one frame out of tx (appended to `received`,
    silence when tx was short), stamped as the media pump stamps them (before the rx write, after the tx
    read). With `pause_after`, frames pause_after .. pause_after + pause_frames bring no audio (a hold),
    and `marks` gets when that pause started and ended."""
    n = audio.frame_samples
    t = np.arange(frames * n) / audio.call_rate
    signal = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    clock = PeriodicClock(20.0)
    for i in range(frames):
        if stop.is_set():
            return
        clock.wait()
        if marks is not None and i == pause_after:
            marks["pause_start"] = now_ns()
        if marks is not None and pause_after is not None and i == pause_after + pause_frames:
            marks["pause_end"] = now_ns()
        if pause_after is None or not pause_after <= i < pause_after + pause_frames:
            audio.rx_stamps.note(n)
            audio.rx.write(signal[i * n:(i + 1) * n])
        # what is there, up to a frame, the rest silence (a short tx is an underrun, as in the pump)
        out = np.zeros(n, np.int16)
        have = min(n, audio.tx.readable)
        if have:
            out[:have] = audio.tx.read(have)
            audio.tx_stamps.note(have)
        received.append(out)


def play_through(audio, frames: int, pause_after: int | None = None, pause_frames: int = 0,
                 marks: dict | None = None, timeout_s: float = 30.0) -> list:
    """`play_media_side` for all its `frames`, on a thread of its own as pjmedia's clock thread is, and
    waited for (at most `timeout_s`); returns what it read out of tx, a frame per tick."""
    stop, received = threading.Event(), []
    media = threading.Thread(target=play_media_side, args=(audio, frames, stop, received, pause_after,
                                                           pause_frames, marks))
    media.start()
    media.join(timeout_s)
    stop.set()
    return received
