"""Build of the compiled core: every ext/_NAME.pyx becomes an extension module in the package that
PACKAGE_OF names (the audio path's parts in callbot.engine.audio, pjsua2's frame pump in callbot.sip).

The import root is `callbot`, a namespace package whose parts live in top-level folders (`engine/`,
`sip/`, `app/`; setuptools package_dir), so the repository never shadows PyPI's `sip`. C sources an
extension needs beside its .pyx are listed in EXTRA_SOURCES; system libraries in LIBRARIES.
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
    # generated C goes to build/, so ext/ holds only sources we write
    return cythonize(mods, language_level=3, include_path=["ext"], build_dir="build/cython")


setup(
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    ext_modules=extensions(),
    zip_safe=False,
)
