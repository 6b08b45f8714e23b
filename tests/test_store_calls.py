"""`callbot serve` writing real calls into the call store (issue 14, points 1 and 7, the store's half).

`callbot serve --engine echo` as a process on loopback, a bot with a call flow, a pjsua2 caller that
presses a key: the call lands in the store (SQLite and PostgreSQL) with its record, its events and its
flow's transitions, and the store's JSON API served by serve ([store] api) shows it while the call
goes on. SIGKILL of serve mid-call leaves an SQLite store that passes PRAGMA integrity_check, the call
in it marked incomplete with what was known (answered, the codec, the digits), and importing the
call's files afterwards adds nothing the store did not expect.
"""
from __future__ import annotations

import json
import pathlib
import signal
import sqlite3
import subprocess
import sys
import wave

import httpx
import numpy as np
import pytest
from sqlalchemy.exc import SQLAlchemyError

from callbot.store import queries
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from tests.sip_peers import PjsuaPeer, _Lines, eventually, free_port, serve_config, stop_process, sidecars

pytestmark = pytest.mark.timeout(150)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]

FLOW = """
start = "greet"
[states.greet]
play = "tone.wav"
next = "menu"
[states.menu]
gather = { max_digits = 1, timeout_s = 20, interdigit_timeout_s = 2 }
on_digits = { "1" = "bye" }
on_no_input = "bye"
on_no_match = "bye"
[states.bye]
play = "tone.wav"
hangup = true
"""


