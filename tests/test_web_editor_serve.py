"""The flow editor in headless chromium, with real calls before and after a save: `callbot serve --engine
echo` on loopback, a pjsua2 caller (tests/sip_peers.py), the panel served by serve itself ([web] listen)
or by `callbot web --config` beside it (another process over the same files and store).

Call A is answered and waits in the menu of the flow as it was. Meanwhile an admin opens the bot's page,
types a new flow with a mistake (key 1 goes to a state that does not exist), presses Save: the error is
shown word for word as `callbot flows check` prints it, its line marked in the numbered copy, and the
file is not written. The admin fixes it and saves. Call A then presses 1 and follows the flow it started
with (its record's path ends in the old state) and ends by the bot's hang-up, not dropped; call B,
placed after the save, presses 1 and follows the new flow. serve's stderr says once that it took the
new file. Screenshots go to the test's tmp dir.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import pytest

from tests.sip_peers import PjsuaPeer, eventually
from tests.test_store_calls import _tone
from tests.test_web import _sign_in, browser  # noqa: F401  (the browser fixture)
from tests.web_serve_harness import CALLBOT, panel_serve

pytestmark = pytest.mark.timeout(240)
PASSWORD = "editor-password-1"
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"

OLD_FLOW = """start = "greet"
[states.greet]
play = "tone.wav"
next = "menu"
[states.menu]
gather = { max_digits = 1, timeout_s = 60, interdigit_timeout_s = 2 }
on_digits = { "1" = "bye_old" }
on_no_input = "bye_old"
[states.bye_old]
play = "tone.wav"
hangup = true
"""
NEW_FLOW = OLD_FLOW.replace('"1" = "bye_old"', '"1" = "bye_new"') + """[states.bye_new]
play = "tone.wav"
hangup = true
"""
MISTAKE = NEW_FLOW.replace('"1" = "bye_new"', '"1" = "bye_nwe"')


def _record(calls_dir, call_id: str) -> dict | None:
    """The call's record (its JSON sidecar, rewritten as the call goes), None until it is there."""
    for path in calls_dir.rglob("*.json"):
        if path.name.endswith(".analysis.json"):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if record.get("call_id") == call_id:
            return record
    return None


def _flow_state(calls_dir, call_id: str, state: str):
    record = _record(calls_dir, call_id)
    return record if record and (record.get("flow") or {}).get("state") == state else None


def _type_flow(browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "flow-text")
    box.clear()
    box.send_keys(text)


def _save(browser) -> None:
    """Click Save and wait until the page it posted to has replaced this one (elements found while the
    browser is between the two pages could be the old page's, or gone under the finder)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from selenium.common.exceptions import WebDriverException

    old = browser.find_element(By.ID, "flow-text")
    browser.find_element(By.ID, "flow-save").click()

    def old_page_gone(driver) -> bool:
        try:
            return expected_conditions.staleness_of(old)(driver)
        except WebDriverException as err:  # chromedriver asked about a node of a page being replaced
            if "does not belong to the document" in str(err):
                return True
            raise

    WebDriverWait(browser, 20).until(old_page_gone)


@pytest.mark.parametrize("panel", ["in-serve", "beside-serve"])
def test_an_admin_fixes_a_flow_in_the_browser_and_the_next_call_follows_it(tmp_path, browser, panel):  # noqa: F811
    """`panel`: served by serve itself ([web] listen), or by `callbot web --config` in a process of its own
    over the same config, flow file and store."""
    from selenium.webdriver.common.by import By

    _tone(tmp_path / "tone.wav")
    flow_file = tmp_path / "support.toml"
    flow_file.write_text(OLD_FLOW)
    # what `callbot flows check` says of the mistake, to compare with the page
    (tmp_path / "mistake").mkdir()
    _tone(tmp_path / "mistake" / "tone.wav")
    (tmp_path / "mistake" / "support.toml").write_text(MISTAKE)
    check = subprocess.run([*CALLBOT, "flows", "check", str(tmp_path / "mistake" / "support.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2
    expected = check.stderr.strip().removeprefix("callbot: error: ").replace(str(tmp_path / "mistake"), str(tmp_path))
    mistake_line = next(i for i, line in enumerate(MISTAKE.split("\n"), 1) if "bye_nwe" in line)

    calls = tmp_path / "calls"
    with panel_serve(tmp_path, """
