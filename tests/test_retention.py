"""Retention and erasure (store/retention.py): calls the real Recorder wrote, in the recordings folder and a
tenant's own, and the same calls in the store (SQLite and PostgreSQL); an age purge deletes the calls
over and old enough (files, rows with their events and analysis, old campaign attempts), never one going
on; an erasure by caller compares numbers by their digits; a dry run deletes nothing; the command line
and serve's hourly job."""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import func, insert, select

from callbot.app.metrics import Metrics
from callbot.app.recording import Recorder
from callbot.store.retention import RetentionJob, Selection, purge
from callbot.store.call_store import CallStore
from callbot.store.database import sqlite_url
from callbot.store.importer import import_dir
from callbot.store.schema import analysis_runs, calls, campaign_attempts, events
from tests.test_store import _analysis

DAY = 86400.0
NOW = time.time()
OLD, NEW = NOW - 40 * DAY, NOW - 1 * DAY


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "calls.db")
    return request.getfixturevalue("postgres_server").new_database()


class Calls:
    """Calls recorded for real: a, b, c (crashed long ago), d (going on) in calls/, e in acme/."""

    def __init__(self, tmp_path: pathlib.Path):
        self.main, self.acme = tmp_path / "calls", tmp_path / "acme"
        self.main.mkdir()
        self.acme.mkdir()
        self.recorder = Recorder(self.main, poll_ms=10)
        self.names: dict[str, str] = {}
        self._record("a", OLD, "+1 555 0100", self.main)
        self._record("b", NEW, "15550100", self.main)
        self._record("e", OLD, "+1 555 0199", self.acme, tenant="acme")
        # c: a process killed mid-call a month ago left its record incomplete, last written then
        a = json.loads((self.main / (self.names["a"] + ".json")).read_text())
        self.names["c"] = self.names["a"].replace("-a", "-c")
        for suffix in (".wav", ".events.jsonl"):
            if (self.main / (self.names["a"] + suffix)).exists():
                shutil.copy(self.main / (self.names["a"] + suffix), self.main / (self.names["c"] + suffix))
        a.update(call_id="c", end=None)
        a["recording"].update(complete=False, updated=OLD + 60)
        (self.main / (self.names["c"] + ".json")).write_text(json.dumps(a))
        # d: started long ago (a long call, or a clock set back) and going on now
        self.live = self.recorder.start({"call_id": "d", "start": OLD, "caller": "+15550100"}, 8000)
        self.names["d"] = self.live.name
        self.live.caller.write(np.ones(800, np.int16))
        self.live.bot.write(np.ones(800, np.int16))
        # a's analysis, with a redacted copy beside
        (self.main / (self.names["a"] + ".redacted.wav")).write_bytes(b"RIFF")
        analysis = {"call_id": "a", "redacted_recording": str(self.main / (self.names["a"] + ".redacted.wav"))}
        (self.main / (self.names["a"] + ".analysis.json")).write_text(json.dumps(analysis))

    def _record(self, call_id: str, start: float, caller: str, folder: pathlib.Path, tenant: str | None = None):
        rec_er = Recorder(folder, poll_ms=10) if folder != self.main else self.recorder
        record = {"call_id": call_id, "start": start, "caller": caller, "remote_uri": f"<sip:{caller}@h>",
                  "end": None, "labels": {"tenant": tenant} if tenant else {}}
        rec = rec_er.start(record, 8000)
        rec.caller.write(np.ones(1600, np.int16))
        rec.bot.write(np.ones(1600, np.int16))
        rec_er.on_event(_words(call_id))
        record["end"] = start + 60
        rec_er.finish(rec, record)
        if rec_er is not self.recorder:
            rec_er.close()
        self.names[call_id] = rec.name

    def files(self, call_id: str) -> list[str]:
        folder = self.acme if call_id == "e" else self.main
        return sorted(p.name for p in folder.iterdir() if p.name.startswith(self.names[call_id] + "."))

    def close(self) -> None:
        self.recorder.close()


def _words(call_id: str):
    from callbot.engine.contract import CallerWords

    return CallerWords(call_id=call_id, t_ms=10.0, text="hello", final=True, start_ms=0.0, end_ms=9.0)


@pytest.fixture
def recorded(tmp_path):
    c = Calls(tmp_path)
    yield c
    c.close()


def _stored(url: str, recorded: Calls) -> CallStore:
    store = CallStore(url)
    for folder in (recorded.main, recorded.acme):
        assert not import_dir(store, folder).problems
    store.save_analysis("a", _analysis("a", said="my card", score=5, category=None))
    with store.writes() as w:
        for ended, target in ((OLD + 30, "+1 555 0100"), (NEW + 30, "+1 555 0177")):
            w.conn.execute(insert(campaign_attempts).values(
                campaign="reminders", row=1, attempt=1, target=target, disposition="answered-human",
                started_at=ended - 30, ended_at=ended, variables={}))
    return store


