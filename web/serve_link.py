"""What the panel needs of a running `callbot serve` (live calls, their control, the system's state), as
a Protocol the app implements (app/web_link.py over serve's `Server`).

Why a Protocol here and not an import of the app: the panel is also `callbot web` over a store alone, and
the import contracts keep callbot.web off callbot.app and callbot.sip (pyproject.toml). The panel takes a
`ServeLink` or None; with None the live pages say that they need `callbot serve`.

What crosses is plain data: `LiveCallView` snapshots, and updates as small dicts (`Update`), each naming
the call and its tenant so that the panel can scope them per user without asking back. Updates:
  {"type": "call", "call": LiveCallView as a dict}      a call came up (or its header changed)
  {"type": "line", "call_id", "tenant", "index", "leg", "text", "final"}  a transcript line, whole
  {"type": "speaking", "call_id", "tenant", "caller": bool, "bot": bool}
  {"type": "state", "call_id", "tenant", "state"}        its flow moved
  {"type": "ended", "call_id", "tenant"}                 it hung up: gone from the page
  None (to a subscriber only)                             serve is stopping: the stream ends
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import msgspec

Update = dict[str, Any]
LEGS = ("caller", "bot")


class LinkError(Exception):
    """A control operation serve could not do (one line: the call has ended, no such call, ...)."""


class TranscriptLine(msgspec.Struct, kw_only=True):
    leg: str  # "caller" | "bot"
    text: str
    final: bool = True  # False: the caller recognizer's guess so far, replaced as it goes


class LiveCallView(msgspec.Struct, kw_only=True):
    """One call in progress as the panel shows it."""

    call_id: str
    tenant: str | None
    bot: str | None
    direction: str
    remote: str  # the other party (caller or called)
    started: float  # unix seconds: answered, else the INVITE
    state: str | None = None  # the flow's state, None without a flow
    speaking: dict[str, bool] = {}  # leg -> talking now
    lines: list[TranscriptLine] = []
    first_line: int = 0  # the index of lines[0] (the oldest lines of a long call are not kept)
    transfer: str | None = None  # the last transfer asked for and how it goes


class Feed(Protocol):
    """One subscriber's live updates; `close` stops them (idempotent)."""

    def close(self) -> None: ...


class ServeLink(Protocol):
    """A running serve, seen from the panel. Every method returns quickly and may be called from any thread."""

    def calls(self) -> list[LiveCallView]:
        """The calls in progress now, oldest first."""
        ...

    def subscribe(self, notify: Callable[[Update | None], None]) -> Feed:
        """Calls `notify(update)` for each update from now on (from serve's threads: it must not block);
        `notify(None)` once when serve stops."""
        ...

    def hangup(self, call_id: str) -> None:
        """Hangs the call up; LinkError if it cannot."""
        ...

    def transfer(self, call_id: str, target: str, attended: bool = False) -> None:
        """Transfer to the SIP URI `target`: blind (a REFER at once), or `attended` (the target is called
        first and the caller sent to it only once it answers: a target that does not answer leaves the
        caller with the bot); LinkError if it cannot."""
        ...

    def listen(self, call_id: str, on_audio: Callable[[bytes], None]) -> tuple[int, Callable[[], None]]:
        """Listening in: `on_audio(pcm)` with the call's audio as it is recorded (both legs mixed, 16-bit
        little-endian mono, about every 100 ms; the caller silent while a secret is gathered), from serve's
        recorder thread: it must not block. Returns (the sample rate, a function that stops it); LinkError
        when the call is not in progress or not recorded."""
        ...

    def system(self) -> dict[str, Any]:
        """What the system page shows: see web/system.py for the keys it reads."""
        ...


def sse(update: Update | None = None, *, event: str | None = None, comment: str | None = None) -> bytes:
    """One server-sent event: `data:` the update as JSON (one line: JSON escapes newlines), or a comment
    line (a keep-alive, which the browser ignores)."""
    if comment is not None:
        return f": {comment}\n\n".encode()
    head = f"event: {event}\n" if event else ""
    return (head + "data: ").encode() + msgspec.json.encode(update) + b"\n\n"


def tenant_of(update: Update) -> str | None:
    if update.get("type") == "call":
        return update["call"].get("tenant")
    return update.get("tenant")
