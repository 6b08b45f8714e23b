"""The `callbot serve` configuration file: TOML decoded into frozen msgspec Structs.

A typo must be an error, not a setting silently ignored, and the error must say where it is: every
problem becomes one `ConfigError` whose message is `<file>: $.path.to.field: what is wrong`, the line a
user sees before the program exits with status 2. With no file at all, `Settings()` is the embedded
default: direct mode on sip:bot@0.0.0.0:5060, voice NATF2, a customer-service persona, records in
./calls/.
"""
from __future__ import annotations

import ipaddress
import os
import pathlib
import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from callbot.engine.model.voices import VOICES as VOICE_NAMES
from callbot.flows.schema import FlowError, load_flow
from callbot.speech.settings import RecognizerSettings, TtsSettings
from callbot.sip.call_record import CallRecord
from callbot.sip.config import AccountConfig, EndpointConfig

DEFAULT_VOICE = "NATF2"
DEFAULT_PERSONA = (
    "You are a friendly and efficient customer service agent answering the phone. Greet the caller, "
    "find out what they need, answer clearly and briefly, and confirm before you end the call."
)
VOICE_FILE_SUFFIXES = (".wav", ".pt")

Temperature = Annotated[float, Meta(ge=0)]
TopK = Annotated[int, Meta(ge=0)]


class ConfigError(ValueError):
    """A configuration problem, worded as the one line the user gets (no traceback)."""


class _Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class SamplingSettings(_Settings):
    """PersonaPlex's defaults; temperature 0 = greedy, top_k 0 = whole vocabulary."""

    text_temperature: Temperature = 0.7
    text_top_k: TopK = 25
    audio_temperature: Temperature = 0.8
    audio_top_k: TopK = 250
    seed: int | None = None


class BotSettings(_Settings):
    """One bot: who it sounds like, what it is told, which account's calls it takes (without [[routes]]),
    the tenant it belongs to, the flow it follows and the language it speaks."""

    name: str = "default"
    voice: str = DEFAULT_VOICE  # one of VOICE_NAMES, or a path to a .wav recording / .pt voice prompt
    persona: str = DEFAULT_PERSONA
    account: str | None = None  # account name; None = the first account
    sampling: SamplingSettings = SamplingSettings()
    max_call_s: Annotated[float, Meta(gt=0)] | None = 3600.0
    tenant: str | None = None  # a [[tenants]] name: its calls' records go to that tenant's folder
    flow: str | None = None  # a flow file, relative to the config file (flows/)
    language: str = "en"  # what the bot speaks: a BCP 47 tag ("en", "de-CH"), given to the call as {language}
    # frames (80 ms each) of the conversation a call attends to; None = the model's (3000 = 4 min for
    # PersonaPlex-7B). Fewer = less memory per call (0.5 MiB per frame on the 7B in bf16) and fewer
    # bytes read per step; at most the model's, and at least the bot's prompt (checked at load)
    context: Annotated[int, Meta(ge=1)] | None = None


