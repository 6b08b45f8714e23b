"""The flow runner driven through every kind of exit with a fake clock: what it asks of the call, and
the transition it reports for each move. The call is a recorder of the runner's requests (our own
FlowCall protocol), the clock a number: nothing here waits."""
from __future__ import annotations

import datetime

import pytest

from callbot.engine.contract import FlowTransition
from callbot.flows.runner import (CallGone, Digit, FlowLoop, FlowRunner, PromptDone, Said, Speech, TransferDone,
                                  WebhookDone, render)
from callbot.flows.schema import FlowError, parse_flow

MENU = """
start = "greet"
[states.greet]
say = "Welcome to Example, {name}."
next = "menu"
[states.menu]
say = "Press 1 for billing, 2 for an agent."
gather = { max_digits = 1, timeout_s = 5, interdigit_timeout_s = 3, finish_key = "#" }
reprompts = 2
on_digits = { "1" = "billing", "2" = "agent" }
on_no_input = "agent"
on_no_match = "goodbye"
[states.billing]
persona = "You help {name} with the bill of account {account}."
on_caller_said = [{ match = "(?i)human|agent|representative", goto = "agent" }]
on_bot_said = [{ match = "(?i)transfer you", goto = "agent" }]
on_silence_s = { after = 10, goto = "goodbye" }
max_s = 300
on_max_s = "goodbye"
[states.agent]
transfer = "sip:queue@pbx.example.com"
on_transfer_failed = "goodbye"
[states.goodbye]
say = "Thank you for calling. Goodbye."
hangup = true
"""


class Recorded:
    """A FlowCall that notes each request."""

    def __init__(self):
        self.ops: list[tuple] = []
        self.events: list[FlowTransition] = []
        self.cached: dict[str, bool] = {}

    def play(self, clip, id):
        self.ops.append(("play", clip, id))

    def stop_prompt(self, id):
        self.ops.append(("stop_prompt", id))

    def say(self, text, id, cache=True):
        self.ops.append(("say", text, id))
        self.cached[id] = cache

    def inform(self, text, id, cache=True):
        self.ops.append(("inform", text, id))

    def set_persona(self, text, id):
        self.ops.append(("set_persona", text, id))

    def mute_caller(self, on):
        self.ops.append(("mute_caller", on))

    def hold_bot(self, on):
        self.ops.append(("hold_bot", on))

    def redact_digits(self, on):
        self.ops.append(("redact_digits", on))

    def webhook(self, spec, variables, id):
        self.ops.append(("webhook", spec.url, dict(variables), id))

    def transfer(self, uri):
        self.ops.append(("transfer", uri))

    def transfer_attended(self, uri, announce, timeout_s):
        self.ops.append(("transfer_attended", uri, announce, timeout_s))

    def cancel_transfer(self):
        self.ops.append(("cancel_transfer",))

    def hangup(self):
        self.ops.append(("hangup",))

    def report(self, event):
        self.events.append(event)

    def last(self, kind):
        return next(op for op in reversed(self.ops) if op[0] == kind)

    def moves(self):
        return [(e.from_state, e.to_state, e.reason) for e in self.events]


def runner(text=MENU, **variables):
    call = Recorded()
    r = FlowRunner(parse_flow(text), call, "c1", {"name": "Ana", "account": "42", **variables}, now=100.0,
                   name="support")
    r.start()
    return r, call


def finish_prompt(r, call, now):
    r.handle(PromptDone(call.last("say")[2]), now)


