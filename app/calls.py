"""Calls in progress as the app sees them: which bot answers each, and the live control of each.

`CallRouter` stands between the SIP endpoint and the engine (it is the endpoint's MediaSessions): when a
call's audio comes up it picks the call's bot and variables, opens an engine session with a typed
`CallStart`, and keeps a `LiveCall` for it until the audio goes. A `LiveCall` is the control API of
one call: `play`, `inform`, `set_persona`, `mute_caller` go to the engine (typed control operations),
`hangup` and `transfer` to the endpoint. Everything here runs on the app's threads (the SIP thread for
open/close, any thread for control) and returns quickly.

An attended transfer's consultation leg (`LiveCall.transfer_attended`) is a call of ours like any other:
its record is labelled `transfer_of` (the call being transferred) before its audio comes up, and the
router opens it held (HoldBot and MuteCaller on, before any watcher sees it), so the bot never talks
with the transfer target and never hears it: the leg only carries the clips played to it (an
announcement). Why a held engine session rather than none: the endpoint serves a call's audio only
through a session, the announcement then plays (and is recorded) by the same path as every prompt, and
a session costs nothing the model does not already do for a silent call.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import msgspec
import numpy as np

from callbot.engine.audio.wavfile import read_wav
from callbot.engine.contract import (CallEngine, CallSession, CallStart, Control, HoldBot, Inform, MuteCaller,
                                     Play, SetPersona, StopPlay)
from callbot.sip.call_record import CallRecord

# a clip: a WAV file, or (samples, rate) from a text-to-speech engine (int16, or float in [-1, 1]; mono)
Audio = str | os.PathLike | tuple[np.ndarray, int]

TRANSFER_OF = "transfer_of"  # the label of a consultation leg's record: the Call-ID it transfers


class CallControlError(Exception):
    """A control operation that cannot be done; the text says why (one line for the user)."""


class CallOps(Protocol):
    """What a live call needs of the SIP side (the Endpoint has these)."""

    def hangup(self, call_id: str, code: int = 0) -> None: ...

    def transfer(self, call_id: str, target: str) -> None: ...

    def transfer_attended(self, call_id: str, target: str, *, account: str | None = None,
                          answer_timeout_s: float | None = None, refer_after_s: float | None = 0.0,
                          labels: dict[str, str] | None = None) -> str: ...

    def complete_transfer(self, call_id: str) -> bool: ...

    def cancel_transfer(self, call_id: str) -> bool: ...


class CallWatcher(Protocol):
    """Told of each call as its audio comes up and goes (SIP thread: must return at once, never raise)."""

    def call_opened(self, live: LiveCall) -> None: ...

    def call_closed(self, live: LiveCall) -> None: ...


@dataclass(eq=False)
class LiveCall:
    """One call in progress: its record (SIP facts), its CallStart (bot, variables) and its session."""

    record: CallRecord
    start: CallStart
    session: CallSession
    ops: CallOps | None
    ended: bool = False
    _ids: int = field(default=0, repr=False)

    @property
    def call_id(self) -> str:
        return self.start.call_id

    @property
    def transfer_of(self) -> str | None:
        """The call this one is the consultation leg of (an attended transfer), else None."""
        return self.record.labels.get(TRANSFER_OF)

    def play(self, audio: Audio, id: str | None = None) -> str:
        """Plays a clip to the caller (with the model, also into the agent's stream); returns its id
        (echoed by the PlayFinished event)."""
        pcm, rate = _clip_bytes(audio)
        return self._send(lambda i: Play(pcm=pcm, rate=rate, id=i), id)

    def stop_play(self, id: str = "") -> None:
        """Cuts the clip playing and the queued ones (or only the one with this id): a key pressed during
        a menu prompt. Each clip cut reports PlayFinished with `interrupted`."""
        self._send(lambda _: StopPlay(id=id), "")

    def inform(self, audio: Audio, id: str | None = None) -> str:
        """Mixes a clip into what the model hears, never into what the caller hears."""
        pcm, rate = _clip_bytes(audio)
        return self._send(lambda i: Inform(pcm=pcm, rate=rate, id=i), id)

    def set_persona(self, text: str, id: str | None = None) -> str:
        """A new system prompt, taken at the next utterance boundary (PersonaChanged says when)."""
        return self._send(lambda i: SetPersona(text=text, id=i), id)

    def mute_caller(self, on: bool = True) -> None:
        """While on, the model hears silence instead of the caller (the recording keeps the caller)."""
        self._send(lambda _: MuteCaller(on=bool(on)), "")

    def hold_bot(self, on: bool = True) -> None:
        """While on, the bot says nothing of its own (its agent stream forced silent); clips still play."""
        self._send(lambda _: HoldBot(on=bool(on)), "")

    def hangup(self) -> None:
        self._sip().hangup(self.call_id)

    def transfer(self, uri: str) -> None:
        """Blind transfer (REFER) to `uri`; TransferProgress events follow."""
        self._sip().transfer(self.call_id, uri)

    def transfer_attended(self, uri: str, answer_timeout_s: float | None = None,
                          refer_after_s: float | None = 0.0) -> str:
        """Attended transfer to `uri` (sip/endpoint.py transfer_attended): the target is called on a
        consultation leg, held (see above), and `refer_after_s` after it answers (None: at
        `complete_transfer`) the caller is sent to it by a REFER with Replaces. Returns the leg's Call-ID;
        TransferProgress events of this call follow, the last one final."""
        return self._sip().transfer_attended(self.call_id, uri, answer_timeout_s=answer_timeout_s,
                                             refer_after_s=refer_after_s, labels={TRANSFER_OF: self.call_id})

    def complete_transfer(self) -> bool:
        """Sends the REFER with Replaces of this call's attended transfer now (its leg is answered); False
        when there was nothing to send (sent already, failed, cancelled)."""
        return self._sip().complete_transfer(self.call_id)

    def cancel_transfer(self) -> bool:
        """Drops this call's attended transfer before its REFER (the leg hung up, nothing reported); False
        when there was none to drop."""
        return self._sip().cancel_transfer(self.call_id)

    def _sip(self) -> CallOps:
        if self.ops is None:
            raise CallControlError(f"call {self.call_id}: no SIP endpoint to do that with")
        return self.ops

    def _send(self, make: Callable[[str], Control], id: str | None) -> str:
        if self.ended:
            raise CallControlError(f"call {self.call_id} has ended")
        if id is None:
            self._ids += 1
            id = f"{self.call_id}#{self._ids}"
        try:
            op = make(id)
        except (msgspec.ValidationError, ValueError, TypeError) as err:
            raise CallControlError(f"call {self.call_id}: {err}") from None
        try:
            self.session.control(op)
        except (RuntimeError, ValueError) as err:
            raise CallControlError(f"call {self.call_id}: {err}") from None
        return id


def _clip_bytes(audio: Audio) -> tuple[bytes, int]:
    """int16 little-endian mono bytes and rate of a clip (a WAV's channels are averaged)."""
    if isinstance(audio, tuple):
        samples, rate = audio
        x = np.asarray(samples)
        if x.ndim != 1:
            raise CallControlError(f"a clip must be mono (1-D samples), got shape {x.shape}")
    else:
        try:
            data, rate = read_wav(audio)
        except (OSError, ValueError) as err:
            raise CallControlError(f"{os.fspath(audio)}: {err}") from None
        x = data.mean(axis=0) if data.ndim == 2 else data
    if x.dtype != np.int16:
        x = np.clip(np.rint(np.asarray(x, np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    return x.astype("<i2").tobytes(), int(rate)


class CallRouter:
    """The endpoint's MediaSessions: opens an engine session per call (bot and variables from
    `start_for(record, bot named when dialling)`: app/routes.py; variables from `expect` for calls we
    dial win) and keeps the calls in progress in `calls`."""

    def __init__(self, engine: CallEngine,
                 start_for: Callable[[CallRecord, str | None], tuple[str | None, dict[str, str]]] | None = None):
        self.engine = engine
        self.start_for = start_for
        self.ops: CallOps | None = None  # the endpoint, once there is one (hangup, transfer)
        self.calls: dict[str, LiveCall] = {}
        # told of each call as its audio comes up and goes (the flow host): call_opened(live) / call_closed(live)
        self.watchers: list[CallWatcher] = []
        self._expected: dict[str, tuple[str | None, dict[str, str]]] = {}
        self._lock = threading.Lock()

    def expect(self, call_id: str, bot: str | None = None, variables: dict[str, str] | None = None) -> None:
        """The bot and variables of a call we placed (by its Call-ID), for when its audio comes up."""
        with self._lock:
            self._expected[call_id] = (bot, dict(variables or {}))

    def call(self, call_id: str) -> LiveCall:
        """The call in progress with this Call-ID; CallControlError when there is none."""
        live = self.calls.get(call_id)
        if live is None:
            raise CallControlError(f"no call {call_id!r} in progress")
        return live

    # ---- MediaSessions (the SIP thread) -------------------------------------------------------------

    def open_session(self, record: CallRecord) -> CallSession:
        if record.clock_rate is None:
            raise ValueError(f"call {record.call_id}: no media rate yet")
        with self._lock:
            bot, variables = self._expected.pop(record.call_id, (None, {}))
        if self.start_for is not None:
            bot, chosen = self.start_for(record, bot)
            variables = {**chosen, **variables}
        start = CallStart(call_id=record.call_id, rate=record.clock_rate, bot=bot, variables=variables)
        session = self.engine.open_session(start)
        live = self.calls[record.call_id] = LiveCall(record, start, session, self.ops)
        if live.transfer_of is not None:  # a consultation leg: the bot holds its tongue and ears (see above)
            live.hold_bot(True)
            live.mute_caller(True)
        for watcher in self.watchers:
            watcher.call_opened(live)
        return session

    def close_session(self, session: CallSession, record: CallRecord) -> None:
        live = self.calls.pop(session.start.call_id, None)
        if live is not None:
            live.ended = True
            for watcher in self.watchers:
                watcher.call_closed(live)
        summary = self.engine.close_session(session)
        if summary is not None:
            record.engine = msgspec.to_builtins(summary)
