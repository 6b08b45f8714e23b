"""Transcripts and PII redaction (analytics/transcript.py, redact.py, sentiment.py): the bot's words from the
model's text pieces with frame times, the caller's from the live recognizer's events, turns, an events
file cut short by a crash, every kind of PII in spoken form, a redacted copy of a recording, VADER's
sign on clearly negative and positive turns, and the Whisper engine's errors (no model in the tests)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from callbot.analytics.redact import find_pii, luhn_ok, redact_words, silence_spans
from callbot.analytics.result import Turn, Word
from callbot.analytics.sentiment import SentimentScorer, by_quarter, score_turns
from callbot.analytics.transcript import (StreamTranscriber, TranscriptError, WhisperTranscriber, align_utterance,
                                          bot_pieces, bot_words, build_turns, live_caller_words, read_events,
                                          speech_event_segments, spread_words)
from callbot.analytics.wavfile import WavError, read_wav, write_wav


def words(leg, text, start=0.0, step=300.0):
    return [Word(leg=leg, start_ms=start + i * step, end_ms=start + i * step + 250, text=t)
            for i, t in enumerate(text.split())]


def test_bot_words_join_pieces_into_words_with_frame_times():
    pieces = [(80.0, " Hel"), (160.0, "lo"), (240.0, ","), (400.0, " how"), (480.0, " are you"), (560.0, "?"),
              (720.0, " fine ")]
    got = bot_words(pieces)
    assert [(w.text, w.start_ms, w.end_ms) for w in got] == [
        ("Hello,", 80.0, 320.0), ("how", 400.0, 480.0), ("are", 480.0, 560.0), ("you?", 480.0, 640.0),
        ("fine", 720.0, 800.0)]
    assert all(w.leg == "bot" for w in got)


def test_bot_pieces_come_from_events_or_else_from_the_records_summary():
    events = [{"ts": "2026-12-03T05:34:33.361+00:00", "event": "BotText", "call_id": "c", "t_ms": 80.0, "piece": " hi"},
              {"event": "BotSpeech", "call_id": "c", "t_ms": 0, "speaking": True},
              {"event": "BotText", "call_id": "c", "t_ms": "soon", "piece": " no"},  # does not fit the contract
              {"event": "BotText", "call_id": "c", "t_ms": 90.0}]
    assert bot_pieces(events) == [(80.0, " hi")]
    record = {"engine": {"text": [{"t_ms": 160.0, "piece": " there"}]}}
    assert bot_pieces([], record) == [(160.0, " there")]
    assert bot_pieces(events, record) == [(80.0, " hi")]


def test_caller_words_from_the_live_recognizers_finals_spread_by_length():
    events = [
        {"event": "CallerWords", "call_id": "c", "t_ms": 900, "text": "i want", "final": False, "start_ms": 0.0,
         "end_ms": 900.0},
        {"event": "CallerWords", "call_id": "c", "t_ms": 1000, "text": "i want an agent", "final": True,
         "start_ms": 0.0, "end_ms": 1600.0},
    ]
    got = live_caller_words(events)
    assert [w.text for w in got] == ["i", "want", "an", "agent"]
    assert got[0].start_ms == 0.0 and got[-1].end_ms == 1600.0
    assert [w.end_ms - w.start_ms for w in got] == pytest.approx([200.0, 500.0, 300.0, 600.0], abs=0.2)
    record = {"caller_text": [{"start_ms": 100.0, "end_ms": 500.0, "text": "yes"}]}
    assert [(w.text, w.start_ms, w.end_ms) for w in live_caller_words([], record)] == [("yes", 100.0, 500.0)]
    assert spread_words("  ", 0, 100, "caller") == []


def test_live_utterances_are_moved_onto_the_callers_speech():
    events = [{"event": "CallerWords", "call_id": "c", "t_ms": 2300, "text": "i want an agent", "final": True,
               "start_ms": 1300.0, "end_ms": 2300.0}]
    speech = [(0.0, 500.0), (1000.0, 1500.0), (1700.0, 2000.0), (5000.0, 6000.0)]
    got = live_caller_words(events, None, speech)
    assert (got[0].start_ms, got[-1].end_ms) == (1000.0, 2000.0)
    assert align_utterance(3000.0, 4000.0, speech) == (3000.0, 4000.0)  # no speech near: as reported


def test_segments_from_the_engines_speech_events_when_the_recording_is_lost():
    events = [{"event": "BotSpeech", "call_id": "c", "t_ms": 100.0, "speaking": True},
              {"event": "CallerSpeech", "call_id": "c", "t_ms": 900.0, "speaking": True},
              {"event": "BotSpeech", "call_id": "c", "t_ms": 1500.0, "speaking": False},
              {"event": "CallerSpeech", "call_id": "c", "t_ms": 2500.0, "speaking": False},
              {"event": "BotSpeech", "call_id": "c", "t_ms": 3000.0, "speaking": True}]
    got = speech_event_segments(events, 4000.0)
    assert [(s.leg, s.start_ms, s.end_ms) for s in got] == [("bot", 100.0, 1500.0), ("caller", 900.0, 2500.0),
                                                            ("bot", 3000.0, 4000.0)]


def test_an_events_file_cut_short_by_a_crash_reads_up_to_the_cut(tmp_path):
    path = tmp_path / "call.events.jsonl"
    good = {"event": "BotText", "t_ms": 80.0, "piece": " hi", "call_id": "c"}
    path.write_bytes(json.dumps(good).encode() + b"\n[1]\n" + b'{"event": "BotText", "t_m')
    events, bad = read_events(path)
    assert events == [good] and bad == 2


def test_turns_split_where_the_other_leg_speaks_or_after_a_long_silence():
    ws = words("bot", "hello there", 0) + words("caller", "hi", 700) + words("caller", "are you", 3000) \
        + words("bot", "yes", 3700)
    turns = build_turns(ws)
    assert [(t.leg, t.text) for t in turns] == [("bot", "hello there"), ("caller", "hi"), ("caller", "are you"),
                                                ("bot", "yes")]
    assert (turns[0].start_ms, turns[0].end_ms) == (0.0, 550.0)


@pytest.mark.parametrize("spoken, kind", [
    ("my card is four one one one one one one one one one one one one one one one thanks", "card"),
    ("card 4111 1111 1111 1111 thanks", "card"),
    ("it is four one one one one one one one one one one one one one one two thanks", "number"),  # fails Luhn
    ("call me on five five five one two three four please", "phone"),
    ("call me on +34 612 345 678 please", "phone"),
    ("my email is john.doe@example.com ok", "email"),
    ("my email is john at example dot com ok", "email"),
    ("my email is john at mail dot example dot co dot uk ok", "email"),
    ("my iban is GB82WEST12345698765432 ok", "iban"),
    ("my id is X1234567Z ok", "id"),
    ("social security 123-45-6789 ok", "phone"),  # 9 digits: redacted, named by its length
])
def test_pii_is_found_in_spoken_form(spoken, kind):
    ws = words("caller", spoken)
    found = find_pii(ws)
    assert [k for _, _, k in found] == [kind], found
    out = redact_words(ws)
    assert [w.text for w in out if w.redacted] == [f"[{kind}]"]
    kept = " ".join(w.text for w in out)
    assert kept.startswith(spoken.split()[0]) and kept.endswith(spoken.split()[-1])
    a, b, _ = found[0]
    red = next(w for w in out if w.redacted)
    assert (red.start_ms, red.end_ms) == (ws[a].start_ms, ws[b - 1].end_ms)


@pytest.mark.parametrize("plain", ["i have two cats and one dog", "look at that dot there", "call me at five",
                                   "room 12345 please", "the year 2024 was good"])
def test_ordinary_words_are_left_alone(plain):
    assert find_pii(words("caller", plain)) == []


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


def test_redaction_keeps_legs_apart():
    ws = words("caller", "five five", 0) + words("bot", "five five five one", 300) + words("caller", "two three", 600)
    out = redact_words(ws)
    # the caller's "five five ... two three" is interleaved in time with the bot's digits, but runs are per leg:
    # the caller said 4 digits (not PII), the bot 4 (not PII)
    assert not any(w.redacted for w in out) and len(out) == len(ws)


def test_a_redacted_copy_is_silent_there_on_that_leg_only(tmp_path):
    rate = 16000
    rng = np.random.default_rng(1)
    samples = (rng.standard_normal((rate * 3, 2)) * 3000).astype(np.int16)
    ws = [Word(leg="caller", start_ms=1000, end_ms=1500, text="[card]", redacted=True),
          Word(leg="caller", start_ms=2000, end_ms=2200, text="hello")]
    out = silence_spans(samples, rate, ws, pad_ms=100)
    assert not out[int(0.9 * rate):int(1.6 * rate), 0].any()
    assert np.array_equal(out[:, 1], samples[:, 1])
    assert np.array_equal(out[:int(0.9 * rate), 0], samples[:int(0.9 * rate), 0])
    assert np.array_equal(out[int(1.6 * rate) + 1:, 0], samples[int(1.6 * rate) + 1:, 0])
    write_wav(tmp_path / "r.wav", rate, out)
    assert read_wav(tmp_path / "r.wav")[1].tolist() == out.tolist()


def test_read_wav_takes_what_a_crash_left_and_refuses_what_is_not_a_wav(tmp_path):
    rate = 8000
    samples = (np.arange(800).reshape(400, 2) % 100).astype(np.int16)
    write_wav(tmp_path / "a.wav", rate, samples)
    data = (tmp_path / "a.wav").read_bytes()
    # a header that covers less than the file holds, and half a frame at the end
    short = bytearray(data)
    short[40:44] = (400).to_bytes(4, "little")
    (tmp_path / "b.wav").write_bytes(bytes(short) + b"\x01")
    got_rate, got = read_wav(tmp_path / "b.wav")
    assert got_rate == rate and got.tolist() == samples.tolist()
    (tmp_path / "c.wav").write_bytes(b"not a wav at all")
    with pytest.raises(WavError, match="not a RIFF/WAVE"):
        read_wav(tmp_path / "c.wav")
    with pytest.raises(WavError, match="cannot be read"):
        read_wav(tmp_path / "none.wav")


def test_sentiment_sign_of_clearly_negative_and_positive_turns():
    s = SentimentScorer()
    assert s.score("this is awful, i hate this, terrible service") < -0.5
    assert s.score("wonderful, thank you so much, you were very helpful") > 0.5
    assert s.score("[card]") is None
    turns = [Turn(leg="caller", start_ms=0, end_ms=1, text="this is terrible"),
             Turn(leg="caller", start_ms=9000, end_ms=9100, text="great, thanks a lot")]
    scored = score_turns(turns, "en-us", s)
    assert scored[0].sentiment < 0 < scored[1].sentiment
    assert by_quarter(scored, "caller", 10000.0) == [scored[0].sentiment, None, None, scored[1].sentiment]
    # no Spanish lexicon: None, never a number from the English one
    assert [t.sentiment for t in score_turns([Turn(leg="caller", start_ms=0, end_ms=1, text="esto es terrible")],
                                             "es", s)] == [None]


def test_the_whisper_engine_says_in_one_line_what_is_missing(tmp_path):
    with pytest.raises(TranscriptError, match="does not exist"):
        WhisperTranscriber(str(tmp_path / "no-model"))
    if importlib.util.find_spec("faster_whisper") is None:
        with pytest.raises(TranscriptError, match="pip install faster-whisper"):
            WhisperTranscriber(str(tmp_path))
    with pytest.raises(TranscriptError, match="no streaming recognizer"):
        StreamTranscriber(object())