def test_greet_menu_digit_persona_then_the_caller_asks_for_a_human():
    r, call = runner()
    assert call.last("say")[1] == "Welcome to Example, Ana."
    assert ("mute_caller", True) in call.ops  # a prompt state: the model does not hear the caller
    assert ("hold_bot", True) in call.ops  # nor speak of its own
    finish_prompt(r, call, 101.0)
    assert r.state == "menu"
    menu_prompt = call.last("say")[2]
    r.handle(Digit("1"), 101.5)  # pressed during the menu prompt: cuts it (barge-in) and is taken at once
    assert ("stop_prompt", menu_prompt) in call.ops
    assert r.state == "billing"
    assert call.last("set_persona")[1] == "You help Ana with the bill of account 42."
    assert call.last("mute_caller") == ("mute_caller", False)
    assert call.last("hold_bot") == ("hold_bot", False)  # a persona state: the model converses
    r.handle(Said("caller", "i want a human", final=False), 103.0)  # partial: rules wait for the final
    assert r.state == "billing"
    r.handle(Said("caller", "i want a human please"), 103.5)
    assert r.state == "agent"
    assert call.last("transfer") == ("transfer", "sip:queue@pbx.example.com")
    r.handle(TransferDone(ok=True, code=200, reason="OK"), 105.0)
    assert r.ended
    assert call.moves() == [("", "greet", "start"), ("greet", "menu", "next"), ("menu", "billing", "digits"),
                            ("billing", "agent", "caller_said"), ("agent", "agent", "transfer"),
                            ("agent", "", "transfer")]
    assert [e.t_ms for e in call.events][:3] == [0.0, 1000.0, 1500.0]
    assert r.variables["digits"] == "1"


def test_no_input_reprompts_then_takes_its_exit():
    r, call = runner()
    finish_prompt(r, call, 101.0)
    finish_prompt(r, call, 102.0)  # the menu prompt done: the 5 s no-input timer runs
    r.tick(106.9)
    assert r.state == "menu" and sum(op[0] == "say" for op in call.ops) == 2
    for attempt in (1, 2):
        r.tick(107.0 + 10 * (attempt - 1))  # times out: the prompt again
        assert sum(op[0] == "say" for op in call.ops) == 2 + attempt
        finish_prompt(r, call, 107.5 + 10 * (attempt - 1))
    r.tick(117.5 + 5.0)
    assert r.state == "agent"
    assert call.moves()[2:] == [("menu", "menu", "reprompt"), ("menu", "menu", "reprompt"),
                                ("menu", "agent", "no_input"), ("agent", "agent", "transfer")]
    assert call.events[2].detail == "no_input 1/2"


def test_no_match_reprompts_then_exits_and_the_goodbye_hangs_up():
    r, call = runner()
    finish_prompt(r, call, 101.0)
    finish_prompt(r, call, 102.0)
    for i in range(3):
        r.handle(Digit("9"), 103.0 + i)
        if i < 2:
            finish_prompt(r, call, 103.5 + i)
    assert r.state == "goodbye"
    assert call.events[-1].reason == "no_match" and call.events[-1].detail == "9"
    finish_prompt(r, call, 110.0)
    assert call.ops[-1] == ("hangup",) and r.ended
    assert call.events[-1].reason == "hangup"


FORM = """
start = "card"
[states.card]
say = "Enter your card number, then hash."
gather = { max_digits = 16, timeout_s = 5, interdigit_timeout_s = 3, finish_key = "#", variable = "card", sensitive = true }
next = "check"
[states.check]
webhook = { url = "http://127.0.0.1:9/pay", retries = 1, on_failure = "sorry" }
branch = [{ var = "status", match = "^ok$", goto = "thanks" }]
next = "sorry"
[states.thanks]
say = "Paid, {name}. Reference {ref}."
hangup = true
[states.sorry]
say = "Sorry."
hangup = true
"""


def test_a_sensitive_gather_masks_mutes_and_a_webhook_reply_steers_the_branch():
    r, call = runner(FORM)
    assert ("mute_caller", True) in call.ops and ("redact_digits", True) in call.ops
    finish_prompt(r, call, 101.0)
    r.handle(Said("caller", "four one one one"), 101.5)  # a secret read aloud: no rule, nothing logged
    for i, d in enumerate("4111111111111111"[:6]):
        r.handle(Digit(d), 102.0 + i * 0.5)
    r.handle(Digit("#"), 106.0)
    assert r.variables["card"] == "411111"
    assert call.events[-1].detail == "xxxxxx"
    assert ("redact_digits", False) not in call.ops  # a digit typed just after is still masked ...
    hook = call.last("webhook")
    assert hook[2]["card"] == "411111" and hook[2]["name"] == "Ana"  # the payment webhook gets the card
    r.handle(WebhookDone(hook[3], reply={"status": "ok", "variables": {"ref": "A7"}}), 106.2)
    assert "card" not in r.variables  # ... and no later webhook or text can have it
    assert r.state == "thanks"
    assert call.last("say")[1] == "Paid, Ana. Reference A7."
    assert call.cached[call.last("say")[2]] is False  # filled with the call's variables: never cached
    r.tick(108.9)
    assert ("redact_digits", False) not in call.ops
    r.tick(109.0)  # the gather's interdigit_timeout_s (3 s) after it ended
    assert call.last("redact_digits") == ("redact_digits", False)
    assert [m[2] for m in call.moves()] == ["start", "digits", "branch"]


