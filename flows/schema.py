"""The flow file: TOML decoded into frozen msgspec Structs, then checked as a whole graph.

Why msgspec and a second pass: the decoder refuses unknown fields and wrong types with a path
(`$.states.menu.gather.max_digits`), the same way the server's config does, so a typo is an error and
never a silently ignored rule. What a type cannot say (a `goto` naming a state that does not exist, a
regex that does not compile, a clip that is not there, a state with no way out) is checked by
`check_flow`, and worded the same way: `support.toml: $.states.menu.on_digits.3: unknown state "biling"`.
Every error is one `FlowError` line; `callbot flows check FILE` prints it and exits 2.

The shape is the contract of issue 12 (start, states, play/say, gather, reprompts, on_digits,
on_no_input, on_no_match, persona, webhook, on_caller_said, on_bot_said, on_silence_s, max_s, transfer,
hangup), extended with what a production flow needs and the issue left open: what to do when a
webhook fails (`on_failure`), when a transfer fails (`on_transfer_failed`), attended transfer
(`transfer_mode`, `announce`, `consult_timeout_s`, `hold_music`), when `max_s` passes
(`on_max_s`), a logic split on variables (`branch`), PCI gathering (`gather.sensitive`), an explicit
`mute_caller`, secrets for webhook headers from the environment (`headers_env`), and business hours
(`[hours]`: flows/hours.py).
"""
from __future__ import annotations

import os
import pathlib
import re
import string
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from callbot.flows.hours import HoursError, check_date, spans, zone

DTMF_KEYS = "0123456789*#ABCD"
StateName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
Seconds = Annotated[float, Meta(gt=0, le=86400)]
VariableName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class FlowError(ValueError):
    """A flow file problem, worded as the one line the user gets (`file: $.path: what is wrong`)."""


class _Flow(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Gather(_Flow):
    """Collect DTMF digits (RFC 4733 or SIP INFO). Ends at `max_digits`, at `finish_key` (not kept), or
    when `interdigit_timeout_s` passes after a digit; no digit within `timeout_s` of the prompt's end is a
    no-input. `sensitive`: the digits are a secret (a card number): masked as `*` in the log, the events
    file and the record, kept only in the call's variables for webhooks; the caller is muted to the model
    and the recognizer while gathering."""

    max_digits: Annotated[int, Meta(ge=1, le=64)] = 1
    timeout_s: Seconds = 5.0
    interdigit_timeout_s: Seconds = 3.0
    finish_key: Literal["#", "*"] | None = "#"
    variable: VariableName = "digits"  # the gathered digits go into {digits} (or this name)
    barge_in: bool = True  # a key pressed during the prompt cuts it (False: the prompt plays out)
    sensitive: bool = False


class Webhook(_Flow):
    """On entry, POST the call's variables (JSON) to `url`; a 2xx JSON object reply sets variables
    (`variables` and any top-level string/number) and may name the next state (`next`). A timeout, a
    connection error, a non-2xx answer or a reply that is not such an object is a failure: retried
    `retries` times, then `on_failure` (else the state goes on without the reply)."""

    url: Annotated[str, Meta(pattern=r"^https?://")]
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 2.0
    retries: Annotated[int, Meta(ge=0, le=5)] = 1
    headers: dict[str, str] = {}
    headers_env: dict[str, str] = {}  # header -> environment variable holding its value (a token)
    on_failure: StateName | None = None


class SaidRule(_Flow):
    """Go to `goto` when what was said matches `match` (a Python regex; `(?i)` for any case)."""

    match: Annotated[str, Meta(min_length=1, max_length=1000)]
    goto: StateName
    partial: bool = False  # also on the recognizer's partial hypotheses (faster, less sure)


class SilenceRule(_Flow):
    """Go to `goto` when neither the caller nor the bot has spoken for `after` seconds."""

    after: Seconds
    goto: StateName


class BranchRule(_Flow):
    """A logic split on entry: the first rule whose variable matches the regex goes to its state."""

    var: VariableName
    match: Annotated[str, Meta(min_length=1, max_length=1000)]
    goto: StateName


class State(_Flow):
    play: str | None = None  # a WAV clip (relative to the flow file)
    say: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None  # text through the configured TTS
    persona: Annotated[str, Meta(min_length=1, max_length=4000)] | None = None  # the model converses with this
    inform: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None  # spoken to the model only (TTS)
    webhook: Webhook | None = None
    branch: tuple[BranchRule, ...] = ()
    gather: Gather | None = None
    reprompts: Annotated[int, Meta(ge=0, le=10)] = 2
    on_digits: dict[str, StateName] = {}
    on_no_input: StateName | None = None
    on_no_match: StateName | None = None
    on_caller_said: tuple[SaidRule, ...] = ()
    on_bot_said: tuple[SaidRule, ...] = ()
    on_silence_s: SilenceRule | None = None
    max_s: Seconds | None = None
    on_max_s: StateName | None = None  # where max_s leads (default: `next`, else hang up)
    transfer: Annotated[str, Meta(pattern=r"^(sips?|tel):")] | None = None  # REFER the caller to this URI
    # blind: REFER at once; attended: call the target first (a consultation leg), then REFER with Replaces
    transfer_mode: Literal["blind", "attended"] = "blind"
    # attended: said to the target (TTS) once it answers, before the caller is put through
    announce: Annotated[str, Meta(min_length=1, max_length=2000)] | None = None
    consult_timeout_s: Annotated[float, Meta(gt=0, le=600)] | None = None  # attended: ringing at most (default: dial_timeout_s)
    hold_music: str | None = None  # attended: a WAV clip played to the caller, again and again, while the target is called
    on_transfer_failed: StateName | None = None
    hangup: bool = False
    mute_caller: bool | None = None  # default: muted in states without a persona, heard in persona states
    next: StateName | None = None


class Hours(_Flow):
    """Business hours (flows/hours.py): open spans per weekday in `timezone`, dates closed all day; the
    runner gives every state the variables `open`, `weekday`, `local_time`, `local_date`."""

    timezone: str = "UTC"
    open: dict[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], str] = {}
    closed_dates: tuple[str, ...] = ()


