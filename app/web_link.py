"""The web panel's window on a running `callbot serve` (web/serve_link.py's ServeLink over app/serve.py's
Server): the calls in progress with their live transcript, who is speaking and their flow state, their
hang-up and transfer (blind, or attended: the target called first), and the system page's numbers.

How it learns: as a watcher of the CallRouter (a call's audio up / gone: SIP thread) and a subscriber of
serve's event bus on a thread of its own (the engine's BotText, BotSpeech, CallerSpeech and FrameStages,
the recognizer's CallerWords, the flows' FlowTransition, SIP's TransferProgress and CallEnded). It keeps
per call only what the page shows (the last MAX_LINES transcript lines), and hands each change to the
panel's subscribers as a small dict; a subscriber's `notify` must not block (the panel's only enqueues
onto its event loop), so neither the SIP thread nor the bus ever waits on a browser.

Step time per batch size: serve's engine reports each frame's stage stamps (FrameStages, about once a
second per call); the step is `step_start` -> `decoded`, counted under the number of calls in progress
when the stamps arrive (a batched engine steps them together). A shared model service measures its own
rounds; its numbers are on its own metrics endpoint (docs/capacity.md).
"""
from __future__ import annotations

import collections
import shutil
import threading
import time
from typing import Any, Callable

import msgspec
import numpy as np

from callbot.app.calls import CallControlError, LiveCall
from callbot.engine.contract import (BotSpeech, BotText, CallerSpeech, CallerWords, FlowTransition, FrameStages)
from callbot.engine.serving.frame_stats import STAGES
from callbot.sip import events as ev
from callbot.web.serve_link import LiveCallView, LinkError, TranscriptLine, Update

MAX_LINES = 200  # transcript lines kept per call (a page shows the whole call only after it, from the store)
QUEUE = 4096  # the link's bus queue: a slow panel loses its own newest events, never slows the bus
# an attended transfer from the panel: how long the target may ring before the caller stays with the bot
ATTENDED_ANSWER_S = 30.0
ENDED_KEPT = 1024  # calls remembered as ended: a late event (the recognizer's last words) makes no ghost
_STEP_FROM, _STEP_TO = STAGES.index("step_start"), STAGES.index("decoded")
_WANTED = (BotText, CallerWords, BotSpeech, CallerSpeech, FlowTransition, FrameStages, ev.TransferProgress,
           ev.CallEnded, ev.RegistrationChanged, ev.RegistrationFailed)


class _Call:
    def __init__(self, call_id: str):
        self.call_id = call_id
        self.live: LiveCall | None = None
        self.state: str | None = None
        self.speaking = {"caller": False, "bot": False}
        self.lines: list[TranscriptLine] = []
        self.first_line = 0  # index of lines[0] since the call began (older ones dropped past MAX_LINES)
        self.transfer: str | None = None
        self.transfer_target: str | None = None  # asked from the panel

    @property
    def tenant(self) -> str | None:
        return self.live.record.labels.get("tenant") if self.live is not None else None


class _Feed:
    def __init__(self, link: "ServeWebLink", notify: Callable[[Update | None], None]):
        self.link = link
        self.notify = notify

    def close(self) -> None:
        self.link._drop(self)


