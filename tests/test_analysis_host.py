"""The glue that analyses serve's calls (app/analysis_host.py), its settings and its commands, without SIP.

- [analytics] and [[tenants]] rules: defaults, paths relative to the config, every rules file checked at
  load as one line; `callbot serve` with a broken one exits 2 with that line; `callbot rules check`.
- The Recorder's hook: `on_final` comes once a call's files are final, after the caller recognizer's
  last words when there is one (not at the audio's end).
- AnalysisHost on a scripted call's files (tests/analytics_calls.py) with the real pool, store writer and
  pocketsphinx post-call: the tenant's rules, the result in the store and beside the recording, the
  workers niced; at shutdown an analysis still going is stopped and counted as left.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from callbot.app.recording import Recorder
from callbot.app.settings import ConfigError, parse_settings
from tests.analytics_calls import agent_call, bot_text_events, write_call
from tests.sip_peers import eventually, free_port, serve_config

pytestmark = pytest.mark.timeout(180)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]

RULES = """
[[categories]]
name = "disclosure given"
[[categories.rules]]
kind = "phrase"
leg = "bot"
phrases = ["this call may be recorded"]
first_s = 15

[[scorecards]]
name = "qa"
[[scorecards.items]]
name = "disclosure"
weight = 2
category = "disclosure given"
"""
BROKEN = '[[categories]]\nname = "x"\n[[categories.rules]]\nkind = "keyword"\n'


def test_analytics_settings_default_and_resolve_rules_beside_the_config(tmp_path):
    (tmp_path / "rules").mkdir()
    for name in ("acme.toml", "all.toml"):
        (tmp_path / "rules" / name).write_text(RULES)
    s = parse_settings("", base_dir=tmp_path)
    assert (s.analytics.enabled, s.analytics.workers, s.analytics.caller_transcript, s.analytics.rules) == (
        True, 1, "live", None)
    s = parse_settings("""
