"""The latency suite's own instruments (bench/): the mu-law codec of the WebSocket baseline, the click
finder, and one short call through the whole measurement. Timings are the bench's business; these check
that what it measures is what it says (no timing thresholds here)."""
from __future__ import annotations

import pathlib
import sys
import warnings

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import latency_lab as L  # noqa: E402
import mulaw  # noqa: E402
from peer_audio import click  # noqa: E402


def test_mulaw_matches_g711_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # the stdlib's G.711 (deprecated, present up to 3.12: our range)
    codes = bytes(range(256))
    ref = np.frombuffer(audioop.ulaw2lin(codes, 2), np.int16)
    assert np.array_equal(mulaw.decode(codes), ref)
    x = np.arange(-32768, 32768, dtype=np.int16)
    ours = np.frombuffer(mulaw.encode(x), np.uint8).astype(int)
    theirs = np.frombuffer(audioop.lin2ulaw(x.tobytes(), 2), np.uint8).astype(int)
    # the two differ only in how they round negatives at segment edges: never by more than one step
    assert np.max(np.abs(ours - theirs)) <= 1 and np.mean(ours != theirs) < 0.01
    # and decoding what we encode comes back within one quantization step
    back = mulaw.decode(mulaw.encode(x)).astype(int)
    assert np.all(np.abs(back - x) <= np.maximum(8, np.abs(x.astype(int)) // 16 + 4))


def _synthetic_peer(rate: int, copies_ms: list[float], clicks: int = 5, interval_ms: float = 217.0) -> dict:
    n = rate // 50
    frames = int((1 + clicks * interval_ms / 1000 + 1) * 50)
    sent = np.array([rate + int(i * interval_ms / 1000 * rate) for i in range(clicks)])
    heard = np.zeros(frames * n, np.int16)
    burst = click(rate)
    for s in sent:
        for d in copies_ms:
            at = s + int(round(d * rate / 1000))
            heard[at:at + len(burst)] += burst // 2
    t = np.arange(frames, dtype=np.int64) * 20_000_000  # both sides on one 20 ms grid
    return {"sent": sent, "heard": heard, "t_req": t, "t_rcv": t, "rate": rate, "frame": n}


@pytest.mark.parametrize("rate", [8000, 16000])
def test_click_arrivals_finds_each_copy_to_the_sample(rate):
    peer = _synthetic_peer(rate, [43.0, 65.125])
    got = L.click_arrivals(peer, 217.0, 2)
    assert np.allclose(got[:, 0], 43.0, atol=1e3 / rate) and np.allclose(got[:, 1], 65.125, atol=1e3 / rate)
    # a copy that is not there is NaN, not a side lobe of the other one
    assert np.isnan(L.click_arrivals(_synthetic_peer(rate, [43.0]), 217.0, 2)[:, 1]).all()


@pytest.mark.timeout(90)
def test_an_echo_call_brings_every_click_back_twice_pjsip_first():
    """A real call (pjsua2 peer process -> Endpoint with the echo engine and pjsip's loop beside it):
    each click comes back through pjsip's loop and through our port, in that order."""
    from callbot.engine.serving.echo import EchoEngine

    engine = EchoEngine()
    try:
        peer, stats = L.sip_call_with_clicks(engine, "G722", 4, 217.0, loop="beside")
    finally:
        engine.close()
    arrivals = L.click_arrivals(peer, 217.0, 2)
    found = np.isfinite(arrivals).all(axis=1)
    assert found.sum() >= 3, arrivals
    assert (arrivals[found, 1] > arrivals[found, 0]).all(), arrivals
    assert stats is not None and stats["port_rate"] and stats["media"]["frames_received"] > 0
