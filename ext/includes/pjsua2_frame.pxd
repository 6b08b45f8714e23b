# C declarations of ext/pjsua2_frame.h: pjsua2's MediaFrame, SWIG's proxy object and C++'s allocator as
# laid out in memory, for the frame pump (ext/_pcm.pyx; check_layout verifies them at run time).
# Cimported by name: `from includes.pjsua2_frame cimport callbot_media_frame` (setup.py says why).
from cpython.ref cimport PyObject


cdef extern from "pjsua2_frame.h" nogil:
    ctypedef struct callbot_byte_vector:
        unsigned char* begin
        unsigned char* end
        unsigned char* cap

    ctypedef struct callbot_media_frame:
        int type
        callbot_byte_vector buf
        unsigned size

    void* callbot_swig_ptr(PyObject* swig_this)
    unsigned char* callbot_cxx_new(size_t n)
    void callbot_cxx_delete(void* p)