[analytics]
workers = 2
dead_air_s = 5
caller_transcript = "post"
redacted_recording = true
rules = "rules/all.toml"
[[tenants]]
name = "acme"
rules = "rules/acme.toml"
[[tenants]]
name = "other"
""", base_dir=tmp_path)
    assert s.analytics.rules == os.fspath(tmp_path / "rules" / "all.toml")
    assert s.rules_for("acme") == os.fspath(tmp_path / "rules" / "acme.toml")
    assert s.rules_for("other") == s.rules_for(None) == s.rules_for("gone") == s.analytics.rules
    from callbot.app.analysis_host import analysis_options

    o = analysis_options(s, s.rules_for("acme"), "de-CH")
    assert (o.metrics.dead_air_ms, o.caller_transcript, o.redacted_recording, o.language) == (5000, "post", True, "de-CH")


@pytest.mark.parametrize("text, expected", [
    ('[analytics]\nworkers = 0', r"\$\.analytics\.workers: Expected `int` >= 1"),
    ('[analytics]\ncaller_transcript = "whisper"', r"\$\.analytics\.caller_transcript: Invalid enum value 'whisper', "
                                                   r"expected one of 'live', 'post'"),
    ('[analytics]\nrule = "x.toml"', r"\$\.analytics: Object contains unknown field `rule`"),
    ('[analytics]\nrules = "missing.toml"', r"\$\.analytics\.rules: .*missing\.toml: cannot be read"),
    ('[[tenants]]\nname = "acme"\nrules = "broken.toml"',
     r"\$\.tenants\[0\]\.rules: .*broken\.toml: \$\.categories\[0\]\.rules\[0\]\.kind: Invalid value 'keyword'"),
])
def test_bad_analytics_settings_are_one_line(tmp_path, text, expected):
    (tmp_path / "broken.toml").write_text(BROKEN)
    with pytest.raises(ConfigError, match=expected) as info:
        parse_settings(text, base_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_rules_are_not_read_with_analytics_off(tmp_path):
    s = parse_settings('[analytics]\nenabled = false\nrules = "missing.toml"', base_dir=tmp_path)
    assert not s.analytics.enabled


def test_a_broken_rules_file_stops_serve_at_load_with_one_line(tmp_path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "acme.toml").write_text(BROKEN)
    cfg = serve_config(tmp_path, free_port(), None, tail='[[tenants]]\nname = "acme"\nrules = "rules/acme.toml"\n'
                                                         '[analytics]\nenabled = true\n')
    out = subprocess.run([*CALLBOT, "serve", "--engine", "echo", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"callbot: error: {cfg}: $.tenants[0].rules: {tmp_path / 'rules' / 'acme.toml'}: "
                           "$.categories[0].rules[0].kind: Invalid value 'keyword'"), line


def test_callbot_rules_check(tmp_path):
    (tmp_path / "good.toml").write_text(RULES)
    (tmp_path / "bad.toml").write_text(BROKEN + '[[scorecards]]\nname = "s"\n[[scorecards.items]]\nname = "i"\n'
                                       'category = "nope"\n')
    ok = subprocess.run([*CALLBOT, "rules", "check", str(tmp_path / "good.toml")], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and ok.stdout == f"{tmp_path / 'good.toml'}: ok (1 categories, 1 scorecards)\n"
    bad = subprocess.run([*CALLBOT, "rules", "check", str(tmp_path / "bad.toml"), str(tmp_path / "good.toml"),
                          str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == f"{tmp_path / 'good.toml'}: ok (1 categories, 1 scorecards)\n"
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("callbot: error: ") for line in lines), lines
    assert "bad.toml: $.categories[0].rules[0].kind: Invalid value 'keyword'" in lines[0]
    assert lines[1].startswith(f"callbot: error: {tmp_path / 'none.toml'}: cannot be read")


class _Listener:
    """A caller recognizer as the Recorder sees one (app/recording.py CallerListener): hears nothing, is told
    when each call closes."""

    def __init__(self):
        self.closed_calls: list[str] = []

    def opened(self, record, rate) -> None:
        pass

    def heard(self, call_id, samples) -> None:
        pass

    def closed(self, call_id) -> None:
        self.closed_calls.append(call_id)


@pytest.mark.parametrize("listening", [False, True])
def test_the_recorder_says_when_a_calls_files_are_final(tmp_path, listening):
    listener = _Listener() if listening else None
    recorder = Recorder(tmp_path, poll_ms=10, listener=listener)
    finals: list[tuple[str, bool, bool]] = []
    seen = threading.Event()

    def final(rec) -> None:
        complete = json.loads(open(rec.sidecar_path).read())["recording"]["complete"]
        finals.append((rec.call_id, complete, rec.frames_written == 320))
        seen.set()

    recorder.on_final.append(final)
    recorder.on_final.append(lambda rec: 1 / 0)  # a watcher's bug costs nothing else
    try:
        rec = recorder.start({"call_id": "c1", "start": 1.0}, 16000)
        rec.caller.write(np.zeros(320, np.int16))
        rec.bot.write(np.zeros(320, np.int16))
        recorder.finish(rec, {"call_id": "c1", "start": 1.0, "end": 2.0})
        if listening:  # the files wait for the recognizer's last words
            assert finals == [] and listener.closed_calls == ["c1"]
            recorder.transcript_done("c1")
        assert seen.wait(10)
    finally:
        recorder.close()
    assert finals == [("c1", True, True)] and recorder.error is None


@pytest.fixture
def acme_call(tmp_path):
    """A scripted call of tenant acme, recorded (its files) and in the store (imported, not analysed)."""
    from callbot.store.call_store import CallStore
    from callbot.store.database import sqlite_url

    (tmp_path / "acme.toml").write_text(RULES)
    folder = tmp_path / "calls" / "acme"
    folder.mkdir(parents=True)
    call = agent_call()
    wav, side, events = write_call(call, folder, "acme-1", record={"labels": {"tenant": "acme", "bot": "support"},
                                                                  "start": 1796270000.0},
                                   events=bot_text_events(call, "acme-1"))
    url = sqlite_url(tmp_path / "calls" / "calls.db")
    with CallStore(url) as store:
        store.import_call(json.loads(open(side).read()), [], directory=os.fspath(folder))
    settings = parse_settings("""
