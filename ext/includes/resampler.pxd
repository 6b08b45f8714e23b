# C declarations of ext/resampler.h: one polyphase FIR stream, so any Cython module (the media port
# too) can resample without Python in between.
# Cimported by name: `from includes.resampler cimport rs_t, rs_create` (setup.py says why).
from libc.stdint cimport int16_t


cdef extern from "resampler.h" nogil:
    ctypedef struct rs_t:
        pass

    rs_t* rs_create(const float* h, int ntaps, int up, int down, int delay)
    void rs_destroy(rs_t* rs)
    size_t rs_output_count(const rs_t* rs, size_t n)
    size_t rs_flush_count(const rs_t* rs)
    size_t rs_process_f32(rs_t* rs, const float* inp, size_t n, float* out)
    size_t rs_process_s16(rs_t* rs, const int16_t* inp, size_t n, int16_t* out)
    size_t rs_flush_f32(rs_t* rs, float* out)
    size_t rs_flush_s16(rs_t* rs, int16_t* out)
    void rs_reset(rs_t* rs)
    void rs_f32_to_s16(const float* inp, size_t n, float scale, int16_t* out)
    void rs_s16_to_f32(const int16_t* inp, size_t n, float scale, float* out)
