"""Finding, checking, converting, quantizing and caching the LM weights.

PersonaPlex ships one PyTorch-named `model.safetensors` (16.7 GB bf16). This module is the only place
that knows its key layout: it checks a file against the layout an `LmConfig` implies (names, shapes,
truncation) before reading any data, renames PyTorch keys to our modules' names (splitting the
depformer's stacked attention projections per slice), casts (float32 on a CPU, bfloat16 on a GPU),
and quantizes (q4/q8) the linear and embedding layers. A quantized conversion is written once to a cache
directory (safetensors + a json describing config and source), so later starts skip the conversion.
Every problem with a file is one `WeightsError` that names the file and says what was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .lm import LM
from .lm_config import LmConfig, personaplex_7b

HF_REPO = "nvidia/personaplex-7b-v1"
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_FILE = "voices.tgz"
MODEL_FILES = (LM_FILE, MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_FILE)

# q4 group size 64, chosen by measurement (BENCHMARKS.md, "LM per frame"): same CPU cost as 32, 11% fewer
# bytes per frame on the bandwidth-bound M4 (floor 34.6 vs 38.4 ms), for logits ~7% further from fp32.
Q4_GROUP_SIZE = 64
Q8_GROUP_SIZE = 64
CACHE_FORMAT = 1

_SAFETENSORS_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                       "U8": 1, "BOOL": 1, "U32": 4, "U16": 2, "U64": 8}
_FLOAT_DTYPES = ("F32", "F16", "BF16")


class WeightsError(ValueError):
    """A weights file is missing, truncated or does not hold what the model needs."""


# -- locating the files ------------------------------------------------------------------------------

def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolves it."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def hf_snapshot(repo_id: str = HF_REPO, revision: str | None = None) -> Path | None:
    """The cached snapshot directory of `repo_id` (`models--org--name/snapshots/<rev>/`), if any."""
    repo_dir = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / (revision or "main")
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    if revision is not None:
        candidate = snapshots / revision
        return candidate if candidate.is_dir() else None
    found = [p for p in snapshots.iterdir() if (p / LM_FILE).exists()]
    if not found:
        found = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def find_weights(local_dir: str | os.PathLike | None = None, *, download: bool = False,
                 repo_id: str = HF_REPO, revision: str | None = None) -> Path:
    """The directory holding the model files: `local_dir` if given, else the Hugging Face cache, else
    (only with download=True) a fresh `huggingface_hub` download, which needs the license accepted on
    the hub and a login. The LM file is checked to exist; the others are checked by their loaders."""
    if local_dir is not None:
        d = Path(local_dir).expanduser()
        if not d.is_dir():
            raise WeightsError(f"{d}: not a directory (expected the model files {', '.join(MODEL_FILES)})")
        require_file(d, LM_FILE)
        return d
    snap = hf_snapshot(repo_id, revision)
    if snap is not None and (snap / LM_FILE).is_file():
        return snap
    if download:
        return download_weights(repo_id, revision)
    if snap is not None:  # e.g. a dangling symlink left by an interrupted download
        raise WeightsError(f"{snap / LM_FILE}: missing from the Hugging Face cache snapshot "
                           f"(an interrupted download? download=True fetches it again)")
    raise WeightsError(
        f"weights of {repo_id} not found: no directory given and no snapshot with {LM_FILE} under "
        f"{hf_hub_cache()} (set HF_HOME or HF_HUB_CACHE, pass a directory, or download=True after "
        f"accepting the license at https://huggingface.co/{repo_id} and logging in)")


def download_weights(repo_id: str = HF_REPO, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download  # only when a user asks for a download
    except ImportError as e:
        raise WeightsError(f"downloading {repo_id} needs the huggingface_hub package ({e})") from e
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=list(MODEL_FILES))
    except Exception as e:  # gated repo, no login, no network: say which and how to fix it
        raise WeightsError(
            f"download of {repo_id} failed: {e} (accept the license at https://huggingface.co/{repo_id} "
            f"and log in with `huggingface-cli login`)") from e
    return Path(path)


def require_file(directory: str | os.PathLike, filename: str) -> Path:
    path = Path(directory) / filename
    if not path.is_file():
        raise WeightsError(f"{path}: missing (expected {filename} in {directory})")
    return path


# -- the checkpoint layout ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], bytes]:
    """The tensor table of a safetensors file, checked against the file's size (truncation)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated or not safetensors ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise WeightsError(f"{path}: not a safetensors file or truncated (header of {n} bytes "
                                   f"in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: safetensors header is not valid JSON ({e})") from e
    if not isinstance(table, dict):
        raise WeightsError(f"{path}: safetensors header is not a table")
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, info in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            start, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: malformed entry for tensor {name!r} ({e})") from e
        count = 1
        for s in shape:
            count *= s
        if dtype not in _SAFETENSORS_DTYPES or end - start != count * _SAFETENSORS_DTYPES[dtype]:
            raise WeightsError(f"{path}: tensor {name!r} has inconsistent dtype/shape/offsets")
        tensors[name] = TensorInfo(dtype, shape, start, end)
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise WeightsError(
            f"{path}: truncated: {size} bytes, its header describes {8 + n + data_end} "
            f"(an interrupted download?)")
    return tensors, raw


