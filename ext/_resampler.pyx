"""Thin binding of ext/resampler.c: one polyphase FIR stream, one entry point per dtype.

Checks here guard only the C side's own rules (room in the output buffer); rates, dtypes and shapes are
validated by callbot.engine.resampler. The GIL is released around all C work.
"""
from libc.stdint cimport int16_t

from cresampler cimport *

ERR_OUT_TOO_SMALL = "output buffer holds {have} samples, this call writes {need}"


cdef class PolyphaseFir:
    """Streaming resampler by up/down with the low-pass prototype `taps` (at input rate * up)."""

    cdef rs_t *_rs
    cdef readonly int up
    cdef readonly int down

    def __cinit__(self, const float[::1] taps, int up, int down, int delay):
        self._rs = rs_create(&taps[0], <int>taps.shape[0], up, down, delay)
        if self._rs is NULL:
            raise ValueError(f"bad filter: {taps.shape[0]} taps, up {up}, down {down}, delay {delay}")
        self.up = up
        self.down = down

    def __dealloc__(self):
        rs_destroy(self._rs)

    def output_count(self, Py_ssize_t n):
        """Samples the next process call with n input samples writes."""
        return rs_output_count(self._rs, n)

    def flush_count(self):
        """Samples the next flush writes."""
        return rs_flush_count(self._rs)

    def process_f32(self, const float[::1] x, float[::1] out):
        cdef size_t n = x.shape[0], need = rs_output_count(self._rs, n), done
        if n == 0:
            return 0
        if <size_t>out.shape[0] < need:
            raise ValueError(ERR_OUT_TOO_SMALL.format(have=out.shape[0], need=need))
        # out may be empty when this chunk completes no output sample (one input sample of a /3)
        cdef const float *src = &x[0]
        cdef float *dst = &out[0] if need else NULL
        with nogil:
            done = rs_process_f32(self._rs, src, n, dst)
        return done

    def process_s16(self, const int16_t[::1] x, int16_t[::1] out):
        cdef size_t n = x.shape[0], need = rs_output_count(self._rs, n), done
        if n == 0:
            return 0
        if <size_t>out.shape[0] < need:
            raise ValueError(ERR_OUT_TOO_SMALL.format(have=out.shape[0], need=need))
        # out may be empty when this chunk completes no output sample (one input sample of a /3)
        cdef const int16_t *src = &x[0]
        cdef int16_t *dst = &out[0] if need else NULL
        with nogil:
            done = rs_process_s16(self._rs, src, n, dst)
        return done

    def flush_f32(self, float[::1] out):
        cdef size_t need = rs_flush_count(self._rs), done
        if <size_t>out.shape[0] < need:
            raise ValueError(ERR_OUT_TOO_SMALL.format(have=out.shape[0], need=need))
        cdef float *dst = &out[0] if need else NULL
        with nogil:
            done = rs_flush_f32(self._rs, dst)
        return done

    def flush_s16(self, int16_t[::1] out):
        cdef size_t need = rs_flush_count(self._rs), done
        if <size_t>out.shape[0] < need:
            raise ValueError(ERR_OUT_TOO_SMALL.format(have=out.shape[0], need=need))
        cdef int16_t *dst = &out[0] if need else NULL
        with nogil:
            done = rs_flush_s16(self._rs, dst)
        return done

    def reset(self):
        rs_reset(self._rs)