class ModelSettings(_Settings):
    """Where the weights come from: `path`, else the Hugging Face cache, else a hub download."""

    path: str | None = None
    quantization: Literal["none", "q8", "q4"] = "q4"
    # the calls' KV cache quantized to 8 or 4 bits (groups of 64 values, as mlx-lm's QuantizedKVCache);
    # None = the model's dtype. 8 bits: 0.53x the bf16 bytes; 4 bits: 0.28x (BENCHMARKS.md "Memory per call")
    kv_bits: Literal[8, 4] | None = None
    download: bool = True  # allow a huggingface_hub download when neither path nor cache has the files
    # a JSON file {"lm": {...LmConfig}, "mimi": {...MimiConfig}} for a model of another size built the
    # same way (Kyutai's Moshiko, a small test model); None = PersonaPlex-7B and the released Mimi
    architecture: str | None = None
    # run the model in its own process (engine/serving/inference_process.py), the rings in shared memory: a
    # thread running Python beside pjmedia's clock makes the bridge late (BENCHMARKS.md "Media
    # callback"); false runs it on a thread of the SIP process (one call, a debugger)
    process: bool = True
    # one model for several `callbot serve` workers (docs/capacity.md): `callbot model-service` loads it and
    # listens on this Unix socket; `callbot serve` with it set attaches there instead of loading its own.
    # A relative path is taken from the config file's folder
    service: str | None = None
    # calls the model takes at once (`callbot model-service`); None = as many as its measured step time fits
    # into the 80 ms frame (engine/serving/step_budget.py). Set, it replaces the measured limit
    max_calls: Annotated[int, Meta(ge=1, le=4096)] | None = None
    # the service and its workers watch each other (docs/capacity.md): a worker pings every heartbeat_s, the
    # service answers; heartbeat_misses intervals without a word and the other end counts as stalled (a
    # stopped process keeps its socket open): the service closes that worker's calls, a worker hangs up the
    # calls its service served and refuses new ones with 503 until it is back
    heartbeat_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    heartbeat_misses: Annotated[int, Meta(ge=2, le=100)] = 3
    # step every call whose frame is due in one forward of the model (engine/serving/runner.py): B calls
    # read the weights once; false steps them one after another (as before; each call its own Session)
    batch: bool = True
    # rounds planned to end just before the media tick their audio leaves on, joining calls padded into the
    # running calls' phase (engine/serving/round_schedule.py, docs/latency.md); false: a round starts when a
    # frame is due (docs/capacity.md, "Rounds and the workers' clocks")
    align: bool = True
    # the model line's resamplers: "minimum" phase (0.13-0.30 ms a direction) or "linear" (1.0-1.75 ms, a
    # delay the same at every frequency): BENCHMARKS.md, "Resampler"
    resampler_phase: Literal["minimum", "linear"] = "minimum"
    # the CPUs the inference thread (and MLX's stream thread) stay on, e.g. [3]: a core of the model's own
    # (engine/audio/cpu_affinity.py: on the 2-core CI machine the tiny model's CPU step 0.55-0.67x);
    # Linux only, not available on macOS (a warning, the bot runs). None = where the OS puts them
    cpus: Annotated[list[Annotated[int, Meta(ge=0)]], Meta(min_length=1)] | None = None


class MetricsSettings(_Settings):
    """Prometheus text exposition over HTTP; `address` = host:port (127.0.0.1 keeps it local)."""

    enabled: bool = True
    address: str = "127.0.0.1:9464"


_STORE_URL = re.compile(r"^(sqlite|postgresql)(\+\w+)?://")


class StoreSettings(_Settings):
    """The call store (store/, docs/store.md): every call, its events and analysis in a database, written
    off the media path by app/store_writer.py. `url`: an SQLAlchemy URL, sqlite:///FILE (a relative FILE
    is taken from the config file's folder) or postgresql+psycopg://USER:PASSWORD@HOST/DB; None = an
    SQLite file beside the recordings (<recordings_dir>/calls.db). `api`: HOST:PORT of the store's JSON
    HTTP API served by `callbot serve` (None: not served; `callbot calls api` serves it alone)."""

    enabled: bool = True
    url: str | None = None
    api: str | None = None

    def __post_init__(self) -> None:
        if self.url is not None and not _STORE_URL.match(self.url):
            raise ValueError(f"url: {self.url!r} is not a store URL: sqlite:///FILE or "
                             "postgresql+psycopg://USER:PASSWORD@HOST/DB")
        if self.api is not None and _parse_node(self.api) is None:
            raise ValueError(f"api: {self.api!r} is not HOST:PORT (\"127.0.0.1:8091\")")

    @property
    def api_address(self) -> tuple[str, int] | None:
        """`api` as (host, port)."""
        return None if self.api is None else _parse_node(self.api)


class RetentionSettings(_Settings):
    """How long calls are kept (store/retention.py): `days` after its start a call that is over is deleted by
    `callbot serve` (its files in every recordings folder, its row and analysis in the store, the campaign
    attempts older than that), checked once an hour; 0 keeps calls for ever."""

    days: Annotated[float, Meta(ge=0)] = 0.0


