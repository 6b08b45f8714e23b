"""Thin binding of ext/resampler.c: one polyphase FIR stream, one entry point per dtype.

Rates, dtypes and shapes are validated by callbot.engine.audio.resampler; here only what keeps the C side
memory-safe is checked (array type, dtype, contiguity, room in the output), with numpy's C macros:
typed-memoryview arguments cost microseconds per call, more than the 20 ms chunk's filtering.
The GIL is released around all C work.
"""
cimport numpy as cnp
from libc.stdint cimport int16_t

from includes.resampler cimport (
    rs_create, rs_destroy, rs_f32_to_s16, rs_flush_count, rs_flush_f32, rs_flush_s16, rs_output_count,
    rs_process_f32, rs_process_s16, rs_reset, rs_s16_to_f32, rs_t,
)

cnp.import_array()

ERR_OUT_TOO_SMALL = "output buffer holds {have} samples, this call writes {need}"
ERR_ARRAY = "{name} must be a 1-D C-contiguous {dtype} numpy array"
ERR_LENGTHS = "out holds {m} samples, x has {n}: they must match"


cdef inline void _check(object a, int typenum, bint writable, str name) except *:
    if (
        not cnp.PyArray_Check(a)
        or cnp.PyArray_TYPE(a) != typenum
        or cnp.PyArray_NDIM(a) != 1
        or not cnp.PyArray_IS_C_CONTIGUOUS(a)
        or (writable and not cnp.PyArray_ISWRITEABLE(a))
    ):
        raise ValueError(ERR_ARRAY.format(name=name, dtype="float32" if typenum == cnp.NPY_FLOAT32 else "int16"))


cdef inline void _same_length(object x, object out) except *:
    if cnp.PyArray_DIM(out, 0) != cnp.PyArray_DIM(x, 0):
        raise ValueError(ERR_LENGTHS.format(n=cnp.PyArray_DIM(x, 0), m=cnp.PyArray_DIM(out, 0)))


def f32_to_s16(x, float scale, out):
    """out[i] = x[i] * scale, rounded to nearest (ties to even) and saturated to int16; NaN -> 0."""
    _check(x, cnp.NPY_FLOAT32, False, "x")
    _check(out, cnp.NPY_INT16, True, "out")
    _same_length(x, out)
    cdef size_t n = <size_t>cnp.PyArray_DIM(x, 0)
    cdef const float *src = <const float *>cnp.PyArray_DATA(x)
    cdef int16_t *dst = <int16_t *>cnp.PyArray_DATA(out)
    with nogil:
        rs_f32_to_s16(src, n, scale, dst)


def s16_to_f32(x, float scale, out):
    """out[i] = x[i] * scale."""
    _check(x, cnp.NPY_INT16, False, "x")
    _check(out, cnp.NPY_FLOAT32, True, "out")
    _same_length(x, out)
    cdef size_t n = <size_t>cnp.PyArray_DIM(x, 0)
    cdef const int16_t *src = <const int16_t *>cnp.PyArray_DATA(x)
    cdef float *dst = <float *>cnp.PyArray_DATA(out)
    with nogil:
        rs_s16_to_f32(src, n, scale, dst)


cdef class PolyphaseFir:
    """Streaming resampler by up/down with the low-pass prototype `taps` (at input rate * up)."""

    cdef rs_t *_rs
    cdef readonly int up
    cdef readonly int down

    def __cinit__(self, taps, int up, int down, int delay):
        _check(taps, cnp.NPY_FLOAT32, False, "taps")
        self._rs = rs_create(<const float *>cnp.PyArray_DATA(taps), <int>cnp.PyArray_DIM(taps, 0), up, down, delay)
        if self._rs is NULL:
            raise ValueError(f"bad filter: {len(taps)} taps, up {up}, down {down}, delay {delay}")
        self.up = up
        self.down = down

    def __dealloc__(self):
        rs_destroy(self._rs)

    def output_count(self, Py_ssize_t n):
        """Samples the next process call with n input samples writes."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return rs_output_count(self._rs, n)

    def flush_count(self):
        """Samples the next flush writes."""
        return rs_flush_count(self._rs)

    cdef size_t _room(self, object out, size_t need) except? 0:
        cdef size_t have = <size_t>cnp.PyArray_DIM(out, 0)
        if have < need:
            raise ValueError(ERR_OUT_TOO_SMALL.format(have=have, need=need))
        return have

    def process_f32(self, x, out):
        """Resample float32 x into out; returns how many samples were written."""
        _check(x, cnp.NPY_FLOAT32, False, "x")
        _check(out, cnp.NPY_FLOAT32, True, "out")
        cdef size_t n = <size_t>cnp.PyArray_DIM(x, 0), done
        self._room(out, rs_output_count(self._rs, n))
        cdef const float *src = <const float *>cnp.PyArray_DATA(x)
        cdef float *dst = <float *>cnp.PyArray_DATA(out)
        with nogil:
            done = rs_process_f32(self._rs, src, n, dst)
        return done

    def process_s16(self, x, out):
        """Resample int16 x into out; returns how many samples were written."""
        _check(x, cnp.NPY_INT16, False, "x")
        _check(out, cnp.NPY_INT16, True, "out")
        cdef size_t n = <size_t>cnp.PyArray_DIM(x, 0), done
        self._room(out, rs_output_count(self._rs, n))
        cdef const int16_t *src = <const int16_t *>cnp.PyArray_DATA(x)
        cdef int16_t *dst = <int16_t *>cnp.PyArray_DATA(out)
        with nogil:
            done = rs_process_s16(self._rs, src, n, dst)
        return done

    def flush_f32(self, out):
        """Write what the delay holds (as float32) into out, then reset; returns how many."""
        _check(out, cnp.NPY_FLOAT32, True, "out")
        self._room(out, rs_flush_count(self._rs))
        cdef float *dst = <float *>cnp.PyArray_DATA(out)
        cdef size_t done
        with nogil:
            done = rs_flush_f32(self._rs, dst)
        return done

    def flush_s16(self, out):
        """Write what the delay holds (as int16) into out, then reset; returns how many."""
        _check(out, cnp.NPY_INT16, True, "out")
        self._room(out, rs_flush_count(self._rs))
        cdef int16_t *dst = <int16_t *>cnp.PyArray_DATA(out)
        cdef size_t done
        with nogil:
            done = rs_flush_s16(self._rs, dst)
        return done

    def reset(self):
        """Forget all input."""
        rs_reset(self._rs)
