"""The server program behind `callbot serve` and `callbot call`: settings -> engine -> endpoint -> events.

One place assembles the product from its parts, in the order their lifetimes need: the engine and the
recorder outlive the endpoint (the endpoint closes sessions and finishes recordings as it hangs up), and
the event bus and metrics outlive both. Every event - the endpoint's (SIP lifecycle, DTMF, transfer)
and the engine's live ones (text, speech start/stop, clips played) - goes onto one EventBus; the JSON
log and the metrics are its first subscribers, each on its own thread. The main thread pumps the
endpoint's events onto the bus and waits for SIGTERM/SIGINT. `Server.calls` is the live control of the
calls in progress (app/calls.py).
"""
from __future__ import annotations

import contextlib
import os
import queue
import signal
import sys
import threading
from typing import Callable, Iterator


from callbot.engine.serving.stderr_line import say
from callbot.app.caller_speech import start_caller_speech
from callbot.app.calls import CallRouter, LiveCall
from callbot.app.dial_probe import NoResponseWatch, udp_target
from callbot.app.errors import StartupError
from callbot.app.event_bus import EventBus, call_id_of
from callbot.app.event_log import EventLog
from callbot.app.flow_host import FlowHost, start_flows
from callbot.app.metrics import Metrics
from callbot.app.recording import Recorder
from callbot.app.routes import CallRoutes
from callbot.app.service_worker import attach_worker, worker_screen
from callbot.app.settings import ConfigError, Settings
from callbot.app.store_services import start_campaigns, start_retention, start_store_api
from callbot.engine.contract import CallEngine, FrameStages
from callbot.sip import events as ev
from callbot.sip.endpoint import Endpoint

ENGINES = ("model", "echo")

# `callbot call` exit statuses: how the call ended
EXIT_ANSWERED = 0  # answered, then hung up by either side
EXIT_USAGE = 2  # bad arguments, config or weights (argparse uses 2 too)
EXIT_BUSY = 3  # 486/600 busy
EXIT_NO_ANSWER = 4  # dial timeout or 408/480
EXIT_FAILED = 5  # any other failure before or during the call
EXIT_INTERRUPTED = 130  # stopped by SIGINT/SIGTERM
EXIT_SERVER_FAILURE = 1  # `serve`: a part died (SIP thread, engine, recorder); calls were hung up

# `callbot call` gives up on a call that hears nothing back (app/dial_probe.py) instead of waiting out
# pjsip's INVITE timeout (32 s): over UDP the INVITE goes out at 0, 0.5, 1.5 and 3.5 s (T1 = 500 ms,
# doubling), and any listener answers the first it gets with 100 Trying within 200 ms (RFC 3261 8.2.6.1)
NO_RESPONSE_S = 5.0
PROBE_S = 1.0  # an ICMP "port unreachable" comes back within a round trip; a second covers a slow host


def build_engine(kind: str, settings: Settings) -> CallEngine:
    """The CallEngine answering calls: the echo line, or the model runner."""
    if kind == "echo":
        from callbot.engine.serving.echo import EchoEngine

        return EchoEngine()
    if kind == "model":
        from callbot.app.model_engine import build_model_engine

        return build_model_engine(settings)
    raise ConfigError(f"unknown engine {kind!r}, expected one of {', '.join(ENGINES)}")


