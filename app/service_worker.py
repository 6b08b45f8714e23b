"""`callbot serve` as a worker of a shared model service (`[model] service`): the app's side of it.

Why its own module: the engine (engine/serving/service_client.py) knows the service and its words, not
SIP. Here its answers become the SIP side's: an INVITE the model has no room for (or no service to
serve it) is refused at once with 503 and a Retry-After (the Endpoint's screen hook, after the call
routes have had their say), so the caller - or the edge in front of several workers - tries again or
elsewhere instead of getting a silent call; calls whose service went away are hung up through the
endpoint; the refusals are counted by reason in the worker's metrics. Nothing here loads the model: the
worker process never imports MLX.
"""
from __future__ import annotations

from typing import Callable

from callbot.app.errors import StartupError
from callbot.app.metrics import Metrics
from callbot.app.settings import Settings
from callbot.engine.serving.inference_service import ServiceError, check_socket_path
from callbot.engine.serving.service_client import ServiceEngine
from callbot.sip import events as ev
from callbot.sip.call_record import CallRecord

REFUSAL_CODE = 503  # Service Unavailable: with Retry-After, the answer RFC 3261 21.5.4 gives an overload

Screen = Callable[[CallRecord], "tuple[int, str] | tuple[int, str, int] | None"]


def build_service_engine(settings: Settings) -> ServiceEngine:
    """The worker's engine: the model service at `[model] service` (connected, or being waited for); a
    path no socket can have is a StartupError."""
    try:
        check_socket_path(settings.model.service)
    except ServiceError as err:
        raise StartupError(str(err)) from None
    transports = settings.sip.transports
    where = f"{transports[0].bind}:{transports[0].port}" if transports else "serve"
    return ServiceEngine(settings.model.service, name=f"serve {where}",  # the service adds the pid
                         heartbeat_s=settings.model.heartbeat_s, heartbeat_misses=settings.model.heartbeat_misses)


def worker_screen(engine, routes_screen: Screen | None) -> Screen | None:
    """The INVITE screen of a worker: the routes' first (a number nobody serves gets their answer and
    costs no slot), then the model's room. Any other engine: the routes' screen as it is."""
    if not isinstance(engine, ServiceEngine):
        return routes_screen

    def screen(record: CallRecord):
        verdict = routes_screen(record) if routes_screen is not None else None
        if verdict is not None:
            return verdict
        refusal = engine.admit(record.call_id)
        if refusal is None:
            return None
        return REFUSAL_CODE, refusal.text, refusal.retry_after_s

    return screen


def attach_worker(engine, endpoint, metrics: Metrics, bus=None) -> None:
    """Calls whose service went away are hung up by the endpoint; refusals show in the metrics; a call's
    end gives its slot back if its INVITE was admitted but its call never opened."""
    if isinstance(engine, ServiceEngine):
        engine.hangup = endpoint.hangup
        metrics.watch_admission(engine)
        if bus is not None:
            bus.attach("service-release", lambda e: engine.release(e.call_id),
                       accept=lambda e: isinstance(e, ev.CallEnded))
