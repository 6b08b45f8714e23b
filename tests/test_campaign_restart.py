"""The restart rule with the call's own record (app/campaign_runner.py CallLookup): a dialer SIGKILLed while
one call is up and another still rings; started again, the answered one gets its real disposition from
the call store / its JSON record (and the retry rules: none for a person), the ringing one, of which no
record says how it ended, stays `interrupted`; neither is dialled again (counted at the callees)."""
from __future__ import annotations

import signal
import sqlite3

from callbot.app.campaign_runner import CallLookup, disposition_of_record
from callbot.campaigns import scheduler as sch
from tests.sip_peers import PjsuaPeer, eventually, stop_process
from tests.test_campaign_sip import finish, start_campaign, write_campaign


def _attempts(state_db: str) -> list[tuple]:
    try:
        with sqlite3.connect(state_db) as db:
            return db.execute("select row, attempt, status, call_id from attempts order by id").fetchall()
    except sqlite3.Error:
        return []


def test_a_killed_dialers_open_attempts_are_resolved_from_the_calls_records(tmp_path):
    with PjsuaPeer(user="answers", answer="auto", log_dir=tmp_path) as person, \
            PjsuaPeer(user="rings", answer="manual", log_dir=tmp_path) as ringing:
        lst, camp, cfg = write_campaign(tmp_path, [f"{person.uri},Ann", f"{ringing.uri},Bob"], """
max_concurrent = 2
calls_per_second = 5
dial_timeout_s = 60
max_call_s = 60
[amd]
enabled = false
""")
        state_db = lst + ".campaign.db"
        lookup = CallLookup(str(tmp_path / "calls"), f"sqlite:///{tmp_path / 'calls' / 'calls.db'}")
        proc = start_campaign(tmp_path, lst, camp, cfg)
        try:
            eventually(lambda: len(person.all("incoming")) == 1 and len(ringing.all("incoming")) == 1, 30,
                       "both callees reached")
            call_ids = {row: cid for row, _, _, cid in _attempts(state_db)}
            # the answered call's record says so (the store's copy or its sidecar): then the dialer dies
            eventually(lambda: lookup(call_ids[1]) == sch.HUMAN, 20, "the answered call in its record")
            assert lookup(call_ids[2]) is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            stop_process(proc)
            lookup.close()
        assert [(r, s) for r, _, s, _ in _attempts(state_db)] == [(1, "answered"), (2, "dialing")]
        # the killed dialer sent no BYE nor CANCEL: the callees drop what they still have
        for peer in (person, ringing):
            for e in peer.all("incoming"):
                peer.send("hangup", call_id=e["call_id"])
        eventually(lambda: person.all("disconnected") and ringing.all("disconnected"), 15, "the old calls ended")
        report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path)
        assert len(person.all("incoming")) == 1 and len(ringing.all("incoming")) == 1  # nobody called twice
    by_row = {a["row"]: a for a in report}
    assert sorted(by_row) == [1, 2] and len(report) == 2, report
    assert (by_row[1]["disposition"], by_row[1]["reason"]) == ("answered-human", "resolved after a restart")
    assert by_row[2]["disposition"] == "interrupted"
    log = (tmp_path / "campaign.log").read_text()
    assert "row 1 attempt 1 was in progress when the dialer stopped: answered-human (its call found)" in log
    assert "row 2 attempt 1 was in progress when the dialer stopped: interrupted (no record of its call" in log


def test_a_records_disposition():
    assert disposition_of_record({"answered": 1.0, "labels": {"amd": "machine_end_beep"}}) == sch.MACHINE
    assert disposition_of_record({"answered": 1.0, "labels": {"amd": "human"}}) == sch.HUMAN
    assert disposition_of_record({"answered": 1.0}) == sch.HUMAN
    assert disposition_of_record({"answered": None, "end": None}) is None  # it may have rung: not known
    assert disposition_of_record({"end": 2.0, "hangup_code": 486}) == sch.BUSY
    assert disposition_of_record({"end": 2.0, "hangup_code": 487, "hangup_cause": "timeout"}) == sch.NO_ANSWER
    assert disposition_of_record({"end": 2.0, "hangup_code": 503}) == sch.FAILED
