"""Calls with media attached: the echo engine and the recorder plugged into the endpoint.

What the signalling side owes the media side: a session and a port per answered call at the call's
clock rate, the recording finished from the CallRecord after the port is detached, and a shutdown with
ports still attached that neither aborts nor loses the recording.
"""
from __future__ import annotations

import json
import pathlib
import time

import pytest
from tests.sip_peers import PjsuaPeer, sidecars

from callbot.app.calls import CallRouter
from callbot.engine.serving.echo import EchoEngine
from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.sip.events import CallConfirmed, CallEnded, CallMedia, DtmfReceived
from callbot.app.recording import Recorder, read_recording

pytestmark = pytest.mark.timeout(120)


def _wait_frames(ep: Endpoint, call_id: str, timeout: float = 10.0) -> dict:
    """Until the call's port has received audio (a condition, not a duration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = ep.media_stats(call_id)
        if stats and stats["frames_received"] > 0:
            return stats
        time.sleep(0.02)
    raise TimeoutError(f"no audio frame reached the port of {call_id} in {timeout} s")


def _sidecar(directory: pathlib.Path, call_id: str) -> dict:
    [path] = [p for p in sidecars(directory) if json.loads(p.read_text())["call_id"] == call_id]
    return json.loads(path.read_text())


@pytest.mark.parametrize("codec, rate", [("G722", 16000), ("PCMU", 8000), ("PCMA", 8000)])
def test_call_gets_session_port_and_recording_at_its_rate(echo_line, tmp_path, codec, rate):
    with PjsuaPeer(user="alice", codecs=f"{codec}/", log_dir=tmp_path) as peer:
        call_id = peer.call(echo_line.account_uri())
        media = echo_line.wait_for(CallMedia, call_id=call_id)
        assert (media.codec, media.clock_rate) == (codec, rate)
        echo_line.wait_for(CallConfirmed, call_id=call_id)
        assert echo_line.sessions.engine.sessions == 1
        _wait_frames(echo_line, call_id)
        peer.send("dtmf", call_id=call_id, digits="7", method="info")
        echo_line.wait_for(DtmfReceived, call_id=call_id, digit="7")
        peer.send("hangup", call_id=call_id)
        echo_line.wait_for(CallEnded, call_id=call_id)
    side = _sidecar(tmp_path, call_id)
    assert side["recording"]["complete"] is True
    bridge = echo_line.config.conference_clock_rate  # every port runs at the bridge's rate
    assert (side["codec"], side["codec_rate"]) == (codec, rate)
    assert side["clock_rate"] == side["recording"]["rate"] == bridge
    assert side["hangup_cause"] == "remote" and side["end"] >= side["answered"] >= side["start"]
    assert [d["digit"] for d in side["dtmf"]] == ["7"]
    wav_rate, frames = read_recording(tmp_path / side["recording"]["wav"])
    assert wav_rate == bridge and frames.shape[1] == 2 and len(frames) > 0
    assert echo_line.sessions.engine.sessions == 0


def test_stop_with_ports_attached_finishes_recordings(tmp_path):
    engine = EchoEngine()
    recorder = Recorder(tmp_path)
    ep = Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),)),
                  sessions=CallRouter(engine), recorder=recorder).start()
    try:
        with PjsuaPeer(user="a", log_dir=tmp_path) as a, PjsuaPeer(user="b", log_dir=tmp_path) as b:
            ids = [a.call(ep.account_uri()), b.call(ep.account_uri())]
            for cid in ids:
                ep.wait_for(CallConfirmed, call_id=cid)
            assert engine.sessions == 2
            ep.stop()  # the abort trap: ports on the bridge while calls and pjsua go away
            for cid in ids:
                assert ep.wait_for(CallEnded, call_id=cid).cause == "shutdown"
    finally:
        ep.stop()
        engine.close()
        recorder.close()
    assert engine.sessions == 0
    for cid in ids:
        side = _sidecar(tmp_path, cid)
        assert side["recording"]["complete"] is True and side["hangup_cause"] == "shutdown"


def test_media_survives_hold_and_unhold(echo_line, tmp_path):
    # pjsua rebuilds the call's stream (a new bridge slot) on unhold: the port must follow it
    with PjsuaPeer(user="holder", log_dir=tmp_path) as peer:
        call_id = peer.call(echo_line.account_uri())
        echo_line.wait_for(CallConfirmed, call_id=call_id)
        _wait_frames(echo_line, call_id)
        peer.send("hold", call_id=call_id)
        peer.expect("media_status", call_id=call_id)
        peer.send("unhold", call_id=call_id)
        n_media = len(peer.all("media", call_id=call_id))
        deadline = time.monotonic() + 10
        while len(peer.all("media", call_id=call_id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(peer.all("media", call_id=call_id)) >= 2, n_media
        start = echo_line.media_stats(call_id)["frames_requested"]
        # the bridge asks our port for audio again, i.e. it is linked to the call's new slot
        deadline = time.monotonic() + 10
        while echo_line.media_stats(call_id)["frames_requested"] < start + 10:
            assert time.monotonic() < deadline, echo_line.media_stats(call_id)
            time.sleep(0.02)
        peer.send("hangup", call_id=call_id)
        echo_line.wait_for(CallEnded, call_id=call_id)
