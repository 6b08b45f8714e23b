"""Read WAV files (integer PCM and IEEE float, plain or WAVE_FORMAT_EXTENSIBLE) into float32 with numpy.

A voice can be given as a WAV recording. The stdlib `wave` module reads integer PCM only (Python 3.11
refuses float and extensible files, which audio editors write by default), and the product must not need
soundfile/libsndfile for one file read at start-up, so the RIFF chunks are walked here.
"""

from __future__ import annotations

import os
import struct

import numpy as np

__all__ = ["read_wav"]

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(samples float32 [channels, frames] in [-1, 1), sample rate in Hz) of the WAV file at `path`.

    Raises ValueError naming the file for anything that is not a readable PCM/float WAV.
    """
    label = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{label}: cannot read WAV file ({e.strerror or e})") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError(f"{label}: not a WAV file (no RIFF/WAVE header)")
    fmt = None
    samples = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise ValueError(f"{label}: fmt chunk of {len(body)} bytes, 16 expected")
            tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE:
                if len(body) < 40:
                    raise ValueError(f"{label}: extensible fmt chunk of {len(body)} bytes, 40 expected")
                tag = struct.unpack_from("<H", body, 24)[0]  # first two bytes of the SubFormat GUID
            fmt = (tag, channels, rate, align, bits)
        elif cid == b"data":
            samples = body  # a truncated file keeps what it has (recorders that never patched the size)
        pos += 8 + size + (size & 1)  # chunks are padded to even sizes
    if fmt is None:
        raise ValueError(f"{label}: no fmt chunk")
    if samples is None:
        raise ValueError(f"{label}: no data chunk")
    tag, channels, rate, align, bits = fmt
    if channels < 1 or rate < 1:
        raise ValueError(f"{label}: {channels} channels at {rate} Hz is not audio")
    width = bits // 8
    if bits % 8 or align != width * channels:
        raise ValueError(f"{label}: {bits} bits per sample with block align {align} is not supported")
    frames = len(samples) // align
    raw = samples[: frames * align]
    if tag == _PCM and width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _PCM and width in (2, 4):
        x = np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(1 << (bits - 1))
    elif tag == _PCM and width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif tag == _FLOAT and width in (4, 8):
        x = np.frombuffer(raw, f"<f{width}").astype(np.float32)
    else:
        raise ValueError(f"{label}: format tag {tag:#06x} with {bits} bits is not supported (PCM 8/16/24/32 or float 32/64)")
    return np.ascontiguousarray(x.reshape(frames, channels).T), rate
