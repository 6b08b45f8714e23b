"""analyze_call and the AnalysisPool on scripted calls written as the recorder leaves them (stereo WAV,
record, events file with the bot's text pieces): the caller's words from pocketsphinx after the call, a
category "the bot said the disclosure in the first 15 s" on one call and not the other, PII redacted in
the words and silenced in a copy of the recording, the caller's sentiment sign, each part failing alone,
the pool's low-priority workers and its bound, and the real sample call from /work/samples' kind."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import threading

import numpy as np
import pytest

from callbot.analytics.analyze import AnalysisOptions, analyze_call, recording_files
from callbot.analytics.metrics import compute_metrics
from callbot.analytics.pool import AnalysisPool
from callbot.analytics.result import CallAnalysis
from callbot.analytics.wavfile import read_wav
from tests.analytics_calls import (ScriptedCall, agent_call, bot_text_events, pocketsphinx_transcriber,
                                   write_call)

pytestmark = pytest.mark.timeout(240)

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = str(ROOT / "examples" / "support" / "rules.toml")
SAMPLES = pathlib.Path("/work/samples")
EDGE_MS = 50.0


def late_disclosure_call() -> ScriptedCall:
    c = ScriptedCall()
    hello = c.say("bot", "Hello, how can I help you", 500)
    ask = c.after("caller", "I want to talk to an agent", hello, 700)
    answer = c.after("bot", "Sure, I can help you with that today.", ask, 500)
    wait = c.after("caller", "yes thank you", answer, 6000)
    c.after("bot", "This call may be recorded for quality.", wait, 3000)
    c.end(1000)
    return c


def pii_call() -> ScriptedCall:
    c = ScriptedCall()
    ask = c.say("bot", "Can I have your phone number", 500)
    said = c.after("caller", "my phone number is five five five one two three four", ask, 600)
    c.after("bot", "Thank you", said, 500)
    c.end(1000)
    return c


def mood_call(sentence: str) -> ScriptedCall:
    c = ScriptedCall()
    ask = c.say("bot", "How was your experience", 500)
    said = c.after("caller", sentence, ask, 600)
    c.end(800)
    assert said.speech_end < c.duration_ms
    return c


@pytest.fixture(scope="module")
def transcriber():
    return pocketsphinx_transcriber()


@pytest.fixture(scope="module")
def options():
    return AnalysisOptions(rules=RULES, caller_transcript="post")


def test_a_scripted_call_analysed_whole(tmp_path, transcriber, options):
    call = agent_call()
    wav, side, events = write_call(call, tmp_path, "a", record={"hangup_cause": "remote"})
    a = analyze_call(wav, side, events, options, transcriber)
    assert a.errors == [] and a.call_id == "a" and a.transcript_engine == "pocketsphinx"
    # segments and metrics: what was placed
    want = call.expected_segments()
    assert [s.leg for s in a.segments] == [s.leg for s in want]
    for got, placed_seg in zip(a.segments, want):
        assert abs(got.start_ms - placed_seg.start_ms) <= EDGE_MS and abs(got.end_ms - placed_seg.end_ms) <= EDGE_MS
    placed = compute_metrics(want, call.duration_ms)
    m = a.metrics
    assert (m.overtalk_count, m.barge_ins, m.dead_air_count) == (1, 1, 1)
    assert m.overtalk_ms == pytest.approx(placed.overtalk_ms, abs=2 * EDGE_MS)
    assert m.response_latency_p50_ms == pytest.approx(placed.response_latency_p50_ms, abs=2 * EDGE_MS)
    assert m.caller.loudness_dbfs is not None and -40 < m.caller.loudness_dbfs < -3
    # the bot's words from its text pieces, the caller's from pocketsphinx, inside the caller's speech
    bot_text = " ".join(w.text for w in a.words if w.leg == "bot").lower()
    assert "this call may be recorded for quality." in bot_text
    caller = [w for w in a.words if w.leg == "caller"]
    said = " ".join(w.text for w in caller)
    assert "want to talk to an agent" in said
    ask = next(p for p in call.placed if p.text.startswith("I want"))
    agent = next(w for w in caller if w.text == "agent")
    assert ask.speech_start - 100 <= agent.start_ms < agent.end_ms <= ask.speech_end + 100
    assert m.caller.words == len(caller) and m.caller.words_per_minute > 0
    assert [t.leg for t in a.turns][:2] == ["bot", "caller"]
    # categories of the example rules
    hits = {h.category: h for h in a.categories}
    assert hits["disclosure given"].matched
    assert hits["agent asked, not transferred"].matched
    assert not hits["self-served"].matched
    [qa] = a.scores
    assert qa.items[0].passed and qa.score >= 3
    # the whole analysis crosses a process boundary and a JSON API unchanged
    import msgspec

    assert msgspec.json.decode(msgspec.json.encode(a), type=CallAnalysis) == a


def test_the_disclosure_category_does_not_fire_when_it_came_late(tmp_path, transcriber, options):
    call = late_disclosure_call()
    a = analyze_call(*write_call(call, tmp_path, "b"), options, transcriber)
    assert a.errors == []
    hits = {h.category: h for h in a.categories}
    assert not hits["disclosure given"].matched
    assert "this call may be recorded" in " ".join(w.text for w in a.words if w.leg == "bot").lower()
    assert not a.scores[0].items[0].passed


def test_pii_is_redacted_in_the_words_and_silenced_in_a_copy(tmp_path, transcriber):
    call = pii_call()
    wav, side, events = write_call(call, tmp_path, "pii")
    a = analyze_call(wav, side, events, AnalysisOptions(caller_transcript="post", redacted_recording=True),
                     transcriber)
    assert a.errors == []
    caller = [w for w in a.words if w.leg == "caller"]
    assert [w.text for w in caller if w.redacted] == ["[phone]"], caller
    assert not any(ch.isdigit() or w.text in ("five", "one", "two", "three", "four") for w in caller
                   for ch in w.text)
    assert "phone number" in " ".join(w.text for w in caller)
    assert a.redacted_recording == str(tmp_path / "pii.redacted.wav")
    rate, original = read_wav(wav)
    _, copy = read_wav(a.redacted_recording)
    red = next(w for w in caller if w.redacted)
    lo, hi = int(red.start_ms * rate / 1000), int(red.end_ms * rate / 1000)
    assert not copy[lo:hi, 0].any()  # silent there on the caller's leg
    said = next(p for p in call.placed if p.leg == "caller")
    # the spoken digits lie inside the silenced stretch: what is left of the caller's speech there is nothing
    assert hi - lo > 0.8 * rate
    assert np.array_equal(copy[:, 1], original[:, 1])  # the bot's leg untouched
    before = int(said.speech_start * rate / 1000)
    assert np.array_equal(copy[:lo - int(0.15 * rate), 0], original[:lo - int(0.15 * rate), 0])
    assert np.abs(copy[before:before + rate // 2, 0]).max() > 1000  # "my phone number is" still heard


def test_live_words_redact_about_where_the_digits_were_said(tmp_path, transcriber):
    """The live recognizer gives an utterance, not word times: its span is moved onto the caller's speech and
    its words spread by length; the digits' estimated span still covers most of where pocketsphinx, post-call,
    places them."""
    call = pii_call()
    said = next(p for p in call.placed if p.leg == "caller")
    live = {"event": "CallerWords", "call_id": "live", "t_ms": said.speech_end + 300, "text": said.text.lower(),
            "final": True, "start_ms": said.speech_start + 300, "end_ms": said.speech_end + 300}  # endpointer lag
    from tests.analytics_calls import bot_text_events

    files = write_call(call, tmp_path, "live", events=bot_text_events(call, "live") + [live])
    a = analyze_call(*files, AnalysisOptions(caller_transcript="live", redacted_recording=True))
    post = analyze_call(*files, AnalysisOptions(caller_transcript="post"), transcriber)
    [est] = [w for w in a.words if w.redacted]
    [ref] = [w for w in post.words if w.redacted]
    assert est.text == ref.text == "[phone]"
    overlap = min(est.end_ms, ref.end_ms) - max(est.start_ms, ref.start_ms)
    assert overlap >= 0.7 * (ref.end_ms - ref.start_ms), (est, ref)
    rate, copy = read_wav(a.redacted_recording)
    assert not copy[int(est.start_ms * rate / 1000):int(est.end_ms * rate / 1000), 0].any()


def test_a_negative_and_a_positive_caller_differ_in_sentiment_sign(tmp_path, transcriber):
    opts = AnalysisOptions(caller_transcript="post")
    bad = analyze_call(*write_call(mood_call("this is awful, I hate this, terrible"), tmp_path, "bad"), opts,
                       transcriber)
    good = analyze_call(*write_call(mood_call("wonderful, I love it, thank you"), tmp_path, "good"), opts,
                        transcriber)
    assert bad.metrics.caller.sentiment is not None and good.metrics.caller.sentiment is not None
    assert bad.metrics.caller.sentiment < 0 < good.metrics.caller.sentiment, (bad.turns, good.turns)
    es = analyze_call(*write_call(mood_call("wonderful, I love it, thank you"), tmp_path, "es"),
                      AnalysisOptions(caller_transcript="post", language="es"), transcriber)
    assert es.metrics.caller.sentiment is None and all(t.sentiment is None for t in es.turns)


def test_each_part_fails_alone_into_errors(tmp_path):
    call = agent_call()
    speech = [{"event": "BotSpeech", "call_id": "c", "t_ms": 600.0, "speaking": True},
              {"event": "CallerSpeech", "call_id": "c", "t_ms": 2000.0, "speaking": True},
              {"event": "BotSpeech", "call_id": "c", "t_ms": 3000.0, "speaking": False},
              {"event": "CallerSpeech", "call_id": "c", "t_ms": 4000.0, "speaking": False}]
    wav, side, events = write_call(call, tmp_path, "c", events=bot_text_events(call, "c") + speech)
    pathlib.Path(wav).write_bytes(b"RIFF....WAVEjunk")  # a corrupt recording
    with open(events, "a") as f:
        f.write('{"event": "BotText", "t_')  # cut short by a crash
    bad_rules = tmp_path / "rules.toml"
    bad_rules.write_text("[[categories]]\nname = 'x'\n[[categories.rules]]\nkind = 'phrase'\nfirst_s = -1\n")
    a = analyze_call(wav, side, events, AnalysisOptions(rules=str(bad_rules)))
    assert [e.split(":")[0] for e in a.errors] == ["events", "recording", "rules"], a.errors
    assert all("\n" not in e for e in a.errors)
    assert "$.categories[0].rules[0].first_s" in a.errors[2]
    # what did not need the audio is still there: the bot's words, its turns, the duration from the record,
    # coarse segments from the engine's live speech events
    assert any(w.leg == "bot" for w in a.words) and a.turns
    assert a.metrics.duration_ms == pytest.approx(call.duration_ms, abs=1)
    assert a.segments_source == "events" and [s.leg for s in a.segments] == ["bot", "caller"]
    assert a.metrics.overtalk_count == 1
    # no record, no events, "post" without a transcriber: still an analysis, each lack one line
    b = analyze_call(call.write(tmp_path / "d.wav"), str(tmp_path / "none.json"), None,
                     AnalysisOptions(caller_transcript="post"))
    assert [e.split(":")[0] for e in b.errors] == ["record", "caller transcript"], b.errors
    assert b.call_id == "d" and b.segments and b.transcript_engine == "live" and b.segments_source == "vad"


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="no /work/samples here (test_analytics_sip makes its own call)")
def test_the_sample_call_analyses_without_errors(tmp_path, transcriber):
    for f in SAMPLES.glob("*"):
        shutil.copy(f, tmp_path / f.name)
    [side] = tmp_path.glob("*[0-9a-zA-Z].json")
    wav, side, events = recording_files(side)
    assert wav is not None and events is not None
    record = json.loads(pathlib.Path(side).read_text())
    a = analyze_call(wav, side, events, AnalysisOptions(rules=RULES), transcriber)
    assert a.errors == [] and a.call_id == record["call_id"]
    assert a.metrics.duration_ms == pytest.approx(record["recording"]["seconds"] * 1000, abs=1)
    hits = {h.category: h for h in a.categories}
    # its flow went greet -> menu -> lookup -> thanks and the bot hung up: not "self-served" (remote hang-up)
    assert not hits["self-served"].matched
    assert any("flow state 'lookup' reached" in e for e in hits["self-served"].evidence)


def test_the_pool_analyses_in_low_priority_processes_and_refuses_past_its_bound(tmp_path, options):
    a_files = write_call(agent_call(), tmp_path, "a")
    b_files = write_call(late_disclosure_call(), tmp_path, "b")
    results: dict[str, CallAnalysis | None] = {}
    done = threading.Event()

    def on_result(key, analysis, error):
        results[key] = analysis if error is None else None
        if len(results) == 2:
            done.set()

    with AnalysisPool(on_result, options, workers=1, max_pending=2, nice=5,
                      transcriber_factory=pocketsphinx_transcriber) as pool:
        assert pool.submit("a", *a_files)
        assert pool.submit("b", *b_files)
        assert not pool.submit("c", *a_files)  # two already waiting or running
        assert pool.refused == 1
        assert done.wait(180), results
        assert pool.niceness() == min(19, os.nice(0) + 5)
    assert {k: {h.category: h.matched for h in v.categories}["disclosure given"] for k, v in results.items()} == \
        {"a": True, "b": False}
    assert results["a"].transcript_engine == "pocketsphinx" and pool.pending == 0 and pool.done == 2
