"""`callbot serve --edge --workers N`: several SIP workers on one machine behind the kamailio edge, kept
running by a supervisor that drains them at shutdown.

Why several processes: the pjsua2 wheel holds 4 calls per process (compile-time PJSUA_MAX_CALLS; pjsua
clamps a larger maxCalls silently), so a machine that can serve more calls runs more SIP processes. The
supervisor (this process, which loads neither pjsua2 nor the model) starts:

- one `callbot model-service` when the engine is the model: the weights are loaded and the bots' prompts
  prepared once, for every worker (engine/serving/inference_service.py), and a worker that dies costs
  only its calls. With `--engine echo` every worker has its own echo line and there is no service,
  unless the config names one (`[model] service`): then the service serves the echo line and the
  workers are its clients, the whole topology without weights (what tests/test_edge_nodes.py runs);
- N `callbot serve` workers on loopback, worker i on serve's transport port + i - 1 (4 calls each), RTP
  from `rtp_port` + (i - 1) * RTP_PORTS_PER_WORKER, metrics (when on) on the `[metrics]` port + i (the
  model service keeps that port itself), each behind the edge as `serve --edge` would be
  (`edge.serve_settings`). They are the same `callbot serve` program, told their part with a hidden
  `--supervised` option (`Supervised`, JSON);
- kamailio on the public port (app/edge.py) with its dispatcher module over the workers and any
  `[edge] nodes`: OPTIONS pings say who is up, a 486/503 from a full worker goes to the next, a call's
  later requests follow it to its worker.

Why a supervisor of our own rather than N service units: one config and one command is the whole
deployment; it sees a worker die at once and takes it out of the edge's set then (the pings would take
two intervals, and calls sent meanwhile would wait 4 s for nothing), restarts it with back-off and puts
it back as soon as it listens; and a drained shutdown needs one conductor. On SIGTERM/SIGINT the edge
answers new INVITEs 503 with Retry-After (callers and upstream proxies go elsewhere), the calls in
progress - the edge's dialogs, on every worker and node - run until they end or `[edge] drain_s` has
passed, then the workers stop (hanging up what is left, through the edge), then the model service,
then kamailio. A second signal cuts the drain short.

Every child runs in a session of its own (a Ctrl-C in the terminal reaches the supervisor only, which
drains) and dies with the supervisor (Linux's parent-death signal; macOS: edge.watch_for_orphan). The
children's stderr is passed on, each line prefixed with its name; their JSON event lines share stdout.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Literal

import msgspec

from callbot.app import edge as edge_mod
from callbot.app.edge import Backend, Edge
from callbot.app.errors import StartupError
from callbot.app.metrics import parse_address
from callbot.app.settings import ConfigError, RetentionSettings, Settings, WebSettings

RTP_PORTS_PER_WORKER = 100  # worker i's RTP starts this far above worker i-1's (4 calls use 8 ports)
BACKOFF_S = (0.5, 30.0)  # a worker that died is restarted after the first, doubling up to the second
STABLE_S = 60.0  # a worker that ran this long before dying starts its back-off again from the first
READY_TIMEOUT_S = 120.0  # a worker's start (pjsua2, the recognizer); the model service has no bound: weights
STOP_TIMEOUT_S = 20.0  # a worker hangs up its calls and stops; then SIGKILL
EXIT_FAILURE = 1  # kamailio died, or nothing could be started again


class Supervised(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A child's part of the deployment, given by the supervisor as `--supervised JSON` (not for users)."""

    role: Literal["worker", "service"]
    index: int = 0  # workers: 1..N
    sip_port: int = 0
    rtp_port: int | None = None  # None: the config's
    service: str | None = None  # the model service's socket (None: the echo line, no service)
    metrics: str | None = None  # host:port; None: off


def supervised_settings(settings: Settings, spec: Supervised) -> Settings:
    """The settings a supervised child runs with: the user's, with its port, RTP, socket and metrics; a
    worker's also as behind the edge (edge.serve_settings: RTP on the public side, the edge exempt)."""
    if spec.role == "worker":
        settings = edge_mod.serve_settings(settings)
        i, t = edge_mod._serve_transport(settings)
        t = msgspec.structs.replace(t, port=spec.sip_port, rtp_port=t.rtp_port if spec.rtp_port is None else spec.rtp_port)
        transports = settings.sip.transports[:i] + (t,) + settings.sip.transports[i + 1:]
        settings = msgspec.structs.replace(settings, sip=msgspec.structs.replace(settings.sip, transports=transports))
    metrics = (msgspec.structs.replace(settings.metrics, address=spec.metrics) if spec.metrics
               else msgspec.structs.replace(settings.metrics, enabled=False))
    model = msgspec.structs.replace(settings.model, service=spec.service)
    # served once, by the supervisor (Supervisor._start_shared): the panel, the store's API and campaigns,
    # the retention job; N children would fight for one port and purge the same calls N times
    shared_off = dict(web=WebSettings(), store=msgspec.structs.replace(settings.store, api=None),
                      retention=RetentionSettings(),
                      tenants=tuple(msgspec.structs.replace(t, retention_days=None) for t in settings.tenants))
    return msgspec.structs.replace(settings, metrics=metrics, model=model, **shared_off)


