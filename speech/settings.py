"""What the configuration file says about speech: the `[tts]` and `[recognizer]` tables as frozen Structs.

Why here and not in the app's settings: the engines (speech/tts.py, speech/recognizer.py) are built from
these and nothing else, and a flow test or a tool can build them without the app. The app's config
loader embeds them; each check is a ValueError raised in `__post_init__`, so msgspec reports it with
its path (`$.tts.speed_wpm`) and a direct construction gets a plain ValueError with the same words.
"""
from __future__ import annotations

import re
from typing import Literal

import msgspec

# espeak-ng takes 80..450 words a minute ("-s"); outside that it clamps silently, which reads as a typo
SPEED_WPM_MIN, SPEED_WPM_MAX = 80, 450
# a voice name goes on espeak-ng's command line: letters, digits and + - _ / only (no option, no path tricks)
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9+_/-]{0,63}")
# a keyword is lower-case words, optionally followed by pocketsphinx's detection threshold: "agent /1e-30/"
_KEYWORD = re.compile(r"([^\s/]+(?: [^\s/]+)*)(?: /(1e-\d{1,3})/)?")
POCKETSPHINX_LANGUAGES = ("en-us",)  # the models inside the pocketsphinx wheel


class _Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class TtsSettings(_Settings):
    """Text to speech for flow prompts (`say`).

    engine: "espeak" (espeak-ng, from Debian/Homebrew: nothing to download) or "piper" (piper-tts from
    PyPI and a voice file `model` (.onnx, with its .onnx.json beside it) that the user supplies).
    voice / speed_wpm: espeak-ng's `-v` and `-s` (ignored by piper: the voice file is the voice).
    cache_dir: where synthesized clips are kept as WAV files across restarts (None: memory only);
    cache_items: how many clips the memory cache holds (0: none).
    """

    engine: Literal["espeak", "piper"] = "espeak"
    voice: str = "en-us"
    speed_wpm: int = 165
    model: str | None = None
    cache_dir: str | None = None
    cache_items: int = 256

    def __post_init__(self) -> None:
        if not _VOICE.fullmatch(self.voice):
            raise ValueError(f"voice {self.voice!r} is not an espeak-ng voice name (like en-us, de, en-us+klatt2)")
        if not SPEED_WPM_MIN <= self.speed_wpm <= SPEED_WPM_MAX:
            raise ValueError(f"speed_wpm must be {SPEED_WPM_MIN}..{SPEED_WPM_MAX} words a minute, got {self.speed_wpm}")
        if self.engine == "piper" and not self.model:
            raise ValueError("engine \"piper\" needs model = the path of a piper voice file (.onnx)")
        if self.engine == "espeak" and self.model is not None:
            raise ValueError("model is the piper voice file: set engine = \"piper\" to use it")
        if self.cache_items < 0:
            raise ValueError(f"cache_items must be >= 0 (0: no memory cache), got {self.cache_items}")
        if self.cache_dir is not None and not self.cache_dir.strip():
            raise ValueError("cache_dir is empty: leave it out for a memory-only cache")


class RecognizerSettings(_Settings):
    """The recognizer on the caller's leg (flows' `on_caller_said`, the caller transcript).

    engine: "pocketsphinx" (its en-us model ships in the wheel), "vosk" (`model` = a Vosk model folder
    the user downloaded, any language), "none" (no caller recognition).
    language: the caller's language; pocketsphinx knows "en-us" unless `model` names another model.
    model: a model folder (vosk: required; pocketsphinx: a CMU Sphinx model folder overriding the
    shipped one). keywords: with pocketsphinx, spot these phrases instead of transcribing everything
    (more robust for a few words; the transcript then holds only the phrases heard); each may end in a
    detection threshold, "agent /1e-30/" (smaller finds more, and more falsely). With vosk the words
    become its grammar. process: run the recognizers in a child process (true; see speech/live.py) or on
    a thread of the SIP process (small setups, a debugger).
    """

    engine: Literal["pocketsphinx", "vosk", "none"] = "pocketsphinx"
    language: str = "en-us"
    model: str | None = None
    keywords: tuple[str, ...] = ()
    process: bool = True

    def __post_init__(self) -> None:
        if not self.language.strip():
            raise ValueError("language is empty: give a tag like en-us")
        if self.engine == "vosk" and not self.model:
            raise ValueError("engine \"vosk\" needs model = the folder of a Vosk model "
                             "(https://alphacephei.com/vosk/models)")
        if (self.engine == "pocketsphinx" and self.model is None
                and self.language.lower() not in POCKETSPHINX_LANGUAGES):
            raise ValueError(f"pocketsphinx ships only {', '.join(POCKETSPHINX_LANGUAGES)}: for {self.language!r} "
                             "set model = a CMU Sphinx model folder, or use engine = \"vosk\"")
        if self.model is not None and not self.model.strip():
            raise ValueError("model is empty: leave it out for the shipped model")
        for kw in self.keywords:
            if not _KEYWORD.fullmatch(kw.strip()):
                raise ValueError(f"keywords: {kw!r} is not words optionally followed by a threshold like /1e-30/")


def parse_keyword(keyword: str) -> tuple[str, float | None]:
    """("talk to an agent", 1e-30) from "Talk to an agent /1e-30/"; the threshold is None if not given."""
    m = _KEYWORD.fullmatch(keyword.strip())
    if m is None:
        raise ValueError(f"{keyword!r} is not words optionally followed by a threshold like /1e-30/")
    return m.group(1).lower(), (float(m.group(2)) if m.group(2) else None)
