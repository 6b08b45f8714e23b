/* pjsua2_frame.h: pjsua2's MediaFrame as the SWIG proxy hands it to the media callbacks, laid out in C
 * so that ext/_pcm.pyx copies PCM in and out of it with no SWIG call (ext/_pcm.pyx says why).
 *
 * Why a header and not Cython: these are layouts of C++ objects (SWIG's SwigPyObject, std::vector,
 * pj::MediaFrame) and C++'s own allocation functions, declared by hand. Written in C they read as what
 * they are, beside the other native declarations, and Cython only declares them (includes/pjsua2_frame.pxd).
 * None of it is checked by a compiler against pjsua2: callbot.sip._pcm.check_layout verifies every fact
 * on real pjsua2 objects before any frame moves.
 *
 * Include after Python.h (Cython's generated C includes it first): PyObject_HEAD is Python's.
 */
#ifndef CALLBOT_PJSUA2_FRAME_H
#define CALLBOT_PJSUA2_FRAME_H

#include <Python.h>
#include <stddef.h>

/* SWIG's SwigPyObject, the type of a proxy's `.this`: ptr is the C++ object. */
typedef struct { PyObject_HEAD void *ptr; } callbot_swig_object;

/* std::vector<unsigned char> as libstdc++, libc++ and MSVC lay it out: three pointers. */
typedef struct { unsigned char *begin; unsigned char *end; unsigned char *cap; } callbot_byte_vector;

/* pj::MediaFrame (pjsua2/media.hpp): { pjmedia_frame_type type; ByteVector buf; unsigned size; } */
typedef struct { int type; callbot_byte_vector buf; unsigned size; } callbot_media_frame;

static inline void *callbot_swig_ptr(PyObject *swig_this) { return ((callbot_swig_object *)swig_this)->ptr; }

/* C++'s ::operator new(size_t), the allocation std::allocator pairs with the ::operator delete that
 * ~vector calls: declared by its mangled name (the same symbol on Linux and macOS). The module links
 * the C++ runtime for them (setup.py LIBRARIES). */
void *_Znwm(size_t n);
void _ZdlPv(void *p);
static inline unsigned char *callbot_cxx_new(size_t n) { return (unsigned char *)_Znwm(n); }
static inline void callbot_cxx_delete(void *p) { _ZdlPv(p); }

#endif /* CALLBOT_PJSUA2_FRAME_H */
