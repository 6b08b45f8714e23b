"""The endpoint hands each event to its sink (the app's bus) on the emitting thread, before its queue: the
SIP thread's events then come before what they cause on other threads (a call's flow, which its audio
starts), whatever the thread that empties the queue is doing."""
import logging
import time

from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallEnded, IncomingCall


def _incoming(call_id: str) -> IncomingCall:
    return IncomingCall(at=time.monotonic(), call_id=call_id, account="a", remote_uri="sip:b@h", local_uri="sip:a@h")


def test_the_sink_has_each_event_before_the_queue_does():
    ep = Endpoint()  # not started: no pjsua2 object exists
    seen = []
    ep.on_event = lambda e: seen.append((e, ep.events.qsize()))
    first, second = _incoming("c1"), CallEnded(at=time.monotonic(), call_id="c1", cause="remote", code=200, reason="")
    ep._emit(first)
    ep._emit(second)
    assert seen == [(first, 0), (second, 1)]  # given to the sink while not yet queued
    assert [ep.events.get_nowait(), ep.events.get_nowait()] == [first, second]


def test_a_failing_sink_is_logged_and_the_event_still_queued(caplog):
    def broken(e):
        raise RuntimeError("sink down")

    ep = Endpoint(on_event=broken)
    event = _incoming("c2")
    with caplog.at_level(logging.ERROR, logger="callbot.sip.endpoint"):
        ep._emit(event)
    assert ep.events.get_nowait() == event
    assert "the event sink failed on IncomingCall" in caplog.text