class CampaignsSettings(_Settings):
    """Outbound campaigns started from the HTTP API or the web panel (app/campaign_api.py): `dialer_config`
    is the config file each one's dialer (`callbot campaign run`) runs with, when the request names none
    (`callbot serve` holds its own SIP port and API address, so a dialer needs a config of its own: its
    own transport port, an outbound account); `engine` what answers the callees (model, or echo to try
    a list without a model)."""

    dialer_config: str | None = None
    engine: Literal["model", "echo"] = "model"


class WebSettings(_Settings):
    """The web panel (web/, `callbot web`): `listen` = HOST:PORT where `callbot serve` serves it too (None:
    not served; 127.0.0.1 keeps it on this machine)."""

    listen: str | None = None

    def __post_init__(self) -> None:
        if self.listen is not None and _parse_node(self.listen) is None:
            raise ValueError(f"listen: {self.listen!r} is not HOST:PORT (\"127.0.0.1:8088\")")

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self.listen is None else _parse_node(self.listen)


PublicPort = Annotated[int, Meta(ge=1, le=65535)]
Positive = Annotated[int, Meta(ge=1)]


_NODE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*)):(?P<port>\d{1,5})$")


def _parse_node(node: str) -> tuple[str, int] | None:
    """("host", port) of an [edge] nodes entry, None when it is not HOST:PORT."""
    m = _NODE.match(node)
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        return None
    if m.group("v6") is not None:
        try:
            ipaddress.IPv6Address(m.group("v6"))
        except ValueError:
            return None
    return m.group("v6") or m.group("host"), int(m.group("port"))


class EdgeSettings(_Settings):
    """kamailio on the public SIP port in front of `callbot serve` on loopback (app/edge.py, `callbot
    edge`, `callbot serve --edge`): floods, strangers and TLS end there; serve sees what passed."""

    address: str = "0.0.0.0"  # where callers reach us; 0.0.0.0 = every local address
    port: PublicPort = 5060  # UDP and TCP
    advertise: str | None = None  # public address or name for Via/Record-Route when behind NAT
    # TLS (sips:) on tls_port when cert_file and key_file are given (PEM); TLS 1.2 or newer only.
    # With ca_file, callers must present a certificate signed by it.
    tls_port: PublicPort = 5061
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    # per source address: any request above requests_per_s (pike) bans it until it has been quiet for
    # ban_s; new calls above calls_per_s, or beyond open_calls_per_source at once, get 503.
    # total_calls_per_s: new calls passed to serve, all sources together (pjsua2 aborts when ~33
    # refused INVITEs arrive in half a second)
    requests_per_s: Positive = 20
    ban_s: Positive = 60
    calls_per_s: Positive = 2
    open_calls_per_source: Positive = 2
    total_calls_per_s: Positive = 10
    trusted_sources: tuple[str, ...] = ()  # addresses or CIDR networks spared the per-source limits (trunks)
    tcp_idle_s: Positive = 300  # a TCP/TLS connection silent this long is closed
    tcp_max_connections: Positive = 2048
    workers: Annotated[int, Meta(ge=1, le=64)] = 4  # kamailio processes per UDP socket, and for TCP/TLS
    # `callbot serve --edge` as a supervisor (app/workers.py; `--workers` overrides): this many `callbot serve`
    # processes on loopback, ports from serve's transport port up (4 calls each: the pjsua2 wheel's cap),
    # one model service for all of them, kamailio dispatching calls across them
    serve_workers: Annotated[int, Meta(ge=1, le=64)] = 1
    # other machines' serve nodes ("10.0.0.2:5070", "[2001:db8::2]:5070"), dispatched to beside the local
    # ones; `callbot edge` alone dispatches to these only
    nodes: tuple[str, ...] = ()
    # on SIGTERM the edge refuses new calls (503) and the running ones go on this long (`serve --edge --workers`,
    # `callbot edge`; a second signal stops at once)
    drain_s: Annotated[float, Meta(ge=0, le=86400)] = 60.0
    # every call through the edge is asked every dialog_keepalive_s whether both sides still hold it (an
    # OPTIONS in its dialog, kamailio's dialog keep-alive): one left unanswered (408) or unknown (481) ends
    # the call 10 s later with a BYE to both sides. A caller whose serve or machine stopped dead is hung up
    # instead of hearing silence until they give up; a caller that vanished frees its call slot. 0 = off;
    # kamailio takes no less than 30 s
    dialog_keepalive_s: Annotated[int, Meta(ge=0, le=3600)] = 30
    kamailio: str = "kamailio"  # the program, found on PATH unless a path
    modules_dir: str | None = None  # kamailio's modules (':' between several); None = found beside it
    run_dir: str | None = None  # the generated config, pid file, control socket; None = a temporary folder

    def __post_init__(self) -> None:
        if 0 < self.dialog_keepalive_s < 30:
            raise ValueError(f"dialog_keepalive_s: kamailio asks no more often than every 30 s (0 turns it off), "
                             f"got {self.dialog_keepalive_s}")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("TLS at the edge needs both cert_file and key_file (PEM paths)")
        if self.ca_file and not self.cert_file:
            raise ValueError("ca_file verifies callers over TLS: give cert_file and key_file too")
        if self.cert_file and self.tls_port == self.port:
            raise ValueError(f"tls_port {self.tls_port} is the port of SIP over TCP: pick another (5061)")
        for node in self.nodes:
            if _parse_node(node) is None:
                raise ValueError(f"nodes: {node!r} is not HOST:PORT (an IP address or name, a port 1-65535; "
                                 "IPv6 in brackets: \"[2001:db8::2]:5070\")")
        for source in self.trusted_sources:
            try:
                ipaddress.ip_network(source, strict=False)
            except ValueError:
                raise ValueError(f"trusted_sources: {source!r} is not an IP address or CIDR network") from None

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    @property
    def node_addresses(self) -> tuple[tuple[str, int], ...]:
        """`nodes` as (host, port) pairs."""
        return tuple(_parse_node(n) for n in self.nodes)  # type: ignore[misc]  (checked in __post_init__)