def checkpoint_layout(cfg: LmConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the PyTorch (NVIDIA/Kyutai) checkpoint of `cfg`: 67 + 6L + 36Ld for PersonaPlex."""
    d, dd, h, hd = cfg.dim, cfg.depformer_dim, cfg.transformer.ffn_hidden, cfg.depformer.ffn_hidden
    s: dict[str, tuple[int, ...]] = {
        "text_emb.weight": (cfg.text_card + 1, d),
        "text_linear.weight": (cfg.text_card, d),
        "out_norm.alpha": (1, 1, d),
        "depformer_text_emb.weight": (cfg.text_card + 1, dd),
    }
    for i in range(cfg.n_q):
        s[f"emb.{i}.weight"] = (cfg.card + 1, d)
    for k in range(cfg.dep_q):
        s[f"depformer_in.{k}.weight"] = (dd, d)
        s[f"linears.{k}.weight"] = (cfg.card, dd)
        if k < cfg.dep_q - 1:
            s[f"depformer_emb.{k}.weight"] = (cfg.card + 1, dd)
    for l in range(cfg.num_layers):
        p = f"transformer.layers.{l}."
        s[p + "self_attn.in_proj_weight"] = (3 * d, d)
        s[p + "self_attn.out_proj.weight"] = (d, d)
        s[p + "norm1.alpha"] = s[p + "norm2.alpha"] = (1, 1, d)
        s[p + "gating.linear_in.weight"] = (2 * h, d)
        s[p + "gating.linear_out.weight"] = (d, h)
    for l in range(cfg.depformer_num_layers):
        p = f"depformer.layers.{l}."
        s[p + "self_attn.in_proj_weight"] = (cfg.dep_q * 3 * dd, dd)
        s[p + "self_attn.out_proj.weight"] = (cfg.dep_q * dd, dd)
        s[p + "norm1.alpha"] = s[p + "norm2.alpha"] = (1, 1, dd)
        for k in range(cfg.dep_q):
            s[p + f"gating.{k}.linear_in.weight"] = (2 * hd, dd)
            s[p + f"gating.{k}.linear_out.weight"] = (dd, hd)
    return s


def check_checkpoint(path: str | os.PathLike, cfg: LmConfig) -> tuple[dict[str, TensorInfo], bytes]:
    """Header-only check that `path` holds exactly the tensors `cfg` needs."""
    tensors, raw = read_safetensors_header(path)
    expected = checkpoint_layout(cfg)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(
            f"{path}: does not match the LM config ({len(expected)} tensors expected, {len(tensors)} found): "
            + "; ".join(parts))
    for name, shape in expected.items():
        info = tensors[name]
        if info.shape != shape:
            raise WeightsError(f"{path}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        if info.dtype not in _FLOAT_DTYPES:
            raise WeightsError(f"{path}: tensor {name} is {info.dtype}, expected a float type")
    return tensors, raw


def torch_to_mlx(name: str, w: mx.array, cfg: LmConfig) -> list[tuple[str, mx.array]]:
    """Our parameter name(s) for one PyTorch checkpoint tensor: the one place that knows both layouts."""
    parts = name.split(".")
    if name.endswith(".alpha"):  # RMSNorm gain stored [1, 1, d]
        mapped = torch_to_mlx(name[: -len("alpha")] + "weight", w.reshape(-1), cfg)
        return mapped
    if parts[0] == "emb":
        return [(f"audio_embs.{parts[1]}.weight", w)]
    if parts[0] == "depformer_in":
        return [(f"depformer.slices.{parts[1]}.linear_in.weight", w)]
    if parts[0] == "linears":
        return [(f"depformer.slices.{parts[1]}.linear_out.weight", w)]
    if name == "depformer_text_emb.weight":
        return [("depformer.slices.0.emb.weight", w)]
    if parts[0] == "depformer_emb":
        return [(f"depformer.slices.{int(parts[1]) + 1}.emb.weight", w)]
    name = name.replace("self_attn.in_proj_weight", "self_attn.in_proj.weight")
    if parts[0] == "depformer":
        prefix = "depformer.transformer." + ".".join(parts[1:3]) + "."
        rest = ".".join(name.split(".")[3:])
        if rest in ("self_attn.in_proj.weight", "self_attn.out_proj.weight"):
            # Stacked for the dep_q slices along the output dimension: split one matrix per slice.
            kind = "in_projs" if "in_proj" in rest else "out_projs"
            chunks = mx.split(w, cfg.dep_q, axis=0)
            return [(f"{prefix}self_attn.{kind}.{k}.weight", c) for k, c in enumerate(chunks)]
        return [(prefix + rest, w)]
    return [(name, w)]


# -- quantization --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int

    @property
    def tag(self) -> str:
        return f"q{self.bits}g{self.group_size}"


def parse_quantization(quantize: str | int | None, group_size: int | None = None) -> Quantization | None:
    """None/"none" -> no quantization; 4, 8, "q4", "q8" -> that many bits (group size by default)."""
    if quantize is None or quantize in ("none", "fp", ""):
        if group_size is not None:
            raise ValueError("group_size given without quantization")
        return None
    bits = {4: 4, 8: 8, "4": 4, "8": 8, "q4": 4, "q8": 8}.get(quantize)
    if bits is None:
        raise ValueError(f"quantize must be None, 'q4' or 'q8', got {quantize!r}")
    if group_size is None:
        group_size = Q4_GROUP_SIZE if bits == 4 else Q8_GROUP_SIZE
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size!r}")
    return Quantization(bits, group_size)


def quantize_lm(model: LM, q: Quantization) -> list[str]:
    """Swap every linear and embedding layer whose input width the group size divides for its
    quantized twin (norms stay float). Returns the quantized module paths."""

    def predicate(path: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % q.group_size == 0

    nn.quantize(model, group_size=q.group_size, bits=q.bits, class_predicate=predicate)
    return quantized_paths(model)


def quantized_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules()
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


# -- loading --------------------------------------------------------------------------------------------

def default_dtype() -> mx.Dtype:
    """bfloat16 where MLX runs on a GPU (Metal, CUDA), float32 on a CPU (bf16 matmuls are slow there)."""
    return mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32


def default_cache_dir() -> Path:
    env = os.environ
    if env.get("CALLBOT_CACHE_DIR"):
        return Path(env["CALLBOT_CACHE_DIR"]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "callbot"


class _Progress:
    """A one-line progress bar on stderr (the first conversion of the 7B takes minutes)."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.start = self.last = time.monotonic()
        self.done = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.2 or self.done >= self.total):
            self.last = now
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{self.done}/{self.total} {now - self.start:5.1f} s")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _dtype_name(dtype: mx.Dtype) -> str:
    return {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}[dtype]


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / f"lm-{key}.safetensors", cache_dir / f"lm-{key}.json"


