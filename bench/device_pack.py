"""Packs what the 7B step bench needs on the GPU machine into `.device/` (ignored by git): MLX's CUDA
build, MLX's Python bindings and soxr for that machine's Python (3.12), as the device tool carries them.

Why a packer of our own: the device tool carries at most 64 MiB with the working tree, and nothing can
be downloaded there, but the mlx-cuda-13 wheel is 90 MB and its libmlx.so alone compresses to 69 MB:
67 MB of it is `.nv_fatbin`, the GPU code for six generations (sm_75, 80, 90, 100, 120, 121 and PTX for
compute_120), already compressed. An H200 runs sm_90 alone. `prune_fatbin` zeroes the payload of every
other entry in place (headers, sizes and offsets kept: the CUDA driver picks an entry by the arch in its
header and never reads the payload of another), so they compress to nothing; symbols are stripped; the
tree is packed as one tar.xz (20 MB with the two wheels beside it). No tool does this: nvprune works on object files and
static libraries, not on a shared library, and is not installed here.

    python -m bench.device_pack            # .device/: wheels/ (mlx, soxr) and mlx-cuda-sm90.tar.xz

bench/device_step.sh unpacks and runs it there (the device tool's `run`, `carry = [".device"]`).
"""
from __future__ import annotations

import argparse
import io
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50  # a fat binary's header: magic, version, header size, size of its entries
ENTRY_KIND_PTX, ENTRY_KIND_ELF = 1, 2
PYTHON = "3.12"  # the device machine's python3 (/work/.library/device/KINDS.md)
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class PackError(Exception):
    """What went wrong, in one line."""


def fatbin_entries(section: bytes) -> list[tuple[int, int, int, int]]:
    """Every entry of the fat binaries in a `.nv_fatbin` section: (kind, arch, payload offset, payload
    size), offsets into `section`. The section is a run of fat binaries, each a 16-byte header (magic,
    version, header size, entries' size) and entries, each its own header (kind u16, flags u16, header
    size u32, payload size u64, ..., arch u32 at 28) and payload; bytes between fat binaries (alignment)
    are skipped. PackError on an entry that runs past its fat binary."""
    found = []
    pos = 0
    while pos + 16 <= len(section):
        magic, _version, header, size = struct.unpack_from("<IHHQ", section, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # fat binaries are 8-aligned
            continue
        entry, end = pos + header, pos + header + size
        if end > len(section):
            raise PackError(f"a fat binary at {pos} runs past the section ({end} > {len(section)})")
        while entry < end:
            kind, _flags, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            arch = struct.unpack_from("<I", section, entry + 28)[0]
            start = entry + entry_header
            if entry_header < 32 or start + payload > end:
                raise PackError(f"a fat binary entry at {entry} runs past its fat binary")
            found.append((kind, arch, start, payload))
            entry = start + payload
        pos = end
    return found


def prune_fatbin(section: bytearray, keep_arch: int) -> tuple[int, int]:
    """Zero, in place, the payload of every entry that is not an ELF for `keep_arch` (90: sm_90).
    Returns (bytes kept, bytes zeroed). PackError when no entry is for that arch: the library would
    then have nothing to run there."""
    kept = zeroed = 0
    for kind, arch, start, size in fatbin_entries(bytes(section)):
        if kind == ENTRY_KIND_ELF and arch == keep_arch:
            kept += size
        else:
            section[start:start + size] = bytes(size)
            zeroed += size
    if not kept:
        raise PackError(f"no sm_{keep_arch} code in the library: it cannot run on that GPU")
    return kept, zeroed


def _section(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of ELF section `name` (readelf, binutils)."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if f" {name} " in line:
            fields = line.split("]", 1)[1].split()  # name, type, address, offset, size, ...
            return int(fields[3], 16), int(fields[4], 16)
    raise PackError(f"{path.name} has no {name} section")


def prune_library(path: Path, keep_arch: int) -> tuple[int, int]:
    """Strip `path`'s symbols and zero its GPU code for other archs (in place)."""
    subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
    offset, size = _section(path, ".nv_fatbin")
    with open(path, "r+b") as f:
        f.seek(offset)
        section = bytearray(f.read(size))
        result = prune_fatbin(section, keep_arch)
        f.seek(offset)
        f.write(section)
    return result


def _download(names: list[str], into: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", PYTHON, "--implementation", "cp", *platforms, "-d", str(into), *names],
                   check=True)


def _installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def pack(out: Path, mlx_version: str, soxr_version: str, cuda: str = "13", keep_arch: int = 90) -> Path:
    """.device/ as bench/device_step.sh expects it; returns the tar.xz."""
    wheels = out / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    _download([f"mlx=={mlx_version}", f"soxr=={soxr_version}"], wheels)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        _download([f"mlx-cuda-{cuda}=={mlx_version}"], tmp_path)
        wheel = next(tmp_path.glob("mlx_cuda_*.whl"))
        tree = tmp_path / "tree"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tree)
        kept, zeroed = prune_library(tree / "mlx" / "lib" / "libmlx.so", keep_arch)
        target = out / f"mlx-cuda-sm{keep_arch}.tar.xz"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz", preset=6) as tar:
            for path in sorted(tree.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
        target.write_bytes(buf.getvalue())
    print(f"{target}: {target.stat().st_size / 1e6:.1f} MB (GPU code kept {kept / 1e6:.1f} MB for sm_{keep_arch}, "
          f"zeroed {zeroed / 1e6:.1f} MB); wheels: {', '.join(p.name for p in sorted(wheels.iterdir()))}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_pack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".device"))
    parser.add_argument("--mlx", default=None, help="MLX version (default: the one installed here)")
    parser.add_argument("--soxr", default=None, help="soxr version (default: the one installed here)")
    parser.add_argument("--cuda", default="13", choices=["12", "13"], help="the CUDA major of the wheel")
    parser.add_argument("--arch", type=int, default=90, help="the GPU's SM version (90: H100/H200)")
    args = parser.parse_args(argv)
    try:
        pack(args.out, args.mlx or _installed_version("mlx"), args.soxr or _installed_version("soxr"), args.cuda,
             args.arch)
    except (PackError, subprocess.CalledProcessError, OSError) as err:
        print(f"device_pack: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