@contextlib.contextmanager
def running_server(settings: Settings, engine_kind: str, log: EventLog | None = None,
                   config: str | None = None) -> Iterator["Server"]:
    """Start everything; on exit, stop it in reverse order, whatever happened inside. `config`: the file
    `settings` came from (the panel's bot editor edits it)."""
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(settings.recordings_dir, exist_ok=True)
        except OSError as err:
            raise StartupError(f"recordings_dir {settings.recordings_dir!r}: cannot create it ({err.strerror})") from None
        writer = _store_writer(settings)  # app/store_writer.py: None with [store] enabled = false
        if writer is not None:
            stack.callback(writer.close)  # last of all: after the bus has handed it the calls' last events
        metrics = Metrics()
        analysis = _analysis_host(settings, writer, metrics)  # app/analysis_host.py: None with [analytics] off
        if analysis is not None:
            # after the recorder has finished every call's files, before the writer stops: the last calls'
            # analyses (within [analytics] shutdown_wait_s) reach the store
            stack.callback(analysis.close)
            metrics.watch_analysis(analysis)
        if settings.metrics.enabled:
            try:
                metrics.serve(settings.metrics.address)
            except (OSError, ValueError) as err:
                raise StartupError(f"metrics address {settings.metrics.address!r}: {err}") from None
            stack.callback(metrics.close)
        bus: EventBus = EventBus()
        stack.callback(bus.close)  # after the endpoint and the engine: their last events get handled
        log = log or EventLog()
        # the per-frame stage stamps are for metrics and the panel, not for the log's readers
        bus.attach("log", log.write, accept=lambda e: not isinstance(e, FrameStages))
        bus.attach("metrics", metrics.on_event)
        metrics.watch_bus(bus)
        if writer is not None:
            from callbot.app.store_writer import StoreCollector

            metrics.registry.register(StoreCollector(writer))  # callbot_store_written/dropped/failures, queue
        engine = build_engine(engine_kind, settings)
        stack.callback(engine.close)
        engine.on_event = bus.publish
        routes = CallRoutes.from_settings(settings)  # which bot and tenant take a call (app/routes.py)
        bot_reload = None
        if config is not None:  # app/bot_reload.py: bots and routes changed in the file reach the next calls
            from callbot.app.bot_reload import BotReload

            bot_reload = BotReload(config, settings, routes, engine=engine)  # a changed bot is prepared again
            stack.callback(bot_reload.close)
        caller_speech = start_caller_speech(settings, bus)  # app/caller_speech.py: None with [recognizer] "none"
        listener = caller_speech[0] if caller_speech is not None else None
        recorder = Recorder(settings.recordings_dir, directory_for=routes.recordings_dir_for, listener=listener)
        stack.callback(recorder.close)
        metrics.watch_recorder(recorder)  # what the disk refused, the room left on it
        retention = start_retention(settings)  # store/retention.py: once an hour, when a period is set
        if retention is not None:
            stack.callback(retention.stop)
            metrics.watch_retention(retention)  # runs, failures, deleted, the last success's time
        if analysis is not None:
            analysis.watch(recorder)  # each call analysed once its files are final
        if caller_speech is not None:
            caller_speech[0].recorder = recorder
            # before the recorder closes, after the endpoint has ended every call: the last words get flushed
            stack.callback(caller_speech[1].stop)
        bus.attach("recorder", recorder.on_event)
        if writer is not None:
            writer.attach(bus)
        router = CallRouter(engine, start_for=routes.start_for)
        # on a shared model service the screen also asks the model for room (503 + Retry-After when none)
        # the endpoint's events reach the bus on the thread that emits them, in the order they happen
        endpoint = Endpoint(settings.endpoint_config(), sessions=router,
                            recorder=writer.tap(recorder) if writer is not None else recorder,
                            screen=worker_screen(engine, bot_reload.screen if bot_reload else routes.screen),
                            on_event=bus.publish)
        attach_worker(engine, endpoint, metrics, bus)  # app/service_worker.py: a lost service's calls hung up
        router.ops = endpoint
        flows = start_flows(settings, bus)  # app/flow_host.py: None when no bot has a flow
        if flows is not None:
            stack.callback(flows.close)  # before the bus closes, after the endpoint has ended every call
            router.watchers.append(flows)
            if listener is not None:
                listener.redacting = flows.redacting  # a secret being typed or read out is never transcribed
        if bot_reload is not None:
            router.watchers.append(bot_reload)
        server = Server(settings, endpoint, engine, router, recorder, metrics, bus)
        server.flows = flows
        server.retention = retention
        server.store_writer = writer
        server.analysis = analysis
        if settings.store.enabled and settings.store.api:
            # campaigns started from this API dial from their own config ("config" in the POST, else
            # [campaigns] dialer_config): this process holds the SIP port and the API address of its own
            campaigns = start_campaigns(settings)
            stack.callback(campaigns.close)
            server.campaigns = campaigns  # the panel's campaigns page reads and controls them too
            server.store_api = start_store_api(settings, campaigns)
            stack.callback(server.store_api.stop)
        from callbot.app.web_host import start_web

        server.web = start_web(settings, server, config=config)  # app/web_host.py: the panel on [web] listen, else None
        if server.web is not None:
            stack.callback(server.web.stop)
        stack.callback(server.drain)  # runs after the stop below: hang-ups and un-REGISTERs get logged
        stack.callback(endpoint.stop)  # also when start times out with the SIP thread still running
        try:
            with _stdout_to_stderr():
                endpoint.start()
        except (OSError, RuntimeError, ValueError, TimeoutError) as err:
            raise StartupError(f"SIP endpoint did not start: {err}") from None
        yield server


