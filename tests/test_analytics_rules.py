"""Categories and scorecards (analytics/rules.py): the rules file's errors as `file: $.path: message` lines,
each rule kind with its windows and negation on a hand-built analysis and call record, nesting, and the
shipped example (examples/support/rules.toml) loading."""
from __future__ import annotations

import pathlib

import pytest

from callbot.analytics.metrics import compute_metrics
from callbot.analytics.result import CallAnalysis, Segment, Turn, Word
from callbot.analytics.rules import (RulesError, call_facts, check_rules_file, evaluate, evaluate_rule, load_rules,
                                     parse_rules)

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "support" / "rules.toml"


def w(leg, text, start):
    return [Word(leg=leg, start_ms=start + i * 300.0, end_ms=start + i * 300.0 + 250, text=t)
            for i, t in enumerate(text.split())]


def analysis(disclosure_at_ms=1000.0):
    words = (w("bot", "Hello. This call may be recorded, for quality.", disclosure_at_ms)
             + w("caller", "I am angry about my bill", 8000) + w("bot", "I am sorry to hear that", 11000))
    segs = [Segment(leg="bot", start_ms=disclosure_at_ms, end_ms=disclosure_at_ms + 2500),
            Segment(leg="caller", start_ms=8000, end_ms=10000), Segment(leg="bot", start_ms=9500, end_ms=12500),
            Segment(leg="caller", start_ms=12000, end_ms=13000), Segment(leg="bot", start_ms=20000, end_ms=21000)]
    turns = [Turn(leg="caller", start_ms=8000, end_ms=9800, text="i am angry about my bill", sentiment=-0.6),
             Turn(leg="caller", start_ms=25000, end_ms=26000, text="thanks", sentiment=0.4)]
    return CallAnalysis(call_id="c", words=words, segments=segs, turns=turns,
                        metrics=compute_metrics(segs, 30000.0, words))


RECORD = {"flow": {"name": "support", "path": ["greet", "menu", "lookup"]}, "hangup_cause": "remote",
          "transfer": None}


def rule(toml_rule: str):
    return parse_rules(f"[[categories]]\nname = 'x'\n[[categories.rules]]\n{toml_rule}\n").categories[0].rules[0]


def holds(toml_rule: str, a=None, record=RECORD, events=()) -> bool:
    return evaluate_rule(rule(toml_rule), a or analysis(), call_facts(record, events))[0]


def test_phrase_said_in_an_absolute_window():
    assert holds("kind = 'phrase'\nleg = 'bot'\nphrases = ['this call may be recorded']\nfirst_s = 15")
    assert not holds("kind = 'phrase'\nleg = 'bot'\nphrases = ['this call may be recorded']\nfirst_s = 15",
                     analysis(disclosure_at_ms=16000))
    assert holds("kind = 'phrase'\nleg = 'bot'\nphrases = ['this call may be recorded']\nfirst_s = 15\nnot = true",
                 analysis(disclosure_at_ms=16000))
    assert not holds("kind = 'phrase'\nleg = 'caller'\nphrases = ['this call may be recorded']")  # the other leg
    assert holds("kind = 'phrase'\nleg = 'any'\nphrases = ['SORRY to hear']\nlast_s = 20")
    assert not holds("kind = 'phrase'\nleg = 'any'\nphrases = ['sorry to hear']\nfrom_s = 0\nto_s = 10")
    assert not holds("kind = 'phrase'\nphrases = ['call may be record']")  # whole words only


def test_phrase_by_regex_and_relative_windows():
    assert holds("kind = 'phrase'\nleg = 'caller'\nregex = 'angry|furious'\nfirst_pct = 30")  # 8 s of 30 s
    assert not holds("kind = 'phrase'\nleg = 'caller'\nregex = 'angry|furious'\nfirst_pct = 20")
    assert holds("kind = 'phrase'\nleg = 'bot'\nregex = 'sorry'\nlast_pct = 70")


