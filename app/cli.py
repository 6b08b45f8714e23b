"""The `callbot` command: `serve` answers calls (`serve --edge --workers N`: N of them behind the edge, under
a supervisor: app/workers.py), `call` places one, `edge` runs the SIP edge, `model-service` serves one
model to several `serve` workers, `flows check` checks call flow files.

It lives in callbot.app, the top of the arrows: a command may use the SIP side and the engine both.
Every problem a user can cause (config, weights, ports) ends as one line on stderr and exit status 2,
never a traceback.
"""
from __future__ import annotations

import argparse
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
    return parser


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
    settings = _settings(args)
    if getattr(args, "supervised", None):  # started by `serve --edge --workers` (app/workers.py): its part
        from callbot.app.workers import parse_supervised, supervised_settings

        settings = supervised_settings(settings, parse_supervised(args.supervised))
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
        return serve.serve(settings, args.engine)
    if args.command == "serve":
        from callbot.app.edge import public_exposure_warning

        # said once the line is up, after the "listening" lines: a start that fails says only why it failed
        return serve.serve(settings, args.engine, warning=public_exposure_warning(settings))
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from callbot.app.errors import StartupError
    from callbot.app.settings import ConfigError

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
