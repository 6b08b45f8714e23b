"""Build of the compiled core: every ext/_NAME.pyx becomes an extension module in the package that
PACKAGE_OF names (the audio path's parts in callbot.engine.audio, pjsua2's frame pump in callbot.sip).

The import root is `callbot`, a namespace package whose parts live in top-level folders (`engine/`,
`sip/`, `app/`; setuptools package_dir), so the repository never shadows PyPI's `sip`. C sources an
extension needs beside its .pyx are listed in EXTRA_SOURCES; system libraries in LIBRARIES.

Native declarations, as uvloop lays them out: ext/*.h are the C headers; ext/includes/NAME.pxd declares
NAME.h for Cython (`cdef extern from "NAME.h" nogil:`) and nothing else; ext/callbot/.../_MODULE.pxd holds
only the cdef classes other extensions cimport (Ring and StampLog, for the frame pump). Each compiled
module ships a .pyi stub beside it (PACKAGE_DATA), checked against the built module by mypy's stubtest.
"""
import os
import pathlib
import sys

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent

# extension name -> the package it belongs to
PACKAGE_OF: dict[str, str] = {
    "_clock": "callbot.engine.audio",
    "_resampler": "callbot.engine.audio",
    "_ring": "callbot.engine.audio",
    "_rtthread": "callbot.engine.audio",
    "_stamps": "callbot.engine.audio",
    "_pcm": "callbot.sip",  # knows pjsua2's MediaFrame layout: SIP knowledge stays out of the engine
}
# folder -> package (setuptools package_dir)
PACKAGES: dict[str, str] = {
    "callbot.engine": "engine",
    "callbot.engine.audio": "engine/audio",
    "callbot.engine.model": "engine/model",
    "callbot.engine.serving": "engine/serving",
    "callbot.sip": "sip",
    "callbot.app": "app",
    "callbot.flows": "flows",
    "callbot.speech": "speech",
    "callbot.analytics": "analytics",
    "callbot.store": "store",
    "callbot.store.migrations": "store/migrations",  # Alembic's env.py and its template
    "callbot.store.migrations.versions": "store/migrations/versions",  # the schema's revisions
    "callbot.campaigns": "campaigns",
    "callbot.web": "web",
}

# typing for the compiled modules: their stubs and the PEP 561 marker, installed beside them
PACKAGE_DATA: dict[str, list[str]] = {
    "callbot.engine.audio": ["*.pyi", "py.typed"],
    "callbot.sip": ["*.pyi", "py.typed"],
    "callbot.store.migrations": ["script.py.mako"],
    "callbot.web": ["templates/*.html", "static/*"],  # the panel's pages, script and stylesheet
}

# extension name -> C files compiled into it (paths relative to the repository root)
EXTRA_SOURCES: dict[str, list[str]] = {
    "_clock": ["ext/clock.c"],
    "_rtthread": ["ext/rtthread.c"],
    "_resampler": ["ext/resampler.c"],
    "_stamps": ["ext/clock.c"],
}
# extension name -> system libraries it links
LIBRARIES: dict[str, list[str]] = {
    "_resampler": ["m"],  # lrintf
    # ::operator new/delete (ext/_pcm.pyx); the runtime by its soname, so no libstdc++-dev is needed
    "_pcm": ["c++" if sys.platform == "darwin" else ":libstdc++.so.6"],
}

CFLAGS = ["-O2", "-std=c11"] if sys.platform != "win32" else []

# No generated extras beside the modules' own names (each stub in PACKAGE_DATA lists exactly those):
# auto_pickle=False: no __reduce_cython__/__setstate_cython__ (Cython 3.3 also leaves them in the module's
# namespace). None of these objects could be pickled anyway (C state, non-trivial __cinit__): pickling
# still raises TypeError, from object.__reduce_ex__ now. autotestdict=False: no __test__ (no doctests here).
DIRECTIVES = {"auto_pickle": False, "autotestdict": False}


def extensions() -> list[Extension]:
    # CALLBOT_EXT=_ring,_clock builds only those (a quick rebuild while working on one module)
    only = {n for n in os.environ.get("CALLBOT_EXT", "").split(",") if n}
    mods = []
    for pyx in sorted((HERE / "ext").glob("_*.pyx")):
        name = pyx.stem
        if only and name not in only:
            continue
        mods.append(
            Extension(
                f"{PACKAGE_OF[name]}.{name}",
                sources=[f"ext/{pyx.name}", *EXTRA_SOURCES.get(name, [])],
                include_dirs=["ext", numpy.get_include()],
                libraries=LIBRARIES.get(name, []),
                extra_compile_args=CFLAGS,
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    # include_path ext/: C declarations are cimported name by name from a dotted path,
    #     from includes.ring cimport cb_ring, cb_ring_write
    # which Cython (3.3) resolves to ext/includes/ring.pxd with no includes/__init__.pxd; the module form
    # `from includes cimport ring` would need one, and its `ring.` prefix is silently shadowed by any
    # local of that name (_pcm.pyx loops `for ring in ...`). A list of names also says which C entry
    # points a module uses. The includes/ .pxd files declare only externs, so cimporting them adds no
    # run-time import. Generated C goes to build/, so ext/ holds only sources we write.
    return cythonize(mods, language_level=3, include_path=["ext"], build_dir="build/cython",
                     compiler_directives=DIRECTIVES)


setup(
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data=PACKAGE_DATA,
    ext_modules=extensions(),
    zip_safe=False,
)
