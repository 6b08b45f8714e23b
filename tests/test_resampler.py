"""Resampler: keeps tones (frequency, level) after exactly `delay_ms`, rejects images and aliases,
streams bit-for-bit like one shot, keeps output steady, and refuses bad input with a clear ValueError."""

import math
import threading

import numpy as np
import pytest

from callbot.engine import Resampler
from callbot.engine.audio.resampler import DESIGNS, PHASES

DIRECTIONS = [(8000, 24000), (24000, 8000), (16000, 24000), (24000, 16000)]
DTYPES = [np.float32, np.int16]
ids = [f"{a // 1000}k-{b // 1000}k" for a, b in DIRECTIONS]


def full_scale(dtype) -> float:
    return 1.0 if dtype == np.float32 else 32767.0


def noise(n: int, dtype, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-0.7, 0.7, n) * full_scale(dtype)
    return x.astype(np.float32) if dtype == np.float32 else np.rint(x).astype(np.int16)


def sine(freq: float, rate: int, n: int, amplitude: float, delay_s: float = 0.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * (np.arange(n) / rate - delay_s))


def one_shot(in_rate, out_rate, x, phase="linear"):
    r = Resampler(in_rate, out_rate, phase)
    return np.concatenate([r.process(x), r.flush()])


def streamed(in_rate, out_rate, x, chunk, phase="linear"):
    r = Resampler(in_rate, out_rate, phase)
    parts = [r.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate([*parts, r.flush()])


def passband_edge(in_rate, out_rate) -> float:
    return 3400.0 if min(in_rate, out_rate) == 8000 else 7000.0


def fit_sine(y: np.ndarray, freq: float, rate: int, start: int) -> tuple[float, float, float]:
    """Least-squares fit of y[start:] to a sine at freq (time counted from sample 0):
    (amplitude, phase in radians, worst residual relative to the amplitude)."""
    t = np.arange(start, len(y)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    (a, b), *_ = np.linalg.lstsq(basis, y[start:], rcond=None)
    amplitude = math.hypot(a, b)
    return amplitude, math.atan2(b, a), np.max(np.abs(y[start:] - basis @ (a, b))) / amplitude


def measured_group_delay_ms(r: Resampler, freq: float) -> float:
    """Group delay at freq from the phases of two tones 20 Hz apart sent through the resampler."""
    phases = []
    for f in (freq - 10.0, freq + 10.0):
        y = r.process(sine(f, r.in_rate, r.in_rate // 4, 0.5).astype(np.float32)).astype(np.float64)
        r.flush()
        phases.append(fit_sine(y, f, r.out_rate, len(y) // 4)[1])
    step = (phases[0] - phases[1] + np.pi) % (2 * np.pi) - np.pi  # y = sin(2 pi f (t - delay))
    return 1000 * step / (2 * np.pi * 20.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_sine_keeps_frequency_and_level_after_the_delay(in_rate, out_rate, dtype):
    r = Resampler(in_rate, out_rate)
    amplitude = 0.5 * full_scale(dtype)
    for freq in (300.0, 1000.0, passband_edge(in_rate, out_rate)):
        x = sine(freq, in_rate, in_rate // 4, amplitude)
        x = x.astype(np.float32) if dtype == np.float32 else np.rint(x).astype(np.int16)
        y = r.process(x).astype(np.float64)
        r.flush()
        expected = sine(freq, out_rate, len(y), amplitude, r.delay_ms / 1000)
        settled = slice(len(y) // 4, None)  # past the filter's start-up (<= 2 ms) by far
        # the same sine, same phase after delay_ms: frequency, level and delay all hold at once
        err = np.max(np.abs(y[settled] - expected[settled])) / amplitude
        assert err < 2e-3, f"{freq} Hz: worst deviation {err:.2e} of amplitude"
        level_db = 20 * np.log10(np.std(y[settled]) / np.std(expected[settled]))
        assert abs(level_db) < 0.05, f"{freq} Hz: level changed by {level_db:.3f} dB"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_minimum_phase_sine_keeps_frequency_and_level(in_rate, out_rate, dtype):
    r = Resampler(in_rate, out_rate, "minimum")
    amplitude = 0.5 * full_scale(dtype)
    for freq in (300.0, 1000.0, passband_edge(in_rate, out_rate)):
        x = sine(freq, in_rate, in_rate // 4, amplitude)
        x = x.astype(np.float32) if dtype == np.float32 else np.rint(x).astype(np.int16)
        y = r.process(x).astype(np.float64)
        r.flush()
        # a pure sine at freq fits what comes out (no other frequency), at the same level
        fitted, _, residual = fit_sine(y, freq, out_rate, len(y) // 4)
        assert residual < 2e-3, f"{freq} Hz: worst residual {residual:.2e} of amplitude"
        level_db = 20 * np.log10(fitted / amplitude)
        assert abs(level_db) < 0.05, f"{freq} Hz: level changed by {level_db:.3f} dB"


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_group_delay_measured_across_the_band_peaks_at_delay_ms(in_rate, out_rate, phase):
    """Linear phase: every frequency is late by delay_ms. Minimum phase: none later than delay_ms,
    the top of the pass band about that late, the bottom sooner."""
    r = Resampler(in_rate, out_rate, phase)
    edge = passband_edge(in_rate, out_rate)
    delays = [measured_group_delay_ms(r, f) for f in (200.0, 1000.0, edge / 2, edge - 10)]
    if phase == "linear":
        assert delays == pytest.approx([r.delay_ms] * 4, abs=0.005)
    else:
        assert max(delays) <= r.delay_ms + 0.005
        assert delays[-1] == pytest.approx(r.delay_ms, abs=0.03)
        assert delays[0] < delays[-1] - 0.1
    assert r.delay_ms <= 2.0


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_stopband_rejects_images_and_aliases_by_60_db(in_rate, out_rate, phase):
    """Every tone that would fold into the pass band comes out at least 60 dB down."""
    low = min(in_rate, out_rate)
    stop = low - passband_edge(in_rate, out_rate)  # 4600 Hz / 9000 Hz
    n = in_rate // 2
    for freq in np.linspace(100, low / 2 - 100, 7) if in_rate < out_rate else np.linspace(stop, 11900, 9):
        r = Resampler(in_rate, out_rate, phase)
        y = r.process(sine(freq, in_rate, n, 0.5).astype(np.float32)).astype(np.float64)
        y = y[len(y) // 4 :] * np.hanning(len(y) - len(y) // 4)
        spectrum = np.abs(np.fft.rfft(y))
        bins = np.fft.rfftfreq(len(y), 1 / out_rate)
        if in_rate < out_rate:
            # upsampling: the tone stays, its images (multiples of in_rate +- freq) must vanish
            wanted = spectrum[np.abs(bins - freq) < 50].max()
            unwanted = spectrum[bins >= stop - 50].max()
        else:
            # downsampling: nothing of a stop-band tone may survive (it would alias below low/2)
            wanted = np.abs(np.fft.rfft(sine(freq, in_rate, len(y), 0.5) * np.hanning(len(y)))).max()
            unwanted = spectrum.max()
        rejection_db = 20 * np.log10(wanted / unwanted)
        assert rejection_db >= 60, f"{freq:.0f} Hz: only {rejection_db:.1f} dB"


@pytest.mark.parametrize("chunk", [1, 7, 160, 321, 4801])
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_streaming_in_odd_chunks_equals_one_shot_bit_for_bit(in_rate, out_rate, dtype, phase, chunk):
    x = noise(in_rate // 2 + 13, dtype)
    a, b = one_shot(in_rate, out_rate, x, phase), streamed(in_rate, out_rate, x, chunk, phase)
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_streaming_in_random_chunk_sizes_equals_one_shot(in_rate, out_rate):
    x = noise(in_rate // 2, np.float32)
    rng = np.random.default_rng(7)
    r = Resampler(in_rate, out_rate)
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(0, 700))
        parts.append(r.process(x[i : i + n]))
        i += n
    np.testing.assert_array_equal(np.concatenate([*parts, r.flush()]), one_shot(in_rate, out_rate, x))


@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_output_is_steady_20ms_in_gives_20ms_out(in_rate, out_rate):
    r = Resampler(in_rate, out_rate)
    for _ in range(10):
        assert len(r.process(np.zeros(in_rate // 50, np.float32))) == out_rate // 50
    # one sample at a time: the running total never falls behind by a whole output sample
    r = Resampler(in_rate, out_rate)
    total = 0
    for n_in in range(1, 301):
        total += len(r.process(np.zeros(1, np.int16)))
        assert total == math.ceil(n_in * out_rate / in_rate)


# positions whose time falls on an output sample in every direction (multiples of 6 at the input rate);
# between samples the sine test above checks the delay at every frequency instead
@pytest.mark.parametrize("position", [0, 6, 300, 1206])
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_impulse_comes_out_after_exactly_delay_ms(in_rate, out_rate, position):
    r = Resampler(in_rate, out_rate)
    assert 0 < r.delay_ms <= 2.0
    x = np.zeros(in_rate // 4, np.float32)
    x[position] = 1.0
    y = np.concatenate([r.process(x[:100]), r.process(x[100:])]).astype(np.float64)
    # linear phase: the response is symmetric about its centre, so its energy centroid is the delay
    centroid = np.sum(np.arange(len(y)) * y**2) / np.sum(y**2)
    measured_ms = 1000 * (centroid / out_rate - position / in_rate)
    assert measured_ms == pytest.approx(r.delay_ms, abs=1e-6)
    peak_ms = 1000 * (np.argmax(y) / out_rate - position / in_rate)
    assert peak_ms == pytest.approx(r.delay_ms, abs=1e-9)


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_flush_releases_the_delay_and_starts_a_fresh_stream(in_rate, out_rate, dtype, phase):
    r = Resampler(in_rate, out_rate, phase)
    d = DESIGNS[(in_rate, out_rate, phase)]
    x = noise(1001, dtype)
    first, tail = r.process(x), r.flush()
    assert tail.dtype == dtype
    # all of the input's duration comes out, plus the delay (whole samples at the filter rate)
    held = math.ceil(r.delay_ms * in_rate * d.up / 1000 - 1e-9)
    assert len(first) + len(tail) == math.ceil((len(x) * d.up + held) / d.down)
    assert len(tail) == pytest.approx(r.delay_ms * out_rate / 1000, abs=1)
    again = np.concatenate([r.process(x), r.flush()])
    np.testing.assert_array_equal(again, np.concatenate([first, tail]))
    assert len(Resampler(in_rate, out_rate, phase).flush()) == 0  # nothing fed, nothing held


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_int16_rounds_to_nearest_and_saturates(in_rate, out_rate, phase):
    # a full-scale square wave overshoots (Gibbs) past int16's range: it must clip, never wrap
    x = np.where(sine(440.0, in_rate, in_rate // 5, 1.0) >= 0, 32767, -32768).astype(np.int16)
    as_int = one_shot(in_rate, out_rate, x, phase)
    as_float = one_shot(in_rate, out_rate, x.astype(np.float32), phase).astype(np.float64)
    assert as_float.max() > 32767.5 and as_float.min() < -32768.5  # the test does reach clipping
    np.testing.assert_array_equal(as_int, np.clip(np.rint(as_float), -32768, 32767).astype(np.int16))


@pytest.mark.parametrize("phase", PHASES)
def test_passthrough_24k_changes_nothing(phase):
    r = Resampler(24000, 24000, phase)
    x = noise(999, np.int16)
    assert r.delay_ms == 0.0
    np.testing.assert_array_equal(r.process(x), x)
    assert len(r.flush()) == 0


@pytest.mark.parametrize(
    "in_rate,out_rate",
    [(44100, 24000), (8000, 16000), (16000, 8000), (48000, 24000), (0, 24000), (-8000, 24000), (8000, 24001),
     ("8000", 24000), (8000.5, 24000), (True, 24000), ([8000], 24000), (None, None)],
)
def test_bad_rates_raise_a_value_error_naming_the_supported_ones(in_rate, out_rate):
    with pytest.raises(ValueError, match=r"unsupported rates .*8000 -> 24000, 24000 -> 8000, 16000 -> 24000"):
        Resampler(in_rate, out_rate)


@pytest.mark.parametrize(
    "chunk,message",
    [
        (np.zeros(10, np.float64), "dtype must be float32 or int16, got float64"),
        (np.zeros(10, np.int32), "dtype must be float32 or int16, got int32"),
        (np.zeros(10, np.uint8), "dtype must be float32 or int16, got uint8"),
        (np.zeros((10, 2), np.float32), r"must be 1-D .* shape \(10, 2\)"),
        (np.float32(1.0), "must be a numpy array"),
        (np.zeros((), np.int16), r"must be 1-D .* shape \(\)"),
        ([0.0, 1.0], "must be a numpy array .* got list"),
        (b"\x00\x00", "must be a numpy array .* got bytes"),
    ],
)
def test_bad_chunks_raise_a_clear_value_error(chunk, message):
    with pytest.raises(ValueError, match=message):
        Resampler(8000, 24000).process(chunk)


def test_a_stream_keeps_its_dtype_until_flushed():
    r = Resampler(16000, 24000)
    r.process(np.zeros(10, np.int16))
    with pytest.raises(ValueError, match="carries int16 .* got float32: flush"):
        r.process(np.zeros(10, np.float32))
    r.flush()
    assert r.process(np.zeros(10, np.float32)).dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_empty_chunk_returns_empty_and_changes_nothing(in_rate, out_rate, dtype):
    x = noise(500, dtype)
    r = Resampler(in_rate, out_rate)
    parts = [r.process(x[:123])]
    empty = r.process(x[:0])
    assert empty.dtype == dtype and empty.shape == (0,)
    parts += [r.process(x[123:]), r.flush()]
    np.testing.assert_array_equal(np.concatenate(parts), one_shot(in_rate, out_rate, x))


def test_strided_chunks_are_read_correctly():
    x = noise(2000, np.float32)
    np.testing.assert_array_equal(one_shot(8000, 24000, x[::2]), one_shot(8000, 24000, x[::2].copy()))


@pytest.mark.parametrize("in_rate,out_rate", DIRECTIONS, ids=ids)
def test_process_into_writes_what_process_returns(in_rate, out_rate):
    x = noise(in_rate // 50, np.int16)
    out = np.full(4096, 7, np.int16)
    r = Resampler(in_rate, out_rate)
    assert r.output_count(len(x)) == out_rate // 50
    n = r.process_into(x, out)
    np.testing.assert_array_equal(out[:n], Resampler(in_rate, out_rate).process(x))
    assert np.all(out[n:] == 7)  # nothing written past what it reported
    with pytest.raises(ValueError, match="holds 479 samples, this call writes 480"):
        Resampler(8000, 24000).process_into(np.zeros(160, np.int16), np.zeros(479, np.int16))
    with pytest.raises(ValueError, match="out must be a 1-D C-contiguous int16"):
        Resampler(8000, 24000).process_into(np.zeros(160, np.int16), np.zeros(480, np.float32))


@pytest.mark.parametrize("key,design", list(DESIGNS.items()), ids=[f"{a}-{b}-{p}" for a, b, p in DESIGNS])
def test_designs_fit_their_rates_and_keep_unity_gain(key, design):
    in_rate, out_rate, phase = key
    assert design.phase == phase
    assert in_rate * design.up == out_rate * design.down
    assert math.gcd(design.up, design.down) == 1
    h = design.coefficients(in_rate)
    assert len(h) == design.taps
    if phase == "linear":
        # symmetric, with the delay on whole samples at the output rate too
        np.testing.assert_allclose(h, h[::-1], atol=1e-9)
        assert design.taps % 2 == 1 and design.delay_samples(in_rate) % design.down == 0
    for branch in range(design.up):
        assert h[branch :: design.up].astype(np.float64).sum() == pytest.approx(1 / design.up, abs=1e-6)


def test_bad_phase_raises_a_value_error():
    with pytest.raises(ValueError, match="phase must be 'linear' or 'minimum', got 'min'"):
        Resampler(8000, 24000, "min")


def test_two_threads_sharing_one_resampler_keep_its_state_whole():
    """The C work runs without the GIL; the lock must keep a shared stream's state whole. Both threads
    feed the same chunk, so every call but the very first (which starts from silence) must give the
    same output whatever the interleaving."""
    chunk = noise(4801, np.float32)
    ref = Resampler(8000, 24000)
    first, steady = ref.process(chunk), ref.process(chunk)
    r = Resampler(8000, 24000)
    outputs = [[], []]

    def feed(slot):
        for _ in range(150):
            outputs[slot].append(r.process(chunk))

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    got = outputs[0] + outputs[1]
    assert sum(np.array_equal(y, first) for y in got) == 1
    assert sum(np.array_equal(y, steady) for y in got) == len(got) - 1
