"""The typed words of the inference process's pipe and of the engine contract, over a real Pipe."""
from __future__ import annotations

import multiprocessing

import msgspec
import numpy as np
import pytest

from callbot.engine.contract import (BotText, CallStart, CallSummary, MuteCaller, Play, SetPersona, TextPiece)
from callbot.engine.serving import process_messages as pm
from callbot.engine.serving.frame_stats import STAGES, FrameStats


@pytest.fixture
def pipe():
    a, b = multiprocessing.Pipe(duplex=True)
    yield a, b
    a.close()
    b.close()


def test_every_word_crosses_the_pipe_as_it_was_sent(pipe):
    a, b = pipe
    start = CallStart(call_id="c1", rate=16000, bot="pizza", variables={"name": "Ana"})
    clip = np.arange(-100, 100, dtype=np.int16).astype("<i2").tobytes()
    for msg in (pm.OpenCall(sid=1, shm_name="psm_x", start=start),
                pm.ControlCall(sid=1, op=Play(pcm=clip, rate=16000, id="p1")),
                pm.ControlCall(sid=1, op=SetPersona(text="You sell pizza.", id="s1")),
                pm.ControlCall(sid=1, op=MuteCaller(on=True)),
                pm.CloseCall(sid=1), pm.StopChild()):
        pm.send(a, msg)
        assert pm.recv_in_child(b) == msg
    summary = CallSummary(steps=3, text=[TextPiece(t_ms=80.0, piece="hi")])
    stats = FrameStats(4)
    for i in range(3):
        stats.row(silence=i == 1)[:] = np.arange(len(STAGES)) + 10 * i
    for msg in (pm.Ready(pid=7, bots=["pizza"], pjsua2_loaded=False, realtime="unchanged"),
                pm.StartupFailed(text="no weights"),
                pm.CallEvent(event=BotText(call_id="c1", t_ms=160.0, piece=" hello")),
                pm.CallClosed.of(1, summary, stats), pm.ChildFailed(text="boom")):
        pm.send(b, msg)
        got = pm.recv_in_parent(a)
        assert got == msg
    rows, silence = pm.CallClosed.of(1, summary, stats).stats().held()
    assert np.array_equal(rows, stats.held()[0]) and silence.tolist() == [False, True, False]


def test_a_word_from_the_wrong_side_or_a_malformed_one_is_refused(pipe):
    a, b = pipe
    pm.send(a, pm.Ready(pid=7, bots=[], pjsua2_loaded=False, realtime="x"))
    with pytest.raises(msgspec.ValidationError):
        pm.recv_in_child(b)  # the child never receives Ready
    a.send_bytes(b"\x92\x01\x02")  # msgpack, but no word of ours
    with pytest.raises(msgspec.DecodeError):
        pm.recv_in_child(b)


@pytest.mark.parametrize("bad", [
    {"call_id": "c", "rate": 11025},  # a rate no resampler serves
    {"call_id": "c", "rate": 8000, "extra": 1},  # unknown fields are refused
    {"rate": 8000},  # no call id
])
def test_a_call_start_refuses_what_does_not_fit(bad):
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, CallStart)


def test_control_operations_check_their_audio_and_text():
    with pytest.raises(ValueError, match="whole int16"):
        Play(pcm=b"\x00\x01\x02", rate=8000)
    with pytest.raises(ValueError, match="rate"):
        Play(pcm=b"", rate=12345)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"type": "set_persona", "text": ""}, SetPersona)
