"""Resampler (linear and minimum phase) vs python-soxr (QQ, HQ, VHQ) and libsoxr's C API (minimum
phase), in one run.

What a call hears is measured, for each direction, with the same 20 ms chunks the media path uses:
- added delay: an impulse streamed through 20 ms chunks. Two parts add up: the shift of its peak in the
  output stream, and the hold-back (how far the output ever lags the input's duration at a chunk
  boundary, which a real-time player must buffer to play without gaps). Worst case over impulse
  positions across a chunk.
- stop band: sine sweeps. "band" = the worst image/alias that lands in the phone band (0-3400 Hz for
  8 kHz calls, 0-7000 Hz for 16 kHz); "strict" = the worst anything past the call rate's Nyquist.
- pass-band ripple: max - min gain over 300-3400 Hz (8 kHz) or 100-7000 Hz (16 kHz).
- CPU per 20 ms chunk, as a ratio to python-soxr HQ: all resamplers take turns, chunk by chunk, in one\n  pytest-benchmark loop, so the shared machine's load falls on all alike.

Run: python -m pytest bench/bench_resampler.py -p no:cacheprovider --benchmark-columns=mean,median
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time

import numpy as np
import pytest
import soxr

from callbot.engine import Resampler

DIRECTIONS = [(8000, 24000), (24000, 8000), (16000, 24000), (24000, 16000)]
IDS = [f"{a // 1000}k-{b // 1000}k" for a, b in DIRECTIONS]
SOXR_QUALITIES = ["QQ", "HQ", "VHQ"]
IMPLS = ["ours", "ours-into", "ours-min", *(f"soxr-{q}" for q in SOXR_QUALITIES), "libsoxr-min"]
CHUNK_MS = 20


def phone_band(in_rate: int, out_rate: int) -> tuple[float, float]:
    return (300.0, 3400.0) if min(in_rate, out_rate) == 8000 else (100.0, 7000.0)


class _LibSoxr:
    """libsoxr's C API through ctypes: minimum phase, pass band and stop band where ours are."""

    class Quality(ctypes.Structure):
        _fields_ = [
            ("precision", ctypes.c_double),
            ("phase_response", ctypes.c_double),
            ("passband_end", ctypes.c_double),
            ("stopband_begin", ctypes.c_double),
            ("e", ctypes.c_void_p),
            ("flags", ctypes.c_ulong),
        ]

    SOXR_HQ, SOXR_MINIMUM_PHASE = 4, 0x30
    lib = None

    @classmethod
    def load(cls):
        if cls.lib is None:
            path = ctypes.util.find_library("soxr")
            if path is None:
                return None
            lib = ctypes.CDLL(path)
            lib.soxr_quality_spec.restype = cls.Quality
            lib.soxr_quality_spec.argtypes = [ctypes.c_ulong, ctypes.c_ulong]
            lib.soxr_create.restype = ctypes.c_void_p
            lib.soxr_create.argtypes = [ctypes.c_double, ctypes.c_double, ctypes.c_uint,
                                        ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p]
            lib.soxr_process.restype = ctypes.c_char_p
            lib.soxr_process.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                         ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_size_t,
                                         ctypes.POINTER(ctypes.c_size_t)]
            lib.soxr_delete.argtypes = [ctypes.c_void_p]
            cls.lib = lib
        return cls.lib

    def __init__(self, in_rate, out_rate):
        lib = self.load()
        nyquist = min(in_rate, out_rate) / 2
        _, edge = phone_band(in_rate, out_rate)
        q = lib.soxr_quality_spec(self.SOXR_HQ, self.SOXR_MINIMUM_PHASE)
        q.passband_end = edge / nyquist
        q.stopband_begin = (2 * nyquist - edge) / nyquist  # aliases allowed above the phone band, as ours
        err = ctypes.c_char_p()
        self.handle = lib.soxr_create(in_rate, out_rate, 1, ctypes.byref(err), None, ctypes.byref(q), None)
        assert self.handle, err.value
        self.ratio = out_rate / in_rate
        self.idone, self.odone = ctypes.c_size_t(), ctypes.c_size_t()

    def process(self, x):
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty(int(len(x) * self.ratio) + 256, np.float32)
        self.lib.soxr_process(self.handle, x.ctypes.data, len(x), ctypes.byref(self.idone),
                              out.ctypes.data, len(out), ctypes.byref(self.odone))
        assert self.idone.value == len(x)
        return out[: self.odone.value]

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.soxr_delete(self.handle)


