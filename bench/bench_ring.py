"""Ring vs queue.Queue vs collections.deque (threads) and vs multiprocessing.Queue (processes):
a producer hands 20 ms frames (320 int16 samples at 16 kHz) to a consumer.

Why: the ring is meant to be the cheapest hand-off between the media thread and the engine, and the
way to put the engine in its own process (docs/architecture.md, "Two processes"); this measures it
against the stdlib ways of
doing the same in one run, so the numbers are ratios on the same machine and load. Run (about 40 s):

    python -m pytest bench/bench_ring.py -p no:cacheprovider --benchmark-columns=median,rounds

Rounds alternate the order of the transports (the machine is shared, so load changes hit all alike);
the first thread round is a warmup and is dropped.
Throughput: the producer pushes frames as fast as the transport accepts them (at most DEPTH frames in
flight for all) and the consumer pops them all: frames/s, median over rounds.
Latency: the producer sends one frame every GAP_S, stamping perf_counter_ns just before the hand-off;
the consumer stamps when it has the frame: p50/p99 of the difference over all rounds.
The ring never blocks, so its consumer (and deque's) polls: os.sched_yield() between polls by
default, time.sleep(0) with CALLBOT_BENCH_RING_POLL=sleep0 (on Linux a nap of the 50 us timer slack).
Queue consumers block in get(). The table printed at the end is what BENCHMARKS.md quotes.
"""
import multiprocessing
import os
import queue
import statistics
import threading
import time
from collections import deque
from multiprocessing import shared_memory

import numpy as np
import pytest

from callbot.engine import Ring

FRAME = 320  # samples: 20 ms at 16 kHz
DEPTH = 51  # frames in flight at most: the ring's 16384 samples hold 51 whole frames
CAPACITY = 16_384
FRAMES = 20_000  # per throughput round
ROUNDS = 9
LAT_FRAMES = 1_000  # per latency round
LAT_ROUNDS = 6
GAP_S = 0.0005  # between frames in the latency run, so each finds the transport empty
JOIN_S = 60.0
# How a polling consumer (ring, deque) waits: "yield" = os.sched_yield() (gives up the GIL and the
# CPU, returns at once if nothing else runs), "sleep0" = time.sleep(0) (on Linux a nap of the 50 us
# timer slack). CALLBOT_BENCH_RING_POLL picks one; BENCHMARKS.md shows both.
POLL_MODE = os.environ.get("CALLBOT_BENCH_RING_POLL", "yield")
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))  # os.sched_yield is Unix-only
POLL = {"yield": _yield, "sleep0": lambda: time.sleep(0)}[POLL_MODE]

RESULTS: dict[tuple[str, str], float] = {}  # (metric, transport) -> value, for the ratio report
PROC_RESULTS: dict[tuple[str, str], float] = {}  # the same across two processes: ring (shm) and queue (mp)


class RingTransport:
    def __init__(self):
        self.ring = Ring(CAPACITY, np.int16)

    def try_put(self, frame):
        if self.ring.writable < FRAME:
            return False
        self.ring.write(frame)
        return True

    def try_get(self):
        return self.ring.read(FRAME)  # None when no whole frame is there


class DequeTransport:
    def __init__(self):
        self.items = deque()

    def try_put(self, frame):
        if len(self.items) >= DEPTH:
            return False
        self.items.append(frame)
        return True

    def try_get(self):
        try:
            return self.items.popleft()
        except IndexError:
            return None


class QueueTransport:
    """Blocking on both ends: what queue.Queue is for."""

    def __init__(self):
        self.q = queue.Queue(maxsize=DEPTH)

    def put(self, frame):
        self.q.put(frame)

    def get(self):
        return self.q.get()


TRANSPORTS = {"ring": RingTransport, "queue": QueueTransport, "deque": DequeTransport}


def _put(t, frame):
    if isinstance(t, QueueTransport):
        t.put(frame)
        return
    while not t.try_put(frame):
        POLL()


def _get(t):
    if isinstance(t, QueueTransport):
        return t.get()
    while (frame := t.try_get()) is None:
        POLL()
    return frame