def _store_writer(settings: Settings):
    """The call store's writer, or None when [store] is off (the store's modules are then never loaded)."""
    if not settings.store.enabled:
        return None
    from callbot.app.store_writer import StoreWriter

    return StoreWriter(settings.store_url())


def _analysis_host(settings: Settings, writer, metrics: Metrics):
    """Every recorded call analysed after hang-up (app/analysis_host.py), or None with [analytics] off (its
    modules are then never loaded)."""
    if not settings.analytics.enabled:
        return None
    from callbot.app.analysis_host import AnalysisHost

    return AnalysisHost(settings, writer, observe=metrics.on_analysis)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """pjlib prints a banner on fd 1 before any log setting applies; stdout is for the JSON log only."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class ServerFailure(Exception):
    """A part the server cannot run without has died (the SIP thread, the engine, the recorder)."""


class Server:
    def __init__(self, settings: Settings, endpoint: Endpoint, engine: CallEngine, router: CallRouter,
                 recorder: Recorder, metrics: Metrics, bus: EventBus):
        self.settings = settings
        self.endpoint = endpoint
        self.engine = engine
        self.router = router
        self.recorder = recorder
        self.metrics = metrics
        self.bus = bus
        self.flows: FlowHost | None = None  # the call flows of bots that have one
        self.store_writer = None  # app/store_writer.py: the call store's writer ([store] enabled)
        self.retention = None  # store/retention.py RetentionJob ([retention] days or a tenant's retention_days > 0)
        self.store_api = None  # store/api.py: the store's JSON API ([store] api)
        self.web = None  # web/server.py: the web panel ([web] listen)
        self.analysis = None  # app/analysis_host.py: every call analysed after hang-up ([analytics] enabled)
        self.campaigns = None  # app/campaign_api.py CampaignRegistry: the API's campaigns ([store] api)

    @property
    def calls(self) -> dict[str, LiveCall]:
        """The calls in progress by SIP Call-ID, each with its live control (play, hangup, ...)."""
        return self.router.calls

    def call(self, call_id: str) -> LiveCall:
        return self.router.call(call_id)

    def pump(self, until: Callable[[ev.Event], bool] | None = None, stop: threading.Event | None = None) -> ev.Event | None:
        """Takes the endpoint's events off its queue (the bus has them already: the endpoint publishes each
        as it emits it) until `until(event)` is true (returns it) or `stop` is set (returns None).

        Raises ServerFailure when a part has died: calls would go on silent or unrecorded otherwise."""
        while stop is None or not stop.is_set():
            self._check_health()
            try:
                event = self.endpoint.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if until is not None and until(event):
                return event
        return None

    def _check_health(self) -> None:
        if not self.endpoint.running:
            raise ServerFailure("the SIP endpoint stopped on its own (see the log above)")
        for name, err in (("engine", self.engine.error), ("recorder", self.recorder.error)):
            if err is not None:
                raise ServerFailure(f"the {name} failed: {err!r}")

    def drain(self) -> None:
        """Empties the endpoint's queue (its events are on the bus already)."""
        while True:
            try:
                self.endpoint.events.get_nowait()
            except queue.Empty:
                break


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An Event set by SIGTERM/SIGINT; Python runs the handler in the main thread between bytecodes."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def serve(settings: Settings, engine_kind: str, warning: str | None = None, config: str | None = None) -> int:
    """Answer calls until SIGTERM/SIGINT; `warning`, if any, is printed once the line is up."""
    with stop_on_signals() as stop, running_server(settings, engine_kind, config=config) as server:
        for name in server.endpoint.accounts:
            say(f"listening {server.endpoint.account_uri(name)} ({engine_kind})")
        if warning:
            say(warning)
        try:
            server.pump(stop=stop)
        except ServerFailure as err:
            say(f"callbot: error: {err}; shutting down")
            return EXIT_SERVER_FAILURE
    return 0


