"""Every metric of a real call equals the value placed (issue 14's tests): the README's example line (a
flow on the echo engine: espeak-ng prompts, the bot held between them) called by a pjsua2 caller that
plays a scripted recording - a sentence over the bot's greeting (overtalk and a barge-in placed on
purpose), a silence, a second sentence - and hangs up.

What was placed is known without the analysis: the bot channel of the recording is the prompts as sent
(clean TTS, digital silence between), whose speech is read off by energy; the caller's channel is the
scripted recording after G.722 and the jitter buffer, found in the call by cross-correlation, so its
placed speech is known in call time. The analysis (Silero VAD on both legs) must find every segment
within 50 ms of those edges, and its metrics must equal the metrics of the placed segments
(analytics.metrics.compute_metrics, tested by hand-worked values in test_analytics_metrics.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from callbot.analytics.analyze import analyze_call, recording_files
from callbot.analytics.metrics import compute_metrics
from callbot.analytics.result import Segment
from callbot.app.recording import read_recording
from callbot.engine.contract import PlayFinished
from tests.analytics_calls import speech_spans
from tests.sip_peers import PjsuaPeer, eventually, sidecars
from tests.test_flows_call import Watch, _write_wav
from tests.test_flows_speech import _speech, example_line, human  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)
RATE = 16000
EDGE_MS = 50.0


def _script() -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The caller's recording: a sentence at 0.4 s (over the greeting), silence, another at 7 s; and its
    speech spans in ms from its first sample."""
    first = _speech("Hello, is anybody there?", voice="en-us+klatt2")
    second = _speech("I have a question about my bill.", voice="en-us+klatt2")
    pcm = np.zeros(int(10.5 * RATE), np.int16)
    spans = []
    for at_s, clip in ((0.4, first), (7.0, second)):
        i = int(at_s * RATE)
        pcm[i:i + len(clip)] = clip
        spans += [(a + at_s * 1000, b + at_s * 1000) for a, b in speech_spans(clip)]
    return pcm, spans


def _offset_ms(heard: np.ndarray, sent: np.ndarray) -> tuple[float, float]:
    """Where `sent` starts in `heard` (ms) and the normalised correlation there (FFT cross-correlation)."""
    n = 1 << int(np.ceil(np.log2(len(heard) + len(sent))))
    h, s = heard.astype(np.float64), sent.astype(np.float64)
    xc = np.fft.irfft(np.fft.rfft(h, n) * np.conj(np.fft.rfft(s, n)), n)[:len(heard)]
    lag = int(np.argmax(xc))
    part = h[lag:lag + len(s)]
    corr = float(xc[lag] / (np.linalg.norm(part) * np.linalg.norm(s[:len(part)]) + 1e-9))
    return lag * 1000.0 / RATE, corr


def _close(found: list[Segment], placed: list[tuple[float, float]], leg: str) -> None:
    got = [(s.start_ms, s.end_ms) for s in found if s.leg == leg]
    assert len(got) == len(placed), (leg, got, placed)
    for (a, b), (pa, pb) in zip(got, placed):
        assert abs(a - pa) <= EDGE_MS and abs(b - pb) <= EDGE_MS, (leg, got, placed)


def test_every_metric_of_a_real_call_equals_the_value_placed(example_line, human, tmp_path):  # noqa: F811
    server = example_line
    script, script_spans = _script()
    _write_wav(tmp_path / "script.wav", script)
    watch = Watch(server.bus, "placed")
    try:
        with PjsuaPeer(user="caller", log_dir=tmp_path) as caller:
            call_id = caller.call(server.endpoint.account_uri())
            caller.expect("media", call_id=call_id, timeout=15)
            caller.send("play", path=str(tmp_path / "script.wav"))
            # the greeting, then the menu prompt, then its first no-input reprompt: the script is over
            watch.until(lambda e: isinstance(e, PlayFinished) and e.call_id == call_id and e.id.endswith("-3"),
                        timeout=40, what="the menu's reprompt")
            caller.send("hangup", call_id=call_id)
            caller.expect("disconnected", call_id=call_id, timeout=15)
    finally:
        watch.close()
    [sidecar] = sidecars(tmp_path / "calls")
    eventually(lambda: json.loads(sidecar.read_text())["recording"]["complete"], 10, "the finished sidecar")
    wav, side, events = recording_files(sidecar)
    rate, stereo = read_recording(wav)
    assert rate == RATE
    caller_leg, bot_leg = stereo[:, 0], stereo[:, 1]
    duration_ms = len(stereo) * 1000.0 / RATE

    # what was placed, in call time
    offset, corr = _offset_ms(caller_leg, script)
    assert corr > 0.8, f"the caller's script is not in the recording as played (correlation {corr:.2f})"
    caller_placed = [(a + offset, b + offset) for a, b in script_spans]
    bot_placed = speech_spans(bot_leg)
    assert len(bot_placed) >= 3 and caller_placed[0][0] < bot_placed[0][1]  # the overlap is there

    a = analyze_call(wav, side, events)
    assert a.errors == [], a.errors
    _close(a.segments, caller_placed, "caller")
    _close(a.segments, bot_placed, "bot")

    placed = [Segment(leg="caller", start_ms=x, end_ms=y) for x, y in caller_placed] + \
             [Segment(leg="bot", start_ms=x, end_ms=y) for x, y in bot_placed]
    want = compute_metrics(placed, duration_ms)
    got = a.metrics
    edges = 2 * (len(caller_placed) + len(bot_placed))
    for name in ("overtalk_count", "dead_air_count", "barge_ins"):
        assert getattr(got, name) == getattr(want, name), (name, getattr(got, name), getattr(want, name))
    assert got.overtalk_count >= 1 and got.barge_ins >= 1  # placed on purpose
    for name in ("overtalk_ms", "dead_air_ms", "non_talk_ms"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=EDGE_MS * edges), name
    for leg in ("caller", "bot"):
        g, w = getattr(got, leg), getattr(want, leg)
        assert (g.segments, g.interruptions) == (w.segments, w.interruptions), leg
        assert g.talk_ms == pytest.approx(w.talk_ms, abs=EDGE_MS * edges), leg
        assert g.longest_monologue_ms == pytest.approx(w.longest_monologue_ms, abs=2 * EDGE_MS), leg
    assert len(got.response_latency_ms) == len(want.response_latency_ms)
    for g, w in zip(got.response_latency_ms, want.response_latency_ms):
        assert g == pytest.approx(w, abs=2 * EDGE_MS)
    for g, w in zip(got.yield_ms, want.yield_ms):
        assert g == pytest.approx(w, abs=2 * EDGE_MS)
