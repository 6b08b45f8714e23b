"""analyze_call on a real call's recording: the README's example line (examples/support/, `running_server` with
the echo engine, espeak-ng prompts, the live caller recognizer) called by a pjsua2 caller that speaks a
sentence (espeak-ng, into the call), presses 2 for a person and is transferred. What the recorder left
(stereo WAV, record, events file) is analysed as the app would: the bot's prompts and the caller's
sentence as segments where they were, the live recognizer's words, the flow's course, the transfer."""
from __future__ import annotations

import json
import re

import pytest

from callbot.analytics.analyze import AnalysisOptions, analyze_call, recording_files
from callbot.engine.contract import CallerWords, PlayFinished
from tests.analytics_calls import speech_spans
from tests.sip_peers import PjsuaPeer, eventually, sidecars
from tests.test_flows_call import Watch, _write_wav
from tests.test_flows_speech import _speech, example_line, human  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)

RULES = """
[[categories]]
name = "asked for a person and got one"
[[categories.rules]]
kind = "phrase"
leg = "caller"
phrases = ["agent"]
[[categories.rules]]
kind = "flow_state"
state = "agent"
flow = "support"
[[categories.rules]]
kind = "transferred"
[[categories.rules]]
kind = "hangup"
cause = ["transfer"]

[[categories]]
name = "self-served"
[[categories.rules]]
kind = "flow_state"
state = "billing"
"""


def test_a_real_calls_recording_analysed(example_line, human, tmp_path):  # noqa: F811
    server = example_line
    ask = _speech("I want to talk to an agent", voice="en-us+klatt2")
    _write_wav(tmp_path / "ask.wav", ask)
    watch = Watch(server.bus, "analytics")
    try:
        with PjsuaPeer(user="caller", log_dir=tmp_path) as caller:
            call_id = caller.call(server.endpoint.account_uri())
            caller.expect("state", call_id=call_id, state="CONFIRMED")
            watch.until(lambda e: isinstance(e, PlayFinished) and e.call_id == call_id and e.id.endswith("-2"),
                        what="the menu prompt")
            caller.send("play", path=str(tmp_path / "ask.wav"))
            watch.until(lambda e: isinstance(e, CallerWords) and e.call_id == call_id and e.final
                        and "agent" in e.text, timeout=30, what="the caller's words")
            caller.send("dtmf", digits="2", method="rfc4733")
            watch.moves(call_id, lambda m: m.to_state == "agent")
            caller.expect("transfer_request", call_id=call_id, timeout=20)
            human.expect("incoming", timeout=15)
            assert watch.ended(call_id).cause == "transfer"
    finally:
        watch.close()
    [sidecar] = sidecars(tmp_path / "calls")
    eventually(lambda: json.loads(sidecar.read_text())["recording"]["complete"], 10, "the finished sidecar")
    wav, side, events = recording_files(sidecar)
    assert wav is not None and events is not None
    (tmp_path / "rules.toml").write_text(RULES)
    a = analyze_call(wav, side, events, AnalysisOptions(rules=str(tmp_path / "rules.toml"),
                                                        redacted_recording=True))
    assert a.errors == [] and a.call_id == call_id and a.transcript_engine == "live"
    bot = [s for s in a.segments if s.leg == "bot"]
    caller_segs = [s for s in a.segments if s.leg == "caller"]
    # the greeting starts the call; the menu and "Connecting you to a person." follow
    assert bot and bot[0].start_ms < 1000 and len(bot) >= 2
    # the caller said one sentence: one segment, as long as its speech (G722 and the jitter buffer
    # in between), after the menu prompt
    [said] = caller_segs
    own = speech_spans(ask)
    assert said.end_ms - said.start_ms == pytest.approx(own[-1][1] - own[0][0], abs=100)
    menu_end = max(s.end_ms for s in bot if s.start_ms < said.start_ms)
    assert said.start_ms > menu_end
    # the bot answered the caller's turn: the agent prompt after the key press
    assert len(a.metrics.response_latency_ms) == 1 and 0 < a.metrics.response_latency_ms[0] < 10000
    assert a.metrics.bot.talk_ms > 3000 and a.metrics.caller.talk_ms == pytest.approx(said.end_ms - said.start_ms)
    assert a.metrics.overtalk_count == 0 and a.metrics.barge_ins == 0
    # the live recognizer's words, inside the caller's speech
    agent = [w for w in a.words if w.leg == "caller" and re.fullmatch("agent", w.text)]
    assert agent and said.start_ms - 500 <= agent[0].start_ms <= said.end_ms + 500
    hits = {h.category: h.matched for h in a.categories}
    assert hits == {"asked for a person and got one": True, "self-served": False}
    assert a.redacted_recording == wav[:-4] + ".redacted.wav"  # written even with nothing to silence
