"""`callbot calls analyze`: past calls analysed again, on demand, into the call store.

Why: serve analyses each call once, at hang-up (app/analysis_host.py), but a call may have missed it (the
pool was full, serve stopped first, the store was down) and rules change: a new category must be
answerable over last month's calls. Two ways:

- whole (the default): the call's files (its WAV, sidecar and events file, the paths the store keeps)
  analysed again as at hang-up, with the rules of its tenant (or `--rules`), written to the store and
  to `<name>.analysis.json` beside the recording;
- rules only (`--rules-only`): the stored analysis (its words, turns, segments and metrics) with the
  categories and scorecards evaluated again, and the call's record and stored events for the facts
  (flow states, transfer, hang-up cause): no audio is read, milliseconds a call.

Runs in this process, one call after the other: the user's command, not a live server's.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable

import msgspec
from sqlalchemy import select

from callbot.analytics.analyze import Tools, analyze_call
from callbot.analytics.result import CallAnalysis
from callbot.analytics.rules import RulesFile, call_facts, evaluate, load_rules
from callbot.app.analysis_host import analysis_options, analysis_path, post_call_transcriber, write_analysis_file
from callbot.store.call_store import CallStore
from callbot.store.schema import analysis_runs, calls, events


class ReanalysisError(Exception):
    """What stops every analysis of the command (the post-call recognizer cannot load): one line."""


class Outcome(msgspec.Struct):
    call_id: str
    analysis: CallAnalysis | None = None
    skipped: str | None = None  # why the call was not analysed


def calls_to_analyze(store: CallStore, call_ids: Iterable[str], missing_only: bool) -> list[dict]:
    """The calls' rows (call_id, tenant, bot, recording_path, events_path, record); `missing_only`: those
    with no analysis stored."""
    ids = list(dict.fromkeys(call_ids))
    out: list[dict] = []
    with store.reading() as conn:
        analysed = set()
        if missing_only:
            analysed = set(conn.execute(select(analysis_runs.c.call_id).distinct()).scalars())
        for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
            rows = {r.call_id: dict(r._mapping) for r in conn.execute(
                select(calls.c.call_id, calls.c.tenant, calls.c.bot, calls.c.recording_path, calls.c.events_path,
                       calls.c.record).where(calls.c.call_id.in_(chunk)))}
            out += [rows.get(i) or {"call_id": i, "unknown": True} for i in chunk if i not in analysed]
    return out


class Reanalysis:
    """Analyses calls of the store again with `settings` ([analytics], tenants' rules, bots' languages);
    `rules`: one rules file for every call instead of their tenants'."""

    def __init__(self, store: CallStore, settings: Any, rules: str | None = None):
        self.store = store
        self.settings = settings
        self.rules = rules
        self._base: Tools | None = None  # built by the first whole analysis (--rules-only needs none)
        self._tools: dict[Any, Tools] = {}
        self._rules: dict[str, RulesFile] = {}

    def _rules_path(self, row: dict) -> str | None:
        return self.rules or self.settings.rules_for(row.get("tenant"))

    def _language(self, row: dict) -> str:
        return next((b.language for b in self.settings.bots if b.name == row.get("bot")), "en")

    def analyze(self, row: dict) -> Outcome:
        """The call analysed again from its files, kept in the store and beside its recording."""
        call_id = row["call_id"]
        if row.get("unknown"):
            return Outcome(call_id, skipped="no such call in the store")
        wav = _existing(row.get("recording_path"))
        sidecar = _existing(wav[:-4] + ".json") if wav else None
        events_file = _existing(row.get("events_path"))
        if wav is None and sidecar is None:
            return Outcome(call_id, skipped=f"its recording is not there ({row.get('recording_path') or 'none kept'})")
        options = analysis_options(self.settings, self._rules_path(row), self._language(row))
        if self._base is None:
            transcriber = None
            if self.settings.analytics.caller_transcript == "post":
                try:
                    transcriber = post_call_transcriber(self.settings.recognizer)
                except Exception as err:  # noqa: BLE001 - the recognizer's own errors (RecognizerError, ...)
                    raise ReanalysisError(f"the post-call recognizer ([recognizer], caller_transcript = \"post\") "
                                          f"cannot load: {err}") from None
            self._base = Tools(analysis_options(self.settings), transcriber)
        tools = self._tools.get(options)
        if tools is None:
            tools = self._tools[options] = self._base.with_options(options)
        analysis = analyze_call(wav, sidecar or row.get("record") or {}, events_file, options, tools=tools)
        if analysis.call_id != call_id:  # the store's id is the one the rows hang on
            analysis = msgspec.structs.replace(analysis, call_id=call_id)
        self.store.save_analysis(call_id, analysis)
        if wav is not None:
            write_analysis_file(analysis_path(wav), analysis)
        return Outcome(call_id, analysis)

    def rules_only(self, row: dict) -> Outcome:
        """The stored analysis with its categories and scores evaluated again (no audio read)."""
        call_id = row["call_id"]
        if row.get("unknown"):
            return Outcome(call_id, skipped="no such call in the store")
        path = self._rules_path(row)
        if path is None:
            return Outcome(call_id, skipped="no rules for it (--rules FILE, [analytics] rules or its tenant's)")
        with self.store.reading() as conn:
            result = conn.execute(select(analysis_runs.c.result).where(analysis_runs.c.call_id == call_id)
                                  .order_by(analysis_runs.c.id.desc()).limit(1)).scalar()
            lines = [d for d in conn.execute(select(events.c.data).where(events.c.call_id == call_id)
                                             .order_by(events.c.id)).scalars() if isinstance(d, dict)]
        if result is None:
            return Outcome(call_id, skipped="no analysis stored: analyse it whole (without --rules-only)")
        t0 = time.perf_counter()
        stored = msgspec.convert(result, CallAnalysis)
        rules = self._rules.get(path)
        if rules is None:
            rules = self._rules[path] = load_rules(path)
        categories, scores = evaluate(rules, stored, call_facts(row.get("record") or {}, lines))
        analysis = msgspec.structs.replace(stored, categories=categories, scores=scores,
                                           analyzed_at=round(time.time(), 3),
                                           seconds=round(time.perf_counter() - t0, 3))
        self.store.save_analysis(call_id, analysis)
        wav = _existing(row.get("recording_path"))
        if wav is not None:
            write_analysis_file(analysis_path(wav), analysis)
        return Outcome(call_id, analysis)

    def run(self, rows: list[dict], rules_only: bool, report: Callable[[Outcome], None]) -> tuple[int, int]:
        """(analysed, skipped)."""
        done = skipped = 0
        for row in rows:
            outcome = self.rules_only(row) if rules_only else self.analyze(row)
            report(outcome)
            if outcome.analysis is None:
                skipped += 1
            else:
                done += 1
        return done, skipped


def _existing(path: str | None) -> str | None:
    return path if path and os.path.isfile(path) else None


def summary(outcome: Outcome) -> str:
    """One line about a call's new analysis."""
    if outcome.analysis is None:
        return f"{outcome.call_id}: skipped: {outcome.skipped}"
    a = outcome.analysis
    matched = [h.category for h in a.categories if h.matched]
    parts = [f"{len(a.segments)} segments, {len(a.words)} words"]
    parts.append(f"categories: {', '.join(matched) if matched else '-'}")
    if a.scores:
        parts.append("scores: " + ", ".join(f"{s.scorecard}={s.score:g}/{s.max_score:g}" for s in a.scores))
    if a.errors:
        parts.append(f"{len(a.errors)} error(s): {'; '.join(a.errors)}")
    return f"{outcome.call_id}: {'; '.join(parts)} ({a.seconds:.2f} s)"
