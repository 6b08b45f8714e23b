"""Test assets of PersonaPlex's model folder made here: a SentencePiece model trained in the test, voice
prompts as `torch.save` zips (written without torch, byte layout as torch writes it), `voices.tgz`.

The real files need a license click on a hub that tests never touch; these have the same formats and
names, so the product's loaders read them through their real code paths.
"""

from __future__ import annotations

import io
import pathlib
import struct
import tarfile
import zipfile

import numpy as np
import sentencepiece

# A few sentences are enough for SentencePiece to learn a small vocabulary with words and pieces.
TRAINING_TEXT = """\
<system> You are a friendly receptionist at a dental clinic. Your name is Jane. <system>
Hello, thank you for calling. How can I help you today?
I would like to book an appointment for next Tuesday morning, please.
Of course. We have a free slot at nine thirty or at eleven. Which one suits you better?
Nine thirty is perfect. My name is Robert Miller and my phone number is five five five.
Thank you, Robert. You are booked for Tuesday at nine thirty. Is there anything else?
No, that is all. Have a nice day, goodbye!
The weather is lovely today, the sun is shining and the birds are singing in the garden.
Could you tell me more about your opening hours and the prices of a cleaning?
We are open from eight in the morning until six in the evening, Monday to Friday.
""".splitlines()


def train_sentencepiece(path: pathlib.Path, vocab_size: int = 96) -> pathlib.Path:
    """A small unigram SentencePiece model with PersonaPlex's special ids (0 unk/EPAD, 1 BOS, 2 EOS, 3 PAD)."""
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT * 4),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    path.write_bytes(buf.getvalue())
    return path


# --- torch.save's zip format, written without torch --------------------------------------------------

_STORAGE = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage", "bfloat16": "BFloat16Storage",
            np.dtype("float16"): "HalfStorage", np.dtype("int32"): "IntStorage"}


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even as torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Pickle:
    """Emits the pickle opcodes (protocol 2) that `torch.save` writes for a dict of tensors."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def str(self, s: str):
        b = s.encode()
        self.out += b"X" + struct.pack("<I", len(b)) + b

    def int(self, v: int):
        self.out += b"J" + struct.pack("<i", v)

    def tuple(self, values):
        self.out += b"("
        for v in values:
            self.int(v)
        self.out += b"t"

    def glob(self, module: str, name: str):
        self.out += b"c" + f"{module}\n{name}\n".encode()


def pt_bytes(tensors: dict[str, tuple[str, np.ndarray]], root: str = "archive") -> bytes:
    """A `torch.save` zip of a dict {key: (dtype name, array)}; dtype names: float32, bfloat16, int64, ...

    For "bfloat16" the array is float32 and is rounded. The layout (root/data.pkl, root/data/<n>,
    byteorder, version, 64-byte aligned storages) is what torch 2.x writes.
    """
    p = _Pickle()
    p.out += b"}("  # EMPTY_DICT, MARK
    storages: list[bytes] = []
    for key, (dtype, array) in tensors.items():
        if dtype == "bfloat16":
            raw = float32_to_bfloat16_bits(array)
            storage = "BFloat16Storage"
        else:
            raw = np.ascontiguousarray(array, dtype=dtype)
            storage = _STORAGE[raw.dtype]
        p.str(key)
        p.glob("torch._utils", "_rebuild_tensor_v2")
        p.out += b"(("  # MARK (args), MARK (persistent id)
        p.str("storage")
        p.glob("torch", storage)
        p.str(str(len(storages)))
        p.str("cpu")
        p.int(raw.size)
        p.out += b"tQ"  # TUPLE, BINPERSID
        p.int(0)
        p.tuple(raw.shape)
        p.tuple([int(np.prod(raw.shape[i + 1:], dtype=np.int64)) for i in range(raw.ndim)])
        p.out += b"\x89"  # NEWFALSE: requires_grad
        p.glob("collections", "OrderedDict")
        p.out += b")RtR"  # EMPTY_TUPLE, REDUCE; TUPLE (args); REDUCE
        storages.append(raw.astype(raw.dtype.newbyteorder("<")).tobytes())
    p.out += b"u."  # SETITEMS, STOP

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{root}/data.pkl", bytes(p.out))
        zf.writestr(f"{root}/.format_version", b"1")
        zf.writestr(f"{root}/byteorder", b"little")
        for i, raw in enumerate(storages):
            zf.writestr(f"{root}/data/{i}", raw)
        zf.writestr(f"{root}/version", b"3\n")
    return buf.getvalue()


def voice_tensors(dim: int, frames: int = 5, streams: int = 17, width: int = 4, card: int = 32,
                  text_card: int = 32, seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """A voice prompt's content: bf16 embeddings [frames, 1, 1, dim] and an int64 token cache [1, streams, width]."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((frames, 1, 1, dim)).astype(np.float32) * 0.5
    cache = rng.integers(0, card, size=(1, streams, width), dtype=np.int64)
    cache[0, 0] = rng.integers(0, text_card, size=width)
    return {"embeddings": ("bfloat16", emb), "cache": ("int64", cache)}