def test_an_interdigit_timeout_ends_the_gathering():
    r, call = runner(FORM)
    finish_prompt(r, call, 101.0)
    r.handle(Digit("1"), 102.0)
    r.handle(Digit("2"), 104.0)
    r.tick(106.9)
    assert r.state == "card"
    r.tick(107.0)
    assert r.state == "check" and r.variables["card"] == "12"


def test_a_failing_webhook_is_retried_then_takes_on_failure():
    r, call = runner(FORM)
    finish_prompt(r, call, 101.0)
    r.handle(Digit("1"), 102.0)
    r.handle(Digit("#"), 102.5)
    first = call.last("webhook")[3]
    r.handle(WebhookDone(first, error="no answer within 2 s"), 104.5)
    second = call.last("webhook")[3]
    assert second != first
    r.handle(WebhookDone(first, reply={"status": "ok"}), 104.6)  # a late reply to the first try: ignored
    assert r.state == "check"
    r.handle(WebhookDone(second, error="connection refused"), 106.6)
    assert r.state == "sorry"
    assert call.events[-1].reason == "webhook_failed" and "refused" in call.events[-1].detail


def test_a_reply_naming_an_unknown_state_is_a_failure_and_a_known_one_is_followed():
    text = FORM.replace("retries = 1", "retries = 0")
    r, call = runner(text)
    finish_prompt(r, call, 101.0)
    r.handle(Digit("#"), 101.5)  # finish key with nothing gathered: keeps waiting
    r.handle(Digit("7"), 101.6)
    r.handle(Digit("#"), 101.7)
    r.handle(WebhookDone(call.last("webhook")[3], reply={"next": "nowhere"}), 102.0)
    assert r.state == "sorry" and "nowhere" in call.events[-1].detail
    r2, call2 = runner(text)
    finish_prompt(r2, call2, 101.0)
    r2.handle(Digit("7"), 101.6)
    r2.handle(Digit("#"), 101.7)
    r2.handle(WebhookDone(call2.last("webhook")[3], reply={"next": "thanks", "ref": 99}), 102.0)
    assert r2.state == "thanks" and call2.last("say")[1] == "Paid, Ana. Reference 99."


def test_silence_max_s_and_the_bots_own_words():
    r, call = runner()
    finish_prompt(r, call, 101.0)
    r.handle(Digit("1"), 101.5)
    finish_prompt(r, call, 102.0)
    assert r.state == "billing"
    r.handle(Speech("caller", True), 103.0)
    r.tick(120.0)  # speaking all along: no silence
    assert r.state == "billing"
    r.handle(Speech("caller", False), 121.0)
    r.tick(130.9)
    assert r.state == "billing"
    r.tick(131.0)
    assert r.state == "goodbye" and call.events[-1].reason == "silence"

    r, call = runner()
    finish_prompt(r, call, 101.0)
    r.handle(Digit("1"), 101.5)
    finish_prompt(r, call, 102.0)
    for piece in (" I", " will", " transfer", " you", " now"):
        r.handle(Said("bot", piece), 103.0)
        r.handle(Speech("bot", True), 103.0)
    assert r.state == "agent" and call.events[-2].reason == "bot_said"

    r, call = runner()
    finish_prompt(r, call, 101.0)
    r.handle(Digit("1"), 101.5)
    finish_prompt(r, call, 102.0)
    r.handle(Speech("bot", True), 102.1)  # talking the whole time: max_s still ends the state
    r.tick(402.0)
    assert r.state == "goodbye" and call.events[-1].reason == "max_s"