def worker_ports(settings: Settings, count: int) -> list[int]:
    """The workers' SIP ports: serve's transport port and the next ones (each checked free now), or free
    ones the OS picks when that port is 0."""
    i, t = edge_mod._serve_transport(settings)
    host = _loopback_host(t.bind)
    if t.port == 0:
        ports: list[int] = []
        while len(ports) < count:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in ports and port != settings.edge.port:
                ports.append(port)
        return ports
    ports = list(range(t.port, t.port + count))
    where = f"$.sip.transports[{i}].port"
    if ports[-1] > 65535:
        raise StartupError(f"{where}: {count} workers take ports {ports[0]}-{ports[-1]}: pick a lower port")
    if settings.edge.port in ports:
        raise StartupError(f"{where}: {count} workers take ports {ports[0]}-{ports[-1]}, the edge's port "
                           f"{settings.edge.port} among them: move one of them")
    for port in ports:
        if _udp_taken(host, port):
            raise StartupError(f"{where}: {count} workers take UDP ports {ports[0]}-{ports[-1]} on {host}, and "
                               f"{port} is in use")
    return ports


def _loopback_host(bind: str) -> str:
    return "127.0.0.1" if bind == "localhost" else bind


def _udp_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass(eq=False)
class Child:
    """One process the supervisor keeps running: a worker or the model service."""

    name: str  # "worker 2", "model service": its lines' prefix
    argv: list[str]
    ready_text: str  # the line of its stderr that says it is up
    backend: Backend | None = None  # a worker's address in the edge's dispatcher set
    proc: subprocess.Popen | None = None
    watcher: subprocess.Popen | None = None  # macOS: edge.watch_for_orphan
    ready: threading.Event = field(default_factory=threading.Event)
    announced: bool = False  # its coming up was acted on (the edge told)
    started_at: float = 0.0
    backoff_s: float = BACKOFF_S[0]
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    """The model service (if any), N workers and the edge; `run()` until a signal, then a drained stop."""

    def __init__(self, settings: Settings, engine_kind: str, workers: int, *, config: str | None,
                 model: str | None, source: str, out: IO[str] | None = None):
        if not 1 <= workers <= 64:
            raise ConfigError(f"--workers: {workers} is not in 1..64")
        self.settings = settings
        self.engine_kind = engine_kind
        self.source = source
        self.config = config
        self._shared: list = []  # stops of what _start_shared started, in start order
        self.out = out or sys.stderr
        self._lock = threading.Lock()  # lines from several reader threads
        edge_mod.check_settings(settings)
        edge_mod.preflight(settings.edge)  # a missing kamailio is one line before anything starts
        self._tmp: str | None = None  # the model service's socket when the config names none
        base = [sys.executable, "-m", "callbot.app.cli"]
        rest = (["--config", config] if config else []) + (["--model", model] if model else [])
        common = ["--engine", engine_kind, *rest]
        metrics = parse_address(settings.metrics.address) if settings.metrics.enabled else None

        def metrics_at(offset: int) -> str | None:
            if metrics is None:
                return None
            host, port = metrics
            return f"{'[' + host + ']' if ':' in host else host}:{port + offset if port else 0}"

        self.service: Child | None = None
        socket_path = None
        if engine_kind == "model" or settings.model.service:
            if not settings.model.service:
                self._tmp = tempfile.mkdtemp(prefix="callbot-")  # short: a Unix socket's path holds ~104 bytes
            socket_path = settings.model.service or os.path.join(self._tmp, "model.sock")
            spec = Supervised(role="service", service=socket_path, metrics=metrics_at(0))
            self.service = Child("model service", [*base, "model-service", *common, "--supervised",
                                                   msgspec.json.encode(spec).decode()], "model service listening")
        try:
            # with a service the workers are its clients ([model] service), whatever engine it runs
            worker_engine = "model" if self.service is not None else engine_kind
            self.workers = self._workers(settings, workers, base + ["serve", "--engine", worker_engine, *rest],
                                         socket_path, metrics_at)
        except BaseException:
            self._remove_tmp()
            raise
        self.edge: Edge | None = None

    def _workers(self, settings: Settings, count: int, argv: list[str], socket_path: str | None,
                 metrics_at) -> list[Child]:
        i, t = edge_mod._serve_transport(settings)
        host = _loopback_host(t.bind)
        workers = []
        for n, port in enumerate(worker_ports(settings, count), start=1):
            spec = Supervised(role="worker", index=n, sip_port=port, service=socket_path, metrics=metrics_at(n),
                              rtp_port=t.rtp_port + (n - 1) * RTP_PORTS_PER_WORKER if t.rtp_port else None)
            if spec.rtp_port is not None and spec.rtp_port > 65535 - 8:
                raise StartupError(f"$.sip.transports[{i}].rtp_port: {count} workers need RTP ports up to "
                                   f"{spec.rtp_port + 8}: pick a lower rtp_port")
            supervised_settings(settings, spec)  # its problems now, as one line, not in N children
            workers.append(Child(f"worker {n}", [*argv, "--supervised", msgspec.json.encode(spec).decode()],
                                 "listening ", backend=Backend(host, port)))
        return workers

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                for name in os.listdir(self._tmp):
                    os.unlink(os.path.join(self._tmp, name))
                os.rmdir(self._tmp)
            self._tmp = None

    # -- the children ----------------------------------------------------------------------------------

    def _say(self, line: str) -> None:
        with self._lock:
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()

    def _spawn(self, child: Child) -> None:
        """Start `child` (on the main thread: Linux's parent-death signal follows the thread that forked)."""
        death_signal = edge_mod._death_signal()
        child.ready.clear()
        child.announced = False
        child.proc = subprocess.Popen(child.argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True, preexec_fn=death_signal)
        if death_signal is None:
            child.watcher = edge_mod.watch_for_orphan(child.proc.pid)
        child.started_at = time.monotonic()
        child.restart_at = None
        threading.Thread(target=self._pass_lines, args=(child, child.proc), name=f"{child.name} lines",
                         daemon=True).start()

    def _pass_lines(self, child: Child, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._say(f"{child.name}: {line.rstrip()}")
            if child.ready_text in line and proc is child.proc:
                child.ready.set()

    def _wait_ready(self, children: list[Child], stop: threading.Event, timeout: float | None) -> None:
        """Until every child says it is up; StartupError when one exits first or the time runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(c.ready.is_set() for c in children):
            for c in children:
                if c.proc is not None and c.proc.poll() is not None and not c.ready.is_set():
                    time.sleep(0.1)  # its last lines
                    raise StartupError(f"{c.name} exited with status {c.proc.returncode} at start (its lines are above)")
            if stop.is_set():
                raise _Interrupted()
            if deadline is not None and time.monotonic() > deadline:
                raise StartupError(f"{', '.join(c.name for c in children if not c.ready.is_set())} did not start "
                                   f"within {timeout:.0f} s")
            stop.wait(0.05)
        for c in children:
            c.announced = True

    def _stop_child(self, child: Child, timeout: float = STOP_TIMEOUT_S) -> None:
        if child.watcher is not None:
            child.watcher.terminate()
            child.watcher.wait(5)
            child.watcher = None
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._say(f"callbot: {child.name} did not stop within {timeout:.0f} s: killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def _stop_all(self, children: list[Child]) -> None:
        """SIGTERM to all at once (each hangs up its own calls), then wait for each."""
        for c in children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.terminate()
        for c in children:
            self._stop_child(c)

    # -- running ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, tend it until SIGTERM/SIGINT, drain, stop; the exit status."""
        with edge_mod.drain_signals() as sig:
            try:
                return self._run(sig)
            except _Interrupted:
                return 0
            finally:
                self._stop_all(self.workers)
                if self.service is not None:
                    self._stop_child(self.service)
                self._stop_shared()
                if self.edge is not None:
                    if self.edge.proc is not None and self.edge.proc.poll() is None:
                        self.edge.hang_up_leftovers(self._say)
                    self.edge.stop()
                self._remove_tmp()

    def _start_shared(self) -> None:
        """The panel, the store's API with the campaigns, and the retention job, once for all workers (in
        this process: none of them loads pjsua2 or the model). A port that is taken is one line and exit 2,
        before any worker starts. The panel here has no live calls (each worker holds its own)."""
        from callbot.app.store_services import start_campaigns, start_retention, start_store_api
        from callbot.app.web_host import start_web

        s = self.settings
        registry = None
        if s.store.enabled and s.store.api:
            registry = start_campaigns(s)
            self._shared.append(registry.close)
            api = start_store_api(s, registry)
            self._shared.append(api.stop)
            self._say(f"callbot: the store's API on http://{s.store.api}/api/calls")
        web = start_web(s, None, config=self.config, registry=registry)
        if web is not None:
            self._shared.append(web.stop)
            self._say(f"callbot: the web panel on http://{s.web.listen}/")
        retention = start_retention(s)
        if retention is not None:
            self._shared.append(retention.stop)

    def _stop_shared(self) -> None:
        while self._shared:
            stop = self._shared.pop()
            try:
                stop()
            except Exception as err:  # noqa: BLE001 - the others still stop
                self._say(f"callbot: warning: stopping a shared service: {err}")

    def _run(self, sig: edge_mod.Signals) -> int:
        self._start_shared()
        if self.service is not None:
            self._spawn(self.service)
            self._wait_ready([self.service], sig.stop, None)  # loading weights takes what it takes
        for w in self.workers:
            self._spawn(w)
        self._wait_ready(self.workers, sig.stop, READY_TIMEOUT_S)
        self.edge = Edge(self.settings, [w.backend for w in self.workers], source=self.source, dispatch=True)
        self.edge.start()
        if self.service is not None:
            self._say(f"{self.service.name}: pid {self.service.proc.pid}")
        for w in self.workers:
            self._say(f"{w.name}: pid {w.proc.pid}, sip:{w.backend}")
        self._say(self.edge.describe())
        while not sig.stop.is_set():
            if self.edge.proc.poll() is not None:
                self._say(f"callbot: error: kamailio (the edge) exited with status {self.edge.proc.returncode}; "
                          "shutting down")
                return EXIT_FAILURE
            self._tend()
            sig.stop.wait(0.1)
        self._drain(sig)
        return 0

    def _tend(self) -> None:
        """Restart what died (with back-off); tell the edge when a worker goes and when it is back."""
        now = time.monotonic()
        for child in ([self.service] if self.service else []) + self.workers:
            proc = child.proc
            if proc is not None and proc.poll() is not None and child.restart_at is None:
                ran = now - child.started_at
                child.backoff_s = BACKOFF_S[0] if ran >= STABLE_S else child.backoff_s
                child.restart_at = now + child.backoff_s
                if child.backend is not None:
                    self._set_state(child, "ip")  # out now; its pings or its restart bring it back
                self._say(f"callbot: {child.name} (pid {proc.pid}) exited with status {proc.returncode} after "
                          f"{ran:.1f} s; restarting it in {child.backoff_s:.1f} s")
                child.backoff_s = min(child.backoff_s * 2, BACKOFF_S[1])
            elif child.restart_at is not None and now >= child.restart_at:
                if child.watcher is not None:
                    child.watcher.terminate()
                    child.watcher.wait(5)
                    child.watcher = None
                child.restarts += 1
                self._spawn(child)
            elif child.ready.is_set() and not child.announced and proc is not None and proc.poll() is None:
                child.announced = True
                if child.backend is not None:
                    self._set_state(child, "ap")
                self._say(f"callbot: {child.name} is back (pid {proc.pid}, restart {child.restarts})")

    def _set_state(self, child: Child, state: str) -> None:
        try:
            self.edge.set_state(child.backend, state)
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            self._say(f"callbot: warning: the edge was not told that {child.name} is "
                      f"{'back' if state.startswith('a') else 'gone'}: {err}")

    def _drain(self, sig: edge_mod.Signals) -> None:
        """New calls refused at the edge; the running ones go on until they end or drain_s has passed (a
        worker that dies meanwhile is still restarted: its calls are gone, others may come)."""
        assert self.edge is not None
        self.edge.drain_calls(self.settings.edge.drain_s, lambda: sig.count >= 2, self._say, tend=self._tend,
                              wake=sig.wake)


class _Interrupted(Exception):
    """A signal arrived before everything had started."""


def supervise(settings: Settings, engine_kind: str, workers: int, *, config: str | None, model: str | None,
              source: str) -> int:
    """`callbot serve --edge --workers N`."""
    return Supervisor(settings, engine_kind, workers, config=config, model=model, source=source).run()


def parse_supervised(text: str) -> Supervised:
    try:
        return msgspec.json.decode(text, type=Supervised)
    except msgspec.MsgspecError as err:
        raise ConfigError(f"--supervised: {err}") from None
