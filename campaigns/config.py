"""The campaign file (TOML, msgspec-validated): which bot calls from which account, how fast, when, how
often to retry each outcome, the do-not-call list, answering-machine detection.

Why msgspec Structs: the same validation and error wording as the app's settings (`file: $.a.b: what`),
without importing the app (campaigns/ stands alone). Times of day are the callee's (each row's time
zone, zoneinfo names), so a list across time zones calls everyone within their own hours.
"""
from __future__ import annotations

import datetime as dt
import os
import re
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
OUTCOMES_RETRIED = ("busy", "no_answer", "failed", "machine")


class CampaignError(Exception):
    """A campaign file, list or DNC file that cannot be used; the text is one line for the user."""


class _Struct(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


_NUMBER = re.compile(r"^\+?[0-9*#]{1,32}$")
_URI = re.compile(r"^(sips?|tel):[^\s<>\"]{1,200}$", re.I)
_HOURS = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


class Window(_Struct):
    """When rows may be called, in each row's own time zone: `hours` "HH:MM-HH:MM" (start inclusive, end
    exclusive, the end after the start: no window across midnight) on `days`."""

    hours: str = "09:00-20:00"
    days: tuple[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], ...] = DAYS

    def __post_init__(self) -> None:
        m = _HOURS.match(self.hours)
        if m is None:
            raise ValueError(f"hours {self.hours!r}: expected HH:MM-HH:MM")
        h1, m1, h2, m2 = map(int, m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ValueError(f"hours {self.hours!r}: not times of day")
        if h2 * 60 + m2 <= h1 * 60 + m1:
            raise ValueError(f"hours {self.hours!r}: the end must come after the start (no window across midnight)")
        if not self.days:
            raise ValueError("days: at least one day")

    @property
    def minutes(self) -> tuple[int, int]:
        h1, m1, h2, m2 = map(int, _HOURS.match(self.hours).groups())
        return h1 * 60 + m1, h2 * 60 + m2


class Retry(_Struct):
    """After this outcome, the row is called again `backoff_s` later, until it has had `max_attempts`
    attempts in all (1: never again)."""

    backoff_s: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 600.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1


class Retries(_Struct):
    busy: Retry = Retry(backoff_s=300.0, max_attempts=3)
    no_answer: Retry = Retry(backoff_s=1800.0, max_attempts=3)
    failed: Retry = Retry(backoff_s=600.0, max_attempts=2)
    machine: Retry = Retry(backoff_s=3600.0, max_attempts=1)

    def rule(self, outcome: str) -> Retry:
        return getattr(self, outcome)


class Amd(_Struct):
    """Answering-machine detection (campaigns/amd.py): parameters as Asterisk's AMD() names them.

    On a machine: "hangup", or "message": wait for the beep (`wait_for_beep`, at most `beep_wait_ms`
    after the verdict), then play `message_wav` or speak `message_text` (espeak-ng), then hang up."""

    enabled: bool = True
    hold_bot: bool = True  # the bot listens but says nothing until the verdict (false: it greets at once)
    initial_silence_ms: Annotated[int, msgspec.Meta(ge=100, le=60000)] = 2500
    greeting_ms: Annotated[int, msgspec.Meta(ge=100, le=60000)] = 1500
    after_greeting_silence_ms: Annotated[int, msgspec.Meta(ge=100, le=60000)] = 800
    total_analysis_ms: Annotated[int, msgspec.Meta(ge=500, le=120000)] = 5000
    min_word_ms: Annotated[int, msgspec.Meta(ge=20, le=5000)] = 100
    between_words_silence_ms: Annotated[int, msgspec.Meta(ge=20, le=5000)] = 50
    max_words: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    max_word_ms: Annotated[int, msgspec.Meta(ge=100, le=60000)] = 5000
    silence_threshold: Annotated[int, msgspec.Meta(ge=1, le=32767)] = 256  # mean |sample| of a voiced frame
    on_machine: Literal["hangup", "message"] = "hangup"
    message_wav: str | None = None
    message_text: str | None = None
    voice: str = "en-us"  # espeak-ng voice of message_text
    wait_for_beep: bool = True
    beep_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=120000)] = 15000
    min_beep_ms: Annotated[int, msgspec.Meta(ge=60, le=5000)] = 200

    def __post_init__(self) -> None:
        if self.on_machine == "message" and not (self.message_wav or self.message_text):
            raise ValueError('on_machine = "message" needs message_wav or message_text')
        if self.message_wav and self.message_text:
            raise ValueError("message_wav or message_text, not both")


