"""The `callbot` command: `serve` answers calls (`serve --edge --workers N`: N of them behind the edge, under
a supervisor: app/workers.py), `call` places one, `edge` runs the SIP edge, `model-service` serves one
model to several `serve` workers, `flows check` checks call flow files, `rules check` the analytics' rules
files, `calls` imports, lists, shows, exports and analyses again the calls kept in the call store (and
serves them as a JSON API).

It lives in callbot.app, the top of the arrows: a command may use the SIP side and the engine both.
Every problem a user can cause (config, weights, ports) ends as one line on stderr and exit status 2,
never a traceback.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import sys

import msgspec

EXIT_USAGE = 2  # bad arguments, config or weights (argparse uses 2 too; app/serve.py says the same)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbot",
        description="A full-duplex speech model answering and placing phone calls over SIP.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML config (default: the embedded direct-mode default)")
        p.add_argument("--engine", choices=["model", "echo"], default="model",
                       help="echo: an echo-test line instead of the model, needs no weights")
        p.add_argument("--model", metavar="DIR", help="weights directory (default: config, HF cache, download)")

    serve = sub.add_parser("serve", help="answer calls (and register accounts) until SIGTERM/SIGINT")
    common(serve)
    serve.add_argument("--edge", action="store_true",
                       help="run kamailio on the public port in front of serve (config [edge]; serve on loopback)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="with --edge: N serve processes (4 calls each) on one model service, kamailio dispatching "
                            "to them, a drained stop on SIGTERM (default: [edge] serve_workers)")
    serve.add_argument("--supervised", metavar="JSON", help=argparse.SUPPRESS)  # app/workers.py: a worker's part
    call = sub.add_parser("call", help="place one call; the exit status says how it ended")
    call.add_argument("uri", metavar="SIP_URI")
    call.add_argument("--bot", metavar="NAME", help="bot to call with (default: the first)")
    common(call)
    call.add_argument("--edge", action="store_true",
                      help="call out through kamailio on the public port (config [edge]; this process on loopback)")
    edge = sub.add_parser("edge", help="run kamailio on the public SIP port in front of `callbot serve` on loopback")
    edge.add_argument("--config", metavar="FILE", help="TOML config: [edge] and serve's [sip] transport")
    edge.add_argument("--print", dest="print_only", action="store_true",
                      help="write the generated kamailio configuration to stdout and exit")
    edge.add_argument("--check", action="store_true", help="check the generated configuration (kamailio -c) and exit")
    edge.set_defaults(model=None)
    service = sub.add_parser("model-service", help="load the model once and serve the calls of several `serve` "
                             "workers on this machine ([model] service: its socket)")
    common(service)
    service.add_argument("--metrics", metavar="HOST:PORT", help="its Prometheus address (default: [metrics] address)")
    service.add_argument("--step-delay-ms", type=float, metavar="MS",
                         help="test and diagnosis only: every step takes MS longer (to see admission refuse calls)")
    service.add_argument("--supervised", metavar="JSON", help=argparse.SUPPRESS)  # app/workers.py: its socket
    flows = sub.add_parser("flows", help="call flow files: check one before a bot uses it")
    flows_sub = flows.add_subparsers(dest="flows_command", metavar="ACTION", required=True)
    check = flows_sub.add_parser("check", help="check a flow file: one line per problem, exit 2; `ok` and exit 0")
    check.add_argument("files", metavar="FILE", nargs="+")
    rules = sub.add_parser("rules", help="speech analytics' rules files (categories, scorecards): check one")
    rules_sub = rules.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    rcheck = rules_sub.add_parser("check", help="check rules files: one line per problem, exit 2; `ok` and exit 0")
    rcheck.add_argument("files", metavar="FILE", nargs="+")
    _calls_parser(sub)
    _campaign_parser(sub, common)
    _web_parser(sub)
    return parser


# ---- `callbot campaign` (app/campaign_runner.py) ---------------------------------------------------------


def _campaign_parser(sub, common) -> None:
    """`callbot campaign run LIST.csv --campaign FILE.toml`: an outbound campaign (README, "Campaigns")."""
    campaign = sub.add_parser("campaign", help="outbound campaigns: dial a CSV list with pacing, windows, "
                              "retries, a do-not-call list and answering-machine detection")
    campaign_sub = campaign.add_subparsers(dest="campaign_command", metavar="ACTION", required=True)
    run_p = campaign_sub.add_parser("run", help="dial the list until every row is done (state kept in "
                                    "LIST.csv.campaign.db: run it again to resume)")
    run_p.add_argument("list", metavar="LIST.csv")
    run_p.add_argument("--campaign", required=True, metavar="FILE", help="the campaign file (TOML)")
    run_p.add_argument("--bot", metavar="NAME", help="the bot that talks (default: the campaign's, else the first)")
    run_p.add_argument("--host", metavar="HOST[:PORT]", help="where numbers are dialled: sip:NUMBER@HOST")
    run_p.add_argument("--report", metavar="FILE", help="every attempt at the end, as .csv or .json")
    run_p.add_argument("--control", metavar="FILE", help="a file whose word (pause, resume, stop) steers the run")
    common(run_p)


def _campaign(args: argparse.Namespace, settings) -> int:
    from callbot.app.campaign_runner import run_campaign

    return run_campaign(settings, args.engine, args.list, args.campaign, args.bot, args.host, args.report,
                        args.control)


# ---- end of `callbot campaign` ----------------------------------------------------------------------------


# ---- `callbot web` and `callbot users` (callbot.web: the panel, its users) ------------------------------------


def _web_parser(sub) -> None:
    """`callbot web`: the panel over the store alone; `callbot users add`: the panel's users (docs/web.md)."""
    def store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML config: its [store] url (and [web] listen)")
        p.add_argument("--store", metavar="URL", help="the store's database URL, instead of the config's")

    web = sub.add_parser("web", help="serve the web panel over the call store until SIGTERM/SIGINT")
    store(web)
    web.add_argument("--listen", metavar="HOST:PORT", help="where (default: [web] listen, else 127.0.0.1:8088)")
    users = sub.add_parser("users", help="the web panel's users: add, list, disable, enable, set a password")
    users_sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = users_sub.add_parser("add", help="add a user (the password from a prompt, or --password-env)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, choices=["admin", "supervisor", "viewer"])
    add.add_argument("--tenant", metavar="NAME", help="only this tenant's calls (default: every tenant)")
    add.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    store(add)
    lst = users_sub.add_parser("list", help="the users, their roles and tenants")
    store(lst)
    for action, what in (("disable", "sign a user out at their next click and refuse their sign-ins"),
                         ("enable", "let a disabled user sign in again")):
        p = users_sub.add_parser(action, help=what)
        p.add_argument("name", metavar="NAME")
        store(p)
    pw = users_sub.add_parser("password", help="set a user's password (their sessions are signed out)")
    pw.add_argument("name", metavar="NAME")
    pw.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    store(pw)


def _web_commands(args: argparse.Namespace) -> int:
    """`callbot web` / `callbot users ...`: a store that cannot be used or a bad user is one line, exit 2."""
    from callbot.app.settings import ConfigError, _parse_node, load_settings
    from callbot.store.database import StoreError

    settings = load_settings(args.config)
    url = args.store or settings.store_url()
    try:
        if args.command == "users":
            return _users(url, args)
        listen = args.listen or settings.web.listen or "127.0.0.1:8088"
        address = _parse_node(listen)
        if address is None:
            raise ConfigError(f"--listen {listen!r}: not HOST:PORT (127.0.0.1:8088)")
        return _web_serve(url, listen, address, args.config, settings)
    except StoreError as err:
        print(f"callbot: error: {err}", file=sys.stderr)
    return EXIT_USAGE


def _users(url: str, args: argparse.Namespace) -> int:
    import getpass
    import os

    from callbot.store.call_store import CallStore
    from callbot.web.users import UserError, Users

    with CallStore(url) as store:
        users = Users(store)
        if args.users_command == "list":
            for u in users.all():
                print(f"{u.name}  {u.role}  {u.tenant or '(all tenants)'}{'  disabled' if u.disabled else ''}")
            return 0
        if args.users_command in ("disable", "enable"):
            try:
                users.set_disabled(args.name, args.users_command == "disable", by=None, source="cli")
            except UserError as err:
                print(f"callbot: error: {err}", file=sys.stderr)
                return EXIT_USAGE
            print(f"user {args.name} {args.users_command}d")
            return 0
        if args.password_env:
            password = os.environ.get(args.password_env)
            if not password:
                print(f"callbot: error: --password-env: {args.password_env} is not set", file=sys.stderr)
                return EXIT_USAGE
        else:
            try:
                password = getpass.getpass(f"password for {args.name}: ")
                if getpass.getpass("again: ") != password:
                    print("callbot: error: the passwords differ", file=sys.stderr)
                    return EXIT_USAGE
            except (EOFError, KeyboardInterrupt):
                print("callbot: error: no password given (a prompt, or --password-env VAR)", file=sys.stderr)
                return EXIT_USAGE
        try:
            if args.users_command == "password":
                users.set_password(args.name, password, by=None, source="cli")
                print(f"user {args.name}: password set, their sessions signed out")
                return 0
            user = users.add(args.name, args.role, password, tenant=args.tenant, by=None, source="cli")
        except UserError as err:
            print(f"callbot: error: {err}", file=sys.stderr)
            return EXIT_USAGE
    print(f"user {user.name} added: {user.role}, {('tenant ' + user.tenant) if user.tenant else 'every tenant'}")
    return 0


def _web_serve(url: str, listen: str, address: tuple[str, int], config: str | None = None, settings=None) -> int:
    from callbot.app.bot_config import BotConfig
    from callbot.app.serve import stop_on_signals
    from callbot.app.web_campaigns import PanelCampaigns
    from callbot.web.server import WebServer

    campaigns = PanelCampaigns.of(settings, config=config) if settings is not None else None
    with stop_on_signals() as stop:
        try:  # with --config, its bots and flows in the editor (app/bot_config.py), its campaigns
            web = WebServer.start(url, *address, bots=BotConfig(config) if config else None, campaigns=campaigns)
        except OSError as err:
            print(f"callbot: error: --listen {listen}: {err.strerror or err}", file=sys.stderr)
            return EXIT_USAGE
        print(f"listening http://{listen}/ ({_shown(url)})", file=sys.stderr, flush=True)
        try:
            stop.wait()
        finally:
            web.stop()
            if campaigns is not None:
                campaigns.close()  # the dialers it started (started again, each resumes where it stopped)
    return 0


# ---- end of `callbot web` and `callbot users` -----------------------------------------------------------------


def _calls_parser(sub) -> None:
    """`callbot calls ...`: the call store (store/; docs/store.md)."""
    calls = sub.add_parser("calls", help="the call store: import, list, show, export calls; serve them as JSON")
    calls_sub = calls.add_subparsers(dest="calls_command", metavar="ACTION", required=True)

    def store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML config: its [store] url (default: the embedded "
                       "default's, calls.db in the recordings folder)")
        p.add_argument("--store", metavar="URL", help="the store's database URL (sqlite:///FILE, "
                       "postgresql+psycopg://...), instead of the config's")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", metavar="TIME", help="calls started at or after TIME (unix s, 2026-12-03, "
                       "2026-12-03T05:34; UTC unless an offset is given)")
        p.add_argument("--until", metavar="TIME", help="calls started before TIME")
        p.add_argument("--bot", metavar="NAME")
        p.add_argument("--tenant", metavar="NAME")
        p.add_argument("--outcome", metavar="WORD", help="open, unanswered, transferred, caller_hangup, "
                       "bot_hangup, max_duration, ...")
        p.add_argument("--category", metavar="NAME", help="calls where this category matched")
        p.add_argument("--min-score", type=float, metavar="N", help="a scorecard's score at least N")
        p.add_argument("--max-score", type=float, metavar="N", help="a scorecard's score at most N")
        p.add_argument("--text", metavar="WORDS", help="words said on the call (its transcript, any leg)")
        p.add_argument("--number", metavar="PHONE", help="a phone number or part of one, as written (its digits "
                       "found in the caller's or the called number)")
        p.add_argument("--incomplete", action="store_true", help="only calls not finished (going on, or cut)")

    imp = calls_sub.add_parser("import", help="put calls recorded in folders (their JSON records and events "
                               "files) into the store; a call the store holds complete is left as it is")
    imp.add_argument("dirs", metavar="DIR", nargs="+")
    store(imp)
    lst = calls_sub.add_parser("list", help="the calls the filters take, newest first, as a table")
    store(lst)
    filters(lst)
    lst.add_argument("--limit", type=int, default=100, metavar="N", help="at most N calls (default 100)")
    lst.add_argument("--json", action="store_true", help="JSON instead of a table")
    show = calls_sub.add_parser("show", help="one call: record, flow path, events, transcript, metrics, "
                                "categories, scores")
    show.add_argument("call_id", metavar="CALL_ID")
    store(show)
    show.add_argument("--json", action="store_true", help="the whole call as JSON (its events included)")
    exp = calls_sub.add_parser("export", help="the calls the filters take as CSV or JSON, to stdout or a file")
    store(exp)
    filters(exp)
    exp.add_argument("--format", choices=["csv", "json"], default="csv")
    exp.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    ana = calls_sub.add_parser("analyze", help="analyse past calls again (from their files, or only their "
                               "rules from the stored analysis) and keep the result in the store")
    ana.add_argument("call_ids", metavar="CALL_ID", nargs="*", help="these calls (default: those the filters take)")
    store(ana)
    filters(ana)
    ana.add_argument("--missing", action="store_true", help="only calls with no analysis stored (refused by a "
                     "full pool, or left when serve stopped)")
    ana.add_argument("--rules", metavar="FILE", help="this rules file for every call, instead of their tenant's "
                     "([[tenants]] rules) or [analytics] rules")
    ana.add_argument("--rules-only", action="store_true", help="evaluate only the categories and scorecards "
                     "again, on the stored analysis (no audio is read)")
    ana.add_argument("--limit", type=int, metavar="N", help="at most N calls (newest first)")
    purge = calls_sub.add_parser("purge", help="delete the calls started more than DAYS ago that are over: their "
                                 "files in every recordings folder, their store rows, old campaign attempts")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.add_argument("--tenant", metavar="NAME", help="only this tenant's calls")
    purge.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    store(purge)
    erase = calls_sub.add_parser("delete", help="erase calls: these Call-IDs, or every call of a caller (compared "
                                 "by digits; their campaign attempts too), files and store rows")
    erase.add_argument("call_ids", metavar="CALL_ID", nargs="*")
    erase.add_argument("--caller", metavar="NUMBER", help="every call from or to this number")
    erase.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    store(erase)
    api = calls_sub.add_parser("api", help="serve the store's JSON HTTP API (GET /api/calls, /api/stats, ...) "
                               "until SIGTERM/SIGINT")
    store(api)
    api.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8091",
                     help="where (default 127.0.0.1:8091: this machine only)")