def test_a_failed_transfer_takes_its_exit_and_a_gone_call_ends_the_flow():
    r, call = runner()
    finish_prompt(r, call, 101.0)
    r.handle(Digit("2"), 101.5)
    finish_prompt(r, call, 102.0)
    assert r.state == "agent"
    r.handle(TransferDone(ok=False, code=486, reason="Busy Here"), 103.0)
    assert r.state == "goodbye" and call.events[-1].detail == "486 Busy Here"
    r.handle(CallGone("remote"), 104.0)
    assert r.ended and call.events[-1].to_state == "" and call.events[-1].reason == "call_ended"
    r.handle(Digit("1"), 105.0)  # nothing after the end
    r.tick(500.0)
    assert call.events[-1].reason == "call_ended"


def test_without_barge_in_keys_typed_during_the_prompt_wait_for_its_end():
    text = FORM.replace('sensitive = true', 'sensitive = true, barge_in = false')
    r, call = runner(text)
    r.handle(Digit("1"), 100.5)
    r.handle(Digit("2"), 100.6)
    r.handle(Digit("#"), 100.7)
    assert r.state == "card" and not any(op[0] == "stop_prompt" for op in call.ops)
    finish_prompt(r, call, 103.0)
    assert r.state == "check" and r.variables["card"] == "12"


def test_leaving_a_state_mid_prompt_cuts_its_prompt():
    text = MENU.replace('next = "menu"', 'next = "menu"\non_caller_said = [{ match = "agent", goto = "agent" }]', 1)
    r, call = runner(text)
    greeting = call.last("say")[2]
    r.handle(Said("caller", "agent"), 100.5)
    assert r.state == "agent" and ("stop_prompt", greeting) in call.ops


def test_a_caller_the_model_cannot_serve_in_their_language_goes_to_a_human():
    text = """
start = "lang"
[states.lang]
branch = [{ var = "caller_language", match = "^(?!en)[a-z]", goto = "agent" }]
next = "bot"
[states.bot]
persona = "You help in English."
[states.agent]
transfer = "sip:spanish-queue@pbx.example.com"
"""
    r, call = runner(text, caller_language="es-MX")
    assert r.state == "agent" and call.events[-2].reason == "branch"
    r, call = runner(text, caller_language="en-US")
    assert r.state == "bot"
    r, call = runner(text, caller_language="")
    assert r.state == "bot"


def test_a_webhook_that_never_answers_is_a_failure_at_its_timeout():
    r, call = runner(FORM.replace("retries = 1", "retries = 0, timeout_s = 2"))
    finish_prompt(r, call, 101.0)
    r.handle(Digit("7"), 101.5)
    r.handle(Digit("#"), 101.6)
    hook = call.last("webhook")[3]
    r.tick(104.0)  # 2 s + the 0.5 s grace: still waiting
    assert r.state == "check"
    r.tick(104.1)
    assert r.state == "sorry" and "no answer within 2 s" in call.events[-1].detail
    r.handle(WebhookDone(hook, reply={"status": "ok"}), 105.0)  # late: ignored
    assert r.state == "sorry"


def test_a_loop_of_states_that_wait_for_nothing_is_stopped_at_run_time_too():
    """The file check refuses such loops (test_flow_schema); a flow built without it is cut at run time."""
    import msgspec

    from callbot.flows.schema import Flow

    flow = msgspec.convert({"start": "a", "states": {"a": {"next": "b"}, "b": {"next": "a"}}}, Flow)
    r = FlowRunner(flow, Recorded(), "c1", {}, now=0.0)
    with pytest.raises(FlowLoop, match="32 states entered without waiting"):
        r.start()


def test_render_leaves_unknown_variables_empty_and_literal_braces():
    assert render("Hi {name}{missing}, {{x}}", {"name": "Ana"}) == "Hi Ana, {x}"


ATTENDED = MENU.replace('transfer = "sip:queue@pbx.example.com"', '''say = "Please hold."
transfer = "sip:queue@pbx.example.com"
transfer_mode = "attended"
announce = "A caller about billing, account {account}."
consult_timeout_s = 20
on_caller_said = [{ match = "(?i)never mind", goto = "goodbye" }]''')


