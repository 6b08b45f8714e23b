"""What the SIP side asks of the program that serves its calls' audio, and of its recorder.

Why here, in callbot.sip: the SIP side knows rings, not engines, bots or apps (it imports the engine's
audio parts only). For each call whose audio comes up the endpoint asks its `MediaSessions` for a
session, binds the session's rings to the call's media port, and closes it when the audio goes; the
app implements this (callbot.app.calls.CallRouter: it picks the bot and opens an engine session).
A `CallRecorder` gets the caller's and the bot's frames through rings of its own and the CallRecord
at the end.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from callbot.engine.audio import Ring
from callbot.engine.audio._stamps import StampLog
from callbot.sip.call_record import CallRecord


@runtime_checkable
class CallRings(Protocol):
    """A call's audio at the media port's rate: rx (the media side writes the caller), tx (it reads the
    bot), and the stamp logs in which it notes when samples crossed."""

    call_rate: int
    rx: Ring
    tx: Ring
    rx_stamps: StampLog
    tx_stamps: StampLog


@runtime_checkable
class MediaSession(Protocol):
    @property
    def audio(self) -> CallRings: ...


@runtime_checkable
class MediaSessions(Protocol):
    def open_session(self, record: CallRecord) -> MediaSession:
        """A session for the call (record.clock_rate is the media port's rate); raising leaves the call
        silent, never ends it."""
        ...

    def close_session(self, session: MediaSession, record: CallRecord) -> None:
        """The call's audio is gone (the port is off the bridge): end the session; what it reports may
        go into `record` (record.engine) before the recording is finished from it."""
        ...


@runtime_checkable
class CallRecording(Protocol):
    rate: int
    caller: Ring
    bot: Ring


@runtime_checkable
class CallRecorder(Protocol):
    def start(self, record: CallRecord, rate: int) -> CallRecording | None: ...

    def finish(self, recording: CallRecording, record: CallRecord) -> None: ...