def _settings(args: argparse.Namespace):
    from callbot.app.settings import load_settings

    settings = load_settings(args.config)
    if args.model:
        settings = msgspec.structs.replace(settings, model=msgspec.structs.replace(settings.model, path=args.model))
    return settings


def run(args: argparse.Namespace) -> int:
    from callbot.app.settings import ConfigError

    if args.command == "flows":
        return _flows_check(args.files)
    if args.command == "rules":
        return _rules_check(args.files)
    if args.command == "calls":
        return _calls(args)
    if args.command in ("web", "users"):
        return _web_commands(args)
    settings = _settings(args)
    if getattr(args, "supervised", None):  # started by `serve --edge --workers` (app/workers.py): its part
        from callbot.app.workers import parse_supervised, supervised_settings

        settings = supervised_settings(settings, parse_supervised(args.supervised))
    if args.command == "campaign":
        return _campaign(args, settings)
    if args.command == "model-service":  # before serve is imported: this process never loads pjsua2
        from callbot.app.model_service import run_model_service

        return run_model_service(settings, args.engine, metrics_address=args.metrics,
                                 step_delay_ms=args.step_delay_ms)
    if args.command == "serve" and args.workers is not None and not args.edge:
        raise ConfigError("--workers runs serve's workers behind the edge: add --edge")
    if args.command == "edge" or (args.command == "serve" and args.edge):
        return _edge(args, settings)  # the supervisor of --workers loads no pjsua2 either (app/workers.py)
    from callbot.app import serve

    if args.command == "serve" and args.supervised:
        return serve.serve(settings, args.engine, config=args.config)
    if args.command == "serve":
        from callbot.app.edge import public_exposure_warning

        # said once the line is up, after the "listening" lines: a start that fails says only why it failed
        return serve.serve(settings, args.engine, warning=public_exposure_warning(settings), config=args.config)
    bot = settings.bot(args.bot) if args.bot else settings.bots[0]
    if args.bot:  # the chosen bot speaks first in the engine's list, so it is the one that calls
        settings = msgspec.structs.replace(settings, bots=(bot, *(b for b in settings.bots if b is not bot)))
    if args.edge:
        return _edge(args, settings, account=bot.account, bot=bot.name)
    return serve.call(settings, args.engine, args.uri, account=bot.account, bot=bot.name)


