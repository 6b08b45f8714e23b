"""The contract between a call and whatever talks on it: the echo line now, the model runner later.

Why a protocol: the SIP side (callbot.sip) opens one session per answered call and binds the session's
`CallAudio` to the call's media port; it must not care whether an echo or a 7B model fills the tx ring.
An engine may be driven by its own threads; `open_session` and `close_session` are called from the
SIP side's thread (never from a media callback) and return quickly.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from callbot.engine.serving.call_audio import CallAudio


@runtime_checkable
class CallSession(Protocol):
    """One call as an engine serves it."""

    @property
    def audio(self) -> CallAudio:
        """The call's rings and resamplers (the media port is bound to `audio.rx` / `audio.tx`)."""
        ...


@runtime_checkable
class CallEngine(Protocol):
    """Something that talks on calls: opens a session per call and closes it when the call ends."""

    def open_session(self, call_info: Any) -> CallSession:
        """A new session for the call described by `call_info` (a CallRecord: id, from, to, codec, and
        the media port's rate as `clock_rate`). Raises RuntimeError when the engine has no room."""
        ...

    def close_session(self, session: CallSession) -> None:
        """Stops serving the session and releases what it holds; safe to call once per session."""
        ...
