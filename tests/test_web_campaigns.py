"""The panel's campaigns page (web/campaigns.py over app/web_campaigns.py): `callbot web` over the folder a
campaign registry started a real dialer in (`callbot campaign run`, paused, the echo engine, a pjsua2
callee). In chromium an admin sees it paused at 0 of 3, resumes it and sees it finish with its outcomes;
over HTTP a viewer of its tenant reads it but cannot act (403), a supervisor of another tenant neither
sees it nor acts on it (404); the action is audited."""
from __future__ import annotations

import re
import socket
import subprocess

import httpx
import pytest

from callbot.app.campaign_api import CampaignRegistry
from tests.sip_peers import _Lines, PjsuaPeer, eventually, free_port, serve_config, stop_process
from tests.test_web import ADMIN_PW, CALLBOT, _sign_in, _signed_in, add_user, browser  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(240)
CAMPAIGN = "max_call_s = 1.0\ncalls_per_second = 5\n[amd]\nenabled = false\n[window]\nhours = \"00:00-24:00\"\n"
BOTS = '[[tenants]]\nname = "acme"\n[[tenants]]\nname = "beta"\n[[bots]]\nname = "sales"\ntenant = "acme"\n'


def test_a_campaign_is_seen_and_resumed_from_the_panel_within_its_tenant(tmp_path, browser):
    from selenium.webdriver.common.by import By

    (tmp_path / "dialer").mkdir()
    dialer = serve_config(tmp_path / "dialer", free_port(), account="out", user="bot", tail=BOTS)
    cfg = tmp_path / "callbot.toml"
    cfg.write_text('recordings_dir = "calls"\n' + BOTS)
    (tmp_path / "calls").mkdir()
    for name, role, tenant in (("ada", "admin", None), ("vic", "viewer", "acme"), ("sue", "supervisor", "beta")):
        add_user(cfg, name, role, ADMIN_PW, tenant)
    registry = CampaignRegistry(str(tmp_path / "calls" / "campaigns"), str(dialer))
    port = free_port(socket.SOCK_STREAM)
    web = subprocess.Popen([*CALLBOT, "web", "--listen", f"127.0.0.1:{port}", "--config", str(cfg)], cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _Lines(web.stderr, tmp_path / "web.stderr").wait_line("listening", 30)
        base = f"http://127.0.0.1:{port}"
        with PjsuaPeer(user="people", log_dir=tmp_path) as peer:
            user = peer.uri.split(":")[1].split("@")[0]
            rows = "\n".join(f"{peer.uri.replace(f'sip:{user}@', f'sip:p{i}@')},P{i}" for i in range(3))
            cid = registry.start({"list_csv": "uri,name\n" + rows + "\n", "campaign_toml": CAMPAIGN, "engine": "echo",
                                  "bot": "sales", "paused": True})["id"]
            log = tmp_path / "calls" / "campaigns" / cid / "campaign.log"
            eventually(lambda: log.exists() and "(paused)" in log.read_text(), 30, "the dialer up and paused")

            vic, sue = _signed_in(base, "vic", ADMIN_PW), _signed_in(base, "sue", ADMIN_PW)
            page = vic.get("/campaigns").text
            assert f'data-campaign="{cid}"' in page and 'data-status="paused"' in page and "Resume" not in page
            token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            assert vic.post(f"/campaigns/{cid}/resume", data={"csrf": token}).status_code == 403
            page = sue.get("/campaigns").text
            assert cid not in page  # another tenant's campaign
            token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            assert sue.post(f"/campaigns/{cid}/resume", data={"csrf": token}).status_code == 404
            vic.close(), sue.close()
            assert peer.all("incoming") == []  # nobody dialled while paused

            d = browser
            _sign_in(d, base, "ada", ADMIN_PW)
            d.get(base + "/campaigns")
            row = f'#campaigns tr[data-campaign="{cid}"]'
            assert d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "paused"
            assert "0 / 3" in d.find_element(By.CSS_SELECTOR, row + " .progress").text
            d.find_element(By.CSS_SELECTOR, row + " form.resume button").click()
            eventually(lambda: d.find_elements(By.ID, "done"), 10, "the page saying the resume was asked")

            def finished():
                d.get(base + "/campaigns")
                return d.find_element(By.CSS_SELECTOR, row).get_attribute("data-status") == "ended"  # started by another registry
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
        assert "campaign.resume" in audit and cid in audit
    finally:
        registry.close()
        stop_process(web)
