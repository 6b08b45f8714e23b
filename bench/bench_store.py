"""The call store's write cost per call, as a ratio to writing the call's JSON record (issue 14, "Done
when"): the same calls, in the same process, alternating round by round.

Why this shape: what the store adds to a server is what its writer thread (app/store_writer.py) spends
per call beside what the recorder already spends on the call's JSON files. So both sides write the same
synthetic minute-long call, built from the product's real events (engine/contract.py, sip/events.py,
encoded by app/event_log.py's event_line as both the files and the store get them):
- the JSON record (baseline), as app/recording.py writes it: each event a line of the events file,
  flushed to the OS at once; the sidecar replaced atomically (a new file renamed over) at the start,
  at every change the record reports (at most once a second) and every 10 s, and at the end;
- the store, as the writer writes it: the events grouped by the writer's 200 ms batches (the least
  filled batches, so the most commits: one call alone on a quiet server), one transaction per batch,
  the live record written in the batch where the sidecar would be rewritten, the call finished at the end.
The call: 60 s; the bot's text every 80 ms frame while it talks (about half the time: 375 BotText),
speech starts/stops of both legs, the caller's final words, a flow of 6 states, 3 digits, a hang-up:
about 470 events, 9 record updates. SQLite (WAL, synchronous=NORMAL, the store's settings) in a
temporary folder; PostgreSQL a server this bench starts (tests/pg_server.py) with fsync ON (each commit
durable, as in production), on 127.0.0.1. Wall time per call, median over ROUNDS; the CPU time of this
process beside it (PostgreSQL's own work is in its server processes, which wall time includes).

Beside the media clock: the writer is a Python thread in serve's SIP process, where a thread busy in
Python can make pjmedia's callbacks late (BENCHMARKS.md, "Media callback"). So the last test runs 4 calls
on a real pjmedia bridge (bench/bench_media.py's run_call) in turns with nothing else and with the store
writer (SQLite) fed the bus events of 4 calls talking (one serve process's load) and of 100 (a stress):
the callbacks' p99 lateness against the 20 ms grid, writer over idle.

Run (about 2.5 min; the [bench] extra: pytest-benchmark, which bench/bench_media.py uses):
    .venv/bin/python -m pytest bench/bench_store.py -p no:cacheprovider -q -s
    CALLBOT_BENCH_STORE_ROUNDS=15 ...   rounds (default 9; each writes CALLS calls per side)
    CALLBOT_BENCH_STORE_TURNS=8 ...     idle / writer turns of the lateness run (default 4, 4 s each)
"""
from __future__ import annotations

import os
import pathlib
import statistics
import tempfile
import time

import msgspec
import pytest

from callbot.app.event_log import event_line
from callbot.app.recording import _write_json_atomically
from callbot.engine.contract import BotSpeech, BotText, CallerSpeech, CallerWords, FlowTransition, PlayFinished
from callbot.sip import events as ev
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url

from bench_media import endpoint  # noqa: F401  (a pytest fixture: one pjsua2 endpoint for the lateness run)

ROUNDS = int(os.environ.get("CALLBOT_BENCH_STORE_ROUNDS", "9"))
CALLS = 5  # calls per side and round
CALL_S = 60.0
BATCH_S = 0.2  # app/store_writer.py BATCH_S
SIDECAR_S = 10.0  # app/recording.py SIDECAR_INTERVAL_S
T0 = 1_796_276_073.0
RESULTS: dict[str, dict[str, list[float]]] = {}


