"""The live calls page and the system page of the panel served by `callbot serve` ([web] listen): a real
pjsua2 caller calls a flow on the echo engine (tenant acme), says "I want to talk to an agent"
(espeak-ng) which the live recognizer (pocketsphinx) hears, and headless chromium shows the call on
/live with its flow state and the caller's words pushed by server-sent events (no reload), then hangs it
up with the page's button: the caller gets the BYE and the call leaves the page.

Around it, over plain HTTP: a viewer of acme sees the call but no buttons, and its POST is a 403; a
supervisor of another tenant neither sees the call (page and stream) nor acts on it (404, as for a call
that is not there); a POST without the CSRF token is a 403; a second call is transferred (blind) from the
page to a URI typed in, and reaches that peer; a supervisor listens in to the first (its audio over HTTP
while the caller speaks, and the page's own player fed by it; viewers 403, another tenant 404); a third
is transferred attended ("once they answer"): to a
busy peer first (it stays with the bot, the page shows the 486), then to one that answers (a REFER with
Replaces naming the consultation leg); every action is in the audit log; the system
page shows the slots, the Prometheus link and the SIP accounts (a direct one, one registered at kamailio,
one kamailio refuses); a stream open at SIGTERM ends, and serve
exits on its own. Screenshots go to the test's tmp dir.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading

import httpx
import numpy as np
import pytest
import soxr

from callbot.speech.tts import EspeakTts
from tests.sip_peers import Kamailio, PjsuaPeer, eventually
from tests.test_flows_call import RATE, _write_wav
from tests.test_store_calls import _tone
from tests.test_web import DOCS, _sign_in, browser  # noqa: F401  (the browser fixture)
from tests.web_serve_harness import panel_serve

pytestmark = pytest.mark.timeout(240)
PW = "live-password-1"
USERS = (("ada", "admin", None), ("sue", "supervisor", "acme"), ("vic", "viewer", "acme"),
         ("bea", "supervisor", "beta"))
FLOW = """
start = "greet"
[states.greet]
play = "tone.wav"
next = "talk"
[states.talk]
persona = "You are the live test line."
max_s = 120
"""


def _client(base: str, name: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=10, follow_redirects=False)
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)
    r = client.post("/login", data={"csrf": token, "name": name, "password": PW, "next": "/live"})
    assert r.status_code == 303, r.text
    return client


def _csrf(client: httpx.Client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/live").text).group(1)


class Stream:
    """A user's /live/events read on a thread: the updates as they come, and whether the stream ended."""

    def __init__(self, client: httpx.Client):
        self.updates: list[dict] = []
        self.ended = threading.Event()
        self.status: int | None = None
        self._client = client
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._client.stream("GET", "/live/events", timeout=httpx.Timeout(10, read=60)) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.updates.append(json.loads(line[6:]))
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def of(self, kind: str, call_id: str | None = None) -> list[dict]:
        return [u for u in list(self.updates) if u["type"] == kind and (call_id is None or u.get("call_id") == call_id)]


def _speech(text: str) -> np.ndarray:
    samples, rate = EspeakTts(voice="en-us+klatt2").synthesize(text)  # the voice pocketsphinx hears best
    speech = soxr.resample(samples.astype(np.float32), rate, RATE)
    return np.clip(np.concatenate([speech, np.zeros(RATE, np.float32)]), -32768, 32767).astype(np.int16)