def _edge(args: argparse.Namespace, settings, **call) -> int:
    """`callbot edge`, `callbot serve --edge` and `callbot call --edge` (app/edge.py)."""
    import pathlib

    from callbot.app import edge

    settings = edge.resolve_paths(settings, pathlib.Path(args.config).parent if args.config else ".")
    if args.command == "edge":
        return edge.run_edge(settings, source=args.config or "the default config", print_only=args.print_only,
                             check_only=args.check)
    source = args.config or "the default config"
    if args.command == "serve" and (args.workers is not None or settings.edge.serve_workers > 1):
        from callbot.app.workers import supervise

        workers = args.workers if args.workers is not None else settings.edge.serve_workers
        return supervise(settings, args.engine, workers, config=args.config, model=args.model, source=source)
    if args.command == "call":
        return edge.call_with_edge(settings, args.engine, args.uri, source=source, **call)
    return edge.serve_with_edge(settings, args.engine, source=source)


def _flows_check(files: list[str]) -> int:
    """`callbot flows check FILE...`: the same checks a bot's flow gets when the config is loaded."""
    from callbot.flows.schema import FlowError, load_flow

    status = 0
    for path in files:
        try:
            flow = load_flow(path)
        except FlowError as err:
            print(f"callbot: error: {err}", file=sys.stderr)
            status = 2
        else:
            print(f"{path}: ok ({len(flow.states)} states, starts at {flow.start!r})")
    return status


