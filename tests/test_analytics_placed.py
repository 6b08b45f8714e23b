"""Every metric of a real call equals the value placed (issue 14's tests): the README's example line (a
flow on the echo engine: espeak-ng prompts, the bot held between them) called by a pjsua2 caller that
plays a scripted recording - a sentence over the bot's greeting (overtalk and a barge-in placed on
purpose), a silence, a second sentence - and hangs up.

What was placed is known without the analysis: the bot channel of the recording is the prompts as sent
(clean TTS, digital silence between), whose speech is read off by energy; the caller's channel is the
scripted recording after G.722 and the jitter buffer, found in the call by cross-correlation, so its
placed speech is known in call time. Each edge is found on its own (the piece of the script around it,
searched near where the whole script lies): a jitter buffer that runs dry once under a loaded machine
moves what follows by a frame or two, which lowers one correlation over the whole script (0.54 seen in
CI) without moving any edge by more than that. The analysis (Silero VAD on both legs) must find every segment
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
PIECE_MS = 400.0   # the script around one edge: 100 ms on the silent side, 300 ms on the speech side
SEARCH_MS = 300.0  # how far from the whole script's place an edge may have moved


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


def _offset_ms(heard: np.ndarray, sent: np.ndarray) -> float:
    """Where `sent` starts in `heard` (ms), roughly: the peak of the FFT cross-correlation."""
    n = 1 << int(np.ceil(np.log2(len(heard) + len(sent))))
    h, s = heard.astype(np.float64), sent.astype(np.float64)
    xc = np.fft.irfft(np.fft.rfft(h, n) * np.conj(np.fft.rfft(s, n)), n)[:len(heard)]
    return int(np.argmax(xc)) * 1000.0 / RATE


def _find(heard: np.ndarray, piece: np.ndarray, near_ms: float, reach_ms: float = SEARCH_MS) -> tuple[float, float]:
    """Where `piece` starts in `heard` within reach_ms of near_ms, and the normalised correlation there."""
    h, p = heard.astype(np.float64), piece.astype(np.float64)
    lo = max(0, int((near_ms - reach_ms) * RATE / 1000))
    hi = min(len(h) - len(p), int((near_ms + reach_ms) * RATE / 1000))
    assert hi > lo, ("the piece lies outside the recording", near_ms)
    region = h[lo:hi + len(p)]
    dots = np.correlate(region, p, mode="valid")
    energy = np.concatenate(([0.0], np.cumsum(region ** 2)))
    norms = np.sqrt(energy[len(p):] - energy[:-len(p)]) * np.linalg.norm(p) + 1e-9
    corr = dots / norms
    best = int(np.argmax(corr))
    return (lo + best) * 1000.0 / RATE, float(corr[best])


def _placed_edges(heard: np.ndarray, script: np.ndarray, spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Each placed span's edges in call time: the script's PIECE_MS around each edge found near where
    the whole script lies, each well correlated."""
    offset = _offset_ms(heard, script)
    before, after = int(0.1 * RATE), int((PIECE_MS / 1000 - 0.1) * RATE)
    placed = []
    for a, b in spans:
        edges = []
        for edge_ms, (pre, post) in ((a, (before, after)), (b, (after, before))):
            i = int(edge_ms * RATE / 1000)
            piece = script[max(0, i - pre):i + post]
            start_ms = max(0, i - pre) * 1000.0 / RATE
            at, corr = _find(heard, piece, offset + start_ms)
            assert corr > 0.8, f"the script around {edge_ms:.0f} ms is not in the recording (correlation {corr:.2f})"
            edges.append(at + edge_ms - start_ms)
        placed.append((edges[0], edges[1]))
    return placed


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
    caller_placed = _placed_edges(caller_leg, script, script_spans)
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
