"""The caller recognizer (speech/recognizer.py) on real speech: espeak-ng's sentences, written to WAV files
at a call's rates (8 and 16 kHz) and fed back in the recorder's 100 ms chunks.

The voice is espeak-ng's en-us+klatt2: of espeak's voices it is the one pocketsphinx's en-us model hears
best (docs/speech.md has what comes back for each); the plain en-us voice is mostly misheard in
transcripts. What is asserted is what holds with margin: keyword spotting finds "agent" at both rates,
the transcript of the 16 kHz sentence has it, word times lie in the speech, silence gives nothing.
"""
from __future__ import annotations

import wave

import numpy as np
import pytest
import soxr

from callbot.speech import recognizer as rec
from callbot.speech.recognizer import (Hypothesis, PocketsphinxRecognizer, RecognizerError, VoskRecognizer,
                                       build_recognizer)
from callbot.speech.settings import RecognizerSettings
from callbot.speech.tts import EspeakTts

VOICE = "en-us+klatt2"
LEAD_S, TAIL_S = 0.5, 1.0  # silence before and after the sentence, as a caller's line has
SLACK_MS = 100.0  # the endpointer's 30 ms frames and the decoder's 10 ms frames round the times


@pytest.fixture(scope="module")
def tts():
    return EspeakTts(voice=VOICE)


@pytest.fixture(scope="module")
def transcriber():
    return PocketsphinxRecognizer()


@pytest.fixture(scope="module")
def spotter():
    return PocketsphinxRecognizer(keywords=("agent", "sales", "operator"))


def call_audio(tts, tmp_path, text: str, rate: int) -> tuple[np.ndarray, float, float]:
    """The sentence as a call would carry it: silence, speech, silence at `rate`, through a WAV file.
    Returns the samples and the speech's start and end in ms."""
    speech, espeak_rate = tts.synthesize(text)
    speech = soxr.resample(speech, espeak_rate, rate).astype(np.int16)
    lead, tail = np.zeros(int(LEAD_S * rate), np.int16), np.zeros(int(TAIL_S * rate), np.int16)
    path = tmp_path / f"{rate}.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.concatenate([lead, speech, tail]).tobytes())
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == rate
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    return pcm, LEAD_S * 1000.0, (LEAD_S + len(speech) / rate) * 1000.0


def run(stream, pcm: np.ndarray, rate: int, chunk_s: float = 0.1) -> list[Hypothesis]:
    n = int(rate * chunk_s)
    out: list[Hypothesis] = []
    for i in range(0, len(pcm), n):
        out += stream.feed(pcm[i:i + n])
    return out + stream.finish()


def finals(hyps):
    return [h for h in hyps if h.final]


def assert_words_in(h: Hypothesis, start_ms: float, end_ms: float) -> None:
    assert h.words, h
    for w in h.words:
        assert start_ms - SLACK_MS <= w.start_ms < w.end_ms <= end_ms + SLACK_MS, (w, start_ms, end_ms)
    assert all(a.end_ms <= b.start_ms for a, b in zip(h.words, h.words[1:]))
    assert h.start_ms <= h.words[0].start_ms and h.words[-1].end_ms <= h.end_ms


@pytest.mark.parametrize("rate", [8000, 16000])
def test_keyword_spotting_finds_agent_with_its_time(spotter, tts, tmp_path, rate):
    pcm, start, end = call_audio(tts, tmp_path, "I want to talk to an agent", rate)
    hyps = run(spotter.open_stream(rate), pcm, rate)
    (final,) = finals(hyps)
    assert final.text == "agent"
    assert_words_in(final, start, end)
    assert final.words[0].start_ms > start + 800  # the sentence's last word, not its first
    assert hyps[-1] is final  # partials come before their final


@pytest.mark.parametrize("rate", [8000, 16000])
def test_keyword_spotting_stays_quiet_when_no_keyword_is_said(spotter, tts, tmp_path, rate):
    pcm, _, _ = call_audio(tts, tmp_path, "My account number is one two three four", rate)
    assert run(spotter.open_stream(rate), pcm, rate) == []


def test_the_transcript_at_16_khz_has_the_words_and_their_times(transcriber, tts, tmp_path):
    pcm, start, end = call_audio(tts, tmp_path, "I want to talk to an agent", 16000)
    hyps = run(transcriber.open_stream(16000), pcm, 16000)
    (final,) = finals(hyps)
    words = [w.text for w in final.words]
    assert "agent" in words and "want" in words, final.text
    assert final.text == " ".join(words)
    assert_words_in(final, start, end)
    partials = [h for h in hyps if not h.final]
    assert partials, "a 2 s sentence gives partials before its final"
    # at most one look every 0.5 s of speech
    assert all(b.end_ms - a.end_ms >= 500 for a, b in zip(partials, partials[1:]))


def test_the_transcript_at_8_khz_has_words_in_the_speech(transcriber, tts, tmp_path):
    pcm, start, end = call_audio(tts, tmp_path, "Yes", 8000)
    (final,) = finals(run(transcriber.open_stream(8000), pcm, 8000))
    assert final.text == "yes"
    assert_words_in(final, start, end)
    pcm, start, end = call_audio(tts, tmp_path, "I want to talk to an agent", 8000)
    (final,) = finals(run(transcriber.open_stream(8000), pcm, 8000))
    assert len(final.words) >= 4
    assert_words_in(final, start, end)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_silence_and_faint_noise_give_no_words(transcriber, spotter, rate):
    rng = np.random.default_rng(7)
    quiet = np.concatenate([np.zeros(2 * rate, np.int16),
                            (rng.standard_normal(3 * rate) * 30).astype(np.int16)])  # ~-60 dBFS hiss
    assert run(transcriber.open_stream(rate), quiet, rate) == []
    assert run(spotter.open_stream(rate), quiet, rate) == []