class ServeWebLink:
    """ServeLink over `server` (app/serve.py Server). `start` hooks it in; `close` ends the subscribers'
    streams (serve is stopping)."""

    def __init__(self, server, *, clock: Callable[[], float] = time.time):
        self.server = server
        self.clock = clock
        self.started_at = clock()
        # one lock for the state and the order of updates: each is handed to the subscribers under it, so a
        # call's end never overtakes an update about it from another thread (notify only enqueues)
        self._lock = threading.RLock()
        self._calls: dict[str, _Call] = {}
        self._ended: collections.deque[str] = collections.deque(maxlen=ENDED_KEPT)
        self._feeds: tuple[_Feed, ...] = ()
        self._steps: dict[int, list[float]] = {}  # calls in progress -> [frames, sum s, max s]
        self._closed = False

    def start(self) -> ServeWebLink:
        self.server.router.watchers.append(self)
        self.server.bus.attach("web-live", self._on_event, maxsize=QUEUE, accept=lambda e: isinstance(e, _WANTED))
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            feeds, self._feeds = self._feeds, ()
        for feed in feeds:
            _tell(feed, None)

    # ---- ServeLink ------------------------------------------------------------------------------------

    def calls(self) -> list[LiveCallView]:
        with self._lock:
            views = [self._view(c) for c in self._calls.values() if c.live is not None]
        return sorted(views, key=lambda v: v.started)

    def subscribe(self, notify: Callable[[Update | None], None]) -> _Feed:
        feed = _Feed(self, notify)
        with self._lock:
            if not self._closed:
                self._feeds = (*self._feeds, feed)
                return feed
        _tell(feed, None)
        return feed

    def hangup(self, call_id: str) -> None:
        self._control(call_id, lambda live: live.hangup())

    def transfer(self, call_id: str, target: str, attended: bool = False) -> None:
        if attended:  # called on a consultation leg; the REFER with Replaces as soon as it answers
            self._control(call_id, lambda live: live.transfer_attended(target, answer_timeout_s=ATTENDED_ANSWER_S,
                                                                       refer_after_s=0.0))
        else:
            self._control(call_id, lambda live: live.transfer(target))
        with self._lock:
            c = self._calls.get(call_id)
            if c is None or c.live is None:
                return  # gone meanwhile
            c.transfer_target = target
            c.transfer = f"to {target}: " + ("calling them first" if attended else "asked")
            self._publish({"type": "call", "call": _builtins(self._view(c))})

    def listen(self, call_id: str, on_audio: Callable[[bytes], None]) -> tuple[int, Callable[[], None]]:
        with self._lock:
            c = self._calls.get(call_id)
            live = c.live if c is not None else None
        if live is None:
            raise LinkError(f"no call {call_id!r} in progress")

        def mixed(frames: np.ndarray) -> None:  # the recorder's thread: mixed, then only handed on
            both = frames.astype(np.int32).sum(axis=1)
            on_audio(np.clip(both, -32768, 32767).astype("<i2").tobytes())

        tapped = self.server.recorder.tap(call_id, mixed)
        if tapped is None:
            raise LinkError(f"call {call_id} is not recorded: there is no audio to listen to")
        return tapped

    def system(self) -> dict[str, Any]:
        s = self.server
        settings = s.settings
        m = settings.model
        engine = type(s.engine).__name__
        try:
            accounts = [{"name": a.name, "uri": a.uri, "direct": a.direct, "registered": a.registered,
                         "last_error": a.last_error} for a in s.endpoint.accounts.values()]
        except (RuntimeError, TimeoutError) as err:  # the SIP thread is gone or stuck: say so, show the rest
            accounts = [{"name": "?", "uri": "", "direct": False, "registered": False, "last_error": str(err)}]
        with self._lock:
            steps = [{"batch": b, "frames": int(n), "mean_ms": 1000 * total / n, "max_ms": 1000 * most}
                     for b, (n, total, most) in sorted(self._steps.items()) if n]
            used = sum(1 for c in self._calls.values() if c.live is not None)
        workers = [{"name": "engine", "what": engine, "state": _engine_state(s.engine)}]
        if settings.recognizer.engine != "none":
            workers.append({"name": "caller recognizer", "what": settings.recognizer.engine,
                            "state": "child process" if settings.recognizer.process else "thread"})
        if s.analysis is not None:
            workers.append({"name": "analysis", "what": f"{settings.analytics.workers} process(es)",
                            "state": f"{s.analysis.pending} pending"})
        if s.flows is not None:
            workers.append({"name": "flows", "what": "call flows", "state": "on"})
        metrics_url = None
        if s.metrics.address is not None:
            host, port = s.metrics.address[:2]
            metrics_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"
        return {
            "serve": True,
            "started_at": self.started_at,
            "engine": engine,
            "model": None if engine == "EchoEngine" else {
                "weights": m.path or "PersonaPlex-7B (Hugging Face cache)", "architecture": m.architecture,
                "quantization": m.quantization, "kv_bits": m.kv_bits, "process": m.process, "service": m.service,
                "batch": m.batch, "max_calls": m.max_calls},
            "slots": {"used": used, "capacity": s.endpoint.config.max_calls,
                      "model_limit": _model_limit(s.engine)},
            "steps": steps,
            "workers": workers,
            "sip": accounts,
            "metrics_url": metrics_url,
            "bus": [{"name": b.name, "dropped": b.dropped, "pending": b.pending} for b in s.bus.subscriptions],
            "recordings": recordings_state(s),
        }

    # ---- CallRouter watcher (SIP thread: quick, never raises) ------------------------------------------

    def call_opened(self, live: LiveCall) -> None:
        if live.transfer_of is not None:
            return  # an attended transfer's consultation leg: part of its call, not a call of its own
        with self._lock:
            c = self._calls.get(live.call_id) or self._calls.setdefault(live.call_id, _Call(live.call_id))
            c.live = live
            self._publish({"type": "call", "call": _builtins(self._view(c))})

    def call_closed(self, live: LiveCall) -> None:
        self._end(live.call_id)

    # ---- the bus (its thread) ---------------------------------------------------------------------------

    def _on_event(self, e) -> None:
        if isinstance(e, FrameStages):
            self._steps_of(e.rows)
            return
        if isinstance(e, (ev.RegistrationChanged, ev.RegistrationFailed)):
            return  # read from the endpoint when the page asks
        if isinstance(e, ev.CallEnded):
            self._end(e.call_id)
            return
        update: Update | None = None
        with self._lock:
            c = self._calls.get(e.call_id)
            if c is None:
                if e.call_id in self._ended or self._closed:
                    return
                c = self._calls[e.call_id] = _Call(e.call_id)  # before call_opened got here: filled in then
            if isinstance(e, BotText):
                update = self._text(c, "bot", e.piece, True, append=True)
            elif isinstance(e, CallerWords):
                update = self._text(c, "caller", e.text, e.final, append=False)
            elif isinstance(e, (BotSpeech, CallerSpeech)):
                c.speaking["bot" if isinstance(e, BotSpeech) else "caller"] = e.speaking
                update = {"type": "speaking", "call_id": c.call_id, "tenant": c.tenant, **c.speaking}
            elif isinstance(e, FlowTransition):
                c.state = e.to_state or "(ended)"
                update = {"type": "state", "call_id": c.call_id, "tenant": c.tenant, "state": c.state}
            elif isinstance(e, ev.TransferProgress):
                to = f"to {c.transfer_target}: " if c.transfer_target else ""
                c.transfer = f"{to}{e.code} {e.reason}" + (" (final)" if e.final else "")
                update = {"type": "call", "call": _builtins(self._view(c))} if c.live is not None else None
            if c.live is None:
                update = None  # not on the page yet: its header comes with call_opened, the rest with it
            self._publish(update)

    def _text(self, c: _Call, leg: str, text: str, final: bool, *, append: bool) -> Update | None:
        """The line `text` lands in: a bot piece extends the bot's open line; the recognizer's guess
        replaces the caller's open line, and its final word closes it."""
        last = c.lines[-1] if c.lines else None
        if append:
            if last is not None and last.leg == leg:
                last.text += text
            else:
                last = self._new_line(c, leg, text.lstrip(), True)
        else:
            text = text.strip()
            if not text:
                return None
            if last is not None and last.leg == leg and not last.final:
                last.text, last.final = text, final
            else:
                last = self._new_line(c, leg, text, final)
        return {"type": "line", "call_id": c.call_id, "tenant": c.tenant, "index": c.first_line + len(c.lines) - 1,
                "leg": last.leg, "text": last.text, "final": last.final}

    @staticmethod
    def _new_line(c: _Call, leg: str, text: str, final: bool) -> TranscriptLine:
        line = TranscriptLine(leg=leg, text=text, final=final)
        c.lines.append(line)
        if len(c.lines) > MAX_LINES:
            del c.lines[0]
            c.first_line += 1
        return line

    def _steps_of(self, rows: list[list[int]]) -> None:
        with self._lock:
            batch = max(1, sum(1 for c in self._calls.values() if c.live is not None))
            acc = self._steps.setdefault(batch, [0, 0.0, 0.0])
            for row in rows:
                a, b = row[_STEP_FROM], row[_STEP_TO]
                if a and b and b > a:
                    s = (b - a) / 1e9
                    acc[0] += 1
                    acc[1] += s
                    acc[2] = max(acc[2], s)

    # ---- helpers ----------------------------------------------------------------------------------------

    def _end(self, call_id: str) -> None:
        with self._lock:
            c = self._calls.pop(call_id, None)
            if c is None:
                return
            self._ended.append(call_id)
            if c.live is not None:
                self._publish({"type": "ended", "call_id": call_id, "tenant": c.tenant})

    def _control(self, call_id: str, op: Callable[[LiveCall], None]) -> None:
        with self._lock:
            c = self._calls.get(call_id)
            live = c.live if c is not None else None
        if live is None:
            raise LinkError(f"no call {call_id!r} in progress")
        try:
            op(live)
        except (CallControlError, ValueError, RuntimeError, TimeoutError) as err:
            raise LinkError(str(err) or type(err).__name__) from None

    @staticmethod
    def _view(c: _Call) -> LiveCallView:
        live = c.live
        assert live is not None
        r = live.record
        remote = (r.caller or r.remote_uri) if r.direction == "inbound" else (r.called or r.remote_uri)
        return LiveCallView(call_id=c.call_id, tenant=c.tenant, bot=live.start.bot, direction=r.direction,
                            remote=remote, started=r.answered or r.start, state=c.state,
                            speaking=dict(c.speaking),
                            lines=[TranscriptLine(leg=x.leg, text=x.text, final=x.final) for x in c.lines],
                            first_line=c.first_line,
                            transfer=c.transfer)

    def _publish(self, update: Update | None) -> None:
        if update is None:
            return
        for feed in self._feeds:  # a tuple: (un)subscribing meanwhile does not disturb this loop
            _tell(feed, update)

    def _drop(self, feed: _Feed) -> None:
        with self._lock:
            self._feeds = tuple(f for f in self._feeds if f is not feed)


