"""G.711 mu-law in numpy, for the WebSocket baseline: Twilio Media Streams carry base64 mu-law at 8 kHz.

Why here and not `audioop`: audioop is deprecated since Python 3.11 and gone in 3.13. Both directions
are lookup tables built once from the G.711 definition (bias 0x84, clip 32635).
"""
from __future__ import annotations

import numpy as np

_BIAS = 0x84
_CLIP = 32635


def _encode_table() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), _CLIP) + _BIAS
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7  # mag >= 0x84 > 2**7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8)


def _decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    mag = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign, -mag, mag).astype(np.int16)


_ENCODE = _encode_table()
_DECODE = _decode_table()


def encode(pcm: np.ndarray) -> bytes:
    """int16 PCM -> mu-law bytes."""
    return _ENCODE[pcm.astype(np.int32) + 32768].tobytes()


def decode(data: bytes) -> np.ndarray:
    """mu-law bytes -> int16 PCM."""
    return _DECODE[np.frombuffer(data, np.uint8)]
