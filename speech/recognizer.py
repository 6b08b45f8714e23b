"""The caller's words, live: streams of partial and final hypotheses with word times.

`Recognizer.open_stream(rate)` gives one call's `RecognizerStream`; `feed` takes the caller's int16 audio
as the recorder drains it (100 ms chunks at 8 or 16 kHz) and returns what that audio produced: a partial
at most every PARTIAL_EVERY_S of speech (when its text changed), a final at each end of utterance.
Times are ms since the stream's first sample. speech/live.py runs streams off the SIP process.

Default engine: pocketsphinx. Its en-us model ships inside the PyPI wheel, so it works offline on any
machine with no model to fetch; it runs at ~0.1-0.2 s of CPU per second of audio. It is not accurate on
free speech (see docs/speech.md for what comes back from espeak-ng's sentences), which is why it also
offers keyword spotting (`keywords`): a few phrases, each with a detection threshold, found far more
reliably than by transcribing everything. Vosk (`pip install vosk` and a model folder the user
downloads, many languages, 8 kHz telephone models) is the pluggable better engine.

Utterances come from pocketsphinx 5's Endpointer, a WebRTC-style voice activity detector in C (30 ms
frames, a decision over a 0.3 s window) rather than an energy threshold of our own: energy cannot tell
speech from a fan, line hum or a distant TV, and the C VAD costs nothing next to the decoder. Its
window delays the start and end of speech by ~0.3 s, which is the price of not cutting words.

The en-us acoustic model is wideband (16 kHz, filters up to 6.8 kHz). Audio is resampled to 16 kHz
with soxr's streaming resampler. 8 kHz telephone audio then has an empty 4-8 kHz band, which the model
never heard in training, and pocketsphinx all but stops hearing words: measured on espeak-ng sentences
fed in 100 ms chunks, keyword spotting found "agent" in 0 of 4 sentences (either klatt voice, at 16 kHz
4 of 4) and the transcripts' word error rate was 1.00 (four voices). Adding back a mirror image of the
0-4 kHz band (spectral folding, the oldest trick of artificial bandwidth extension: (-1)^n times the
upsampled signal, at FOLD_GAIN) made it 4 of 4 with no false hit in 4 other sentences, and the word
error rate 0.81 (0.5 alike; 1.0 gave better transcripts, 0.78, but spotted worse). docs/speech.md has
the numbers.

A pocketsphinx Decoder holds its models (~90 MB for en-us with its language model) and takes ~0.3 s to
build, so decoders are pooled per Recognizer and taken only for the length of an utterance: many calls
cost as many decoders as callers talking at once. Each utterance starts clean (noise statistics reset,
the stream's own cepstral mean restored), so a result never depends on which call used a decoder before.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import threading
import warnings
from typing import Protocol

import msgspec
import numpy as np

from callbot.speech.settings import RecognizerSettings, parse_keyword

MODEL_RATE = 16000  # Hz: pocketsphinx's en-us acoustic model
FRAME_S = 0.01  # pocketsphinx's feature frame (frate 100)
PARTIAL_EVERY_S = 0.5  # seconds of speech between two looks at the partial hypothesis
MAX_UTTERANCE_S = 20.0  # a longer stretch of speech (or of noise the VAD takes for it) is cut into finals
FOLD_GAIN = 0.25  # the mirror image added to upsampled 8 kHz audio (see above)
DEFAULT_KWS_THRESHOLD = 1e-30  # pocketsphinx's default; "agent /1e-35/" to find more
ENDPOINT_WINDOW_S = 0.3  # pocketsphinx's default: shorter splits words, longer delays the final
ENDPOINT_RATIO = 0.9
MAX_IDLE_DECODERS = 8  # kept after a burst of callers talking at once (each ~90 MB)
RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_ALT = re.compile(r"\(\d+\)$")  # pocketsphinx marks alternative pronunciations: "to(2)"


class RecognizerError(Exception):
    """The recognizer cannot be built or run; the text is the one line the user gets."""


class Word(msgspec.Struct, frozen=True):
    text: str
    start_ms: float
    end_ms: float


class Hypothesis(msgspec.Struct, frozen=True):
    text: str
    final: bool
    start_ms: float
    end_ms: float
    words: tuple[Word, ...] = ()


class RecognizerStream(Protocol):
    def feed(self, pcm: np.ndarray) -> list[Hypothesis]:
        """int16 mono at the stream's rate; the partials and finals this audio produced."""
        ...

    def finish(self) -> list[Hypothesis]:
        """The end of the audio: the final of an utterance still open, if any."""
        ...


