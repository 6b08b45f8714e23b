"""A bot's voice, persona, sampling and the routes changed in the config file while `callbot serve` runs,
for the next calls, without dropping the calls in progress.

Why the bot is prepared again, once: the model reads a bot's voice and persona before its first call
(app/model_setup.py) into a prompt snapshot every call of that bot starts from. When they change,
the engine prepares the new prompt the same way (`Model.prepare`), once, on its own inference thread
between the rounds of the calls it is serving (engine/serving/runner.py: a prompt frame is stepped
only when no call's round is due for at least as long as a prompt frame takes), and when it is ready
swaps it in: the calls that start from then on start from it, the calls in progress keep the snapshot
they started from (a snapshot is referenced, never written), and until it is ready new calls get the
bot as it was. The request is the contract's `PrepareBot` (answered by `BotPrepared`), which the engine
takes in each of its hostings: on serve's own thread, in the inference process, in a shared model
service (whose bots are all its workers'). A sampling change alone prepares nothing (the engine finds
the prompt in its cache) and takes effect with the next call the same way. This replaces what serve
did before: every new call of a bot whose persona had changed was given it through `SetPersona` as it
started, and started with the model reading the persona for 3-7 s (BENCHMARKS.md, "Persona change")
before it listened to the caller, until serve restarted.

That per-call path is kept only for an engine that cannot prepare a bot (the echo line, or a model
service that serves it), where a persona is all there is to give and costs nothing: there voice and
sampling still wait for a restart. A preparation that fails (a voice the model's folder does not have,
a prompt longer than the bot's context, a broken voice file) keeps the bot as it was, with one error
line; a config that does not pass serve's checks (an unknown voice name) keeps the last good one, with
one error line.

Routes ([[routes]], [routing]: which bot takes a called number) are looked up again for every INVITE:
the endpoint's screen goes through `screen` here, which looks at the file first (a `stat`, microseconds;
when it changed, reading and checking it costs a few ms once, on the SIP thread: BENCHMARKS.md, "Flow
editor and reloads") and hands new rules to the CallRoutes (app/routes.py `replace_rules`) before
routing that INVITE. Routes that name a bot serve did not prepare at start are refused with one error
line (restart to add bots).

What needs a restart (the log says once, per change): `language` and `context` (RESTART_FIELDS), and
bots added or removed. The language is not the model's: it is the call's `{language}` variable and the
transcript's language for the analytics, both read from the bots serve started with (app/routes.py,
app/analysis_host.py); a bot's context sizes its calls' KV rings, whose step graphs serve compiles for
each context before the first call (app/model_setup.py warm_up): a new one would compile inside a
live round. A bot with a flow is prepared again like any other (its persona is the prompt its calls
start from; the flow's persona states change it during the call). A consultation leg (attended
transfer) is left alone.

How: a thread looks at the config file every `poll_s` (a `stat`; read and checked with serve's checks,
`parse_settings`, only when it changed, as app/flow_reload.py does with flow files), so a save starts
the preparation at once rather than at the next call; the SIP thread's screen and the router's
`call_opened` look too. The engine's answer arrives on one of its threads and is handed to this
module's worker thread, which logs it.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import pathlib
import threading

import msgspec

from callbot.app.settings import BotSettings, ConfigError, Settings, parse_settings
from callbot.engine.contract import BotPrepared, BotSampling, PrepareBot

log = logging.getLogger(__name__)

PREPARED_FIELDS = ("voice", "persona", "sampling")  # the engine prepares the bot again (PrepareBot)
RESTART_FIELDS = ("language", "context")  # read when serve starts (the module's docstring says why)
# an engine that prepares no bots (the echo line): the persona is given to each call, the rest waits
UNPREPARED_RESTART_FIELDS = ("voice", "sampling", "language", "context")
PERSONA_ID = "bot-persona"  # the SetPersona id's suffix: `<call_id>#bot-persona` in the PersonaChanged event
POLL_S = 1.0  # how often the thread looks at the config file (a stat)


def prepare_request(bot: BotSettings, context: int | None) -> PrepareBot:
    """The contract's PrepareBot for a bot as the config says it (its voice file's path already
    absolute: parse_settings resolves it against the config's folder), at `context` (the one serve
    started with: a new one waits for a restart)."""
    s = bot.sampling
    return PrepareBot(name=bot.name, voice=bot.voice, persona=bot.persona, context=context,
                      sampling=BotSampling(text_temperature=s.text_temperature, text_top_k=s.text_top_k,
                                           audio_temperature=s.audio_temperature, audio_top_k=s.audio_top_k,
                                           seed=s.seed))


def _identity(path: pathlib.Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class BotReload:
    """A CallWatcher (app/calls.py) over the config file at `path`, which `settings` (what serve
    prepared) came from; `routes`: serve's CallRoutes, given the file's new routes (None: routes stay);
    `engine`: serve's CallEngine, asked to prepare a changed bot when it can (`prepares_bots`);
    `poll_s`: how often a thread looks at the file (None: only at INVITEs and calls).

    `prepared`: each bot as the engine answers its new calls now (voice, persona, sampling follow the
    preparations that succeeded); `current`: as the file says; `swaps`: bots prepared and swapped in."""

    def __init__(self, path: str | os.PathLike, settings: Settings, routes=None, engine=None,
                 poll_s: float | None = POLL_S):
        self.path = pathlib.Path(path)
        self.engine = engine
        self.prepared: dict[str, BotSettings] = {b.name: b for b in settings.bots}
        self.current = dict(self.prepared)
        self._asked: dict[str, BotSettings] = {}  # the last settings each bot was asked to be prepared with
        self.swaps = 0
        self.failed = 0
        self.routes = settings.routes
        self.routing = settings.routing
        self.call_routes = routes
        self.applied = 0  # calls given a changed persona
        self._identity = _identity(self.path)
        self._digest = self._read_digest()
        self._bad: str | None = None
        self._lock = threading.Lock()  # refresh from the SIP thread (screen), the watcher and the worker
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bot-reload")
        self._stop = threading.Event()
        self._watcher = None
        if poll_s is not None:
            self._watcher = threading.Thread(target=self._watch, args=(poll_s,), name="bot-reload-watch", daemon=True)
            self._watcher.start()

    def _prepares(self) -> bool:
        return self.engine is not None and bool(getattr(self.engine, "prepares_bots", False))

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    # ---- CallWatcher (SIP thread: return at once) ----------------------------------------------------

    def call_opened(self, live) -> None:
        if live.transfer_of is not None or live.start.bot is None or self._prepares():
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
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.refresh()
            except Exception as err:  # said, and looked at again next time
                log.error("%s: reading the config again failed: %s", self.path, err)

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
        prepares = self._prepares()
        for name, prepared in self.prepared.items():
            bot = self.current.get(name)
            if bot is None:
                continue
            if prepares:
                asked = self._asked.get(name, prepared)
                changed = [f for f in PREPARED_FIELDS if getattr(bot, f) != getattr(asked, f)]
                if changed:
                    self._ask(bot, changed)
                restart_fields = RESTART_FIELDS
            else:
                if bot.persona != prepared.persona and prepared.flow is None:
                    log.warning("bot %s: persona changed in %s: each new call reads it at its start (this engine "
                                "prepares no bots)", name, self.path)
                restart_fields = UNPREPARED_RESTART_FIELDS
            restart = [f for f in restart_fields if getattr(bot, f) != getattr(prepared, f)]
            if restart:
                log.warning("bot %s: %s changed in %s: takes effect when serve starts again", name,
                            ", ".join(restart), self.path)
        if (settings.routes, settings.routing) != (self.routes, self.routing):
            self._new_routes(settings)

    def _ask(self, bot: BotSettings, changed: list[str]) -> None:
        """The engine prepares `bot` again (under _lock); its answer goes to the worker thread."""
        self._asked[bot.name] = bot
        what = ", ".join(changed)
        log.warning("bot %s: %s changed in %s: preparing it again; calls that start before it is ready get the bot "
                    "as it was, calls in progress keep theirs", bot.name, what, self.path)
        try:
            self.engine.prepare_bot(prepare_request(bot, self.prepared[bot.name].context),
                                    functools.partial(self._answered, bot, what))
        except Exception as err:  # an engine closing, a bad word: the bot stays as it was
            self._took(bot, what, BotPrepared(name=bot.name, ok=False, error=str(err)))

    def _answered(self, bot: BotSettings, what: str, result: BotPrepared) -> None:
        """The engine's answer, on one of its threads (the inference thread, in-process): handed on."""
        try:
            self._pool.submit(self._took, bot, what, result)
        except RuntimeError:  # shutting down
            pass

    def _took(self, bot: BotSettings, what: str, result: BotPrepared) -> None:
        if not result.ok:
            self.failed += 1
            log.error("bot %s: the changed %s could not be prepared (%s): its calls go on with the bot as it was",
                      bot.name, what, result.error)
            return
        with self._lock:
            old = self.prepared.get(bot.name)
            if old is not None:
                self.prepared[bot.name] = msgspec.structs.replace(old, voice=bot.voice, persona=bot.persona,
                                                                  sampling=bot.sampling)
            self.swaps += 1
        log.warning("bot %s: prepared again in %.2f s (%s): calls from now on start from it", bot.name,
                    result.seconds, what)

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
