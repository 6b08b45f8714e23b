"""Metrics follow the event stream and are served as Prometheus text over HTTP on 127.0.0.1."""
import json
import io
import urllib.request

import pytest

from callbot.sip import events as ev
from callbot.app.event_log import EventLog
from callbot.app.metrics import Metrics, parse_address


def _value(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_prefix} not in metrics:\n{text}")


def test_call_lifecycle_counts():
    m = Metrics()
    m.on_event(ev.RegistrationChanged(at=1.0, account="pbx", code=200, reason="OK", expires_s=300, registered=True))
    m.on_event(ev.CallConfirmed(at=2.0, call_id="a", direction="inbound"))
    m.on_event(ev.CallConfirmed(at=2.1, call_id="b", direction="outbound"))
    text = m.text()
    assert _value(text, 'callbot_registration_state{account="pbx"}') == 1
    assert _value(text, "callbot_calls_active") == 2
    m.on_event(ev.CallEnded(at=3.0, call_id="a", code=200, reason="Normal", cause="remote"))
    m.on_event(ev.CallRejected(at=3.1, account="pbx", remote_uri="sip:x@y", code=486, reason="Busy Here"))
    m.on_call_summary({"underruns": 3, "overruns": 1, "steps_late": 2,
                       "stage_latency_s": {"ring_in": [0.0002, 0.0003]}, "step_s": [0.05]})
    text = m.text()
    assert _value(text, "callbot_calls_active") == 1
    assert _value(text, 'callbot_calls_total{cause="remote",direction="inbound"}') == 1
    assert _value(text, 'callbot_calls_rejected_total{code="486"}') == 1
    assert _value(text, "callbot_underruns_total") == 3
    assert _value(text, "callbot_steps_late_total") == 2
    assert _value(text, 'callbot_stage_latency_seconds_count{stage="ring_in"}') == 2
    assert _value(text, "callbot_step_seconds_count") == 1
    assert _value(text, "callbot_jitter_buffer_delay_seconds_count") == 0  # call "a" carried no stream statistics
    stream = {"rx_lost": 4, "jitter_buffer_ms": {"avg": 40, "min": 20, "max": 60, "dev": 5}}
    m.on_event(ev.CallEnded(at=4.0, call_id="b", code=200, reason="Normal", cause="local", stream=stream))
    text = m.text()
    assert _value(text, "callbot_jitter_buffer_delay_seconds_count") == 1
    assert _value(text, "callbot_jitter_buffer_delay_seconds_sum") == pytest.approx(0.040)
    assert _value(text, "callbot_rtp_lost_total") == 4


def test_http_exposition_on_loopback():
    m = Metrics()
    host, port = m.serve("127.0.0.1:0")
    try:
        assert host == "127.0.0.1" and port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert "callbot_calls_active 0.0" in body
    finally:
        m.close()


@pytest.mark.parametrize("bad", ["9464", "127.0.0.1:", "127.0.0.1:99999", ":80", "host:http"])
def test_bad_address(bad):
    with pytest.raises(ValueError, match="host:port"):
        parse_address(bad)


def test_event_log_is_one_json_object_per_line():
    out = io.StringIO()
    log = EventLog(out)
    log.write(ev.DtmfReceived(at=5.0, call_id="c1", digit="5", method="rfc4733", duration_ms=160))
    log.write(ev.CallEnded(at=6.0, call_id="c1", code=200, reason="Normal", cause="remote"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["event"] == "DtmfReceived" and first["digit"] == "5" and first["at"] == 5.0
    assert first["ts"].endswith("+00:00")
    assert json.loads(lines[1])["cause"] == "remote"


def test_event_bus_drops_and_errors_are_exported():
    from callbot.app.event_bus import EventBus

    bus: EventBus = EventBus()
    m = Metrics()
    m.watch_bus(bus)
    full = bus.subscribe("panel", maxsize=2)
    for i in range(5):
        bus.publish(i)
    text = m.text()
    assert _value(text, 'callbot_event_bus_dropped_total{subscriber="panel"}') == 3
    assert _value(text, 'callbot_event_bus_pending{subscriber="panel"}') == 2
    assert _value(text, 'callbot_event_bus_handler_errors_total{subscriber="panel"}') == 0
    assert full.dropped == 3


def test_the_engines_live_events_feed_the_audio_path_metrics():
    from callbot.engine.contract import CallSummary, FrameStages, SessionClosed

    m = Metrics()
    # two frames: the first knows every stage, the second not yet its rtp_out (0)
    rows = [[10, 20, 25, 30, 40, 50, 60, 70, 80], [110, 120, 125, 130, 140, 150, 160, 170, 0]]
    m.on_event(FrameStages(call_id="a", t_ms=160.0, first_frame=0, rows=rows))
    m.on_event(SessionClosed(call_id="a", t_ms=200.0, summary=CallSummary(steps=2, underruns=4, steps_late=1,
                                                                          step_s=[0.03, 0.04])))
    text = m.text()
    assert _value(text, 'callbot_stage_latency_seconds_count{stage="ring_in->resampled"}') == 2
    assert _value(text, 'callbot_stage_latency_seconds_count{stage="ring_out->rtp_out"}') == 1
    assert _value(text, 'callbot_stage_latency_seconds_sum{stage="ring_in->resampled"}') == pytest.approx(20e-9)
    # the schedule's wait and ours, apart
    assert _value(text, 'callbot_stage_latency_seconds_sum{stage="resampled->released"}') == pytest.approx(10e-9)
    assert _value(text, 'callbot_stage_latency_seconds_sum{stage="released->step_start"}') == pytest.approx(10e-9)
    assert _value(text, "callbot_underruns_total") == 4 and _value(text, "callbot_steps_late_total") == 1
    assert _value(text, "callbot_step_seconds_count") == 2