def make(impl: str, in_rate: int, out_rate: int):
    """A fresh stream: a callable chunk -> output chunk."""
    if impl == "ours":
        return Resampler(in_rate, out_rate).process
    if impl == "ours-min":
        return Resampler(in_rate, out_rate, "minimum").process
    if impl == "ours-into":  # the allocation-free call: output into a buffer the caller keeps
        resampler, out = Resampler(in_rate, out_rate), np.empty(4 * out_rate, np.float32)
        return lambda x: out[: resampler.process_into(x, out)]
    if impl == "libsoxr-min":
        if _LibSoxr.load() is None:
            pytest.skip("libsoxr not found (Debian libsoxr-dev, Homebrew libsoxr)")
        return _LibSoxr(in_rate, out_rate).process
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=impl.split("-")[1])
    return stream.resample_chunk


def stream_in_chunks(process, x: np.ndarray, chunk: int, out_per_in: float) -> tuple[np.ndarray, float]:
    """Output of x fed in chunks, and the worst hold-back at a chunk boundary (in input samples)."""
    parts, n_in, n_out, worst = [], 0, 0, 0.0
    for i in range(0, len(x), chunk):
        piece = x[i : i + chunk]
        parts.append(process(piece))
        n_in += len(piece)
        n_out += len(parts[-1])
        worst = max(worst, n_in - n_out / out_per_in)
    return np.concatenate(parts), worst


