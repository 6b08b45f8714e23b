"""The app's event bus: every call event (SIP lifecycle, DTMF, the engine's live events) fanned out to
every subscriber (the JSON log, metrics, and later flows, analytics, the web panel).

Why bounded queues with counted drops: events are published from threads that must never wait (the
inference process's reader, the engine's thread, the main pump behind the SIP thread). A subscriber
that falls behind loses its own newest events, counted in `dropped` (and in Prometheus), and never
slows the publisher or the other subscribers. Why our own and not a library: what is needed is
stdlib queue.Queue per subscriber and a thread per handler; a broker (Redis, NATS) would add a process
to the Mac mini for nothing one process cannot do.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Generic, TypeVar, Union

from callbot.engine.contract import AppEvent, EngineEvent, LiveEvent
from callbot.sip import events as sip_events

log = logging.getLogger(__name__)

# what `callbot serve` publishes: the endpoint's events, the engine's live ones and the app's own
BusEvent = Union[sip_events.Event, LiveEvent, AppEvent]
_SIP_CALL_EVENTS = (sip_events.IncomingCall, sip_events.CallProgress, sip_events.CallConfirmed,
                    sip_events.CallMedia, sip_events.CallEnded, sip_events.DtmfReceived,
                    sip_events.TransferProgress)


def call_id_of(event: BusEvent) -> str | None:
    """The SIP Call-ID an event is about; None for an endpoint's own events (registration, a refused
    INVITE, shutdown)."""
    if isinstance(event, (EngineEvent, AppEvent, *_SIP_CALL_EVENTS)):
        return event.call_id
    return None

E = TypeVar("E")
DEFAULT_QUEUE = 4096  # events per subscriber: ~5 minutes of one call's events, seconds of a flood's


class Subscription(Generic[E]):
    """One subscriber's queue. `get` waits for the next event; `dropped` counts what did not fit."""

    def __init__(self, name: str, maxsize: int, accept: Callable[[E], bool] | None):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be an int >= 1 (events), got {maxsize!r}")
        self.name = name
        self.accept = accept
        self.dropped = 0
        self.delivered = 0
        self.errors = 0  # a handler's (attach) exceptions
        self._queue: queue.Queue = queue.Queue(maxsize)

    def offer(self, event: E) -> None:
        """Enqueue without waiting (the publisher's thread); a full queue drops the event and counts it."""
        if self.accept is not None and not self.accept(event):
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float | None = None) -> E | None:
        """The next event, or None if none came within `timeout` seconds."""
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        self.delivered += 1
        return event

    @property
    def pending(self) -> int:
        return self._queue.qsize()


class EventBus(Generic[E]):
    """Publish from any thread; subscribe with a queue (`subscribe`) or a handler on its own thread
    (`attach`). `close` stops the handlers once they have taken what was published before it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the subscriber list: copied on change, read without the lock
        # one publish at a time: an event a handler publishes in answer to another (a flow's start on its
        # call's event) reaches every subscriber after that other, never between two of its offers
        self._publishing = threading.Lock()
        self._subscriptions: tuple[Subscription[E], ...] = ()
        self._handlers: list[_Handler[E]] = []

    def subscribe(self, name: str, maxsize: int = DEFAULT_QUEUE,
                  accept: Callable[[E], bool] | None = None) -> Subscription[E]:
        sub: Subscription[E] = Subscription(name, maxsize, accept)
        with self._lock:
            self._subscriptions = (*self._subscriptions, sub)
        return sub

    def unsubscribe(self, sub: Subscription[E]) -> None:
        with self._lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not sub)

    def attach(self, name: str, handler: Callable[[E], None], maxsize: int = DEFAULT_QUEUE,
               accept: Callable[[E], bool] | None = None) -> Subscription[E]:
        """Calls `handler(event)` for every event on a thread of its own; an exception it raises is
        logged and counted in the subscription's `errors`, and the handler goes on with the next event."""
        sub = self.subscribe(name, maxsize, accept)
        h = _Handler(sub, handler)
        with self._lock:
            self._handlers.append(h)
        h.thread.start()
        return sub

    def publish(self, event: E) -> None:
        """Offers `event` to every subscriber; held only for those non-blocking offers (microseconds)."""
        with self._publishing:
            for sub in self._subscriptions:  # a tuple: a subscribe meanwhile does not disturb this loop
                sub.offer(event)

    @property
    def subscriptions(self) -> tuple[Subscription[E], ...]:
        return self._subscriptions

    def close(self, timeout: float = 5.0) -> None:
        """Lets each handler finish what is queued, then stops it; safe to call more than once."""
        with self._lock:
            handlers, self._handlers = self._handlers, []
        for h in handlers:
            h.stop.set()
        for h in handlers:
            h.thread.join(timeout)
            self.unsubscribe(h.sub)


class _Handler(Generic[E]):
    def __init__(self, sub: Subscription[E], fn: Callable[[E], None]):
        self.sub = sub
        self.fn = fn
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"bus-{sub.name}", daemon=True)

    def _run(self) -> None:
        while True:
            event = self.sub.get(timeout=0.1)
            if event is None:
                if self.stop.is_set():
                    return  # stopped and drained
                continue
            try:
                self.fn(event)
            except Exception:
                self.sub.errors += 1
                log.exception("event bus: subscriber %s failed on %s", self.sub.name, type(event).__name__)
