"""`callbot serve` as the panel's tests run it: a real process on loopback (SIP on a free UDP port, the web
panel on a free TCP port, served by serve itself through `[web] listen` or by `callbot web` beside it),
users added to its store before it starts so a test can sign in, every process stopped however the test
ends.

One harness for the tests of the panel served by serve itself (test_web_serve, test_web_editor_serve,
test_web_live), so they differ only in their config's tables and what they do with the calls and pages.
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Iterator

from tests.sip_peers import _Lines, free_port, serve_config, stop_process
from tests.test_web import add_user

CALLBOT = [sys.executable, "-m", "callbot.app.cli"]


@dataclasses.dataclass
class PanelServe:
    """The running serve: its config file, ports, panel URL (`base`), process and stderr lines."""

    cfg: pathlib.Path
    sip_port: int
    web_port: int
    metrics_port: int | None
    base: str
    proc: subprocess.Popen
    err: _Lines


@contextlib.contextmanager
def panel_serve(tmp_path: pathlib.Path, tail: str, password: str, *, users: Iterable[tuple] = (("ada", "admin"),),
                engine: str = "echo", panel: str = "in-serve", metrics: bool = False, env: dict | None = None,
                ready_s: float = 30, stop_s: float = 15, stop_sig: int = signal.SIGKILL) -> Iterator[PanelServe]:
    """`callbot serve --engine ENGINE` on the config of `serve_config` with `tail` after its account, each
    of `users` ((name, role) or (name, role, tenant)) added with `password`, metrics on a free port if
    `metrics`. `panel`: "in-serve" adds `[web] listen` on the panel's port to the config; "beside-serve"
    runs `callbot web --listen` on that port over the same config once serve is up. Yields once both say
    they are listening (within `ready_s` each); after, stops the panel beside, then serve (`stop_s`, then
    `stop_sig`). Their stderr is kept in serve.stderr and web.stderr."""
    sip_port, web_port = free_port(), free_port(socket.SOCK_STREAM)
    metrics_port = free_port(socket.SOCK_STREAM) if metrics else None
    if panel == "in-serve":
        tail += f'[web]\nlisten = "127.0.0.1:{web_port}"\n'
    cfg = serve_config(tmp_path, sip_port, metrics_port, tail=tail)
    for name, role, *tenant in users:
        add_user(cfg, name, role, password, *tenant, env=env)
    proc = subprocess.Popen([*CALLBOT, "serve", "--engine", engine, "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = _Lines(proc.stderr, tmp_path / "serve.stderr")
    web = None
    try:
        err.wait_line("listening", ready_s)
        if panel == "beside-serve":
            web = subprocess.Popen([*CALLBOT, "web", "--listen", f"127.0.0.1:{web_port}", "--config", str(cfg)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _Lines(web.stderr, tmp_path / "web.stderr").wait_line("listening", ready_s)
        yield PanelServe(cfg, sip_port, web_port, metrics_port, f"http://127.0.0.1:{web_port}", proc, err)
    finally:
        if web is not None:
            stop_process(web)
        stop_process(proc, stop_s, stop_sig)