recordings_dir = "calls"
[[bots]]
name = "support"
[[tenants]]
name = "acme"
rules = "acme.toml"
[analytics]
caller_transcript = "post"
""", base_dir=tmp_path)
    recording = types.SimpleNamespace(call_id="acme-1", wav_path=wav, sidecar_path=side, events_path=events)
    return settings, url, recording


def test_the_host_analyses_a_final_call_into_the_store_and_beside_it(acme_call):
    from callbot.app.analysis_host import AnalysisHost
    from callbot.app.store_writer import StoreWriter
    from callbot.store import queries
    from callbot.store.call_store import CallStore

    settings, url, recording = acme_call
    seen: list[tuple[str, float | None]] = []
    writer = StoreWriter(url)
    host = AnalysisHost(settings, writer, observe=lambda result, seconds: seen.append((result, seconds)))
    try:
        host.call_final(recording)
        eventually(lambda: host.done == 1, timeout=120, what="the analysis")
        assert writer.flush(20)
        # the workers run below this process's priority
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        pids = host.pool.worker_pids()
        assert pids and all(os.getpriority(os.PRIO_PROCESS, p) == mine + 10 for p in pids)
        # a second analysis of the call, stopped by a shutdown that waits for nothing: left, counted
        host.call_final(recording)
        eventually(lambda: host.pool.pending == 1, timeout=20, what="the second analysis running")
    finally:
        host.close(wait_s=0)
        writer.close()
    assert (host.done, host.left, host.failed, host.dropped) == (1, 1, 0, 0)
    assert [r for r, _ in seen] == ["done", "left"] and seen[0][1] > 0
    with CallStore(url) as store, store.reading() as conn:
        d = queries.call_detail(conn, "acme-1")
    assert d["analysis"]["transcript_engine"] == "pocketsphinx" and d["analysis"]["errors"] == []
    assert [(c["category"], c["matched"]) for c in d["categories"]] == [("disclosure given", True)]
    assert [(s["scorecard"], s["score"]) for s in d["scores"]] == [("qa", 2)]
    beside = json.loads(open(recording.wav_path[:-4] + ".analysis.json").read())
    assert beside["transcript_engine"] == "pocketsphinx" and beside["scores"][0]["score"] == 2
    assert any(w["leg"] == "caller" for w in beside["words"])


def test_a_worker_killed_mid_analysis_costs_that_call_only(acme_call):
    """A worker that dies (a crash in a native library) breaks its executor for good: that call counts as
    failed, and the next call gets a new pool. A call beyond max_pending is dropped, counted."""
    import signal

    import msgspec

    from callbot.app.analysis_host import AnalysisHost

    settings, url, recording = acme_call
    settings = msgspec.structs.replace(settings, analytics=msgspec.structs.replace(settings.analytics, max_pending=1))
    host = AnalysisHost(settings, None)
    try:
        host.call_final(recording)
        eventually(lambda: host.pool.pending == 1 and host.pool.worker_pids(), timeout=20, what="a worker at work")
        host.call_final(recording)  # the pool holds max_pending (1) already: refused, never waited for
        eventually(lambda: host.dropped == 1, timeout=20, what="the second call dropped")
        [pid] = host.pool.worker_pids()
        os.kill(pid, signal.SIGKILL)
        eventually(lambda: host.failed == 1, timeout=30, what="the call counted as failed")
        host.call_final(recording)
        eventually(lambda: host.done == 1, timeout=120, what="the next call analysed by a new pool")
        assert host.pool.worker_pids() and pid not in host.pool.worker_pids()
    finally:
        host.close(wait_s=10)
    assert (host.done, host.failed, host.left, host.dropped) == (1, 1, 0, 1)
