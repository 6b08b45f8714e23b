"""Flow files: the issue's example shape decodes; every kind of mistake is one line naming its place."""
from __future__ import annotations

import pathlib
import wave

import pytest

from callbot.flows.schema import FlowError, load_flow, parse_flow

EXAMPLE = """
start = "greet"
[states.greet]
play = "prompts/welcome.wav"
next = "menu"
[states.menu]
play = "prompts/menu.wav"
gather = { max_digits = 1, timeout_s = 5, interdigit_timeout_s = 3, finish_key = "#" }
reprompts = 2
on_digits = { "1" = "billing", "2" = "agent" }
on_no_input = "agent"
on_no_match = "menu"
[states.billing]
persona = "You help {name} with the bill of account {account}."
webhook = { url = "http://127.0.0.1:8080/lookup", timeout_s = 2 }
on_caller_said = [{ match = "(?i)human|agent|representative", goto = "agent" }]
on_bot_said = [{ match = "(?i)transfer you", goto = "agent" }]
on_silence_s = { after = 10, goto = "goodbye" }
max_s = 300
[states.agent]
transfer = "sip:queue@pbx.example.com"
[states.goodbye]
say = "Thank you for calling. Goodbye."
hangup = true
"""


def _clips(base: pathlib.Path) -> None:
    (base / "prompts").mkdir(exist_ok=True)
    for name in ("welcome", "menu"):
        with wave.open(str(base / "prompts" / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\0\0" * 800)


def test_the_issues_example_flow_loads_with_clips_resolved_against_the_file(tmp_path):
    _clips(tmp_path)
    path = tmp_path / "support.toml"
    path.write_text(EXAMPLE)
    flow = load_flow(path)
    assert flow.start == "greet"
    assert flow.states["greet"].play == str(tmp_path / "prompts" / "welcome.wav")
    assert flow.states["menu"].on_digits == {"1": "billing", "2": "agent"}
    assert flow.states["billing"].webhook.url == "http://127.0.0.1:8080/lookup"
    assert flow.states["goodbye"].hangup


@pytest.mark.parametrize("change, message", [
    (('"1" = "billing"', '"1" = "biling"'), '$.states.menu.on_digits.1: unknown state "biling"'),
    (('start = "greet"', 'start = "nowhere"'), '$.start: unknown state "nowhere"'),
    (("max_digits = 1,", "max_digits = 0,"), "$.states.menu.gather.max_digits: Expected `int` >= 1"),
    (("max_s = 300", "max_seconds = 300"), "Object contains unknown field `max_seconds` - at `$.states.billing`"),
    (('match = "(?i)transfer you"', 'match = "(unclosed"'), "$.states.billing.on_bot_said[0].match: not a valid regular expression"),
    (("{account}", "{account.id}"), "$.states.billing.persona: {account.id} is not a variable name"),
    (("prompts/menu.wav", "prompts/missing.wav"), "$.states.menu.play: clip"),
    (('"2" = "agent"', '"2x" = "agent"'), "$.states.menu.on_digits.2x: '2x' is not DTMF digits"),
    (('"2" = "agent"', '"22" = "agent"'), "more than gather.max_digits = 1"),
    (('transfer = "sip:queue@pbx.example.com"', 'transfer = "queue@pbx"'), "$.states.agent.transfer"),
    (("hangup = true", "hangup = false"), "$.states.goodbye: a dead end"),
    (('url = "http://127.0.0.1:8080/lookup"', 'url = "ftp://x"'), "$.states.billing.webhook.url"),
])
def test_a_mistake_is_one_line_naming_its_place(tmp_path, change, message):
    _clips(tmp_path)
    path = tmp_path / "support.toml"
    old, new = change
    assert old in EXAMPLE
    path.write_text(EXAMPLE.replace(old, new, 1))
    with pytest.raises(FlowError) as err:
        load_flow(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    if message.startswith("Object contains"):  # msgspec's own wording, reworded to lead with the path
        assert "$.states.billing: Object contains unknown field `max_seconds`" in text
    else:
        assert message in text


def test_not_toml_and_a_missing_file_are_one_line(tmp_path):
    with pytest.raises(FlowError, match="not valid TOML"):
        parse_flow(b"start = ")
    with pytest.raises(FlowError, match="cannot read the flow file"):
        load_flow(tmp_path / "none.toml")


def test_structural_rules(tmp_path):
    base = 'start = "a"\n'
    with pytest.raises(FlowError, match=r"\$.states.a.on_digits: needs a gather"):
        parse_flow(base + '[states.a]\nnext = "a"\non_digits = { "1" = "a" }\n')
    with pytest.raises(FlowError, match="play and say both set"):
        parse_flow(base + '[states.a]\nsay = "x"\nplay = "x.wav"\nhangup = true\n', base_dir=tmp_path)
    with pytest.raises(FlowError, match="where do the digits lead"):
        parse_flow(base + '[states.a]\nsay = "x"\ngather = {}\n')
    with pytest.raises(FlowError, match="holds the finish key"):
        parse_flow(base + '[states.a]\ngather = { max_digits = 2 }\non_digits = { "1#" = "a" }\n')
    with pytest.raises(FlowError, match="next is where it goes when no branch matches"):
        parse_flow(base + '[states.a]\nbranch = [{ var = "x", match = "y", goto = "a" }]\n')
    with pytest.raises(FlowError, match="transfer and hangup both set"):
        parse_flow(base + '[states.a]\ntransfer = "sip:x@y"\nhangup = true\n')
    with pytest.raises(FlowError, match=r"\$.states.b: a loop that waits for nothing: b -> c -> b"):
        parse_flow(base + '[states.a]\nsay = "x"\nnext = "b"\n[states.b]\nnext = "c"\n'
                          '[states.c]\nbranch = [{ var = "v", match = "1", goto = "a" }]\nnext = "b"\n')
    with pytest.raises(FlowError, match=r"\$.states.b.say: \{card\} is gathered as sensitive"):
        parse_flow(base + '[states.a]\ngather = { max_digits = 4, sensitive = true, variable = "card" }\n'
                          'next = "b"\n[states.b]\nsay = "You typed {card}"\nhangup = true\n')
    flow = parse_flow(base + '[states.a]\nsay = "Hello {{literal}} {name}"\nhangup = true\n')
    assert flow.states["a"].say == "Hello {{literal}} {name}"


def test_callbot_flows_check_says_ok_or_one_line_and_exit_2(tmp_path, capsys):
    from callbot.app.cli import main

    _clips(tmp_path)
    good = tmp_path / "support.toml"
    good.write_text(EXAMPLE)
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.replace('"1" = "billing"', '"1" = "biling"'))
    assert main(["flows", "check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok (5 states, starts at 'greet')\n"
    assert main(["flows", "check", str(good), str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f'callbot: error: {bad}: $.states.menu.on_digits.1: unknown state "biling", expected one of '
                   "agent, billing, goodbye, greet, menu"]


def test_the_examples_flow_and_config_load():
    """The README's example (examples/support/) passes `callbot flows check` and loads as a config."""
    from callbot.app.settings import load_settings

    root = pathlib.Path(__file__).resolve().parent.parent / "examples" / "support"
    flow = load_flow(root / "support.toml")
    assert flow.start == "greet" and flow.states["menu"].on_digits == {"1": "account", "2": "agent"}
    settings = load_settings(root / "callbot.toml")
    assert settings.bots[0].flow == str(root / "support.toml")


def test_attended_transfer_fields():
    base = 'start = "a"\n[states.a]\ntransfer = "sip:queue@pbx.example.com"\n'
    flow = parse_flow(base)
    s = flow.states["a"]
    assert (s.transfer_mode, s.announce, s.consult_timeout_s) == ("blind", None, None)  # the default: blind REFER
    flow = parse_flow(base + 'transfer_mode = "attended"\nannounce = "A caller about {topic}"\nconsult_timeout_s = 15\n')
    s = flow.states["a"]
    assert (s.transfer_mode, s.announce, s.consult_timeout_s) == ("attended", "A caller about {topic}", 15.0)
    for extra, message in [
        ('transfer_mode = "warm"\n', r"\$.states.a.transfer_mode: Invalid enum value 'warm'"),
        ('announce = "Hi"\n', r'\$.states.a.announce: only for an attended transfer \(transfer_mode = "attended"\)'),
        ('consult_timeout_s = 10\n', r"\$.states.a.consult_timeout_s: only for an attended transfer"),
        ('transfer_mode = "attended"\nconsult_timeout_s = 0\n', r"\$.states.a.consult_timeout_s: Expected `float` > 0"),
        ('transfer_mode = "attended"\nannounce = "{topic.x}"\n', r"\$.states.a.announce: \{topic.x\} is not a variable"),
        ('transfer_mode = "attended"\nannounce = ""\n', r"\$.states.a.announce: Expected `str` of length >= 1"),
    ]:
        with pytest.raises(FlowError, match=message):
            parse_flow(base + extra)
    with pytest.raises(FlowError, match=r"\$.states.a.transfer_mode: no transfer in this state"):
        parse_flow('start = "a"\n[states.a]\ntransfer_mode = "attended"\nhangup = true\n')
    with pytest.raises(FlowError, match=r"\$.states.a.transfer: an attended transfer calls the target: it needs a sip"):
        parse_flow('start = "a"\n[states.a]\ntransfer = "tel:+15551234"\ntransfer_mode = "attended"\n')
