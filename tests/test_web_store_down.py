"""The web panel with its database gone (PostgreSQL stopped under a running `callbot web`): every page, a
sign-in and a POST answer one line with a 503 ("the store cannot be read" / "... written"), the panel's
log has no traceback, and the panel serves again once the database is back - without a restart.

Before this, the user read at each click and the sign-in were outside the pages' own catch: a signed-in
user clicking while the database was down got Starlette's bare 500 and a traceback in the log."""
from __future__ import annotations

import re
import socket
import subprocess

import httpx
import pytest

from tests.pg_server import PostgresServer, find_bindir
from tests.sip_peers import _Lines, eventually, free_port, stop_process
from tests.test_web import ADMIN_PW, CALLBOT, _signed_in, add_user

pytestmark = pytest.mark.timeout(180)


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_the_panel_says_the_store_is_down_in_one_line_and_serves_again_when_it_is_back(tmp_path):
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl, postgres) on this machine")
    server = PostgresServer(bindir).start()  # its own: this test stops it
    proc = None
    try:
        url = server.new_database()
        cfg = tmp_path / "callbot.toml"
        cfg.write_text(f'recordings_dir = "calls"\n[store]\nurl = "{url}"\n')
        add_user(cfg, "ada", "admin", ADMIN_PW)
        port = free_port(socket.SOCK_STREAM)
        proc = subprocess.Popen([*CALLBOT, "web", "--listen", f"127.0.0.1:{port}", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = _Lines(proc.stderr, tmp_path / "web.stderr")
        err.wait_line("listening", 30)
        base = f"http://127.0.0.1:{port}"
        ada = _signed_in(base, "ada", ADMIN_PW)
        listing = ada.get("/calls")
        assert listing.status_code == 200
        token = _csrf(listing.text)

        server.pause()
        for path in ("/calls", "/dashboard", "/calls/some-call", "/users"):
            r = ada.get(path)
            assert r.status_code == 503 and "the store cannot be read" in r.text, (path, r.status_code, r.text[-400:])
        r = ada.post("/calls/some-call/delete", data={"csrf": token, "confirm": "yes"})
        assert r.status_code == 503 and "the store cannot be written" in r.text, (r.status_code, r.text[-400:])
        with httpx.Client(base_url=base, timeout=10) as anon:  # a sign-in reads the users
            r = anon.post("/login", data={"csrf": _csrf(anon.get("/login").text), "name": "ada",
                                          "password": ADMIN_PW, "next": "/calls"})
        assert r.status_code == 503 and "the store cannot be written" in r.text, (r.status_code, r.text[-400:])

        server.resume()
        eventually(lambda: ada.get("/calls").status_code == 200, timeout=30, what="the panel serving again")
        ada.close()
        stop_process(proc)
        proc = None
        log = (tmp_path / "web.stderr").read_text()
        assert "Traceback" not in log, log[-3000:]
        assert "the store cannot be read" in log, log[-3000:]  # said in the log too, one line a request
    finally:
        if proc is not None:
            stop_process(proc)
        server.stop()