class Recognizer(Protocol):
    def open_stream(self, rate: int) -> RecognizerStream:
        ...


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)  # 0.1 ms: the times are 10 ms frames, the rest is float noise


def _check_rate(rate: int) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate not in RATES:
        raise ValueError(f"rate must be one of {RATES} Hz, got {rate!r}")
    return rate


def _as_pcm(pcm) -> np.ndarray:
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return np.frombuffer(pcm, dtype=np.int16)
    a = np.asarray(pcm)
    if a.dtype != np.int16 or a.ndim != 1:
        raise ValueError(f"pcm must be 1-D int16 samples, got {a.dtype} with shape {a.shape}")
    return a


# ---- pocketsphinx -------------------------------------------------------------------------------------


def _find_model(model_dir: str) -> tuple[str, str | None, str]:
    """(acoustic model folder, language model file or None, dictionary) inside a CMU Sphinx model folder:
    the acoustic model is the folder holding `mdef` (the folder itself or one below it)."""
    if not os.path.isdir(model_dir):
        raise RecognizerError(f"the pocketsphinx model folder {model_dir} does not exist")
    hmm = model_dir if os.path.isfile(os.path.join(model_dir, "mdef")) else None
    if hmm is None:
        found = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(model_dir, "*", "mdef")))
        if not found:
            raise RecognizerError(f"{model_dir}: no acoustic model (a folder with an `mdef` file) in it")
        hmm = found[0]
    lms = sorted(p for pat in ("*.lm.bin", "*.lm", "*.arpa", "*.lm.DMP") for p in glob.glob(os.path.join(model_dir, pat))
                 if "phone" not in os.path.basename(p))
    dicts = sorted(glob.glob(os.path.join(model_dir, "*.dict")) + glob.glob(os.path.join(model_dir, "*.dic")))
    if not dicts:
        raise RecognizerError(f"{model_dir}: no pronunciation dictionary (*.dict) in it")
    return hmm, (lms[0] if lms else None), dicts[0]