def _tell(feed: _Feed, update: Update | None) -> None:
    try:
        feed.notify(update)
    except Exception:  # a subscriber's failure is its own (its stream ends); serve goes on
        feed.close()


def _builtins(view: LiveCallView) -> dict:
    return msgspec.to_builtins(view)


def _engine_state(engine) -> str:
    if getattr(engine, "error", None) is not None:
        return f"failed: {engine.error!r}"
    if hasattr(engine, "connected"):  # a shared model service's client
        return "connected to the model service" if engine.connected else "model service unreachable"
    pid = getattr(engine, "pid", None)
    return f"process {pid}" if isinstance(pid, int) else "running"


def _model_limit(engine) -> int | None:
    info = getattr(engine, "info", None)
    return getattr(info, "limit", None) if info is not None else None


def recordings_state(server) -> dict[str, Any]:
    """The recordings' disk as the system page shows it: room left, what it refused, the retention."""
    recorder, settings = server.recorder, server.settings
    try:
        free = shutil.disk_usage(recorder.directory).free
    except OSError:
        free = None
    trouble = recorder.trouble
    return {"dir": recorder.directory, "free_bytes": free, "write_errors": trouble.errors,
            "lost_s": trouble.lost_s, "failing_calls": len(trouble.failing), "held_s": recorder.held_s,
            "unwritten": recorder.unwritten, "retention_days": settings.retention.days,
            "tenant_retention": settings.retention_by_tenant()}