def _call(call_id: str) -> tuple[dict, list[tuple[float, dict]], list[float]]:
    """(the record, (t, events-file line) in order, the times the record changes)."""
    evs: list[tuple[float, object]] = [(0.0, ev.IncomingCall(at=0.0, call_id=call_id, account="line",
                                                             remote_uri="<sip:bob@h>", local_uri="<sip:menu@h>")),
                                       (0.1, ev.CallConfirmed(at=0.1, call_id=call_id, direction="inbound")),
                                       (0.1, ev.CallMedia(at=0.1, call_id=call_id, codec="G722", clock_rate=16000,
                                                          srtp=False))]
    states = ["greet", "menu", "lookup", "talk", "confirm", "bye"]
    for i, (frm, to) in enumerate(zip(["", *states], [*states, ""])):
        t = 0.2 + i * 11.0
        evs.append((t, FlowTransition(call_id=call_id, t_ms=t * 1000, flow="support", from_state=frm, to_state=to,
                                      reason="next")))
    for k, digit in enumerate("123"):
        t = 12.0 + k * 0.4
        evs.append((t, ev.DtmfReceived(at=t, call_id=call_id, digit=digit, method="rfc4733", duration_ms=100)))
    t = 0.3
    while t < CALL_S - 1:  # turns: the bot talks 3 s, the caller 3 s
        evs.append((t, BotSpeech(call_id=call_id, t_ms=t * 1000, speaking=True)))
        for f in range(int(3.0 / 0.08)):
            evs.append((t + f * 0.08, BotText(call_id=call_id, t_ms=(t + f * 0.08) * 1000, piece=" word")))
        evs.append((t + 3.0, BotSpeech(call_id=call_id, t_ms=(t + 3.0) * 1000, speaking=False)))
        evs.append((t + 3.0, PlayFinished(call_id=call_id, t_ms=(t + 3.0) * 1000, id="p", ms=3000.0)))
        evs.append((t + 3.1, CallerSpeech(call_id=call_id, t_ms=(t + 3.1) * 1000, speaking=True)))
        evs.append((t + 6.0, CallerSpeech(call_id=call_id, t_ms=(t + 6.0) * 1000, speaking=False)))
        evs.append((t + 6.1, CallerWords(call_id=call_id, t_ms=(t + 6.1) * 1000, text="yes please the second one",
                                         final=True, start_ms=(t + 3.1) * 1000, end_ms=(t + 6.0) * 1000)))
        t += 6.0
    evs.append((CALL_S, ev.CallEnded(at=CALL_S, call_id=call_id, code=200, reason="OK", cause="local")))
    evs.sort(key=lambda p: p[0])
    lines = [(t, msgspec.json.decode(event_line(e))) for t, e in evs]
    record = {"call_id": call_id, "direction": "inbound", "account": "line", "local_uri": "<sip:menu@h>",
              "remote_uri": "<sip:bob@h>", "start": T0, "answered": T0 + 0.1, "end": None, "codec": "G722",
              "codec_rate": 16000, "clock_rate": 16000, "srtp": False, "dtmf": [], "dtmf_dropped": 0,
              "transfer": None, "stream": None, "hangup_cause": None, "hangup_code": None, "hangup_reason": None,
              "engine": None, "flow": {"name": "support", "path": [], "state": "", "reason": "", "detail": ""},
              "caller_text": [], "request_uri": "sip:menu@h", "called": "menu", "caller": "bob", "headers": {},
              "labels": {"bot": "support", "route": "default"},
              "recording": {"wav": f"{call_id}.wav", "rate": 16000, "complete": False}, "events": f"{call_id}.events.jsonl"}
    changes = sorted({0.1, 12.0, 12.4, 12.8} | {s for s in range(10, int(CALL_S), 10)})  # answer, digits, every 10 s
    return record, lines, changes


def _record_at(record: dict, t: float, end: bool) -> dict:
    r = dict(record)
    r["dtmf"] = [{"digit": d, "method": "rfc4733", "at": T0 + 12 + 0.4 * i, "duration_ms": 100}
                 for i, d in enumerate("123") if t >= 12 + 0.4 * i]
    if end:
        r.update(end=T0 + CALL_S, hangup_cause="local", hangup_code=200, hangup_reason="OK")
        r["recording"] = dict(r["recording"], complete=True)
    return r


def write_json(folder: pathlib.Path, call) -> None:
    """The baseline: the call's JSON files as the recorder writes them."""
    record, lines, changes = call
    sidecar = str(folder / f"{record['call_id']}.json")
    _write_json_atomically(sidecar, _record_at(record, 0.0, False))
    pending = list(changes)
    with open(folder / record["events"], "ab") as f:
        for t, line in lines:
            f.write(msgspec.json.encode(line) + b"\n")
            f.flush()
            while pending and pending[0] <= t:
                _write_json_atomically(sidecar, _record_at(record, pending.pop(0), False))
    _write_json_atomically(sidecar, _record_at(record, CALL_S, True))


def write_store(store: CallStore, call) -> None:
    """The store's side: the writer's 200 ms batches, each one transaction."""
    record, lines, changes = call
    call_id = record["call_id"]
    pending = list(changes)
    with store.writes() as w:
        w.call_started(_record_at(record, 0.0, False))
    batch: list[dict] = []
    window = BATCH_S
    for t, line in lines:
        if t >= window and batch:
            with store.writes() as w:
                for b in batch:
                    w.event(call_id, b)
                while pending and pending[0] <= window:
                    w.call_updated(_record_at(record, pending.pop(0), False))
            batch = []
            window = (t // BATCH_S + 1) * BATCH_S
        batch.append(line)
    with store.writes() as w:
        for b in batch:
            w.event(call_id, b)
        w.call_finished(_record_at(record, CALL_S, True))


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _run(name: str, store: CallStore, tmp: pathlib.Path) -> None:
    calls_made = 0
    got = RESULTS.setdefault(name, {"json_wall": [], "json_cpu": [], "store_wall": [], "store_cpu": []})
    for r in range(ROUNDS + 1):  # round 0 warms both up and is dropped
        batch = [_call(f"{name}-{r}-{i}") for i in range(CALLS)]
        folder = tmp / f"r{r}"
        folder.mkdir()
        sides = [("json", lambda: [write_json(folder, c) for c in batch]),
                 ("store", lambda: [write_store(store, c) for c in batch])]
        if r % 2:
            sides.reverse()
        for side, fn in sides:
            wall, cpu = _timed(fn)
            if r:
                got[f"{side}_wall"].append(wall / CALLS)
                got[f"{side}_cpu"].append(cpu / CALLS)
        calls_made += CALLS
    n_events = len(_call("x")[1])
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"\n{name}: {n_events} events/call, {ROUNDS} rounds x {CALLS} calls; per call: "
          f"JSON {med['json_wall'] * 1000:.1f} ms wall / {med['json_cpu'] * 1000:.1f} ms CPU, "
          f"store {med['store_wall'] * 1000:.1f} ms wall / {med['store_cpu'] * 1000:.1f} ms CPU; "
          f"ratio store/JSON wall {med['store_wall'] / med['json_wall']:.1f}x, CPU "
          f"{med['store_cpu'] / med['json_cpu']:.1f}x; store per event "
          f"{med['store_wall'] / n_events * 1e6:.0f} us")
    with store.reading() as conn:
        from sqlalchemy import func, select

        from callbot.store.schema import calls, events

        assert conn.execute(select(func.count()).select_from(calls)).scalar_one() == calls_made
        assert conn.execute(select(func.count()).select_from(events)).scalar_one() == calls_made * n_events


