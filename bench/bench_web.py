"""The web panel's pages with 10,000 calls in the store (issue 16, "Done when": under a second), each as a
ratio to the store's JSON API answering the same query in the same process (store/api.py: the same
queries without the panel's sign-in, scope, templates and charts).

The store: 10,000 analysed calls over 10 days on SQLite (the default store; WAL, the store's settings),
3 bots, 2 tenants, 5 outcomes; each with its metrics (the analysis' long rows, sentiment included), 2 categories, a score
and 40 transcript words. Written straight into the tables (the writer's path is bench/bench_store.py's).
Both apps run in this process through Starlette's TestClient (no network); wall time per request,
median over ROUNDS, alternating page and API request by request. The panel's user is an admin (every
tenant) and, for the list, a viewer held to one tenant.

Run (about 30 s):
    .venv/bin/python -m pytest bench/bench_web.py -p no:cacheprovider -q -s
    CALLBOT_BENCH_WEB_CALLS=10000 CALLBOT_BENCH_WEB_ROUNDS=15 ...
"""
from __future__ import annotations

import os
import random
import re
import statistics
import time

from sqlalchemy import insert
from starlette.testclient import TestClient

from callbot.store.api import create_app as create_api
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from callbot.store.schema import calls, category_hits, metrics, scores, tenants, transcript_words
from callbot.web.app import create_app as create_panel
from callbot.web.users import Users

CALLS = int(os.environ.get("CALLBOT_BENCH_WEB_CALLS", "10000"))
ROUNDS = int(os.environ.get("CALLBOT_BENCH_WEB_ROUNDS", "15"))
WORDS = "hello i want to cancel my order please can you help me with the bill thank you".split()
OUTCOMES = ("caller_hangup", "bot_hangup", "transferred", "unanswered", "max_duration")


def _fill(store: CallStore, n: int) -> None:
    rng = random.Random(7)
    t0 = 1796270000.0
    with store.engine.begin() as conn:
        conn.execute(insert(tenants), [{"name": t, "created_at": t0} for t in ("acme", "beta")])
        for lo in range(0, n, 1000):
            rows, mrows, crows, srows, wrows = [], [], [], [], []
            for i in range(lo, min(n, lo + 1000)):
                cid = f"call-{i:05d}"
                start = t0 + i * 86.4
                outcome = OUTCOMES[i % len(OUTCOMES)]
                answered = None if outcome == "unanswered" else start + 1
                rows.append({"call_id": cid, "direction": "inbound", "tenant": ("acme", "beta")[i % 2],
                             "bot": f"bot{i % 3}", "caller": f"+1555{i:07d}", "called": "+15550000",
                             "start_at": start, "answered_at": answered, "end_at": start + 60,
                             "duration_s": None if answered is None else 59.0, "outcome": outcome,
                             "complete": True, "record": {"call_id": cid}, "updated_at": start + 61})
                for name, value in (("duration_ms", 59000.0), ("overtalk_count", rng.randint(0, 4)),
                                    ("barge_ins", rng.randint(0, 3)), ("overtalk_ms", rng.uniform(0, 3000)),
                                    ("response_latency_p50_ms", rng.uniform(200, 600)),
                                    ("response_latency_p99_ms", rng.uniform(500, 1500))):
                    mrows.append({"call_id": cid, "leg": "call", "name": name, "value": float(value)})
                for leg in ("caller", "bot"):
                    for name in ("talk_ms", "words", "interruptions", "segments"):
                        mrows.append({"call_id": cid, "leg": leg, "name": name, "value": rng.uniform(0, 100)})
                    mrows.append({"call_id": cid, "leg": leg, "name": "sentiment", "value": rng.uniform(-1, 1)})
                crows += [{"call_id": cid, "category": c, "matched": rng.random() < 0.5, "evidence": []}
                          for c in ("disclosure", "cancellation")]
                srows.append({"call_id": cid, "scorecard": "qa", "score": float(rng.randint(0, 4)), "max_score": 4.0})
                wrows += [{"call_id": cid, "leg": ("caller", "bot")[k % 2], "start_ms": k * 700.0,
                           "end_ms": k * 700.0 + 400, "text": rng.choice(WORDS), "redacted": False} for k in range(40)]
            for table, batch in ((calls, rows), (metrics, mrows), (category_hits, crows), (scores, srows),
                                 (transcript_words, wrows)):
                conn.execute(insert(table), batch)


def _signed_in(client: TestClient, name: str, password: str) -> None:
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"csrf": token, "name": name, "password": password, "next": "/calls"})
    assert r.status_code == 303


def _median_ms(client: TestClient, path: str) -> float:
    t = time.perf_counter()
    r = client.get(path)
    took = (time.perf_counter() - t) * 1000
    assert r.status_code == 200, (path, r.status_code)
    return took


def test_pages_with_10000_calls(tmp_path):
    store = CallStore(sqlite_url(tmp_path / "calls.db"))
    t = time.perf_counter()
    _fill(store, CALLS)
    print(f"\n{CALLS} calls written in {time.perf_counter() - t:.1f} s")
    users = Users(store)
    users.add("ada", "admin", "bench-password")
    users.add("vic", "viewer", "bench-password", tenant="acme")
    panel = TestClient(create_panel(store), follow_redirects=False)
    viewer = TestClient(create_panel(store), follow_redirects=False)
    api = TestClient(create_api(store))
    _signed_in(panel, "ada", "bench-password")
    _signed_in(viewer, "vic", "bench-password")
    pairs = [  # (what, panel client, panel path, API path)
        ("call list, first page", panel, "/calls", "/api/calls?limit=50"),
        ("call list, a viewer of one tenant", viewer, "/calls", "/api/calls?limit=50&tenant=acme"),
        ("call list, page 100", panel, "/calls?offset=4950", "/api/calls?limit=50&offset=4950"),
        ("call list, text search", panel, "/calls?text=cancel", "/api/calls?limit=50&text=cancel"),
        ("call list, bot + outcome", panel, "/calls?bot=bot1&outcome=transferred",
         "/api/calls?limit=50&bot=bot1&outcome=transferred"),
        ("call page", panel, "/calls/call-05000", "/api/calls/call-05000"),
        ("dashboard, all calls", panel, "/dashboard", "/api/stats"),
        ("dashboard, one bot", panel, "/dashboard?bot=bot2", "/api/stats?bot=bot2"),
    ]
    print(f"{'page':<36} {'panel p50 ms':>12} {'max':>8} {'API p50 ms':>11} {'ratio':>6}")
    worst = 0.0
    for what, client, page, apipath in pairs:
        client.get(page), api.get(apipath)  # warm: templates compiled, caches filled
        mine, theirs = [], []
        for _ in range(ROUNDS):
            mine.append(_median_ms(client, page))
            theirs.append(_median_ms(api, apipath))
        m, a = statistics.median(mine), statistics.median(theirs)
        worst = max(worst, max(mine))
        print(f"{what:<36} {m:12.1f} {max(mine):8.1f} {a:11.1f} {m / a:6.2f}x")
    print(f"slowest panel request of all rounds: {worst:.0f} ms")
    store.close()
    assert worst < 1000.0 * 5  # a bound against a hang, not the measurement (that is the table above)
