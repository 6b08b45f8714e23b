"""The web panel (issue 16, first slice) in a real headless browser: Debian's chromium driven by selenium,
against `callbot web` as a user runs it, over a store filled the way a user fills it.

Two scripted calls (tests/analytics_calls.py: espeak-ng sentences at known times in a stereo WAV, the
bot's words as BotText events), one of tenant acme and one of tenant beta, are imported with `callbot
calls import` and analysed with `callbot calls analyze`; users are made with `callbot users add`. Then:
signing in, the call list, the call page (its audio element loads and reports the recording's duration;
clicking a word seeks there), the dashboard counting the calls; a viewer of acme gets 404 for beta's
call and recording by crafted URL; no page without a session; POSTs without the CSRF token get 403;
failed sign-ins are limited. Screenshots of each page go to the test's tmp dir (two are kept in docs/).
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from tests.analytics_calls import agent_call, bot_text_events, write_call
from tests.sip_peers import _Lines, eventually, free_port, stop_process

pytestmark = pytest.mark.timeout(300)
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]
ADMIN_PW, VIEWER_PW = "admin-password-1", "viewer-password-1"
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CALLBOT, *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})


def add_user(config, name: str, role: str, password: str, tenant: str | None = None,
             env: dict | None = None) -> None:
    """`callbot users add` as an admin runs it (the password from the environment, never argv)."""
    out = _cli("users", "add", name, "--role", role, *(["--tenant", tenant] if tenant else []),
               "--password-env", "PW", "--config", str(config), env={**(env or {}), "PW": password})
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    """`callbot web` over a store holding two analysed calls (acme's call-a, beta's call-b) and two users
    (admin: every tenant; viewer: acme only); yields (base URL, tmp dir)."""
    tmp = tmp_path_factory.mktemp("web")
    calls = tmp / "calls"
    for tenant, name, t0, caller, ending in (
            ("acme", "call-a", 1796270000.0, "+15550100", {"hangup_cause": "remote"}),
            ("beta", "call-b", 1796273600.0, "+15550142",
             {"hangup_cause": "transfer", "transfer": {"target": "sip:agent@127.0.0.1", "succeeded": True}})):
        (calls / tenant).mkdir(parents=True)
        call = agent_call()
        seconds = call.duration_ms / 1000
        write_call(call, calls / tenant, name,
                   record={"start": t0, "answered": t0 + 0.5, "end": t0 + 0.5 + seconds, "direction": "inbound",
                           "caller": caller, "called": "+15550000", "codec": "PCMU", **ending,
                           "labels": {"bot": "support", "tenant": tenant}, "events": f"{name}.events.jsonl",
                           "recording": {"wav": f"{name}.wav", "seconds": seconds, "complete": True}},
                   events=bot_text_events(call, name))
    (tmp / "rules.toml").write_text('[[categories]]\nname = "disclosure"\n[[categories.rules]]\nkind = "phrase"\n'
                                    'leg = "bot"\nphrases = ["this call may be recorded"]\n'
                                    '[[scorecards]]\nname = "qa"\n[[scorecards.items]]\nname = "disclosure"\n'
                                    'weight = 3\ncategory = "disclosure"\n')
    cfg = tmp / "callbot.toml"
    cfg.write_text('recordings_dir = "calls"\n[[bots]]\nname = "support"\n[[tenants]]\nname = "acme"\n'
                   '[[tenants]]\nname = "beta"\n[analytics]\nrules = "rules.toml"\ncaller_transcript = "post"\n')
    out = _cli("calls", "import", str(calls), "--config", str(cfg))
    assert out.returncode == 0 and "2 imported" in out.stdout, out.stdout + out.stderr
    out = _cli("calls", "analyze", "--config", str(cfg))
    assert out.returncode == 0 and "2 analysed" in out.stdout, out.stdout + out.stderr
    for name, role, tenant, pw in (("ada", "admin", None, ADMIN_PW), ("vic", "viewer", "acme", VIEWER_PW)):
        add_user(cfg, name, role, pw, tenant)
    port = free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen([*CALLBOT, "web", "--listen", f"127.0.0.1:{port}", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = _Lines(proc.stderr, tmp / "web.stderr")
    try:
        err.wait_line("listening", 30)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        stop_process(proc)


def _signed_in(base: str, name: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=base, timeout=10, follow_redirects=False)
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"csrf": token, "name": name, "password": password, "next": "/calls"})
    assert r.status_code == 303 and r.headers["location"] == "/calls", r.text
    return client


def test_no_page_without_a_session_and_no_post_without_csrf(panel):
    base, _ = panel
    with httpx.Client(base_url=base, timeout=10) as anon:
        for path in ("/", "/calls", "/dashboard", "/calls/call-a", "/calls/call-a/recording", "/calls/call-a/record",
                     "/users", "/audit"):
            r = anon.get(path)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        login = anon.get("/login")
        assert login.status_code == 200 and "script-src" not in login.headers["content-security-policy"]
        assert login.headers["content-security-policy"].startswith("default-src 'self'")
        assert anon.post("/login", data={"name": "ada", "password": ADMIN_PW}).status_code == 403
        assert anon.post("/logout").status_code == 403
    client = _signed_in(base, "ada", ADMIN_PW)
    cookie = next(c for c in client.cookies.jar if c.name == "callbot_panel")
    assert cookie.has_nonstandard_attr("HttpOnly") or "httponly" in str(cookie._rest).lower()
    assert client.post("/users", data={"name": "eve", "role": "admin", "password": "x" * 12}).status_code == 403
    assert client.post("/logout", data={"csrf": "wrong"}).status_code == 403
    assert "eve" not in client.get("/users").text
    client.close()


def test_a_viewer_of_one_tenant_gets_404_for_another_tenants_call_and_recording(panel):
    base, _ = panel
    vic = _signed_in(base, "vic", VIEWER_PW)
    listing = vic.get("/calls").text
    assert 'data-call-id="call-a"' in listing and 'data-call-id="call-b"' not in listing
    assert 'data-call-id="call-b"' not in vic.get("/calls?tenant=beta").text
    assert vic.get("/calls/call-a").status_code == 200
    assert vic.get("/calls/call-a/recording").headers["content-type"] == "audio/wav"
    for path in ("/calls/call-b", "/calls/call-b/recording", "/calls/call-b/record", "/calls/call-b/recording?download=1",
                 "/calls/no-such-call"):
        assert vic.get(path).status_code == 404, path
    assert ">1<" in vic.get("/dashboard").text.replace(" ", "")  # only acme's one call counted
    assert vic.get("/users").status_code == 403 and vic.get("/audit").status_code == 403
    vic.close()
    ada = _signed_in(base, "ada", ADMIN_PW)
    assert ada.get("/calls/call-b").status_code == 200
    assert ada.get("/calls/call-b/record").json()["call"]["tenant"] == "beta"
    got = ada.get("/calls/call-b/recording?download=1")
    assert got.headers["content-disposition"].startswith("attachment") and got.content[:4] == b"RIFF"
    ranged = ada.get("/calls/call-b/recording", headers={"range": "bytes=44-1043"})  # the player seeking
    assert ranged.status_code == 206 and len(ranged.content) == 1000
    audit = ada.get("/audit").text
    assert "download.recording" in audit and audit.count("download.recording") == 1
    assert "download.record" in audit and "user.add" in audit and "login" in audit
    ada.close()


def test_serve_wiring_starts_the_panel_on_web_listen(tmp_path):
    """app/web_host.py: [web] listen read from the config, the panel served over its store, stopped; a bad
    address is the config's one line."""
    from callbot.app.settings import ConfigError, parse_settings
    from callbot.app.web_host import start_web

    port = free_port(socket.SOCK_STREAM)
    settings = parse_settings(f'recordings_dir = "calls"\n[web]\nlisten = "127.0.0.1:{port}"\n', base_dir=tmp_path)
    assert start_web(parse_settings("", base_dir=tmp_path)) is None
    web = start_web(settings)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/calls", timeout=10)
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
        assert 'name="csrf"' in httpx.get(f"http://127.0.0.1:{port}/login", timeout=10).text
    finally:
        web.stop()
    with pytest.raises(ConfigError, match=r"\$.web: listen: 'nowhere' is not HOST:PORT"):
        parse_settings('[web]\nlisten = "nowhere"\n')


