"""The README's example line (examples/support/) on a real call, with speech both ways: the prompts are
`say` texts spoken by espeak-ng (checked at the caller's ear by correlation with the same synthesis),
the caller answers the menu by keypad and types an account number, a dead lookup backend is passed
over, and in the billing persona the caller's own words, spoken by espeak-ng into the call and heard by
the live recognizer ("I want to talk to an agent"), send the call to a person."""
from __future__ import annotations

import json
import pathlib
import re
import threading

import numpy as np
import pytest
import soxr

from callbot.app.serve import running_server
from callbot.app.settings import parse_settings
from callbot.engine.contract import CallerWords, PlayFinished
from callbot.speech.tts import EspeakTts
from tests.sip_peers import PjsuaPeer, eventually, free_port, sidecars
from tests.test_flows_call import RATE, Watch, _heard_in_order, _path, _write_wav

pytestmark = pytest.mark.timeout(240)

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "support"


def _speech(text: str, voice: str = "en-us") -> np.ndarray:
    """`text` as espeak-ng says it, at the test's 16 kHz."""
    samples, rate = EspeakTts(voice=voice).synthesize(text)
    return np.clip(soxr.resample(samples.astype(np.float32), rate, RATE), -32768, 32767).astype(np.int16)


@pytest.fixture
def human(tmp_path):
    """The person a transfer reaches."""
    with PjsuaPeer(user="human", log_dir=tmp_path) as peer:
        yield peer


@pytest.fixture
def example_line(tmp_path, human):
    flow = (EXAMPLE / "support.toml").read_text()
    dead = free_port(__import__("socket").SOCK_STREAM)
    flow = flow.replace("http://127.0.0.1:8080/lookup", f"http://127.0.0.1:{dead}/lookup")
    flow = flow.replace("sip:queue@pbx.example.com", human.uri)
    (tmp_path / "support.toml").write_text(flow)
    config = (EXAMPLE / "callbot.toml").read_text().replace("port = 5060", "port = 0\nrtp_port = 0")
    config += '\n[metrics]\nenabled = false\n[sip]\ncodecs = ["G722/16000"]\n[analytics]\nenabled = false\n'
    (tmp_path / "callbot.toml").write_text(config)
    settings = parse_settings(config, base_dir=tmp_path)
    with running_server(settings, "echo") as server:
        stop = threading.Event()
        pump = threading.Thread(target=server.pump, kwargs={"stop": stop}, daemon=True)
        pump.start()
        try:
            yield server
        finally:
            stop.set()
            pump.join(10)


def test_the_example_line_speaks_prompts_takes_keys_and_hears_the_caller_ask_for_an_agent(example_line, human,
                                                                                          tmp_path):
    server = example_line
    watch = Watch(server.bus, "test")
    try:
        with PjsuaPeer(user="caller", log_dir=tmp_path) as caller:
            call_id = caller.call(server.endpoint.account_uri())
            caller.expect("state", call_id=call_id, state="CONFIRMED")
            caller.send("record", path=str(tmp_path / "heard.wav"))
            watch.moves(call_id, lambda m: m.to_state == "menu")
            # the menu's prompt heard to its end (ids count the flow's prompts: greet 1, menu 2)
            watch.until(lambda e: isinstance(e, PlayFinished) and e.call_id == call_id and e.id.endswith("-2"),
                        what="the menu prompt")
            caller.send("dtmf", digits="1", method="rfc4733")
            watch.moves(call_id, lambda m: m.to_state == "account")
            caller.send("dtmf", digits="4242#", method="rfc4733")  # during its prompt: barge-in
            moves = watch.moves(call_id, lambda m: m.to_state == "billing")
            assert _path(moves) == [("greet", "start"), ("lang", "next"), ("menu", "next"), ("account", "digits"),
                                    ("lookup", "digits"), ("lookup", "webhook_failed"), ("billing", "next")]
            # the caller asks for an agent, out loud: the recognizer hears it, the flow transfers
            # (espeak-ng's klatt2 voice: the one pocketsphinx's shipped en-us model hears best, docs/speech.md)
            _write_wav(tmp_path / "ask.wav", _speech("I want to talk to an agent", voice="en-us+klatt2"))
            caller.send("play", path=str(tmp_path / "ask.wav"))
            moves = watch.moves(call_id, lambda m: m.to_state == "agent", timeout=30)
            assert moves[-1].reason == "caller_said" and re.search("(?i)agent", moves[-1].detail)
            assert caller.expect("transfer_request", call_id=call_id, timeout=20)["dest"].strip("<>") == human.uri
            human.expect("incoming", timeout=15)
            assert watch.ended(call_id).cause == "transfer"
    finally:
        watch.close()
    menu = _speech("For your bill, press 1. To talk to a person, press 2.")
    assert _heard_in_order(tmp_path / "heard.wav", menu) > 0.8
    words = [e for e in watch.seen if isinstance(e, CallerWords) and e.call_id == call_id]
    # the rule acts on the running hypothesis (the example's `partial = true`): pocketsphinx's final, rescored
    # at the utterance's end, lost "agent" in some CI runs ("but saw that too and they just" after partials
    # "i'm to talk to an agent"), so what the finals say is the recognizer's, and only their way is checked
    assert any(not w.final and "agent" in w.text.lower() for w in words)
    finals = [w.text for w in words if w.final and w.text]
    # the caller's words are in the call's record, once the recognizer has flushed them
    [sidecar] = sidecars(tmp_path / "calls")
    record = eventually(lambda: (r := json.loads(sidecar.read_text()))["recording"]["complete"] and r, 10,
                        "the finished sidecar")
    texts = [u["text"] for u in record["caller_text"]]
    assert texts and all(f in texts for f in finals)  # a final may come after the transfer, past the watch
    assert record["flow"]["path"][-1] == "agent"
