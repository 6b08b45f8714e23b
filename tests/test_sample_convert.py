"""to_int16 / to_float32 (ext/resampler.c): the model's frames converted in one C pass equal what the
numpy expressions they replace on the audio path give, sample for sample, ties and saturation included;
a NaN becomes silence; bad arrays are refused with a ValueError, never written past."""
import numpy as np
import pytest

from callbot.engine.audio import to_float32, to_int16
from callbot.engine.audio._resampler import f32_to_s16

SCALE = 32768.0


def _numpy_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * SCALE), -32768, 32767).astype(np.int16)


def test_to_int16_equals_numpy_on_noise_ties_and_saturation():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(200_000) * 0.5).astype(np.float32)  # a good share beyond full scale
    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 32766.5, -32767.5, 32767.4, -32768.6], np.float32) / SCALE
    x = np.concatenate([x, ties, np.array([1.0, -1.0, 7.0, -7.0, np.inf, -np.inf], np.float32)])
    np.testing.assert_array_equal(to_int16(x, SCALE), _numpy_int16(x))
    assert list(to_int16(ties[:6], SCALE)) == [0, 2, 2, 0, -2, -2]  # ties to even, as numpy's rint


def test_to_int16_makes_nan_silence():
    x = np.array([0.25, np.nan, -0.25], np.float32)
    assert list(to_int16(x, SCALE)) == [8192, 0, -8192]


def test_to_float32_equals_numpy():
    x = np.random.default_rng(4).integers(-32768, 32768, 100_000).astype(np.int16)
    np.testing.assert_array_equal(to_float32(x, 1.0 / SCALE), x.astype(np.float32) / SCALE)


def test_strided_and_other_dtypes_are_converted_first():
    x = np.linspace(-1, 1, 64)  # float64, and a strided view of it
    np.testing.assert_array_equal(to_int16(x[::2], SCALE), _numpy_int16(x[::2].astype(np.float32)))


@pytest.mark.parametrize("x,out", [
    (np.zeros(4, np.float64), np.zeros(4, np.int16)),  # the binding takes float32 only
    (np.zeros(4, np.float32), np.zeros(3, np.int16)),  # lengths differ
    (np.zeros(4, np.float32), np.zeros(4, np.int32)),  # out is not int16
    (np.zeros(4, np.float32), np.zeros(8, np.int16)[::2]),  # out is not contiguous
    (np.zeros((2, 2), np.float32), np.zeros(4, np.int16)),
])
def test_the_binding_refuses_what_it_cannot_write_safely(x, out):
    with pytest.raises(ValueError):
        f32_to_s16(x, SCALE, out)