def added_delay_ms(impl: str, in_rate: int, out_rate: int) -> tuple[float, float]:
    """(peak shift, hold-back) in ms, worst over impulse positions across a 20 ms chunk."""
    chunk = in_rate * CHUNK_MS // 1000
    shift, hold = 0.0, 0.0
    # offsets in multiples of 6 input samples: the impulse then falls on an output sample in every direction
    for offset in np.linspace(0, chunk - 6, 5).astype(int) // 6 * 6:
        x = np.zeros(in_rate // 2, np.float32)
        position = 10 * chunk + offset
        x[position] = 1.0
        y, held = stream_in_chunks(make(impl, in_rate, out_rate), x, chunk, out_rate / in_rate)
        shift = max(shift, 1000 * (np.argmax(np.abs(y)) / out_rate - position / in_rate))
        hold = max(hold, 1000 * held / in_rate)
    return shift, hold


def amplitude(y: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the component at exactly freq (Kaiser window, beta 20: leakage far below 150 dB)."""
    w = np.kaiser(len(y), 20.0)
    return 2 * abs(np.sum(w * y * np.exp(-2j * np.pi * freq * np.arange(len(y)) / rate))) / w.sum()


def tone_through(impl, in_rate, out_rate, freq) -> np.ndarray:
    """Settled output of a 0.5 amplitude tone streamed in 20 ms chunks."""
    x = (0.5 * np.sin(2 * np.pi * freq * np.arange(in_rate // 2) / in_rate)).astype(np.float32)
    y, _ = stream_in_chunks(make(impl, in_rate, out_rate), x, in_rate * CHUNK_MS // 1000, out_rate / in_rate)
    return y[len(y) // 4 :].astype(np.float64)


def images(freq: float, in_rate: int, out_rate: int) -> set[float]:
    """Where a tone's images and aliases land in the output: k * in_rate +- freq, folded into
    0 .. out_rate/2 (the tone itself excluded when it passes)."""
    up = out_rate // math.gcd(in_rate, out_rate)
    found = set()
    for k in range(up + 1):
        for f in (k * in_rate - freq, k * in_rate + freq):
            f = f % out_rate
            f = min(f, out_rate - f)
            if abs(f - freq) > 1:
                found.add(round(f, 6))
    return found


def quality(impl: str, in_rate: int, out_rate: int) -> dict[str, float]:
    low, edge = phone_band(in_rate, out_rate)
    nyquist = min(in_rate, out_rate) / 2
    stop = 2 * nyquist - edge
    gains, band_rej, strict_rej = [], np.inf, np.inf
    for freq in np.linspace(low, edge, 16):
        gains.append(amplitude(tone_through(impl, in_rate, out_rate, freq), freq, out_rate) / 0.5)
    if in_rate < out_rate:
        sweep, reference = np.linspace(low, nyquist - 50, 24), None  # images relative to the tone
    else:
        sweep, reference = np.linspace(nyquist + 50, in_rate / 2 - 100, 24), 0.5  # aliases vs the input
    for freq in sweep:
        y = tone_through(impl, in_rate, out_rate, freq)
        wanted = reference or amplitude(y, freq, out_rate)
        rejection = wanted / max(amplitude(y, f, out_rate) for f in images(freq, in_rate, out_rate))
        strict_rej = min(strict_rej, rejection)
        # the phone band: tones whose image/alias folds inside it
        if (in_rate < out_rate and freq <= edge) or (in_rate > out_rate and freq >= stop):
            band_rej = min(band_rej, rejection)
    shift, hold = added_delay_ms(impl, in_rate, out_rate)
    gains_db = 20 * np.log10(gains)
    return {
        "shift_ms": shift,
        "hold_ms": hold,
        "added_ms": max(shift, 0.0) + hold,
        "band_rej_db": 20 * np.log10(band_rej),
        "strict_rej_db": 20 * np.log10(strict_rej),
        "ripple_db": gains_db.max() - gains_db.min(),
    }


RESULTS: dict[tuple[str, str], dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def table(request):
    yield
    lines = [
        f"Resampler, {CHUNK_MS} ms float32 chunks; CPU per chunk: mean and p99 (us), ratio to python-soxr HQ (same run)",
        f"{'direction':<10}{'impl':<13}{'added ms':>9}{'(shift':>8}{'+ hold)':>8}{'band dB':>9}{'strict dB':>10}"
        f"{'ripple dB':>10}{'mean us':>9}{'/HQ':>6}{'p99 us':>8}{'/HQ':>6}",
    ]
    for direction in IDS:
        base = RESULTS.get((direction, "soxr-HQ"), {})
        for impl in IMPLS:
            r = RESULTS.get((direction, impl))
            if not r or "shift_ms" not in r:
                continue
            nan = float("nan")
            mean, peak = r.get("mean_us", nan), r.get("p99_us", nan)
            lines.append(
                f"{direction:<10}{impl:<13}{r['added_ms']:>9.2f}{r['shift_ms']:>8.2f}{r['hold_ms']:>8.2f}"
                f"{r['band_rej_db']:>9.1f}{r['strict_rej_db']:>10.1f}{r['ripple_db']:>10.3f}"
                f"{mean:>9.1f}{mean / base.get('mean_us', nan):>6.2f}{peak:>8.1f}{peak / base.get('p99_us', nan):>6.2f}"
            )
    # pytest captures output during fixture teardown; the table is the point of the run, so show it
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=IDS)
def test_resamplers_quality_and_cpu_per_20ms_chunk(benchmark, in_rate, out_rate):
    direction = f"{in_rate // 1000}k-{out_rate // 1000}k"
    impls = [impl for impl in IMPLS if impl != "libsoxr-min" or _LibSoxr.load() is not None]
    for impl in impls:
        if impl != "ours-into":  # the same stream as "ours", only called differently
            RESULTS[(direction, impl)] = quality(impl, in_rate, out_rate)
    RESULTS[(direction, "ours-into")] = dict(RESULTS[(direction, "ours")])

    streams = {impl: make(impl, in_rate, out_rate) for impl in impls}
    chunk = (0.1 * np.random.default_rng(0).standard_normal(in_rate * CHUNK_MS // 1000)).astype(np.float32)
    for process in streams.values():  # past start-up, into the steady state
        for _ in range(20):
            process(chunk)
    times = {impl: [] for impl in impls}
    order = list(impls)

    def one_round():
        # every resampler takes one chunk per round, in a rotating order: load from the other engineers'
        # work on this shared machine falls on all of them alike, so the ratios hold
        order.append(order.pop(0))
        for impl in order:
            process = streams[impl]
            t0 = time.perf_counter_ns()
            process(chunk)
            times[impl].append(time.perf_counter_ns() - t0)

    benchmark.group = f"resampler {direction}: one 20 ms chunk through each of {len(impls)}"
    benchmark.pedantic(one_round, rounds=3000, iterations=1, warmup_rounds=0)
    for impl, ns in times.items():
        us = np.sort(np.array(ns)) / 1000
        # python-soxr works in bursts, so the mean (the CPU it takes) and the 99th percentile (its bursts)
        # both matter; the top 0.5% is dropped from the mean: preemptions, not the resampler
        RESULTS[(direction, impl)].update(mean_us=us[: int(len(us) * 0.995)].mean(), p99_us=np.percentile(us, 99))
