"""A call flow on the model: `running_server` with the tiny PersonaPlex in its own process answers a pjsua2
caller; the flow greets (a clip the caller hears), holds the model silent through a keypad menu, swaps
in a persona filled with the call's variables when a key is pressed, and says goodbye on another key. What is checked: the transitions, the persona change the engine reports, the clip at the
caller's ear, and the model's text kept in the record."""
from __future__ import annotations

import json
import wave

import numpy as np
import pytest

from callbot.app.serve import running_server
from callbot.app.settings import parse_settings
from callbot.engine.contract import PersonaChanged, PlayFinished
from tests.sip_peers import PjsuaPeer, pumping, serve_config, sidecars
from tests.test_flows_call import Watch, _tone_heard, _path, _tone, _write_wav
from tests.tiny_assets import tiny_model_toml, write_tiny_model_for_serve

pytestmark = pytest.mark.timeout(300)

FLOW = """
start = "greet"
[states.greet]
play = "greet.wav"
next = "menu"
[states.menu]
play = "menu.wav"
gather = { max_digits = 1, timeout_s = 20 }
on_digits = { "1" = "pizza" }
[states.pizza]
persona = "Take the order of {caller}."
gather = { max_digits = 1, timeout_s = 60 }
on_digits = { "9" = "goodbye" }
[states.goodbye]
play = "menu.wav"
hangup = true
"""


def test_a_flow_steers_the_model_through_a_menu_into_a_persona_and_out(tmp_path):
    directory, arch = write_tiny_model_for_serve(tmp_path / "personaplex")
    greet, menu = _tone(440, 0.6), _tone(660, 0.4)
    _write_wav(tmp_path / "greet.wav", greet)
    _write_wav(tmp_path / "menu.wav", menu)
    (tmp_path / "pizza.toml").write_text(FLOW)
    cfg = serve_config(tmp_path, 0, user="pizza", codecs=("G722/16000",), analytics=True,
                       tail=tiny_model_toml(directory, arch) + """
[[bots]]
name = "pizza"
flow = "pizza.toml"
voice = "NATM1"
persona = "Pizza orders."
""")
    settings = parse_settings(cfg.read_bytes(), base_dir=tmp_path)
    with running_server(settings, "model") as server, pumping(server):
        watch = Watch(server.bus, "test")
        try:
            with PjsuaPeer(user="ana", log_dir=tmp_path) as ana:
                call_id = ana.call(server.endpoint.account_uri())
                ana.expect("state", call_id=call_id, state="CONFIRMED", timeout=30)
                ana.send("record", path=str(tmp_path / "heard.wav"))
                watch.moves(call_id, lambda m: m.to_state == "menu", timeout=60)
                watch.until(lambda e: isinstance(e, PlayFinished) and e.call_id == call_id and e.id.endswith("-2"),
                            timeout=60, what="the menu prompt's end")
                ana.send("dtmf", digits="1", method="rfc4733")
                changed = watch.until(lambda e: isinstance(e, PersonaChanged) and e.call_id == call_id,
                                      timeout=120, what="the persona change")
                assert not changed.replaced
                ana.send("dtmf", digits="9", method="rfc4733")
                moves = watch.moves(call_id, lambda m: m.to_state == "", timeout=60)
                assert _path(moves) == [("greet", "start"), ("menu", "next"), ("pizza", "digits"),
                                        ("goodbye", "digits"), ("", "hangup")]
                watch.ended(call_id)
        finally:
            watch.close()
    # the menu prompt (the greeting starts with the call, before the caller's recorder is attached)
    assert _tone_heard(tmp_path / "heard.wav", menu) > 0.9
    [sidecar] = sidecars(tmp_path / "calls")
    record = json.loads(sidecar.read_text())
    assert record["flow"]["path"] == ["greet", "menu", "pizza", "goodbye"]
    assert record["engine"]["steps"] > 0
    with wave.open(str(tmp_path / "heard.wav")) as w:
        assert w.getnframes() > 0 and np.frombuffer(w.readframes(w.getnframes()), "<i2").any()
