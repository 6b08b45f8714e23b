"""Fixtures more than one test file uses."""
from __future__ import annotations

import pytest

from callbot.engine.serving.echo import EchoEngine
from callbot.sip.config import EndpointConfig, TransportConfig
from callbot.sip.endpoint import Endpoint
from callbot.app.recording import Recorder


@pytest.fixture
def echo_line(tmp_path):
    """A started Endpoint on 127.0.0.1 (any free port) answering with the echo engine and recording every
    call into `tmp_path`; stopped, with its engine and recorder, after the test."""
    engine = EchoEngine()
    recorder = Recorder(tmp_path)
    ep = Endpoint(EndpointConfig(transports=(TransportConfig(bind="127.0.0.1", port=0, rtp_port=0),)),
                  engine=engine, recorder=recorder)
    try:
        yield ep.start()
    finally:
        ep.stop()
        engine.close()
        recorder.close()