class TenantSettings(_Settings):
    """A customer of the service: its bots' calls are recorded in its own folder, and analysed with its
    own rules (categories and scorecards, analytics/rules.py)."""

    name: str
    recordings_dir: str | None = None  # relative to the config file; None = <recordings_dir>/<name>
    rules: str | None = None  # a rules file (TOML), relative to the config file; None = [analytics] rules
    retention_days: Annotated[float, Meta(ge=0)] | None = None  # its calls' period; None = [retention] days


class AnalyticsSettings(_Settings):
    """Speech analytics of every call `callbot serve` records (analytics/, app/analysis_host.py): once a
    call's files are final, an analysis in a pool of low-priority processes, kept in the call store and
    beside the recording (`<name>.analysis.json`).

    workers: the pool's processes; max_pending: calls waiting or being analysed at most (beyond, a call is
    not analysed now, counted, and left for `callbot calls analyze`); dead_air_s: both legs silent longer
    than this is dead air; caller_transcript: the caller's words from the live recognizer ("live") or
    from pocketsphinx run on the caller's leg after the call ("post": slower, usually better);
    redacted_recording: also write `<name>.redacted.wav` with the PII silenced; rules: the categories and
    scorecards of calls that have no tenant, or whose tenant names none (relative to the config file);
    shutdown_wait_s: at shutdown, how long serve waits for the analyses still going (the rest are left
    for `callbot calls analyze`)."""

    enabled: bool = True
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    max_pending: Annotated[int, Meta(ge=1, le=100_000)] = 64
    dead_air_s: Annotated[float, Meta(ge=0)] = 3.0
    caller_transcript: Literal["live", "post"] = "live"
    redacted_recording: bool = False
    rules: str | None = None
    shutdown_wait_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0


class HeaderMatch(_Settings):
    """A route's condition on one INVITE header (X-*, P-Asserted-Identity, Diversion, Accept-Language)."""

    name: str
    match: str  # a regular expression, searched in the header's value