class Flow(_Flow):
    start: StateName
    states: dict[StateName, State]
    variables: dict[VariableName, str] = {}  # defaults; the route's and the call's variables override them
    language: Annotated[str, Meta(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")] | None = None
    hours: Hours | None = None


# msgspec words errors as "<message> - at `$.path`"; users get "$.path: <message>"
_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<key>key` in `)?(?P<path>[^`]*)`)?$", re.S)


def _reword(err: msgspec.MsgspecError) -> str:
    """...and a table's key it refuses ("at `key` in `$.hours.open`") as "$.hours.open: <message> (a key)"."""
    m = _AT_PATH.match(str(err))
    assert m is not None  # the pattern matches any string
    msg, path = m.group("msg"), m.group("path")
    if m.group("key"):
        msg += " (as a key)"
    return f"{path}: {msg}" if path else msg


def parse_flow(text: str | bytes, *, base_dir: str | os.PathLike = ".") -> Flow:
    """Decode and check a flow; clip paths are resolved against `base_dir` (the flow file's folder)."""
    try:
        flow = msgspec.toml.decode(text, type=Flow)
    except msgspec.ValidationError as err:
        raise FlowError(_state_path(text) or _reword(err)) from None
    except msgspec.DecodeError as err:
        raise FlowError(f"not valid TOML: {err}") from None
    base = pathlib.Path(base_dir)
    check_flow(flow, base)
    return _resolve_clips(flow, base)


def _state_path(text: str | bytes) -> str | None:
    """msgspec says `$.states[...]` for a key of a table; the user needs the state's name: decode again
    untyped and validate state by state."""
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError:
        return None
    states = raw.get("states") if isinstance(raw, dict) else None
    if not isinstance(states, dict):
        return None
    for name, value in states.items():
        try:
            msgspec.convert(value, State)
        except msgspec.ValidationError as err:
            where = _reword(err)
            if where.startswith("$"):
                return f"$.states.{name}{where[1:]}"
            return f"$.states.{name}: {where}"
    return None


def load_flow(path: str | os.PathLike) -> Flow:
    """Read and check a flow file; every problem is one FlowError naming the file and the place."""
    p = pathlib.Path(path)
    try:
        text = p.read_bytes()
    except OSError as err:
        raise FlowError(f"{os.fspath(p)}: cannot read the flow file ({err.strerror})") from None
    return parse_flow_file(text, p)


def parse_flow_file(text: str | bytes, path: str | os.PathLike) -> Flow:
    """Check `text` as the content of the flow file at `path` (its clips found beside it), errors worded
    as `load_flow` words them: what `callbot flows check` prints, and the panel's editor shows."""
    p = pathlib.Path(path)
    try:
        return parse_flow(text, base_dir=p.parent)
    except FlowError as err:
        raise FlowError(f"{os.fspath(p)}: {err}") from None


def _resolve_clips(flow: Flow, base: pathlib.Path) -> Flow:
    states = {
        name: msgspec.structs.replace(s, play=os.fspath(base / s.play) if s.play else None,
                                      hold_music=os.fspath(base / s.hold_music) if s.hold_music else None)
        for name, s in flow.states.items()
    }
    return msgspec.structs.replace(flow, states=states)


def _check_regex(where: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise FlowError(f"{where}: not a valid regular expression ({err})") from None


def _check_template(where: str, text: str) -> None:
    """`{name}` fills a variable; `{{` and `}}` are literal braces; anything else is an error now, not a
    KeyError mid-call."""
    try:
        for _, field, spec, conv in string.Formatter().parse(text):
            if field is None:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field) or spec or conv:
                raise FlowError(f"{where}: {{{field}}} is not a variable name (write {{{{ for a literal brace)")
    except ValueError as err:
        raise FlowError(f"{where}: {err} (write {{{{ and }}}} for literal braces)") from None


def _fields(text: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(text) if f}


def _check_secrets(flow: Flow) -> None:
    """A sensitive gather's variable goes only to a webhook: a text that shows it would speak a card
    number to the caller or the model, or leave it in a log or the speech cache."""
    secrets = {s.gather.variable for s in flow.states.values() if s.gather is not None and s.gather.sensitive}
    for name, s in flow.states.items():
        for field in ("say", "persona", "inform", "announce"):
            text = getattr(s, field, None)
            shown = _fields(text) & secrets if text else set()
            if shown:
                raise FlowError(f"$.states.{name}.{field}: {{{sorted(shown)[0]}}} is gathered as sensitive: "
                                "it goes only to a webhook, never into a text")


def _waits(s: State) -> bool:
    """Whether a state waits for something (a prompt, digits, a reply, the caller, a timer) before it can
    move on: a cycle of states that do not is a loop that never yields."""
    return bool(s.play or s.say or s.persona or s.gather or s.webhook or s.transfer or s.hangup
                or s.on_caller_said or s.on_bot_said or s.on_silence_s or s.max_s)


def _check_loops(flow: Flow) -> None:
    instant = {n: s for n, s in flow.states.items() if not _waits(s)}
    edges = {n: {t for t in (s.next, *(r.goto for r in s.branch)) if t in instant} for n, s in instant.items()}
    done: set[str] = set()
    for start in instant:
        path: list[str] = []
        stack = [(start, iter(sorted(edges[start])))]
        on_path = {start}
        path.append(start)
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                on_path.discard(node)
                path.pop()
                done.add(node)
            elif nxt in on_path:
                loop = path[path.index(nxt):] + [nxt]
                raise FlowError(f"$.states.{nxt}: a loop that waits for nothing: {' -> '.join(loop)}")
            elif nxt not in done:
                stack.append((nxt, iter(sorted(edges[nxt]))))
                on_path.add(nxt)
                path.append(nxt)


def _check_hours(hours: Hours) -> None:
    try:
        zone(hours.timezone)
    except HoursError as err:
        raise FlowError(f"$.hours.timezone: {err}") from None
    for day, text in hours.open.items():
        try:
            spans(text)
        except HoursError as err:
            raise FlowError(f"$.hours.open.{day}: {err}") from None
    for i, date in enumerate(hours.closed_dates):
        try:
            check_date(date)
        except HoursError as err:
            raise FlowError(f"$.hours.closed_dates[{i}]: {err}") from None


def check_flow(flow: Flow, base_dir: pathlib.Path) -> None:
    """What the types cannot say: every target exists, regexes compile, clips exist, no dead ends, no
    loop that never waits, no secret shown in a text."""
    names = set(flow.states)

    def target(where: str, name: str | None) -> None:
        if name is not None and name not in names:
            known = ", ".join(sorted(names))
            raise FlowError(f'{where}: unknown state "{name}", expected one of {known}')

    target("$.start", flow.start)
    if flow.hours is not None:
        _check_hours(flow.hours)
    for name, s in flow.states.items():
        at = f"$.states.{name}"
        if s.play and s.say:
            raise FlowError(f"{at}: play and say both set: a state has one prompt")
        for field in ("play", "hold_music"):
            name_of_clip = getattr(s, field)
            if name_of_clip:
                clip = base_dir / name_of_clip
                if not clip.is_file():
                    raise FlowError(f"{at}.{field}: clip {os.fspath(clip)!r} does not exist")
                if not name_of_clip.lower().endswith(".wav"):
                    raise FlowError(f"{at}.{field}: {name_of_clip!r} is not a .wav file")
        for field in ("say", "persona", "inform", "announce"):
            text = getattr(s, field)
            if text:
                _check_template(f"{at}.{field}", text)
        target(f"{at}.next", s.next)
        target(f"{at}.on_no_input", s.on_no_input)
        target(f"{at}.on_no_match", s.on_no_match)
        target(f"{at}.on_max_s", s.on_max_s)
        target(f"{at}.on_transfer_failed", s.on_transfer_failed)
        if s.webhook:
            target(f"{at}.webhook.on_failure", s.webhook.on_failure)
            for header in (*s.webhook.headers, *s.webhook.headers_env):
                if not re.fullmatch(r"[A-Za-z0-9-]+", header):
                    raise FlowError(f"{at}.webhook: {header!r} is not a header name")
        if s.on_silence_s:
            target(f"{at}.on_silence_s.goto", s.on_silence_s.goto)
        for field in ("on_caller_said", "on_bot_said", "branch"):
            for i, rule in enumerate(getattr(s, field)):
                _check_regex(f"{at}.{field}[{i}].match", rule.match)
                target(f"{at}.{field}[{i}].goto", rule.goto)
        if s.on_digits and s.gather is None:
            raise FlowError(f"{at}.on_digits: needs a gather in the same state")
        for digits, goto in s.on_digits.items():
            where = f"{at}.on_digits.{digits}"
            if not digits or any(c not in DTMF_KEYS for c in digits):
                raise FlowError(f"{where}: {digits!r} is not DTMF digits (0-9, *, #, A-D)")
            if s.gather and len(digits) > s.gather.max_digits:
                raise FlowError(f"{where}: {len(digits)} digits, more than gather.max_digits = {s.gather.max_digits}")
            if s.gather and s.gather.finish_key and s.gather.finish_key in digits:
                raise FlowError(f"{where}: holds the finish key {s.gather.finish_key!r}, which ends the gathering")
            target(where, goto)
        if s.gather is None and (s.on_no_input or s.on_no_match):
            raise FlowError(f"{at}: on_no_input / on_no_match need a gather")
        for field in ("announce", "consult_timeout_s", "hold_music"):
            if getattr(s, field) is not None and s.transfer_mode != "attended":
                raise FlowError(f'{at}.{field}: only for an attended transfer (transfer_mode = "attended")')
        if s.transfer_mode != "blind" and not s.transfer:
            raise FlowError(f"{at}.transfer_mode: no transfer in this state")
        if s.transfer_mode == "attended" and s.transfer and not s.transfer.startswith("sip"):
            raise FlowError(f"{at}.transfer: an attended transfer calls the target: it needs a sip: or sips: URI")
        if s.transfer and s.hangup:
            raise FlowError(f"{at}: transfer and hangup both set: a transfer ends the call when it succeeds")
        ends = s.hangup or s.transfer or s.persona or s.gather or s.next or (
            s.webhook and s.webhook.on_failure) or s.on_caller_said or s.on_silence_s or s.max_s
        if not ends:
            raise FlowError(f"{at}: a dead end: give it next, gather, persona, transfer or hangup = true"
                            + (" (next is where it goes when no branch matches)" if s.branch else ""))
        if s.gather and not (s.on_digits or s.next):
            raise FlowError(f"{at}.gather: where do the digits lead? give on_digits or next")
    _check_secrets(flow)
    _check_loops(flow)