@pytest.mark.timeout(600)
def test_store_write_cost_sqlite():
    with tempfile.TemporaryDirectory() as d, CallStore(sqlite_url(pathlib.Path(d) / "calls.db")) as store:
        _run("sqlite", store, pathlib.Path(d))


@pytest.mark.timeout(600)
def test_store_write_cost_postgresql():
    from tests.pg_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs on this machine")
    server = PostgresServer(bindir, durable=True).start()
    try:
        with tempfile.TemporaryDirectory() as d, CallStore(server.new_database()) as store:
            _run("postgresql", store, pathlib.Path(d))
    finally:
        server.stop()


# ---- the writer beside the media clock -------------------------------------------------------------------

LATENCY_CALLS = 4  # timed calls on the bridge (the pjsua2 wheel's limit per serve process)
LATENCY_TURNS = int(os.environ.get("CALLBOT_BENCH_STORE_TURNS", "4"))  # idle / writer alternations
LATENCY_S = 4.0  # per turn


class _Feed:
    """What serve's bus hands the writer for `calls` calls talking at once: each call's BotText every
    80 ms, a speech start/stop every 3 s, the caller's words every 6 s (about 14 events a second per call)."""

    def __init__(self, url: str, calls: int):
        import threading

        from callbot.app.event_bus import EventBus
        from callbot.app.store_writer import StoreWriter

        self.bus: EventBus = EventBus()
        self.writer = StoreWriter(url)
        self.writer.attach(self.bus)
        self.calls = calls
        self.on = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            if not self.on.wait(0.05):
                continue
            t_ms = tick * 80.0
            for c in range(self.calls):
                call_id = f"feed-{c}"
                self.bus.publish(BotText(call_id=call_id, t_ms=t_ms, piece=" word"))
                if tick % 37 == 0:
                    self.bus.publish(BotSpeech(call_id=call_id, t_ms=t_ms, speaking=bool(tick % 74)))
                if tick % 75 == 0:
                    self.bus.publish(CallerWords(call_id=call_id, t_ms=t_ms, text="yes the second one please",
                                                 final=True, start_ms=t_ms - 2000, end_ms=t_ms))
            tick += 1
            time.sleep(0.08)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.bus.close()
        self.writer.close()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("calls", [4, 100])
def test_media_callback_lateness_beside_the_store_writer(endpoint, calls, tmp_path):
    """4 calls on a real pjmedia bridge (bench/bench_media.py's run_call: its callbacks' lateness against
    the 20 ms grid), in turns: nothing else, then serve's store writer (SQLite) fed the events of `calls`
    calls talking (4: what one serve process carries; 100: a stress far past it). p99 lateness with the
    writer over p99 idle, the same calls in the same run."""
    from bench_media import run_call

    feed = _Feed(sqlite_url(tmp_path / "calls.db"), calls)
    got: dict[str, list[dict]] = {"idle": [], "writer": []}
    try:
        for turn in range(LATENCY_TURNS * 2):
            case = "writer" if turn % 2 else "idle"
            if case == "writer":
                feed.on.set()
            try:
                got[case].append(run_call(LATENCY_S, LATENCY_CALLS, scenarios=[(case, None, 0.005)])[case])
            finally:
                feed.on.clear()
                assert feed.writer.flush(60)
    finally:
        written, dropped = feed.writer.written, feed.writer.dropped
        feed.close()
    p99 = {k: statistics.median(r["late_p99_ms"] for r in v) for k, v in got.items()}
    worst = {k: max(r["late_max_ms"] for r in v) for k, v in got.items()}
    print(f"\nmedia callback lateness, {LATENCY_CALLS} calls on the bridge, {LATENCY_TURNS} turns of "
          f"{LATENCY_S:.0f} s each; the writer fed {calls} calls' events ({written} written, {dropped} dropped):"
          f" p99 idle {p99['idle']:.2f} ms, with the writer {p99['writer']:.2f} ms "
          f"({p99['writer'] / max(p99['idle'], 1e-3):.2f}x); max {worst['idle']:.2f} / {worst['writer']:.2f} ms")
    assert dropped == 0