def _left(store: CallStore) -> tuple[list[str], int, int, list[str]]:
    with store.reading() as conn:
        ids = sorted(conn.execute(select(calls.c.call_id)).scalars())
        a_events = conn.execute(select(func.count()).select_from(events).where(events.c.call_id == "a")).scalar()
        a_runs = conn.execute(select(func.count()).select_from(analysis_runs)
                              .where(analysis_runs.c.call_id == "a")).scalar()
        targets = sorted(conn.execute(select(campaign_attempts.c.target)).scalars())
    return ids, a_events, a_runs, targets


def test_an_age_purge_deletes_the_old_calls_that_are_over_files_rows_and_attempts(url, recorded):
    store = _stored(url, recorded)
    try:
        dirs = [str(recorded.main), str(recorded.acme)]
        before = {k: recorded.files(k) for k in "abcde"}
        assert before["a"] == sorted(recorded.names["a"] + s for s in (".analysis.json", ".events.jsonl", ".json",
                                                                      ".redacted.wav", ".wav"))
        dry = purge([*dirs, str(recorded.main.parent)], store, Selection(before=NOW - 30 * DAY), dry_run=True)
        assert (dry.calls, dry.rows, dry.attempts, dry.going_on) == (3, 3, 1, 1) and dry.files == 5 + 3 + 3
        assert {k: recorded.files(k) for k in "abcde"} == before and _left(store)[0] == list("abcde")
        done = purge(dirs, store, Selection(before=NOW - 30 * DAY))
        assert (done.calls, done.files, done.rows, done.attempts, done.going_on) == (3, 11, 3, 1, 1)
        assert done.bytes == dry.bytes > 0 and not done.problems
        assert [recorded.files(k) for k in "ace"] == [[], [], []]
        assert recorded.files("b") == before["b"] and recorded.files("d")  # young, and going on
        ids, a_events, a_runs, targets = _left(store)
        assert ids == ["b", "d"] and a_events == 0 and a_runs == 0  # its events and analysis went with it
        assert targets == ["+1 555 0177"]
        again = purge(dirs, store, Selection(before=NOW - 30 * DAY))
        assert (again.calls, again.files, again.rows) == (0, 0, 0)
    finally:
        store.close()


def test_a_tenant_purge_takes_only_that_tenants_calls(url, recorded):
    store = _stored(url, recorded)
    try:
        done = purge([str(recorded.main), str(recorded.acme)], store, Selection(before=NOW - 30 * DAY, tenant="acme"))
        assert (done.calls, done.rows, done.attempts) == (1, 1, 0) and recorded.files("e") == []
        assert _left(store)[0] == list("abcd") and recorded.files("a")
    finally:
        store.close()


def test_erasing_a_caller_takes_every_call_of_that_number_however_written(url, recorded):
    store = _stored(url, recorded)
    try:
        done = purge([str(recorded.main), str(recorded.acme)], store, Selection(caller="+1 (555) 01-00"))
        # a, b and c (a's caller, crashed); d, the same number, goes on
        assert (done.calls, done.rows, done.attempts, done.going_on) == (3, 3, 1, 1)
        assert recorded.files("a") == recorded.files("b") == recorded.files("c") == [] and recorded.files("e")
        ids, _, _, targets = _left(store)
        assert ids == ["d", "e"] and targets == ["+1 555 0177"]
        by_id = purge([str(recorded.main), str(recorded.acme)], store, Selection(call_ids=frozenset({"e"})))
        assert (by_id.calls, by_id.rows) == (1, 1) and recorded.files("e") == [] and _left(store)[0] == ["d"]
    finally:
        store.close()


def test_files_alone_without_a_store(recorded):
    done = purge([str(recorded.main)], None, Selection(before=NOW - 30 * DAY))
    assert (done.calls, done.rows, done.going_on) == (2, 0, 1) and recorded.files("a") == recorded.files("c") == []


def test_a_selection_must_say_which_calls():
    with pytest.raises(ValueError, match="say which calls"):
        Selection(tenant="acme")
    with pytest.raises(ValueError, match="no digits"):
        Selection(caller="alice")


