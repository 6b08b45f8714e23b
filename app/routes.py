"""Which bot takes a call, for which tenant, with which variables: the [[routes]] of the configuration.

Why a module of its own: the SIP side knows nothing of bots (it hands the Endpoint's `screen` hook a
CallRecord, sip/endpoint.py) and the engine knows nothing of SIP; the routes stand between them. One
decision, `CallRoutes.route(record)`, serves twice: at INVITE time as the endpoint's screen (a call no
route takes is refused there, with [routing]'s code, before any audio or slot is spent on it, and the
record is labelled with its tenant, bot and route so that its sidecar shows them and the recorder files
it in its tenant's folder), and when the call's audio comes up, as the CallRouter's `start_for` (the
bot and the variables of the CallStart). It depends on the record alone and the settings are frozen, so
both give the same answer without keeping any state per call.

Matching: routes are tried in order and the first whose every given condition holds wins; a route with
no condition takes any call. `did` compares the Request-URI's user part with the number(s) given, with
a leading `+` and RFC 3966's visual separators (space, `-`, `.`, `(`, `)`) ignored on both sides, so
"+1 555-0001" in the file matches "15550001" from a trunk. `caller` and `header.match` are regular
expressions searched (not anchored: `^...$` anchors) in the From user part and in a kept header's value.
Without any [[routes]] the old rule stays: the bot bound to the call's account, else the first bot.
Outbound calls are never refused here: they take the bot named when dialling, else that same old rule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from callbot.app.settings import RouteSettings, RoutingSettings, Settings
from callbot.sip.call_record import KEPT_HEADERS, CallRecord, uri_user

# the standard reason phrases of the codes [routing] no_route allows
PHRASES = {403: "Forbidden", 404: "Not Found", 480: "Temporarily Unavailable", 486: "Busy Here",
           503: "Service Unavailable", 603: "Decline"}
_VISUAL = re.compile(r"[\s\-.()]+")  # RFC 3966 visual separators, and spaces


def normalize_number(text: str) -> str:
    """A DID as compared: no leading "+", no spaces or visual separators ("+1 (555) 000-1" -> "15550001")."""
    return _VISUAL.sub("", text).lstrip("+")


@dataclass(frozen=True)
class Route:
    """The bot that takes a call, its tenant (the bot's) and the route's variables; `name` labels it."""

    bot: str
    tenant: str | None
    variables: dict[str, str] = field(default_factory=dict)
    name: str = "default"


class Refusal(NamedTuple):
    """No route takes the call: the final SIP answer it gets (a tuple: the Endpoint's screen verdict)."""

    code: int
    reason: str


@dataclass(frozen=True)
class _Rule:
    name: str
    settings: RouteSettings
    dids: frozenset[str] | None
    caller: re.Pattern | None
    header: tuple[str, re.Pattern] | None  # (lower-case name, pattern)


def check_route(route: RouteSettings) -> tuple[str, str] | None:
    """(field, what is wrong) with a route's own conditions, or None (app/settings.py names the path)."""
    dids = _dids(route)
    if dids is not None and (not dids or any(not normalize_number(d) for d in dids)):
        return "did", "a number must not be empty (nor only '+', spaces, '-', '.', '(' or ')')"
    for name, pattern in (("caller", route.caller), ("header.match", route.header and route.header.match)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                return name, f"{pattern!r} is not a regular expression ({err})"
    if route.header is not None:
        name = route.header.name.lower()
        if not (name.startswith("x-") and len(name) > 2 or name in KEPT_HEADERS):
            return "header.name", (f"{route.header.name!r} is not a header a call keeps: X-* headers, "
                                   "P-Asserted-Identity, Diversion or Accept-Language")
    return None


def _dids(route: RouteSettings) -> tuple[str, ...] | None:
    if route.did is None:
        return None
    return (route.did,) if isinstance(route.did, str) else tuple(route.did)


def caller_language(record: CallRecord) -> str:
    """The caller's preferred language, as far as SIP says it: the first tag of the INVITE's Accept-Language
    ("es-MX;q=1, en;q=0.5" -> "es-MX"), or "" (a flow can branch on it: `{ var = "caller_language", ... }`)."""
    headers = getattr(record, "headers", None) or {}
    value = next((v for k, v in headers.items() if k.lower() == "accept-language"), "")
    first = value.split(",")[0].split(";")[0].strip()
    return first if re.fullmatch(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*", first) else ""


class CallRoutes:
    """The routes of one configuration; thread-safe (its rules are only ever replaced whole, by
    `replace_rules`)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._bots = {b.name: b for b in settings.bots}
        self.replace_rules(settings.routes, settings.routing)

    def replace_rules(self, routes: tuple[RouteSettings, ...], routing: RoutingSettings) -> None:
        """The [[routes]] and [routing] calls are routed by from now on (app/bot_reload.py: the config file
        changed while serve runs; checked by parse_settings, and naming only bots of this configuration).
        One assignment each: a call routed meanwhile sees the old rules or the new ones; a call screened by
        the old ones whose audio comes up after the change is started (and labelled) by the new ones, or by
        its account's bot when none of them takes it."""
        unknown = sorted({r.bot for r in routes} - set(self._bots))
        if unknown:
            raise ValueError(f"routes name bots this server has not prepared: {', '.join(unknown)}")
        self._rules = tuple(
            _Rule(name=r.name or f"routes[{i}]", settings=r,
                  dids=None if _dids(r) is None else frozenset(normalize_number(d) for d in _dids(r)),
                  caller=None if r.caller is None else re.compile(r.caller),
                  header=None if r.header is None else (r.header.name.lower(), re.compile(r.header.match)))
            for i, r in enumerate(routes))
        code = routing.no_route
        self.refusal = Refusal(code, routing.reason or PHRASES.get(code, "No Route"))

    @classmethod
    def from_settings(cls, settings: Settings) -> CallRoutes:
        return cls(settings)

    def route(self, record: CallRecord) -> Route | Refusal:
        """The route that takes an inbound call (the first that matches), or the refusal when none does;
        an outbound call, and any call when no [[routes]] are configured, takes its account's bot."""
        if not self._rules or record.direction != "inbound":
            return self._by_account(record.account)
        for rule in self._rules:
            if self._matches(rule, record):
                return Route(bot=rule.settings.bot, tenant=self._bots[rule.settings.bot].tenant,
                             variables=dict(rule.settings.variables), name=rule.name)
        return self.refusal

    def _by_account(self, account: str, bot: str | None = None) -> Route:
        if bot is not None:  # named when dialling (`callbot call --bot` checked the name)
            named = self._bots.get(bot)
            return Route(bot=bot, tenant=named.tenant if named else None, name="dialled")
        chosen = self.settings.bot_for_account(account) or self.settings.bots[0]
        return Route(bot=chosen.name, tenant=chosen.tenant, name="default")

    @staticmethod
    def _matches(rule: _Rule, record: CallRecord) -> bool:
        r = rule.settings
        if r.account is not None and record.account != r.account:
            return False
        if rule.dids is not None and normalize_number(record.called) not in rule.dids:
            return False
        if rule.caller is not None and not rule.caller.search(record.caller):
            return False
        if rule.header is not None:
            name, pattern = rule.header
            value = next((v for k, v in record.headers.items() if k.lower() == name), None)
            if value is None or not pattern.search(value):
                return False
        return True

    # ---- the Endpoint's screen (the SIP thread) ---------------------------------------------------------

    def screen(self, record: CallRecord) -> Refusal | None:
        """An INVITE's verdict: None (taken; the record labelled with its tenant, bot and route) or the
        refusal no route leaves it."""
        chosen = self.route(record)
        if isinstance(chosen, Refusal):
            record.labels["route"] = "none"
            return chosen
        self._label(record, chosen)
        return None

    @staticmethod
    def _label(record: CallRecord, route: Route) -> None:
        record.labels.update(bot=route.bot, route=route.name)
        if route.tenant is not None:
            record.labels["tenant"] = route.tenant

    # ---- the CallRouter's start_for (when the call's audio comes up) -----------------------------------

    def start_for(self, record: CallRecord, bot: str | None = None) -> tuple[str, dict[str, str]]:
        """The bot and variables of a call's CallStart: `bot` when the call was dialled naming one, else its
        route; the route's variables and the call's own (caller, called, call_id, account, tenant, bot,
        language). Labels the record (outbound calls pass no screen) before its recording starts."""
        if bot is not None or record.direction != "inbound":
            chosen = self._by_account(record.account, bot)
        else:
            found = self.route(record)
            # a refused call never has audio; a record no screen saw (an endpoint without one) that no
            # route takes gets the old rule rather than a silent line
            chosen = found if isinstance(found, Route) else self._by_account(record.account)
        self._label(record, chosen)
        if record.direction == "inbound":
            caller, called = record.caller, record.called
        else:
            caller, called = uri_user(record.local_uri), uri_user(record.remote_uri)
        variables = dict(chosen.variables)
        variables.update(caller=caller, called=called, call_id=record.call_id, account=record.account,
                         tenant=chosen.tenant or "", bot=chosen.bot, language=self._language(chosen.bot))
        # the INVITE's Accept-Language when it has one, else what the route says (a Spanish DID), else ""
        variables["caller_language"] = caller_language(record) or variables.get("caller_language", "")
        return chosen.bot, variables

    def _language(self, bot: str) -> str:
        named = self._bots.get(bot)
        return named.language if named is not None else "en"

    # ---- the Recorder's directory_for ------------------------------------------------------------------

    def recordings_dir_for(self, record: CallRecord) -> str | None:
        """The folder of a call's recording: its tenant's, or None (the recorder's own) for no tenant."""
        tenant = record.labels.get("tenant") if hasattr(record, "labels") else None
        return self.settings.tenant_dir(tenant) if tenant else None
