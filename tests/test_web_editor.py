"""The bots and flows editor without a browser: the path -> line mapping of TOML errors (flows/toml_lines.py),
the flow graph (web/flow_graph.py), atomic flow saving (flows/file_save.py), the config edits that keep
comments (app/bot_config.py), serve's flow reload (app/flow_reload.py), and the editor's pages served by uvicorn
over a real SQLite store with real users (httpx): roles, tenant scoping, CSRF, the error at its line
worded as `callbot flows check` words it, the audit log. The browser and a real call: test_web_editor_serve.py.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest

from callbot.flows.file_save import ChangedOnDisk, digest, save_flow
from callbot.flows.schema import FlowError, parse_flow, parse_flow_file
from callbot.flows.toml_lines import error_line, line_map, line_of, path_steps
from tests.test_store_calls import _tone

ISSUE_FLOW = '''# the flow of issue 12
start = "greet"

[states.greet]
play = "tone.wav"          # a clip
next = "menu"

[states.menu]
play = "tone.wav"
gather = { max_digits = 1, timeout_s = 5, interdigit_timeout_s = 3, finish_key = "#" }
reprompts = 2
on_digits = { "1" = "billing", "2" = "agent" }
on_no_input = "agent"
on_no_match = "menu"

[states.billing]
persona = """You help {name}
with the bill of account {account}.
[states.not_a_table] stays text"""
on_caller_said = [{ match = "(?i)human|agent", goto = "agent" }]
on_silence_s = { after = 10, goto = "goodbye" }
max_s = 300

[states.agent]
transfer = "sip:queue@pbx.example.com"

[states.goodbye]
say = "Thank you for calling. Goodbye."
hangup = true

[[states.goodbye.on_bot_said]]
match = "x"
goto = "agent"
'''


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if needle in line)


# ---- path -> line -----------------------------------------------------------------------------------------


def test_paths_map_to_the_line_that_writes_them():
    lines = line_map(ISSUE_FLOW)
    assert lines[("start",)] == 2
    assert lines[("states", "menu")] == _line(ISSUE_FLOW, "[states.menu]")
    assert lines[("states", "billing", "persona")] == _line(ISSUE_FLOW, "persona =")
    assert ("states", "not_a_table") not in lines  # inside a multi-line string
    assert lines[("states", "billing", "on_silence_s")] == _line(ISSUE_FLOW, "on_silence_s")
    assert lines[("states", "goodbye", "on_bot_said", "0", "goto")] == len(ISSUE_FLOW.split("\n")) - 1
    # inside an inline table: the line of the key that opened it
    assert line_of(ISSUE_FLOW, "$.states.menu.on_digits.3") == _line(ISSUE_FLOW, "on_digits")
    assert line_of(ISSUE_FLOW, "$.states.billing.on_caller_said[0].goto") == _line(ISSUE_FLOW, "on_caller_said")
    assert line_of(ISSUE_FLOW, "$.nothing.here") is None
    assert path_steps("$.states.a-b.on_caller_said[2].match") == ("states", "a-b", "on_caller_said", "2", "match")
    dotted = 'start = "a"\nstates.a.hangup = true\n"states"."b c".next = "a"\n'
    assert line_of(dotted, "$.states.a.hangup") == 2 and line_of(dotted, ("states", "b c", "next")) == 3


@pytest.mark.parametrize("change, needle", [
    (("on_no_match = \"menu\"", "on_no_match = \"menuu\""), "on_no_match"),  # unknown state
    (("max_digits = 1,", "max_digits = 0,"), "gather ="),  # a type's bound, inside an inline table
    (("reprompts = 2", "reprompts = 2\nrepromts = 3"), "repromts"),  # an unknown key: its own line
    (("max_s = 300", "max_s = \"300\""), "max_s"),  # a wrong type
    (("[states.agent]\n", "[states.agent]\nhangup = true\n"), "[states.agent]"),  # a whole state's error
    (("next = \"menu\"", "next = \"menu"), "next = \"menu"),  # TOML syntax: its own line number
])
def test_the_errors_of_the_flow_check_point_at_their_line(tmp_path, change, needle):
    _tone(tmp_path / "tone.wav", 0.3)
    text = ISSUE_FLOW.replace(*change)
    with pytest.raises(FlowError) as err:
        parse_flow_file(text, tmp_path / "support.toml")
    assert error_line(text, str(err.value)) == _line(text, needle), str(err.value)


# ---- the graph --------------------------------------------------------------------------------------------


def test_the_graph_draws_every_state_and_labels_each_transition(tmp_path):
    from callbot.web.flow_graph import flow_edges, flow_svg, ranks

    _tone(tmp_path / "tone.wav", 0.3)
    text = ISSUE_FLOW + '\n[states.orphan]\nsay = "<script>x</script>"\nnext = "goodbye"\n'
    flow = parse_flow(text, base_dir=tmp_path)
    edges = {(e.source, e.target): e.label for e in flow_edges(flow)}
    assert edges[("greet", "menu")] == "next"
    assert edges[("menu", "billing")] == "1"
    assert edges[("menu", "agent")] == "2, no input"  # one curve, the labels joined
    assert edges[("menu", "menu")] == "no match"
    assert edges[("billing", "agent")] == "said /(?i)human|agent/"
    assert edges[("billing", "goodbye")] == "silence 10 s"
    assert edges[("goodbye", "agent")] == "bot said /x/"
    r = ranks(flow, flow_edges(flow))
    assert (r["greet"], r["menu"], r["billing"], r["agent"], r["goodbye"]) == (0, 1, 2, 2, 3)
    assert r["orphan"] == 4  # no path reaches it: a column past the last
    svg = str(flow_svg(flow))
    for name in flow.states:
        assert f'data-state="{name}"' in svg
    assert re.search(r'<g class="state step start" data-state="greet">', svg)
    assert 'class="state end" data-state="goodbye"' in svg and 'class="state transfer" data-state="agent"' in svg
    assert 'class="state step unreachable" data-state="orphan"' in svg
    assert "<script>" not in svg and "&lt;script&gt;" not in svg  # the say text is not drawn; names escaped
    assert svg.count('class="edge"') == len(edges)
    assert svg.startswith("<svg") and svg.endswith("</svg>")


def test_graph_text_is_escaped(tmp_path):
    from callbot.web.flow_graph import flow_svg

    flow = parse_flow('start = "a"\n[states.a]\non_caller_said = [{ match = "<b>&", goto = "b" }]\nmax_s = 5\n'
                      '[states.b]\nhangup = true\n', base_dir=tmp_path)
    svg = str(flow_svg(flow))
    assert "said /&lt;b&gt;&amp;/" in svg and "<b>" not in svg


# ---- saving ----------------------------------------------------------------------------------------------


def test_a_flow_that_fails_is_never_written_and_a_good_one_replaces_it_atomically(tmp_path):
    _tone(tmp_path / "tone.wav", 0.3)
    path = tmp_path / "support.toml"
    path.write_text(ISSUE_FLOW)
    path.chmod(0o640)
    loaded = digest(ISSUE_FLOW)
    with pytest.raises(FlowError, match=r"support.toml: \$.states.menu.on_no_match: unknown state \"nowhere\""):
        save_flow(path, ISSUE_FLOW.replace('on_no_match = "menu"', 'on_no_match = "nowhere"'), loaded=loaded)
    assert path.read_text() == ISSUE_FLOW and not (tmp_path / "support.toml.bak").exists()
    fixed = ISSUE_FLOW.replace("reprompts = 2", "reprompts = 1")
    flow, after = save_flow(path, fixed, loaded=loaded)
    assert flow.states["menu"].reprompts == 1 and after == digest(fixed)
    assert path.read_text() == fixed and (tmp_path / "support.toml.bak").read_text() == ISSUE_FLOW
    assert path.stat().st_mode & 0o777 == 0o640  # the old file's mode kept
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(ChangedOnDisk, match="changed on disk since it was opened"):  # loaded from the old one
        save_flow(path, ISSUE_FLOW, loaded=loaded)
    assert path.read_text() == fixed


# ---- the config's bots ----------------------------------------------------------------------------------

CONFIG = '''# our line
recordings_dir = "calls"   # beside this file

[[tenants]]
name = "acme"
[[tenants]]
name = "beta"

[[bots]]
# acme's support bot
name = "support"
tenant = "acme"
flow = "support.toml"
persona = "You are Ana."

[[bots]]
name = "sales"
tenant = "beta"

[[routes]]
bot = "support"
did = "+1 555 0100"   # acme's number
[[routes]]
bot = "sales"
did = ["5550200", "5550201"]

[analytics]
enabled = false
'''


def _config(tmp_path):
    _tone(tmp_path / "tone.wav", 0.3)
    (tmp_path / "support.toml").write_text(ISSUE_FLOW)
    cfg = tmp_path / "callbot.toml"
    cfg.write_text(CONFIG)
    return cfg


def test_bot_settings_edits_keep_the_files_comments_and_pass_serves_checks(tmp_path):
    from callbot.app.bot_config import BotConfig
    from callbot.app.settings import load_settings

    cfg = _config(tmp_path)
    bots = BotConfig(cfg)
    support = bots.bot("support")
    assert support["flow"] == str(tmp_path / "support.toml") and support["flow_shown"] == "support.toml"
    assert support["routes"] == [{"index": 0, "name": "routes[0]", "dids": ["+1 555 0100"]}]
    changed, problem, _ = bots.update_bot("support", {"voice": "NATM1", "persona": "You are Ben.\nBe brief.",
                                                      "text_temperature": "0.5", "text_top_k": "25"},
                                          {0: "+1 555 0100, 5550101"}, loaded=support["digest"])
    assert problem is None and changed == ["voice", "persona", "sampling.text_temperature", "routes[0].did"]
    text = cfg.read_text()
    for kept in ("# our line", "# beside this file", "# acme's support bot", "# acme's number"):
        assert kept in text
    assert (tmp_path / "callbot.toml.bak").read_text() == CONFIG
    s = load_settings(cfg)
    assert (s.bots[0].voice, s.bots[0].persona, s.bots[0].sampling.text_temperature) == ("NATM1", "You are Ben.\nBe brief.", 0.5)
    assert s.routes[0].did == ("+1 555 0100", "5550101") and s.bots[1] == load_settings(cfg).bots[1]
    # serve's checks refuse, nothing is written, the error has its line in the edited file
    before = cfg.read_text()
    changed, problem, line = bots.update_bot("support", {"persona": "   "}, {}, loaded=None)
    assert changed == [] and problem.endswith("$.bots[0].persona: must not be empty (the model needs a role to play)")
    assert line == _line(before, "persona =") and cfg.read_text() == before
    changed, problem, _ = bots.update_bot("support", {"audio_top_k": "many"}, {}, loaded=None)
    assert "sampling.audio_top_k: 'many' is not an integer" in problem and cfg.read_text() == before
    # an edit from a stale page: refused
    changed, problem, _ = bots.update_bot("support", {"language": "de"}, {}, loaded=support["digest"])
    assert "changed on disk" in problem and cfg.read_text() == before


def test_a_tenants_admin_cannot_route_another_tenants_numbers(tmp_path):
    from callbot.app.bot_config import BotConfig

    bots = BotConfig(_config(tmp_path))
    _, problem, _ = bots.update_bot("support", {}, {0: "5550200"}, loaded=None, tenant="acme")
    assert problem == "$.routes[0].did: '5550200' is another tenant's number"
    _, problem, _ = bots.update_bot("support", {}, {0: ""}, loaded=None, tenant="acme")
    assert "give at least one number" in problem
    _, problem, _ = bots.update_bot("support", {}, {1: "5550100"}, loaded=None, tenant="acme")
    assert problem == "$.routes[1]: not a route of bot 'support'"
    changed, problem, _ = bots.update_bot("support", {}, {0: "5550300"}, loaded=None, tenant="acme")
    assert problem is None and changed == ["routes[0].did"]


# ---- serve's reload -------------------------------------------------------------------------------------


def test_a_changed_flow_file_is_taken_for_the_next_call_and_a_broken_one_keeps_the_last_good(tmp_path, caplog):
    from callbot.app.flow_host import load_clip
    from callbot.app.flow_reload import FlowFiles
    from callbot.flows.schema import load_flow

    _tone(tmp_path / "tone.wav", 0.3)
    path = tmp_path / "support.toml"
    path.write_text(ISSUE_FLOW)
    first = load_flow(path)
    clips: dict = {}
    files = FlowFiles({"support": ("support", first)}, {"support": str(path)}, load_clip, clips)
    assert files.current("support")[1] is first
    os.utime(path, ns=(1, 1))  # touched, same bytes: the same Flow
    assert files.current("support")[1] is first and files.reloads == 0
    (tmp_path / "bye.wav").write_bytes((tmp_path / "tone.wav").read_bytes())
    path.write_text(ISSUE_FLOW.replace('say = "Thank you for calling. Goodbye."', 'play = "bye.wav"'))
    second = files.current("support")[1]
    assert second is not first and second.states["goodbye"].play == str(tmp_path / "bye.wav")
    assert str(tmp_path / "bye.wav") in clips and files.reloads == 1
    caplog.set_level(logging.ERROR, logger="callbot.app.flow_reload")
    bad = ISSUE_FLOW.replace('next = "menu"', 'next = "nowhere"')
    path.write_text(bad)
    for _ in range(3):  # every call after: the last good flow, one error line in all
        assert files.current("support")[1] is second
        os.utime(path, ns=(os.stat(path).st_mtime_ns + 1000, os.stat(path).st_mtime_ns + 1000))
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and 'support.toml: $.states.greet.next: unknown state "nowhere"' in errors[0]
    path.write_text(ISSUE_FLOW)
    assert files.current("support")[1].states["goodbye"].say and files.reloads == 2


# ---- the pages --------------------------------------------------------------------------------------------

PW = "editor-password-1"


@pytest.fixture()
def editor(tmp_path):
    """The panel (uvicorn on a thread, web/server.py) over a SQLite store with four users and the config
    above; yields (a client maker: signed in as NAME, or not at all), the tmp dir, the store's Users."""
    import httpx

    from callbot.app.bot_config import BotConfig
    from callbot.store.call_store import CallStore
    from callbot.web.server import WebServer
    from callbot.web.users import Users

    cfg = _config(tmp_path)
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    store = CallStore(url, migrate_schema=True)
    users = Users(store)
    for name, role, tenant in (("ada", "admin", None), ("acme-admin", "admin", "acme"),
                               ("sup", "supervisor", None), ("vic", "viewer", "acme")):
        users.add(name, role, PW, tenant=tenant)
    web = WebServer.start(url, "127.0.0.1", 0, bots=BotConfig(cfg))
    clients: list[httpx.Client] = []

    def client(name: str | None):
        c = httpx.Client(base_url=f"http://127.0.0.1:{web.port}", timeout=10, follow_redirects=False)
        clients.append(c)
        if name is not None:
            token = _csrf(c.get("/login").text)
            r = c.post("/login", data={"csrf": token, "name": name, "password": PW, "next": "/bots"})
            assert r.status_code == 303, r.text
        return c
    try:
        yield client, tmp_path, users
    finally:
        for c in clients:
            c.close()
        web.stop()
        store.close()