def test_sentiment_range_per_leg_and_window():
    assert holds("kind = 'sentiment'\nleg = 'caller'\nmax = -0.5\nfirst_s = 20")
    assert not holds("kind = 'sentiment'\nleg = 'caller'\nmax = -0.5")  # the whole call: mean -0.1
    assert holds("kind = 'sentiment'\nleg = 'caller'\nmin = 0.0\nlast_s = 10")
    assert not holds("kind = 'sentiment'\nleg = 'bot'\nmin = -1")  # the bot has no scored turn


def test_interruptions_and_non_talk():
    # the bot started at 9.5 inside the caller's 8-10; the caller at 12.0 inside the bot's 9.5-12.5
    assert holds("kind = 'interruptions'\nby = 'any'\nmin = 2")
    assert holds("kind = 'interruptions'\nby = 'bot'\nmin = 1\nmax = 1")
    assert not holds("kind = 'interruptions'\nby = 'caller'\nmin = 1\nfirst_s = 10")
    # silences: 0-1, 3.5-8, 13-20, 21-30
    assert holds("kind = 'non_talk'\nlonger_than_s = 6.5")
    assert not holds("kind = 'non_talk'\nlonger_than_s = 9.5")
    assert not holds("kind = 'non_talk'\nlonger_than_s = 6.5\nfirst_s = 10")


def test_flow_transfer_and_hangup_from_the_record_and_events():
    assert holds("kind = 'flow_state'\nstate = 'lookup'")
    assert holds("kind = 'flow_state'\nstate = 'lookup'\nflow = 'support'")
    assert not holds("kind = 'flow_state'\nstate = 'lookup'\nflow = 'sales'")
    assert not holds("kind = 'flow_state'\nstate = 'agent'")
    events = [{"event": "FlowTransition", "call_id": "c", "t_ms": 5000.0, "flow": "support", "from_state": "menu",
               "to_state": "agent", "reason": "transfer", "detail": "sip:queue@pbx"}]
    assert holds("kind = 'flow_state'\nstate = 'agent'", events=events)
    assert not holds("kind = 'transferred'")
    assert holds("kind = 'transferred'", events=events)
    assert holds("kind = 'transferred'", record={**RECORD, "transfer": {"target": "sip:agent@x"}})
    assert holds("kind = 'hangup'\ncause = ['remote', 'timeout']")
    assert not holds("kind = 'hangup'\ncause = ['local']")
    assert not holds("kind = 'hangup'\ncause = ['local']", record={})


def test_all_any_and_negation_nest():
    assert holds("kind = 'any'\nrules = [{kind = 'transferred'}, {kind = 'hangup', cause = ['remote']}]")
    assert not holds("kind = 'all'\nrules = [{kind = 'transferred'}, {kind = 'hangup', cause = ['remote']}]")
    assert holds("kind = 'all'\nrules = [{kind = 'transferred', not = true}, {kind = 'hangup', cause = ['remote']}]")
    assert not holds("kind = 'any'\nnot = true\nrules = [{kind = 'flow_state', state = 'menu'}]")


def test_categories_and_a_weighted_scorecard():
    rules = parse_rules("""
[[categories]]
name = "disclosure"
[[categories.rules]]
kind = "phrase"
leg = "bot"
phrases = ["this call may be recorded"]
first_s = 15

[[categories]]
name = "angry caller"
match = "any"
rules = [{kind = "sentiment", leg = "caller", max = -0.5}, {kind = "phrase", leg = "caller", phrases = ["angry"]}]

[[scorecards]]
name = "qa"
items = [{name = "disclosure", weight = 3, category = "disclosure"},
         {name = "no transfer", weight = 1, rule = {kind = "transferred", not = true}},
         {name = "reached lookup", weight = 2, rule = {kind = "flow_state", state = "nowhere"}}]
""")
    hits, scores = evaluate(rules, analysis(), call_facts(RECORD))
    assert [(h.category, h.matched) for h in hits] == [("disclosure", True), ("angry caller", True)]
    assert "bot said 'this call may be recorded' at 1.3 s" in hits[0].evidence
    assert len(scores) == 1 and (scores[0].score, scores[0].max_score) == (4.0, 6.0)
    assert [i.passed for i in scores[0].items] == [True, True, False]
    hits, scores = evaluate(rules, analysis(disclosure_at_ms=20000), call_facts(RECORD))
    assert hits[0].matched is False and scores[0].score == 1.0


