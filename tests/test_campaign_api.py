"""Campaigns through the HTTP API (app/campaign_api.py in store/api.py's app): `callbot calls api` live on
127.0.0.1 (uvicorn), httpx as the client; the dialers it starts call a pjsua2 callee. A bad file is a 400
before any process starts; a campaign started paused dials nobody until resumed, then its progress counts
every row by outcome; a stop ends a dialer; the API's stop ends the dialers it started."""
from __future__ import annotations

import subprocess
import sys

import httpx

from tests.sip_peers import LOCALHOST, PjsuaPeer, eventually, free_port, serve_config, stop_process

CAMPAIGN = """
max_call_s = 1.0
calls_per_second = 5
[amd]
enabled = false
[window]
hours = "00:00-24:00"
"""


def _api(tmp_path) -> tuple[subprocess.Popen, str]:
    cfg = serve_config(tmp_path, free_port(), account="out", user="bot")
    port = free_port()
    log = open(tmp_path / "api.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "callbot.app.cli", "calls", "api", "--config", str(cfg),
                             "--listen", f"{LOCALHOST}:{port}"], cwd=tmp_path, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    base = f"http://{LOCALHOST}:{port}"

    def up() -> bool:
        try:
            return httpx.get(base + "/api/campaigns", timeout=1).status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None
    eventually(up, 30, "the API answering")
    assert proc.poll() is None, (tmp_path / "api.log").read_text()
    return proc, base


def test_campaigns_are_started_read_and_controlled_over_http(tmp_path):
    api, base = _api(tmp_path)
    try:
        with PjsuaPeer(user="people", answer="auto", log_dir=tmp_path) as peer, httpx.Client(base_url=base,
                                                                                              timeout=10) as http:
            user = peer.uri.split(":")[1].split("@")[0]
            rows = "\n".join(f"{peer.uri.replace(f'sip:{user}@', f'sip:p{i}@')},P{i}" for i in range(3))
            bad = http.post("/api/campaigns", json={"list_csv": "uri,name\n" + rows + "\n",
                                                    "campaign_toml": "max_concurrent = 0\n", "engine": "echo"})
            assert bad.status_code == 400 and "$.max_concurrent: Expected `int` >= 1" in bad.json()["error"]
            assert http.get("/api/campaigns").json() == {"campaigns": []}  # nothing was started

            r = http.post("/api/campaigns", json={"list_csv": "uri,name\n" + rows + "\n", "campaign_toml": CAMPAIGN,
                                                  "engine": "echo", "paused": True})
            assert r.status_code == 200, r.text
            cid = r.json()["id"]
            assert r.json()["status"] == "paused" and r.json()["progress"]["rows"] == 3
            log = tmp_path / "calls" / "campaigns" / cid / "campaign.log"
            eventually(lambda: log.exists() and "(paused)" in log.read_text(), 30, "the dialer up and paused")
            assert peer.all("incoming") == []
            assert http.post(f"/api/campaigns/{cid}/resume").json()["status"] == "running"
            eventually(lambda: http.get(f"/api/campaigns/{cid}").json()["status"] == "finished", 60,
                       "the campaign finished")
            one = http.get(f"/api/campaigns/{cid}").json()
            assert one["exit_status"] == 0
            assert one["progress"]["done"] == 3 and one["progress"]["by_outcome"] == {"answered-human": 3}, one
            assert len(peer.all("incoming")) == 3
            assert http.post(f"/api/campaigns/{cid}/pause").status_code == 409  # it has finished
            assert http.get("/api/campaigns/nope").status_code == 404
            assert http.post(f"/api/campaigns/{cid}/dance").status_code == 404

            # paths on this machine, started paused, then stopped: it dials nobody and ends
            (tmp_path / "two.csv").write_text("uri,name\n" + rows + "\n")
            (tmp_path / "two.toml").write_text(CAMPAIGN)
            r = http.post("/api/campaigns", json={"list": str(tmp_path / "two.csv"),
                                                  "campaign": str(tmp_path / "two.toml"), "engine": "echo",
                                                  "paused": True})
            second = r.json()["id"]
            assert [c["id"] for c in http.get("/api/campaigns").json()["campaigns"]] == sorted([cid, second],
                                                                                               reverse=True)
            assert http.post(f"/api/campaigns/{second}/stop").json()["status"] == "stopping"
            eventually(lambda: http.get(f"/api/campaigns/{second}").json()["status"] == "finished", 60,
                       "the stopped campaign ended")
            assert len(peer.all("incoming")) == 3  # the second campaign called nobody
    finally:
        assert stop_process(api, 40) == 0, (tmp_path / "api.log").read_text()


def test_callbot_serve_mounts_the_campaigns_and_wants_a_dialer_config_of_their_own(tmp_path):
    port = free_port()
    cfg = serve_config(tmp_path, free_port(), account="line", user="echo",
                       tail=f'[store]\napi = "{LOCALHOST}:{port}"\n')
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "callbot.app.cli", "serve", "--config", str(cfg), "--engine",
                              "echo"], cwd=tmp_path, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        base = f"http://{LOCALHOST}:{port}"

        def up() -> bool:
            try:
                return httpx.get(base + "/api/campaigns", timeout=1).status_code == 200
            except httpx.TransportError:
                return serve.poll() is not None
        eventually(up, 40, "serve's API answering")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
        assert httpx.get(base + "/api/campaigns").json() == {"campaigns": []}
        r = httpx.post(base + "/api/campaigns", json={"list_csv": f"uri\nsip:a@{LOCALHOST}:5\n",
                                                      "campaign_toml": CAMPAIGN, "engine": "echo"})
        assert r.status_code == 400 and r.json()["error"].startswith("config: the dialer's own config file"), r.text
        # the store's routes beside them (before the first call the writer has made no tables yet: a 503 of
        # its own, not a 404)
        calls = httpx.get(base + "/api/calls")
        assert calls.status_code in (200, 503) and ("calls" in calls.json() or "error" in calls.json())
    finally:
        assert stop_process(serve, 30) == 0, (tmp_path / "serve.log").read_text()


def test_a_dialer_that_exited_unreaped_is_over_for_a_registry_that_did_not_start_it():
    import os

    from callbot.app.campaign_api import _alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])  # exits at once; not reaped until wait()
    try:
        eventually(lambda: not _alive(child.pid), 10, "the exited child seen as over (a zombie)")
        assert os.path.exists(f"/proc/{child.pid}") or sys.platform == "darwin"  # still there, unreaped
    finally:
        child.wait(10)
    assert not _alive(child.pid) and _alive(os.getpid()) and not _alive(None)