def test_the_command_line_purges_and_erases_with_one_line_each(recorded, tmp_path):
    cfg = tmp_path / "callbot.toml"
    cfg.write_text(f'recordings_dir = "{recorded.main}"\n[[tenants]]\nname = "acme"\nrecordings_dir = "{recorded.acme}"\n')
    recorded.recorder.finish(recorded.live, {"call_id": "d", "start": OLD, "end": NOW, "caller": "+15550100"})
    cli = [sys.executable, "-m", "callbot.app.cli", "calls"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args, "--config", str(cfg)], capture_output=True, text=True, timeout=60)

    dry = run("purge", "--older-than", "30", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("4 calls would be deleted: ") and dry.stderr == ""
    assert recorded.files("a")
    done = run("purge", "--older-than", "30")  # no store made yet: the files alone
    assert done.returncode == 0 and done.stdout.startswith("4 calls deleted: ") and "0 store rows" in done.stdout
    assert [recorded.files(k) for k in "acde"] == [[], [], [], []] and recorded.files("b")
    erased = run("delete", "--caller", "15550100")
    assert erased.returncode == 0 and erased.stdout.startswith("1 calls deleted") and recorded.files("b") == []
    for bad, said in ((("purge", "--older-than", "-1"), "a number of days"), (("delete",), "say which calls")):
        out = run(*bad)
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and said in out.stderr, out.stderr


def test_serve_purges_old_calls_at_start_and_every_hour(recorded, tmp_path):
    from callbot.app.serve import running_server
    from callbot.app.settings import parse_settings
    from tests.sip_peers import eventually, serve_config

    recorded.close()  # its files final; serve's own recorder takes the folder
    cfg = serve_config(tmp_path, 0, recordings_dir=str(recorded.main), tail="[retention]\ndays = 30\n")
    settings = parse_settings(cfg.read_bytes(), base_dir=tmp_path)
    with running_server(settings, "echo") as server:
        job = server.retention
        assert isinstance(job, RetentionJob) and job.every_s == 3600
        eventually(lambda: job.runs >= 1, 20, "the first purge")
        assert recorded.files("a") == recorded.files("c") == recorded.files("d") == [] and recorded.files("b")
        assert job.deleted == 3
        text = server.metrics.text()
        assert "callbot_retention_deleted_calls_total 3.0" in text and "callbot_retention_failures_total 0.0" in text
        stamp = re.search(r"^callbot_retention_last_success_timestamp_seconds (\S+)$", text, re.M)
        assert stamp and abs(float(stamp.group(1)) - time.time()) < 600, text


def test_retention_days_are_checked_at_load(tmp_path):
    from callbot.app.settings import ConfigError, parse_settings

    with pytest.raises(ConfigError, match="retention.days"):
        parse_settings(b"[retention]\ndays = -1\n", base_dir=tmp_path)
    assert parse_settings(b"", base_dir=tmp_path).retention.days == 0


def test_a_job_whose_store_is_down_says_so_and_tries_again(tmp_path, caplog):
    import logging

    from tests.sip_peers import eventually, free_port

    job = RetentionJob([str(tmp_path)], f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/calls", 30,
                       every_s=0.05)
    with caplog.at_level(logging.WARNING, logger="callbot.store.retention"):
        job.start()
        eventually(lambda: caplog.text.count("the purge failed") >= 2, 30, "two failed runs, said")
        job.stop()
    assert not job._thread.is_alive() and job.runs == 0 and job.failures >= 2 and job.last_success == 0
    metrics = Metrics()
    metrics.watch_retention(job)
    assert f"callbot_retention_failures_total {float(job.failures)}" in metrics.text()
    assert "\n" not in caplog.records[0].getMessage()


def test_a_row_seen_only_through_an_event_goes_by_its_last_change(url):
    from sqlalchemy import update

    store = CallStore(url)
    try:
        store.event("x", {"ts": "2026-10-01T00:00:00.000+00:00", "event": "CallConfirmed", "call_id": "x"})
        store.event("y", {"ts": "2026-10-01T00:00:00.000+00:00", "event": "CallConfirmed", "call_id": "y"})
        with store.writes() as w:  # x was last changed long ago; y just now
            w.conn.execute(update(calls).where(calls.c.call_id == "x").values(updated_at=OLD))
        done = purge([], store, Selection(before=NOW - 30 * DAY))
        assert (done.calls, done.rows) == (1, 1) and _left(store)[0] == ["y"]
    finally:
        store.close()


def test_a_tenant_with_a_period_of_its_own_keeps_or_loses_its_calls_by_it(recorded):
    dirs = [str(recorded.main), str(recorded.acme)]
    kept_longer = RetentionJob(dirs, None, 30, tenants={"acme": 60}).run_once()
    assert kept_longer.calls == 2 and recorded.files("a") == recorded.files("c") == [] and recorded.files("e")
    never = RetentionJob(dirs, None, 30, tenants={"acme": 0}).run_once()  # 0: kept for ever
    assert never.calls == 0 and recorded.files("e")
    sooner = RetentionJob(dirs, None, 0, tenants={"acme": 10}).run_once()  # no period for the rest
    assert sooner.calls == 1 and recorded.files("e") == [] and recorded.files("b")


def test_a_tenants_retention_days_are_read_and_checked(tmp_path):
    from callbot.app.settings import ConfigError, parse_settings

    settings = parse_settings(b'[[tenants]]\nname = "acme"\nretention_days = 365\n[[tenants]]\nname = "beta"\n',
                              base_dir=tmp_path)
    assert settings.retention_by_tenant() == {"acme": 365}
    with pytest.raises(ConfigError, match="retention_days"):
        parse_settings(b'[[tenants]]\nname = "acme"\nretention_days = -3\n', base_dir=tmp_path)