def _tone(path: pathlib.Path, seconds: float = 0.4, rate: int = 16000) -> None:
    t = np.arange(int(rate * seconds)) / rate
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((6000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes())


class Serve:
    """`callbot serve --engine echo` with the flow above and the store at `store_url` (None: the default,
    calls.db in the recordings folder), its JSON API on a free port."""

    def __init__(self, directory: pathlib.Path, store_url: str | None):
        _tone(directory / "tone.wav")
        (directory / "support.toml").write_text(FLOW)
        self.sip_port, self.api_port, self.metrics_port = free_port(), free_port(1), free_port(1)
        url = f'url = "{store_url}"\n' if store_url else ""
        cfg = serve_config(directory, self.sip_port, self.metrics_port, tail=f"""
[[bots]]
name = "support"
flow = "support.toml"
[store]
{url}api = "127.0.0.1:{self.api_port}"
""")
        self.store_url = store_url or sqlite_url(directory / "calls" / "calls.db")
        self.calls = directory / "calls"
        self.uri = f"sip:echo@127.0.0.1:{self.sip_port}"
        self.proc = subprocess.Popen([*CALLBOT, "serve", "--engine", "echo", "--config", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.err = _Lines(self.proc.stderr, directory / "serve.stderr")
        try:
            self.err.wait_line("listening", 30)
        except BaseException:
            stop_process(self.proc, 10, signal.SIGKILL)
            raise

    def call(self, call_id: str) -> dict | None:
        """The call as the store holds it now (read beside the running server), None if not there yet."""
        try:
            with CallStore(self.store_url, migrate_schema=False) as store, store.reading() as conn:
                found = queries.call_detail(conn, call_id)
                if found is not None:
                    found["event_list"] = queries.call_events(conn, call_id)
                return found
        except SQLAlchemyError:
            return None

    def metric(self, name: str) -> float | None:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None

    def __enter__(self) -> Serve:
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, 15, signal.SIGKILL)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request) -> str | None:
    if request.param == "sqlite":
        return None  # serve's default: beside the recordings
    return request.getfixturevalue("postgres_server").new_database()


def test_a_flow_call_lands_in_the_store_with_its_events_and_transitions(tmp_path, store_url):
    with Serve(tmp_path, store_url) as serve, PjsuaPeer(user="bob", log_dir=tmp_path) as peer:
        call_id = peer.call(serve.uri)
        peer.expect("media", call_id=call_id, timeout=15)
        # while the call goes on: in the store, and on serve's JSON API
        live = eventually(lambda: (lambda c: c if c and c["call"]["flow_state"] == "menu" else None)(
            serve.call(call_id)), timeout=20, what="the live call at the menu")
        assert not live["call"]["complete"] and live["call"]["answered_at"] is not None
        with httpx.Client(base_url=f"http://127.0.0.1:{serve.api_port}", timeout=10) as http:
            shown = http.get(f"/api/calls/{call_id}").json()
            assert shown["call"]["bot"] == "support" and shown["call"]["complete"] is False
            assert call_id in [c["call_id"] for c in http.get("/api/calls", params={"bot": "support"}).json()["calls"]]
        peer.send("dtmf", call_id=call_id, digits="1", method="info")
        peer.expect("disconnected", call_id=call_id, timeout=20)  # the flow hangs up after its goodbye
        done = eventually(lambda: (lambda c: c if c and c["call"]["complete"] else None)(serve.call(call_id)),
                          timeout=20, what="the call complete in the store")
        assert serve.metric("callbot_store_written_total") >= len(done["event_list"])
        assert serve.metric("callbot_store_dropped_total") == 0
    call = done["call"]
    assert call["outcome"] == "bot_hangup" and call["hangup_cause"] == "local" and call["caller"] == "bob"
    assert (call["flow_name"], call["flow_state"], call["flow_reason"]) == ("support", "bye", "hangup")
    assert done["flow"]["path"] == ["greet", "menu", "bye"]
    assert [m["reason"] for m in done["flow"]["transitions"]] == ["start", "next", "digits", "hangup"]
    kinds = [e["event"] for e in done["event_list"]]
    for kind in ("CallConfirmed", "CallMedia", "DtmfReceived", "FlowTransition", "PlayFinished", "CallEnded"):
        assert kind in kinds, kinds
    assert "FrameStages" not in kinds
    # every event of the call's events file, in the same order; the store has more: the file opens with the
    # recording (the flow's start came before) and closes with it (CallEnded comes after)
    lines = [json.loads(line)["event"] for line in pathlib.Path(call["events_path"]).read_text().splitlines()]
    rest = iter(kinds)
    assert all(kind in rest for kind in lines), (lines, kinds)
    assert kinds[0] == "IncomingCall" and kinds[-1] == "CallEnded" and len(kinds) > len(lines)
    assert pathlib.Path(call["recording_path"]).is_file() and done["record"]["recording"]["complete"]


def test_sigkill_mid_call_leaves_a_consistent_store_with_the_call_incomplete(tmp_path):
    with Serve(tmp_path, None) as serve, PjsuaPeer(user="alice", log_dir=tmp_path) as peer:
        call_id = peer.call(serve.uri)
        media = peer.expect("media", call_id=call_id, timeout=15)
        eventually(lambda: (lambda c: c and c["call"]["flow_state"] == "menu")(serve.call(call_id)), timeout=20,
                   what="the call at the menu")
        peer.send("dtmf", call_id=call_id, digits="7", method="rfc4733")  # no such choice: the menu waits on
        known = eventually(lambda: (lambda c: c if c and any(e["event"] == "DtmfReceived" for e in c["event_list"])
                                    and c["call"]["codec"] else None)(serve.call(call_id)), timeout=20,
                           what="the digit and the codec in the store")
        serve.proc.send_signal(signal.SIGKILL)
        assert serve.proc.wait(10) == -signal.SIGKILL
    db = serve.calls / "calls.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    after = serve.call(call_id)
    assert after is not None and not after["call"]["complete"] and after["call"]["outcome"] == "open"
    assert after["call"]["answered_at"] is not None and after["call"]["codec"] == media["codec"]
    assert after["call"]["end_at"] is None and after["call"]["flow_state"] == "menu"
    assert [e["digit"] for e in after["event_list"] if e["event"] == "DtmfReceived"] == ["7"]
    assert len(after["event_list"]) >= len(known["event_list"])
    # the call's files, imported now, bring it up to what they hold: still incomplete, nothing twice
    out = subprocess.run([*CALLBOT, "calls", "import", str(serve.calls), "--store", sqlite_url(db)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "0 imported, 1 replaced" in out.stdout, out.stdout + out.stderr
    imported = serve.call(call_id)
    assert not imported["call"]["complete"]
    assert [e["digit"] for e in imported["event_list"] if e["event"] == "DtmfReceived"] == ["7"]
    assert len(imported["event_list"]) >= len(after["event_list"])


def test_a_dead_store_costs_one_line_and_the_call_and_its_files_go_on(tmp_path):
    dead = f"postgresql+psycopg://nobody@127.0.0.1:{free_port(1)}/calls"  # nothing listens there
    with Serve(tmp_path, dead) as serve, PjsuaPeer(user="carol", log_dir=tmp_path) as peer:
        call_id = peer.call(serve.uri)
        peer.expect("media", call_id=call_id, timeout=15)

        def sidecar(state: str | None = None) -> dict | None:
            for path in sidecars(serve.calls):
                try:
                    data = json.loads(path.read_text())
                except (FileNotFoundError, ValueError):
                    continue  # replaced between the listing and the read
                if data["call_id"] == call_id and (data["recording"]["complete"] if state is None
                                                   else (data["flow"] or {}).get("state") == state):
                    return data
            return None

        eventually(lambda: sidecar("menu"), timeout=20, what="the JSON record at the menu")
        peer.send("dtmf", call_id=call_id, digits="1", method="info")
        peer.expect("disconnected", call_id=call_id, timeout=20)  # the flow ran to its hang-up
        record = eventually(sidecar, timeout=20, what="the call's finished JSON record")
        assert record["flow"]["path"] == ["greet", "menu", "bye"]
        assert serve.metric("callbot_store_dropped_total") > 0 and serve.metric("callbot_store_written_total") == 0
        stop_process(serve.proc, 15)
        assert serve.proc.returncode == 0
    said = [line for line in serve.err.lines if "call store" in line]
    assert len(said) == 1 and "cannot be opened" in said[0] and "calls go on" in said[0], serve.err.lines
