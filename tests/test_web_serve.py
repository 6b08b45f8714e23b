"""The panel served by `callbot serve` itself ([web] listen, app/web_host.py), showing a call a real SIP
peer made: `callbot serve --engine echo` with a flow on loopback, a pjsua2 caller pressing 1; the call in
the panel's list, its page with the flow path the call took, and its recording playing in headless
chromium (the audio element's duration is the recording's)."""
from __future__ import annotations

import wave

import pytest

from tests.sip_peers import PjsuaPeer, eventually
from tests.test_store_calls import FLOW, _tone
from tests.test_web import _sign_in, browser  # noqa: F401  (the browser fixture)
from tests.web_serve_harness import panel_serve

pytestmark = pytest.mark.timeout(180)
PASSWORD = "serve-password-1"


def test_serve_shows_a_real_call_in_its_panel(tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    _tone(tmp_path / "tone.wav")
    (tmp_path / "support.toml").write_text(FLOW)
    with panel_serve(tmp_path, """
[[bots]]
name = "support"
flow = "support.toml"
""", PASSWORD) as serve:
        base, sip_port = serve.base, serve.sip_port
        with PjsuaPeer(user="bob", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("media", call_id=call_id, timeout=15)
            _sign_in(browser, base, "ada", PASSWORD)
            # while it goes on: listed, not yet complete
            def listed():
                browser.get(base + "/calls")
                return browser.find_elements(By.CSS_SELECTOR, f'tr[data-call-id="{call_id}"]')
            row = eventually(listed, 20, "the live call in the list")[0]
            assert "open" in row.text
            peer.send("dtmf", call_id=call_id, digits="1", method="info")
            peer.expect("disconnected", call_id=call_id, timeout=20)
        def finished():
            browser.get(base + "/calls")
            rows = browser.find_elements(By.CSS_SELECTOR, f'tr[data-call-id="{call_id}"]')
            return rows if rows and "bot_hangup" in rows[0].text else None
        eventually(finished, 30, "the finished call in the list")
        browser.find_element(By.CSS_SELECTOR, f'tr[data-call-id="{call_id}"] a').click()
        path = eventually(lambda: browser.find_elements(By.ID, "flow-path"), 10, "the call page")[0]
        assert path.text.split(" → ") == ["greet", "menu", "bye"]
        duration = eventually(lambda: browser.execute_script(
            "var a = document.getElementById('audio'); return a && a.readyState >= 1 && a.duration;"), 15,
            "the recording's duration")
        wav = next((tmp_path / "calls").rglob("*.wav"))
        with wave.open(str(wav)) as w:
            seconds = w.getnframes() / w.getframerate()
        assert abs(duration - seconds) < 0.05, (duration, seconds)
        browser.save_screenshot(str(tmp_path / "serve-call.png"))
