"""Tests of callbot.engine.Ring: the SPSC PCM ring, in one thread, two threads and two processes."""
import multiprocessing
import os
import pathlib
import pickle
import shlex
import shutil
import subprocess
import sysconfig
import threading
import time
from collections import deque
from multiprocessing import shared_memory

import numpy as np
import pytest

from callbot.engine import Ring
from callbot.engine.audio import ring as ring_module

DTYPES = ["int16", "float32"]
# header offsets of ext/ring.h's cb_ring, for the tests that corrupt a header on purpose
OFF_MAGIC, OFF_VERSION, OFF_CAPACITY, OFF_ITEMSIZE, OFF_DTYPE = 0, 4, 8, 12, 16
OFF_WRITE_INDEX, OFF_READ_INDEX = 128, 256
# a deadline for the loops that wait on another thread or process: a bound, not a timing assertion
STALL_S = 60.0


def counting(start, n, dtype):
    """Samples start, start+1, ... as the ring's dtype (int16 wraps modulo 65536, as a cast does)."""
    return np.arange(start, start + n, dtype=np.int64).astype(dtype)


@pytest.fixture(params=DTYPES)
def dtype(request):
    return np.dtype(request.param)


# ---- one thread ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["int16", "float32", np.int16, np.float32, np.dtype("int16"), "<f4"])
def test_dtype_spellings_are_accepted(spelling):
    ring = Ring(16, spelling)
    assert ring.dtype == np.dtype(spelling)
    assert ring.capacity == 16
    assert (ring.readable, ring.writable, ring.overruns, ring.underruns) == (0, 16, 0, 0)


def test_wrap_around_keeps_order(dtype):
    ring = Ring(8, dtype)
    start = 0
    for size in [6, 5, 7, 8, 3, 1, 8]:  # every write but the first crosses the end of the storage
        assert ring.write(counting(start, size, dtype)) == size
        out = ring.read(size)
        np.testing.assert_array_equal(out, counting(start, size, dtype))
        assert out.dtype == dtype
        start += size
    assert (ring.overruns, ring.underruns) == (0, 0)


def test_whole_capacity_is_usable(dtype):
    ring = Ring(16, dtype)
    assert ring.write(counting(0, 16, dtype)) == 16
    assert (ring.readable, ring.writable) == (16, 0)
    np.testing.assert_array_equal(ring.read(16), counting(0, 16, dtype))
    assert (ring.readable, ring.writable) == (0, 16)


def test_capacity_one(dtype):
    ring = Ring(1, dtype)
    assert ring.write(counting(5, 3, dtype)) == 1
    assert ring.overruns == 1
    np.testing.assert_array_equal(ring.read(1), counting(5, 1, dtype))


def test_overflow_drops_the_newest_and_counts_one_overrun(dtype):
    ring = Ring(8, dtype)
    assert ring.write(counting(0, 5, dtype)) == 5
    assert ring.write(counting(5, 5, dtype)) == 3  # only 3 slots free: samples 8 and 9 are dropped
    assert ring.overruns == 1
    assert ring.write(counting(100, 1, dtype)) == 0  # full: all dropped, one more overrun
    assert ring.overruns == 2
    np.testing.assert_array_equal(ring.read(8), counting(0, 8, dtype))  # nothing queued was overwritten


def test_underflow_read_returns_none_consumes_nothing_counts_one(dtype):
    ring = Ring(8, dtype)
    ring.write(counting(0, 3, dtype))
    assert ring.read(4) is None
    assert ring.underruns == 1
    assert ring.readable == 3
    np.testing.assert_array_equal(ring.read(3), counting(0, 3, dtype))
    assert ring.read(1) is None
    assert ring.underruns == 2


def test_read_into_partial_fills_the_front_and_counts_one_underrun(dtype):
    ring = Ring(8, dtype)
    ring.write(counting(10, 3, dtype))
    out = np.full(5, -1, dtype=dtype)
    assert ring.read_into(out) == 3
    np.testing.assert_array_equal(out[:3], counting(10, 3, dtype))
    np.testing.assert_array_equal(out[3:], np.full(2, -1, dtype=dtype))  # the tail is left as it was
    assert ring.underruns == 1
    assert ring.readable == 0


def test_read_into_full_and_empty_arrays_count_nothing(dtype):
    ring = Ring(8, dtype)
    ring.write(counting(0, 8, dtype))
    out = np.empty(8, dtype=dtype)
    assert ring.read_into(out) == 8
    assert ring.read_into(np.empty(0, dtype=dtype)) == 0
    assert ring.write(np.empty(0, dtype=dtype)) == 0
    assert ring.read(0).shape == (0,)
    assert (ring.overruns, ring.underruns) == (0, 0)


