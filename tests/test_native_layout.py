"""How the compiled core is laid out: C declarations only in ext/includes/, one stub per compiled module
installed beside it, and stubs that match the built modules (mypy's stubtest, when mypy is installed)."""
import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
EXT = ROOT / "ext"
# every ext/_NAME.pyx, by the module it builds (setup.py PACKAGE_OF)
MODULES = [
    "callbot.engine.audio._clock",
    "callbot.engine.audio._resampler",
    "callbot.engine.audio._ring",
    "callbot.engine.audio._rtthread",
    "callbot.engine.audio._stamps",
    "callbot.sip._pcm",
]
EXTERN = re.compile(r"^cdef extern from\s+([^\s:]+)", re.M)


def test_every_extension_is_listed_here():
    assert sorted(m.rsplit(".", 1)[1] for m in MODULES) == sorted(p.stem for p in EXT.glob("_*.pyx"))


def test_c_declarations_live_in_includes_only():
    """uvloop's layout: ext/includes/NAME.pxd declares ext/NAME.h and nothing else; the .pyx files and the
    shared-class .pxd files cimport from there and declare no C of their own."""
    for source in [*EXT.glob("*.pyx"), *EXT.rglob("*.pxd")]:
        if source.parent == EXT / "includes":
            continue
        assert not EXTERN.search(source.read_text()), f"{source.relative_to(ROOT)} declares C itself"
    headers = sorted(h.stem for h in EXT.glob("*.h"))
    assert sorted(p.stem for p in (EXT / "includes").glob("*.pxd")) == headers
    for name in headers:
        externs = EXTERN.findall((EXT / "includes" / f"{name}.pxd").read_text())
        assert externs == [f'"{name}.h"'], f"includes/{name}.pxd should declare {name}.h only, declares {externs}"


@pytest.mark.parametrize("name", MODULES)
def test_stub_and_marker_are_installed_beside_the_module(name):
    built = pathlib.Path(importlib.import_module(name).__file__)
    assert built.with_name(name.rsplit(".", 1)[1] + ".pyi").is_file()
    assert (built.parent / "py.typed").is_file()


@pytest.mark.timeout(300)
def test_stubs_match_the_built_modules(tmp_path):
    """mypy's stubtest: every name, signature and class kind in the stubs as the built modules have it."""
    pytest.importorskip("mypy", reason="mypy not installed (pip install mypy) to check the stubs")
    # mypy cannot see through the editable install's import hook, so it is shown the packages as a plain
    # callbot/ tree; followed imports (the packages' .py modules) are not checked here, only the stubs
    tree = tmp_path / "tree" / "callbot"
    tree.mkdir(parents=True)
    for package in ("engine", "sip"):
        (tree / package).symlink_to(pathlib.Path(importlib.import_module(f"callbot.{package}").__file__).parent)
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nfollow_imports = silent\n")
    run = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", str(config), *MODULES],
        capture_output=True, text=True, timeout=280, cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(tree.parent)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
