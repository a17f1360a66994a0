"""``relaymilter policy``: the Postfix policy service in the foreground."""

from __future__ import annotations

import argparse
import logging

from ..decisionlog.journal import configure_logging
from .common import config_option, config_path

NAME = "policy"
HELP = "run the Postfix policy service in the foreground"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument(
        "--socket",
        metavar="SPEC",
        help="listen here instead of the config's policy_service.socket",
    )


def main(args: argparse.Namespace) -> int:
    configure_logging(logging.INFO)
    from ..policyd.service import run

    return run(config_path(args), args.socket)
