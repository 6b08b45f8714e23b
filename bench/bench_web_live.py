"""The live calls and system pages (web/live.py, web/system.py) with 10,000 calls in the store, as a ratio
to the store's JSON API answering `/api/stats` in the same process (bench/bench_web.py's store and method:
Starlette's TestClient, wall time per request, median over ROUNDS, alternating page and API).

Three cases: /system over the store alone (`callbot web`: its summary counts the store's calls), /live
and /system with a serve link holding LIVE calls in progress, each with the most transcript lines the
link keeps (app/web_link.py MAX_LINES): the worst page /live renders. The link here is a plain object
answering the ServeLink calls with fixed data (what is measured is the panel, not serve).

Run (about 30 s):
    .venv/bin/python -m pytest bench/bench_web_live.py -p no:cacheprovider -q -s
"""
from __future__ import annotations

import os
import statistics

from starlette.testclient import TestClient

from bench.bench_web import ROUNDS, _fill, _median_ms, _signed_in
from callbot.app.web_link import MAX_LINES
from callbot.store.api import create_app as create_api
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from callbot.web.app import create_app as create_panel
from callbot.web.serve_link import LiveCallView, TranscriptLine
from callbot.web.users import Users

CALLS = int(os.environ.get("CALLBOT_BENCH_WEB_CALLS", "10000"))
LIVE = int(os.environ.get("CALLBOT_BENCH_WEB_LIVE", "64"))  # calls in progress: a big serve's worth


class FixedLink:
    """LIVE calls in progress, each with MAX_LINES lines of both legs."""

    def __init__(self, n: int):
        line = "i would like to change the delivery address of my last order please"
        self.views = [LiveCallView(call_id=f"live-{i}", tenant=("acme", "beta")[i % 2], bot=f"bot{i % 3}",
                                   direction="inbound", remote=f"+1555{i:07d}", started=1796270000.0 + i,
                                   state="talk", speaking={"caller": True, "bot": False},
                                   lines=[TranscriptLine(leg=("caller", "bot")[k % 2], text=line) for k in range(MAX_LINES)])
                      for i in range(n)]

    def calls(self):
        return list(self.views)

    def subscribe(self, notify):
        raise NotImplementedError  # no stream in this bench

    def hangup(self, call_id):
        raise NotImplementedError

    def transfer(self, call_id, target):
        raise NotImplementedError

    def system(self):
        return {"serve": True, "started_at": 1796270000.0, "engine": "InferenceProcess",
                "model": {"weights": "/models/personaplex", "architecture": None, "quantization": "q4", "kv_bits": 8,
                          "process": True, "service": None, "batch": True, "max_calls": None},
                "slots": {"used": LIVE, "capacity": 64, "model_limit": None},
                "steps": [{"batch": b, "frames": 1000, "mean_ms": 20.0 + b, "max_ms": 40.0 + b} for b in range(1, 9)],
                "workers": [{"name": "engine", "what": "InferenceProcess", "state": "process 1"}],
                "sip": [{"name": f"acc{i}", "uri": f"sip:acc{i}@pbx", "direct": False, "registered": True,
                         "last_error": None} for i in range(8)],
                "metrics_url": "http://127.0.0.1:9464/metrics",
                "bus": [{"name": n, "dropped": 0, "pending": 0} for n in ("log", "metrics", "web-live")]}


def test_live_and_system_pages_with_10000_calls(tmp_path):
    store = CallStore(sqlite_url(tmp_path / "calls.db"))
    _fill(store, CALLS)
    Users(store).add("ada", "admin", "bench-password")
    alone = TestClient(create_panel(store), follow_redirects=False)
    served = TestClient(create_panel(store, link=FixedLink(LIVE)), follow_redirects=False)
    api = TestClient(create_api(store))
    for client in (alone, served):
        _signed_in(client, "ada", "bench-password")
    cases = [("system, store alone", alone, "/system"), (f"live, {LIVE} calls x {MAX_LINES} lines", served, "/live"),
             ("system, serve attached", served, "/system")]
    print(f"\n{'page':<36} {'panel p50 ms':>12} {'max':>8} {'/api/stats p50':>14} {'ratio':>6}")
    worst = 0.0
    for what, client, path in cases:
        client.get(path), api.get("/api/stats")
        mine, theirs = [], []
        for _ in range(ROUNDS):
            mine.append(_median_ms(client, path))
            theirs.append(_median_ms(api, "/api/stats"))
        m, a = statistics.median(mine), statistics.median(theirs)
        worst = max(worst, max(mine))
        print(f"{what:<36} {m:12.1f} {max(mine):8.1f} {a:14.1f} {m / a:6.2f}x")
    print(f"slowest request of all rounds: {worst:.0f} ms")
    store.close()
    assert worst < 1000.0 * 5  # a bound against a hang, not the measurement (the table above)