@pytest.mark.parametrize("text, line", [
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\nphrases = ['x']\nfirst_s = 'soon'",
     "rules.toml: $.categories[0].rules[0].first_s: Expected `float | null`, got `str`"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\nphrases = ['x']\n"
     "[[categories.rules]]\nkind = 'non_talk'\nwithin_s = 3",
     "rules.toml: $.categories[0].rules[1]: Object contains unknown field `within_s`"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'keyword'",
     "rules.toml: $.categories[0].rules[0].kind: Invalid value 'keyword', expected one of phrase, sentiment, "
     "interruptions, non_talk, flow_state, transferred, hangup, all, any"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\nleg = 'agent'\nphrases = ['x']",
     "rules.toml: $.categories[0].rules[0].leg: Invalid enum value 'agent'"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\nphrases = ['x']\nfirst_s = 5\nlast_s = 5",
     "rules.toml: $.categories[0].rules[0]: one time window at most, got first_s, last_s"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\nphrases = ['x']\nfrom_s = 5",
     "rules.toml: $.categories[0].rules[0].to_s: from_s and to_s go together"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\nregex = '(unclosed'",
     "rules.toml: $.categories[0].rules[0].regex: not a valid regular expression (missing ), unterminated "
     "subpattern at position 0)"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'",
     "rules.toml: $.categories[0].rules[0]: give `phrases` or `regex`"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'sentiment'\nmin = 0.5\nmax = -0.5",
     "rules.toml: $.categories[0].rules[0].max: must be >= min (0.5)"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'sentiment'\nmin = -2",
     "rules.toml: $.categories[0].rules[0].min: Expected `float` >= -1.0"),
    ("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'all'\nrules = [{kind = 'hangup'}]",
     "rules.toml: $.categories[0].rules[0].rules[0]: Object missing required field `cause`"),
    ("[[categories]]\nname = 'a'\nrules = []", "rules.toml: $.categories[0].rules: Expected `array` of length >= 1"),
    ("[[scorecards]]\nname = 's'\nitems = [{name = 'i', category = 'nope'}]",
     "rules.toml: $.scorecards[0].items[0].category: no category named 'nope'"),
    ("[[scorecards]]\nname = 's'\nitems = [{name = 'i'}]", "rules.toml: $.scorecards[0].items[0]: give either "
     "`category` or `rule`"),
    ("[[scorecards]]\nname = 's'\nitems = [{name = 'i', weight = 0, rule = {kind = 'transferred'}}]",
     "rules.toml: $.scorecards[0].items[0].weight: Expected `float` > 0.0"),
    ("categories = [", None),
])
def test_a_bad_rules_file_is_one_line_per_problem_naming_the_place(tmp_path, text, line):
    path = tmp_path / "rules.toml"
    path.write_text(text)
    lines = check_rules_file(path)
    assert len(lines) == 1, lines
    if line is None:
        assert lines[0].startswith(f"{path}: not valid TOML")
    else:
        assert lines[0] == line.replace("rules.toml", str(path))
    with pytest.raises(RulesError):
        load_rules(path)


def test_two_problems_are_two_lines_and_a_missing_file_is_one(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'phrase'\n"
                    "[[categories]]\nname = 'a'\n[[categories.rules]]\nkind = 'transferred'\n")
    assert check_rules_file(path) == [f"{path}: $.categories[0].rules[0]: give `phrases` or `regex`",
                                      f"{path}: $.categories[1].name: a second category named 'a'"]
    assert check_rules_file(tmp_path / "none.toml") == [f"{tmp_path / 'none.toml'}: cannot be read "
                                                        "(No such file or directory)"]


def test_the_shipped_example_loads_and_evaluates():
    rules = load_rules(EXAMPLE)
    assert rules.categories and rules.scorecards
    hits, scores = evaluate(rules, analysis(), call_facts(RECORD))
    assert {h.category for h in hits} == {c.name for c in rules.categories}
    assert all(0 <= s.score <= s.max_score for s in scores)