class Campaign(_Struct):
    bot: str | None = None  # the bot that talks (default: --bot, else the config's first)
    account: str | None = None  # the SIP account (trunk) calls go out from (default: the bot's)
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    calls_per_second: Annotated[float, msgspec.Meta(gt=0, le=100)] = 1.0
    dial_timeout_s: Annotated[float, msgspec.Meta(ge=1, le=300)] = 30.0
    max_call_s: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 600.0  # an answered call is hung up after this
    timezone: str = "UTC"  # rows without a tz column
    window: Window = Window()
    retries: Retries = Retries()
    dnc: str | None = None  # a do-not-call file: one number per line, # comments
    amd: Amd = Amd()
    ends_at: str | None = None  # ISO time (with offset): rows not done by then end as outside-window
    # the number the callees see, per campaign (not the account's): the INVITE's From user and a
    # P-Asserted-Identity, with `caller_name` as their display name (sip/endpoint.py Endpoint.dial)
    caller_id: str | None = None
    caller_name: str | None = None

    def __post_init__(self) -> None:
        zone(self.timezone)
        if self.caller_id is not None and not (_NUMBER.match(self.caller_id) or _URI.match(self.caller_id)):
            raise ValueError(f"caller_id {self.caller_id!r}: a number (+15551234567) or a sip:/tel: URI")
        if self.caller_name is not None and (len(self.caller_name) > 64 or any(
                c in '"\\' or ord(c) < 32 or ord(c) == 127 for c in self.caller_name)):
            raise ValueError(f"caller_name {self.caller_name!r}: at most 64 characters, no quotes, backslashes "
                             "or control characters")
        if self.ends_at is not None:
            parse_instant(self.ends_at)

    @property
    def ends_at_s(self) -> float | None:
        return None if self.ends_at is None else parse_instant(self.ends_at)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name: Europe/Paris, America/New_York)") from None


def parse_instant(text: str) -> float:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r}: not an ISO time (2026-12-03T18:00+01:00)") from None
    if t.tzinfo is None:
        raise ValueError(f"{text!r}: give its UTC offset (2026-12-03T18:00+01:00)")
    return t.timestamp()


_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def load_campaign(path: str | os.PathLike) -> Campaign:
    """The campaign file at `path`; CampaignError("path: $.key: message") when it cannot be used. Relative
    paths inside it (dnc, message_wav) are resolved against its folder."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CampaignError(f"{name}: {err.strerror or err}") from None
    try:
        campaign = msgspec.toml.decode(data, type=Campaign)
    except msgspec.ValidationError as err:
        m = _AT_PATH.match(str(err))
        raise CampaignError(f"{name}: {m['path'] or '$'}: {m['msg']}") from None
    except msgspec.DecodeError as err:
        raise CampaignError(f"{name}: not valid TOML: {err}") from None
    base = os.path.dirname(os.path.abspath(name))
    amd = campaign.amd
    if amd.message_wav is not None:
        amd = msgspec.structs.replace(amd, message_wav=os.path.join(base, amd.message_wav))
    dnc = os.path.join(base, campaign.dnc) if campaign.dnc is not None else None
    return msgspec.structs.replace(campaign, amd=amd, dnc=dnc)