class RouteSettings(_Settings):
    """Which bot takes an inbound call (app/routes.py): every condition given must hold; none = any call.
    The first route that matches wins."""

    bot: str
    name: str | None = None  # shown in the record's labels; None = "routes[<index>]"
    did: str | tuple[str, ...] | None = None  # the number called (Request-URI user); +, spaces, -.() ignored
    account: str | None = None  # the account the INVITE came in on
    caller: str | None = None  # a regular expression, searched in the caller's user part (From)
    header: HeaderMatch | None = None
    variables: dict[str, str] = {}  # given to the call (CallStart.variables)


RefusalCode = Literal[403, 404, 480, 486, 503, 603]


class RoutingSettings(_Settings):
    """What a call gets that no route takes (when there are [[routes]])."""

    no_route: RefusalCode = 404
    reason: str | None = None  # the SIP reason phrase; None = the code's standard one ("Not Found")


def _default_sip() -> EndpointConfig:
    return EndpointConfig(accounts=(AccountConfig(name="default", user="bot"),))


class Settings(_Settings):
    sip: EndpointConfig = msgspec.field(default_factory=_default_sip)
    model: ModelSettings = ModelSettings()
    bots: tuple[BotSettings, ...] = (BotSettings(),)
    recordings_dir: str = "./calls"
    metrics: MetricsSettings = MetricsSettings()
    edge: EdgeSettings = EdgeSettings()
    tenants: tuple[TenantSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()  # none: a call goes to its account's bot, else the first
    routing: RoutingSettings = RoutingSettings()
    tts: TtsSettings = TtsSettings()  # text to speech for flows' `say` (speech/tts.py)
    recognizer: RecognizerSettings = RecognizerSettings()  # the caller leg's words (speech/live.py)
    store: StoreSettings = StoreSettings()  # the call store (store/, app/store_writer.py)
    analytics: AnalyticsSettings = AnalyticsSettings()  # every call analysed (analytics/, app/analysis_host.py)
    web: WebSettings = WebSettings()  # the web panel (web/, app/web_host.py)
    retention: RetentionSettings = RetentionSettings()  # calls deleted after so many days (store/retention.py)
    campaigns: CampaignsSettings = CampaignsSettings()  # campaigns started from the API and the panel

    def store_url(self) -> str:
        """The call store's URL: [store] url, else an SQLite file beside the recordings."""
        if self.store.url is not None:
            return self.store.url
        return "sqlite:///" + os.path.abspath(os.path.join(self.recordings_dir, "calls.db"))

    def rules_for(self, tenant: str | None) -> str | None:
        """The rules file a call of `tenant` is analysed with: the tenant's own, else [analytics] rules."""
        own = next((t.rules for t in self.tenants if t.name == tenant), None) if tenant else None
        return own or self.analytics.rules

    def retention_by_tenant(self) -> dict[str, float]:
        """The tenants with a retention period of their own (days; 0 keeps their calls for ever)."""
        return {t.name: t.retention_days for t in self.tenants if t.retention_days is not None}

    def recording_dirs(self) -> list[str]:
        """Every folder calls are recorded in: the recordings folder (tenants' default subfolders within)
        and each tenant's own."""
        return [self.recordings_dir, *(t.recordings_dir for t in self.tenants if t.recordings_dir)]

    def tenant_dir(self, name: str) -> str:
        """Where a tenant's calls are recorded: its own recordings_dir, else <recordings_dir>/<name>."""
        tenant = next((t for t in self.tenants if t.name == name), None)
        if tenant is None:
            raise ConfigError(f"no tenant named {name!r}")
        return tenant.recordings_dir or os.path.join(self.recordings_dir, name)

    def bot_name_for(self, record: CallRecord) -> str:
        """The bot that answers a call: the one bound to the call's account, else the first."""
        return (self.bot_for_account(record.account) or self.bots[0]).name

    def bot_for_account(self, account_name: str) -> BotSettings | None:
        """The bot that answers an account's calls: the one naming it, else one naming no account."""
        for bot in self.bots:
            if bot.account == account_name:
                return bot
        first_account = self.sip.accounts[0].name if self.sip.accounts else None
        for bot in self.bots:
            if bot.account is None and account_name == first_account:
                return bot
        return None

    def endpoint_config(self) -> EndpointConfig:
        """The SIP configuration with each bot's `max_call_s` applied to the account it answers (an
        account's own max_call_duration_s wins)."""
        accounts = []
        for acc in self.sip.accounts:
            bot = self.bot_for_account(acc.name)
            if acc.max_call_duration_s is None and bot is not None and bot.max_call_s is not None:
                acc = msgspec.structs.replace(acc, max_call_duration_s=bot.max_call_s)
            accounts.append(acc)
        # the metrics port beside the SIP ports: no caller's offer may aim our RTP at it
        protected = self.sip.protected_ports
        if self.metrics.enabled and self.metrics.address.rpartition(":")[2].isdigit():
            protected = (*protected, int(self.metrics.address.rpartition(":")[2]))
        return msgspec.structs.replace(self.sip, accounts=tuple(accounts), protected_ports=protected)

    def bot(self, name: str) -> BotSettings:
        for bot in self.bots:
            if bot.name == name:
                return bot
        raise ConfigError(f"no bot named {name!r}: configured bots are {', '.join(b.name for b in self.bots)}")


# msgspec words errors as "<message> - at `$.path`"; users get "$.path: <message>"
_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def _reword(err: msgspec.MsgspecError) -> str:
    m = _AT_PATH.match(str(err))
    assert m is not None  # the pattern matches any string
    msg, path = m.group("msg"), m.group("path")
    if path and msg.startswith("Invalid enum value"):
        values = _enum_values(path)
        if values:
            msg += f", expected one of {', '.join(repr(v) for v in values)}"
    return f"{path}: {msg}" if path else msg


_PATH_STEP = re.compile(r"\.(\w+)|\[\d+\]")


def _enum_values(path: str) -> tuple | None:
    """The values a Literal field allows, found by following `$.a.b[0].c` through the Settings types."""
    t = msgspec.inspect.type_info(Settings)
    for step in _PATH_STEP.finditer(path):
        for inner in (t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)):
            if step.group(1) and isinstance(inner, msgspec.inspect.StructType):
                t = next((f.type for f in inner.fields if f.encode_name == step.group(1)), None)
                break
            if not step.group(1) and isinstance(inner, (msgspec.inspect.VarTupleType, msgspec.inspect.ListType)):
                t = inner.item_type
                break
        else:
            return None
        if t is None:
            return None
    for inner in (t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)):
        if isinstance(inner, msgspec.inspect.LiteralType):
            return inner.values
    return None


