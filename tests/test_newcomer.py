"""What a new user meets first (issue 11, point 8): the README's own commands work from nothing, and every
problem they can run into is one line that says what to do next, with no pjlib chatter around it."""
from __future__ import annotations

import contextlib
import json
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.sip_peers import LOCALHOST, _udp_port_taken, free_port, serve_config, stop_process

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CALLBOT = [sys.executable, "-m", "callbot.app.cli"]


def _config(directory: pathlib.Path, sip_port: int, extra: str = "") -> pathlib.Path:
    """A loopback serve config whose account is the README's `bot`, metrics off; `extra`: tables after it."""
    return serve_config(directory, sip_port, user="bot", tail=extra)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith("callbot: error: ")
    return lines[0]


# ---- no weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("download", [True, False])
def test_no_weights_is_one_line_with_the_next_step(tmp_path, download):
    cfg = _config(tmp_path, free_port(), extra="" if download else "[model]\ndownload = false\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1"}  # offline: no network in the test, whatever the machine has
    out = subprocess.run([*CALLBOT, "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=120,
                         env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    line = _one_error_line(out.stderr)
    assert "no model weights: nvidia/personaplex-7b-v1 is not in the Hugging Face cache" in line
    assert "`--engine echo`" in line and "`--model DIR`" in line
    if download:
        assert "(HF_HUB_OFFLINE is set)" in line and "huggingface-cli login" in line
    else:
        assert "downloads are off" in line
    # huggingface_hub's own words stay out
    assert "snapshot" not in line and "revision" not in line and "Traceback" not in out.stderr


def test_the_hubs_failures_are_named_by_their_kind():
    from huggingface_hub import errors
    from requests import ConnectionError as RequestsConnectionError

    from callbot.app.model_setup import missing_weights_text
    from callbot.app.settings import ModelSettings
    from callbot.engine.model.weights import WeightsError

    def text(cause: BaseException, **model) -> str:
        err = WeightsError("download failed: the hub's long text")
        err.__cause__ = cause
        return missing_weights_text(err, ModelSettings(**model))

    gated = errors.GatedRepoError("401 Client Error.\n\nCannot access gated repo for url ...\nAccess is restricted")
    assert "(the license is not accepted or you are not logged in)" in text(gated)
    assert "(the Hugging Face hub cannot be reached)" in text(RequestsConnectionError("Max retries exceeded"))
    odd = text(RuntimeError("first line\nsecond line"))
    assert "(first line)" in odd and "second" not in odd
    for line in (text(gated), odd, text(gated, path="/nowhere")):
        assert "\n" not in line and "`--engine echo`" in line
    assert text(gated, path="/nowhere").startswith("model weights: download failed")


# ---- pjsip's log ----------------------------------------------------------------------------------


class _Entry:
    def __init__(self, level: int, msg: str):
        self.level, self.msg = level, msg


def test_pjsip_log_goes_to_its_file_at_its_level_without_pjsua2s_raised_errors(tmp_path):
    from callbot.sip.endpoint import _PjLog

    path = tmp_path / "pjsip.log"
    writer = _PjLog(2, str(path))
    raised = ("12:00:00.000 call.cpp ......pjsua_call_get_stream_stat(id, med_idx, &pj_ss) error: Invalid value "
              "or argument (PJ_EINVAL) (status=70004) [../src/pjsua2/call.cpp:927]\n")
    writer.write(_Entry(1, raised))  # raised to Python as pj.Error, which our code handles
    writer.write(_Entry(1, "12:00:00.001 sip_transport.c  a real error\n"))
    writer.write(_Entry(2, "12:00:00.002 pjsua_media.c  a warning\n"))
    writer.write(_Entry(3, "12:00:00.003 pjsua_core.c  some info\n"))
    writer.close()
    assert path.read_text().splitlines() == ["12:00:00.001 sip_transport.c  a real error",
                                             "12:00:00.002 pjsua_media.c  a warning"]
    verbose = _PjLog(5, str(path))
    verbose.write(_Entry(1, raised))
    verbose.close()
    assert "PJ_EINVAL" in path.read_text()  # kept for whoever asks for debug


def test_endpoint_start_prints_nothing_and_logs_to_the_file(tmp_path, capfd):
    from callbot.sip.config import AccountConfig, EndpointConfig, TransportConfig
    from callbot.sip.endpoint import Endpoint

    path = tmp_path / "pjsip.log"
    cfg = EndpointConfig(transports=(TransportConfig(bind=LOCALHOST, port=0),), accounts=(AccountConfig(),),
                         log_level=4, log_file=str(path))
    with Endpoint(cfg):
        pass
    out, err = capfd.readouterr()
    assert "pjlib" not in out + err and "sip_endpoint.c" not in out + err, out + err
    assert "pjsua_core.c" in path.read_text()  # level 4 asked for: pjsua's own start-up lines


# ---- the README's first call --------------------------------------------------------------------


def _readme_baresip_line() -> list[str]:
    """The README's first baresip line (A real call); the call flows example repeats it for its own line."""
    line = next(ln for ln in README.splitlines() if ln.startswith("baresip "))
    return shlex.split(line)


@pytest.mark.skipif(shutil.which("baresip") is None, reason="baresip is not installed")
def test_the_readmes_baresip_line_calls_the_echo_line_from_nothing(tmp_path):
    """A fresh baresip (no ~/.baresip, no account) runs the README's line against `callbot serve --engine
    echo`; the call connects, and serve's stderr holds only its own line: no pjlib chatter, no PJ_EINVAL
    at the hang-up. The sidecar has every field the README names."""
    port = free_port()
    cfg = _config(tmp_path, port)
    serve = subprocess.Popen([*CALLBOT, "serve", "--engine", "echo", "--config", str(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        home = tmp_path / "home"
        home.mkdir()
        # a machine without a sound card (CI): ALSA's null device stands in for the user's speakers
        (home / ".asoundrc").write_text("pcm.!default {\n type null\n}\n")
        args = [a.replace("/tmp/callbot-baresip", str(tmp_path / "baresip")).replace(":5060", f":{port}")
                for a in _readme_baresip_line()]
        deadline = time.monotonic() + 20
        while not _udp_port_taken(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        baresip = subprocess.run([*args, "-t", "4"], capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
        assert "Call established" in baresip.stdout + baresip.stderr, baresip.stdout + baresip.stderr
    finally:
        rc = stop_process(serve)
    out, err = serve.communicate()
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events if e["event"] in ("CallConfirmed", "CallEnded")] == ["CallConfirmed",
                                                                                             "CallEnded"]
    assert err.strip().splitlines() == [f"listening sip:bot@{LOCALHOST}:{port} (echo)"], err
    [sidecar] = (tmp_path / "calls").glob("*[!s].json")
    record = json.loads(sidecar.read_text())
    for field in _readme_record_fields():
        assert field in record, f"the README names `{field}`, the record has {sorted(record)}"


def _readme_record_fields() -> list[str]:
    start = README.index("a `.json` record:")
    paragraph = README[start:README.index("\n\n", start)]
    fields = re.findall(r"`([a-z_]+)`", paragraph)
    assert "remote_uri" in fields and "local_uri" in fields
    return fields


# ---- a call to where nothing listens --------------------------------------------------------------


def _call(tmp_path: pathlib.Path, uri: str) -> tuple[subprocess.CompletedProcess, float]:
    cfg = _config(tmp_path, free_port())
    start = time.monotonic()
    out = subprocess.run([*CALLBOT, "call", uri, "--engine", "echo", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    return out, time.monotonic() - start


def test_a_call_to_a_closed_port_fails_at_once(tmp_path):
    port = free_port()  # nothing listens there: the host answers ICMP port unreachable
    out, took = _call(tmp_path, f"sip:alice@{LOCALHOST}:{port}")
    assert out.returncode == 5, out.stderr
    line = _one_error_line(out.stderr)
    assert f"nothing listens at {LOCALHOST}:{port}" in line
    assert took < 10, f"{took:.1f} s"  # the process's start and stop included; pjsip alone waits 32 s


def test_a_call_nobody_answers_in_any_way_fails_after_the_no_response_limit(tmp_path):
    from callbot.app.serve import NO_RESPONSE_S

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:  # takes every INVITE, answers none
        hole.bind((LOCALHOST, 0))
        out, took = _call(tmp_path, f"sip:alice@{LOCALHOST}:{hole.getsockname()[1]}")
        hole.setblocking(False)
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(hole.recv(65536))
    assert any(d.startswith(b"INVITE ") for d in got) and b"\r\n\r\n" in got  # the INVITEs, the probe's keep-alive
    assert out.returncode == 5, out.stderr
    assert f"no SIP response within {NO_RESPONSE_S:g} s" in _one_error_line(out.stderr)
    assert NO_RESPONSE_S <= took < NO_RESPONSE_S + 8, f"{took:.1f} s"


@pytest.mark.parametrize("uri, target", [
    ("sip:alice@127.0.0.1:5999", ("127.0.0.1", 5999)),
    ("sip:127.0.0.1", ("127.0.0.1", 5060)),
    ("<sip:bob@[::1]:5070;transport=udp>", ("::1", 5070)),
    ("sip:alice@127.0.0.1:5999;transport=tcp", None),
    ("sips:alice@127.0.0.1:5061", None),
    ("sip:alice@pbx.example.com:5060", None),  # a name: pjsip's resolver decides where it goes
])
def test_udp_target(uri, target):
    from callbot.app.dial_probe import udp_target

    assert udp_target(uri) == target