def load_lm(path: str | os.PathLike, config: LmConfig | None = None, *, quantize: str | int | None = None,
            group_size: int | None = None, dtype: mx.Dtype | None = None,
            cache_dir: str | os.PathLike | None | bool = None, progress: bool = True) -> LM:
    """Load the LM from `path` (a `model.safetensors` or a directory holding one).

    `config` defaults to PersonaPlex-7B (the HF repo carries no LM config; the architecture is fixed by
    the file name, and an explicit config is how other sizes, e.g. the tests' tiny model, are loaded).
    `quantize` "q4"/"q8" quantizes linear and embedding layers; the result is cached in `cache_dir`
    (default `$CALLBOT_CACHE_DIR` or ~/.cache/callbot; False: no cache) keyed by the source file's header
    and size, the config, the quantization and the dtype. Unquantized loads are renames and casts, not cached.
    """
    cfg = config if config is not None else personaplex_7b()
    if not isinstance(cfg, LmConfig):
        raise ValueError(f"config must be an LmConfig, got {type(cfg).__name__}")
    src = Path(path).expanduser()
    if src.is_dir():
        src = require_file(src, LM_FILE)
    elif not src.is_file():
        raise WeightsError(f"{src}: missing (expected the LM weights, {LM_FILE})")
    q = parse_quantization(quantize, group_size)
    dtype = default_dtype() if dtype is None else dtype
    tensors, raw_header = check_checkpoint(src, cfg)

    model = LM(cfg)
    if q is not None:
        quantize_lm(model, q)
    if q is None or cache_dir is False:
        _load_converted(model, _convert(src, tensors, model, cfg, q, dtype, progress), src)
        return model

    cache = Path(cache_dir).expanduser() if cache_dir not in (None, True) else default_cache_dir()
    descriptor = {
        "format": CACHE_FORMAT,
        "source": {"name": src.name, "size": src.stat().st_size,
                   "header_sha256": hashlib.sha256(raw_header).hexdigest()},
        "config": cfg.to_dict(),
        "quantization": {"bits": q.bits, "group_size": q.group_size},
        "dtype": _dtype_name(dtype),
    }
    key = hashlib.sha256(json.dumps(descriptor, sort_keys=True).encode()).hexdigest()[:16]
    weights_path, meta_path = _cache_paths(cache, key)
    if weights_path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == descriptor:
                _load_converted(model, list(mx.load(str(weights_path)).items()), weights_path)
                return model
        except (WeightsError, ValueError, RuntimeError, OSError) as e:
            # Our own cache is disposable: say so and convert again.
            sys.stderr.write(f"ignoring unusable converted-weights cache {weights_path}: {e}\n")
    converted = _convert(src, tensors, model, cfg, q, dtype, progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = weights_path.with_name(weights_path.stem + f".tmp{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), dict(converted), metadata={"callbot": json.dumps(descriptor)})
    os.replace(tmp, weights_path)
    tmp_meta = meta_path.with_suffix(f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(descriptor, indent=1, sort_keys=True))
    os.replace(tmp_meta, meta_path)
    _load_converted(model, converted, src)
    return model


def _convert(src: Path, tensors: dict[str, TensorInfo], model: LM, cfg: LmConfig, q: Quantization | None,
             dtype: mx.Dtype, progress: bool) -> list[tuple[str, mx.array]]:
    """Rename, cast and quantize every tensor of `src`, one at a time (bounded memory)."""
    quantized = set(quantized_paths(model))
    try:
        source = mx.load(str(src))
    except (RuntimeError, ValueError, OSError) as e:
        raise WeightsError(f"{src}: cannot be read as safetensors ({e})") from e
    bar = _Progress(f"converting {src.name}" + (f" to {q.tag}" if q else ""), len(tensors), progress)
    out: list[tuple[str, mx.array]] = []
    for name in sorted(tensors, key=lambda n: tensors[n].start):  # file order: sequential reads
        for mlx_name, w in torch_to_mlx(name, source.pop(name), cfg):
            w = w.astype(dtype)
            module = mlx_name.rsplit(".", 1)[0]
            if module in quantized and mlx_name.endswith(".weight"):
                wq, scales, biases = mx.quantize(w, group_size=q.group_size, bits=q.bits)
                parts = [(mlx_name, wq), (module + ".scales", scales), (module + ".biases", biases)]
            else:
                parts = [(mlx_name, w)]
            mx.eval([a for _, a in parts])
            out.extend(parts)
        bar.advance()
    return out


def _load_converted(model: LM, weights: list[tuple[str, mx.array]], origin: Path) -> None:
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise WeightsError(f"{origin}: weights do not fit the model ({e})") from e
    mx.eval(model.parameters())


def parameter_count(model: nn.Module) -> int:
    return sum(a.size for _, a in tree_flatten(model.parameters()))
