"""What looking at the flow file and the config again costs serve per call (app/flow_reload.py,
app/bot_reload.py), each as a ratio to what serve did before in the same process.

- A call starts, nothing changed: `FlowFiles.current` (a `stat` and a compare) against the plain dict
  lookup of the flow it replaced.
- An INVITE, nothing changed: `BotReload.screen` (a `stat`, then the routes) against `CallRoutes.screen`.
- The first call after a save: `FlowFiles.current` reading, checking and swapping the new file (and
  decoding its clip) against `load_flow` of the same file (what serve's start does for it).
- The first INVITE after a config save: `BotReload.refresh` (read, `parse_settings`, new rules) against
  `parse_settings` alone.
- The editor's page of a bot with a 40-state flow (checked, drawn as SVG, numbered) against the panel's
  users page, through Starlette's TestClient in this process (no network).

Medians over ROUNDS batches. Run (about 20 s):

    .venv/bin/python -m pytest bench/bench_flow_reload.py -p no:cacheprovider -q -s
"""
from __future__ import annotations

import os
import re
import statistics
import time

ROUNDS = 9
CALLS = 2000  # lookups per batch


def _median_ns(fn, n: int) -> float:
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        times.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(times)


def _flow_text(states: int) -> str:
    parts = ['start = "s0"']
    for i in range(states):
        nxt = f"s{i + 1}" if i + 1 < states else "s0"
        parts.append(f'[states.s{i}]\nplay = "tone.wav"\ngather = {{ max_digits = 1, timeout_s = 5 }}\n'
                     f'on_digits = {{ "1" = "{nxt}", "2" = "bye" }}\non_no_input = "bye"\non_no_match = "s{i}"')
    parts.append('[states.bye]\nplay = "tone.wav"\nhangup = true')
    return "\n".join(parts) + "\n"


def test_reload_costs(tmp_path, capsys):
    from starlette.testclient import TestClient

    from callbot.app.bot_config import BotConfig
    from callbot.app.bot_reload import BotReload
    from callbot.app.flow_host import load_clip
    from callbot.app.flow_reload import FlowFiles
    from callbot.app.routes import CallRoutes
    from callbot.app.settings import load_settings, parse_settings
    from callbot.flows.schema import load_flow
    from callbot.store.call_store import CallStore
    from callbot.web.app import create_app
    from callbot.web.users import Users
    from tests.test_routes import record
    from tests.test_store_calls import _tone

    _tone(tmp_path / "tone.wav")
    flow_path = tmp_path / "support.toml"
    text = _flow_text(40)
    flow_path.write_text(text)
    cfg = tmp_path / "callbot.toml"
    cfg.write_text('recordings_dir = "calls"\n[[bots]]\nname = "support"\nflow = "support.toml"\n'
                   '[[routes]]\nbot = "support"\ndid = "5550100"\n[analytics]\nenabled = false\n')
    settings = load_settings(cfg)
    flow = load_flow(flow_path)
    flows = {"support": ("support", flow)}
    files = FlowFiles(flows, {"support": str(flow_path)}, load_clip, {})
    rows = []

    plain = _median_ns(lambda: flows["support"], CALLS)
    checked = _median_ns(lambda: files.current("support"), CALLS)
    rows.append(("a call starts, flow unchanged", checked, plain, "dict lookup"))

    routes = CallRoutes(settings)
    reload = BotReload(cfg, settings, routes)
    rec = record(uri="sip:5550100@127.0.0.1")
    plain = _median_ns(lambda: routes.screen(rec), CALLS)
    checked = _median_ns(lambda: reload.screen(rec), CALLS)
    rows.append(("an INVITE, config unchanged", checked, plain, "CallRoutes.screen"))

    texts = [text, text.replace('timeout_s = 5 }', 'timeout_s = 6 }', 1)]
    turn = [0]
    tick = [time.time_ns()]

    def touch(path):  # same size, maybe the same clock tick: a distinct mtime, as a later save has
        tick[0] += 1000
        os.utime(path, ns=(tick[0], tick[0]))

    def changed_flow():
        turn[0] ^= 1
        flow_path.write_text(texts[turn[0]])
        touch(flow_path)
        files.current("support")

    def write_only():
        turn[0] ^= 1
        flow_path.write_text(texts[turn[0]])
        load_flow(flow_path)

    reloads_before = files.reloads
    checked = _median_ns(changed_flow, 20)
    plain = _median_ns(write_only, 20)
    assert files.reloads - reloads_before == ROUNDS * 20
    rows.append(("first call after a flow save (40 states)", checked, plain, "write + load_flow"))

    cfgs = [cfg.read_text(), cfg.read_text().replace('did = "5550100"', 'did = "5550101"')]

    def changed_config():
        turn[0] ^= 1
        cfg.write_text(cfgs[turn[0]])
        touch(cfg)
        reload.refresh()

    def parse_only():
        turn[0] ^= 1
        cfg.write_text(cfgs[turn[0]])
        parse_settings(cfg.read_bytes(), base_dir=tmp_path, resolve_secrets=False)

    checked = _median_ns(changed_config, 20)
    plain = _median_ns(parse_only, 20)
    rows.append(("first INVITE after a config save", checked, plain, "write + parse_settings"))
    reload.close()

    store = CallStore(f"sqlite:///{tmp_path / 'calls.db'}", migrate_schema=True)
    Users(store).add("ada", "admin", "bench-password-1")
    client = TestClient(create_app(store, bots=BotConfig(cfg)), base_url="http://127.0.0.1")
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"csrf": token, "name": "ada", "password": "bench-password-1", "next": "/bots"})
    assert 'data-state="s39"' in client.get("/bots/support").text
    checked = _median_ns(lambda: client.get("/bots/support"), 5)
    plain = _median_ns(lambda: client.get("/users"), 5)
    rows.append(("editor page, 40-state flow", checked, plain, "users page"))
    client.close()
    store.close()

    with capsys.disabled():
        print()
        print("| what | cost | baseline | baseline cost | ratio |")
        print("|---|---|---|---|---|")
        for what, cost, base, base_name in rows:
            print(f"| {what} | {_fmt(cost)} | {base_name} | {_fmt(base)} | {cost / base:.2f}x |")


def _fmt(ns: float) -> str:
    return f"{ns / 1e6:.2f} ms" if ns >= 1e5 else f"{ns / 1e3:.2f} µs"