def write_voices_tgz(path: pathlib.Path, names, dim: int, extra_members: dict[str, bytes] | None = None,
                     **voice_kwargs) -> pathlib.Path:
    """`voices.tgz` holding `voices/<name>.pt` for each name (distinct random content per voice)."""
    with tarfile.open(path, "w:gz") as tf:
        dir_info = tarfile.TarInfo("voices")
        dir_info.type = tarfile.DIRTYPE
        dir_info.mode = 0o755
        tf.addfile(dir_info)
        members = {f"voices/{n}.pt": pt_bytes(voice_tensors(dim, seed=i, **voice_kwargs), root=n)
                   for i, n in enumerate(names)}
        members.update(extra_members or {})
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


# --- the whole model folder --------------------------------------------------------------------------

def tiny_model_configs():
    """(LmConfig, MimiConfig) of the tiny model: the tests' tiny LM with room for a whole prompt in its
    context, and a tiny codec whose codebooks match the LM's audio vocabulary."""
    import dataclasses

    from tests.tiny_lm import TINY_LM
    from tests.tiny_mimi import tiny_mimi_config

    lm = dataclasses.replace(TINY_LM, context=128)
    mimi = dataclasses.replace(tiny_mimi_config(), quantizer_bins=lm.card, num_codebooks=lm.agent_codebooks)
    return lm, mimi


def wide_model_configs():
    """(LmConfig, MimiConfig) of the tiny model with a temporal transformer of 2 heads of 64 (dim 128):
    heads as wide as a KV quantization group, as the 7B's 128, so a quantized KV cache takes the 7B's
    head-major layout and fused attention (engine/model/transformer.py `kv_encode`); the tiny model's
    heads of 16 cannot."""
    import dataclasses

    lm, mimi = tiny_model_configs()
    return dataclasses.replace(lm, dim=128, num_heads=2), mimi


def write_tiny_model_dir(directory: pathlib.Path, seed: int = 0, voice_frames: int = 5,
                         wide: bool = False) -> pathlib.Path:
    """A folder laid out as the HF repo nvidia/personaplex-7b-v1 (same file names, PyTorch key names),
    holding the tiny model: model.safetensors, the Mimi file, the SentencePiece model, voices.tgz.
    `wide`: the model of `wide_model_configs` (load it with those configs)."""
    from callbot.engine.model.voices import VOICES
    from callbot.engine.model.weights import MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_FILE
    from tests.tiny_lm import write_tiny_lm
    from tests.tiny_mimi import write_tiny_mimi

    lm, mimi = wide_model_configs() if wide else tiny_model_configs()
    directory.mkdir(parents=True, exist_ok=True)
    write_tiny_lm(directory, lm, seed=seed)
    write_tiny_mimi(directory, mimi, seed=seed, filename=MIMI_FILE)
    train_sentencepiece(directory / TEXT_TOKENIZER_FILE, vocab_size=lm.text_card)
    write_voices_tgz(directory / VOICES_FILE, VOICES, dim=lm.dim, frames=voice_frames,
                     streams=lm.num_streams, width=lm.max_delay + 3, card=lm.card, text_card=lm.text_card)
    return directory


def write_tiny_model_for_serve(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The tiny model's folder (write_tiny_model_dir) plus the architecture file that tells `serve` (and
    app/model_setup.py) its size: (folder, architecture.json)."""
    import msgspec

    write_tiny_model_dir(directory)
    lm_cfg, mimi_cfg = tiny_model_configs()
    arch = directory / "architecture.json"
    arch.write_bytes(msgspec.json.encode({"lm": lm_cfg, "mimi": mimi_cfg}))
    return directory, arch


def tiny_model_toml(directory: pathlib.Path, arch: pathlib.Path, process: bool | None = None) -> str:
    """The [model] table of a `callbot serve` config that loads the folder of `write_tiny_model_for_serve`
    through the real loader: its architecture file, no quantization, never a download; `process` says
    whether the engine runs in the inference process (None: serve's default)."""
    hosting = "" if process is None else f"process = {'true' if process else 'false'}\n"
    return f"""
[model]
path = "{directory}"
architecture = "{arch}"
quantization = "none"
download = false
{hosting}"""
