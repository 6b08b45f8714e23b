"""A bot's persona and the routes changed in the config file while `callbot serve` runs, for the next calls.

Why through `set_persona` and not a new prepared prompt: the model reads a bot's voice and persona once,
before the first call (app/model_setup.py), into a snapshot every call of that bot starts from;
preparing it again means stepping the model through the whole prompt in the model's process, which
the running calls share. The control contract already has a way to change the persona of a call in
progress (`SetPersona`, engine/model/persona_swap.py: the persona's tokens read by the model one per
80 ms step while the caller is not heard), so a call of a bot whose persona changed gets it that way
as it starts. The cost is honest and said in the log: each such call starts with the model reading the
new persona before it listens to the caller, (W + N + 6) x 80 ms with N the persona's tokens and W the
steps until the model pauses (BENCHMARKS.md, "Persona change": about 3 s for a 20-word persona when the
model is silent, at most about 7 s); restarting serve prepares it once, at no cost per call.

Routes ([[routes]], [routing]: which bot takes a called number) are looked up again for every INVITE:
the endpoint's screen goes through `screen` here, which looks at the file first (a `stat`, microseconds;
when it changed, reading and checking it costs a few ms once, on the SIP thread: BENCHMARKS.md, "Flow
editor and reloads") and hands new rules to the CallRoutes (app/routes.py `replace_rules`) before
routing that INVITE. Routes that name a bot serve did not prepare at start are refused with one error
line (restart to add bots).

What is not applied here (the log says once, per change, that it needs a restart): voice (the prompt's
audio), sampling and language (read when the bot's sessions are set up), and bots added or removed. A
bot with a flow is left alone: its flow's persona states set the persona; the bot's own persona is only
the prompt it starts from. A consultation leg (attended transfer) is held silent anyway.

How: the router tells this watcher of each call as its audio comes up (SIP thread: it only enqueues);
one worker thread looks at the config file (`stat`; read and checked with serve's checks,
`parse_settings`, only when it changed, as app/flow_reload.py does with flow files) and sends the
persona. A config that does not pass its checks keeps the last good one, with one error line.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import pathlib
import threading

from callbot.app.settings import BotSettings, ConfigError, Settings, parse_settings

log = logging.getLogger(__name__)

RESTART_FIELDS = ("voice", "sampling", "language")
PERSONA_ID = "bot-persona"  # the SetPersona id's suffix: `<call_id>#bot-persona` in the PersonaChanged event


def _identity(path: pathlib.Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class BotReload:
    """A CallWatcher (app/calls.py) over the config file at `path`, which `settings` (what serve
    prepared) came from; `routes`: serve's CallRoutes, given the file's new routes (None: routes stay)."""

    def __init__(self, path: str | os.PathLike, settings: Settings, routes=None):
        self.path = pathlib.Path(path)
        self.prepared: dict[str, BotSettings] = {b.name: b for b in settings.bots}
        self.current = dict(self.prepared)
        self.routes = settings.routes
        self.routing = settings.routing
        self.call_routes = routes
        self.applied = 0  # calls given a changed persona
        self._identity = _identity(self.path)
        self._digest = self._read_digest()
        self._bad: str | None = None
        self._lock = threading.Lock()  # refresh from the SIP thread (screen) and the worker
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bot-reload")

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    # ---- CallWatcher (SIP thread: return at once) ----------------------------------------------------

    def call_opened(self, live) -> None:
        if live.transfer_of is not None or live.start.bot is None:
            return
        prepared = self.prepared.get(live.start.bot)
        if prepared is None or prepared.flow is not None:
            return
        try:
            self._pool.submit(self._apply, live)
        except RuntimeError:  # shutting down
            pass

    def call_closed(self, live) -> None:
        pass

    def screen(self, record):
        """The endpoint's screen (SIP thread): the routes of the file as it is now, then the CallRoutes'
        verdict for this INVITE."""
        try:
            self.refresh()
        except Exception as err:  # never the INVITE's problem: it is routed by the rules there are
            log.error("%s: reading the config again failed: %s", self.path, err)
        return self.call_routes.screen(record)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the worker thread -----------------------------------------------------------------------------

    def _apply(self, live) -> None:
        try:
            self.refresh()
            bot = self.current.get(live.start.bot)
            prepared = self.prepared[live.start.bot]
            if bot is None or bot.persona == prepared.persona or live.ended:
                return
            live.set_persona(bot.persona, id=f"{live.call_id}#{PERSONA_ID}")
            self.applied += 1
        except Exception as err:  # a call that went meanwhile, a control refused: that call only
            log.info("call %s: the bot's changed persona was not given: %s", live.call_id, err)

    def refresh(self) -> None:
        """Read the config again if it changed since (the SIP thread, the worker, tests)."""
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        identity = _identity(self.path)
        if identity is None or identity == self._identity:
            return
        self._identity = identity
        try:
            text = self.path.read_bytes()
        except OSError as err:
            log.error("%s: cannot read the config file (%s): the bots go on as they were", self.path, err.strerror)
            return
        digest = hashlib.sha256(text).hexdigest()
        if digest in (self._digest, self._bad):
            return
        try:
            settings = parse_settings(text, base_dir=self.path.parent, resolve_secrets=False)
        except ConfigError as err:
            self._bad = digest
            log.error("%s: the config changed but does not pass its checks, the bots go on as they were: %s",
                      self.path, err)
            return
        self._digest, self._bad = digest, None
        self.current = {b.name: b for b in settings.bots}
        for name, prepared in self.prepared.items():
            bot = self.current.get(name)
            if bot is None:
                continue
            if bot.persona != prepared.persona and prepared.flow is None:
                log.warning("bot %s: persona changed in %s: each new call reads it at its start (a few seconds "
                            "before the model listens); restart serve to prepare it once", name, self.path)
            restart = [f for f in RESTART_FIELDS if getattr(bot, f) != getattr(prepared, f)]
            if restart:
                log.warning("bot %s: %s changed in %s: takes effect when serve starts again", name,
                            ", ".join(restart), self.path)
        if (settings.routes, settings.routing) != (self.routes, self.routing):
            self._new_routes(settings)

    def _new_routes(self, settings: Settings) -> None:
        if self.call_routes is None:
            log.warning("%s: routes changed: take effect when serve starts again", self.path)
            return
        try:
            self.call_routes.replace_rules(settings.routes, settings.routing)
        except ValueError as err:
            log.error("%s: the routes changed but %s: restart serve to take them; calls are routed as before",
                      self.path, err)
            return
        self.routes, self.routing = settings.routes, settings.routing
        log.warning("%s: routes changed: the calls from now on are routed by them", self.path)
