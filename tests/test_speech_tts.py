"""Text to speech (speech/tts.py): espeak-ng for real, the cache around it, the errors.

espeak-ng is a system package (.ci/run's APT_PACKAGES). Piper's synthesis needs a voice file (tens of
MB, the user's choice), so only its error paths are tested here.
"""
from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest

from callbot.speech.settings import TtsSettings
from callbot.speech.tts import CachedTts, EspeakTts, PiperTts, TtsError, build_tts

SENTENCE = "I want to talk to an agent"


class CountingTts:
    """The real engine, with its calls counted (a wrapper, not a mock: the audio is espeak-ng's)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.cache_key = inner.cache_key
        self._lock = threading.Lock()

    def synthesize(self, text):
        with self._lock:
            self.calls += 1
        return self.inner.synthesize(text)


def seconds(clip) -> float:
    samples, rate = clip
    return len(samples) / rate


def test_espeak_speaks_int16_mono_of_a_plausible_length():
    samples, rate = EspeakTts().synthesize(SENTENCE)
    assert samples.dtype == np.int16 and samples.ndim == 1
    assert rate == 22050  # espeak-ng's own rate; the caller resamples to the call's
    # 7 words at 165 words a minute: ~2.5 s, give or take espeak's pauses
    assert 1.5 < len(samples) / rate < 4.0
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 300  # speech, not silence
    longer = EspeakTts().synthesize(SENTENCE + ", and then I want to hear about my invoice please")
    assert seconds(longer) > len(samples) / rate + 1.0


def test_speed_changes_the_length():
    slow = EspeakTts(speed_wpm=100).synthesize(SENTENCE)
    fast = EspeakTts(speed_wpm=300).synthesize(SENTENCE)
    assert seconds(slow) > 2 * seconds(fast)


def test_a_text_that_looks_like_an_option_is_spoken_not_obeyed():
    # the text goes on stdin: "-v xx" is words, not espeak-ng's voice option
    samples, rate = EspeakTts().synthesize("-v xx --version")
    assert len(samples) / rate > 0.5


def test_no_text_is_an_error():
    with pytest.raises(ValueError, match="no text"):
        EspeakTts().synthesize("   ")


def test_the_cache_returns_the_same_array_without_running_espeak_again():
    engine = CountingTts(EspeakTts())
    tts = CachedTts(engine, max_items=8)
    first = tts.synthesize(SENTENCE)
    again = tts.synthesize(SENTENCE)
    assert engine.calls == 1
    assert again[0] is first[0] and again[1] == first[1]
    assert not first[0].flags.writeable  # shared between calls: nobody may change it
    tts.synthesize("Goodbye")
    assert engine.calls == 2


def test_the_memory_cache_forgets_the_least_recently_used():
    engine = CountingTts(EspeakTts())
    tts = CachedTts(engine, max_items=2)
    for text in ("one", "two", "one", "three"):  # "two" is the least recently used when "three" comes
        tts.synthesize(text)
    assert engine.calls == 3
    tts.synthesize("one")
    assert engine.calls == 3
    tts.synthesize("two")
    assert engine.calls == 4


def test_threads_asking_for_one_new_text_wait_for_one_synthesis():
    engine = CountingTts(EspeakTts())
    tts = CachedTts(engine)
    results = [None] * 8
    start = threading.Barrier(len(results))

    def ask(i):
        start.wait()
        results[i] = tts.synthesize(SENTENCE)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert engine.calls == 1
    assert all(r is not None and r[0] is results[0][0] for r in results)


def test_the_disk_cache_survives_a_new_instance_and_knows_the_voice(tmp_path):
    first = CachedTts(CountingTts(EspeakTts()), directory=tmp_path)
    samples, rate = first.synthesize(SENTENCE)
    assert len(list(tmp_path.glob("*.wav"))) == 1
    engine = CountingTts(EspeakTts())
    second = CachedTts(engine, directory=tmp_path)  # a restart: memory empty, files there
    again, again_rate = second.synthesize(SENTENCE)
    assert engine.calls == 0
    assert again_rate == rate and np.array_equal(again, samples)
    other_voice = CountingTts(EspeakTts(voice="en-us+klatt2"))
    CachedTts(other_voice, directory=tmp_path).synthesize(SENTENCE)
    assert other_voice.calls == 1  # the key holds the voice: never the old voice's clip
    assert len(list(tmp_path.glob("*.wav"))) == 2


def test_a_damaged_cache_file_is_made_again(tmp_path):
    CachedTts(EspeakTts(), directory=tmp_path).synthesize(SENTENCE)
    (path,) = tmp_path.glob("*.wav")
    path.write_bytes(b"RIFF")
    engine = CountingTts(EspeakTts())
    samples, _ = CachedTts(engine, directory=tmp_path).synthesize(SENTENCE)
    assert engine.calls == 1 and len(samples) > 10000
    assert path.stat().st_size > 10000


def test_a_missing_espeak_names_the_package():
    with pytest.raises(TtsError, match=r"not found.*apt install espeak-ng.*brew install espeak-ng"):
        EspeakTts(executable="espeak-ng-not-installed-here").synthesize("hello")


def test_an_unknown_voice_fails_at_build_time():
    with pytest.raises(TtsError, match="does not know the voice 'xx-nowhere'"):
        build_tts(TtsSettings(voice="xx-nowhere"))


def test_build_tts_gives_a_checked_cached_engine(tmp_path):
    tts = build_tts(TtsSettings(voice="en-us", speed_wpm=180, cache_dir=str(tmp_path / "clips"), cache_items=4))
    assert isinstance(tts, CachedTts) and tts.max_items == 4
    samples, rate = tts.synthesize("Hello")
    assert len(samples) > 0 and (tmp_path / "clips").is_dir()


def test_piper_errors_say_what_to_do(tmp_path):
    with pytest.raises(TtsError, match="piper voice file not found"):
        PiperTts(str(tmp_path / "nowhere.onnx"))
    voice = tmp_path / "voice.onnx"
    voice.write_bytes(b"not an onnx model")
    with pytest.raises(TtsError, match="config not found"):
        PiperTts(str(voice))
    (tmp_path / "voice.onnx.json").write_text("{}")
    if importlib.util.find_spec("piper") is None:
        with pytest.raises(TtsError, match="pip install piper-tts"):
            PiperTts(str(voice))
    else:
        with pytest.raises(TtsError, match="could not load"):
            PiperTts(str(voice))
