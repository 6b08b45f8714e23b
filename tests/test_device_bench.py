"""The GPU machine's 7B step bench, checked where CI runs: bench/device_pack.py's fat-binary pruning on a
section built here in the layout it parses (the real one is checked when it packs: it refuses a library
with no code for the GPU), and bench/bench_step_gpu.py run end to end at the tiny size on the CPU."""
from __future__ import annotations

import json
import struct

import pytest

from bench.device_pack import ENTRY_KIND_ELF, ENTRY_KIND_PTX, FATBIN_MAGIC, PackError, fatbin_entries, prune_fatbin


def _entry(kind: int, arch: int, payload: bytes) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0, len(header), len(payload))
    struct.pack_into("<I", header, 28, arch)
    return bytes(header) + payload


def _fatbin(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def test_only_the_kept_archs_code_survives_pruning_headers_and_layout_untouched():
    a75, a90, ptx = b"\x75" * 40, b"\x90" * 48, b"\x12" * 24
    section = bytearray(_fatbin(_entry(ENTRY_KIND_ELF, 75, a75), _entry(ENTRY_KIND_ELF, 90, a90)) + bytes(8)
                        + _fatbin(_entry(ENTRY_KIND_PTX, 120, ptx), _entry(ENTRY_KIND_ELF, 90, a90)))
    before = bytes(section)
    entries = fatbin_entries(before)
    assert [(k, a, n) for k, a, _, n in entries] == [(2, 75, 40), (2, 90, 48), (1, 120, 24), (2, 90, 48)]
    kept, zeroed = prune_fatbin(section, 90)
    assert (kept, zeroed) == (96, 64) and len(section) == len(before)
    assert fatbin_entries(bytes(section)) == entries  # every header where it was
    for kind, arch, start, size in entries:
        want = before[start:start + size] if arch == 90 else bytes(size)
        assert section[start:start + size] == want, (kind, arch)
    with pytest.raises(PackError, match="no sm_80 code"):
        prune_fatbin(bytearray(before), 80)
    with pytest.raises(PackError, match="runs past"):
        fatbin_entries(_fatbin(_entry(ENTRY_KIND_ELF, 90, a90))[:-8])


def test_the_step_bench_runs_at_the_tiny_size(tmp_path, capsys):
    from bench.bench_step_gpu import main

    assert main(["--size", "tiny", "--batches", "1,2", "--rings", "short,full", "--steps", "2",
                 "--json", str(tmp_path / "step.json")]) == 0
    report = json.loads((tmp_path / "step.json").read_text())
    assert [(r["ring"], r["batch"]) for r in report["rows"]] == [("200 frames", 1), ("200 frames", 2), ("full", 1),
                                                                   ("full", 2)]
    assert all(r["batched_ms"] > 0 and r["singles_ms"] > 0 for r in report["rows"])
    assert "ratio" in capsys.readouterr().out
    assert main(["--size", "tiny", "--batches", "0"]) == 2