class _DecoderPool:
    """Decoders of one configuration, lent for an utterance each. Thread-safe."""

    def __init__(self, make):
        self._make = make
        self._idle: list = []
        self._lock = threading.Lock()
        self.created = 0
        first = self.acquire()  # at build time: a bad model fails now, not at the first caller's word
        self.initial_cmn = first.get_cmn()
        self.release(first)

    def acquire(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.created += 1
        return self._make()

    def release(self, decoder) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE_DECODERS:
                self._idle.append(decoder)


class PocketsphinxRecognizer:
    """pocketsphinx 5 with the model shipped in its wheel (or `model_dir`); `keywords` switch it from
    transcribing to spotting those phrases."""

    def __init__(self, language: str = "en-us", keywords: tuple[str, ...] | list[str] = (),
                 model_dir: str | None = None):
        try:
            import pocketsphinx
        except ImportError:
            raise RecognizerError("pocketsphinx is not installed: pip install pocketsphinx") from None
        self._ps = pocketsphinx
        self.language = language
        if model_dir is None:
            if language.lower() != "en-us":
                raise RecognizerError(f"pocketsphinx ships only en-us: for {language!r} give a model folder")
            base = pocketsphinx.get_model_path("en-us")
            config = {"hmm": os.path.join(base, "en-us"), "dict": os.path.join(base, "cmudict-en-us.dict"),
                      "lm": os.path.join(base, "en-us.lm.bin")}
        else:
            hmm, lm, dic = _find_model(model_dir)
            config = {"hmm": hmm, "dict": dic, "lm": lm}
        self.keywords = tuple(parse_keyword(k) for k in keywords)
        self._kws_lines = "".join(f"{phrase} /{th if th is not None else DEFAULT_KWS_THRESHOLD:g}/\n"
                                  for phrase, th in self.keywords)
        if self.keywords:
            config.pop("lm")
        elif config["lm"] is None:
            raise RecognizerError(f"{model_dir}: no language model (*.lm.bin, *.lm, *.arpa) to transcribe with; "
                                  "give keywords to spot instead")
        self._config = config
        self._pool = _DecoderPool(self._new_decoder)
        if self.keywords:  # a word the dictionary lacks would be spotted never: say so now
            probe = self._pool.acquire()
            try:
                for phrase, _ in self.keywords:
                    for word in phrase.split():
                        if probe.lookup_word(word) is None:
                            raise RecognizerError(f"keyword {phrase!r}: {word!r} is not in the pronunciation "
                                                  "dictionary")
            finally:
                self._pool.release(probe)

    @property
    def decoders(self) -> int:
        """How many decoders this recognizer has built (the most callers talking at once, at least 1)."""
        return self._pool.created

    def _new_decoder(self):
        kwargs = dict(self._config, loglevel="FATAL")
        path = None
        try:
            if self.keywords:
                fd, path = tempfile.mkstemp(prefix="callbot-kws-", suffix=".txt")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(self._kws_lines)
                kwargs["kws"] = path
            return self._ps.Decoder(**kwargs)
        except (RuntimeError, ValueError) as err:
            raise RecognizerError(f"pocketsphinx could not load its model ({self._config['hmm']}): {err}") from None
        finally:
            if path is not None:
                os.unlink(path)

    def open_stream(self, rate: int) -> PocketsphinxStream:
        return PocketsphinxStream(self._ps, self._pool, _check_rate(rate), spotting=bool(self.keywords))


class PocketsphinxStream:
    """One call's audio through resampling, the endpointer and a pooled decoder per utterance."""

    def __init__(self, ps, pool: _DecoderPool, rate: int, spotting: bool):
        import soxr

        self.rate = rate
        self._pool = pool
        self._spotting = spotting
        # float32, not int16: soxr dithers its int16 output at random (measured: the same input gave 3-7
        # different outputs in 12 runs, samples off by up to 2), and a borderline keyword came and went
        self._resampler = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32") if rate != MODEL_RATE else None
        self._fold = rate == 8000  # only there does the image land exactly on the empty band (4-8 kHz)
        self._out_samples = 0  # 16 kHz samples made so far (the fold's sign follows their parity)
        self._endpointer = ps.Endpointer(window=ENDPOINT_WINDOW_S, ratio=ENDPOINT_RATIO, sample_rate=MODEL_RATE)
        self._frame = self._endpointer.frame_bytes // 2  # samples (30 ms)
        self._pending = np.zeros(0, np.int16)
        self._cmn = pool.initial_cmn  # this caller's cepstral mean, carried from utterance to utterance
        self._decoder = None  # lent while an utterance is open
        self._utt_start_s = 0.0
        self._utt_frames = 0  # 10 ms frames given to the decoder in this utterance
        self._next_partial = 0
        self._last_partial = ""
        self._finished = False

    # -- audio in ----------------------------------------------------------------------------------------

    def feed(self, pcm: np.ndarray) -> list[Hypothesis]:
        if self._finished:
            raise RuntimeError("the stream is finished")
        pcm = _as_pcm(pcm)
        if not len(pcm):
            return []
        return self._frames(self._to_model_rate(pcm, last=False))

    def finish(self) -> list[Hypothesis]:
        if self._finished:
            return []
        out = self._frames(self._to_model_rate(np.zeros(0, np.int16), last=True)) if self._resampler else []
        self._finished = True
        rest, self._pending = self._pending, np.zeros(0, np.int16)
        if self._endpointer.in_speech:
            if not len(rest):  # pocketsphinx 5's end_stream indexes its buffer's first sample: never empty
                rest = np.zeros(1, np.int16)
            speech = self._endpointer.end_stream(rest.tobytes())
            if speech is not None:
                self._speech(speech)
        if self._decoder is not None:
            out.extend(self._end_utterance(self._endpointer.speech_end))
        return out

    def _to_model_rate(self, pcm: np.ndarray, last: bool) -> np.ndarray:
        if self._resampler is None:
            return pcm
        y = self._resampler.resample_chunk(pcm.astype(np.float32), last=last)
        if self._fold and len(y):
            sign = np.ones(len(y), np.float32)
            sign[(1 - self._out_samples % 2)::2] = -1.0  # (-1)^n over the whole stream's samples
            y = y * (1.0 + FOLD_GAIN * sign)
        self._out_samples += len(y)
        return np.clip(np.rint(y), -32768, 32767).astype(np.int16)

    def _frames(self, pcm: np.ndarray) -> list[Hypothesis]:
        buf = np.concatenate([self._pending, pcm]) if len(self._pending) else pcm
        n = self._frame
        whole = len(buf) - len(buf) % n
        out: list[Hypothesis] = []
        ep = self._endpointer
        for i in range(0, whole, n):
            speech = ep.process(buf[i:i + n].tobytes())
            if speech is None:
                continue
            if self._decoder is None:
                self._begin_utterance(ep.speech_start)
            out.extend(self._speech(speech))
            if not ep.in_speech:
                out.extend(self._end_utterance(ep.speech_end))
        self._pending = buf[whole:].copy()
        return out

    # -- utterances --------------------------------------------------------------------------------------

    def _begin_utterance(self, start_s: float) -> None:
        d = self._pool.acquire()
        # Noise statistics from another caller would colour this one: measured, without this call the same
        # utterance scores differently after another on the same decoder. pocketsphinx 5.1 calls it
        # "deprecated and unnecessary" (for one stream per decoder), hence the warning kept quiet.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            d.start_stream()
        d.set_cmn(self._cmn)
        d.start_utt()
        self._decoder = d
        self._utt_start_s = start_s
        self._utt_frames = 0
        self._next_partial = round(PARTIAL_EVERY_S / FRAME_S)
        self._last_partial = ""

    def _speech(self, speech: bytes) -> list[Hypothesis]:
        d = self._decoder
        if d is None:  # end_stream after the final: nothing open
            return []
        d.process_raw(speech, False, False)
        self._utt_frames += len(speech) // 2 / (MODEL_RATE * FRAME_S)
        out: list[Hypothesis] = []
        if self._utt_frames >= self._next_partial:
            self._next_partial = self._utt_frames + round(PARTIAL_EVERY_S / FRAME_S)
            words = self._words()
            text = " ".join(w.text for w in words)
            if text and text != self._last_partial:
                self._last_partial = text
                out.append(Hypothesis(text=text, final=False, start_ms=_ms(self._utt_start_s),
                                      end_ms=_ms(self._utt_start_s + self._utt_frames * FRAME_S), words=words))
        if self._utt_frames * FRAME_S >= MAX_UTTERANCE_S:  # cut: a final now, the speech goes on in a new one
            end_s = self._utt_start_s + self._utt_frames * FRAME_S
            out.extend(self._end_utterance(end_s))
            self._begin_utterance(end_s)
        return out

    def _end_utterance(self, end_s: float) -> list[Hypothesis]:
        d, self._decoder = self._decoder, None
        if d is None:
            return []
        try:
            d.end_utt()
            words = self._words(d)
            self._cmn = d.get_cmn()
        finally:
            self._pool.release(d)
        text = " ".join(w.text for w in words)
        if not text and not self._last_partial:
            return []  # noise with no words, and nobody was told of any
        end_s = max(end_s, self._utt_start_s + self._utt_frames * FRAME_S) if self._utt_frames else end_s
        return [Hypothesis(text=text, final=True, start_ms=_ms(self._utt_start_s), end_ms=_ms(end_s), words=words)]

    def _words(self, d=None) -> tuple[Word, ...]:
        d = d or self._decoder
        out = []
        for s in d.seg() or ():
            w = s.word.strip()
            if not w or w[0] in "<[" or w.startswith("++"):
                continue  # <s>, </s>, <sil>, [NOISE], ++UH++: not words
            t0 = self._utt_start_s + s.start_frame * FRAME_S
            t1 = self._utt_start_s + (s.end_frame + 1) * FRAME_S  # end_frame is inclusive
            out.append(Word(text=_ALT.sub("", w), start_ms=_ms(t0), end_ms=_ms(t1)))
        return tuple(out)


# ---- vosk ---------------------------------------------------------------------------------------------


class VoskRecognizer:
    """Vosk (`pip install vosk`) with a model folder the user downloaded: many languages, telephone (8 kHz)
    models, far better transcripts than pocketsphinx. Kaldi resamples to the model's rate itself.
    `keywords` become the recognizer's grammar (those words and "[unk]"). Built here without a model in
    the tests: only its errors are tested (docs/speech.md)."""

    def __init__(self, model_dir: str, keywords: tuple[str, ...] | list[str] = ()):
        if not os.path.isdir(model_dir):
            raise RecognizerError(f"the Vosk model folder {model_dir} does not exist "
                                  "(models: https://alphacephei.com/vosk/models)")
        try:
            import vosk  # type: ignore[import-not-found]
        except ImportError:
            raise RecognizerError("vosk is not installed: pip install vosk") from None
        vosk.SetLogLevel(-1)
        try:
            self._model = vosk.Model(model_dir)
        except Exception as err:
            raise RecognizerError(f"vosk could not load the model {model_dir}: {err}") from None
        self._vosk = vosk
        self._grammar = (json.dumps([parse_keyword(k)[0] for k in keywords] + ["[unk]"])
                         if keywords else None)

    def open_stream(self, rate: int) -> VoskStream:
        rate = _check_rate(rate)
        if self._grammar is not None:
            rec = self._vosk.KaldiRecognizer(self._model, rate, self._grammar)
        else:
            rec = self._vosk.KaldiRecognizer(self._model, rate)
        rec.SetWords(True)
        return VoskStream(rec, rate)


class VoskStream:
    def __init__(self, rec, rate: int):
        self._rec = rec
        self.rate = rate
        self._samples = 0
        self._next_partial = int(PARTIAL_EVERY_S * rate)
        self._last_partial = ""
        self._utt_start_ms: float | None = None

    def feed(self, pcm: np.ndarray) -> list[Hypothesis]:
        pcm = _as_pcm(pcm)
        self._samples += len(pcm)
        if self._rec.AcceptWaveform(pcm.tobytes()):
            return self._final(self._rec.Result())
        if self._samples < self._next_partial:
            return []
        self._next_partial = self._samples + int(PARTIAL_EVERY_S * self.rate)
        text = json.loads(self._rec.PartialResult()).get("partial", "").strip()
        if not text or text == self._last_partial:
            return []
        self._last_partial = text
        now = self._samples * 1000.0 / self.rate
        if self._utt_start_ms is None:
            self._utt_start_ms = max(0.0, now - PARTIAL_EVERY_S * 1000.0)
        return [Hypothesis(text=text, final=False, start_ms=self._utt_start_ms, end_ms=now)]

    def finish(self) -> list[Hypothesis]:
        return self._final(self._rec.FinalResult())

    def _final(self, result: str) -> list[Hypothesis]:
        r = json.loads(result)
        words = tuple(Word(text=w["word"], start_ms=w["start"] * 1000.0, end_ms=w["end"] * 1000.0)
                      for w in r.get("result", ()) if w.get("word") != "[unk]")
        text = " ".join(w.text for w in words) or r.get("text", "").strip()
        had_partial, self._last_partial = bool(self._last_partial), ""
        start = words[0].start_ms if words else (self._utt_start_ms or 0.0)
        self._utt_start_ms = None
        if not text and not had_partial:
            return []
        end = words[-1].end_ms if words else self._samples * 1000.0 / self.rate
        return [Hypothesis(text=text, final=True, start_ms=start, end_ms=end, words=words)]


def build_recognizer(settings: RecognizerSettings) -> PocketsphinxRecognizer | VoskRecognizer | None:
    """The configured recognizer, its model loaded now (RecognizerError if it cannot be); None for "none"."""
    if settings.engine == "none":
        return None
    if settings.engine == "vosk":
        assert settings.model is not None  # RecognizerSettings checks it
        return VoskRecognizer(settings.model, keywords=settings.keywords)
    return PocketsphinxRecognizer(language=settings.language, keywords=settings.keywords, model_dir=settings.model)