def _to_agent(text=ATTENDED):
    r, call = runner(text)
    finish_prompt(r, call, 101.0)
    r.handle(Digit("2"), 101.5)
    assert r.state == "agent" and call.last("say")[1] == "Please hold."
    assert not any(op[0].startswith("transfer") for op in call.ops)  # the prompt first
    finish_prompt(r, call, 102.0)
    return r, call


def test_an_attended_transfer_announces_the_caller_then_ends_the_flow_when_it_succeeds():
    r, call = _to_agent()
    assert call.last("transfer_attended") == ("transfer_attended", "sip:queue@pbx.example.com",
                                              "A caller about billing, account 42.", 20.0)
    assert ("hold_bot", True) in call.ops and call.last("hold_bot") == ("hold_bot", True)  # the caller waits quietly
    r.handle(TransferDone(ok=True, code=200, reason="OK"), 110.0)
    assert r.ended and call.moves()[-2:] == [("agent", "agent", "transfer"), ("agent", "", "transfer")]
    assert not any(op[0] == "cancel_transfer" for op in call.ops)


def test_a_failed_attended_transfer_takes_its_exit_without_cancelling():
    r, call = _to_agent()
    r.handle(TransferDone(ok=False, code=408, reason="no answer within 20 s"), 122.0)
    assert r.state == "goodbye" and call.events[-1].reason == "transfer_failed"
    assert call.events[-1].detail == "408 no answer within 20 s"
    assert not any(op[0] == "cancel_transfer" for op in call.ops)


def test_leaving_a_state_while_its_attended_transfer_consults_cancels_it():
    r, call = _to_agent()
    r.handle(Said("caller", "oh never mind"), 105.0)
    assert r.state == "goodbye" and call.ops.index(("cancel_transfer",)) > call.ops.index(call.last("transfer_attended"))
    r.handle(TransferDone(ok=True), 106.0)  # too late: the flow moved on
    assert r.state == "goodbye"


def test_a_blind_transfer_stays_blind_and_is_never_cancelled():
    text = MENU.replace('on_transfer_failed = "goodbye"', 'on_transfer_failed = "goodbye"\nmax_s = 30\non_max_s = "goodbye"')
    r, call = runner(text)
    finish_prompt(r, call, 101.0)
    r.handle(Digit("2"), 101.5)
    assert call.last("transfer") == ("transfer", "sip:queue@pbx.example.com")
    r.tick(140.0)
    assert r.state == "goodbye" and not any(op[0] in ("cancel_transfer", "transfer_attended") for op in call.ops)


HOURS = """
start = "door"
[hours]
timezone = "America/New_York"
open = { mon = "09:00-18:00", fri = "09:00-12:00,13:00-17:00" }
closed_dates = ["2026-12-25"]
[states.door]
branch = [{ var = "open", match = "^yes$", goto = "menu" }]
next = "closed"
[states.menu]
say = "Hello, it is {local_time} on {weekday}."
hangup = true
[states.closed]
say = "We are closed on {local_date}."
hangup = true
"""


def _wall(local: str) -> float:
    """Unix time of a New York wall-clock time ('2026-12-07 10:30')."""
    from zoneinfo import ZoneInfo

    return datetime.datetime.fromisoformat(local).replace(tzinfo=ZoneInfo("America/New_York")).timestamp()


