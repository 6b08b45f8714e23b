"""The inference process's pipe, as typed messages (msgpack over a multiprocessing Connection).

Why its own module: both ends (the SIP process's InferenceProcess and the child's loop) must agree on
every word, and a decoder built from one Union refuses anything else with one clear error instead of a
tuple unpacked wrong. The payloads themselves are the contract's (CallStart, Control, LiveEvent,
CallSummary); only the envelope (which call, which way) is said here.

    parent -> child   OpenCall  CloseCall  ControlCall  StopChild  PrepareBotCall
    child -> parent   Ready  StartupFailed  CallEvent  CallClosed  ChildFailed  BotReady

A bot prepared again while calls run (the contract's PrepareBot) is asked with PrepareBotCall and
answered by one BotReady, matched by `req`: a request the child refuses at once may be answered
before one still preparing.
"""
from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

from callbot.engine.contract import BotPrepared, CallStart, CallSummary, Control, LiveEvent, Message, PrepareBot
from callbot.engine.serving.frame_stats import STAGES, FrameStats


class OpenCall(Message, tag="open"):
    sid: int
    shm_name: str  # the call's shared block (rx, tx, stamp logs), created by the parent
    start: CallStart


class CloseCall(Message, tag="close"):
    sid: int


class ControlCall(Message, tag="control"):
    sid: int
    op: Control


class StopChild(Message, tag="stop"):
    pass


class PrepareBotCall(Message, tag="prepare_bot"):
    req: int
    request: PrepareBot


class Ready(Message, tag="ready"):
    pid: int
    bots: list[str]
    pjsua2_loaded: bool  # evidence for the tests: the child must never load pjsua2
    realtime: str  # the inference thread's scheduling policy, or "unchanged"
    prepares_bots: bool = False  # whether a PrepareBotCall can swap a bot (the model; not the echo line)
    cpus: list[int] = []  # the CPUs the inference thread is pinned to ([]: not pinned)


class StartupFailed(Message, tag="startup_error"):
    text: str  # the one line the user gets


class CallEvent(Message, tag="event"):
    event: LiveEvent  # carries its call's id


class CallClosed(Message, tag="closed"):
    """A call's end: its summary (None when the child did not know the call) and every frame's stage
    stamps, so the SIP process holds the frames, not only their durations."""

    sid: int
    summary: CallSummary | None
    rows: bytes  # int64 [frames, len(STAGES)], native byte order (both ends are one machine)
    silence: bytes  # bool [frames]: the frame was fed as silence

    @classmethod
    def of(cls, sid: int, summary: CallSummary | None, stats: FrameStats) -> CallClosed:
        rows, silence = stats.held()
        return cls(sid=sid, summary=summary, rows=np.ascontiguousarray(rows, np.int64).tobytes(),
                   silence=np.ascontiguousarray(silence, np.bool_).tobytes())

    def stats(self) -> FrameStats:
        rows = np.frombuffer(self.rows, np.int64).reshape(-1, len(STAGES))
        return FrameStats.of(rows, np.frombuffer(self.silence, np.bool_))


class ChildFailed(Message, tag="error"):
    text: str


class BotReady(Message, tag="bot_prepared"):
    req: int
    result: BotPrepared


ToChild = Union[OpenCall, CloseCall, ControlCall, StopChild, PrepareBotCall]
ToParent = Union[Ready, StartupFailed, CallEvent, CallClosed, ChildFailed, BotReady]

_encoder = msgspec.msgpack.Encoder()
_to_child = msgspec.msgpack.Decoder(ToChild)
_to_parent = msgspec.msgpack.Decoder(ToParent)


def send(conn, msg: Message) -> None:
    conn.send_bytes(_encoder.encode(msg))


def recv_in_child(conn) -> ToChild:
    return _to_child.decode(conn.recv_bytes())


def recv_in_parent(conn) -> ToParent:
    return _to_parent.decode(conn.recv_bytes())
