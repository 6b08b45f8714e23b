"""bench/fullsize_checkpoint.py writes the 7B's folder (16.7 GB: never in the tests); here the same writer
runs at the tiny model's size, and its folder must load through the real loader, in the exact layout,
with the same bytes on every run; a disk without the room is refused before anything is written."""

from __future__ import annotations

import hashlib

import pytest

from bench.fullsize_checkpoint import lm_bytes, write_folder
from callbot.engine import Model
from callbot.engine.model.lm_config import personaplex_7b
from callbot.engine.model.weights import LM_FILE, check_checkpoint, read_safetensors_header
from tests.tiny_assets import tiny_model_configs


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_writer_makes_a_folder_the_real_loader_takes(tmp_path):
    lm_cfg, mimi_cfg = tiny_model_configs()
    a = write_folder(tmp_path / "a", cfg=lm_cfg, mimi=mimi_cfg, verbose=False)
    b = write_folder(tmp_path / "b", cfg=lm_cfg, mimi=mimi_cfg, verbose=False)
    tensors, _ = check_checkpoint(a / LM_FILE, lm_cfg)  # names and shapes of NVIDIA's layout
    assert len(tensors) == lm_cfg.checkpoint_tensor_count
    assert {t.dtype for t in tensors.values()} == {"BF16"}
    assert (a / LM_FILE).stat().st_size - 8 - len(read_safetensors_header(a / LM_FILE)[1]) == lm_bytes(lm_cfg)
    assert _sha(a / LM_FILE) == _sha(b / LM_FILE)  # seeded per tensor: the same bytes every run
    model = Model.load(a, "q4", lm_config=lm_cfg, mimi_config=mimi_cfg, cache_dir=False, progress=False)
    snapshot = model.prepare("NATF0", "You are Jane.")
    assert snapshot.prompt_frames > 0


def test_a_disk_without_the_room_is_refused_before_writing(tmp_path):
    import dataclasses
    huge = dataclasses.replace(personaplex_7b(), num_layers=100_000)  # ~50 TB
    with pytest.raises(OSError, match=r"needs [0-9.]+ GB free for a full-size checkpoint, the disk has"):
        write_folder(tmp_path / "x", cfg=huge, verbose=False)
    assert not (tmp_path / "x" / LM_FILE).exists()
    assert not list((tmp_path / "x").iterdir())