def _rules_check(files: list[str]) -> int:
    """`callbot rules check FILE...`: the checks serve gives [analytics] and tenants' rules at load."""
    from callbot.analytics.rules import RulesError, load_rules

    status = 0
    for path in files:
        try:
            rules = load_rules(path)
        except RulesError as err:
            for line in err.lines:
                print(f"callbot: error: {line}", file=sys.stderr)
            status = EXIT_USAGE
        else:
            print(f"{path}: ok ({len(rules.categories)} categories, {len(rules.scorecards)} scorecards)")
    return status


def _calls(args: argparse.Namespace) -> int:
    """`callbot calls ACTION`: the store at --store, else the config's [store] url (store/queries.py answers).
    A store that cannot be reached or read, a bad filter: one line, exit 2."""
    from sqlalchemy.exc import SQLAlchemyError

    from callbot.app.settings import ConfigError, load_settings
    from callbot.store.database import StoreError
    from callbot.store.queries import QueryError

    settings = load_settings(args.config)
    url = args.store or settings.store_url()
    try:
        if args.calls_command == "import":
            return _calls_import(url, args.dirs)
        if args.calls_command == "analyze":
            return _calls_analyze(url, args, settings)
        if args.calls_command == "api":
            return _calls_api(url, args.listen, settings, args.config)
        if args.calls_command in ("purge", "delete"):
            return _calls_purge(url, args, settings, explicit_store=args.store is not None)
        return _calls_read(url, args)
    except (StoreError, QueryError) as err:
        print(f"callbot: error: {err}", file=sys.stderr)
    except SQLAlchemyError as err:
        text = str(getattr(err, "orig", None) or err).strip()
        print(f"callbot: error: store {_shown(url)}: {text.splitlines()[0] if text else type(err).__name__}",
              file=sys.stderr)
    except ConfigError:
        raise
    return EXIT_USAGE


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _existing_store(url: str):
    """The store at `url` for reading: an SQLite file that is not there is an error, not a new store."""
    import os

    from sqlalchemy.engine import make_url

    from callbot.store.call_store import CallStore
    from callbot.store.database import StoreError, check_url

    problem = check_url(url)
    if problem is not None:
        raise StoreError(problem)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not os.path.isfile(parsed.database):
        raise StoreError(f"no call store at {parsed.database} (`callbot serve` writes it; "
                         "`callbot calls import DIR` fills it from recorded calls)")
    return CallStore(url)


