"""``relaymilter sync``: fetch the organizations from the config's sources into the snapshot."""

from __future__ import annotations

import argparse
import sys

from .common import config_option, config_path

NAME = "sync"
HELP = "fetch the organizations from the config's sources into the snapshot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--dry-run", action="store_true", help="fetch and validate, show what would change"
    )
    modes.add_argument(
        "--status", action="store_true", help="each source's last success and error, the age"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="take a result that removes more than max_removed_domains, or an empty one",
    )
    parser.add_argument("--json", action="store_true", help="with --status: the status as JSON")


def main(args: argparse.Namespace) -> int:
    from ..sync import runner

    path = config_path(args)
    if args.status:
        return runner.show_status(path, args.json, sys.stdout, sys.stderr)
    return runner.run(path, args.dry_run, args.force, sys.stdout, sys.stderr)
