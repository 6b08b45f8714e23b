"""The stereo waveform of a call's recording as SVG (caller above, bot below): peaks of the 16-bit WAV
in a few hundred columns, drawn on the server so the page needs no audio decoding script."""
from __future__ import annotations

import wave

import numpy as np
from markupsafe import Markup

COLUMNS = 600


def waveform_svg(path: str, columns: int = COLUMNS, height: int = 120) -> Markup | None:
    """The SVG, or None when the file cannot be read as a 16-bit WAV."""
    try:
        with wave.open(path, "rb") as w:
            if w.getsampwidth() != 2:
                return None
            channels = w.getnchannels()
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, channels)
    except (OSError, EOFError, wave.Error, ValueError):
        return None
    if len(pcm) == 0:
        return None
    n = max(1, len(pcm) // columns)
    k = len(pcm) // n
    # |sample| in 16 bits (abs(-32768) wraps to -32768, which reads as 32768 unsigned); one channel at a time
    # made contiguous, so the per-column max runs over rows of memory
    mags = np.abs(pcm[:k * n]).view(np.uint16)
    peaks = np.stack([np.ascontiguousarray(mags[:, ch]).reshape(k, n).max(axis=1) for ch in range(channels)],
                     axis=1) / 32768.0
    lane = height / 2
    parts = [f'<svg class="wave" viewBox="0 0 {k} {height}" preserveAspectRatio="none" width="100%" '
             f'height="{height}" role="img" aria-label="waveform: caller above, bot below">']
    for ch, cls in ((0, "caller"), (min(1, channels - 1), "bot")):
        mid = lane * (ch + 0.5) if channels > 1 else lane * (0.5 + (cls == "bot"))
        d = " ".join(f"M{x} {mid - p * lane / 2:.1f}V{mid + p * lane / 2:.1f}" for x, p in enumerate(peaks[:, ch]))
        parts.append(f'<path class="{cls}" d="{d}"/>')
    parts.append('<line id="playhead" x1="0" x2="0" y1="0" y2="100%"/></svg>')
    return Markup("".join(parts))