def _csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def _loaded(page: str, form: str) -> str:
    return re.search(rf'id="{form}".*?name="loaded" value="([^"]*)"', page, re.S).group(1)


def test_only_admins_open_or_post_the_editor(editor):
    client, tmp, _ = editor
    anon = client(None)
    assert anon.get("/bots").status_code == 303 and anon.post("/bots/support/flow").status_code == 403
    for name in ("sup", "vic"):
        c = client(name)
        token = _csrf(c.get("/calls").text)
        assert c.get("/bots").status_code == 403 and c.get("/bots/support").status_code == 403
        for what in ("flow", "settings"):
            r = c.post(f"/bots/support/{what}", data={"csrf": token, "text": "start = 1", "persona": "x"})
            assert r.status_code == 403, (name, what)
        assert 'href="/bots"' not in c.get("/calls").text
    assert (tmp / "support.toml").read_text() == ISSUE_FLOW and (tmp / "callbot.toml").read_text() == CONFIG


def test_posts_without_the_csrf_token_are_refused(editor):
    client, tmp, _ = editor
    ada = client("ada")
    for data in ({"text": ISSUE_FLOW}, {"text": ISSUE_FLOW, "csrf": "forged"}):
        assert ada.post("/bots/support/flow", data=data).status_code == 403
        assert ada.post("/bots/support/settings", data={**data, "persona": "x"}).status_code == 403
    assert (tmp / "support.toml").read_text() == ISSUE_FLOW and (tmp / "callbot.toml").read_text() == CONFIG


