"""The `callbot` command: one entry point, subcommands arriving with their issues.

It lives in callbot.sip because it is the top of the arrow sip -> engine: a command may use both.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbot",
        description="A full-duplex speech model answering and placing phone calls over SIP.",
    )
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
