"""A small disk for the tests of a full one: a tmpfs (1 MiB) the test fills (`fill`) and frees (`free`).

Why a real file system and not a patched `open`: what is tested is what the OS does when the disk is full
(ENOSPC from write, a rename that needs no room, a truncate that frees it), and it differs by call. A
tmpfs needs CAP_SYS_ADMIN (root, as CI runs); elsewhere the tests that need one are skipped, saying why.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
from typing import Iterator

import pytest

SIZE = "1m"


class SmallDisk:
    def __init__(self, path: pathlib.Path):
        self.path = path
        self._filler = path / ".filler"

    def fill(self) -> None:
        """Takes every byte left (the filler grows until the disk refuses)."""
        with open(self._filler, "ab", buffering=0) as f:
            for chunk in (65536, 4096, 512, 1):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError:
                    continue
        self.check_full()

    def check_full(self) -> None:
        probe = self.path / ".probe"
        try:
            with open(probe, "wb", buffering=0) as f:
                f.write(b"\0" * 4096)
        except OSError:
            return
        finally:
            probe.unlink(missing_ok=True)
        raise AssertionError(f"{self.path} still takes 4 KiB after fill()")

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)


@contextlib.contextmanager
def small_disk(where: pathlib.Path, size: str = SIZE) -> Iterator[SmallDisk]:
    """A tmpfs of `size` mounted at `where` (made), unmounted after; skips the test where it cannot be
    mounted."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here (needs root): {done.stderr.strip()}")
    try:
        yield SmallDisk(where)
    finally:
        os.sync()
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)
