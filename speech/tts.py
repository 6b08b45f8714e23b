"""Text to speech for flow prompts (`say = "..."`): espeak-ng by default, piper when the user has a voice.

Why espeak-ng: it is a packaged program everywhere (Debian/Ubuntu `espeak-ng`, Homebrew `espeak-ng`),
speaks ~100 languages with nothing downloaded at run time, and synthesizes a sentence in tens of ms.
It sounds robotic; piper (`pip install piper-tts` plus a voice file the user picks, e.g. from
huggingface.co/rhasspy/piper-voices) sounds natural and is the pluggable better engine. Both sit behind
`TextToSpeech.synthesize(text) -> (int16 mono samples, rate Hz)`; the caller resamples to the call.

espeak-ng runs as a subprocess (`--stdout`, text on stdin so a text starting with "-" is no option, no
SSML) rather than through a C binding: no ABI to match across distributions, a crash or a hang costs
one prompt (bounded by a timeout), never the process. Its WAV is parsed here: streaming to a pipe, it
writes placeholder sizes (0x7ffff0..) that the stdlib `wave` module would trust.

Flow prompts repeat (every call hears the same greeting), so `CachedTts` keeps clips per text: an LRU in
memory and, optionally, WAV files on disk (keyed by a hash of the engine's settings and the text, so a
change of voice or engine version never serves an old clip) that survive restarts. `build_tts` checks
at start that the engine works (espeak-ng found, the voice known, the piper file loads), so a bad
configuration fails when the server starts, not in the middle of a call.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import wave
from collections import OrderedDict
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from callbot.speech.settings import TtsSettings

SYNTH_TIMEOUT_S = 20.0  # one espeak-ng run; a sentence takes ~30 ms, a page ~1 s
MAX_TEXT_CHARS = 4000  # a prompt is a few sentences; a page of text is a configuration mistake
DISK_MAX_FILES = 4096  # the disk cache's bound (oldest files go first): ~4096 prompts of ~100 kB
_INSTALL_ESPEAK = "install espeak-ng (Debian/Ubuntu: apt install espeak-ng; macOS: brew install espeak-ng)"


class TtsError(Exception):
    """Speech could not be made; the text is the one line the user gets."""


class TextToSpeech(Protocol):
    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """The text spoken: mono int16 samples and their rate in Hz."""
        ...


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("there is no text to speak")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the text has {len(text)} characters; at most {MAX_TEXT_CHARS} are spoken at once")
    return text


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono int16 samples and rate from a 16-bit PCM WAV, trusting no size field beyond the bytes there
    (espeak-ng writes placeholders when its output is a pipe). Stereo is averaged to mono."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise ValueError("truncated fmt chunk")
            fmt = struct.unpack_from("<HHIIHH", data, body)
        elif cid == b"data":
            if fmt is None:
                raise ValueError("data before fmt")
            tag, channels, rate, _, _, bits = fmt
            if tag != 1 or bits != 16 or channels not in (1, 2):
                raise ValueError(f"not 16-bit PCM mono/stereo (format {tag}, {bits} bits, {channels} channels)")
            end = min(len(data), body + size)
            end -= (end - body) % (2 * channels)
            pcm = np.frombuffer(data[body:end], dtype="<i2").astype(np.int16)
            if channels == 2:
                pcm = pcm.reshape(-1, 2).mean(axis=1).astype(np.int16)
            return pcm, rate
        pos = body + size + (size & 1)
    raise ValueError("no data chunk")


class EspeakTts:
    """espeak-ng as a subprocess. `check()` (build_tts calls it) proves the program runs and knows the
    voice; `cache_key` names what decides the sound (program version, voice, speed)."""

    def __init__(self, voice: str = "en-us", speed_wpm: int = 165, executable: str = "espeak-ng",
                 timeout_s: float = SYNTH_TIMEOUT_S):
        TtsSettings(voice=voice, speed_wpm=speed_wpm)  # the same checks as the config file
        self.voice = voice
        self.speed_wpm = speed_wpm
        self.executable = executable
        self.timeout_s = timeout_s
        self._path: str | None = None
        self._version: str | None = None

    def _program(self) -> str:
        if self._path is None:
            path = shutil.which(self.executable)
            if path is None:
                raise TtsError(f"{self.executable} was not found: {_INSTALL_ESPEAK}")
            self._path = path
        return self._path

    @property
    def cache_key(self) -> str:
        if self._version is None:
            try:
                out = subprocess.run([self._program(), "--version"], capture_output=True, timeout=self.timeout_s)
                self._version = out.stdout.decode("utf-8", "replace").split("Data at")[0].strip()
            except (OSError, subprocess.TimeoutExpired) as err:
                raise TtsError(f"{self.executable} --version failed: {err}") from None
        return f"espeak|{self._version}|{self.voice}|{self.speed_wpm}"

    def check(self) -> None:
        """Raise TtsError unless a short word comes out as audio (program found, voice known)."""
        self.cache_key  # noqa: B018  (finds the program, reads its version)
        self.synthesize("ok")

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        text = _check_text(text)
        cmd = [self._program(), "--stdout", "--stdin", "-v", self.voice, "-s", str(self.speed_wpm)]
        try:
            out = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise TtsError(f"espeak-ng did not finish within {self.timeout_s:g} s") from None
        except OSError as err:
            raise TtsError(f"espeak-ng could not run ({err}): {_INSTALL_ESPEAK}") from None
        err_text = out.stderr.decode("utf-8", "replace").strip()
        if out.returncode != 0 or not out.stdout:
            if "voice" in err_text.lower():
                raise TtsError(f"espeak-ng does not know the voice {self.voice!r} (see `espeak-ng --voices`)")
            raise TtsError(f"espeak-ng failed (exit status {out.returncode}): {err_text.splitlines()[-1:]}")
        try:
            return parse_wav(out.stdout)
        except ValueError as err:
            raise TtsError(f"espeak-ng's output is not a WAV: {err}") from None


class PiperTts:
    """piper (`pip install piper-tts`) with the user's voice file; imported when built, so the package is
    optional. Works with piper-tts 1.3 (`synthesize` yields AudioChunks) and 1.2 (`synthesize_stream_raw`)."""

    def __init__(self, model_path: str, config_path: str | None = None):
        model_path = os.path.abspath(os.path.expanduser(model_path))
        config_path = config_path or model_path + ".json"
        if not os.path.isfile(model_path):
            raise TtsError(f"piper voice file not found: {model_path}")
        if not os.path.isfile(config_path):
            raise TtsError(f"piper voice config not found: {config_path} (it comes with the .onnx file)")
        try:
            from piper import PiperVoice  # type: ignore[import-not-found]
        except ImportError:
            raise TtsError("piper is not installed: pip install piper-tts") from None
        try:
            self._voice = PiperVoice.load(model_path, config_path=config_path)
        except Exception as err:  # onnxruntime / json say it in many ways: one line for the user
            raise TtsError(f"piper could not load the voice {model_path}: {type(err).__name__}: {err}") from None
        st = os.stat(model_path)
        self.cache_key = f"piper|{model_path}|{st.st_size}|{st.st_mtime_ns}"
        self._lock = threading.Lock()  # one onnxruntime session: synthesize one text at a time

    def check(self) -> None:
        self.synthesize("ok")

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        text = _check_text(text)
        voice = self._voice
        try:
            with self._lock:
                if hasattr(voice, "synthesize_stream_raw"):  # piper-tts 1.2
                    pcm = b"".join(voice.synthesize_stream_raw(text))
                    return np.frombuffer(pcm, dtype=np.int16).copy(), int(voice.config.sample_rate)
                chunks = list(voice.synthesize(text))  # piper-tts 1.3: AudioChunk objects
        except Exception as err:
            raise TtsError(f"piper failed: {type(err).__name__}: {err}") from None
        if not chunks:
            return np.zeros(0, np.int16), int(voice.config.sample_rate)
        return (np.concatenate([c.audio_int16_array for c in chunks]).astype(np.int16),
                int(chunks[0].sample_rate))


class CachedTts:
    """Clips per text from `inner`: an LRU of `max_items` in memory and, with `directory`, WAV files that
    survive restarts. Thread-safe; two threads asking for the same new text wait for one synthesis. The
    arrays handed out are shared and read-only."""

    def __init__(self, inner: TextToSpeech, max_items: int = 256, directory: str | os.PathLike | None = None,
                 key: str | None = None):
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        self.inner = inner
        self.max_items = max_items
        self.directory = os.fspath(directory) if directory is not None else None
        self.key = key if key is not None else getattr(inner, "cache_key", type(inner).__name__)
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()
        self._pending: dict[str, Future] = {}
        if self.directory is not None:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as err:
                raise TtsError(f"the TTS cache folder {self.directory} cannot be made: {err}") from None

    def _digest(self, text: str) -> str:
        return hashlib.sha256(f"{self.key}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        text = _check_text(text)
        digest = self._digest(text)
        with self._lock:
            hit = self._memory.get(digest)
            if hit is not None:
                self._memory.move_to_end(digest)
                return hit
            pending = self._pending.get(digest)
            if pending is None:
                self._pending[digest] = mine = Future()
        if pending is not None:
            return pending.result()
        try:
            clip = self._from_disk(digest)
            if clip is None:
                samples, rate = self.inner.synthesize(text)
                samples = np.ascontiguousarray(samples, dtype=np.int16)
                clip = (samples, int(rate))
                self._to_disk(digest, clip)
            clip[0].flags.writeable = False
        except BaseException as err:
            with self._lock:
                self._pending.pop(digest, None)
            mine.set_exception(err)
            raise
        with self._lock:
            self._pending.pop(digest, None)
            if self.max_items:
                self._memory[digest] = clip
                while len(self._memory) > self.max_items:
                    self._memory.popitem(last=False)
        mine.set_result(clip)
        return clip

    def _from_disk(self, digest: str) -> tuple[np.ndarray, int] | None:
        if self.directory is None:
            return None
        path = os.path.join(self.directory, digest + ".wav")
        try:
            with wave.open(path, "rb") as w:  # our own files: their sizes are right
                if w.getsampwidth() != 2 or w.getnchannels() != 1:
                    return None
                samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)
                rate = w.getframerate()
            os.utime(path)  # recently used: the pruning below keeps it
            return samples, rate
        except (OSError, EOFError, wave.Error):
            return None  # not there, or damaged: made again and rewritten

    def _to_disk(self, digest: str, clip: tuple[np.ndarray, int]) -> None:
        if self.directory is None:
            return
        samples, rate = clip
        try:  # a whole file or none: written aside, then renamed over
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".wav")
            with os.fdopen(fd, "wb") as f, wave.open(f, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(rate)
                w.writeframes(samples.astype("<i2").tobytes())
            os.replace(tmp, os.path.join(self.directory, digest + ".wav"))
            self._prune()
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass  # a full disk costs the disk cache, never the prompt

    def _prune(self) -> None:
        try:
            entries = [e for e in os.scandir(self.directory) if e.name.endswith(".wav") and not e.name.startswith(".")]
        except OSError:
            return
        if len(entries) <= DISK_MAX_FILES:
            return
        entries.sort(key=lambda e: e.stat().st_mtime)
        for e in entries[:len(entries) - DISK_MAX_FILES]:
            try:
                os.unlink(e.path)
            except OSError:
                pass


def build_tts(settings: TtsSettings) -> CachedTts:
    """The configured engine behind a cache, checked now (TtsError if it cannot speak)."""
    inner: EspeakTts | PiperTts
    if settings.engine == "piper":
        assert settings.model is not None  # TtsSettings checks it
        inner = PiperTts(settings.model)
    else:
        inner = EspeakTts(voice=settings.voice, speed_wpm=settings.speed_wpm)
    inner.check()
    return CachedTts(inner, max_items=settings.cache_items, directory=settings.cache_dir)
