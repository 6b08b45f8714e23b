"""ext/stamps.h via callbot.engine.audio._stamps, and CallAudio's mapping of frames to the media side's stamps."""
import os
import pathlib
import shlex
import shutil
import subprocess
import sysconfig

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


# ---- the shared layout, word by word --------------------------------------------------------------

LINE = 128  # bytes: CB_STAMPS_LINE, as CB_RING_LINE in ring.h
MAGIC, VERSION = 0x504D5453, 2  # "STMP"; 2: C11 atomics on 128-byte lines


def test_layout_is_the_one_both_processes_map():
    """stamps.h's cb_stamps as another process (or release) sees it: the header line, the writer's line,
    then the pos and ns arrays. NBYTES sizes the call's shared block (engine/serving)."""
    assert NBYTES == 2 * LINE + 2 * 8 * HELD == 1280
    words = _words()
    log = StampLog.create_in(words)
    log.note(5, 777)
    log.note(7, 999)
    head = words.view(np.uint32)
    assert (head[0], head[1], head[2], head[3]) == (MAGIC, VERSION, HELD, 2 * LINE)  # magic, version, held, header
    assert words[LINE // 8] == 2 and words[LINE // 8 + 1] == 12  # count, total: the writer's own line
    pos, ns = words[2 * LINE // 8:][:HELD], words[2 * LINE // 8 + HELD:]
    assert list(pos[:3]) == [5, 12, 0] and list(ns[:3]) == [777, 999, 0]
    log.close()
    for corrupt in (1, 2):  # another version of stamps.h, or a log of another size, is refused
        other = words.copy()
        other.view(np.uint32)[corrupt] += 1
        with pytest.raises(ValueError, match="no stamp log"):
            StampLog.attach(other)


# ---- a native writer and reader racing, plain and under ThreadSanitizer -----------------------------

HERE = pathlib.Path(__file__).parent


def _c_compiler():
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return cc if cc and shutil.which(cc[0]) else None


@pytest.mark.timeout(180)
@pytest.mark.parametrize("build", ["plain", "tsan"])
def test_native_reader_racing_the_writer_gets_only_right_answers(tmp_path, build):
    """tests/stamps_stress.c: a writer appends flat out while a reader asks about the oldest pairs, whose
    slots are being overwritten; every time find() returns must be the pair that moved the sample. The
    plain build races at full speed (the previous stamps.h, which trusted a slot under overwrite, failed
    it in 10 of 10 runs); TSan checks the words that are not atomic (the writer's own total)."""
    cc = _c_compiler()
    if cc is None:
        pytest.skip("no C compiler (the package build needs one; this machine has none on PATH)")
    exe = tmp_path / "stamps_stress"
    flags = ["-O2", "-DQUERIES=10000000"] if build == "plain" else ["-O1", "-g", "-fsanitize=thread"]
    compiled = subprocess.run(
        [*cc, "-std=c11", *flags, "-pthread", f"-I{HERE.parent / 'ext'}", str(HERE / "stamps_stress.c"),
         "-o", str(exe)],
        capture_output=True, text=True, timeout=120,
    )
    if build == "tsan" and compiled.returncode != 0 and "tsan" in compiled.stderr.lower():
        pytest.skip(f"ThreadSanitizer runtime not installed: {compiled.stderr.strip()[-200:]}")
    assert compiled.returncode == 0, compiled.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    if "unexpected memory mapping" in run.stderr and shutil.which("setarch"):
        # TSan of older toolchains cannot map its shadow under the wide ASLR of newer kernels
        run = subprocess.run(["setarch", os.uname().machine, "-R", str(exe)], capture_output=True, text=True,
                             timeout=120)
    assert "ThreadSanitizer" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("appended ") and " 0 answered" not in run.stdout, run.stdout
