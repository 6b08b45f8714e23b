"""One call's flow as a state machine: inputs in (digits, words, speech, prompts done, webhook replies,
timer ticks), actions out (play, say, persona, mute, webhook, transfer, hang up), a transition event
for every move.

Why a pure machine with an injected clock: the runner never waits, sleeps, reads a clock or does I/O.
The app's flow host (app/flow_host.py) feeds it the call's live events and calls `tick(now)` a few
times a second; everything slow (text to speech, webhooks, SIP operations) is an action that returns
at once and whose outcome comes back as an input. So one host thread steers every call, a slow
backend holds up nothing but its own call's state, and tests drive a call through any path with a
fake clock, exactly and fast.

What a state does on entry, in order: report the transition; call its webhook and wait for the reply
(variables, maybe the next state); take the first `branch` that matches; mute or unmute the caller to
the model; set its persona; inform the model; play its prompt (clip or `say`); then, once the prompt
is done: transfer, hang up, gather digits (timers start when the prompt ends, but digits typed during
the prompt count), go `next`, or stay listening (persona states: until a rule fires). `max_s`,
`on_silence_s`, `on_caller_said` and `on_bot_said` hold from entry.

A transfer waits in the "transferring" phase for TransferDone: blind, the REFER's last NOTIFY; attended,
the same after a consultation leg to the target (its failure - busy, no answer - is a TransferDone too).
The caller meanwhile stays in the state as its prompt left it (the bot held unless the state has a
persona). A rule that leaves the state mid-transfer (max_s, on_caller_said) cancels an attended one.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Literal, Protocol

from callbot.engine.contract import FlowTransition
from callbot.flows.hours import hours_variables
from callbot.flows.schema import Flow, State, Webhook

REPLY_TEXT_MAX = 256
MAX_HOPS = 32  # states entered in a row without waiting for an input: more is a loop in the flow
WEBHOOK_GRACE_S = 0.5  # past a webhook's timeout_s, the runner stops waiting even if httpx has not  # chars of a webhook reply's value kept as a variable
BOT_TEXT_WINDOW = 400  # chars of the bot's recent words that on_bot_said rules see


class FlowCall(Protocol):
    """What a runner does on its call. Every method returns at once; outcomes come back as inputs
    (PromptDone, WebhookDone, TransferDone)."""

    def play(self, clip: str, id: str) -> None: ...

    def stop_prompt(self, id: str) -> None: ...

    def say(self, text: str, id: str, cache: bool = True) -> None:
        """`cache`: the text is the flow's own (no variables), so its speech may be kept and reused; a
        text filled with a call's variables is never cached (a balance, a name: personal data)."""
        ...

    def inform(self, text: str, id: str, cache: bool = True) -> None: ...

    def set_persona(self, text: str, id: str) -> None: ...

    def mute_caller(self, on: bool) -> None: ...

    def hold_bot(self, on: bool) -> None: ...

    def redact_digits(self, on: bool) -> None: ...

    def webhook(self, spec: Webhook, variables: dict[str, str], id: str) -> None: ...

    def transfer(self, uri: str) -> None: ...

    def transfer_attended(self, uri: str, announce: str | None, timeout_s: float | None) -> None:
        """Call `uri` first (the bot held on that leg), say `announce` to it when it answers, then REFER
        the caller with Replaces; the outcome comes back as TransferDone."""
        ...

    def cancel_transfer(self) -> None:
        """The flow left the state before its attended transfer went through: drop the consultation leg
        (no TransferDone follows)."""
        ...

    def hangup(self) -> None: ...

    def report(self, event: FlowTransition) -> None: ...


# ---- inputs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Digit:
    digit: str


@dataclass(frozen=True)
class Said:
    """Words: the caller's (the recognizer) or the bot's (a piece of the model's text)."""

    who: Literal["caller", "bot"]
    text: str
    final: bool = True


@dataclass(frozen=True)
class Speech:
    who: Literal["caller", "bot"]
    speaking: bool


@dataclass(frozen=True)
class PromptDone:
    id: str
    error: str | None = None  # the prompt could not be played (TTS failed, the clip was refused)


@dataclass(frozen=True)
class WebhookDone:
    id: str
    reply: dict | None = None
    error: str | None = None