def _run_pair(producer, consumer):
    threads = [threading.Thread(target=producer, daemon=True), threading.Thread(target=consumer, daemon=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=JOIN_S)
    assert not any(th.is_alive() for th in threads), "a bench thread hung"


def throughput_round(name):
    """Seconds to move FRAMES frames; checks they all arrived in order."""
    t = TRANSPORTS[name]()
    frames = [np.full(FRAME, i % 32_000, dtype=np.int16) for i in range(64)]
    seen = []

    def producer():
        for i in range(FRAMES):
            _put(t, frames[i % 64])

    def consumer():
        last = None
        for _ in range(FRAMES):
            last = _get(t)
        seen.append(last)

    start = time.perf_counter()
    _run_pair(producer, consumer)
    elapsed = time.perf_counter() - start
    assert int(seen[0][0]) == (FRAMES - 1) % 64
    return elapsed


def latency_round(name):
    """Hand-off latencies (ns) of LAT_FRAMES paced frames."""
    t = TRANSPORTS[name]()
    frame = np.zeros(FRAME, dtype=np.int16)
    sent = np.zeros(LAT_FRAMES, dtype=np.int64)
    got = np.zeros(LAT_FRAMES, dtype=np.int64)

    def producer():
        for i in range(LAT_FRAMES):
            time.sleep(GAP_S)
            sent[i] = time.perf_counter_ns()
            _put(t, frame)

    def consumer():
        for i in range(LAT_FRAMES):
            _get(t)
            got[i] = time.perf_counter_ns()

    _run_pair(producer, consumer)
    return got - sent


def _interleaved(round_fn, per_name):
    """One round = every transport once, in an order rotated each round, so that load from elsewhere
    on the machine falls on all three alike; per_name[name] collects round_fn(name) results."""
    names = list(TRANSPORTS)
    state = {"round": 0}

    def one_round():
        k = state["round"]
        state["round"] += 1
        for name in names[k % 3 :] + names[: k % 3]:
            per_name.setdefault(name, []).append(round_fn(name))

    return one_round


@pytest.mark.benchmark(group="ring")
def test_throughput(benchmark):
    times = {}
    benchmark.pedantic(_interleaved(throughput_round, times), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    for name, t in times.items():
        fps = FRAMES / statistics.median(t[1:])  # t[0] is the warmup round
        RESULTS[("frames/s", name)] = fps
        benchmark.extra_info[f"{name}_frames_per_s"] = round(fps)


@pytest.mark.benchmark(group="ring")
def test_latency(benchmark):
    lat = {}
    one_round = _interleaved(latency_round, lat)
    benchmark.pedantic(one_round, rounds=LAT_ROUNDS, iterations=1, warmup_rounds=1)
    for name, rounds in lat.items():
        us = np.concatenate(rounds[1:]) / 1000.0
        p50, p99 = np.percentile(us, [50, 99])
        RESULTS[("latency p50 us", name)] = p50
        RESULTS[("latency p99 us", name)] = p99
        benchmark.extra_info.update({f"{name}_p50_us": round(p50, 1), f"{name}_p99_us": round(p99, 1)})


# ---- two processes: the ring in shared memory vs multiprocessing.Queue ------------------------------
# Each process has its own GIL, so this is the hand-off the engine gets if inference moves to its own
# process (docs/architecture.md, "Two processes"). The producer (this process) stamps perf_counter_ns
# into the frame's first 8
# bytes; the consumer process subtracts it from its own perf_counter_ns (CLOCK_MONOTONIC on Linux,
# mach_absolute_time on macOS: one clock for the whole machine).

PROC_FRAMES = 20_000  # per throughput round
PROC_ROUNDS = 5
PROC_LAT_FRAMES = 1_000  # per latency round
PROC_LAT_ROUNDS = 3


def _stamp(frame):
    frame[:4].view(np.int64)[0] = time.perf_counter_ns()


def _stamp_of(frame):
    return int(frame[:4].view(np.int64)[0])


def _ring_consumer(shm_name, conn):
    """Consumer process for the ring: per job (a frame count from conn), pops that many frames and
    sends back (latencies ns, end ns); None ends it."""
    shm = shared_memory.SharedMemory(name=shm_name)
    ring = Ring.attach(shm.buf)
    buf = np.empty(FRAME, dtype=np.int16)
    try:
        conn.send("ready")
        while (n := conn.recv()) is not None:
            lat = np.empty(n, dtype=np.int64)
            for i in range(n):
                while ring.readable < FRAME:
                    POLL()
                ring.read_into(buf)
                lat[i] = time.perf_counter_ns() - _stamp_of(buf)
            conn.send((lat, time.perf_counter_ns()))
    finally:
        ring.close()
        shm.close()


def _queue_consumer(q, conn):
    """The same for multiprocessing.Queue (blocking get)."""
    conn.send("ready")
    while (n := conn.recv()) is not None:
        lat = np.empty(n, dtype=np.int64)
        for i in range(n):
            frame = q.get()
            lat[i] = time.perf_counter_ns() - _stamp_of(frame)
        conn.send((lat, time.perf_counter_ns()))


class ProcessPeer:
    """One consumer process fed by this process through a ring in shared memory or an mp.Queue."""

    def __init__(self, name):
        ctx = multiprocessing.get_context("spawn")
        self.conn, there = ctx.Pipe()
        self.shm = self.ring = self.q = None
        if name == "ring":
            self.shm = shared_memory.SharedMemory(create=True, size=Ring.nbytes(CAPACITY, np.int16))
            self.ring = Ring.create_in(self.shm.buf, CAPACITY, np.int16)
            self.proc = ctx.Process(target=_ring_consumer, args=(self.shm.name, there), daemon=True)
        else:
            self.q = ctx.Queue(maxsize=DEPTH)
            self.proc = ctx.Process(target=_queue_consumer, args=(self.q, there), daemon=True)
        self.proc.start()
        assert self.conn.poll(JOIN_S) and self.conn.recv() == "ready", "consumer process did not start"
        self.frames = [np.zeros(FRAME, dtype=np.int16) for _ in range(64)]

    def send(self, n, gap_s):
        """Moves n frames (paced by gap_s, or flat out if 0): (frames/s, latencies ns)."""
        self.conn.send(n)
        start = time.perf_counter_ns()
        for i in range(n):
            if gap_s:
                time.sleep(gap_s)
            frame = self.frames[i % 64]
            _stamp(frame)
            if self.ring is not None:
                while self.ring.writable < FRAME:
                    POLL()
                self.ring.write(frame)
            else:
                self.q.put(frame)
        assert self.conn.poll(JOIN_S), "consumer process hung"
        lat, end = self.conn.recv()
        return n / ((end - start) / 1e9), lat

    def close(self):
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(JOIN_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        if self.ring is not None:
            self.ring.close()
            self.shm.close()
            self.shm.unlink()


@pytest.mark.benchmark(group="ring")
def test_processes(benchmark):
    names = ["ring", "queue"]
    peers = {}
    fps = {n: [] for n in names}
    lat = {n: [] for n in names}
    try:
        for name in names:
            peers[name] = ProcessPeer(name)

        def run():
            # rounds alternate which transport goes first
            for k in range(max(PROC_ROUNDS, PROC_LAT_ROUNDS)):
                order = names if k % 2 == 0 else names[::-1]
                for name in order:
                    if k < PROC_ROUNDS:
                        fps[name].append(peers[name].send(PROC_FRAMES, 0)[0])
                    if k < PROC_LAT_ROUNDS:
                        lat[name].append(peers[name].send(PROC_LAT_FRAMES, GAP_S)[1])

        for name in names:  # warmup: first frames through each path
            peers[name].send(100, 0)
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        for peer in peers.values():
            peer.close()
    for name in names:
        us = np.concatenate(lat[name]) / 1000.0
        p50, p99 = np.percentile(us, [50, 99])
        rate = statistics.median(fps[name])
        PROC_RESULTS[("frames/s", name)] = rate
        PROC_RESULTS[("latency p50 us", name)] = p50
        PROC_RESULTS[("latency p99 us", name)] = p99
        benchmark.extra_info[f"proc_{name}_frames_per_s"] = round(rate)
        benchmark.extra_info[f"proc_{name}_p50_us"] = round(p50, 1)
        benchmark.extra_info[f"proc_{name}_p99_us"] = round(p99, 1)


def test_report_ratios(capsys):
    """Prints each metric and the ring's ratios to its baselines (run after the benches above)."""
    if len(RESULTS) < 9 or len(PROC_RESULTS) < 6:
        pytest.skip("run the whole file: the ratios need every transport's numbers")
    metrics = ("frames/s", "latency p50 us", "latency p99 us")
    lines = [
        f"threads (ring/deque consumers poll: {POLL_MODE})",
        f"{'metric':<16}{'ring':>10}{'queue':>10}{'deque':>10}{'ring/queue':>12}{'ring/deque':>12}",
    ]
    for metric in metrics:
        r, q, d = (RESULTS[(metric, n)] for n in ("ring", "queue", "deque"))
        lines.append(f"{metric:<16}{r:>10.1f}{q:>10.1f}{d:>10.1f}{r / q:>12.2f}{r / d:>12.2f}")
    lines += [
        f"processes (ring consumer polls: {POLL_MODE})",
        f"{'metric':<16}{'ring shm':>10}{'mp.Queue':>10}{'ring/queue':>12}",
    ]
    for metric in metrics:
        r, q = (PROC_RESULTS[(metric, n)] for n in ("ring", "queue"))
        lines.append(f"{metric:<16}{r:>10.1f}{q:>10.1f}{r / q:>12.2f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
