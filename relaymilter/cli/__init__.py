"""The ``relaymilter`` command: run, policy, check-config, explain, inspect-cert, report, ...

Each command is a module of this package with ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int``; ``COMMANDS`` lists them
in the order ``--help`` shows them. A new command is a new module listed
there. A command imports what only it needs (pymilter, the sync, the
decision-log readers) inside its ``main``, so that the others stay light.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .. import __version__
from . import checkconfig, explain, inspectcert, policy, replay, report, run, sync

COMMANDS = (run, policy, checkconfig, explain, inspectcert, report, sync, replay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaymilter",
        description=(
            "Relay-policy milter and Postfix policy service: Exchange Online's ATTR36 rule "
            "for Postfix and Sendmail."
        ),
    )
    parser.add_argument("--version", action="version", version=f"relaymilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        subparser = sub.add_parser(command.NAME, help=command.HELP)
        command.add_arguments(subparser)
        subparser.set_defaults(main=command.main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.main(args)
    return status