@dataclass(frozen=True)
class TransferDone:
    ok: bool
    code: int = 0
    reason: str = ""


@dataclass(frozen=True)
class CallGone:
    """The call ended (either side hung up, transferred, or failed)."""

    cause: str = ""


Input = Digit | Said | Speech | PromptDone | WebhookDone | TransferDone | CallGone


class FlowLoop(RuntimeError):
    """The flow went round states that wait for nothing (the file check refuses the plain cases)."""


class _Vars(dict):
    def __missing__(self, key: str) -> str:
        return ""  # a variable nobody set reads as empty: a persona is never refused mid-call


def has_fields(template: str) -> bool:
    """Whether `template` fills any {variable}."""
    return any(field is not None for _, field, _, _ in string.Formatter().parse(template))


def render(template: str, variables: dict[str, str]) -> str:
    """`{name}` filled from the call's variables (checked to be well-formed when the flow was loaded)."""
    return string.Formatter().vformat(template, (), _Vars(variables))


@dataclass
class _Visit:
    """What one stay in a state has seen so far."""

    name: str
    state: State
    entered: float
    phase: Literal["webhook", "prompt", "listening", "transferring", "done"] = "webhook"
    pending: str = ""  # the id of the prompt or webhook awaited
    webhook_tries: int = 0
    digits: str = ""
    finished: bool = False  # the finish key came while the prompt played
    deadline: float | None = None  # gather: no-input (no digits yet) or inter-digit (some)
    attempts: int = 0  # reprompts used
    quiet_since: float | None = None
    bot_text: str = ""


