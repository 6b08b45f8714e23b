"""The agent's voice: PersonaPlex's 18 named voice prompts (`voices.tgz` / `voices/*.pt`) or a WAV recording.

A named voice is what NVIDIA saved after running a recording through the model: the per-frame input
embeddings it fed the temporal transformer and the delayed-stream token cache at the end. Replaying the
embeddings rebuilds the model's state without the recording or the codec. The files are `torch.save`
zips, read here without torch by `ptfile.read_pt`; the archive is read in memory, member by member, so
nothing it names is ever written to disk and a hostile path cannot escape anywhere.

A WAV voice follows NVIDIA's audio procedure up to the codec: mono, 24 kHz, -24 LUFS; the prompt
builder (`prompt.py`) Mimi-encodes it. The one-shot resampling uses soxr's HQ converter: the streaming
resampler of the call path is built for low delay, which does not matter for a file read once.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import posixpath
import tarfile

import numpy as np
import soxr

from callbot.engine.model.loudness import VOICE_PROMPT_LUFS, normalize_loudness
from callbot.engine.model.ptfile import PtFileError, read_pt
from callbot.engine.audio.wavfile import read_wav

__all__ = ["VOICES", "VoiceEmbeddings", "VoiceRecording", "VoiceLibrary", "voice_from_pt", "voice_from_wav"]

VOICES: tuple[str, ...] = (
    *(f"NATF{i}" for i in range(4)),
    *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)),
    *(f"VARM{i}" for i in range(5)),
)

SAMPLE_RATE = 24000
_MAX_VOICE_FILE_BYTES = 256 << 20  # a real voice file is a few MiB


@dataclasses.dataclass(frozen=True)
class VoiceEmbeddings:
    """A saved voice prompt: `embeddings` float32 [frames, dim] replayed one per step, then `cache`
    int64 [streams, width] (NVIDIA's delayed-stream token ring at the end of the prompt) restored."""

    name: str
    embeddings: np.ndarray
    cache: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.embeddings.shape[0])


@dataclasses.dataclass(frozen=True)
class VoiceRecording:
    """A voice recording ready for the codec: mono float32 at 24 kHz, normalised to -24 LUFS."""

    name: str
    pcm: np.ndarray


def voice_from_pt(source: str | os.PathLike | bytes, name: str) -> VoiceEmbeddings:
    """The voice prompt saved in a `.pt` file (a path or its bytes); ValueError naming it if malformed."""
    try:
        obj = read_pt(source, name=name)
    except PtFileError as e:
        raise ValueError(f"voice {e}") from None
    if not isinstance(obj, dict) or not {"embeddings", "cache"} <= obj.keys():
        keys = sorted(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"voice {name}: expected a dict with 'embeddings' and 'cache', found {keys}")
    emb, cache = obj["embeddings"], obj["cache"]
    if not isinstance(emb, np.ndarray) or emb.ndim < 2 or emb.dtype.kind != "f" or emb.shape[0] < 1 \
            or any(n != 1 for n in emb.shape[1:-1]):
        raise ValueError(f"voice {name}: 'embeddings' must be a float tensor [frames, 1, 1, dim], "
                         f"got {getattr(emb, 'dtype', type(emb).__name__)} {getattr(emb, 'shape', '')}")
    if not isinstance(cache, np.ndarray) or cache.dtype.kind not in "iu" or cache.ndim not in (2, 3) \
            or (cache.ndim == 3 and cache.shape[0] != 1):
        raise ValueError(f"voice {name}: 'cache' must be an integer tensor [1, streams, width], "
                         f"got {getattr(cache, 'dtype', type(cache).__name__)} {getattr(cache, 'shape', '')}")
    if not np.all(np.isfinite(emb)):
        raise ValueError(f"voice {name}: 'embeddings' holds NaN or infinite values")
    return VoiceEmbeddings(
        name=name,
        embeddings=np.ascontiguousarray(emb.reshape(emb.shape[0], emb.shape[-1]), dtype=np.float32),
        cache=np.ascontiguousarray(cache.reshape(cache.shape[-2], cache.shape[-1]), dtype=np.int64),
    )