def _check_bots(settings: Settings, base_dir: pathlib.Path) -> None:
    """Cross-references msgspec cannot express; each error names the field's path."""
    names = [b.name for b in settings.bots]
    accounts = [a.name for a in settings.sip.accounts]
    for i, bot in enumerate(settings.bots):
        where = f"$.bots[{i}]"
        if not bot.name:
            raise ConfigError(f"{where}.name: must not be empty")
        if bot.name in names[:i]:
            raise ConfigError(f"{where}.name: bot name {bot.name!r} is used twice")
        if bot.account is not None and bot.account not in accounts:
            raise ConfigError(
                f"{where}.account: unknown account {bot.account!r}, expected one of {', '.join(accounts)}"
            )
        if bot.voice.lower().endswith(VOICE_FILE_SUFFIXES):
            path = base_dir / bot.voice
            if not path.is_file():
                raise ConfigError(f"{where}.voice: voice file {os.fspath(path)!r} does not exist")
        elif bot.voice not in VOICE_NAMES:
            raise ConfigError(
                f'{where}.voice: unknown voice "{bot.voice}", expected one of {", ".join(VOICE_NAMES)} '
                "or a path to a .wav / .pt file"
            )
        if not bot.persona.strip():
            raise ConfigError(f"{where}.persona: must not be empty (the model needs a role to play)")
        if bot.tenant is not None and bot.tenant not in [t.name for t in settings.tenants]:
            raise ConfigError(f"{where}.tenant: unknown tenant {bot.tenant!r}, "
                              + _expected([t.name for t in settings.tenants], "[[tenants]]"))
        flow = None if bot.flow is None else base_dir / os.path.expanduser(bot.flow)
        if flow is not None and not flow.is_file():
            raise ConfigError(f"{where}.flow: flow file {os.fspath(flow)!r} does not exist")
        if flow is not None:
            try:
                load_flow(flow)  # checked whole now: a call must never meet a broken flow
            except FlowError as err:
                raise ConfigError(f"{where}.flow: {err}") from None
        if not _LANGUAGE.fullmatch(bot.language):
            raise ConfigError(f'{where}.language: {bot.language!r} is not a language tag like "en" or "de-CH"')


