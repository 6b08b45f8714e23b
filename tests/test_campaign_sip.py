"""`callbot campaign run` against real callees on 127.0.0.1: pjsua2 peers that answer, are busy (486) or
never answer, SIPp answering 503; the answering-machine path with scripted espeak-ng audio; a SIGKILL
mid-campaign and a restart. Every count is taken at the callees."""
from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np

from callbot.app.recording import read_recording
from tests.campaign_calls import Callee, human, machine, silence, speech
from tests.sip_peers import LOCALHOST, PjsuaPeer, eventually, free_port, serve_config, sipp_ports, stop_process

SIPP_REFUSE = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="refuse">
  <recv request="INVITE" />
  <send><![CDATA[
SIP/2.0 {code} {reason}
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
  <recv request="ACK" />
</scenario>
"""


class SippRefusing:
    """SIPp answering every INVITE with `code`; `invites()` counts the INVITEs it got (its message trace)."""

    def __init__(self, workdir: pathlib.Path, code: int = 503, reason: str = "Service Unavailable"):
        self.port = free_port()
        self.uri = f"sip:busyline@{LOCALHOST}:{self.port}"
        scenario = workdir / f"uas{code}.xml"
        scenario.write_text(SIPP_REFUSE.replace("{code}", str(code)).replace("{reason}", reason))
        self.trace = workdir / f"sipp{code}-messages.log"
        self._log = open(workdir / f"sipp{code}.log", "w")
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(scenario), "-i", LOCALHOST, *sipp_ports(self.port),
             "-nostdin", "-trace_msg", "-message_file", str(self.trace), "-timeout", "120"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def invites(self) -> int:
        text = self.trace.read_text(errors="replace") if self.trace.exists() else ""
        return len(re.findall(r"^INVITE sip:", text, re.M))

    def close(self) -> None:
        stop_process(self.proc, 10)
        self._log.close()


def write_campaign(d: pathlib.Path, rows: list[str], toml: str, extra_columns: str = "") -> tuple[str, str, str]:
    lst = d / "list.csv"
    lst.write_text("uri,name" + extra_columns + "\n" + "\n".join(rows) + "\n")
    camp = d / "campaign.toml"
    camp.write_text(toml + ('\n[window]\nhours = "00:00-24:00"\n' if "[window]" not in toml else ""))
    cfg = serve_config(d, free_port(), account="out", user="bot")
    return str(lst), str(camp), str(cfg)


def start_campaign(d: pathlib.Path, lst: str, camp: str, cfg: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "callbot.app.cli", "campaign", "run", lst, "--campaign", camp,
                             "--config", cfg, "--engine", "echo", "--report", str(d / "report.json"), *extra],
                            cwd=d, stdout=subprocess.DEVNULL, stderr=open(d / "campaign.log", "w"))


def finish(proc: subprocess.Popen, d: pathlib.Path, timeout: float = 90) -> list[dict]:
    try:
        rc = proc.wait(timeout)
    finally:
        stop_process(proc, 10)
    log = (d / "campaign.log").read_text()
    assert rc == 0, log
    return json.loads((d / "report.json").read_text())


def concurrency(peer: PjsuaPeer) -> int:
    """The most calls the peer had up at once, from the order of its own events."""
    up = most = 0
    seen: set[str] = set()
    for e in peer._lines.events:
        if e["ev"] == "incoming":
            up += 1
            seen.add(e["call_id"])
            most = max(most, up)
        elif e["ev"] == "disconnected" and e["call_id"] in seen:
            seen.discard(e["call_id"])
            up -= 1
    return most


def test_each_callee_gets_its_disposition_and_its_retries_and_the_cap_holds(tmp_path):
    answer = PjsuaPeer(user="answer", answer="auto", log_dir=tmp_path)
    busy = PjsuaPeer(user="busy", answer="busy", log_dir=tmp_path)
    never = PjsuaPeer(user="never", answer="manual", log_dir=tmp_path)
    sipp = SippRefusing(tmp_path)
    try:
        host = lambda peer, user: peer.uri.replace(f"sip:{peer.uri.split(':')[1].split('@')[0]}@", f"sip:{user}@")
        rows = [f"{host(answer, f'a{i}')},Ann{i}" for i in range(4)]
        rows += [f"{host(busy, 'b1')},Bob", f"{host(never, 'n1')},Nia", f"{sipp.uri},Sid"]
        lst, camp, cfg = write_campaign(tmp_path, rows, """
max_concurrent = 2
calls_per_second = 20
dial_timeout_s = 2
max_call_s = 1.5
[amd]
enabled = false
[retries.busy]
backoff_s = 0.3
max_attempts = 2
[retries.no_answer]
max_attempts = 1
[retries.failed]
backoff_s = 0.3
max_attempts = 3
""")
        report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path)
        by_target: dict[str, list[dict]] = {}
        for a in report:
            by_target.setdefault(a["target"], []).append(a)
        for i in range(4):
            attempts = by_target[host(answer, f"a{i}")]
            assert [a["disposition"] for a in attempts] == ["answered-human"]
            assert attempts[0]["variables"] == {"name": f"Ann{i}"}
        assert [(a["disposition"], a["sip_code"]) for a in by_target[host(busy, "b1")]] == [("busy", 486)] * 2
        assert [a["disposition"] for a in by_target[host(never, "n1")]] == ["no-answer"]
        assert [(a["disposition"], a["sip_code"]) for a in by_target[sipp.uri]] == [("failed", 503)] * 3
        # counted at the callees: every attempt reached its callee once, never more than 2 calls at a time
        assert len(answer.all("incoming")) == 4
        assert len(busy.all("incoming")) == 2
        assert len(never.all("incoming")) == 1
        eventually(lambda: sipp.invites() == 3, 5, "SIPp saw 3 INVITEs")
        assert concurrency(answer) == 2  # the cap, reached and never passed
        assert "answered-human 4" in (tmp_path / "campaign.log").read_text()
        # the call store (on by default, beside the recordings): every attempt, and the answered calls as
        # outbound calls labelled with their row
        from sqlalchemy import select

        from callbot.store.call_store import CallStore
        from callbot.store.schema import calls, campaign_attempts

        with CallStore(f"sqlite:///{tmp_path / 'calls' / 'calls.db'}") as store, store.reading() as conn:
            stored = conn.execute(select(campaign_attempts.c.row, campaign_attempts.c.disposition,
                                         campaign_attempts.c.sip_code, campaign_attempts.c.call_id)).all()
            answered = conn.execute(select(calls.c.call_id, calls.c.direction, calls.c.record)).all()
        assert sorted((r.row, r.disposition, r.sip_code) for r in stored) == sorted(
            (a["row"], a["disposition"], a["sip_code"]) for a in report)
        human_calls = {r.call_id for r in stored if r.disposition == "answered-human"}
        outbound = {c.call_id: c for c in answered if c.call_id in human_calls}
        assert len(outbound) == 4 and {c.direction for c in outbound.values()} == {"outbound"}
        assert sorted(c.record["labels"]["campaign_row"] for c in outbound.values()) == ["1", "2", "3", "4"]
    finally:
        sipp.close()
        for p in (answer, busy, never):
            p.close()


def _amd_campaign(tmp_path: pathlib.Path, peer: PjsuaPeer) -> tuple[str, str, str]:
    return write_campaign(tmp_path, [f"{peer.uri},Ann"], """
max_concurrent = 1
dial_timeout_s = 5
max_call_s = 20
[amd]
on_machine = "message"
message_text = "Hello {name}, this is a reminder from your clinic about your appointment tomorrow. Goodbye."
beep_wait_ms = 8000
""")


def _play_on_answer(peer: PjsuaPeer, wav: str, heard: str) -> dict:
    """The peer records what it hears and plays `wav` as soon as the call's audio is up; returns the
    peer-clock times of both."""
    media = peer.expect("media", timeout=20)
    peer.send("record", path=heard, call_id=media["call_id"])
    rec = peer.expect("ok", cmd="record")
    peer.send("play", path=wav, call_id=media["call_id"])
    play = peer.expect("ok", cmd="play")
    return {"record_t": rec["t"], "play_t": play["t"]}


def test_a_machine_gets_its_message_after_the_beep_and_a_person_the_bot(tmp_path):
    callee = machine(beep_hz=1000, beep_len_ms=500)
    wav = callee.write(tmp_path / "voicemail.wav")
    heard = str(tmp_path / "heard.wav")
    with PjsuaPeer(user="voicemail", answer="auto", log_dir=tmp_path) as peer:
        lst, camp, cfg = _amd_campaign(tmp_path, peer)
        proc = start_campaign(tmp_path, lst, camp, cfg)
        try:
            times = _play_on_answer(peer, wav, heard)
            report = finish(proc, tmp_path)
        finally:
            stop_process(proc)
        peer.expect("disconnected", timeout=20)
    [a] = report
    assert a["disposition"] == "answered-machine" and a["amd"] == "machine_end_beep", a
    assert a["beep_ms"] is not None
    # what the callee heard: silence while the bot was held, then the message; it starts after the beep
    rate, audio = read_recording(heard)
    x = audio[:, 0] if audio.ndim == 2 else audio
    loud = np.nonzero(np.abs(x.astype(np.int32)) > 1000)[0]
    assert len(loud), "the message never reached the callee"
    message_at_peer = times["record_t"] + loud[0] / rate
    beep_end_at_peer = times["play_t"] + callee.beep_end_ms / 1000
    assert message_at_peer >= beep_end_at_peer - 0.05, (message_at_peer - times["play_t"], callee.beep_end_ms)
    assert message_at_peer <= beep_end_at_peer + 2.0  # and not long after it


def test_a_person_saying_hello_is_human_and_the_bot_is_released(tmp_path):
    # "hello?", silence (the verdict), then "is anyone there?" at 2.6 s: the echo line, held until the
    # verdict, must not send back the hello, and must send back the second phrase
    first = human("hello?", tail_ms=2000)
    callee = Callee("human", np.concatenate([first.samples, speech("is anyone there?"), silence(2000)]))
    second_at_s = len(first.samples) / 16000
    wav = callee.write(tmp_path / "hello.wav")
    heard = str(tmp_path / "heard.wav")
    with PjsuaPeer(user="person", answer="auto", log_dir=tmp_path) as peer:
        lst, camp, cfg = write_campaign(tmp_path, [f"{peer.uri},Ann"], """
max_concurrent = 1
dial_timeout_s = 5
max_call_s = 5.5
""")
        proc = start_campaign(tmp_path, lst, camp, cfg)
        try:
            times = _play_on_answer(peer, wav, heard)
            report = finish(proc, tmp_path)
        finally:
            stop_process(proc)
    [a] = report
    assert (a["disposition"], a["amd"]) == ("answered-human", "human"), a
    assert 1000 <= a["amd_ms"] <= 2600
    rate, audio = read_recording(heard)
    x = np.abs((audio[:, 0] if audio.ndim == 2 else audio).astype(np.int32))
    offset = times["play_t"] - times["record_t"]  # the callee's clip time 0, in the recording
    held = x[: int((offset + 1.2) * rate)]  # the hello and its echo time: nothing comes back
    assert held.max(initial=0) < 1000, "the bot was not held before the verdict"
    assert x[int((offset + second_at_s) * rate):].max(initial=0) > 3000, "the bot was not released"


def test_a_silent_callee_is_a_machine_by_initial_silence_hung_up_and_retried_as_configured(tmp_path):
    with PjsuaPeer(user="silent", answer="auto", log_dir=tmp_path) as peer:
        lst, camp, cfg = write_campaign(tmp_path, [f"{peer.uri},Ann"], """
dial_timeout_s = 5
[amd]
on_machine = "hangup"
[retries.machine]
backoff_s = 0.2
max_attempts = 2
""")
        report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path)
        assert len(peer.all("incoming")) == 2
    assert [(a["disposition"], a["amd"]) for a in report] == [("answered-machine", "machine")] * 2
    assert all(2400 <= a["amd_ms"] <= 2700 for a in report)  # initial_silence_ms 2500, 100 ms chunks


def test_pause_resume_and_stop_and_a_stopped_campaign_resumes_where_it_stopped(tmp_path):
    with PjsuaPeer(user="people", answer="auto", log_dir=tmp_path) as peer:
        user = peer.uri.split(":")[1].split("@")[0]
        rows = [f"{peer.uri.replace(f'sip:{user}@', f'sip:p{i}@')},P{i}" for i in range(4)]
        lst, camp, cfg = write_campaign(tmp_path, rows, """
max_call_s = 1.0
[amd]
enabled = false
""")
        control = tmp_path / "control"
        control.write_text("pause\n")
        proc = start_campaign(tmp_path, lst, camp, cfg, "--control", str(control))
        log = tmp_path / "campaign.log"
        try:
            eventually(lambda: "(paused)" in log.read_text(), 30, "the campaign says it is paused")
            assert peer.all("incoming") == []  # paused before its first dial
            proc.send_signal(signal.SIGUSR2)  # resume
            eventually(lambda: len(peer.all("incoming")) >= 1, 20, "a call after the resume")
            proc.send_signal(signal.SIGTERM)  # stop: no new call, the one up ends by itself
            assert proc.wait(30) == 0
        finally:
            stop_process(proc)
        assert "stopping: no new calls" in log.read_text()
        first_run = len(peer.all("incoming"))
        assert 1 <= first_run < 4
        report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path)
        assert len(peer.all("incoming")) == 4  # the rest, and nothing twice
    assert sorted(a["row"] for a in report) == [1, 2, 3, 4]
    assert {a["disposition"] for a in report} == {"answered-human"}


def test_a_campaign_killed_mid_way_and_restarted_calls_every_row_exactly_once(tmp_path):
    with PjsuaPeer(user="people", answer="auto", log_dir=tmp_path) as peer:
        user = peer.uri.split(":")[1].split("@")[0]
        rows = [f"{peer.uri.replace(f'sip:{user}@', f'sip:p{i}@')},P{i}" for i in range(6)]
        lst, camp, cfg = write_campaign(tmp_path, rows, """
max_concurrent = 2
calls_per_second = 5
max_call_s = 1.0
[amd]
enabled = false
""")
        proc = start_campaign(tmp_path, lst, camp, cfg)
        try:
            eventually(lambda: len(peer.all("incoming")) >= 3, 30, "three calls placed")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            stop_process(proc)
        placed_before = {e["call_id"] for e in peer.all("incoming")}
        # the killed dialer sent no BYE: the callee hangs up what it still has (its 4 call slots)
        for call_id in placed_before - {e["call_id"] for e in peer.all("disconnected")}:
            peer.send("hangup", call_id=call_id)
        eventually(lambda: len(peer.all("disconnected")) >= len(placed_before), 10, "the old calls ended")
        report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path)
    invited = [e["remote"] for e in peer.all("incoming")]
    # one INVITE per row in all, across both runs: by the To user each callee saw
    by_row = {}
    for a in report:
        by_row.setdefault(a["row"], []).append(a["disposition"])
    assert sorted(by_row) == list(range(1, 7))
    assert all(len(d) == 1 for d in by_row.values()), by_row
    assert len(invited) == 6, invited
    assert len(placed_before) >= 3
    assert set(sum(by_row.values(), [])) <= {"answered-human", "interrupted"}


def test_a_target_where_nothing_listens_is_failed_not_no_answer(tmp_path):
    lst, camp, cfg = write_campaign(tmp_path, [f"sip:nobody@{LOCALHOST}:{free_port()},Nia"], """
dial_timeout_s = 2
[amd]
enabled = false
[retries.failed]
max_attempts = 1
""")
    report = finish(start_campaign(tmp_path, lst, camp, cfg), tmp_path)
    assert [a["disposition"] for a in report] == ["failed"]


def test_a_trunk_that_refuses_every_call_stops_the_campaign_with_one_clear_line(tmp_path):
    sipp = SippRefusing(tmp_path, 403, "Forbidden")
    try:
        rows = [f"sip:{1000 + i}@{LOCALHOST}:{sipp.port},R{i}" for i in range(6)]
        lst, camp, cfg = write_campaign(tmp_path, rows, """
calls_per_second = 20
[amd]
enabled = false
""")
        proc = start_campaign(tmp_path, lst, camp, cfg)
        try:
            rc = proc.wait(60)
        finally:
            stop_process(proc)
        log = (tmp_path / "campaign.log").read_text()
        assert rc == 1, log
        assert "callbot: error: the trunk refuses the campaign's calls: 3 attempts in a row answered 403 " \
               "Forbidden (account 'out'" in log
        eventually(lambda: sipp.invites() == 3, 5, "SIPp saw 3 INVITEs")
        report = json.loads((tmp_path / "report.json").read_text())
        assert [(a["disposition"], a["sip_code"]) for a in report] == [("failed", 403)] * 3
    finally:
        sipp.close()


def _gmt_zone_with_local_hour(hour: int) -> str:
    """An Etc/GMT zone whose local time is now `hour`:xx (POSIX signs: Etc/GMT-3 is UTC+3)."""
    import datetime as dt

    utc_hour = dt.datetime.now(dt.timezone.utc).hour
    offset = (hour - utc_hour) % 24
    if offset > 14:
        offset -= 24
    return "Etc/GMT" + (f"-{offset}" if offset > 0 else f"+{-offset}" if offset < 0 else "")


def test_rows_outside_their_windows_are_skipped_and_end_outside_window_with_a_csv_report(tmp_path):
    import csv
    import datetime as dt

    with PjsuaPeer(user="people", answer="auto", log_dir=tmp_path) as peer:
        user = peer.uri.split(":")[1].split("@")[0]
        open_tz, closed_tz = _gmt_zone_with_local_hour(12), _gmt_zone_with_local_hour(1)
        rows = [f"{peer.uri.replace(f'sip:{user}@', 'sip:night@')},Owl,{closed_tz}",
                f"{peer.uri.replace(f'sip:{user}@', 'sip:noon@')},Lark,{open_tz}"]
        ends = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=8)).isoformat(timespec="seconds")
        lst, camp, cfg = write_campaign(tmp_path, rows, f"""
max_call_s = 1.0
ends_at = "{ends}"
[window]
hours = "10:00-14:00"
[amd]
enabled = false
""", extra_columns=",tz")
        proc = start_campaign(tmp_path, lst, camp, cfg, "--report", str(tmp_path / "report.csv"))
        try:
            assert proc.wait(60) == 0, (tmp_path / "campaign.log").read_text()
        finally:
            stop_process(proc)
        assert len(peer.all("incoming")) == 1  # only the row inside its window was called
    with open(tmp_path / "report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [(r["row"], r["target"].split("@")[0], r["tz"], r["disposition"]) for r in report] == [
        ("2", "sip:noon", open_tz, "answered-human"), ("1", "sip:night", closed_tz, "outside-window")]
    assert json.loads(report[0]["variables"]) == {"name": "Lark"}