def voice_from_wav(path: str | os.PathLike) -> VoiceRecording:
    """A WAV recording as a voice: downmixed to mono, resampled to 24 kHz, normalised to -24 LUFS."""
    pcm, rate = read_wav(path)
    mono = pcm.mean(axis=0) if pcm.shape[0] > 1 else pcm[0]
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    try:
        mono = normalize_loudness(mono, SAMPLE_RATE, VOICE_PROMPT_LUFS)
    except ValueError as e:
        raise ValueError(f"voice {os.fspath(path)}: {e}") from None
    return VoiceRecording(name=pathlib.Path(path).stem, pcm=mono)


def _safe_member_name(member: tarfile.TarInfo, archive: str) -> str:
    """The member's normalised path; ValueError for anything that could land outside a folder."""
    name = member.name
    norm = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or "\\" in name \
            or (len(name) > 1 and name[1] == ":"):
        raise ValueError(f"{archive}: unsafe member {name!r} (absolute or '..' path); refusing the archive")
    if member.issym() or member.islnk() or member.isdev() or member.isfifo():
        raise ValueError(f"{archive}: unsafe member {name!r} (link or device); refusing the archive")
    return norm


class VoiceLibrary:
    """The named voices of a model directory: `voices/<NAME>.pt` files, else those inside `voices.tgz`."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = pathlib.Path(model_dir)
        self._folder = self.model_dir / "voices"
        self._archive = self.model_dir / "voices.tgz"
        self._archived: dict[str, str] | None = None  # voice name -> member name, read on first use

    def _archive_index(self) -> dict[str, str]:
        if self._archived is None:
            index: dict[str, str] = {}
            if self._archive.is_file():
                label = os.fspath(self._archive)
                try:
                    with tarfile.open(self._archive, "r:*") as tf:
                        for member in tf.getmembers():
                            norm = _safe_member_name(member, label)
                            folder, base = posixpath.split(norm)
                            if member.isfile() and folder == "voices" and base.endswith(".pt"):
                                index[base[:-3]] = member.name
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise ValueError(f"{label}: not a readable tar archive ({e})") from None
            self._archived = index
        return self._archived

    def names(self) -> list[str]:
        """Every voice this directory holds (the 18 of PersonaPlex, plus any others it ships)."""
        found = set(self._archive_index())
        if self._folder.is_dir():
            found |= {p.stem for p in self._folder.glob("*.pt") if p.is_file()}
        return sorted(found, key=lambda n: (VOICES.index(n) if n in VOICES else len(VOICES), n))

    def load(self, name: str) -> VoiceEmbeddings:
        """The named voice; ValueError listing the voices for an unknown name, naming the file if corrupt."""
        if name not in VOICES and name not in self.names():
            raise ValueError(f"unknown voice {name!r}: expected one of {', '.join(VOICES)} (or a .pt / .wav path)")
        loose = self._folder / f"{name}.pt"
        if loose.is_file():
            return voice_from_pt(loose, name=os.fspath(loose))
        member = self._archive_index().get(name)
        if member is None:
            raise ValueError(
                f"voice {name!r} is in neither {self._folder} nor {self._archive}: the model directory "
                "must hold voices.tgz (or its extracted voices/ folder)"
            )
        label = f"{self._archive}:{member}"
        try:
            with tarfile.open(self._archive, "r:*") as tf:
                info = tf.getmember(member)
                if info.size > _MAX_VOICE_FILE_BYTES:
                    raise ValueError(f"voice {label}: {info.size} bytes is too large for a voice prompt")
                f = tf.extractfile(info)
                data = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError, KeyError) as e:
            raise ValueError(f"voice {label}: cannot read it from the archive ({e})") from None
        return voice_from_pt(data, name=label)

    def resolve(self, voice: str | os.PathLike) -> VoiceEmbeddings | VoiceRecording:
        """A voice by name (`"NATF2"`) or by path to a `.pt` prompt or a `.wav` recording."""
        text = os.fspath(voice)
        lower = text.lower()
        if lower.endswith(".wav"):
            return voice_from_wav(text)
        if lower.endswith(".pt") and (os.sep in text or "/" in text or os.path.isfile(text)):
            return voice_from_pt(text, name=text)
        return self.load(text)
