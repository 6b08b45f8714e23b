"""Integrated loudness (ITU-R BS.1770-4: K-weighting, 400 ms blocks, absolute and relative gates) in numpy.

PersonaPlex was prompted with voice recordings normalised to -24 LUFS, so a voice taken from a WAV file
must be brought to the same level before it is encoded, or the model hears a louder or quieter speaker than
it learned from. NVIDIA's code uses pyloudnorm (which needs scipy); this is the same measurement with numpy
alone. It runs once per voice file, off the real-time path.

Compared once with pyloudnorm 0.2.0 (installed aside for the check): ours reads the BS.1770 reference
(997 Hz sine at 0 dBFS, 48 kHz) as -3.010 LKFS as the standard says, pyloudnorm -3.052, because it
builds the K-weighting from rounded parameters (shelf 1500 Hz / +4 dB, high-pass 38 Hz); on noise-like
signals at 16-48 kHz the two differ by 0.04-0.13 dB, far below what a listener or the model notices.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["k_weighting_coefficients", "integrated_loudness", "normalize_loudness", "VOICE_PROMPT_LUFS"]

# the level NVIDIA's prompt procedure brings voice recordings to (LUFS)
VOICE_PROMPT_LUFS = -24.0

_ABSOLUTE_GATE_LUFS = -70.0
_RELATIVE_GATE_LU = -10.0
_BLOCK_S = 0.4
_HOP_S = 0.1  # 75 % overlap between blocks

# Analog prototypes of the two K-weighting stages (a high shelf for the head, the RLB high-pass), from
# which the BS.1770 48 kHz coefficients follow by the bilinear transform; any other rate gets its own.
_SHELF_F0_HZ, _SHELF_GAIN_DB, _SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
_SHELF_VB_EXP = 0.4996667741545416
_HIGHPASS_F0_HZ, _HIGHPASS_Q = 38.13547087602444, 0.5003270373238773


def k_weighting_coefficients(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two biquads (b, a) of the K-weighting filter at `rate` Hz (a[0] == 1)."""
    k = math.tan(math.pi * _SHELF_F0_HZ / rate)
    vh = 10.0 ** (_SHELF_GAIN_DB / 20.0)
    vb = vh**_SHELF_VB_EXP
    a0 = 1.0 + k / _SHELF_Q + k * k
    shelf_b = np.array([vh + vb * k / _SHELF_Q + k * k, 2.0 * (k * k - vh), vh - vb * k / _SHELF_Q + k * k]) / a0
    shelf_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _SHELF_Q + k * k) / a0])

    k = math.tan(math.pi * _HIGHPASS_F0_HZ / rate)
    a0 = 1.0 + k / _HIGHPASS_Q + k * k
    highpass_b = np.array([1.0, -2.0, 1.0])
    highpass_a = np.array([1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _HIGHPASS_Q + k * k) / a0])
    return [(shelf_b, shelf_a), (highpass_b, highpass_a)]


def _impulse_response(rate: int, length: int) -> np.ndarray:
    """The cascade's impulse response, by running the recursion once on an impulse."""
    h = np.zeros(length)
    h[0] = 1.0
    for b, a in k_weighting_coefficients(rate):
        y = np.empty(length)
        x1 = x2 = y1 = y2 = 0.0
        b0, b1, b2 = (float(v) for v in b)
        a1, a2 = float(a[1]), float(a[2])
        for n, x0 in enumerate(h.tolist()):
            y0 = b0 * x0 + b1 * x1 + b2 * x2 - a1 * y1 - a2 * y2
            y[n] = y0
            x2, x1, y2, y1 = x1, x0, y1, y0
        h = y
    return h


def _k_weight(x: np.ndarray, rate: int) -> np.ndarray:
    # The filter's poles lie inside radius ~0.995 at 48 kHz: its response falls below 1e-20 within a
    # second, so one second of impulse response, applied by FFT convolution, is the IIR filter to
    # float64 precision (a per-sample Python loop over a whole recording would take seconds).
    h = _impulse_response(rate, min(rate, max(len(x), 1)))
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)
    return y[: len(x)]


def integrated_loudness(pcm: np.ndarray, rate: int) -> float:
    """Integrated loudness of a mono signal in LUFS (-inf when every block is below the absolute gate).

    Raises ValueError for a signal shorter than one 400 ms gating block or a bad rate.
    """
    x = np.asarray(pcm, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"loudness is measured on mono audio: expected a 1-D array, got shape {x.shape}")
    if rate < 8000:
        raise ValueError(f"sample rate {rate} Hz is too low for K-weighting (>= 8000 Hz expected)")
    block = int(round(_BLOCK_S * rate))
    hop = int(round(_HOP_S * rate))
    if len(x) < block:
        raise ValueError(f"{len(x)} samples is shorter than one 400 ms loudness block ({block} samples at {rate} Hz)")
    y = _k_weight(x, rate)
    # mean square of every 400 ms block, from a running sum of squares
    energy = np.concatenate(([0.0], np.cumsum(y * y)))
    starts = np.arange(0, len(x) - block + 1, hop)
    z = (energy[starts + block] - energy[starts]) / block
    with np.errstate(divide="ignore"):
        loudness = -0.691 + 10.0 * np.log10(z)
    z = z[loudness > _ABSOLUTE_GATE_LUFS]
    if z.size == 0:
        return float("-inf")
    relative_gate = -0.691 + 10.0 * math.log10(float(np.mean(z))) + _RELATIVE_GATE_LU
    with np.errstate(divide="ignore"):
        z = z[-0.691 + 10.0 * np.log10(z) > relative_gate]
    return -0.691 + 10.0 * math.log10(float(np.mean(z)))


def normalize_loudness(pcm: np.ndarray, rate: int, target_lufs: float = VOICE_PROMPT_LUFS) -> np.ndarray:
    """`pcm` (mono float) scaled so that its integrated loudness is `target_lufs`, as float32.

    Raises ValueError for a signal that is silent (below the -70 LUFS gate) or too short to measure.
    Peaks may exceed 1.0 after a large gain, as with pyloudnorm; nothing is clipped here.
    """
    measured = integrated_loudness(pcm, rate)
    if not math.isfinite(measured):
        raise ValueError("the audio is silent (every 400 ms block is below -70 LUFS): nothing to normalise")
    gain = 10.0 ** ((target_lufs - measured) / 20.0)
    return (np.asarray(pcm, dtype=np.float64) * gain).astype(np.float32)
