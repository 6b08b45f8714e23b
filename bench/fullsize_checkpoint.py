"""A full-size PersonaPlex-7B model folder with random weights, in the exact layout of the HF repo
nvidia/personaplex-7b-v1: `model.safetensors` (475 tensors, PyTorch key names, bf16, 16.7 GB), the Mimi
checkpoint (318 tensors, float32), a SentencePiece model and `voices.tgz`.

Why: what the 7B costs in memory (the load's peak, a prepared bot, each call's KV cache) can only be
measured on arrays of the real sizes through the real loader, and the real weights need a license click
on a hub that benches and tests never touch. Random weights in the same file layout go through the same
code (`Model.load(path, quantize="q4")`) and allocate the same bytes; their outputs mean nothing.

Written streamed, tensor by tensor and in chunks of 16 M values, so the writer holds under 0.5 GB however big
the file; every tensor's values come from its own seed (the run's seed and the tensor's name), so two
runs write the same bytes. About 2.5 minutes (137 s for the 16.74 GB LM file here) and 17.1 GB of disk; refused with one line when the disk
lacks the room. A bench tool: never part of the tests or CI.

    python -m bench.fullsize_checkpoint /work/fullsize-ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from callbot.engine.model.lm_config import LmConfig, personaplex_7b
from callbot.engine.model.mimi import MimiConfig, mimi_202407
from callbot.engine.model.weights import LM_FILE, MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_FILE, checkpoint_layout

CHUNK = 16 * 1024 * 1024  # values generated at a time
MIMI_CODEBOOKS = 32  # the released checkpoint holds all 32; the model uses 8
VOICE_FRAMES = 8  # frames of each random voice prompt (the real ones are longer: a short prompt keeps
# the 7B's prompt steps, seconds each on a CPU, affordable in the memory bench)
MARGIN = 1 << 30  # free space left over on the disk


def _seed(name: str, seed: int) -> int:
    return (zlib.crc32(name.encode()) << 8) ^ seed


def _scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's random values: norm gains near 1, embeddings N(0, 1), linear weights
    N(0, 1/fan_in) so that activations stay O(1) (as tests/tiny_lm.py draws them)."""
    if name.endswith(".alpha"):
        return 1.0, 0.2
    if "emb" in name.split(".")[0]:
        return 0.0, 1.0
    return 0.0, 1.0 / np.sqrt(shape[-1])


def _bf16_chunks(name: str, shape: tuple[int, ...], seed: int):
    """The tensor's values as bf16 bit patterns (uint16), in chunks (truncated from float32)."""
    rng = np.random.default_rng(_seed(name, seed))
    mean, std = _scale(name, shape)
    left = int(np.prod(shape))
    while left:
        n = min(left, CHUNK)
        a = rng.standard_normal(n, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        yield (a.view(np.uint32) >> 16).astype(np.uint16)
        left -= n


def lm_bytes(cfg: LmConfig) -> int:
    return sum(2 * int(np.prod(s)) for s in checkpoint_layout(cfg).values())


def write_lm(path: Path, cfg: LmConfig, seed: int = 0, progress=None) -> int:
    """model.safetensors in NVIDIA's key layout, bf16, tensors in name order; returns its size."""
    layout = dict(sorted(checkpoint_layout(cfg).items()))
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in layout.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, (name, shape) in enumerate(layout.items()):
            for chunk in _bf16_chunks(name, shape, seed):
                chunk.tofile(f)
            if progress:
                progress(i + 1, len(layout), name)
    os.replace(tmp, path)
    return path.stat().st_size


def write_mimi(path: Path, cfg: MimiConfig, seed: int = 0) -> None:
    """The codec checkpoint (NVIDIA's layout, all 32 codebooks, float32), from tests/tiny_mimi.py's key
    walk at the released size."""
    from safetensors.numpy import save_file

    from tests.tiny_mimi import random_mimi_weights

    tmp = path.with_name(path.name + ".partial")
    save_file(random_mimi_weights(cfg, seed, total_codebooks=MIMI_CODEBOOKS), str(tmp))
    os.replace(tmp, path)


def write_folder(out: Path, seed: int = 0, cfg: LmConfig | None = None, mimi: MimiConfig | None = None,
                 verbose: bool = True) -> Path:
    """The whole model folder in `out` (created); files already complete are kept (an interrupted run
    resumes with the next file). Raises OSError("...") with one line when the disk lacks the room."""
    from callbot.engine.model.voices import VOICES
    from tests.tiny_assets import train_sentencepiece, write_voices_tgz

    cfg = cfg if cfg is not None else personaplex_7b()
    mimi = mimi if mimi is not None else mimi_202407()
    out.mkdir(parents=True, exist_ok=True)
    lm_path = out / LM_FILE
    need = (0 if lm_path.is_file() and lm_path.stat().st_size > lm_bytes(cfg) else lm_bytes(cfg)) + 4 * 96_300_000
    free = shutil.disk_usage(out).free
    if free < need + MARGIN:
        raise OSError(f"{out}: needs {(need + MARGIN) / 1e9:.1f} GB free for a full-size checkpoint, "
                      f"the disk has {free / 1e9:.1f} GB")
    t0 = time.monotonic()

    def say(text: str) -> None:
        if verbose:
            sys.stderr.write(text)
            sys.stderr.flush()

    if not (lm_path.is_file() and lm_path.stat().st_size > lm_bytes(cfg)):
        last = [0.0]

        def progress(done: int, total: int, name: str) -> None:
            now = time.monotonic()
            if now - last[0] >= 2 or done == total:
                last[0] = now
                say(f"\r{LM_FILE}: {done}/{total} tensors, {now - t0:5.1f} s")

        size = write_lm(lm_path, cfg, seed, progress)
        say(f"\n{LM_FILE}: {size / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s\n")
    if not (out / MIMI_FILE).is_file():
        write_mimi(out / MIMI_FILE, mimi, seed)
    if not (out / TEXT_TOKENIZER_FILE).is_file():
        train_sentencepiece(out / TEXT_TOKENIZER_FILE, vocab_size=96)
    if not (out / VOICES_FILE).is_file():
        write_voices_tgz(out / VOICES_FILE, VOICES, dim=cfg.dim, frames=VOICE_FRAMES, streams=cfg.num_streams,
                         width=cfg.max_delay + 3, card=cfg.card, text_card=96)
    say(f"{out}: full-size random checkpoint ready ({time.monotonic() - t0:.1f} s)\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fullsize_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (outside any git tree: 17 GB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        write_folder(args.out_dir, args.seed)
    except OSError as err:
        sys.stderr.write(f"fullsize_checkpoint: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