def _calls_purge(url: str, args: argparse.Namespace, settings, explicit_store: bool) -> int:
    """`callbot calls purge` / `delete` (store/retention.py): the calls' files in every recordings folder of
    the config, and their rows in the store (none: the store is off, or its SQLite file not made yet)."""
    import time

    from callbot.store.retention import Selection, purge, store_exists

    try:
        if args.calls_command == "purge":
            if args.older_than < 0:
                raise ValueError(f"--older-than {args.older_than:g}: a number of days, 0 or more")
            selection = Selection(before=time.time() - args.older_than * 86400, tenant=args.tenant)
        else:
            selection = Selection(call_ids=frozenset(args.call_ids), caller=args.caller)
    except ValueError as err:
        print(f"callbot: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    store = None
    if explicit_store or (settings.store.enabled and store_exists(url)):
        store = _existing_store(url)
    try:
        report = purge(settings.recording_dirs(), store, selection, dry_run=args.dry_run)
    finally:
        if store is not None:
            store.close()
    for problem in report.problems:
        print(f"callbot: {problem}", file=sys.stderr)
    print(report.line(args.dry_run))
    return 1 if report.problems else 0


def _calls_import(url: str, dirs: list[str]) -> int:
    from callbot.store.call_store import CallStore
    from callbot.store.importer import import_dir

    status = 0
    with CallStore(url) as store:
        for directory in dirs:
            report = import_dir(store, directory)
            for problem in report.problems:
                print(f"callbot: skipped {problem}", file=sys.stderr)
            print(f"{directory}: {report.imported} imported, {report.replaced} replaced, {report.skipped} "
                  f"already complete, {report.events} events" + (f", {report.bad_lines} bad event lines"
                                                                 if report.bad_lines else ""))
            if report.problems and not (report.imported or report.replaced or report.skipped):
                status = EXIT_USAGE
    return status


def _calls_analyze(url: str, args: argparse.Namespace, settings) -> int:
    """`callbot calls analyze`: the calls named, or those the filters take, analysed again (app/reanalyze.py)."""
    from callbot.analytics.rules import check_rules_file
    from callbot.app.reanalyze import Reanalysis, ReanalysisError, calls_to_analyze, summary
    from callbot.store import queries

    if args.rules is not None:
        problems = check_rules_file(args.rules)
        for line in problems:
            print(f"callbot: error: {line}", file=sys.stderr)
        if problems:
            return EXIT_USAGE
    with _existing_store(url) as store:
        ids = list(args.call_ids)
        if not ids:
            with store.reading() as conn:
                ids = [r["call_id"] for r in queries.list_calls(conn, _call_filter(args, args.limit))]
        rows = calls_to_analyze(store, ids, args.missing)
        try:
            done, skipped = Reanalysis(store, settings, rules=args.rules).run(
                rows, args.rules_only, lambda outcome: print(summary(outcome), flush=True))
        except ReanalysisError as err:
            print(f"callbot: error: {err}", file=sys.stderr)
            return EXIT_USAGE
    print(f"{done} analysed, {skipped} skipped" + (" (rules only)" if args.rules_only else ""))
    return 0 if done or not skipped else 1


def _call_filter(args: argparse.Namespace, limit: int | None):
    from callbot.store.queries import CallFilter, parse_time

    return CallFilter(since=parse_time(args.since) if args.since else None,
                      until=parse_time(args.until) if args.until else None,
                      bot=args.bot, tenant=args.tenant, outcome=args.outcome, category=args.category,
                      min_score=args.min_score, max_score=args.max_score, text=args.text, number=args.number,
                      complete=False if args.incomplete else None, limit=limit)


def _calls_read(url: str, args: argparse.Namespace) -> int:
    import json

    from callbot.store import queries
    from callbot.store.export import write_calls

    with _existing_store(url) as store, store.reading() as conn:
        if args.calls_command == "list":
            rows = queries.list_calls(conn, _call_filter(args, args.limit))
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_calls(rows)
            return 0
        if args.calls_command == "export":
            rows = queries.list_calls(conn, _call_filter(args, None))
            out = open(args.output, "w", newline="") if args.output else sys.stdout
            try:
                write_calls(rows, args.format, out)  # store/export.py: formulas neutralised
            finally:
                if args.output:
                    out.close()
            return 0
        detail = queries.call_detail(conn, args.call_id)
        if detail is None:
            print(f"callbot: error: no call {args.call_id!r} in the store", file=sys.stderr)
            return 1
        detail["events"] = queries.call_events(conn, args.call_id)
    if args.json:
        print(json.dumps(detail, indent=2))
    else:
        _print_call(detail)
    return 0


_TABLE = (("start (UTC)", lambda r: _iso(r["start_at"])), ("call_id", lambda r: r["call_id"]),
          ("dur s", lambda r: "" if r["duration_s"] is None else f"{r['duration_s']:.1f}"),
          ("bot", lambda r: r["bot"] or ""), ("tenant", lambda r: r["tenant"] or ""),
          ("caller", lambda r: r["caller"] or ""), ("outcome", lambda r: r["outcome"] or ""),
          ("flow state", lambda r: r["flow_state"] or ""), ("done", lambda r: "yes" if r["complete"] else "no"),
          ("categories", lambda r: ",".join(r["categories"])),
          ("scores", lambda r: ",".join(f"{k}={v:g}" for k, v in r["scores"].items())))


def _iso(t) -> str:
    from callbot.store.queries import iso

    return (iso(t) or "").replace("+00:00", "")


def _print_calls(rows: list[dict]) -> None:
    table = [[name for name, _ in _TABLE]] + [[cell(r) for _, cell in _TABLE] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_TABLE))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(f"({len(rows)} call{'s' if len(rows) != 1 else ''})")