def test_strided_and_byteswapped_input_is_copied_correctly(dtype):
    ring = Ring(16, dtype)
    base = counting(0, 12, dtype)
    assert ring.write(base[::2]) == 6
    swapped = counting(50, 4, dtype).astype(dtype.newbyteorder("S"))
    assert ring.write(swapped) == 4
    np.testing.assert_array_equal(ring.read(10), np.concatenate([base[::2], counting(50, 4, dtype)]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_partial_reads_and_writes_match_a_reference_queue(dtype, seed):
    """Any mix of short/long writes and reads behaves as a bounded FIFO that drops what does not fit."""
    rng = np.random.default_rng(seed)
    capacity = 32
    ring, model = Ring(capacity, dtype), deque()
    overruns = underruns = 0
    next_sample = 0
    for _ in range(2000):
        op = rng.integers(3)
        size = int(rng.integers(0, 2 * capacity))
        if op == 0:
            chunk = counting(next_sample, size, dtype)
            next_sample += size
            fit = min(size, capacity - len(model))
            assert ring.write(chunk) == fit
            model.extend(chunk[:fit].tolist())
            overruns += fit < size
        elif op == 1:
            out = ring.read(size)
            if size > len(model):
                assert out is None
                underruns += 1
            else:
                assert out.tolist() == [model.popleft() for _ in range(size)]
        else:
            out = np.zeros(size, dtype=dtype)
            got = ring.read_into(out)
            assert got == min(size, len(model))
            assert out[:got].tolist() == [model.popleft() for _ in range(got)]
            underruns += got < size
        assert (ring.readable, ring.writable) == (len(model), capacity - len(model))
        assert (ring.overruns, ring.underruns) == (overruns, underruns)


# ---- bad arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 3, 6, 1000, -8, 2**31, 1.0, "8", True, None])
def test_bad_capacity_is_a_value_error(capacity):
    with pytest.raises(ValueError, match="power of two"):
        Ring(capacity, "int16")
    with pytest.raises(ValueError, match="power of two"):
        Ring.nbytes(capacity, "int16")


@pytest.mark.parametrize("dtype", ["int32", "float64", np.uint16, "i1", ">i2", ">f4", "nonsense", None, object()])
def test_bad_dtype_is_a_value_error(dtype):
    with pytest.raises(ValueError, match="int16 or float32"):
        Ring(16, dtype)


def test_bad_samples_are_value_errors(dtype):
    ring = Ring(16, dtype)
    other = np.float32 if dtype == np.int16 else np.int16
    with pytest.raises(ValueError, match="the ring's dtype"):
        ring.write(np.zeros(4, dtype=other))
    with pytest.raises(ValueError, match="1-D"):
        ring.write(np.zeros((2, 2), dtype=dtype))
    with pytest.raises(ValueError, match="numpy array"):
        ring.write([1, 2, 3])
    for count in (-1, 1.5, "3", True, None):
        with pytest.raises(ValueError, match="sample count"):
            ring.read(count)
    with pytest.raises(ValueError, match="the ring's dtype"):
        ring.read_into(np.zeros(4, dtype=other))
    with pytest.raises(ValueError, match="1-D"):
        ring.read_into(np.zeros((2, 2), dtype=dtype))
    with pytest.raises(ValueError, match="writable C-contiguous"):
        ring.read_into(np.zeros(8, dtype=dtype)[::2])
    frozen = np.zeros(4, dtype=dtype)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable C-contiguous"):
        ring.read_into(frozen)
    with pytest.raises(ValueError, match="numpy array"):
        ring.read_into(bytearray(8))
    assert (ring.readable, ring.overruns, ring.underruns) == (0, 0, 0)  # nothing moved


def test_ring_refuses_pickling_and_says_how_to_share():
    with pytest.raises(TypeError, match="Ring.attach"):
        pickle.dumps(Ring(16, "int16"))


def test_closed_ring_is_a_value_error(dtype):
    ring = Ring(16, dtype)
    ring.close()
    assert ring.closed
    for call in (lambda: ring.write(np.zeros(1, dtype)), lambda: ring.read(1), lambda: ring.readable):
        with pytest.raises(ValueError, match="closed"):
            call()
    with Ring(16, dtype) as scoped:
        assert not scoped.closed
    assert scoped.closed


# ---- memory it does not own -----------------------------------------------------------------------


def test_create_in_and_attach_share_one_ring(dtype):
    buf = bytearray(Ring.nbytes(64, dtype) + 10)  # extra room is allowed
    producer = Ring.create_in(buf, 64, dtype)
    consumer = Ring.attach(buf)
    assert (consumer.capacity, consumer.dtype) == (64, dtype)
    assert producer.write(counting(0, 40, dtype)) == 40
    assert consumer.readable == 40
    np.testing.assert_array_equal(consumer.read(40), counting(0, 40, dtype))
    assert consumer.read(1) is None
    assert producer.underruns == 1  # counters live in the shared header
    assert Ring.nbytes(64, dtype) == ring_module._ring.HEADER_BYTES + 64 * dtype.itemsize


def test_ring_holds_its_shared_memory_until_closed(dtype):
    shm = shared_memory.SharedMemory(create=True, size=Ring.nbytes(16, dtype))
    try:
        ring = Ring.create_in(shm.buf, 16, dtype)
        with pytest.raises(BufferError):
            shm.close()  # the ring still points into it
        ring.close()
    finally:
        shm.close()
        shm.unlink()


def test_create_in_rejects_unusable_buffers(dtype):
    need = Ring.nbytes(16, dtype)
    with pytest.raises(ValueError, match="needs"):
        Ring.create_in(bytearray(need - 1), 16, dtype)
    with pytest.raises(ValueError, match="writable"):
        Ring.create_in(bytes(need), 16, dtype)
    with pytest.raises(ValueError, match="buffer protocol"):
        Ring.create_in(object(), 16, dtype)
    with pytest.raises(ValueError, match="contiguous"):
        Ring.create_in(memoryview(bytearray(2 * need))[::2], 16, dtype)
    aligned = np.zeros(need + 64, dtype=np.uint8)
    start = -aligned.ctypes.data % 64
    with pytest.raises(ValueError, match="8-byte boundary"):
        Ring.create_in(aligned[start + 1 : start + 1 + need], 16, dtype)
    with pytest.raises(ValueError, match="power of two"):
        Ring.create_in(bytearray(need), 12, dtype)


def _poke(buf, offset, value, width):
    np.frombuffer(buf, dtype=np.uint32 if width == 4 else np.uint64, count=1, offset=offset)[0] = value


@pytest.mark.parametrize(
    ("offset", "value", "width", "message"),
    [
        (OFF_MAGIC, 0, 4, "no ring magic"),
        (OFF_VERSION, 99, 4, "another layout version"),
        (OFF_CAPACITY, 12, 4, "not a power of two"),
        (OFF_DTYPE, 7, 4, "unknown sample type"),
        (OFF_ITEMSIZE, 8, 4, "unknown sample type"),
        (OFF_READ_INDEX, 5, 8, "inconsistent"),
        (OFF_WRITE_INDEX, 17, 8, "inconsistent"),
    ],
)
def test_attach_rejects_what_is_not_a_ring(dtype, offset, value, width, message):
    buf = bytearray(Ring.nbytes(16, dtype))
    Ring.create_in(buf, 16, dtype).close()
    _poke(buf, offset, value, width)
    with pytest.raises(ValueError, match=message):
        Ring.attach(buf)


def test_attach_rejects_short_buffers(dtype):
    buf = bytearray(Ring.nbytes(16, dtype))
    Ring.create_in(buf, 16, dtype).close()
    with pytest.raises(ValueError, match="smaller"):
        Ring.attach(memoryview(buf)[:-1])
    with pytest.raises(ValueError, match="smaller"):
        Ring.attach(memoryview(buf)[:100])
    with pytest.raises(ValueError, match="no ring magic"):
        Ring.attach(bytearray(Ring.nbytes(16, dtype)))
    with pytest.raises(ValueError, match="writable"):
        Ring.attach(bytes(buf))


# ---- two threads, two processes -------------------------------------------------------------------

TOTAL = 2_000_000  # counting samples moved end to end
# odd, mutually prime chunk sizes, so chunk edges fall everywhere relative to the wrap point
PRODUCER_CHUNKS = (1, 997, 61, 313, 7, 1499)
CONSUMER_CHUNKS = (3, 883, 29, 1021, 211)
CAPACITY = 4096


def produce(ring, total, chunks):
    """Writes 0..total-1 in chunks, retrying what did not fit; returns how many writes were short."""
    sent = short = i = 0
    stalled_since = time.monotonic()
    while sent < total:
        n = min(chunks[i % len(chunks)], total - sent)
        i += 1
        done = ring.write(counting(sent, n, ring.dtype))
        sent += done
        if done < n:
            short += 1
            if done == 0:
                if time.monotonic() - stalled_since > STALL_S:
                    raise RuntimeError("consumer stopped reading")
                time.sleep(0)  # let the consumer run (and take the GIL)
            else:
                stalled_since = time.monotonic()
        else:
            stalled_since = time.monotonic()
    return short


def consume(ring, total, chunks, alive=lambda: True):
    """Reads `total` samples in chunks into one array and returns it."""
    got = np.empty(total, dtype=ring.dtype)
    have = i = 0
    stalled_since = time.monotonic()
    while have < total:
        n = min(chunks[i % len(chunks)], total - have)
        i += 1
        done = ring.read_into(got[have : have + n])
        have += done
        if done:
            stalled_since = time.monotonic()
        else:
            if not alive() and ring.readable == 0:
                raise RuntimeError(f"producer ended after {have} of {total} samples")
            if time.monotonic() - stalled_since > STALL_S:
                raise RuntimeError(f"producer stalled after {have} of {total} samples")
            time.sleep(0)
    return got


def test_two_threads_move_a_counting_sequence_intact(dtype):
    ring = Ring(CAPACITY, dtype)
    result = {}

    def producer():
        try:
            result["short"] = produce(ring, TOTAL, PRODUCER_CHUNKS)
        except BaseException as e:  # reported by the main thread
            result["error"] = e

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        got = consume(ring, TOTAL, CONSUMER_CHUNKS, alive=thread.is_alive)
    finally:
        thread.join(timeout=STALL_S)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    np.testing.assert_array_equal(got, counting(0, TOTAL, dtype))
    assert ring.readable == 0
    assert ring.overruns == result["short"]  # every short write was counted, and only those


def _producer_process(shm_name, total, chunks):
    """Runs in a spawned process: attaches to the ring in shared memory and writes the sequence."""
    shm = shared_memory.SharedMemory(name=shm_name)
    try:
        ring = Ring.attach(shm.buf)
        try:
            produce(ring, total, chunks)
        finally:
            ring.close()
    finally:
        shm.close()


@pytest.mark.timeout(180)
def test_two_processes_move_a_counting_sequence_over_shared_memory(dtype):
    ctx = multiprocessing.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=Ring.nbytes(CAPACITY, dtype))
    ring = proc = None
    try:
        ring = Ring.create_in(shm.buf, CAPACITY, dtype)
        proc = ctx.Process(target=_producer_process, args=(shm.name, TOTAL, PRODUCER_CHUNKS), daemon=True)
        proc.start()
        got = consume(ring, TOTAL, CONSUMER_CHUNKS, alive=proc.is_alive)
        proc.join(timeout=STALL_S)
        assert proc.exitcode == 0
        np.testing.assert_array_equal(got, counting(0, TOTAL, dtype))
        assert ring.readable == 0
    finally:
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join()
        if ring is not None:
            ring.close()
        shm.close()
        shm.unlink()


# ---- two native threads, under ThreadSanitizer ----------------------------------------------------

HERE = pathlib.Path(__file__).parent


def _c_compiler():
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return cc if cc and shutil.which(cc[0]) else None


@pytest.mark.timeout(180)
def test_native_threads_are_race_free_under_threadsanitizer(tmp_path):
    """tests/ring_stress.c: both sides flat out in C; TSan flags any missing acquire/release."""
    cc = _c_compiler()
    if cc is None:
        pytest.skip("no C compiler (the package build needs one; this machine has none on PATH)")
    exe = tmp_path / "ring_stress"
    build = subprocess.run(
        [*cc, "-std=c11", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{HERE.parent / 'ext'}",
         str(HERE / "ring_stress.c"), "-o", str(exe)],
        capture_output=True, text=True, timeout=120,
    )
    if build.returncode != 0 and "tsan" in build.stderr.lower():
        pytest.skip(f"ThreadSanitizer runtime not installed: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    if "unexpected memory mapping" in run.stderr and shutil.which("setarch"):
        # TSan of older toolchains cannot map its shadow under the wide ASLR of newer kernels
        no_aslr = ["setarch", os.uname().machine, "-R", str(exe)]
        run = subprocess.run(no_aslr, capture_output=True, text=True, timeout=120)
    assert "ThreadSanitizer" not in run.stderr, run.stderr
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("moved 2000000 samples")