def test_two_utterances_give_two_finals_on_one_timeline(transcriber, tts, tmp_path):
    yes, s1, e1 = call_audio(tts, tmp_path, "Yes", 16000)
    agent, s2, e2 = call_audio(tts, tmp_path, "I want to talk to an agent", 16000)
    offset = len(yes) / 16.0  # ms: the second sentence's times come after the whole first recording
    first, second = finals(run(transcriber.open_stream(16000), np.concatenate([yes, agent]), 16000))
    assert first.text == "yes"
    assert_words_in(first, s1, e1)
    assert "agent" in second.text
    assert_words_in(second, s2 + offset, e2 + offset)


def test_the_chunk_size_does_not_change_the_result(spotter, tts, tmp_path):
    pcm, _, _ = call_audio(tts, tmp_path, "I would like to speak to a human agent please", 8000)
    by_100ms = finals(run(spotter.open_stream(8000), pcm, 8000, chunk_s=0.1))
    by_20ms = finals(run(spotter.open_stream(8000), pcm, 8000, chunk_s=0.02))
    assert by_100ms == by_20ms and "agent" in by_100ms[0].text


def test_streams_talking_at_once_borrow_their_own_decoders_and_match_streams_alone(tts, tmp_path):
    recognizer = PocketsphinxRecognizer(keywords=("agent",))
    a, _, _ = call_audio(tts, tmp_path, "I want to talk to an agent", 8000)
    b, _, _ = call_audio(tts, tmp_path, "Can I have an agent", 16000)
    alone_a = finals(run(recognizer.open_stream(8000), a, 8000))
    alone_b = finals(run(recognizer.open_stream(16000), b, 16000))
    sa, sb = recognizer.open_stream(8000), recognizer.open_stream(16000)
    got_a, got_b = [], []
    for i in range(max(len(a) // 800, len(b) // 1600) + 1):  # 100 ms of each, in turn
        got_a += sa.feed(a[i * 800:(i + 1) * 800]) if i * 800 < len(a) else []
        got_b += sb.feed(b[i * 1600:(i + 1) * 1600]) if i * 1600 < len(b) else []
    got_a += sa.finish()
    got_b += sb.finish()
    assert finals(got_a) == alone_a and finals(got_b) == alone_b
    assert recognizer.decoders == 2  # both spoke at once; alone, one was enough


def test_a_long_stretch_of_speech_is_cut_into_finals(transcriber, tts, tmp_path, monkeypatch):
    monkeypatch.setattr(rec, "MAX_UTTERANCE_S", 1.0)  # 20 s in production: a sentence shows the cut
    pcm, start, end = call_audio(tts, tmp_path, "I would like to speak to a human agent please", 16000)
    cut = finals(run(transcriber.open_stream(16000), pcm, 16000))
    assert len(cut) >= 2
    assert all(h.end_ms - h.start_ms <= 1000.0 + SLACK_MS for h in cut[:-1])
    assert all(a.end_ms <= b.start_ms + 1e-6 for a, b in zip(cut, cut[1:]))


def test_mistakes_are_errors_at_build_or_open(transcriber, tmp_path):
    with pytest.raises(ValueError, match="rate must be one of"):
        transcriber.open_stream(7000)
    with pytest.raises(ValueError, match="int16"):
        transcriber.open_stream(8000).feed(np.zeros(10, np.float32))
    with pytest.raises(RecognizerError, match="'zzyzxq' is not in the pronunciation dictionary"):
        PocketsphinxRecognizer(keywords=("zzyzxq",))
    with pytest.raises(RecognizerError, match="ships only en-us"):
        PocketsphinxRecognizer(language="de")
    with pytest.raises(RecognizerError, match="does not exist"):
        PocketsphinxRecognizer(model_dir=str(tmp_path / "nowhere"))
    with pytest.raises(RecognizerError, match="no acoustic model"):
        PocketsphinxRecognizer(model_dir=str(tmp_path))
    assert build_recognizer(RecognizerSettings(engine="none")) is None


def test_vosk_errors_say_what_to_do(tmp_path):
    # recognition itself needs a Vosk model (50 MB and up, the user's download): not run here
    with pytest.raises(RecognizerError, match="does not exist.*alphacephei"):
        VoskRecognizer(str(tmp_path / "nowhere"))
    try:
        import vosk  # noqa: F401
    except ImportError:
        with pytest.raises(RecognizerError, match="pip install vosk"):
            build_recognizer(RecognizerSettings(engine="vosk", model=str(tmp_path)))
    else:
        with pytest.raises(RecognizerError, match="could not load"):
            build_recognizer(RecognizerSettings(engine="vosk", model=str(tmp_path)))


def test_a_stream_ending_in_speech_on_a_frame_boundary_finishes(transcriber):
    """A stream whose audio ends mid-utterance exactly on a frame boundary (nothing pending) finishes
    cleanly: pocketsphinx's end_stream fails on an empty buffer (seen on a caller's steady tone)."""
    rate = 16000
    t = np.arange(rate * 3) / rate
    tone = (8000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    stream = transcriber.open_stream(rate)
    frame = stream._frame
    cut = len(tone) - len(tone) % frame
    for i in range(0, cut, frame):
        stream.feed(tone[i:i + frame])
    assert stream._endpointer.in_speech and not len(stream._pending)
    stream.finish()  # no IndexError
