"""Reading a call's recording and writing a redacted copy, without the app's recorder.

The analysis runs in its own process and imports nothing of callbot.app (the arrows go app -> analytics),
so it reads the WAV itself, by the recorder's rule: a header that covers less than the file holds (the
process died between a write and the next header update) is not trusted, every whole frame is taken.
Chunks are walked (fmt, then data), so a WAV from another tool (sox, an export) reads too.
"""
from __future__ import annotations

import os
import struct
import wave

import numpy as np


class WavError(ValueError):
    """Not a 16-bit PCM WAV; the text is the one line to show."""


def read_wav(path: str | os.PathLike) -> tuple[int, np.ndarray]:
    """(rate, int16 samples [frames, channels]) of a 16-bit PCM WAV, even one cut short by a crash."""
    label = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise WavError(f"{label}: cannot be read ({err.strerror or err})") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(f"{label}: not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise WavError(f"{label}: truncated fmt chunk")
            fmt = struct.unpack_from("<HHIIHH", data, body)
        elif cid == b"data":
            if fmt is None:
                raise WavError(f"{label}: data before fmt")
            tag, channels, rate, _, _, bits = fmt
            if tag != 1 or bits != 16 or channels not in (1, 2) or rate <= 0:
                raise WavError(f"{label}: expected 16-bit PCM, 1 or 2 channels; got format {tag}, {bits} bits, "
                               f"{channels} ch")
            block = 2 * channels
            end = len(data)  # the rest of the file, whatever the header says (a crash leaves it short)
            whole = (end - body) // block * block
            return rate, np.frombuffer(data[body:body + whole], "<i2").astype(np.int16).reshape(-1, channels)
        pos = body + size + (size & 1)
    raise WavError(f"{label}: no data chunk")


def write_wav(path: str | os.PathLike, rate: int, samples: np.ndarray) -> None:
    """A 16-bit PCM WAV of `samples` [frames, channels], written aside and renamed (never half a file)."""
    target = os.fspath(path)
    a = np.asarray(samples, np.int16)
    if a.ndim == 1:
        a = a[:, None]
    tmp = target + ".tmp"
    try:
        with wave.open(tmp, "wb") as w:
            w.setnchannels(a.shape[1])
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.ascontiguousarray(a).astype("<i2").tobytes())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