def test_failed_sign_ins_are_limited_per_user(panel):
    base, _ = panel
    with httpx.Client(base_url=base, timeout=10) as c:
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
        codes = [c.post("/login", data={"csrf": token, "name": "nobody-" + base[-5:], "password": "wrong-wrong"}).status_code
                 for _ in range(6)]
    assert codes == [401] * 5 + [429]


def test_the_call_list_downloads_as_csv_within_the_users_tenant_and_filters(panel):
    import csv
    import io

    base, _ = panel
    vic = _signed_in(base, "vic", VIEWER_PW)
    got = vic.get("/export/calls.csv")  # a viewer of acme: acme's calls
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/csv")
    assert got.headers["content-disposition"].startswith('attachment; filename="calls-')
    rows = list(csv.DictReader(io.StringIO(got.text)))
    assert [(r["call_id"], r["tenant"], r["caller"]) for r in rows] == [("call-a", "acme", "+15550100")]
    assert list(csv.DictReader(io.StringIO(vic.get("/export/calls.csv?tenant=beta").text))) == []  # not beta's
    vic.close()
    ada = _signed_in(base, "ada", ADMIN_PW)
    everything = list(csv.DictReader(io.StringIO(ada.get("/export/calls.csv").text)))
    assert sorted(r["call_id"] for r in everything) == ["call-a", "call-b"]
    assert all(r["categories"] == "disclosure" for r in everything)  # the analysis' categories
    beta = list(csv.DictReader(io.StringIO(ada.get("/export/calls.csv?tenant=beta&limit=1&offset=1").text)))
    assert [r["call_id"] for r in beta] == ["call-b"]  # the filters hold; paging does not cut a download
    listing = ada.get("/calls", params={"number": "(555) 0142"}).text  # a number as written finds its call
    assert 'data-call-id="call-b"' in listing and 'data-call-id="call-a"' not in listing
    by_number = list(csv.DictReader(io.StringIO(ada.get("/export/calls.csv", params={"number": "5550100"}).text)))
    assert [r["call_id"] for r in by_number] == ["call-a"]
    assert ada.get("/calls", params={"number": "no digits"}).status_code == 400
    assert ada.get("/export/calls.csv?since=yesterday-ish").status_code == 400
    assert 'href="/export/calls.csv?tenant=beta"' in ada.get("/calls?tenant=beta").text
    audit = ada.get("/audit").text
    assert "export.calls" in audit
    ada.close()
    with httpx.Client(base_url=base, timeout=10) as anon:
        assert anon.get("/export/calls.csv").status_code == 303  # no download without a session


