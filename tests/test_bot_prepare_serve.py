"""A bot's persona and voice edited in the config while `callbot serve` runs the tiny model (app/bot_reload.py):
the edit is made as the panel's editor makes it (app/bot_config.py `update_bot`), serve prepares the bot
again once, between the rounds of a call in progress, and the next call starts from the new prompt with no
`SetPersona` (no PersonaChanged on the bus), while the call in progress keeps the prompt it started from,
goes on stepping and ends when its caller hangs up, not dropped. Then a voice file that cannot be read:
one error line, and the next call still gets the last good bot.

Run twice: with `[model] process = false` the engine runs on serve's own thread, so the test also reads
which prompt each call started from (its session's BotPrompt); with the inference process (serve's
default) the same PrepareBot crosses its pipe, and the open call is seen stepping on by its FrameStages
(tests/test_bot_prepare.py compares the calls' audio in every hosting)."""
from __future__ import annotations

import logging

import pytest

from callbot.app.bot_config import BotConfig
from callbot.app.serve import running_server
from callbot.app.settings import parse_settings
from callbot.engine.contract import FrameStages, PersonaChanged
from tests.sip_peers import PjsuaPeer, eventually, pumping, serve_config
from tests.test_flows_call import Watch
from tests.tiny_assets import tiny_model_toml, write_tiny_model_for_serve

pytestmark = pytest.mark.timeout(300)

OLD = "You take orders for a pizza shop."
NEW = "You answer questions about a bank account."


def _voice(live) -> str:
    """The voice the call's prompt was prepared with (the loaded voice's name: its member of voices.tgz)."""
    return live.session.bot.snapshot.voice.rsplit("/", 1)[-1]


def _said(caplog, words: str) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if words in r.getMessage()]


@pytest.mark.parametrize("process", [False, True], ids=["thread", "process"])
def test_a_persona_and_voice_saved_reach_the_next_call_prepared_once_and_the_open_call_keeps_its_own(tmp_path,
                                                                                                       caplog, process):
    directory, arch = write_tiny_model_for_serve(tmp_path / "personaplex")
    cfg = serve_config(tmp_path, 0, user="free", codecs=("G722/16000",),
                       tail=tiny_model_toml(directory, arch, process=process) + f"""
[[bots]]
name = "free"
voice = "NATM1"
persona = "{OLD}"
""")
    (tmp_path / "broken.pt").write_bytes(b"not a voice prompt at all")
    caplog.set_level(logging.WARNING, logger="callbot.app.bot_reload")
    settings = parse_settings(cfg.read_bytes(), base_dir=tmp_path)
    with running_server(settings, "model", config=str(cfg)) as server, pumping(server):
        watch = Watch(server.bus, "test")
        try:
            with PjsuaPeer(user="ana", log_dir=tmp_path) as ana:
                def answered(call_id: str):
                    ana.expect("state", call_id=call_id, state="CONFIRMED", timeout=30)
                    live = eventually(lambda: server.router.calls.get(call_id), 10, "the live call")
                    stepping(live)
                    return live

                def stepping(live) -> None:
                    """Its frames stepped from now on (FrameStages come about once a second)."""
                    seen = len(watch.seen)
                    watch.until(lambda e: isinstance(e, FrameStages) and e.call_id == live.call_id
                                and watch.seen.index(e) >= seen, 30, "the call stepping")

                def prompt_of(live) -> tuple[str, str] | None:
                    return None if process else (live.session.bot.snapshot.persona, _voice(live))

                first = answered(ana.call(server.endpoint.account_uri()))
                assert prompt_of(first) in (None, (OLD, "NATM1.pt"))
                changed, problem, _ = BotConfig(cfg).update_bot("free", {"persona": NEW, "voice": "NATF2"}, {},
                                                                loaded=None)
                assert problem is None and set(changed) == {"persona", "voice"}, (changed, problem)
                eventually(lambda: _said(caplog, "prepared again"), 60, "the bot prepared again")
                second = answered(ana.call(server.endpoint.account_uri()))
                assert prompt_of(second) in (None, (NEW, "NATF2.pt"))
                # the call in progress kept its prompt and went on stepping through the preparation
                assert prompt_of(first) in (None, (OLD, "NATM1.pt")) and not first.ended
                stepping(first)

                # a voice file that is not a voice: one error line, the bot as it was
                changed, problem, _ = BotConfig(cfg).update_bot("free", {"voice": str(tmp_path / "broken.pt")}, {},
                                                                loaded=None)
                assert problem is None, problem
                eventually(lambda: _said(caplog, "could not be prepared"), 60, "the failed preparation said")
                third = answered(ana.call(server.endpoint.account_uri()))
                assert prompt_of(third) in (None, (NEW, "NATF2.pt"))
                for live in (first, second, third):
                    ana.send("hangup", call_id=live.call_id)
                    ana.expect("disconnected", call_id=live.call_id, timeout=15)
                    ended = watch.ended(live.call_id)
                    assert ended.cause == "remote", ended  # the caller hung up: nothing dropped it
        finally:
            watch.close()
    assert not [e for e in watch.seen if isinstance(e, PersonaChanged)]
    assert len(_said(caplog, "prepared again")) == 1
    [failed] = _said(caplog, "could not be prepared")
    assert "broken.pt" in failed or "voice" in failed, failed
    assert not _said(caplog, "starts again")  # nothing waits for a restart
