"""Speech analytics: how long the analysis of a 10-minute call takes, part by part (issue 14, BENCHMARKS.md
"Speech analytics: analysis time per call minute").

The call is scripted (tests/analytics_calls.py): espeak-ng sentences on both legs for 10 minutes, turns
with a response gap, a barge-in every third exchange, a few seconds of dead air now and then, a faint
line noise on both legs; the bot's words as BotText events in its events file, as the model leaves them.
Each part is timed on its own (best of `CALLBOT_BENCH_ANALYSIS_ROUNDS` runs, default 3; pocketsphinx once)
and the whole `analyze_call` once more, in this one process on one thread:

- baseline: reading the WAV (`read_wav`), the least any analysis must do;
- VAD: Silero on both legs, chunked into one batch (the default) and as one stream per leg;
- transcript post-call: pocketsphinx (callbot.speech's recognizer behind StreamTranscriber) on the
  caller's leg; the live recognizer's words cost nothing here (they come from the events file);
- sentiment: VADER over every turn; rules: the example rules file over the analysis;
- the whole analysis with live caller words, and with pocketsphinx post-call.

Reported as seconds, as the real-time factor (seconds per second of call: x 60 = seconds per call
minute) and as a ratio to the baseline measured in the same run.

Run (about 2 min; not part of CI):
    .venv/bin/python -m pytest bench/bench_analysis.py -p no:cacheprovider -q -s
    CALLBOT_BENCH_ANALYSIS_MINUTES=2 ...   a shorter call
"""
from __future__ import annotations

import os
import pathlib
import time

import pytest

from callbot.analytics.analyze import AnalysisOptions, Tools, analyze_call
from callbot.analytics.metrics import compute_metrics
from callbot.analytics.rules import call_facts, evaluate, load_rules
from callbot.analytics.sentiment import SentimentScorer, score_turns
from callbot.analytics.transcript import bot_pieces, bot_words, build_turns, read_events, transcribe_leg
from callbot.analytics.vad import SileroVad, VadParams, detect_segments
from callbot.analytics.wavfile import read_wav
from tests.analytics_calls import ScriptedCall, pocketsphinx_transcriber, write_call

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "examples" / "support" / "rules.toml"
MINUTES = float(os.environ.get("CALLBOT_BENCH_ANALYSIS_MINUTES", "10"))
ROUNDS = int(os.environ.get("CALLBOT_BENCH_ANALYSIS_ROUNDS", "3"))

BOT = ["This call may be recorded for quality.", "Sure, I can help you with that today.",
       "Can you tell me your account number please", "Thank you, I found your account.",
       "Your next bill will be lower.", "Is there anything else I can do for you"]
CALLER = ["I want to talk to an agent", "my bill is too high this month", "yes thank you",
          "this is awful, I hate this", "wait a moment please", "no that is all, goodbye"]


def ten_minute_call() -> ScriptedCall:
    c = ScriptedCall()
    prev = c.say("bot", BOT[0], 500)
    i = 0
    while prev.speech_end < MINUTES * 60_000 - 8000:
        caller = c.after("caller", CALLER[i % len(CALLER)], prev, 700)
        if i % 3 == 2:  # the caller barges into the bot's answer
            bot = c.after("bot", BOT[(i + 1) % len(BOT)], caller, 400)
            c.say("caller", "wait a moment please", bot.speech_start + 800)
            prev = c.after("bot", "yes", max(c.placed[-1], bot, key=lambda p: p.speech_end), 500)
        else:
            prev = c.after("bot", BOT[(i + 1) % len(BOT)], caller, 300 + 100 * (i % 5))
        if i % 7 == 6:  # dead air
            prev = c.after("bot", "Are you still there", prev, 4000)
        i += 1
    c.end(MINUTES * 60_000 - prev.speech_end)
    return c


def best_of(fn, rounds: int = ROUNDS) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


@pytest.mark.timeout(900)
def test_analysis_time_per_call_minute(tmp_path):
    call = ten_minute_call()
    wav, side, events_path = write_call(call, tmp_path, "bench")
    seconds = call.duration_ms / 1000.0
    rows: list[tuple[str, float]] = []

    base, (rate, samples) = best_of(lambda: read_wav(wav))
    vad = SileroVad()
    t_vad, segments = best_of(lambda: detect_segments(samples, rate, params=VadParams(), vad=vad))
    t_vad1, segments1 = best_of(lambda: detect_segments(samples, rate, params=VadParams(chunk_s=0), vad=vad), 1)
    transcriber = pocketsphinx_transcriber()
    t_ps, caller_words = best_of(lambda: transcribe_leg(transcriber, samples[:, 0], rate, "caller"), 1)
    events, _ = read_events(events_path)
    words = sorted(bot_words(bot_pieces(events)) + caller_words, key=lambda w: w.start_ms)
    turns = build_turns(words)
    scorer = SentimentScorer()
    t_sent, turns = best_of(lambda: score_turns(turns, "en", scorer))
    rules = load_rules(RULES)
    t_metrics, metrics = best_of(lambda: compute_metrics(segments, call.duration_ms, words, {}, turns))
    tools = Tools(AnalysisOptions(rules=str(RULES)))
    live = analyze_call(wav, side, events_path, tools.options, tools=tools)  # warm: VAD session, lexicon
    from callbot.analytics.result import CallAnalysis

    analysis = CallAnalysis(call_id="bench", segments=segments, words=words, turns=turns, metrics=metrics)
    t_rules, _ = best_of(lambda: evaluate(rules, analysis, call_facts({}, events)))
    t_live, live = best_of(lambda: analyze_call(wav, side, events_path, tools.options, tools=tools), 1)
    post_tools = Tools(AnalysisOptions(rules=str(RULES), caller_transcript="post"), transcriber)
    t_post, post = best_of(lambda: analyze_call(wav, side, events_path, post_tools.options, tools=post_tools), 1)
    assert live.errors == [] and post.errors == []
    assert len(segments) == len(call.expected_segments()), (len(segments), len(call.expected_segments()))
    rows = [("read the WAV (baseline)", base), ("VAD, chunked batch (default)", t_vad),
            ("VAD, one stream per leg", t_vad1), ("metrics", t_metrics),
            ("caller transcript, pocketsphinx post-call", t_ps), ("sentiment (VADER, all turns)", t_sent),
            ("rules (examples/support/rules.toml)", t_rules),
            ("analyze_call, live caller words", t_live), ("analyze_call, pocketsphinx post-call", t_post)]
    caller_talk = live.metrics.caller.talk_ms / 1000.0
    print(f"\n{seconds / 60:.1f}-minute scripted call, {len(segments)} segments ({len(segments1)} one-stream), "
          f"{len(words)} words, {len(turns)} turns; caller talks {caller_talk:.0f} s, bot "
          f"{live.metrics.bot.talk_ms / 1000:.0f} s")
    print(f"{'part':45s} {'s':>8s} {'s per call min':>15s} {'RTF':>8s} {'x baseline':>11s}")
    for name, t in rows:
        print(f"{name:45s} {t:8.3f} {t / seconds * 60:15.3f} {t / seconds:8.4f} {t / base:11.0f}")