@dataclass
class FlowRunner:
    flow: Flow
    call: FlowCall
    call_id: str
    variables: dict[str, str]
    now: float  # the host's clock (seconds) when the runner was made: the flow's t = 0
    name: str = "flow"
    wall: float = 0.0  # the wall clock (Unix s) at `now`: business hours ([hours]) are read from it
    ended: bool = False
    path: list[str] = field(default_factory=list)  # states entered, in order
    _t0: float = 0.0
    _visit: _Visit | None = None
    _ids: int = 0
    _speaking: dict[str, bool] = field(default_factory=lambda: {"caller": False, "bot": False})
    _muted: bool | None = None
    _held: bool | None = None
    _redacting: bool = False
    _redact_until: float | None = None  # redaction goes on this long after a sensitive gather is left
    _secrets: set[str] = field(default_factory=set)  # variables gathered sensitively, until their webhook
    _hops: int = 0  # states entered since the runner last had an input or a tick: a loop of them is a bug

    def __post_init__(self) -> None:
        self._t0 = self.now
        self.variables = {**self.flow.variables, **self.variables}

    @property
    def state(self) -> str | None:
        return None if self._visit is None or self.ended else self._visit.name

    # ---- driving -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._enter(self.flow.start, "start", "")

    def handle(self, inp: Input, now: float) -> None:
        self.now = now
        self._hops = 0
        if self.ended or self._visit is None:
            return
        v = self._visit
        if isinstance(inp, CallGone):
            if v.phase == "transferring" and inp.cause == "transfer":
                self._end("transfer", v.state.transfer or "")  # the call ended before the NOTIFY was read
            else:
                self._end("call_ended", inp.cause)
        elif isinstance(inp, PromptDone):
            if v.phase == "prompt" and inp.id == v.pending:
                self._prompt_done(v)
            elif v.phase == "transferring" and inp.id and inp.id == v.pending:
                self._hold_music(v)  # the caller still waits: the music again
        elif isinstance(inp, WebhookDone):
            if v.phase == "webhook" and inp.id == v.pending:
                self._webhook_done(v, inp)
        elif isinstance(inp, TransferDone):
            if v.phase == "transferring":
                self._stop_hold_music(v)
                if inp.ok:
                    self._end("transfer", v.state.transfer or "")
                else:
                    detail = f"{inp.code} {inp.reason}".strip()
                    v.phase = "listening"  # over: nothing left to cancel
                    self._exit(v.state.on_transfer_failed or v.state.next, "transfer_failed", detail)
        elif isinstance(inp, Digit):
            self._digit(v, inp.digit)
        elif isinstance(inp, Speech):
            self._speaking[inp.who] = inp.speaking
            v.quiet_since = None if any(self._speaking.values()) else now
        elif isinstance(inp, Said):
            self._said(v, inp)

    def tick(self, now: float) -> None:
        """Fires the timers that are due at `now` (gather timeouts, silence, max_s, a webhook's answer)."""
        self.now = now
        self._hops = 0
        v = self._visit
        if self.ended or v is None or v.phase == "done":
            return
        if self._redact_until is not None and now >= self._redact_until:
            self._stop_redacting()
        s = v.state
        if v.phase == "webhook" and v.deadline is not None and now >= v.deadline:
            # the backend holds the call no longer than its timeout (a late reply is ignored by its id)
            assert s.webhook is not None
            self._webhook_done(v, WebhookDone(v.pending, error=f"{s.webhook.url}: no answer within "
                                                                 f"{s.webhook.timeout_s:g} s"))
            return
        if s.max_s is not None and now - v.entered >= s.max_s:
            self._exit(s.on_max_s or s.next, "max_s", f"{s.max_s:g} s")
            return
        if s.on_silence_s is not None and v.phase == "listening" and v.quiet_since is not None \
                and now - v.quiet_since >= s.on_silence_s.after:
            self._go(s.on_silence_s.goto, "silence", f"{s.on_silence_s.after:g} s")
            return
        if v.deadline is not None and now >= v.deadline:
            v.deadline = None
            if v.digits:
                self._gathered(v)
            else:
                self._retry(v, "no_input", s.on_no_input)

    # ---- states ------------------------------------------------------------------------------------

    def _next_id(self, kind: str) -> str:
        self._ids += 1
        return f"{self.call_id}#flow-{kind}-{self._ids}"

    def _report(self, from_state: str, to_state: str, reason: str, detail: str) -> None:
        self.call.report(FlowTransition(call_id=self.call_id, t_ms=round((self.now - self._t0) * 1000.0, 1),
                                        flow=self.name, from_state=from_state, to_state=to_state,
                                        reason=reason, detail=detail[:200]))

    def _enter(self, name: str, reason: str, detail: str) -> None:
        self._hops += 1
        if self._hops > MAX_HOPS:
            raise FlowLoop(f"{MAX_HOPS} states entered without waiting for anything (a loop through {name!r})")
        previous = self._visit.name if self._visit is not None else ""
        state = self.flow.states[name]
        self._visit = v = _Visit(name=name, state=state, entered=self.now, quiet_since=self.now)
        self.path.append(name)
        self._report(previous, name, reason, detail)
        if state.webhook is not None:
            self._call_webhook(v)
        else:
            self._after_webhook(v)

    def _go(self, name: str, reason: str, detail: str = "") -> None:
        v = self._visit
        if v is not None and v.phase == "prompt":
            self.call.stop_prompt(v.pending)  # leaving mid-prompt (a rule fired): the caller hears the next state
        if v is not None and v.phase == "transferring" and v.state.transfer_mode == "attended":
            self.call.cancel_transfer()  # the REFER must not take the caller away from the next state
            self._stop_hold_music(v)
        if self._redacting and self._redact_until is None:
            # digits typed just after the gather ended (the rest of a long card, a CVV) stay masked a while
            g = v.state.gather if v is not None else None
            self._redact_until = self.now + (g.interdigit_timeout_s if g is not None else 0.0)
        self._enter(name, reason, detail)
        if self._secrets and not (self._visit is not None and self._visit.state.webhook is not None):
            self._forget_secrets()  # the state after a sensitive gather is the only one whose webhook gets it

    def _exit(self, name: str | None, reason: str, detail: str = "") -> None:
        """Leave for `name`, or hang up when the flow names no state for this exit."""
        if name is not None:
            self._go(name, reason, detail)
        else:
            self._hangup(reason, detail)

    def _hangup(self, reason: str, detail: str) -> None:
        self.call.hangup()
        self._end(reason if reason == "hangup" else f"hangup:{reason}", detail)

    def _end(self, reason: str, detail: str) -> None:
        if self.ended:
            return
        v = self._visit
        if v is not None:
            v.phase = "done"
        self._report(v.name if v is not None else "", "", reason, detail)
        self.ended = True

    def _stop_redacting(self) -> None:
        self._redact_until = None
        v = self._visit
        if self._redacting and not (v is not None and v.state.gather is not None and v.state.gather.sensitive):
            self._redacting = False
            self.call.redact_digits(False)

    def _forget_secrets(self) -> None:
        for name in self._secrets:
            self.variables.pop(name, None)
        self._secrets.clear()

    def _public(self) -> dict[str, str]:
        """The variables texts may show: never a secret (the schema refuses them in texts too)."""
        return {k: v for k, v in self.variables.items() if k not in self._secrets}

    def _call_webhook(self, v: _Visit) -> None:
        assert v.state.webhook is not None
        v.phase = "webhook"
        v.pending = self._next_id("webhook")
        v.webhook_tries += 1
        v.deadline = self.now + v.state.webhook.timeout_s + WEBHOOK_GRACE_S
        self.call.webhook(v.state.webhook, dict(self.variables), v.pending)

    def _webhook_done(self, v: _Visit, done: WebhookDone) -> None:
        spec = v.state.webhook
        assert spec is not None
        v.deadline = None
        error = done.error
        reply = done.reply
        goto = None
        if error is None:
            if not isinstance(reply, dict):
                error = "the reply is not a JSON object"
            else:
                goto = reply.get("next")
                if goto is not None and goto not in self.flow.states:
                    error = f"the reply names no state of the flow: next = {str(goto)[:60]!r}"
        if error is not None and v.webhook_tries <= spec.retries:
            self._call_webhook(v)
            return
        self._forget_secrets()  # this webhook (the state after a sensitive gather) had them: no other will
        if error is not None:
            if spec.on_failure is not None:
                self._go(spec.on_failure, "webhook_failed", error)
                return
            self._report(v.name, v.name, "webhook_failed", error)  # goes on without the reply
            self._after_webhook(v)
            return
        assert isinstance(reply, dict)
        self._take_reply(reply)
        if goto is not None:
            self._go(goto, "webhook", spec.url)
        else:
            self._after_webhook(v)

    def _take_reply(self, reply: dict) -> None:
        values = dict(reply.get("variables") or {}) if isinstance(reply.get("variables"), dict) else {}
        values.update({k: v for k, v in reply.items() if k not in ("next", "variables")})
        for key, value in values.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) \
                    and isinstance(value, (str, int, float)):
                self.variables[key] = str(value)[:REPLY_TEXT_MAX]

    def _after_webhook(self, v: _Visit) -> None:
        s = v.state
        hours = self.flow.hours
        if hours is not None:  # open, weekday, local_time, local_date: as the state is entered
            self.variables.update(hours_variables(self.wall + (self.now - self._t0), hours.timezone, hours.open,
                                                  hours.closed_dates))
        for rule in s.branch:
            value = self.variables.get(rule.var, "")
            if re.search(rule.match, value):
                self._go(rule.goto, "branch", f"{rule.var} ~ {rule.match}")
                return
        if s.branch and not (s.play or s.say or s.persona or s.gather or s.transfer or s.hangup):
            self._exit(s.next, "next", "no branch matched")
            return
        sensitive = s.gather is not None and s.gather.sensitive
        muted = True if sensitive else (s.mute_caller if s.mute_caller is not None else s.persona is None)
        if muted != self._muted:
            self._muted = muted
            self.call.mute_caller(muted)
        held = s.persona is None  # the model talks only in states that give it a persona
        if held != self._held:
            self._held = held
            self.call.hold_bot(held)
        if sensitive and not self._redacting:
            self._redacting = True
            self.call.redact_digits(True)
        if s.persona:
            self.call.set_persona(render(s.persona, self._public()), self._next_id("persona"))
        if s.inform:
            self.call.inform(render(s.inform, self._public()), self._next_id("inform"), cache=not has_fields(s.inform))
        self._prompt(v)

    def _prompt(self, v: _Visit) -> None:
        s = v.state
        if s.play or s.say:
            v.phase = "prompt"
            v.pending = self._next_id("prompt")
            if s.play:
                self.call.play(s.play, v.pending)
            else:
                assert s.say is not None
                self.call.say(render(s.say, self._public()), v.pending, cache=not has_fields(s.say))
        else:
            self._prompt_done(v)

    def _hold_music(self, v: _Visit) -> None:
        """The caller's hold music while an attended transfer calls its target: played again each time it
        ends (PromptDone of its id), until the transfer is over."""
        if v.state.hold_music:
            v.pending = self._next_id("hold")
            self.call.play(v.state.hold_music, v.pending)

    def _stop_hold_music(self, v: _Visit) -> None:
        if v.pending:
            self.call.stop_prompt(v.pending)
            v.pending = ""

    def _prompt_done(self, v: _Visit) -> None:
        s = v.state
        v.phase = "listening"
        v.pending = ""
        if not any(self._speaking.values()):
            v.quiet_since = self.now
        if s.transfer:
            v.phase = "transferring"
            self._report(v.name, v.name, "transfer", s.transfer)
            if s.transfer_mode == "attended":
                announce = render(s.announce, self._public()) if s.announce else None
                self.call.transfer_attended(s.transfer, announce, s.consult_timeout_s)
                self._hold_music(v)
            else:
                self.call.transfer(s.transfer)
        elif s.hangup:
            self._hangup("hangup", "")
        elif s.gather is not None:
            if v.digits and (v.finished or self._complete(v)):
                self._gathered(v)
            else:
                v.deadline = self.now + (s.gather.interdigit_timeout_s if v.digits else s.gather.timeout_s)
        elif s.next is not None and not (s.persona or s.on_caller_said or s.on_bot_said or s.on_silence_s
                                         or s.max_s):
            self._go(s.next, "next")

    # ---- digits and words --------------------------------------------------------------------------

    def _digit(self, v: _Visit, digit: str) -> None:
        g = v.state.gather
        if g is None or v.phase not in ("prompt", "listening"):
            return  # a digit no gather waits for
        if g.finish_key is not None and digit == g.finish_key:
            if v.digits and v.phase == "listening":
                self._gathered(v)
            elif v.digits:
                v.finished = True  # typed ahead during a prompt that plays out: taken when it is done
            return
        v.digits += digit
        if v.phase == "prompt" and g.barge_in:  # a key cuts the prompt, as on any IVR
            self.call.stop_prompt(v.pending)
            self._prompt_done(v)
            return
        if self._complete(v):
            if v.phase == "listening":
                self._gathered(v)
            return  # typed ahead during the prompt: taken when the prompt is done
        if v.phase == "listening":
            v.deadline = self.now + g.interdigit_timeout_s

    def _complete(self, v: _Visit) -> bool:
        g = v.state.gather
        assert g is not None
        if len(v.digits) >= g.max_digits:
            return True
        # a menu choice that no longer choice extends is taken at once (1 of "1", "12": wait)
        choices = v.state.on_digits
        return v.digits in choices and not any(k != v.digits and k.startswith(v.digits) for k in choices)

    def _gathered(self, v: _Visit) -> None:
        s = v.state
        g = s.gather
        assert g is not None
        digits, v.digits, v.deadline, v.finished = v.digits, "", None, False
        self.variables[g.variable] = digits
        if g.sensitive:
            self._secrets.add(g.variable)
        shown = "x" * len(digits) if g.sensitive else digits  # x: not a DTMF key, so clearly a mask
        if s.on_digits:
            goto = s.on_digits.get(digits)
            if goto is None:
                self._retry(v, "no_match", s.on_no_match, shown)
                return
            self._go(goto, "digits", shown)
        else:
            self._exit(s.next, "digits", shown)

    def _retry(self, v: _Visit, why: str, exit_to: str | None, detail: str = "") -> None:
        """No input or no match: replay the prompt while reprompts last, then take the exit."""
        if v.attempts < v.state.reprompts:
            v.attempts += 1
            v.digits = ""
            self._report(v.name, v.name, "reprompt", f"{why} {v.attempts}/{v.state.reprompts}")
            self._prompt(v)
            return
        self._exit(exit_to if exit_to is not None else v.state.next, why, detail)

    def _said(self, v: _Visit, said: Said) -> None:
        s = v.state
        if said.who == "bot":
            v.bot_text = (v.bot_text + said.text)[-BOT_TEXT_WINDOW:]
            rules, text = s.on_bot_said, v.bot_text
        else:
            if self._redacting:
                return  # the caller may be reading out a secret: no rule may act on (or log) it
            rules, text = s.on_caller_said, said.text
        for rule in rules:
            if (said.final or rule.partial) and re.search(rule.match, text):
                self._go(rule.goto, f"{said.who}_said", text[-120:])
                return
