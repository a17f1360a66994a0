"""``relaymilter run``: the milter in the foreground."""

from __future__ import annotations

import argparse
import logging

from ..decisionlog.journal import configure_logging
from .common import config_option, config_path

NAME = "run"
HELP = "run the milter in the foreground"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument(
        "--socket", metavar="SPEC", help="listen here instead of the config's socket"
    )


def main(args: argparse.Namespace) -> int:
    configure_logging(logging.INFO)
    from ..milterd.service import run  # pymilter is needed only here

    return run(config_path(args), args.socket)
