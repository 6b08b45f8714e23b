"""The model service's socket, as typed messages: the inference process's words plus admission.

Why a module beside process_messages.py: the service (engine/serving/inference_service.py) is the
inference child's loop made to serve several SIP workers over a Unix socket instead of one parent over a
pipe, so it speaks the same words for a call (OpenCall with the rings' shared-memory name, ControlCall,
CloseCall; CallEvent, CallClosed; Ready once connected; ChildFailed before it goes) and adds only what
several workers on one model need: a worker says who it is (Hello), asks for room before it answers an
INVITE (Admit -> Admission, a slot held for a while), and hears when a call it opened without asking
could not be taken (OpenRefused). A worker pings (Ping) every `heartbeat_s` it announced in its Hello,
and the service answers each (Pong): a stopped process keeps its socket open, so silence is how either
end sees the other stalled (engine/serving/heartbeat.py). Both ends are one machine and one user: framing is
multiprocessing's Connection (length-prefixed bytes), the payload msgpack, never pickle.

    worker -> service   Hello  Admit  Release  OpenCall  ControlCall  CloseCall  Ping  PrepareBotCall
    service -> worker   Ready  Admission  OpenRefused  CallEvent  CallClosed  ChildFailed  Pong  BotReady

A bot prepared again (PrepareBotCall -> BotReady, the inference process's words) changes it for every
worker's next calls: the bots are the service's, one table for all.
"""
from __future__ import annotations

from typing import Union

import msgspec

from callbot.engine.contract import Message
from callbot.engine.serving.process_messages import (BotReady, CallClosed, CallEvent, ChildFailed, CloseCall,
                                                     ControlCall, OpenCall, PrepareBotCall, Ready)


class Hello(Message, tag="hello"):
    pid: int
    name: str = ""  # how the service's log names this worker (its SIP address)
    heartbeat_s: float = 0.0  # it pings at least this often (0: it never does, and is not watched)


class Ping(Message, tag="ping"):
    """The worker is alive and wants to hear that the service is (a Pong)."""


class Pong(Message, tag="pong"):
    """The service is alive (the answer to a Ping)."""


class Admit(Message, tag="admit"):
    """May the worker answer this INVITE? The answer holds a slot for the call until it opens (or
    RESERVE_S passes)."""

    req: int
    call_id: str


class Release(Message, tag="release"):
    """The admitted INVITE ended without its call opening (a CANCEL, no ACK, refused later): its slot
    goes back now rather than after RESERVE_S, so INVITE + CANCEL in a loop cannot hold the model."""

    call_id: str


class Admission(Message, tag="admission"):
    req: int
    ok: bool
    reason: str = ""  # when refused: step_budget's FRAME_BUDGET or MAX_CALLS
    retry_after_s: int = 0
    text: str = ""  # one line for the worker's log and the SIP reason phrase


class OpenRefused(Message, tag="open_refused"):
    """A call opened without a slot held (an outbound call, a slot expired) that the model has no room
    for, or whose rings could not be attached: the worker hangs it up."""

    sid: int
    reason: str
    text: str


ToService = Union[Hello, Admit, Release, OpenCall, ControlCall, CloseCall, Ping, PrepareBotCall]
ToWorker = Union[Ready, Admission, OpenRefused, CallEvent, CallClosed, ChildFailed, Pong, BotReady]

_encoder = msgspec.msgpack.Encoder()
_to_service = msgspec.msgpack.Decoder(ToService)
_to_worker = msgspec.msgpack.Decoder(ToWorker)


def send(conn, msg: Message) -> None:
    conn.send_bytes(_encoder.encode(msg))


def recv_in_service(conn) -> ToService:
    return _to_service.decode(conn.recv_bytes())


def recv_in_worker(conn) -> ToWorker:
    return _to_worker.decode(conn.recv_bytes())