def _print_call(d: dict) -> None:
    c = d["call"]
    print(f"call {c['call_id']}  ({'complete' if c['complete'] else 'not complete'})")
    for label, key in (("direction", "direction"), ("tenant", "tenant"), ("bot", "bot"), ("route", "route"),
                       ("account", "account"), ("caller", "caller"), ("called", "called"), ("codec", "codec"),
                       ("outcome", "outcome"), ("hangup", "hangup_cause"), ("recording", "recording_path")):
        if c.get(key) is not None:
            print(f"  {label:<10} {c[key]}")
    print(f"  {'start':<10} {_iso(c['start_at'])}  answered {_iso(c['answered_at']) or '-'}  "
          f"end {_iso(c['end_at']) or '-'}  ({'-' if c['duration_s'] is None else c['duration_s']} s)")
    if c.get("hangup_code") is not None:
        print(f"  {'sip':<10} {c['hangup_code']} {c.get('hangup_reason') or ''}")
    for leg in d["legs"]:
        print(f"  leg        {leg['kind']} -> {leg['target']} succeeded={leg['succeeded']} "
              f"{leg['code'] or ''} {leg['reason'] or ''}".rstrip())
    if d["flow"]["transitions"]:
        print(f"flow {d['flow']['name']}: {' -> '.join(d['flow']['path']) or '-'}")
        for m in d["flow"]["transitions"]:
            print(f"  {m['t_ms'] or 0:9.1f} ms  {m['from_state'] or '(start)'} -> {m['to_state'] or '(end)'}  "
                  f"{m['reason']} {m['detail']}".rstrip())
    transcript = d["transcript"]
    if transcript["turns"] or transcript["live"]:
        print("transcript" + (" (analysis)" if transcript["turns"] else " (live)"))
        for t in transcript["turns"]:
            sentiment = "" if t["sentiment"] is None else f"  [{t['sentiment']:+.2f}]"
            print(f"  {t['start_ms'] / 1000:7.2f} s  {t['leg']:<6} {t['text']}{sentiment}")
        if not transcript["turns"]:
            for t in transcript["live"]:
                print(f"  {(t['t_ms'] or 0) / 1000:7.2f} s  {t['leg']:<6} {t['text']}")
    for leg, values in d["metrics"].items():
        print(f"metrics {leg}: " + ", ".join(f"{k}={v:g}" for k, v in values.items()))
    for cat in d["categories"]:
        print(f"category {cat['category']}: {'matched' if cat['matched'] else 'not matched'}"
              + (f"  ({'; '.join(cat['evidence'])})" if cat["evidence"] else ""))
    for card in d["scores"]:
        print(f"score {card['scorecard']}: {card['score']:g} / {card['max_score']:g}")
        for item in card["items"]:
            print(f"  {'pass' if item['passed'] else 'fail'}  {item['rule']} (weight {item['weight']:g})")
    print(f"events ({len(d['events'])})")
    for e in d["events"]:
        fields = {k: v for k, v in e.items() if k not in ("ts", "event", "call_id")}
        print(f"  {e.get('ts', '')}  {e.get('event')}  {json_line(fields)}")


