"""`callbot campaign run` with its state file on a disk that fills up: no INVITE leaves while an attempt
cannot be committed first, the call up goes on and its end is written once the disk takes writes
again, one line says each outage, and the campaign then calls every row exactly once."""
from __future__ import annotations

import signal

from tests.sip_peers import PjsuaPeer, eventually, serve_config, stop_process
from tests.small_disk import small_disk
from tests.test_campaign_sip import finish, start_campaign


def test_a_state_file_that_cannot_be_written_holds_new_calls_and_loses_no_attempt(tmp_path):
    with small_disk(tmp_path / "disk") as disk, PjsuaPeer(user="people", answer="auto", log_dir=tmp_path) as peer:
        user = peer.uri.split(":")[1].split("@")[0]
        lst = disk.path / "list.csv"  # its state file beside it: LIST.csv.campaign.db
        lst.write_text("uri,name\n" + "\n".join(f"{peer.uri.replace(f'sip:{user}@', f'sip:p{i}@')},P{i}"
                                                 for i in range(3)) + "\n")
        camp = tmp_path / "campaign.toml"
        camp.write_text('max_concurrent = 1\nmax_call_s = 2.0\n[amd]\nenabled = false\n[window]\nhours = "00:00-24:00"\n')
        cfg = serve_config(tmp_path, 0, account="out", user="bot", recordings_dir=str(tmp_path / "calls"))
        control = tmp_path / "control"
        control.write_text("pause\n")
        proc = start_campaign(tmp_path, str(lst), str(camp), str(cfg), "--control", str(control))
        log = tmp_path / "campaign.log"
        refused = lambda: log.read_text().count("refused a write")  # noqa: E731
        try:
            eventually(lambda: "(paused)" in log.read_text(), 30, "the campaign paused, its state file made")
            disk.fill()
            proc.send_signal(signal.SIGUSR2)  # resume: the first attempt cannot be committed
            eventually(lambda: refused() == 1, 30, "the line saying the state file refused a write")
            assert peer.all("incoming") == []  # no INVITE without its attempt on disk
            disk.free()
            eventually(lambda: len(peer.all("incoming")) == 1, 30, "the first call, the disk freed")
            disk.fill()  # while it is up: its end cannot be written, the next attempt cannot begin
            eventually(lambda: refused() == 2, 30, "the second outage said")
            assert len(peer.all("incoming")) == 1
            disk.free()
            report = finish(proc, tmp_path, timeout=90)
        finally:
            stop_process(proc)
        assert len(peer.all("incoming")) == 3  # every row once
    text = log.read_text()
    assert text.count("the state file takes writes again") == 2 and "Traceback" not in text, text
    assert sorted(a["row"] for a in report) == [1, 2, 3]
    assert {a["disposition"] for a in report} == {"answered-human"}  # the first one's end too, written late
    assert all(a["ended_at"] and a["answered_at"] and a["ended_at"] >= a["answered_at"] for a in report)


def test_the_api_answers_507_for_a_campaign_whose_files_do_not_fit_and_leaves_nothing(tmp_path):
    from callbot.app.campaign_api import CampaignApiError, CampaignRegistry

    with small_disk(tmp_path / "disk") as disk:
        registry = CampaignRegistry(str(disk.path / "campaigns"))
        (disk.path / "campaigns").mkdir()
        disk.fill()
        rows = "".join(f"sip:p{i}@127.0.0.1:5099,P{i}\n" for i in range(2000))  # some 60 kB: no room for it
        try:
            registry.start({"list_csv": "uri,name\n" + rows, "engine": "echo",
                            "campaign_toml": '[amd]\nenabled = false\n[window]\nhours = "00:00-24:00"\n'})
        except CampaignApiError as err:
            assert err.status == 507 and "No space left on device" in str(err), err
        else:
            raise AssertionError("a campaign was started on a full disk")
        assert sorted(p.name for p in (disk.path / "campaigns").iterdir()) == [] and registry.procs == {}