def test_a_tenants_admin_sees_only_its_bots_and_gets_404_for_the_others(editor):
    client, tmp, _ = editor
    acme = client("acme-admin")
    listing = acme.get("/bots").text
    assert 'data-bot="support"' in listing and 'data-bot="sales"' not in listing
    token = _csrf(listing)
    assert acme.get("/bots/support").status_code == 200
    for path in ("/bots/sales", "/bots/no-such-bot"):
        assert acme.get(path).status_code == 404
        assert acme.post(path + "/flow", data={"csrf": token, "text": "x"}).status_code == 404
        assert acme.post(path + "/settings", data={"csrf": token, "persona": "stolen"}).status_code == 404
    assert (tmp / "callbot.toml").read_text() == CONFIG
    ada = client("ada")
    assert 'data-bot="sales"' in ada.get("/bots").text and ada.get("/bots/sales").status_code == 200


def test_a_flow_error_is_shown_at_its_line_as_flows_check_words_it_and_a_fix_is_saved_and_audited(editor):
    client, tmp, users = editor
    ada = client("ada")
    page = ada.get("/bots/support").text
    assert 'id="flow-graph"' in page and 'data-state="billing"' in page
    token, loaded = _csrf(page), _loaded(page, "flow-form")
    broken = ISSUE_FLOW.replace('on_no_input = "agent"', 'on_no_input = "agnet"').replace("\n", "\r\n")  # a browser's CRLF
    r = ada.post("/bots/support/flow", data={"csrf": token, "loaded": loaded, "text": broken, "action": "save"})
    assert r.status_code == 400
    (tmp / "broken.toml").write_text(broken.replace("\r\n", "\n"))
    check = subprocess.run([sys.executable, "-m", "callbot.app.cli", "flows", "check", str(tmp / "support.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0  # the file on disk is untouched and good
    (tmp / "support.toml").rename(tmp / "good.toml")
    (tmp / "broken.toml").rename(tmp / "support.toml")
    check = subprocess.run([sys.executable, "-m", "callbot.app.cli", "flows", "check", str(tmp / "support.toml")],
                           capture_output=True, text=True, timeout=60)
    (tmp / "good.toml").rename(tmp / "support.toml")
    expected = check.stderr.strip().removeprefix("callbot: error: ")
    shown = re.search(r'id="flow-error" data-line="(\d+)">.*?<span class="message">(.*?)</span>', r.text, re.S)
    import html
    assert html.unescape(shown.group(2)) == expected, (shown.group(2), expected)
    line = _line(ISSUE_FLOW, 'on_no_input = "agent"')
    assert int(shown.group(1)) == line and f'<li id="L{line}" data-line="{line}" class="bad">' in r.text
    assert (tmp / "support.toml").read_text() == ISSUE_FLOW  # never written
    assert 'id="flow-graph"' in r.text  # the file's graph still drawn
    # Check: validated, not saved
    fixed = ISSUE_FLOW.replace('on_no_input = "agent"', 'on_no_input = "goodbye"')
    r = ada.post("/bots/support/flow", data={"csrf": token, "loaded": loaded, "text": fixed, "action": "check"})
    assert r.status_code == 200 and "not saved" in r.text and (tmp / "support.toml").read_text() == ISSUE_FLOW
    assert 'data-from="menu" data-to="goodbye"' in r.text  # the graph of the checked text
    r = ada.post("/bots/support/flow", data={"csrf": token, "loaded": loaded, "text": fixed, "action": "save"})
    assert r.status_code == 200 and "the next call follows it" in r.text
    assert (tmp / "support.toml").read_text() == fixed
    entry = next(e for e in users.audit_entries() if e["action"] == "flow.save")
    assert entry["user"] == "ada" and entry["target"] == "support"
    assert entry["detail"]["before"] == digest(ISSUE_FLOW) and entry["detail"]["after"] == digest(fixed)
    assert '-on_no_input = "agent"' in entry["detail"]["diff"] and '+on_no_input = "goodbye"' in entry["detail"]["diff"]
    # the same stale page saving again: refused, the newer file kept
    r = ada.post("/bots/support/flow", data={"csrf": token, "loaded": loaded, "text": ISSUE_FLOW, "action": "save"})
    assert r.status_code == 409 and (tmp / "support.toml").read_text() == fixed


def test_settings_are_saved_through_serves_checks_and_audited(editor):
    client, tmp, users = editor
    acme = client("acme-admin")
    page = acme.get("/bots/support").text
    token, loaded = _csrf(page), _loaded(page, "settings-form")
    r = acme.post("/bots/support/settings", data={"csrf": token, "loaded": loaded, "voice": "NATF2",
                                                  "persona": "", "language": "en"})
    assert r.status_code == 400 and "$.bots[0].persona: must not be empty" in r.text
    r = acme.post("/bots/support/settings", data={"csrf": token, "loaded": loaded, "voice": "/etc/passwd.wav",
                                                  "persona": "You are Ana.", "language": "en"})
    assert r.status_code == 400 and "one of the named voices" in r.text
    assert (tmp / "callbot.toml").read_text() == CONFIG
    r = acme.post("/bots/support/settings", data={"csrf": token, "loaded": loaded, "voice": "NATM1",
                                                  "persona": "You are Ana.", "language": "en", "did-0": "+1 555 0100"})
    assert r.status_code == 200 and "saved: voice" in r.text and "starts again" in r.text
    assert 'voice = "NATM1"' in (tmp / "callbot.toml").read_text() and "# acme's support bot" in (tmp / "callbot.toml").read_text()
    entry = next(e for e in users.audit_entries() if e["action"] == "bot.settings")
    assert entry["user"] == "acme-admin" and entry["detail"]["changed"] == ["voice"] and entry["detail"]["voice"] == "NATM1"


def test_serve_reads_a_changed_config_once_and_keeps_the_last_good_one(tmp_path, caplog):
    from callbot.app.bot_config import BotConfig
    from callbot.app.bot_reload import BotReload
    from callbot.app.routes import CallRoutes, Refusal
    from callbot.app.settings import load_settings
    from tests.test_routes import record

    cfg = _config(tmp_path)
    settings = load_settings(cfg)
    routes = CallRoutes(settings)
    reload = BotReload(cfg, settings, routes)
    try:
        assert reload.screen(record(uri="sip:5550299@127.0.0.1")) == Refusal(404, "Not Found")
        caplog.set_level(logging.WARNING)
        reload.refresh()
        assert reload.current == reload.prepared and not caplog.records  # nothing changed
        bots = BotConfig(cfg)
        changed, problem, _ = bots.update_bot("sales", {"persona": "You sell.", "voice": "NATM1"}, {1: "5550299"},
                                              loaded=None)
        assert problem is None, problem
        reload.refresh()
        assert reload.current["sales"].persona == "You sell." and reload.prepared["sales"].persona != "You sell."
        said = [r.getMessage() for r in caplog.records]
        assert any("bot sales: persona changed" in m for m in said)
        assert any("bot sales: voice changed" in m and "starts again" in m for m in said)
        assert any("routes changed: the calls from now on are routed by them" in m for m in said)
        rec = record(uri="sip:5550299@127.0.0.1")
        assert reload.screen(rec) is None and rec.labels["bot"] == "sales" and rec.labels["tenant"] == "beta"
        assert routes.route(record(uri="sip:5550200@127.0.0.1")) == Refusal(404, "Not Found")  # replaced, not added
        caplog.clear()
        # a route to a bot serve did not prepare: refused, the routes stay
        cfg.write_text(cfg.read_text().replace("[analytics]", '[[bots]]\nname = "new"\n[[routes]]\nbot = "new"\n'
                                               'did = "5550999"\n[analytics]'))
        reload.refresh()
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "routes name bots this server has not prepared: new" in errors[0]
        assert routes.route(record(uri="sip:5550999@127.0.0.1")) == Refusal(404, "Not Found")
        caplog.clear()
        cfg.write_text(cfg.read_text().replace('name = "beta"', 'name = "beta"\nrecordings = 1'))
        for _ in range(2):
            reload.refresh()
            st = cfg.stat()
            os.utime(cfg, ns=(st.st_mtime_ns + 1000, st.st_mtime_ns + 1000))
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "$.tenants[1]: Object contains unknown field `recordings`" in errors[0]
        assert reload.current["sales"].persona == "You sell."  # the last good one
    finally:
        reload.close()


def test_a_flow_file_broken_on_disk_can_still_be_fixed_from_the_page(editor):
    client, tmp, _ = editor
    broken = ISSUE_FLOW.replace('next = "menu"', 'next = "menuu"')
    (tmp / "support.toml").write_text(broken)  # by hand: serve's check of the config now fails
    ada = client("ada")
    page = ada.get("/bots/support")
    assert page.status_code == 200 and 'id="config-problem"' in page.text
    assert 'unknown state &#34;menuu&#34;' in page.text or "unknown state &quot;menuu&quot;" in page.text
    assert 'id="config-problem"' in ada.get("/bots").text
    r = ada.post("/bots/support/flow", data={"csrf": _csrf(page.text), "loaded": _loaded(page.text, "flow-form"),
                                             "text": ISSUE_FLOW, "action": "save"})
    assert r.status_code == 200 and "saved" in r.text and 'id="config-problem"' not in r.text
    assert (tmp / "support.toml").read_text() == ISSUE_FLOW
