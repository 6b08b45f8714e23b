"""Call routes (app/routes.py): which bot and tenant take a call, by DID, account, caller and header; what a
call no route takes gets; what an INVITE's text gives the record (sip/call_record.py); where the recorder
files a tenant's calls. Records are built from real INVITE text, no SIP stack runs."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from callbot.app.recording import Recorder
from callbot.app.routes import CallRoutes, Refusal, Route, normalize_number
from callbot.app.settings import ConfigError, parse_settings
from callbot.sip.call_record import HEADER_CHARS, HEADERS_KEPT, CallRecord, invite_facts, uri_user

TWO_TENANTS = """
recordings_dir = "calls"
[[sip.accounts]]
name = "trunk"
user = "trunk"
[[sip.accounts]]
name = "lab"
user = "lab"
[[tenants]]
name = "acme"
[[tenants]]
name = "globex"
recordings_dir = "globex-records"
[[bots]]
name = "sales"
tenant = "acme"
language = "en-US"
[[bots]]
name = "support"
tenant = "globex"
language = "de-CH"
[[bots]]
name = "lab"
"""


def invite(uri: str = "sip:+15550001@127.0.0.1:5060", from_: str = '"Ann" <sip:+4930123@10.0.0.9>;tag=a1',
           headers: str = "") -> str:
    return (f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK1\r\nFrom: {from_}\r\n"
            f"To: <{uri}>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n{headers}Content-Length: 0\r\n\r\n")


def record(account: str = "trunk", direction: str = "inbound", **kw) -> CallRecord:
    rec = CallRecord(call_id="c1", direction=direction, account=account, local_uri="sip:trunk@127.0.0.1",
                     remote_uri="sip:+4930123@10.0.0.9", start=0.0)
    rec.fill_from_invite(invite(**kw))
    return rec


def routes(text: str, tmp_path) -> CallRoutes:
    return CallRoutes.from_settings(parse_settings(TWO_TENANTS + text, base_dir=tmp_path))


# ---- what an INVITE gives the record ------------------------------------------------------------------


def test_invite_facts_take_the_request_uri_user_the_caller_and_kept_headers():
    uri, called, caller, headers = invite_facts(invite(
        "sip:%2B15550001@pbx.example.com;user=phone", headers="X-Tenant: acme\r\nSubject: hi\r\n"
        "P-Asserted-Identity: <tel:+4930123>\r\nDiversion: <sip:100@pbx>;reason=busy\r\n"
        "diversion: <sip:200@pbx>\r\nx-tenant: other\r\nAccept-Language: de,\r\n en\r\n"))
    assert uri == "sip:%2B15550001@pbx.example.com;user=phone" and called == "+15550001" and caller == "+4930123"
    # kept by the name the first one was sent with; repeats joined; folded lines continued; Subject is not kept
    assert headers == {"X-Tenant": "acme, other", "P-Asserted-Identity": "<tel:+4930123>",
                       "Diversion": "<sip:100@pbx>;reason=busy, <sip:200@pbx>", "Accept-Language": "de, en"}


def test_uri_user_of_sip_tel_and_header_values():
    assert uri_user("sip:+15550001@host:5060;transport=udp") == "+15550001"
    assert uri_user("sips:alice:secret@host") == "alice"
    assert uri_user("tel:+1-555-0001;phone-context=x") == "+1-555-0001"
    assert uri_user('"Bob" <sip:bob;npdi@host>;tag=9') == "bob"
    assert uri_user("sip:host.example.com") == "" and uri_user("mailto:x@y") == "" and uri_user("") == ""


def test_header_selection_is_bounded_and_peer_bytes_are_escaped():
    many = "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(100))
    _, _, _, headers = invite_facts(invite(headers=many))
    assert len(headers) == HEADERS_KEPT and all(len(v) == HEADER_CHARS for v in headers.values())
    # pjsua2 hands bytes that are not UTF-8 over as lone surrogates: escaped, so JSON takes the record
    _, called, caller, headers = invite_facts(invite("sip:1\udcff@h", from_="<sip:a\udcfe@h>",
                                                     headers="X-Bad: \udcff\r\n"))
    assert (called, caller, headers) == ("1\\xff", "a\\xfe", {"X-Bad": "\\xff"})
    rec = record()
    rec.fill_from_invite(invite(headers="X-Bad: \udcff\r\n"))
    json.dumps(rec.to_dict())  # JSON-safe


# ---- matching --------------------------------------------------------------------------------------


def test_did_compares_without_plus_and_visual_separators(tmp_path):
    r = routes('[[routes]]\ndid = "+1 (555) 000-1"\nbot = "sales"\n[[routes]]\ndid = ["15550002", "555.0003"]\n'
               'bot = "support"\n', tmp_path)
    assert normalize_number("+1 (555) 000-1") == "15550001"
    assert r.route(record(uri="sip:15550001@h")).bot == "sales"
    assert r.route(record(uri="sip:+15550001@h")).bot == "sales"
    assert r.route(record(uri="tel:+1-555-0001")).bot == "sales"
    assert r.route(record(uri="sip:+15550002@h")).bot == "support"
    assert r.route(record(uri="sip:5550003@h")).bot == "support"
    assert r.route(record(uri="sip:155500011@h")) == Refusal(404, "Not Found")


def test_a_route_holds_when_every_condition_does_and_the_first_one_wins(tmp_path):
    r = routes("""