def _csrf_of(client: httpx.Client, path: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', client.get(path).text).group(1)


def test_passwords_changed_and_users_disabled_from_the_panel_sign_out_their_sessions(panel):
    base, tmp = panel
    ada = _signed_in(base, "ada", ADMIN_PW)
    r = ada.post("/users", data={"csrf": _csrf_of(ada, "/users"), "name": "sam", "role": "supervisor",
                                 "password": "sam-password-1"})
    assert r.status_code == 200 and "user sam added" in r.text
    first, second = _signed_in(base, "sam", "sam-password-1"), _signed_in(base, "sam", "sam-password-1")
    token = _csrf_of(first, "/account")
    for form, said in (({"current": "not-the-password", "password": "sam-password-2", "again": "sam-password-2"},
                        "the current password is wrong"),
                       ({"current": "sam-password-1", "password": "sam-password-2", "again": "sam-password-3"},
                        "the new passwords differ"),
                       ({"current": "sam-password-1", "password": "short", "again": "short"}, "at least 10")):
        r = first.post("/account", data={"csrf": token, **form})
        assert r.status_code == 400 and said in r.text, (said, r.status_code)
    r = first.post("/account", data={"csrf": token, "current": "sam-password-1", "password": "sam-password-2",
                                     "again": "sam-password-2"})
    assert r.status_code == 200 and "your password is changed" in r.text
    assert first.get("/calls").status_code == 200  # the session that changed it stays
    assert second.get("/calls").status_code == 303  # every other one is out
    with httpx.Client(base_url=base, timeout=10) as anon:
        r = anon.post("/login", data={"csrf": _csrf_of(anon, "/login"), "name": "sam", "password": "sam-password-1",
                                      "next": "/calls"})
        assert r.status_code == 401  # the old password no longer signs in
    third = _signed_in(base, "sam", "sam-password-2")

    users_token = _csrf_of(ada, "/users")
    r = ada.post("/users/sam/disable", data={"csrf": users_token})
    assert r.status_code == 200 and "user sam disabled" in r.text
    assert first.get("/calls").status_code == 303 and third.get("/calls").status_code == 303
    assert ada.post("/users/sam/enable", data={"csrf": users_token}).status_code == 200
    fourth = _signed_in(base, "sam", "sam-password-2")
    r = ada.post("/users/sam/password", data={"csrf": users_token, "password": "sam-password-9"})
    assert r.status_code == 200 and "the password of sam is set" in r.text
    assert fourth.get("/calls").status_code == 303  # an admin's reset signs the user out too
    r = ada.post("/users/ada/disable", data={"csrf": users_token})
    assert r.status_code == 400 and "cannot disable yourself" in r.text
    assert ada.post("/users/nobody/disable", data={"csrf": users_token}).status_code == 404
    assert ada.post("/users/sam/disable", data={"csrf": "wrong"}).status_code == 403
    sam = _signed_in(base, "sam", "sam-password-9")
    assert sam.post("/users/vic/disable", data={"csrf": _csrf_of(sam, "/account")}).status_code == 403  # admins only

    add_user(tmp / "callbot.toml", "ann", "admin", "ann-password-1", tenant="acme")  # an admin of one tenant
    ann = _signed_in(base, "ann", "ann-password-1")
    listing = ann.get("/users").text
    assert 'data-user="vic"' in listing and 'data-user="ada"' not in listing and 'data-user="sam"' not in listing
    ann_token = _csrf_of(ann, "/users")
    assert ann.post("/users/ada/disable", data={"csrf": ann_token}).status_code == 404  # not of its tenant
    r = ann.post("/users", data={"csrf": ann_token, "name": "bob", "role": "viewer", "tenant": "beta",
                                 "password": "bob-password-1"})
    assert r.status_code == 400 and "tenant acme only" in r.text
    wrong = {"csrf": ann_token, "current": "not-the-password", "password": "ann-password-2", "again": "ann-password-2"}
    codes = [ann.post("/account", data=wrong).status_code for _ in range(6)]
    assert codes == [400] * 5 + [429]  # wrong current passwords are limited as sign-ins are
    audit = ada.get("/audit").text
    for action in ("user.password", "user.disable", "user.enable"):
        assert action in audit, action
    for client in (ada, first, second, third, fourth, sam, ann):
        client.close()


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no chromium + chromedriver on this machine (.ci/run installs Debian's chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1400,1000", "--mute-audio"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for CSP refusals
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _sign_in(driver, base: str, name: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(base + "/calls")
    assert "/login" in driver.current_url  # no page without a session
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "sign-in").click()
    eventually(lambda: driver.current_url.endswith("/calls"), 15, "the call list after sign-in")


def test_the_panel_in_a_browser(panel, browser):
    from selenium.webdriver.common.by import By

    base, tmp = panel
    shots = tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    d = browser
    d.get(base + "/login")
    d.save_screenshot(str(shots / "login.png"))
    _sign_in(d, base, "ada", ADMIN_PW)
    rows = d.find_elements(By.CSS_SELECTOR, "#calls tbody tr[data-call-id]")
    assert sorted(r.get_attribute("data-call-id") for r in rows) == ["call-a", "call-b"]
    d.save_screenshot(str(shots / "calls.png"))
    # search over the transcripts (the analysis' words of the bot's sentences)
    d.find_element(By.ID, "text").send_keys("quality")
    d.find_element(By.ID, "filter").click()
    eventually(lambda: "text=quality" in d.current_url, 10, "the filtered list")
    assert len(d.find_elements(By.CSS_SELECTOR, "#calls tbody tr[data-call-id]")) == 2
    assert d.find_element(By.ID, "export").get_attribute("href").endswith("/export/calls.csv?text=quality")
    d.get(base + "/calls?text=no+such+words+said")
    assert d.find_elements(By.CSS_SELECTOR, "#calls tbody tr[data-call-id]") == []

    d.get(base + "/calls/call-a")
    duration = eventually(lambda: d.execute_script(
        "var a = document.getElementById('audio'); return a.readyState >= 1 && a.duration;"), 15,
        "the audio element's duration")
    expected = agent_call().duration_ms / 1000
    assert abs(duration - expected) < 0.05, (duration, expected)
    words = d.find_elements(By.CSS_SELECTOR, "#transcript .w")
    assert words, "no words in the transcript"
    word = words[len(words) // 2]
    t = float(word.get_attribute("data-t")) / 1000
    assert t > 1.0
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", word)
    word.click()
    now = eventually(lambda: d.execute_script("return document.getElementById('audio').currentTime;") or None, 10,
                     "a seek")
    assert t - 0.05 <= now <= t + 1.0, (now, t)  # where the word is (plus what played since the click)
    d.execute_script("document.getElementById('audio').pause();")
    assert "disclosure" in d.find_element(By.TAG_NAME, "main").text
    legs = {e.get_attribute("class").split()[-1] for e in d.find_elements(By.CSS_SELECTOR, "#transcript .line")}
    assert legs == {"caller", "bot"}  # both legs' words (the caller's by pocketsphinx after the call)
    d.execute_script("window.scrollTo(0, 0);")
    d.save_screenshot(str(shots / "call.png"))

    d.get(base + "/dashboard")
    assert d.find_element(By.ID, "n-calls").text == "2"
    d.find_element(By.ID, "category").send_keys("no such category")  # the dashboard's own filters
    d.find_element(By.ID, "show").click()
    eventually(lambda: "category=no+such+category" in d.current_url, 10, "the dashboard filtered")
    assert d.find_element(By.ID, "n-calls").text == "0"
    d.get(base + "/dashboard?category=disclosure&min_score=0")
    assert d.find_element(By.ID, "n-calls").text == "2"
    assert d.find_element(By.ID, "min-score").get_attribute("value") == "0"
    d.get(base + "/dashboard")
    assert d.find_element(By.ID, "n-answered").text == "2"
    assert d.find_element(By.ID, "n-transferred").text == "1"
    assert "50%" in d.find_element(By.ID, "cards").text  # containment: one of two answered calls kept
    assert d.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    assert "qa 3 3 2" in d.find_element(By.ID, "scores").text.replace("\n", " ")  # both calls disclosed: 3 of 3
    d.save_screenshot(str(shots / "dashboard.png"))
    d.get(base + "/audit")
    d.save_screenshot(str(shots / "audit.png"))

    # the content security policy refused nothing the panel itself serves
    d.execute_script("var s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                     "document.body.appendChild(s);")  # what the policy is for: an inline script refused
    log = d.get_log("browser")
    refused = [e["message"] for e in log if "Content Security Policy" in e.get("message", "")]
    assert len(refused) == 1 and "inline script" in refused[0], refused
    assert d.execute_script("return window.injected === undefined;")
    _sign_in(d, base, "vic", VIEWER_PW)
    rows = d.find_elements(By.CSS_SELECTOR, "#calls tbody tr[data-call-id]")
    assert [r.get_attribute("data-call-id") for r in rows] == ["call-a"]
    d.get(base + "/calls/call-b")
    assert "no such call" in d.find_element(By.TAG_NAME, "main").text
    d.save_screenshot(str(shots / "viewer-404.png"))
    assert d.find_elements(By.ID, "erase") == []  # a viewer erases nothing (and a crafted POST: 403)
    vic = _signed_in(base, "vic", VIEWER_PW)
    try:
        token = re.search(r'name="csrf" value="([^"]+)"', vic.get("/calls/call-a").text).group(1)
        assert vic.post("/calls/call-a/delete", data={"csrf": token, "confirm": "on"}).status_code == 403
    finally:
        vic.close()
    ada = _signed_in(base, "ada", ADMIN_PW)
    try:  # an admin's POST without the box ticked erases nothing
        token = re.search(r'name="csrf" value="([^"]+)"', ada.get("/calls/call-a").text).group(1)
        assert ada.post("/calls/call-a/delete", data={"csrf": token}).status_code == 400
    finally:
        ada.close()
    if os.environ.get("CALLBOT_UPDATE_SCREENSHOTS"):  # the README's two (docs/)
        shutil.copy(shots / "calls.png", DOCS / "panel-calls.png")
        shutil.copy(shots / "call.png", DOCS / "panel-call.png")

    # an admin erases a call on request (the last of this module's tests: the panel holds one call after)
    files = sorted(p.name for p in (tmp / "calls" / "beta").iterdir() if p.name.startswith("call-b."))
    assert "call-b.wav" in files and "call-b.json" in files
    _sign_in(d, base, "ada", ADMIN_PW)
    d.get(base + "/calls/call-b")
    d.find_element(By.ID, "erase-button").click()  # not confirmed: the browser asks for the box first
    assert "/calls/call-b" in d.current_url and d.find_elements(By.ID, "erase")
    d.find_element(By.ID, "erase-confirm").click()
    d.find_element(By.ID, "erase-button").click()
    eventually(lambda: "erased=call-b" in d.current_url, 15, "the call list after the erasure")
    assert "Call call-b erased" in d.find_element(By.ID, "erased").text
    assert [r.get_attribute("data-call-id") for r in d.find_elements(By.CSS_SELECTOR, "#calls tbody tr[data-call-id]")] \
        == ["call-a"]
    assert [p.name for p in (tmp / "calls" / "beta").iterdir() if p.name.startswith("call-b.")] == []
    d.get(base + "/calls/call-b")
    assert "no such call" in d.find_element(By.TAG_NAME, "main").text
    d.get(base + "/audit")
    assert "delete.call" in d.find_element(By.TAG_NAME, "main").text and "call-b" in d.find_element(By.TAG_NAME, "main").text


def test_a_user_changes_their_password_in_the_browser(panel, browser):
    from selenium.webdriver.common.by import By

    base, tmp = panel
    add_user(tmp / "callbot.toml", "liz", "viewer", "liz-password-1", tenant="acme")
    d = browser
    _sign_in(d, base, "liz", "liz-password-1")
    d.find_element(By.CSS_SELECTOR, "header .whoami a[href='/account']").click()
    eventually(lambda: d.current_url.endswith("/account"), 10, "the account page from the user's name")
    form = d.find_element(By.ID, "password-form")
    form.find_element(By.NAME, "current").send_keys("liz-password-1")
    form.find_element(By.NAME, "password").send_keys("liz-password-2")
    form.find_element(By.NAME, "again").send_keys("liz-password-2")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    message = eventually(lambda: d.find_elements(By.ID, "message"), 10, "the page saying it is changed")
    assert "your password is changed" in message[0].text
    d.get(base + "/calls")
    assert d.current_url.endswith("/calls")  # this browser stays signed in
    d.find_element(By.CSS_SELECTOR, "header .whoami button[type=submit]").click()  # sign out
    eventually(lambda: "/login" in d.current_url, 10, "the sign-in page")
    _sign_in(d, base, "liz", "liz-password-2")  # the new password signs in
