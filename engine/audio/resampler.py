"""Streaming call-rate (8/16 kHz) <-> 24 kHz resampler that adds under 2 ms of delay.

Why our own filter: python-soxr HQ, fed 20 ms chunks, holds output back 13-73 ms, and libsoxr's C API
with minimum phase and a relaxed band still holds back 10-30 ms (its FFT stages work in blocks). All
four ratios here are small integers (x3, /3, x3/2, x2/3), so a polyphase FIR (ext/resampler.c) gives
each 20 ms chunk exactly 20 ms of output, with a delay fixed by the filter alone. Measured in
BENCHMARKS.md ("## Resampler", bench/bench_resampler.py).

Why these filters: Kaiser-windowed sinc, cut off at the call rate's Nyquist frequency. Phone audio
is band-limited anyway (G.711: 300-3400 Hz; G.722: 50-7000 Hz), so the pass band ends at 3400 Hz
(8 kHz calls) or 7000 Hz (16 kHz calls) and the stop band starts where an image or alias would fold
back into that pass band (4600 Hz / 9000 Hz). That 1200/2000 Hz transition is what lets 85/97 taps
reject 66.7-72.9 dB (measured) with 1.75 ms / 1.0 ms delay. What the band costs: 3400-4000 Hz
(8 kHz) and 7000-8000 Hz (16 kHz) roll off and may carry attenuated aliases; no phone codec carries
those bands faithfully.

Linear phase is the default: the delay is the same at every frequency, so `delay_ms` is exact (the
tests measure it) and an impulse comes out on a sample, which end-to-end latency tests rely on.
phase="minimum" (a linear prototype twice as long, square-rooted by cepstrum) rejects >= 65 dB too
but delays 0.19 ms at 200 Hz rising to 0.50 ms at 3400 Hz (8 kHz calls; 0.10-0.30 ms for 16 kHz):
3.5x less than linear, at the price of a delay that depends on frequency (`delay_ms` is then its
pass-band maximum). Both meet the 2 ms goal; the numbers are in BENCHMARKS.md.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import numpy as np

from callbot.engine.audio._resampler import PolyphaseFir, f32_to_s16, s16_to_f32

# the only rate pairs the filters below are designed for (Hz)
SUPPORTED_RATES: tuple[tuple[int, int], ...] = (
    (8000, 24000),
    (24000, 8000),
    (16000, 24000),
    (24000, 16000),
    (24000, 24000),
)
DTYPES = (np.dtype(np.float32), np.dtype(np.int16))

ERR_RATES = "unsupported rates {in_rate} -> {out_rate} Hz: Resampler supports " + ", ".join(
    f"{a} -> {b}" for a, b in SUPPORTED_RATES
)
ERR_NOT_ARRAY = "chunk must be a numpy array of float32 or int16 samples, got {kind}"
ERR_DTYPE = "chunk dtype must be float32 or int16, got {dtype}"
ERR_SHAPE = "chunk must be 1-D (mono samples), got shape {shape}"
ERR_MIXED = "this stream carries {have} samples (same scale needed for the filter state); got {got}: flush() first"


PHASES = ("linear", "minimum")
ERR_PHASE = "phase must be 'linear' or 'minimum', got {phase!r}"


@dataclass(frozen=True)
class FilterDesign:
    """A low-pass prototype run at in_rate * up, decimated by down."""

    up: int
    down: int
    taps: int  # odd for linear phase, so its delay is a whole number of samples at the filter rate
    cutoff_hz: float  # -6 dB point: the call rate's Nyquist frequency
    kaiser_beta: float  # the best stop band for this length, found by sweeping beta in 0.05 steps
    passband_hz: float  # the phone band's top: where minimum phase's group delay is largest
    phase: str = "linear"

    def coefficients(self, in_rate: int) -> np.ndarray:
        """The prototype, each polyphase branch summing to 1/up (no DC image, unity gain)."""
        return _coefficients(self, in_rate).copy()

    def delay_samples(self, in_rate: int) -> float:
        """Group delay at the filter rate: exact for linear phase; for minimum phase the largest in the
        pass band (it grows toward the band's top), so no pass-band sound comes out later."""
        if self.phase == "linear":
            return (self.taps - 1) / 2
        return _largest_passband_delay(self, in_rate)


def group_delay(h: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """Group delay of FIR h in samples at frequencies given in cycles per sample."""
    n = np.arange(len(h))
    e = np.exp(-2j * np.pi * np.outer(freqs, n))
    return ((e * (n * h)).sum(axis=1) / (e * h).sum(axis=1)).real


def _kaiser_sinc(taps: int, fc: float, beta: float) -> np.ndarray:
    n = np.arange(taps) - (taps - 1) / 2
    return 2 * fc * np.sinc(2 * fc * n) * np.kaiser(taps, beta)


def _minimum_phase(h: np.ndarray, taps: int) -> np.ndarray:
    """The minimum-phase filter whose magnitude is the square root of |H| (real cepstrum, folded)."""
    nfft = 1 << 16  # fine enough that aliasing of the cepstrum stays far below the stop band
    magnitude = np.maximum(np.abs(np.fft.fft(h, nfft)), 1e-12)
    cepstrum = np.fft.ifft(np.log(magnitude) / 2).real
    fold = np.zeros(nfft)
    fold[0], fold[1 : nfft // 2], fold[nfft // 2] = 1.0, 2.0, 1.0
    return np.fft.ifft(np.exp(np.fft.fft(cepstrum * fold))).real[:taps]


@functools.lru_cache(maxsize=None)
def _largest_passband_delay(design: FilterDesign, in_rate: int) -> float:
    freqs = np.linspace(0.0, design.passband_hz, 256) / (in_rate * design.up)
    return float(np.max(group_delay(_coefficients(design, in_rate).astype(np.float64), freqs)))


@functools.lru_cache(maxsize=None)
def _coefficients(design: FilterDesign, in_rate: int) -> np.ndarray:
    if design.taps == 1:
        return np.ones(1, np.float32)
    fc = design.cutoff_hz / (in_rate * design.up)  # cycles per sample at the filter rate
    if design.phase == "linear":
        h = _kaiser_sinc(design.taps, fc, design.kaiser_beta)
    else:
        # a linear prototype twice as long (and twice as deep in dB), square-rooted into minimum phase
        h = _minimum_phase(_kaiser_sinc(2 * design.taps - 1, fc, design.kaiser_beta), design.taps)
    for branch in range(design.up):
        h[branch :: design.up] /= h[branch :: design.up].sum() * design.up
    h = h.astype(np.float32)
    h.flags.writeable = False
    return h


# Linear phase: 85 taps at 24 kHz, delay 42 samples = 1.75 ms; 97 taps at 48 kHz, 48 samples = 1.0 ms.
# Both delays are whole samples at the output rate too, so impulses come out on a sample.
# Minimum phase: square roots of linear prototypes twice as long (BENCHMARKS.md has their delays).
_BANDS = {8000: dict(cutoff_hz=4000.0, passband_hz=3400.0), 16000: dict(cutoff_hz=8000.0, passband_hz=7000.0)}
_SHAPES = {
    (8000, "linear"): dict(taps=85, kaiser_beta=6.6),
    (16000, "linear"): dict(taps=97, kaiser_beta=6.3),
    (8000, "minimum"): dict(taps=93, kaiser_beta=14.25),
    (16000, "minimum"): dict(taps=113, kaiser_beta=14.5),
}
_RATIOS = {(8000, 24000): (3, 1), (24000, 8000): (1, 3), (16000, 24000): (3, 2), (24000, 16000): (2, 3)}
DESIGNS: dict[tuple[int, int, str], FilterDesign] = {
    (a, b, phase): FilterDesign(up=up, down=down, phase=phase, **_BANDS[min(a, b)], **_SHAPES[(min(a, b), phase)])
    for (a, b), (up, down) in _RATIOS.items()
    for phase in PHASES
}
for _phase in PHASES:  # passthrough
    DESIGNS[(24000, 24000, _phase)] = FilterDesign(1, 1, taps=1, cutoff_hz=12000.0, kaiser_beta=0.0,
                                                   passband_hz=12000.0, phase=_phase)


class Resampler:
    """One mono stream from in_rate to out_rate; feed it chunks of any size, in order.

    phase: "linear" (exact delay, the same at every frequency) or "minimum" (about 3.5x less delay,
    growing toward the top of the pass band); see the module docstring.

    The first non-empty chunk fixes the stream's dtype (float32 or int16; the output has the same);
    flush() releases the last `delay_ms` of output and starts a fresh stream. The C work runs without
    the GIL; a lock (uncontended on the media path: one stream, one thread) keeps two threads that
    share one Resampler from corrupting its state.
    """

    def __init__(self, in_rate: int, out_rate: int, phase: str = "linear"):
        if phase not in PHASES:
            raise ValueError(ERR_PHASE.format(phase=phase))
        try:
            design = DESIGNS.get((in_rate, out_rate, phase))
        except TypeError:  # unhashable rates (a list, an array)
            design = None
        if design is None or isinstance(in_rate, bool) or isinstance(out_rate, bool):
            raise ValueError(ERR_RATES.format(in_rate=in_rate, out_rate=out_rate))
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self.design = design
        self._delay = design.delay_samples(self.in_rate)  # at the filter rate, in_rate * up
        # flush() releases the delay rounded up to whole samples at the filter rate
        held = math.ceil(self._delay - 1e-9)
        self._fir = PolyphaseFir(_coefficients(design, self.in_rate), design.up, design.down, held)
        self._dtype: np.dtype | None = None
        self._process = None  # the native entry point for self._dtype, chosen once per stream
        self._lock = threading.Lock()

    @property
    def delay_ms(self) -> float:
        """Delay this resampler adds: with linear phase the same at every frequency; with minimum
        phase the most any pass-band frequency gets (lower frequencies come out sooner)."""
        return 1000.0 * self._delay / (self.in_rate * self.design.up)

    def output_count(self, n: int) -> int:
        """How many samples the next process() of n samples returns (about n * out_rate / in_rate)."""
        with self._lock:
            return self._fir.output_count(n)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Resample the next chunk of the stream; returns a new array of the chunk's dtype."""
        with self._lock:
            x = self._checked(chunk)
            out = np.empty(self._fir.output_count(len(x)), x.dtype)
            if len(x):
                self._process(x, out)
            return out

    def process_into(self, chunk: np.ndarray, out: np.ndarray) -> int:
        """Like process(), but writes into `out` (same dtype, 1-D, contiguous; no allocation).

        Returns how many samples it wrote: output_count(len(chunk)).
        """
        with self._lock:
            x = self._checked(chunk)
            return self._process(x, out) if len(x) else 0

    def flush(self) -> np.ndarray:
        """Return the output the filter delay still holds (as if silence followed), then reset."""
        with self._lock:
            if self._dtype is None:
                self._fir.reset()
                return np.empty(0, np.float32)
            out = np.empty(self._fir.flush_count(), self._dtype)
            (self._fir.flush_f32 if self._dtype == np.float32 else self._fir.flush_s16)(out)
            self._dtype = None
            self._process = None
            return out

    def _checked(self, chunk) -> np.ndarray:
        if not isinstance(chunk, np.ndarray):
            raise ValueError(ERR_NOT_ARRAY.format(kind=type(chunk).__name__))
        # the steady state (note: a dtype compares equal to None when it is float64, hence the order)
        if self._dtype is not None and chunk.dtype == self._dtype and chunk.ndim == 1:
            return chunk if chunk.flags.c_contiguous else np.ascontiguousarray(chunk)
        if chunk.dtype not in DTYPES:
            raise ValueError(ERR_DTYPE.format(dtype=chunk.dtype))
        if chunk.ndim != 1:
            raise ValueError(ERR_SHAPE.format(shape=chunk.shape))
        if len(chunk) == 0:
            return chunk
        if self._dtype is not None:
            raise ValueError(ERR_MIXED.format(have=self._dtype, got=chunk.dtype))
        self._dtype = chunk.dtype
        self._process = self._fir.process_f32 if chunk.dtype == np.float32 else self._fir.process_s16
        return np.ascontiguousarray(chunk)

    def __repr__(self) -> str:
        return f"Resampler({self.in_rate}, {self.out_rate}, {self.design.phase!r}, delay_ms={self.delay_ms:.3f})"


def to_int16(x: np.ndarray, scale: float) -> np.ndarray:
    """float32 samples times `scale`, rounded to nearest (ties to even) and saturated to int16, in one C
    pass: what np.clip(np.rint(x * scale), -32768, 32767).astype(np.int16) gives in four (a NaN gives 0).
    On the model's audio path after every step, where numpy's temporaries cost ~10x the C pass."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(len(x), np.int16)
    f32_to_s16(x, scale, out)
    return out


def to_float32(x: np.ndarray, scale: float) -> np.ndarray:
    """int16 samples times `scale` as float32, in one C pass (x.astype(np.float32) * scale in two)."""
    x = np.ascontiguousarray(x, np.int16)
    out = np.empty(len(x), np.float32)
    s16_to_f32(x, scale, out)
    return out