[[routes]]
name = "vip"
did = "15550001"
caller = "^\\\\+4930"
header = { name = "x-tenant", match = "^acme$" }
bot = "sales"
variables = { tier = "vip" }
[[routes]]
account = "lab"
bot = "lab"
[[routes]]
did = "15550001"
bot = "support"
""", tmp_path)
    vip = r.route(record(headers="X-Tenant: acme\r\n"))
    assert vip == Route(bot="sales", tenant="acme", variables={"tier": "vip"}, name="vip")
    # one condition fails: the next route that holds
    assert r.route(record(headers="X-Tenant: acme2\r\n")).name == "routes[2]"
    assert r.route(record(from_="<sip:+4940999@h>", headers="X-Tenant: acme\r\n")).bot == "support"
    assert r.route(record()).bot == "support"  # no header at all
    # by account, whatever was dialled; first match wins over the later DID route
    assert r.route(record(account="lab")).bot == "lab"
    assert r.route(record(account="lab")).tenant is None
    assert r.route(record(uri="sip:999@h")) == Refusal(404, "Not Found")


def test_no_route_answer_is_configurable(tmp_path):
    r = routes('[[routes]]\ndid = "1"\nbot = "sales"\n[routing]\nno_route = 480\nreason = "No bot here"\n', tmp_path)
    rec = record(uri="sip:2@h")
    assert r.screen(rec) == (480, "No bot here") and rec.labels == {"route": "none"}
    r = routes('[[routes]]\ndid = "1"\nbot = "sales"\n[routing]\nno_route = 603\n', tmp_path)
    assert r.route(record(uri="sip:2@h")) == Refusal(603, "Decline")


def test_without_routes_the_accounts_bot_takes_the_call_as_before(tmp_path):
    text = TWO_TENANTS.replace('[[bots]]\nname = "lab"\n', '[[bots]]\nname = "lab"\naccount = "lab"\n')
    r = CallRoutes.from_settings(parse_settings(text, base_dir=tmp_path))
    assert r.route(record(uri="sip:anything@h")) == Route(bot="sales", tenant="acme", name="default")
    assert r.route(record(account="lab")).bot == "lab"
    rec = record()
    assert r.screen(rec) is None and rec.labels == {"bot": "sales", "route": "default", "tenant": "acme"}


def test_call_start_variables_and_labels(tmp_path):
    r = routes('[[routes]]\ndid = "15550002"\nbot = "support"\nvariables = { product = "x", bot = "mine" }\n',
               tmp_path)
    rec = record(uri="sip:+15550002@h")
    assert r.screen(rec) is None
    bot, variables = r.start_for(rec, None)
    assert bot == "support"
    assert variables == {"product": "x", "caller": "+4930123", "called": "+15550002", "call_id": "c1",
                         "account": "trunk", "tenant": "globex", "bot": "support", "language": "de-CH",
                         "caller_language": ""}
    assert rec.labels == {"bot": "support", "route": "routes[0]", "tenant": "globex"}
    assert r.recordings_dir_for(rec) == str(tmp_path / "globex-records")
    # an outbound call takes the bot named when dialling, never a route, and files in that bot's tenant
    out = CallRecord(call_id="o1", direction="outbound", account="trunk", local_uri="sip:trunk@127.0.0.1",
                     remote_uri="<sip:+15557777@10.0.0.9>", start=0.0)
    bot, variables = r.start_for(out, "sales")
    assert bot == "sales" and variables["called"] == "+15557777" and variables["caller"] == "trunk"
    assert out.labels["tenant"] == "acme" and r.recordings_dir_for(out) == str(tmp_path / "calls" / "acme")
    # dialled without a bot: the account's (here the first) bot, no refusal
    assert r.start_for(CallRecord(call_id="o2", direction="outbound", account="trunk", local_uri="", remote_uri="",
                                  start=0.0))[0] == "sales"
    lab = record(account="lab")
    r.start_for(lab, "lab")
    assert r.recordings_dir_for(lab) is None  # no tenant: the recorder's own folder


def test_the_callers_language_comes_from_accept_language(tmp_path):
    r = routes("", tmp_path)
    for header, expected in (("Accept-Language: es-MX;q=1, en;q=0.5\r\n", "es-MX"), ("accept-language: fr\r\n", "fr"),
                             ("Accept-Language: *\r\n", ""), ("", "")):
        _, variables = r.start_for(record(headers=header), None)
        assert variables["caller_language"] == expected, header
    # a route can say it for a number (a Spanish DID); the caller's own header still wins
    r = routes('[[routes]]\ndid = "15550002"\nbot = "support"\nvariables = { caller_language = "es" }\n', tmp_path)
    assert r.start_for(record(uri="sip:+15550002@h"), None)[1]["caller_language"] == "es"
    assert r.start_for(record(uri="sip:+15550002@h", headers="Accept-Language: fr\r\n"), None)[1][
        "caller_language"] == "fr"


# ---- the recorder files each call in its tenant's folder ---------------------------------------------


def test_recorder_files_a_call_in_the_folder_chosen_and_survives_one_it_cannot_make(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    folders = {"a": str(tmp_path / "tenants" / "a"), "b": str(blocker / "b")}
    recorder = Recorder(tmp_path, directory_for=lambda rec: folders.get(rec.labels.get("tenant")))
    try:
        recs = {}
        for tenant in ("a", "b", None):
            rec = CallRecord(call_id=f"call-{tenant}", direction="inbound", account="x", local_uri="", remote_uri="",
                             start=0.0, labels={"tenant": tenant} if tenant else {})
            with caplog.at_level(logging.WARNING, logger="callbot.app.recording"):
                recs[tenant] = (recorder.start(rec, 16000), rec)
        got, rec = recs["a"]
        got.caller.write(np.zeros(160, np.int16)), got.bot.write(np.zeros(160, np.int16))
        recorder.finish(got, rec)
        assert os.path.dirname(got.wav_path) == folders["a"]
        assert sorted(os.listdir(folders["a"])) == [got.name + ".json", got.name + ".wav"]
        assert recs["b"][0] is None  # unrecorded, and said so in one line
        assert [r.getMessage() for r in caplog.records] == [
            f"call call-b is not recorded: its folder {folders['b']!r} cannot be made (Not a directory)"]
        assert os.path.dirname(recs[None][0].wav_path) == str(tmp_path)
    finally:
        recorder.close()


def test_settings_give_each_tenant_its_own_folder(tmp_path):
    s = parse_settings(TWO_TENANTS, base_dir=tmp_path)
    assert s.tenant_dir("acme") == os.path.join(str(tmp_path / "calls"), "acme")
    assert s.tenant_dir("globex") == str(tmp_path / "globex-records")
    assert [b.language for b in s.bots] == ["en-US", "de-CH", "en"]


@pytest.mark.parametrize("bad", ['"a\\u0007b"', '""', '"two\\r\\nlines"', '" "'])
def test_the_no_route_reason_is_one_printable_line(bad, tmp_path):
    with pytest.raises(ConfigError, match=r"^\$\.routing\.reason: a SIP reason phrase is one line of 1-128"):
        parse_settings(TWO_TENANTS + f"[routing]\nreason = {bad}\n", base_dir=tmp_path)
