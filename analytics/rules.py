"""Categories and QA scorecards: a tenant's rules, declared in TOML, evaluated on a call's analysis.

The rule kinds follow AWS Transcribe Call Analytics' (keyword, sentiment, interruption, non-talk time,
each with an absolute or relative time window and negation), plus what only a callbot knows: the call
flow's states, a transfer, the hang-up cause. A category holds when all its rules hold (`match = "any"`:
one of them); `all`/`any` rules nest. A scorecard weighs rules or categories into a score per call.

    [[categories]]
    name = "disclosure"
    [[categories.rules]]
    kind = "phrase"              # phrase | sentiment | interruptions | non_talk | flow_state |
    leg = "bot"                  #   transferred | hangup | all | any
    phrases = ["this call may be recorded"]
    first_s = 15                 # window: first_s | last_s | from_s+to_s | first_pct | last_pct

    [[scorecards]]
    name = "qa"
    [[scorecards.items]]
    name = "disclosure given"
    weight = 2
    category = "disclosure"      # or: rule = { kind = "transferred", not = true }

docs/analytics.md is the reference. The file is decoded and validated by msgspec; every mistake is a
line `file: $.categories[0].rules[1].first_s: message` (`check_rules_file` returns them all, for
`callbot`; `load_rules` raises RulesError with them). A window's times are seconds from the recording's
start; a phrase is in a window when its first word starts there.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal, Sequence, Union

import msgspec

from callbot.analytics.metrics import gaps, interruptions, leg_spans, union
from callbot.analytics.result import CallAnalysis, CategoryHit, Score, ScoreItem, Word
from callbot.analytics.transcript import flow_transitions

LegOrAny = Literal["caller", "bot", "any"]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]


class RulesError(Exception):
    """A rules file that cannot be used; `lines` are the problems, one per line."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class _Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="kind"):
    negate: bool = msgspec.field(default=False, name="not")  # the rule holds when its condition does not


class _Windowed(_Rule, frozen=True, kw_only=True):
    first_s: Seconds | None = None    # within the first N s of the call
    last_s: Seconds | None = None     # within the last N s
    from_s: Seconds | None = None     # between from_s and to_s
    to_s: Seconds | None = None
    first_pct: Percent | None = None  # within the first N % of the call
    last_pct: Percent | None = None   # within the last N %


class PhraseRule(_Windowed, frozen=True, kw_only=True, tag="phrase"):
    """A leg said one of `phrases` (words in a row, case and punctuation ignored) or matched `regex`
    (Python syntax, on the leg's words joined by spaces, lower case)."""
    leg: LegOrAny = "any"
    phrases: list[Annotated[str, msgspec.Meta(min_length=1)]] = []
    regex: str | None = None


class SentimentRule(_Windowed, frozen=True, kw_only=True, tag="sentiment"):
    """The mean sentiment of a leg's turns (starting in the window) lies in [min, max]."""
    leg: LegOrAny = "caller"
    min: Annotated[float, msgspec.Meta(ge=-1, le=1)] = -1.0
    max: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 1.0


class InterruptionsRule(_Windowed, frozen=True, kw_only=True, tag="interruptions"):
    """A leg (`by`) interrupted the other at least `min` (and at most `max`) times in the window."""
    by: LegOrAny = "any"
    min: Annotated[int, msgspec.Meta(ge=0)] = 1
    max: Annotated[int, msgspec.Meta(ge=0)] | None = None


class NonTalkRule(_Windowed, frozen=True, kw_only=True, tag="non_talk"):
    """Both legs were silent for longer than `longer_than_s` at a stretch, starting in the window."""
    longer_than_s: Seconds = 3.0


class FlowStateRule(_Rule, frozen=True, kw_only=True, tag="flow_state"):
    """The call flow entered `state` (its path in the record, or a FlowTransition event)."""
    state: Name
    flow: str | None = None


class TransferredRule(_Rule, frozen=True, kw_only=True, tag="transferred"):
    """The call was transferred (the record's transfer, or a flow transition for a transfer)."""


class HangupRule(_Rule, frozen=True, kw_only=True, tag="hangup"):
    """The call ended with one of these causes (the record's hangup_cause: remote, local, timeout,
    max_duration, rtp_timeout, transfer, rejected, ...)."""
    cause: list[Name]