[[bots]]
name = "support"
flow = "support.toml"
""", PASSWORD, panel=panel) as serve:
        sip_port, base, err = serve.sip_port, serve.base, serve.err
        with PjsuaPeer(user="bob", log_dir=tmp_path) as peer:
            call_a = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("media", call_id=call_a, timeout=15)
            eventually(lambda: _flow_state(calls, call_a, "menu"), 20, "call A waiting in the old flow's menu")

            _sign_in(browser, base, "ada", PASSWORD)
            browser.get(base + "/bots")
            browser.find_element(By.CSS_SELECTOR, 'tr[data-bot="support"] a').click()
            eventually(lambda: browser.find_elements(By.ID, "flow-graph"), 10, "the bot's page with its graph")
            assert browser.find_elements(By.CSS_SELECTOR, '#flow-graph g[data-state="bye_old"]')
            browser.save_screenshot(str(tmp_path / "editor-before.png"))

            _type_flow(browser, MISTAKE)
            _save(browser)
            error = eventually(lambda: browser.find_elements(By.ID, "flow-error"), 10, "the flow's error")[0]
            assert error.find_element(By.CSS_SELECTOR, ".message").text == expected
            assert error.get_attribute("data-line") == str(mistake_line)
            bad = browser.find_elements(By.CSS_SELECTOR, "#flow-lines li.bad")
            assert [li.get_attribute("data-line") for li in bad] == [str(mistake_line)]
            assert "bye_nwe" in bad[0].text
            # the script selected the bad line in the text box
            selected = browser.execute_script(
                "var b = document.getElementById('flow-text'); return b.value.substring(b.selectionStart, b.selectionEnd);")
            assert "bye_nwe" in selected
            assert flow_file.read_text() == OLD_FLOW  # never written
            browser.save_screenshot(str(tmp_path / "editor-error.png"))
            if os.environ.get("CALLBOT_UPDATE_SCREENSHOTS") and panel == "in-serve":  # docs/web.md's
                shutil.copy(tmp_path / "editor-error.png", DOCS / "panel-editor.png")

            _type_flow(browser, NEW_FLOW)
            _save(browser)
            message = eventually(lambda: browser.find_elements(By.ID, "flow-message"), 10, "the save's message")[0]
            assert "saved" in message.text and "the next call follows it" in message.text
            assert flow_file.read_text() == NEW_FLOW and (tmp_path / "support.toml.bak").read_text() == OLD_FLOW
            assert browser.find_elements(By.CSS_SELECTOR, '#flow-graph g[data-state="bye_new"]')
            browser.save_screenshot(str(tmp_path / "editor-saved.png"))

            # call A, up during the save, keeps its flow and is not dropped
            peer.send("dtmf", call_id=call_a, digits="1", method="info")
            peer.expect("disconnected", call_id=call_a, timeout=20)
            a = eventually(lambda: (r := _record(calls, call_a)) and r.get("end") and r, 20, "call A's final record")
            assert a["flow"]["path"] == ["greet", "menu", "bye_old"], a["flow"]
            assert a["hangup_cause"] == "local", a["hangup_cause"]  # the flow hung up, not the caller nor a failure

            # call B, after the save, follows the new flow
            call_b = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("media", call_id=call_b, timeout=15)
            eventually(lambda: _flow_state(calls, call_b, "menu"), 20, "call B in the new flow's menu")
            peer.send("dtmf", call_id=call_b, digits="1", method="info")
            peer.expect("disconnected", call_id=call_b, timeout=20)
            b = eventually(lambda: (r := _record(calls, call_b)) and r.get("end") and r, 20, "call B's final record")
            assert b["flow"]["path"] == ["greet", "menu", "bye_new"], b["flow"]
            assert b["hangup_cause"] == "local"
        reloaded = eventually(lambda: [x for x in err.lines if "reloaded" in x], 10, "serve's reload line")
        assert len(reloaded) == 1 and "bot support: flow" in reloaded[0]
        browser.get(base + "/audit")
        assert "flow.save" in browser.find_element(By.TAG_NAME, "main").text


def _events(calls_dir, record: dict) -> list[dict]:
    """The call's events file (JSON lines), beside its record: the events written so far."""
    path = next(calls_dir.rglob(os.path.basename(record.get("events") or "-")), None)
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def test_a_persona_and_a_number_saved_in_the_panel_reach_the_next_call_and_a_voice_waits_for_a_restart(tmp_path):
    """A bot without a flow, reached by the number its route names: its persona and its route's number edited
    on its page (httpx, as the form posts it). The next call, to the new number, is answered and given the
    persona through set_persona (its PersonaChanged event, the echo engine reporting it); the old number
    is now refused (404); the call before the save had no PersonaChanged. The voice changed with them is
    logged once as needing a restart."""
    import re

    from tests.test_web import _signed_in

    calls = tmp_path / "calls"
    with panel_serve(tmp_path, """
[[bots]]
name = "free"   # converses freely
persona = "You are Ana."
[[routes]]
bot = "free"
did = "5550100"
""", PASSWORD) as serve:
        cfg, sip_port, err = serve.cfg, serve.sip_port, serve.err
        with PjsuaPeer(user="bob", log_dir=tmp_path) as peer:
            def one_call(number: str, persona: bool) -> dict:
                call_id = peer.call(f"sip:{number}@127.0.0.1:{sip_port}")
                peer.expect("media", call_id=call_id, timeout=15)
                record = eventually(lambda: _record(calls, call_id), 10, "the call's record")
                if persona:  # the call goes on until the model has the persona (the echo engine: at once)
                    eventually(lambda: [e for e in _events(calls, record) if e["event"] == "PersonaChanged"], 10,
                               "the new persona reaching the call")
                else:  # as long as the call after takes to be given its persona
                    eventually(lambda: [e for e in _events(calls, record) if e["event"] == "CallConfirmed"], 10,
                               "the call confirmed")
                peer.send("hangup", call_id=call_id)
                peer.expect("disconnected", call_id=call_id, timeout=15)
                return eventually(lambda: (r := _record(calls, call_id)) and r.get("end") and r, 20, "the final record")

            before = one_call("5550100", persona=False)
            ada = _signed_in(serve.base, "ada", PASSWORD)
            page = ada.get("/bots/free").text
            token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            loaded = re.search(r'id="settings-form".*?name="loaded" value="([^"]*)"', page, re.S).group(1)
            r = ada.post("/bots/free/settings", data={"csrf": token, "loaded": loaded, "voice": "NATM1",
                                                      "persona": "You are Ben, from billing.", "language": "en",
                                                      "did-0": "5550200"})
            assert r.status_code == 200 and "saved: voice, persona, routes[0].did" in r.text, r.text
            assert "# converses freely" in cfg.read_text()
            after = one_call("5550200", persona=True)
            old_number = peer.call(f"sip:5550100@127.0.0.1:{sip_port}")
            gone = peer.expect("disconnected", call_id=old_number, timeout=15)
            assert gone["code"] == 404, gone
        changed = [e for e in _events(calls, after) if e["event"] == "PersonaChanged"]
        assert [e["id"] for e in changed] == [after["call_id"] + "#bot-persona"]
        assert not [e for e in _events(calls, before) if e["event"] == "PersonaChanged"]
        assert len([x for x in err.lines if "voice changed" in x and "starts again" in x]) == 1
        assert len([x for x in err.lines if "persona changed" in x]) == 1
        assert len([x for x in err.lines if "routes changed: the calls from now on are routed by them" in x]) == 1
