"""The campaign's state file (campaigns/state.py): written ahead of each INVITE, the restart rule, a
changed list refused. Real SQLite files; a second process reads what the first committed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from callbot.campaigns import scheduler as sch
from callbot.campaigns.config import Campaign, CampaignError, Window
from callbot.campaigns.contacts import Contact
from callbot.campaigns.state import CampaignState, state_path


def rows(n: int) -> list[Contact]:
    return [Contact(row=i + 1, target=f"sip:{i}@example.com", tz="UTC") for i in range(n)]


def test_an_attempt_is_on_disk_as_dialing_before_the_invite_and_a_restart_never_redials_it(tmp_path):
    path = str(tmp_path / "s.db")
    clock = iter(range(100, 1000)).__next__
    st = CampaignState(path, "digest", clock)
    s = sch.Scheduler(Campaign(window=Window(hours="00:00-24:00")), rows(3), states=st.load()[0])
    d = s.next(clock())
    s.started(d.contact.row, 0)
    a = st.begin(d.contact.row, d.attempt, "sip:0@example.com", s.states[d.contact.row])
    # another process (a dialer killed now would leave exactly this) sees the attempt committed
    seen = subprocess.run([sys.executable, "-c", f"import sqlite3; print(sqlite3.connect({path!r}).execute("
                           "\"select row, status from attempts\").fetchall())"], capture_output=True, text=True)
    assert seen.stdout.strip() == "[(1, 'dialing')]"
    st.dialled(a, "call-1")
    s.finished(1, sch.HUMAN, 1)
    st.close()  # killed before the end was written: reopen as a restart does
    st2 = CampaignState(path, "digest", clock)
    states, closed = st2.load()
    assert closed == [{"row": 1, "attempt": 1, "call_id": "call-1", "disposition": sch.INTERRUPTED,
                       "resolved": False}]
    assert states[1].done and states[1].attempts == 1
    s2 = sch.Scheduler(Campaign(window=Window(hours="00:00-24:00")), rows(3), states=states)
    assert s2.next(clock()).contact.row == 2  # row 1 is never dialled again, rows 2 and 3 are not skipped
    assert [a["disposition"] for a in st2.all_attempts()] == [sch.INTERRUPTED]
    st2.close()


def test_a_resolver_that_knows_the_calls_end_puts_it_through_the_retry_rules(tmp_path):
    path = str(tmp_path / "s.db")
    st = CampaignState(path, "d")
    s = sch.Scheduler(Campaign(), rows(1), states=st.load()[0])
    s.started(1, 0)
    a = st.begin(1, 1, "sip:0@example.com", s.states[1])
    st.dialled(a, "call-9")
    st.close()
    st = CampaignState(path, "d")
    states, closed = st.load(resolve=lambda call_id: sch.BUSY if call_id == "call-9" else None)
    assert closed[0]["disposition"] == sch.BUSY and closed[0]["resolved"]
    assert not states[1].done  # busy is retried (3 attempts by default)
    st.close()


def test_finished_rows_and_their_attempts_survive_a_restart(tmp_path):
    path = str(tmp_path / "s.db")
    st = CampaignState(path, "d")
    s = sch.Scheduler(Campaign(), rows(2), states=st.load()[0])
    s.started(1, 0)
    a = st.begin(1, 1, "sip:0@example.com", s.states[1])
    s.finished(1, sch.BUSY, 10)
    st.end(a, sch.BUSY, s.states[1], sip_code=486, reason="Busy Here")
    s.closed(2, sch.DNC)
    st.close_row(2, sch.DNC, s.states[2])
    st.close()
    st = CampaignState(path, "d")
    states, closed = st.load()
    assert closed == []
    assert (states[1].attempts, states[1].done, states[1].next_at) == (1, False, 310.0)
    assert states[2].done and states[2].disposition == sch.DNC
    assert [(r["row"], r["disposition"], r["sip_code"]) for r in st.all_attempts()] == [(1, "busy", 486),
                                                                                       (2, "do-not-call", None)]
    st.close()


def test_a_changed_list_or_a_file_that_is_no_database_is_one_line(tmp_path):
    path = str(tmp_path / "s.db")
    CampaignState(path, "one").close()
    with pytest.raises(CampaignError, match="another version of the list"):
        CampaignState(path, "two")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(CampaignError, match="campaign state .*bad.db"):
        CampaignState(str(bad), "x")
    assert state_path("/a/list.csv") == "/a/list.csv.campaign.db"