def json_line(value) -> str:
    import json

    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."


def _calls_api(url: str, listen: str, settings=None, config: str | None = None) -> int:
    """`callbot calls api`: the JSON API until SIGTERM/SIGINT, with the campaigns (app/campaign_api.py) in
    <recordings_dir>/campaigns; the dialers it started are stopped with it."""
    from callbot.app.campaign_api import CampaignRegistry, routes
    from callbot.app.serve import stop_on_signals
    from callbot.app.settings import ConfigError, _parse_node
    from callbot.store.api import ApiServer

    address = _parse_node(listen)
    if address is None:
        raise ConfigError(f"--listen {listen!r}: not HOST:PORT (127.0.0.1:8091)")
    import os

    # a dialer may run with this config ([campaigns] dialer_config first): `calls api` holds no SIP port
    registry = CampaignRegistry(os.path.join(settings.recordings_dir if settings else ".", "campaigns"),
                                (settings.campaigns.dialer_config if settings else None) or config,
                                engine=settings.campaigns.engine if settings else "model")
    with stop_on_signals() as stop:
        try:
            api = ApiServer.start(url, *address, routes=routes(registry))
        except OSError as err:
            print(f"callbot: error: --listen {listen}: {err.strerror or err}", file=sys.stderr)
            return EXIT_USAGE
        print(f"listening http://{listen}/api/calls ({_shown(url)})", file=sys.stderr, flush=True)
        try:
            stop.wait()
        finally:
            api.stop()
            registry.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from callbot.app.errors import StartupError
    from callbot.app.settings import ConfigError

    # a crash in native code (pjsip, MLX) prints every Python thread's stack to stderr before the process
    # dies, so that a segfault seen once (in CI, in the field) says where it was
    try:
        faulthandler.enable()
    except (AttributeError, ValueError, OSError):  # a stderr with no file descriptor (embedded, captured)
        pass
    # pjsip's own log goes to `[sip] log_file` when one is set; without it, nowhere (not stderr, where
    # Python's last-resort handler would print its warnings): the user reads our lines, not pjlib's
    pjsip_log = logging.getLogger("callbot.sip.pjsip")
    pjsip_log.addHandler(logging.NullHandler())
    pjsip_log.propagate = False
    try:
        return run(args)
    except (ConfigError, StartupError) as err:
        print(f"callbot: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
