"""The speech settings (speech/settings.py): defaults, and each mistake refused with its reason."""
from __future__ import annotations

import msgspec
import pytest

from callbot.speech.settings import RecognizerSettings, TtsSettings, parse_keyword


@pytest.mark.parametrize("bad, words", [
    ({"speed_wpm": 10}, "speed_wpm must be 80..450"),
    ({"voice": "-x"}, "not an espeak-ng voice name"),
    ({"engine": "piper"}, "needs model"),
    ({"model": "v.onnx"}, "set engine = \"piper\""),
    ({"cache_items": -1}, "cache_items must be >= 0"),
    ({"bogus": 1}, "unknown field `bogus`"),
])
def test_tts_settings_refuse_mistakes(bad, words):
    with pytest.raises(msgspec.ValidationError, match=words):
        msgspec.convert(bad, TtsSettings)


@pytest.mark.parametrize("bad, words", [
    ({"engine": "vosk"}, "needs model"),
    ({"language": "de"}, "ships only en-us"),
    ({"keywords": ["agent /x/"]}, "threshold like /1e-30/"),
    ({"engine": "whisper"}, "Invalid enum value .whisper."),
])
def test_recognizer_settings_refuse_mistakes(bad, words):
    with pytest.raises(msgspec.ValidationError, match=words):
        msgspec.convert(bad, RecognizerSettings)


def test_settings_defaults_and_direct_errors():
    assert TtsSettings() == TtsSettings(engine="espeak", voice="en-us", speed_wpm=165, cache_items=256)
    r = RecognizerSettings(keywords=("agent", "talk to a human /1e-40/"))
    assert r.engine == "pocketsphinx" and r.process
    with pytest.raises(ValueError, match="speed_wpm"):
        TtsSettings(speed_wpm=1000)


def test_keywords_parse_into_phrase_and_threshold():
    assert parse_keyword("Talk to an Agent /1e-40/") == ("talk to an agent", 1e-40)
    assert parse_keyword(" agent ") == ("agent", None)
