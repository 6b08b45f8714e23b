"""`callbot serve` with its recordings on a disk that fills up: the call is answered and its caller hears
the bot all the same, serve goes on, the call's audio is held and written once the disk has room again
(nothing lost from a hiccup), the metrics and one log line say what happened."""
from __future__ import annotations

import json
import logging
import wave

import numpy as np

from callbot.app.recording import read_recording
from callbot.app.serve import running_server
from callbot.app.web_link import recordings_state
from callbot.app.settings import parse_settings
from tests.sip_peers import PjsuaPeer, eventually, pumping, serve_config, sidecars
from tests.small_disk import small_disk
from tests.test_flows_call import RATE, _write_wav
from tests.test_flows_transfer import _all_there, _pieces_heard, _shown

# the caller's voice: noise, which nothing else in the call resembles
NOISE = np.random.default_rng(5).normal(0, 4000, int(RATE * 0.8)).clip(-32768, 32767).astype(np.int16)


def _metric(server, name: str) -> float:
    line = next(x for x in server.metrics.text().splitlines() if x.startswith(name + " "))
    return float(line.split()[-1])


def test_a_call_on_a_full_disk_is_answered_heard_and_recorded_once_there_is_room(tmp_path, caplog):
    _write_wav(tmp_path / "said.wav", NOISE)
    with small_disk(tmp_path / "disk", size="4m") as disk:
        cfg = serve_config(tmp_path, 0, recordings_dir=str(disk.path), tail="[store]\nenabled = false\n")
        settings = parse_settings(cfg.read_bytes(), base_dir=tmp_path)
        with caplog.at_level(logging.WARNING, logger="callbot.app.recording"), \
                running_server(settings, "echo") as server, pumping(server), \
                PjsuaPeer(user="alice", log_dir=tmp_path) as alice:
            disk.fill()
            call_id = alice.call(server.endpoint.account_uri())
            alice.expect("media", call_id=call_id, timeout=15)
            eventually(lambda: server.recorder.trouble.failing == {call_id}, what="the disk refusing the call's files")
            alice.send("record", path=str(tmp_path / "heard.wav"))
            held = server.recorder.held_s
            alice.send("play", path=str(tmp_path / "said.wav"))
            # the clip and more, drained from the call while the disk refuses: held, not lost
            eventually(lambda: server.recorder.held_s >= held + 1.5, timeout=20, what="the call's audio held")
            assert _metric(server, "callbot_recording_write_errors_total") >= 1
            assert _metric(server, "callbot_recording_held_seconds") >= 1.5
            shown = recordings_state(server)  # what the panel's system page shows
            assert shown["failing_calls"] == 1 and shown["held_s"] >= 1.5 and shown["write_errors"] >= 1
            assert shown["free_bytes"] < 64 * 1024 and shown["dir"] == str(disk.path)
            disk.free()
            eventually(lambda: server.recorder.held_s == 0 and not server.recorder.trouble.failing, timeout=20,
                       what="the held audio written")
            alice.send("hangup", call_id=call_id)
            alice.expect("disconnected", call_id=call_id, timeout=15)
            eventually(lambda: [p for p in sidecars(disk.path) if json.loads(p.read_text())["recording"]["complete"]],
                       timeout=20, what="the call's final record")
            assert server.recorder.error is None and server.endpoint.running
            assert _metric(server, "callbot_recording_lost_seconds_total") == 0
        [sidecar] = sidecars(disk.path)
        record = json.loads(sidecar.read_text())
        assert record["recording"]["lost_s"] == 0 and record["recording"]["complete"]
        rate, audio = read_recording(sidecar.with_suffix(".wav"))
        assert record["recording"]["frames"] == len(audio) > 2 * rate  # the whole call, from its first frame
        with wave.open(str(tmp_path / "caller_leg.wav"), "wb") as w:  # _pieces_heard resamples it to RATE
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate), w.writeframes(audio[:, 0].astype("<i2").tobytes())
        kept = _pieces_heard(tmp_path / "caller_leg.wav", NOISE, piece_s=0.1)
        assert _all_there(kept, 8), _shown(kept)  # what the caller said while the disk was full is in the WAV
    echoed = _pieces_heard(tmp_path / "heard.wav", NOISE, piece_s=0.1)
    assert _all_there(echoed, 8), _shown(echoed)  # the bot (the echo engine) answered all along
    said = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(said) == 1 and call_id in said[0]
    assert any("takes writes again" in r.getMessage() for r in caplog.records)
