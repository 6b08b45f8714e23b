"""The campaign file, the call list and the do-not-call list: what they accept, and one line for what
they do not (campaigns/config.py, campaigns/contacts.py); `callbot campaign run` says it and exits 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from callbot.campaigns.config import CampaignError, load_campaign
from callbot.campaigns.contacts import load_contacts, load_dnc


def test_a_full_campaign_file_loads_with_paths_next_to_it(tmp_path):
    (tmp_path / "c.toml").write_text("""
bot = "sales"
account = "trunk"
max_concurrent = 4
calls_per_second = 0.5
timezone = "Europe/Paris"
dnc = "dnc.txt"
ends_at = "2026-12-24T18:00:00+01:00"
[window]
hours = "09:30-19:00"
days = ["mon", "tue", "wed", "thu", "fri", "sat"]
[retries.busy]
backoff_s = 120
max_attempts = 4
[amd]
greeting_ms = 1800
on_machine = "message"
message_wav = "msg.wav"
""")
    c = load_campaign(tmp_path / "c.toml")
    assert (c.bot, c.account, c.max_concurrent, c.retries.busy.max_attempts, c.retries.machine.max_attempts) == \
        ("sales", "trunk", 4, 4, 1)
    assert c.window.minutes == (570, 1140)
    assert c.dnc == str(tmp_path / "dnc.txt") and c.amd.message_wav == str(tmp_path / "msg.wav")
    assert c.amd.initial_silence_ms == 2500 and c.amd.greeting_ms == 1800 and c.amd.max_words == 3


@pytest.mark.parametrize("text,expected", [
    ("max_concurrent = 0", "$.max_concurrent: Expected `int` >= 1"),
    ("[window]\nhours = \"20:00-02:00\"", "$.window: hours '20:00-02:00': the end must come after the start"),
    ("[window]\ndays = [\"monday\"]", "$.window.days[0]"),
    ("timezone = \"Mars/Olympus\"", "unknown time zone 'Mars/Olympus'"),
    ("[amd]\non_machine = \"message\"", "needs message_wav or message_text"),
    ("[retries.busy]\nbackoff = 3", "$.retries.busy: Object contains unknown field `backoff`"),
    ("ends_at = \"2026-12-24T18:00\"", "give its UTC offset"),
    ("bot = ", "not valid TOML"),
    ("caller_id = \"555 123\"", "caller_id '555 123': a number (+15551234567) or a sip:/tel: URI"),
    ("caller_id = \"+15551234567\"\ncaller_name = 'A \"B\"'", "caller_name 'A \"B\"': at most 64 characters"),
])
def test_a_bad_campaign_file_is_one_line_naming_the_key(tmp_path, text, expected):
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(CampaignError) as err:
        load_campaign(tmp_path / "c.toml")
    assert str(err.value).startswith(f"{tmp_path / 'c.toml'}: ") and expected in str(err.value), str(err.value)


def test_the_list_gives_targets_time_zones_and_variables(tmp_path):
    (tmp_path / "l.csv").write_text("number,name,amount_due,tz\n+1 555 0100,Ann,12.50,America/New_York\n"
                                    "\n0033612345678,Zoé,3,\n")
    rows, digest = load_contacts(tmp_path / "l.csv", "Europe/Paris")
    assert [(r.row, r.target, r.tz, r.variables) for r in rows] == [
        (1, "+1 555 0100", "America/New_York", {"name": "Ann", "amount_due": "12.50"}),
        (2, "0033612345678", "Europe/Paris", {"name": "Zoé", "amount_due": "3"})]
    assert rows[0].uri("trunk.example.com") == "sip:+15550100@trunk.example.com"
    assert rows[0].number == "15550100" and len(digest) == 64


@pytest.mark.parametrize("text,expected", [
    ("", "empty"),
    ("name,phone\nAnn,1\n", "line 1: no `number` or `uri` column"),
    ("number,name\n1,Ann,extra\n", "line 2: 3 fields, the header has 2"),
    ("number,tz\n1,Nowhere/City\n", "line 2: unknown time zone"),
    ("uri\nhttp://x\n", "line 2: 'http://x' is not a sip: URI"),
    ("number,first name\n1,Ann\n", "column 'first name' is not a variable name"),
])
def test_a_bad_list_is_one_line_with_its_line_number(tmp_path, text, expected):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(CampaignError, match=expected):
        load_contacts(tmp_path / "l.csv", "UTC")


def test_the_dnc_list_compares_digits(tmp_path):
    (tmp_path / "dnc.txt").write_text("# opted out\n+1 (555) 010-2000\n\n33 6 12 34 56 78  # asked twice\n")
    assert load_dnc(tmp_path / "dnc.txt") == {"15550102000", "33612345678"}
    (tmp_path / "bad.txt").write_text("call me maybe\n")
    with pytest.raises(CampaignError, match="line 1: 'call me maybe' has no digits"):
        load_dnc(tmp_path / "bad.txt")
    with pytest.raises(CampaignError, match="do-not-call list .*missing.txt"):
        load_dnc(tmp_path / "missing.txt")


def test_callbot_campaign_run_says_one_line_and_exits_2_for_a_bad_file(tmp_path):
    (tmp_path / "l.csv").write_text("number\n1\n")
    (tmp_path / "c.toml").write_text("calls_per_second = -1\n")
    out = subprocess.run([sys.executable, "-m", "callbot.app.cli", "campaign", "run", str(tmp_path / "l.csv"),
                          "--campaign", str(tmp_path / "c.toml"), "--engine", "echo"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"callbot: error: {tmp_path / 'c.toml'}: $.calls_per_second: Expected `float` > 0.0"]
    (tmp_path / "c.toml").write_text("")
    out = subprocess.run([sys.executable, "-m", "callbot.app.cli", "campaign", "run", str(tmp_path / "l.csv"),
                          "--campaign", str(tmp_path / "c.toml"), "--engine", "echo"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "give --host" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_the_machine_message_takes_the_rows_variables():
    from callbot.app.campaign_runner import message_text

    assert message_text("Hello {name}, you owe {amount_due}.", {"name": "Ann", "amount_due": "12"}) == \
        "Hello Ann, you owe 12."
    assert message_text("Hello {name}{missing}.", {"name": "Ann"}) == "Hello Ann."
    assert message_text("Stray { brace", {}) == "Stray { brace"
