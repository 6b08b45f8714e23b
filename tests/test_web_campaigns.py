"""The panel's campaigns page (web/campaigns.py over app/web_campaigns.py), with `callbot web` as a user runs
it and real dialers (`callbot campaign run` with [campaigns] dialer_config, the echo engine) calling a
pjsua2 callee. In chromium an admin starts a campaign from the page (a CSV uploaded, the campaign TOML
typed, paused), after a campaign file with a mistake was refused with its one line and no dialer; sees it
paused at 0 of 3, resumes it and sees it finish with its outcomes. Over HTTP a viewer of its tenant reads
it but cannot act or start (403), a supervisor of another tenant neither sees it nor acts on it (404) nor
starts one with another tenant's bot (400). Each action is audited."""
from __future__ import annotations

import re
import socket
import subprocess

import httpx
import pytest

from tests.sip_peers import _Lines, PjsuaPeer, eventually, free_port, serve_config, stop_process
from tests.test_web import ADMIN_PW, CALLBOT, _sign_in, _signed_in, add_user, browser  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(240)
CAMPAIGN = "max_call_s = 1.0\ncalls_per_second = 5\n[amd]\nenabled = false\n[window]\nhours = \"00:00-24:00\"\n"
BOTS = '[[tenants]]\nname = "acme"\n[[tenants]]\nname = "beta"\n[[bots]]\nname = "sales"\ntenant = "acme"\n'


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_a_campaign_is_started_seen_and_resumed_from_the_panel_within_its_tenant(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    (tmp_path / "dialer").mkdir()
    serve_config(tmp_path / "dialer", free_port(), account="out", user="bot", tail=BOTS)
    cfg = tmp_path / "callbot.toml"
    cfg.write_text('recordings_dir = "calls"\n' + BOTS + '[campaigns]\ndialer_config = "dialer/callbot.toml"\n'
                   'engine = "echo"\n')
    (tmp_path / "calls").mkdir()
    for name, role, tenant in (("ada", "admin", None), ("vic", "viewer", "acme"), ("sue", "supervisor", "beta")):
        add_user(cfg, name, role, ADMIN_PW, tenant)
    port = free_port(socket.SOCK_STREAM)
    web = subprocess.Popen([*CALLBOT, "web", "--listen", f"127.0.0.1:{port}", "--config", str(cfg)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _Lines(web.stderr, tmp_path / "web.stderr").wait_line("listening", 30)
        base = f"http://127.0.0.1:{port}"
        with PjsuaPeer(user="people", log_dir=tmp_path) as peer:
            user = peer.uri.split(":")[1].split("@")[0]
            rows = "\n".join(f"{peer.uri.replace(f'sip:{user}@', f'sip:p{i}@')},P{i}" for i in range(3))
            (tmp_path / "people.csv").write_bytes(b"\xef\xbb\xbf" + f"uri,name\n{rows}\n".encode())  # a BOM, as Excel

            d = browser
            _sign_in(d, base, "ada", ADMIN_PW)
            d.get(base + "/campaigns")

            def start(campaign: str) -> None:
                d.find_element(By.ID, "list").send_keys(str(tmp_path / "people.csv"))
                Select(d.find_element(By.ID, "bot")).select_by_visible_text("sales")
                box = d.find_element(By.ID, "campaign")
                box.clear()
                box.send_keys(campaign)
                if not d.find_element(By.ID, "paused").is_selected():
                    d.find_element(By.ID, "paused").click()
                d.find_element(By.CSS_SELECTOR, "#start button[type=submit]").click()

            start(CAMPAIGN.replace("calls_per_second = 5", "calls_per_second = 0"))  # a mistake: refused whole
            said = eventually(lambda: d.find_elements(By.ID, "error"), 10, "the campaign file's error")[0].text
            assert "calls_per_second" in said and "Expected `float` > 0" in said, said
            assert not d.find_elements(By.CSS_SELECTOR, "#campaigns tr[data-campaign]")  # no dialer started
            assert "calls_per_second = 0" in d.find_element(By.ID, "campaign").get_attribute("value")  # kept to fix
            start(CAMPAIGN)
            notice = eventually(lambda: d.find_elements(By.ID, "started"), 15, "the campaign started")[0].text
            cid = re.search(r"Campaign (\S+) started", notice).group(1)
            row = f'#campaigns tr[data-campaign="{cid}"]'
            assert d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "paused"
            assert "0 / 3" in d.find_element(By.CSS_SELECTOR, row + " .progress").text
            log = tmp_path / "calls" / "campaigns" / cid / "campaign.log"
            eventually(lambda: log.exists() and "(paused)" in log.read_text(), 30, "the dialer up and paused")

            vic, sue = _signed_in(base, "vic", ADMIN_PW), _signed_in(base, "sue", ADMIN_PW)
            page = vic.get("/campaigns").text
            assert f'data-campaign="{cid}"' in page and "Resume" not in page and 'id="start"' not in page
            assert vic.post(f"/campaigns/{cid}/resume", data={"csrf": _csrf(page)}).status_code == 403
            assert vic.post("/campaigns/start", data={"csrf": _csrf(page), "bot": "sales"}).status_code == 403
            page = sue.get("/campaigns").text
            assert cid not in page and "No bot of yours" in page  # another tenant's campaign, and bot
            assert sue.post(f"/campaigns/{cid}/resume", data={"csrf": _csrf(page)}).status_code == 404
            r = sue.post("/campaigns/start", data={"csrf": _csrf(page), "bot": "sales", "campaign": CAMPAIGN},
                         files={"list": ("people.csv", b"uri,name\nsip:x@127.0.0.1,X\n", "text/csv")})
            assert r.status_code == 400 and "not a bot of yours" in r.text
            vic.close(), sue.close()
            assert peer.all("incoming") == []  # nobody dialled while paused

            d.get(base + "/campaigns")
            d.find_element(By.CSS_SELECTOR, row + " form.resume button").click()
            eventually(lambda: d.find_elements(By.ID, "done"), 10, "the page saying the resume was asked")

            def finished():
                d.get(base + "/campaigns")
                return d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "finished"
            eventually(finished, 60, "the campaign finished, on the page")
            cells = d.find_element(By.CSS_SELECTOR, row).text
            assert "3 / 3" in cells and "answered-human 3" in cells, cells
            assert len(peer.all("incoming")) == 3
            assert not d.find_elements(By.CSS_SELECTOR, row + " form")  # nothing to control once it is over
        with httpx.Client(base_url=base, timeout=10) as anon:
            assert anon.get("/campaigns").status_code == 303
        ada = _signed_in(base, "ada", ADMIN_PW)
        audit = ada.get("/audit").text
        ada.close()
        assert "campaign.start" in audit and "campaign.resume" in audit and cid in audit
    finally:
        stop_process(web)