class AllRule(_Rule, frozen=True, kw_only=True, tag="all"):
    rules: list["Rule"]


class AnyRule(_Rule, frozen=True, kw_only=True, tag="any"):
    rules: list["Rule"]


Rule = Union[PhraseRule, SentimentRule, InterruptionsRule, NonTalkRule, FlowStateRule, TransferredRule, HangupRule,
             AllRule, AnyRule]


KINDS = ("phrase", "sentiment", "interruptions", "non_talk", "flow_state", "transferred", "hangup", "all", "any")


class Category(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Name
    rules: Annotated[list[Rule], msgspec.Meta(min_length=1, max_length=20)]
    match: Literal["all", "any"] = "all"


class ScorecardItem(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Name
    weight: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    category: str | None = None  # passes when this category matched
    rule: Rule | None = None     # or: passes when this rule holds


class Scorecard(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Name
    items: Annotated[list[ScorecardItem], msgspec.Meta(min_length=1)]


class RulesFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    categories: list[Category] = []
    scorecards: list[Scorecard] = []


# ---- reading and checking ---------------------------------------------------------------------------------

_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def parse_rules(text: str | bytes, label: str = "rules") -> RulesFile:
    """Decode and check a rules file's text; RulesError with every problem as `label: $.path: message`."""
    try:
        rules = msgspec.toml.decode(text, type=RulesFile)
    except msgspec.ValidationError as err:
        m = _AT_PATH.match(str(err))
        assert m is not None
        msg, path = m.group("msg"), m.group("path")
        if path and path.endswith(".kind") and msg.startswith("Invalid value"):
            msg += f", expected one of {', '.join(KINDS)}"
        raise RulesError([f"{label}: {path}: {msg}" if path else f"{label}: {msg}"]) from None
    except msgspec.DecodeError as err:
        raise RulesError([f"{label}: not valid TOML: {err}"]) from None
    problems = [f"{label}: {line}" for line in _check(rules)]
    if problems:
        raise RulesError(problems)
    return rules


def load_rules(path: str | os.PathLike) -> RulesFile:
    label = os.fspath(path)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as err:
        raise RulesError([f"{label}: cannot be read ({err.strerror or err})"]) from None
    return parse_rules(text, label)


def check_rules_file(path: str | os.PathLike) -> list[str]:
    """The problems of a rules file, one line each (`file: $.path: message`); [] when it is fine."""
    try:
        load_rules(path)
    except RulesError as err:
        return err.lines
    return []


def _check(rules: RulesFile) -> list[str]:
    out: list[str] = []
    names: set[str] = set()
    for i, cat in enumerate(rules.categories):
        if cat.name in names:
            out.append(f"$.categories[{i}].name: a second category named {cat.name!r}")
        names.add(cat.name)
        for j, rule in enumerate(cat.rules):
            out += _check_rule(rule, f"$.categories[{i}].rules[{j}]")
    for i, card in enumerate(rules.scorecards):
        for j, item in enumerate(card.items):
            where = f"$.scorecards[{i}].items[{j}]"
            if (item.category is None) == (item.rule is None):
                out.append(f"{where}: give either `category` or `rule`")
            elif item.category is not None and item.category not in names:
                out.append(f"{where}.category: no category named {item.category!r}")
            elif item.rule is not None:
                out += _check_rule(item.rule, f"{where}.rule")
    return out


def _check_rule(rule: Rule, where: str) -> list[str]:
    out: list[str] = []
    if isinstance(rule, _Windowed):
        given = [k for k in ("first_s", "last_s", "first_pct", "last_pct") if getattr(rule, k) is not None]
        if rule.from_s is not None or rule.to_s is not None:
            given.append("from_s/to_s")
            if rule.from_s is None or rule.to_s is None:
                out.append(f"{where}.{'to_s' if rule.to_s is None else 'from_s'}: from_s and to_s go together")
            elif rule.to_s <= rule.from_s:
                out.append(f"{where}.to_s: must be after from_s ({rule.from_s:g} s)")
        if len(given) > 1:
            out.append(f"{where}: one time window at most, got {', '.join(given)}")
    if isinstance(rule, PhraseRule):
        if not rule.phrases and rule.regex is None:
            out.append(f"{where}: give `phrases` or `regex`")
        if rule.regex is not None:
            try:
                re.compile(rule.regex)
            except re.error as err:
                out.append(f"{where}.regex: not a valid regular expression ({err})")
    if isinstance(rule, SentimentRule) and rule.min > rule.max:
        out.append(f"{where}.max: must be >= min ({rule.min:g})")
    if isinstance(rule, InterruptionsRule) and rule.max is not None and rule.max < rule.min:
        out.append(f"{where}.max: must be >= min ({rule.min})")
    if isinstance(rule, (AllRule, AnyRule)):
        if not rule.rules:
            out.append(f"{where}.rules: needs at least one rule")
        for k, sub in enumerate(rule.rules):
            out += _check_rule(sub, f"{where}.rules[{k}]")
    return out


# ---- evaluating -------------------------------------------------------------------------------------------


@dataclass
class CallFacts:
    """What the rules read besides the analysis: from the call's record and events."""
    flow_states: set[str] = field(default_factory=set)
    flow_states_by_flow: set[tuple[str, str]] = field(default_factory=set)
    transferred: bool = False
    hangup_cause: str | None = None


def call_facts(record: dict | None, events: Sequence[dict] = ()) -> CallFacts:
    record = record or {}
    facts = CallFacts()
    flow = record.get("flow") or {}
    name = flow.get("name") if isinstance(flow, dict) else None
    for state in (flow.get("path") or []) if isinstance(flow, dict) else []:
        if isinstance(state, str):
            facts.flow_states.add(state)
            facts.flow_states_by_flow.add((str(name), state))
    for t in flow_transitions(events):
        for state in (t.from_state, t.to_state):
            if state:
                facts.flow_states.add(state)
                facts.flow_states_by_flow.add((t.flow, state))
        if t.reason == "transfer":
            facts.transferred = True
    if any(e.get("event") == "TransferProgress" for e in events):  # the SIP side's REFER progress
        facts.transferred = True
    if record.get("transfer"):
        facts.transferred = True
    cause = record.get("hangup_cause")
    facts.hangup_cause = cause if isinstance(cause, str) else None
    if facts.hangup_cause == "transfer":
        facts.transferred = True
    return facts


def _window(rule: _Windowed, duration_s: float) -> tuple[float, float]:
    """The rule's window in ms: (start, end)."""
    d = duration_s * 1000.0
    if rule.first_s is not None:
        return 0.0, rule.first_s * 1000.0
    if rule.last_s is not None:
        return max(0.0, d - rule.last_s * 1000.0), d
    if rule.from_s is not None and rule.to_s is not None:
        return rule.from_s * 1000.0, rule.to_s * 1000.0
    if rule.first_pct is not None:
        return 0.0, d * rule.first_pct / 100.0
    if rule.last_pct is not None:
        return d * (1 - rule.last_pct / 100.0), d
    return 0.0, float("inf")


def _legs(leg: str) -> tuple[str, ...]:
    return ("caller", "bot") if leg == "any" else (leg,)




def _norm(text: str) -> str:
    return " ".join(w.strip(".,!?;:").lower() for w in text.split() if w.strip(".,!?;:"))


def _phrase_hit(rule: PhraseRule, words: Sequence[Word], lo: float, hi: float) -> str | None:
    for leg in _legs(rule.leg):
        mine = sorted((w for w in words if w.leg == leg), key=lambda w: w.start_ms)
        tokens = [_norm(w.text) for w in mine]
        # the joined text and where each word begins in it
        starts, pos = [], 0
        for t in tokens:
            starts.append(pos)
            pos += len(t) + 1
        text = " ".join(tokens)
        patterns = [re.compile(r"(?<!\S)" + re.escape(_norm(p)) + r"(?!\S)") for p in rule.phrases]
        if rule.regex is not None:
            patterns.append(re.compile(rule.regex, re.I))
        for pat in patterns:
            for m in pat.finditer(text):
                k = max(0, next((i for i, s in enumerate(starts) if s > m.start()), len(starts)) - 1)
                if k < len(mine) and lo <= mine[k].start_ms <= hi:
                    return f"{leg} said {m.group(0)!r} at {mine[k].start_ms / 1000:.1f} s"
    return None


def evaluate_rule(rule: Rule, analysis: CallAnalysis, facts: CallFacts) -> tuple[bool, str]:
    """(whether the rule holds, what was seen): negation applied."""
    held, seen = _condition(rule, analysis, facts)
    if rule.negate:
        return (not held), f"not ({seen})"
    return held, seen


def _condition(rule: Rule, a: CallAnalysis, facts: CallFacts) -> tuple[bool, str]:
    duration_s = a.metrics.duration_ms / 1000.0
    if isinstance(rule, PhraseRule):
        lo, hi = _window(rule, duration_s)
        hit = _phrase_hit(rule, a.words, lo, hi)
        return (hit is not None), hit or f"no phrase of {rule.leg} in {lo / 1000:g}-{min(hi / 1000, duration_s):g} s"
    if isinstance(rule, SentimentRule):
        lo, hi = _window(rule, duration_s)
        scores = [t.sentiment for t in a.turns
                  if t.leg in _legs(rule.leg) and t.sentiment is not None and lo <= t.start_ms <= hi]
        if not scores:
            return False, f"no sentiment of {rule.leg} in the window"
        mean = sum(scores) / len(scores)
        return rule.min <= mean <= rule.max, f"{rule.leg} sentiment {mean:.2f}"
    if isinstance(rule, InterruptionsRule):
        lo, hi = _window(rule, duration_s)
        caller, bot = leg_spans(a.segments, "caller"), leg_spans(a.segments, "bot")
        times = []
        if rule.by in ("caller", "any"):
            times += [t for t, _ in interruptions(caller, bot)]
        if rule.by in ("bot", "any"):
            times += [t for t, _ in interruptions(bot, caller)]
        n = sum(1 for t in times if lo <= t <= hi)
        ok = n >= rule.min and (rule.max is None or n <= rule.max)
        return ok, f"{n} interruption(s) by {rule.by}"
    if isinstance(rule, NonTalkRule):
        lo, hi = _window(rule, duration_s)
        quiet = gaps(union([*leg_spans(a.segments, "caller"), *leg_spans(a.segments, "bot")]), 0.0,
                     a.metrics.duration_ms)
        long = [(s, e) for s, e in quiet if e - s > rule.longer_than_s * 1000.0 and lo <= s <= hi]
        if long:
            s, e = long[0]
            return True, f"silence of {(e - s) / 1000:.1f} s at {s / 1000:.1f} s"
        return False, f"no silence over {rule.longer_than_s:g} s"
    if isinstance(rule, FlowStateRule):
        ok = ((rule.flow, rule.state) in facts.flow_states_by_flow if rule.flow is not None
              else rule.state in facts.flow_states)
        return ok, f"flow state {rule.state!r} {'reached' if ok else 'not reached'}"
    if isinstance(rule, TransferredRule):
        return facts.transferred, "transferred" if facts.transferred else "not transferred"
    if isinstance(rule, HangupRule):
        ok = facts.hangup_cause in rule.cause
        return ok, f"hang-up cause {facts.hangup_cause!r}"
    if isinstance(rule, (AllRule, AnyRule)):
        results = [evaluate_rule(r, a, facts) for r in rule.rules]
        ok = all(h for h, _ in results) if isinstance(rule, AllRule) else any(h for h, _ in results)
        return ok, "; ".join(s for _, s in results)
    raise TypeError(f"unknown rule {type(rule).__name__}")


def evaluate(rules: RulesFile, analysis: CallAnalysis, facts: CallFacts) -> tuple[list[CategoryHit], list[Score]]:
    """The categories (matched or not, with evidence) and scores of one call."""
    hits: list[CategoryHit] = []
    for cat in rules.categories:
        results = [evaluate_rule(r, analysis, facts) for r in cat.rules]
        ok = all(h for h, _ in results) if cat.match == "all" else any(h for h, _ in results)
        hits.append(CategoryHit(category=cat.name, matched=ok, evidence=[s for _, s in results]))
    by_name = {h.category: h.matched for h in hits}
    scores: list[Score] = []
    for card in rules.scorecards:
        items = []
        for item in card.items:
            if item.category is not None:
                passed = by_name.get(item.category, False)
            else:
                assert item.rule is not None
                passed = evaluate_rule(item.rule, analysis, facts)[0]
            items.append(ScoreItem(rule=item.name, weight=item.weight, passed=passed))
        top = sum(i.weight for i in items)
        got = sum(i.weight for i in items if i.passed)
        scores.append(Score(scorecard=card.name, score=round(got, 4), max_score=round(top, 4), items=items))
    return hits, scores