def exit_status_of(ended: ev.CallEnded, answered: bool, responded: bool = True) -> int:
    """`responded`: some SIP response came back (a 100 Trying is enough); a call nobody answered in any
    way failed, it was not left ringing."""
    if answered:
        return EXIT_ANSWERED
    if not responded:
        return EXIT_FAILED
    if ended.code in (486, 600) or ended.cause == "busy":
        return EXIT_BUSY
    if ended.cause == "timeout" or ended.code in (408, 480):
        return EXIT_NO_ANSWER
    return EXIT_FAILED


def _probe_target(settings: Settings, uri: str, account: str | None) -> tuple[str, int] | None:
    """Where to ask whether anything listens (app/dial_probe.py): not past an outbound proxy."""
    acc = next((a for a in settings.sip.accounts if a.name == account), None) if account else None
    acc = acc or (settings.sip.accounts[0] if settings.sip.accounts else None)
    return None if acc is None or acc.proxy else udp_target(uri)


def call(settings: Settings, engine_kind: str, uri: str, account: str | None, bot: str | None = None) -> int:
    """Place one call and follow it to its end; the exit status says how it ended."""
    with stop_on_signals() as stop, running_server(settings, engine_kind) as server:
        try:
            call_id = server.endpoint.dial(uri, account=account)
        except (ValueError, RuntimeError) as err:  # not a SIP URI, no transport for it, at capacity
            say(f"callbot: error: {err}")
            return EXIT_FAILED
        server.router.expect(call_id, bot=bot)
        watch = NoResponseWatch(uri, lambda: server.endpoint.hangup(call_id), _probe_target(settings, uri, account),
                                limit_s=NO_RESPONSE_S, probe_s=PROBE_S)
        answered = responded = False

        def is_end(event: ev.Event) -> bool:
            nonlocal answered, responded
            if call_id_of(event) != call_id:
                return False
            if isinstance(event, ev.CallProgress) and watch.heard():
                responded = True
                say(f"{event.code} {event.reason}")
            if isinstance(event, ev.CallConfirmed):
                answered = True
            return isinstance(event, ev.CallEnded)

        try:
            ended = server.pump(until=is_end, stop=stop)
        except ServerFailure as err:
            say(f"callbot: error: {err}")
            return EXIT_FAILED
        finally:
            watch.close()
        if ended is None:
            return EXIT_INTERRUPTED
        if watch.reason is not None:
            say(f"callbot: error: {watch.reason}")
            return EXIT_FAILED
        say(f"call ended: {ended.cause} ({ended.code} {ended.reason})")
        return exit_status_of(ended, answered, responded)
