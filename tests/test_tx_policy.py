"""The tx policy (engine/serving/tx_policy.py) as CallAudio applies it: a late engine or an extra frame
never turns into delay for the rest of a call."""
import numpy as np
import pytest

from callbot.engine.serving import tx_policy
from callbot.engine.serving.call_audio import CallAudio


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


def test_a_played_clip_frame_goes_in_whole_and_the_next_push_is_held_to_the_limit_again():
    """A round that caught up after a stall finds tx still full: the clip's frame is not cut (late by
    what is queued rather than cut), the model's next frame is trimmed back to the limit."""
    audio = CallAudio(8000, tx_max_ms=120.0)  # 960 samples at 8 kHz
    audio.push(np.zeros(1920, dtype=np.int16))  # 640 queued
    clip = np.arange(1, 641, dtype=np.int16)
    assert audio.push(np.zeros(1920, dtype=np.int16), exact=clip) == 640
    assert audio.tx_trimmed == 0 and audio.tx.readable == 1280  # over the limit, whole
    audio.push(np.zeros(1920, dtype=np.int16))
    assert audio.tx.readable == 1280 and audio.tx_trimmed == 640  # the limit drops what the push brings
    sent = audio.tx.read(1280)
    assert np.array_equal(sent[640:], clip)  # the clip, in one piece
    audio.push(np.zeros(1920, dtype=np.int16))
    assert audio.tx.readable == 640  # and the limit holds again


def test_without_a_limit_everything_queues():
    audio = CallAudio(8000)
    audio.push(np.zeros(1920, dtype=np.int16))
    audio.push(np.zeros(1920, dtype=np.int16))
    assert audio.tx_trimmed == 0 and audio.tx.readable > 480 * 2


class _Line:
    """A call's tx on a simulated clock: the media side reads 20 ms (160 samples at 8 kHz) every 20 ms
    tick and stamps what it read, as MediaPump does; the engine pushes 80 ms frames `step_ms[k]` after
    frame k's input completed (at 80 k ms)."""

    def __init__(self, settle=4):
        self.t = 0
        self.audio = CallAudio(8000, tx_settle=settle, clock=lambda: self.t)
        self.underruns = 0

    def run(self, step_ms):
        frame = np.ones(1920, dtype=np.int16)
        events = [(k * 80_000_000 + round(s * 1e6), 1, k) for k, s in enumerate(step_ms)]
        end = events[-1][0] + 100_000_000
        events += [(j * 20_000_000, 0, j) for j in range(1, end // 20_000_000)]
        backlogs = []
        for t, kind, _ in sorted(events):
            self.t = t
            if kind == 1:
                backlogs.append(self.audio.tx.readable)
                self.audio.push(frame)
            else:
                got = len(self.audio.tx.read(min(160, self.audio.tx.readable)))
                if got:
                    self.audio.tx_stamps.note(got, t)
                elif self.audio.frames_pushed:
                    self.underruns += 1
        return backlogs


def test_a_lasting_backlog_with_time_to_spare_is_cut_once():
    line = _Line(settle=4)
    # steady: steps of 5 ms, every push finds tx drained; then one step of 25 ms misses its tick (an
    # underrun), and from then on every push finds the previous frame's last 20 ms still queued
    backlogs = line.run([5.0] * 6 + [25.0] + [5.0] * 10)
    assert backlogs[:7] == [0] * 7 and line.underruns == 1
    assert backlogs[7:11] == [160] * 4
    # four pushes in a row found it, each 15 ms earlier than needed: the fifth cut it, once
    assert line.audio.tx_settled == 1 and line.audio.tx_trimmed == 160
    assert backlogs[12:] == [0] * (len(backlogs) - 12)


def test_a_backlog_kept_by_steps_that_straddle_a_tick_stays():
    line = _Line(settle=4)
    # steps of 19 and 21 ms: in the early phase every 21 ms step would miss its tick; the phase the first
    # miss moved to gives them the tick they need, so it is kept, not cut and re-earned by an underrun
    line.run([19.0, 21.0] * 10)
    assert line.audio.tx_settled == 0 and line.audio.tx_trimmed == 0
    assert line.underruns == 1  # the first miss, and no other: the later phase holds


def test_no_stamps_no_cut():
    """Without the media side's stamps there is no evidence of time to spare: nothing is cut."""
    audio = CallAudio(8000, tx_settle=2)
    frame = np.ones(1920, dtype=np.int16)
    for _ in range(6):
        audio.push(frame)
        audio.tx.read(480)  # leaves 160 queued at each push, never stamped
    assert audio.tx_settled == 0


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_bad_settle(bad):
    with pytest.raises(ValueError, match="tx_settle"):
        CallAudio(16000, tx_settle=bad)


@pytest.mark.parametrize("bad", [0, -5, 10_000])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="tx_max_ms"):
        CallAudio(16000, ring_seconds=2.0, tx_max_ms=bad)


def test_the_engines_settings_are_the_measured_ones():
    """The runner's and the echo line's tx settings, from the policy's reasons (BENCHMARKS.md)."""
    assert tx_policy.MODEL_TX_MAX_MS == 120.0 and tx_policy.MODEL_TX_SETTLE_PUSHES == 125
    assert tx_policy.tx_limit_ms(20.0) == 60.0 and tx_policy.ECHO_TX_SETTLE_PUSHES == 500
    assert tx_policy.SETTLE_MARGIN_MS == 4.0
    assert isinstance(tx_policy.MODEL_TX_SETTLE_PUSHES, int) and isinstance(tx_policy.ECHO_TX_SETTLE_PUSHES, int)
