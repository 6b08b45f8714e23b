"""`callbot calls analyze` over past calls (issue 14, point 5: "evaluated at hang-up and on demand over past
calls"), as a user runs it: processes, a config with a tenant's rules, a store on SQLite.

Two scripted calls (tests/analytics_calls.py: espeak-ng sentences placed at known times in a stereo WAV,
the bot's words as BotText events) are recorded files, imported into the store with `callbot calls
import`. `calls analyze --missing` analyses what has no analysis, with each call's tenant's rules;
`--rules-only` evaluates a changed rules file on the stored analysis without reading audio; `calls
list --category/--min-score` then finds the calls by what was written. Bad input is one line.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from callbot.store import queries
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from tests.analytics_calls import agent_call, bot_text_events, write_call

pytestmark = pytest.mark.timeout(300)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]

ACME = """
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
weight = 3
category = "disclosure given"
[[scorecards.items]]
name = "no dead air"
weight = 1
rule = { kind = "non_talk", longer_than_s = 3, not = true }
"""

DEFAULT = """
[[categories]]
name = "anything said"
[[categories.rules]]
kind = "phrase"
leg = "bot"
regex = "."
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CALLBOT, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture
def past_calls(tmp_path: pathlib.Path):
    """Two recorded calls (acme's, with its disclosure at 0.5 s; one with no tenant, disclosure at 20 s) in
    the store, neither analysed; the config naming acme's rules and the default rules."""
    calls = tmp_path / "calls"
    (calls / "acme").mkdir(parents=True)
    for folder, name, at, tenant in ((calls / "acme", "call-a", 500.0, "acme"), (calls, "call-b", 20000.0, None)):
        call = agent_call(disclosure_at_ms=at)
        labels = {"bot": "support", **({"tenant": tenant} if tenant else {})}
        write_call(call, folder, name, record={"start": 1796270000.0 + at, "answered": 1796270000.5 + at,
                                               "end": 1796270030.0 + at, "labels": labels, "events": f"{name}.events.jsonl",
                                               "recording": {"wav": f"{name}.wav", "seconds": call.duration_ms / 1000,
                                                             "complete": True}},
                   events=bot_text_events(call, name))
    (tmp_path / "acme.toml").write_text(ACME)
    (tmp_path / "default.toml").write_text(DEFAULT)
    cfg = tmp_path / "callbot.toml"
    cfg.write_text("""
recordings_dir = "calls"
[[bots]]
name = "support"
[[tenants]]
name = "acme"
rules = "acme.toml"
[analytics]
rules = "default.toml"
""")
    out = _cli("calls", "import", str(calls), "--config", str(cfg))
    assert out.returncode == 0 and "2 imported" in out.stdout, out.stdout + out.stderr
    return tmp_path, cfg


def _listed(cfg: pathlib.Path, *args: str) -> list[str]:
    out = _cli("calls", "list", "--json", "--config", str(cfg), *args)
    assert out.returncode == 0, out.stderr
    return sorted(r["call_id"] for r in json.loads(out.stdout))