def test_business_hours_branch_on_open_in_the_flows_time_zone_with_its_closed_dates():
    cases = {"2026-12-07 10:30": "menu",    # a Monday, inside 09:00-18:00
             "2026-12-07 08:59": "closed",  # before opening
             "2026-12-07 18:00": "closed",  # the end is exclusive
             "2026-12-08 10:30": "closed",  # a Tuesday: not named, closed
             "2026-12-11 12:30": "closed",  # Friday's lunch between its two spans
             "2026-12-11 13:00": "menu",
             "2026-12-25 10:30": "closed",  # a Friday, but a closed date
             "2026-03-09 09:30": "menu"}    # a Monday just after the DST change: local time, not UTC
    for local, where in cases.items():
        call = Recorded()
        r = FlowRunner(parse_flow(HOURS), call, "c1", {}, now=100.0, wall=_wall(local))
        r.start()
        assert r.state == where, (local, r.state)
        date, time_of_day = local.split()
        weekday = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[datetime.date.fromisoformat(date).weekday()]
        said = call.last("say")[1]  # the variables in the texts: the flow's local time, day and date
        assert said == (f"Hello, it is {time_of_day} on {weekday}." if where == "menu"
                        else f"We are closed on {date}."), said
    # later in the call, the hours are read again as a state is entered (the runner's own clock moved on)
    call = Recorded()
    r = FlowRunner(parse_flow(HOURS.replace('next = "closed"', 'next = "closed"\nmax_s = 3600\non_max_s = "door"')
                              .replace('[states.closed]\nsay = "We are closed on {local_date}."\nhangup = true',
                                       '[states.closed]\nnext = "door"\nmax_s = 3600')), call, "c1", {}, now=0.0,
                   wall=_wall("2026-12-07 08:30"))
    r.start()
    assert r.state == "closed"
    r.tick(3600.0)  # an hour later: 09:30, open
    assert r.state == "menu"


def test_bad_business_hours_are_one_line_naming_the_field():
    for change, said in ((('"America/New_York"', '"Mars/Olympus"'), "$.hours.timezone: timezone 'Mars/Olympus'"),
                         (('"09:00-18:00"', '"18:00-09:00"'), "$.hours.open.mon: '18:00-09:00': the end must come"),
                         (('"09:00-18:00"', '"9-6"'), "$.hours.open.mon: '9-6': expected HH:MM-HH:MM"),
                         (('"2026-12-25"', '"25/12/2026"'), "$.hours.closed_dates[0]: '25/12/2026': not a date"),
                         (("mon =", "monday ="), "$.hours.open: Invalid enum value 'monday' (as a key)")):
        with pytest.raises(FlowError) as err:
            parse_flow(HOURS.replace(*change))
        assert str(err.value).startswith(said), str(err.value)


def _hold_clip(tmp_path) -> str:
    import wave

    path = tmp_path / "hold.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 800)
    return str(path)


def test_hold_music_plays_to_the_caller_again_and_again_while_the_target_is_called(tmp_path):
    clip = _hold_clip(tmp_path)
    r, call = _to_agent(ATTENDED.replace("consult_timeout_s = 20", f'consult_timeout_s = 20\nhold_music = "{clip}"'))
    first = call.last("play")
    assert first[1] == clip and call.ops.index(first) > call.ops.index(call.last("transfer_attended"))
    r.handle(PromptDone(first[2]), 104.0)  # the clip ended: the caller still waits, it plays again
    second = call.last("play")
    assert second[1] == clip and second[2] != first[2]
    r.handle(PromptDone(first[2]), 104.5)  # a stale end changes nothing
    assert call.last("play") == second
    r.handle(TransferDone(ok=False, code=486, reason="Busy Here"), 106.0)  # over: the music stops
    assert call.ops[call.ops.index(second) + 1] == ("stop_prompt", second[2]) and r.state == "goodbye"
    # leaving the state mid-consultation stops it too, with the consultation
    r, call = _to_agent(ATTENDED.replace("consult_timeout_s = 20", f'consult_timeout_s = 20\nhold_music = "{clip}"'))
    playing = call.last("play")[2]
    r.handle(Said("caller", "never mind"), 105.0)
    assert ("stop_prompt", playing) in call.ops and ("cancel_transfer",) in call.ops


def test_hold_music_is_checked_like_a_clip_and_only_for_an_attended_transfer(tmp_path):
    clip = _hold_clip(tmp_path)
    for text, said in ((ATTENDED.replace("consult_timeout_s = 20", 'hold_music = "nowhere.wav"'),
                        "$.states.agent.hold_music: clip"),
                       (MENU.replace('transfer = "sip:queue@pbx.example.com"',
                                     f'transfer = "sip:queue@pbx.example.com"\nhold_music = "{clip}"'),
                        "$.states.agent.hold_music: only for an attended transfer")):
        with pytest.raises(FlowError) as err:
            parse_flow(text)
        assert str(err.value).startswith(said), str(err.value)