def test_live_calls_in_the_browser_hang_up_scopes_and_roles(tmp_path, browser, request):  # noqa: F811
    from selenium.webdriver.common.by import By

    _tone(tmp_path / "tone.wav")
    (tmp_path / "support.toml").write_text(FLOW)
    _write_wav(tmp_path / "ask.wav", _speech("I want to talk to an agent"))
    kamailio = Kamailio({"pbxline": "pbx-password", "mallory": "the-right-one"}, tmp_path)
    request.addfinalizer(kamailio.close)
    env = {**os.environ, "LIVE_PBX_PASSWORD": "pbx-password", "LIVE_REFUSED_PASSWORD": "wrong"}
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with panel_serve(tmp_path, f"""
[[sip.accounts]]
name = "pbx"
user = "pbxline"
registrar = "{kamailio.uri}"
password_env = "LIVE_PBX_PASSWORD"
[[sip.accounts]]
name = "refused"
user = "mallory"
registrar = "{kamailio.uri}"
password_env = "LIVE_REFUSED_PASSWORD"
[[tenants]]
name = "acme"
[[tenants]]
name = "beta"
[[bots]]
name = "support"
tenant = "acme"
flow = "support.toml"
""", PW, users=USERS, metrics=True, env=env, ready_s=60) as serve, contextlib.ExitStack() as clients:
        proc, base, sip_port, metrics_port = serve.proc, serve.base, serve.sip_port, serve.metrics_port
        sue, vic, bea, ada = (_client(base, n) for n in ("sue", "vic", "bea", "ada"))
        for client in (sue, vic, bea, ada):
            clients.callback(client.close)
        sue_stream, bea_stream = Stream(sue), Stream(bea)
        eventually(lambda: sue_stream.of("snapshot") and bea_stream.of("snapshot"), 10, "both streams' snapshots")
        assert sue_stream.status == 200 and sue_stream.of("snapshot")[0]["calls"] == []

        _sign_in(browser, base, "sue", PW)
        browser.get(base + "/live")
        assert "No call in progress" in browser.find_element(By.ID, "live").text
        with PjsuaPeer(user="caller", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("state", call_id=call_id, state="CONFIRMED", timeout=15)
            # pushed to the open page: no reload
            section = f'section.live-call[data-call-id="{call_id}"]'
            found = eventually(lambda: browser.find_elements(By.CSS_SELECTOR, section), 15, "the call on /live")[0]
            assert "support" in found.text and "acme" in found.text
            eventually(lambda: "state talk" in browser.find_element(By.CSS_SELECTOR, section).text, 15,
                       "the flow state on the page")
            # listening in (a supervisor): the call's audio over HTTP while the caller speaks, and the page's
            # own player fed by it
            listener, got = _client(base, "sue"), {"pcm": bytearray()}
            clients.callback(listener.close)

            def listen_in() -> None:
                with listener.stream("GET", f"/live/{call_id}/listen", timeout=30) as r:
                    got["status"], got["rate"] = r.status_code, int(r.headers.get("x-sample-rate", "0"))
                    for chunk in r.iter_bytes():
                        got["pcm"].extend(chunk)
                        if len(got["pcm"]) >= 2 * got["rate"] * 4:  # 4 s of it
                            return

            reader = threading.Thread(target=listen_in, daemon=True)
            reader.start()
            eventually(lambda: got.get("status"), 10, "the listening stream's start")
            peer.send("play", path=str(tmp_path / "ask.wav"))
            eventually(lambda: [e for e in browser.find_elements(By.CSS_SELECTOR, section + " .live-line.caller")
                                if "agent" in e.text], 40, "the caller's words on the page")
            reader.join(20)
            assert got["status"] == 200 and got["rate"] in (8000, 16000), got.get("status")
            pcm = np.frombuffer(bytes(got["pcm"][:len(got["pcm"]) // 2 * 2]), "<i2").astype(np.float64)
            assert len(pcm) >= 4 * got["rate"] and np.sqrt(np.mean(pcm ** 2)) > 300  # the caller's words in it
            assert vic.get(f"/live/{call_id}/listen").status_code == 403  # viewers do not listen
            assert bea.get(f"/live/{call_id}/listen").status_code == 404  # another tenant's call
            listen_button = browser.find_element(By.CSS_SELECTOR, section + " button.listen")
            listen_button.click()
            eventually(lambda: int(browser.find_element(By.CSS_SELECTOR, section).get_attribute("data-heard") or 0)
                       > got["rate"], 15, "a second of the call played in the page")
            assert listen_button.text == "Stop listening"
            listen_button.click()
            assert listen_button.text == "Listen"
            refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
            assert refused == []  # the player's fetch and Web Audio under the panel's policy
            assert eventually(lambda: sue_stream.of("speaking", call_id), 10, "who speaks, on the stream")
            browser.save_screenshot(str(shots / "live.png"))
            refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
            assert refused == []  # live.js and the stream run under the panel's strict policy

            # a viewer of acme reads, and cannot act
            page = vic.get("/live").text
            assert f'data-call-id="{call_id}"' in page and "Hang up" not in page and "agent" in page
            hangup = f"/live/{call_id}/hangup"
            assert vic.post(hangup, data={"csrf": _csrf(vic)}).status_code == 403
            # another tenant's supervisor: not on its page nor its stream, 404 on its actions
            assert call_id not in bea.get("/live").text
            assert bea.post(hangup, data={"csrf": _csrf(bea)}).status_code == 404
            assert bea.post(f"/live/{call_id}/transfer", data={"csrf": _csrf(bea), "target": "sip:x@127.0.0.1"}
                            ).status_code == 404
            assert not [u for u in bea_stream.updates if call_id in json.dumps(u)]
            # no CSRF token, no action; a target that is no URI is refused before anything is sent
            assert sue.post(hangup).status_code == 403 and sue.post(hangup, data={"csrf": "wrong"}).status_code == 403
            bad = sue.post(f"/live/{call_id}/transfer", data={"csrf": _csrf(sue), "target": "agent\r\nX-Evil: 1"})
            assert bad.status_code == 400
            system = ada.get("/system")
            assert system.status_code == 200 and 'data-account="line"' in system.text
            assert f"http://127.0.0.1:{metrics_port}/metrics" in system.text
            assert re.search(r'id="slots">slots used<b>1 / \d+', system.text)
            assert re.search(r'id="disk-free">[\d.]+ GB<', system.text) and "taking writes" in system.text
            assert '<td id="retention">for ever</td>' in system.text
            assert vic.get("/system").status_code == 403

            # the page's own button hangs up
            browser.find_element(By.CSS_SELECTOR, section + " form.hangup button").click()
            peer.expect("disconnected", call_id=call_id, timeout=15)
            eventually(lambda: browser.current_url.endswith("/live") and not browser.find_elements(
                By.CSS_SELECTOR, section), 15, "the call gone from the page")
            browser.save_screenshot(str(shots / "live-after-hangup.png"))
        assert eventually(lambda: sue_stream.of("ended", call_id), 10, "the hang-up on the stream")

        # a blind transfer to a URI typed into the page: the caller gets the REFER and reaches the person
        with PjsuaPeer(user="human", log_dir=tmp_path) as human, PjsuaPeer(user="caller2", log_dir=tmp_path) as peer:
            second = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("state", call_id=second, state="CONFIRMED", timeout=15)
            section = f'section.live-call[data-call-id="{second}"]'
            eventually(lambda: browser.find_elements(By.CSS_SELECTOR, section), 15, "the second call on /live")
            browser.find_element(By.CSS_SELECTOR, section + ' form.transfer input[name="target"]').send_keys(human.uri)
            browser.find_element(By.CSS_SELECTOR, section + " form.transfer button").click()
            assert peer.expect("transfer_request", call_id=second, timeout=15)["dest"].strip("<>") == human.uri
            human.expect("incoming", timeout=15)
            eventually(lambda: browser.current_url.endswith("/live") and not browser.find_elements(
                By.CSS_SELECTOR, section), 15, "the transferred call gone from the page")
        # attended: the target is called first; a busy one leaves the caller with the bot, one that
        # answers gets the caller by a REFER with Replaces naming our leg to it
        with PjsuaPeer(user="busy", answer="busy", log_dir=tmp_path) as busy, \
                PjsuaPeer(user="agent", log_dir=tmp_path) as agent, PjsuaPeer(user="caller3", log_dir=tmp_path) as peer:
            third = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("state", call_id=third, state="CONFIRMED", timeout=15)
            section = f'section.live-call[data-call-id="{third}"]'

            def transfer_to(uri: str) -> None:
                eventually(lambda: browser.find_elements(By.CSS_SELECTOR, section), 15, "the third call on /live")
                browser.find_element(By.CSS_SELECTOR, section + ' form.transfer input[name="target"]').send_keys(uri)
                browser.find_element(By.CSS_SELECTOR, section + ' form.transfer input[name="attended"]').click()
                browser.find_element(By.CSS_SELECTOR, section + " form.transfer button").click()

            transfer_to(busy.uri)
            busy.expect("incoming", timeout=15)
            eventually(lambda: "486" in browser.find_element(By.CSS_SELECTOR, section + " .transfer").text, 15,
                       "the busy target's answer on the page")
            assert not peer.all("transfer_request")  # the caller was never sent anywhere: still with the bot
            assert browser.find_elements(By.CSS_SELECTOR, section)
            transfer_to(agent.uri)
            leg = agent.expect("incoming", timeout=15)["call_id"]
            dest = peer.expect("transfer_request", call_id=third, timeout=15)["dest"]
            assert f"Replaces={leg}%3B" in dest and dest.strip("<>").startswith(agent.uri.strip("<>").split(";")[0])
            eventually(lambda: not browser.find_elements(By.CSS_SELECTOR, section), 15,
                       "the attended-transferred call gone from the page")
        audit = ada.get("/audit").text
        assert "call.hangup" in audit and call_id in audit and audit.count("call.hangup") == 1
        assert "call.transfer" in audit and second in audit and human.uri in audit
        assert audit.count("attended") == 2 and third in audit
        assert audit.count("call.listen") == 2  # the stream over HTTP and the page's player
        # the SIP accounts as the registrar sees them: one registered, one refused (wrong password)
        def registrations():
            browser.get(base + "/system")
            rows = {r.get_attribute("data-account"): r.find_element(By.CLASS_NAME, "reg").text
                    for r in browser.find_elements(By.CSS_SELECTOR, "#sip tr[data-account]")}
            return rows if rows.get("pbx") == "registered" and rows.get("refused", "").startswith(
                "not registered:") else None
        rows = eventually(registrations, 40, "both registrations' outcomes on /system")
        assert rows["line"] == "direct (no registrar)"
        browser.save_screenshot(str(shots / "system.png"))

        if os.environ.get("CALLBOT_UPDATE_SCREENSHOTS"):  # docs/web.md's
            import shutil

            shutil.copy(shots / "live.png", DOCS / "panel-live.png")
            shutil.copy(shots / "system.png", DOCS / "panel-system.png")

        # serve stops with streams open: they end, and serve does not wait on them
        proc.send_signal(signal.SIGTERM)
        assert sue_stream.ended.wait(20) and sue_stream.of("closed")
        assert proc.wait(30) == 0


def test_the_models_words_and_step_times_in_the_browser(tmp_path, browser):  # noqa: F811
    """The bot's leg on the model: `callbot serve --engine model` with the tiny random-weight PersonaPlex in
    its own process; the model's text pieces (BotText) make the bot's line on /live as they come, and the
    system page shows the model's settings and its measured step time for one call."""
    from selenium.webdriver.common.by import By

    from tests.tiny_assets import tiny_model_toml, write_tiny_model_for_serve

    directory, arch = write_tiny_model_for_serve(tmp_path / "personaplex")
    with panel_serve(tmp_path, tiny_model_toml(directory, arch) + """[[bots]]
name = "tiny"
voice = "NATM1"
persona = "Talk."
[recognizer]
engine = "none"
""", PW, engine="model", ready_s=120, stop_s=30, stop_sig=signal.SIGTERM) as serve:
        base, sip_port = serve.base, serve.sip_port
        _sign_in(browser, base, "ada", PW)
        browser.get(base + "/live")
        with PjsuaPeer(user="caller", log_dir=tmp_path) as peer:
            call_id = peer.call(f"sip:echo@127.0.0.1:{sip_port}")
            peer.expect("state", call_id=call_id, state="CONFIRMED", timeout=30)
            section = f'section.live-call[data-call-id="{call_id}"]'
            eventually(lambda: browser.find_elements(By.CSS_SELECTOR, section), 15, "the call on /live")
            bot = eventually(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, section + " .live-line.bot")
                                      if e.text.strip() != "bot"], 60, "the model's words on the page")
            assert bot[0].startswith("bot")
            browser.save_screenshot(str(tmp_path / "live-model.png"))
            def measured():  # the stage stamps come about once a second
                browser.get(base + "/system")
                return browser.find_elements(By.CSS_SELECTOR, "table#steps")
            steps = eventually(measured, 30, "a step time on the system page")[0].text
            model = browser.find_element(By.ID, "model").text
            assert "quantization none" in model and str(directory) in model
            assert re.search(r"^1 \d+ [\d.]+ [\d.]+$", steps.splitlines()[1]), steps  # one call: frames, mean, max
            assert "1 / " in browser.find_element(By.ID, "slots").text
            browser.save_screenshot(str(tmp_path / "system-model.png"))