def test_past_calls_analysed_with_their_tenants_rules_then_rules_only(past_calls):
    tmp_path, cfg = past_calls
    assert _listed(cfg, "--category", "disclosure given") == []
    # nothing stored to re-evaluate yet: said per call, exit 1
    early = _cli("calls", "analyze", "call-a", "--rules-only", "--config", str(cfg))
    assert early.returncode == 1 and "call-a: skipped: no analysis stored" in early.stdout, early.stdout
    first = _cli("calls", "analyze", "call-a", "--config", str(cfg))
    assert first.returncode == 0 and "1 analysed, 0 skipped" in first.stdout, first.stdout + first.stderr
    missing = _cli("calls", "analyze", "--missing", "--config", str(cfg))
    assert missing.returncode == 0, missing.stdout + missing.stderr
    assert "call-b:" in missing.stdout and "call-a:" not in missing.stdout and "1 analysed" in missing.stdout
    # acme's call with acme's rules (its disclosure in the first 15 s, 4 s of dead air: 3 of 4), the
    # other with the default rules
    assert _listed(cfg, "--category", "disclosure given") == ["call-a"]
    assert _listed(cfg, "--category", "anything said") == ["call-b"]
    assert _listed(cfg, "--min-score", "3") == ["call-a"] and _listed(cfg, "--min-score", "3.5") == []
    with CallStore(sqlite_url(tmp_path / "calls" / "calls.db")) as store, store.reading() as conn:
        a = queries.call_detail(conn, "call-a")
    assert a["analysis"]["errors"] == [] and a["metrics"]["call"]["dead_air_count"] == 1
    [card] = a["scores"]
    assert (card["score"], card["max_score"]) == (3, 4)
    beside = json.loads((tmp_path / "calls" / "acme" / "call-a.analysis.json").read_text())
    assert beside["call_id"] == "call-a" and beside["scores"][0]["score"] == 3
    # the analysis files beside the recordings are no call records to import
    again = _cli("calls", "import", str(tmp_path / "calls"), "--config", str(cfg))
    assert again.returncode == 0 and again.stderr == "" and "0 imported, 0 replaced, 2 already complete" in again.stdout
    # a rule changed: the stored analyses evaluated again, no audio read
    (tmp_path / "acme.toml").write_text(ACME.replace("first_s = 15", "first_s = 30"))
    (tmp_path / "default.toml").write_text(ACME.replace("first_s = 15", "first_s = 30"))
    again = _cli("calls", "analyze", "--rules-only", "--config", str(cfg))
    assert again.returncode == 0 and "2 analysed, 0 skipped (rules only)" in again.stdout, again.stdout + again.stderr
    assert _listed(cfg, "--category", "disclosure given") == ["call-a", "call-b"]
    assert _listed(cfg, "--category", "anything said") == []
    with CallStore(sqlite_url(tmp_path / "calls" / "calls.db")) as store, store.reading() as conn:
        b = queries.call_detail(conn, "call-b")
    assert b["metrics"]["caller"]["talk_ms"] > 0  # the stored analysis' numbers kept
    # --rules for every call at once, instead of their tenants'
    forced = _cli("calls", "analyze", "--rules-only", "--rules", str(tmp_path / "default.toml"), "--tenant", "acme",
                  "--config", str(cfg))
    assert forced.returncode == 0 and "1 analysed" in forced.stdout, forced.stdout + forced.stderr


def test_bad_input_to_calls_analyze_is_one_line(past_calls):
    tmp_path, cfg = past_calls
    (tmp_path / "bad.toml").write_text('[[categories]]\nname = "x"\n[[categories.rules]]\nkind = "phrase"\nwithin_s = 3\n')
    bad = _cli("calls", "analyze", "call-a", "--rules", str(tmp_path / "bad.toml"), "--config", str(cfg))
    assert bad.returncode == 2 and bad.stdout == ""
    [line] = bad.stderr.strip().splitlines()
    assert line.startswith(f"callbot: error: {tmp_path / 'bad.toml'}: $.categories[0].rules[0]"), line
    unknown = _cli("calls", "analyze", "nope", "--config", str(cfg))
    assert unknown.returncode == 1 and "nope: skipped: no such call in the store" in unknown.stdout
    (tmp_path / "calls" / "call-b.wav").unlink()
    (tmp_path / "calls" / "call-b.json").unlink()
    gone = _cli("calls", "analyze", "call-b", "--config", str(cfg))
    assert gone.returncode == 1 and "call-b: skipped: its recording is not there" in gone.stdout, gone.stdout
    nostore = _cli("calls", "analyze", "--store", f"sqlite:///{tmp_path / 'none.db'}")
    assert nostore.returncode == 2 and nostore.stderr.startswith("callbot: error: no call store at"), nostore.stderr