# BCP 47's shape, loosely: a 2-3 letter language, then subtags of 1-8 letters or digits ("zh-Hant-TW")
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")
# a tenant's name is a folder's name too: no separators, no dot-folders
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _expected(names: list[str], what: str) -> str:
    return f"expected one of {', '.join(names)}" if names else f"none are configured ({what})"


def _check_routes(settings: Settings, base_dir: pathlib.Path) -> None:
    """Tenants' names and folders, and every name a route refers to; each error names the field's path."""
    from callbot.app.routes import check_route  # the matching rules live with the matching

    folders: dict[str, str] = {}
    for i, tenant in enumerate(settings.tenants):
        where = f"$.tenants[{i}]"
        if not _TENANT_NAME.fullmatch(tenant.name):
            raise ConfigError(f"{where}.name: {tenant.name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                              "(it names a folder), starting with a letter or digit")
        if tenant.name in [t.name for t in settings.tenants[:i]]:
            raise ConfigError(f"{where}.name: tenant name {tenant.name!r} is used twice")
        folder = os.path.normpath(base_dir / os.path.expanduser(
            tenant.recordings_dir or os.path.join(settings.recordings_dir, tenant.name)))
        if folder in folders:
            raise ConfigError(f"{where}.recordings_dir: {folder!r} is also the folder of tenant "
                              f"{folders[folder]!r} (each tenant's records stay apart)")
        folders[folder] = tenant.name
    bots = [b.name for b in settings.bots]
    accounts = [a.name for a in settings.sip.accounts]
    for i, route in enumerate(settings.routes):
        where = f"$.routes[{i}]"
        if route.bot not in bots:
            raise ConfigError(f"{where}.bot: unknown bot {route.bot!r}, expected one of {', '.join(bots)}")
        if route.account is not None and route.account not in accounts:
            raise ConfigError(f"{where}.account: unknown account {route.account!r}, "
                              + _expected(accounts, "[[sip.accounts]]"))
        problem = check_route(route)
        if problem is not None:
            field, what = problem
            raise ConfigError(f"{where}.{field}: {what}")
    reason = settings.routing.reason
    if reason is not None and (not reason.strip() or len(reason) > 128 or not reason.isprintable()):
        raise ConfigError("$.routing.reason: a SIP reason phrase is one line of 1-128 printable characters")


def parse_settings(text: str | bytes, *, base_dir: str | os.PathLike = ".", resolve_secrets: bool = True) -> Settings:
    """Decode TOML text into Settings; relative paths are taken from `base_dir` (the file's folder).
    `resolve_secrets` False leaves `password_env` unread (the panel's editor checks a config in a
    process that does not hold serve's environment)."""
    try:
        settings = msgspec.toml.decode(text, type=Settings)
    except msgspec.ValidationError as err:
        raise ConfigError(_reword(err)) from None
    except msgspec.DecodeError as err:
        raise ConfigError(f"not valid TOML: {err}") from None
    _check_bots(settings, pathlib.Path(base_dir))
    _check_routes(settings, pathlib.Path(base_dir))
    if resolve_secrets:
        settings = _resolve_passwords(settings)
    settings = _resolve_paths(settings, pathlib.Path(base_dir))
    _check_rules(settings)
    dialer = settings.campaigns.dialer_config
    if dialer is not None and not os.path.isfile(dialer):
        raise ConfigError(f"$.campaigns.dialer_config: {dialer!r}: no such file (the dialers' own config)")
    return settings


def _check_rules(settings: Settings) -> None:
    """Every rules file ([analytics] rules, each tenant's) read and checked now, as the analysis will read
    it (analytics/rules.py): a call must never meet a broken one. Its first problem is the error."""
    if not settings.analytics.enabled:
        return
    from callbot.analytics.rules import check_rules_file

    places = [("$.analytics.rules", settings.analytics.rules)]
    places += [(f"$.tenants[{i}].rules", t.rules) for i, t in enumerate(settings.tenants)]
    for where, path in places:
        if path is None:
            continue
        problems = check_rules_file(path)
        if problems:
            more = f" (and {len(problems) - 1} more: `callbot rules check {path}`)" if len(problems) > 1 else ""
            raise ConfigError(f"{where}: {problems[0]}{more}")


def _resolve_passwords(settings: Settings) -> Settings:
    """`password_env = "NAME"` -> the password from that environment variable, read once at load."""
    accounts = []
    for i, acc in enumerate(settings.sip.accounts):
        if acc.password_env is not None:
            value = os.environ.get(acc.password_env)
            if not value:
                raise ConfigError(f"$.sip.accounts[{i}].password_env: environment variable "
                                  f"{acc.password_env} is not set (account {acc.name!r} needs its password)")
            acc = msgspec.structs.replace(acc, password=value, password_env=None)
        accounts.append(acc)
    return msgspec.structs.replace(settings, sip=msgspec.structs.replace(settings.sip, accounts=tuple(accounts)))


def _resolve_paths(settings: Settings, base_dir: pathlib.Path) -> Settings:
    """Paths in a config file are relative to that file, not to wherever the server was started."""

    def resolve(p: str | None) -> str | None:
        return None if p is None else os.fspath(base_dir / os.path.expanduser(p))

    bots = tuple(
        msgspec.structs.replace(b, voice=resolve(b.voice)) if b.voice.lower().endswith(VOICE_FILE_SUFFIXES) else b
        for b in settings.bots
    )
    bots = tuple(msgspec.structs.replace(b, flow=resolve(b.flow)) for b in bots)
    tenants = tuple(msgspec.structs.replace(t, recordings_dir=resolve(t.recordings_dir), rules=resolve(t.rules))
                    for t in settings.tenants)
    return msgspec.structs.replace(
        settings,
        bots=bots,
        tenants=tenants,
        recordings_dir=resolve(settings.recordings_dir),
        sip=msgspec.structs.replace(settings.sip, log_file=resolve(settings.sip.log_file)),
        model=msgspec.structs.replace(settings.model, path=resolve(settings.model.path),
                                      architecture=resolve(settings.model.architecture),
                                      service=resolve(settings.model.service)),
        tts=msgspec.structs.replace(settings.tts, model=resolve(settings.tts.model),
                                    cache_dir=resolve(settings.tts.cache_dir)),
        recognizer=msgspec.structs.replace(settings.recognizer, model=resolve(settings.recognizer.model)),
        store=msgspec.structs.replace(settings.store, url=_resolve_sqlite(settings.store.url, base_dir)),
        analytics=msgspec.structs.replace(settings.analytics, rules=resolve(settings.analytics.rules)),
        campaigns=msgspec.structs.replace(settings.campaigns, dialer_config=resolve(settings.campaigns.dialer_config)),
    )


def _resolve_sqlite(url: str | None, base_dir: pathlib.Path) -> str | None:
    """sqlite:///calls.db (a relative file) -> sqlite:////the/config/folder/calls.db."""
    prefix = "sqlite:///"
    if url is None or not url.startswith(prefix) or url.startswith(prefix + "/"):
        return url
    return prefix + os.path.abspath(base_dir / os.path.expanduser(url[len(prefix):]))


def load_settings(path: str | os.PathLike | None) -> Settings:
    """Read the config file, or return the embedded default when `path` is None."""
    if path is None:
        return Settings()
    p = pathlib.Path(path)
    try:
        text = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{os.fspath(p)}: cannot read the config file ({err.strerror})") from None
    try:
        return parse_settings(text, base_dir=p.parent)
    except ConfigError as err:
        raise ConfigError(f"{os.fspath(p)}: {err}") from None
