"""``relaymilter report``: what enforcing would break, and what it did, from the decision log."""

from __future__ import annotations

import argparse
import sys

from ..decisionlog.logsource import SourceError
from ..decisionlog.report import FORMATS, build_report
from .common import EXIT_ERROR, EXIT_OK, load_or_report, optional_config_path
from .logoptions import add_log_source_options, selection_from_args

NAME = "report"
HELP = "what enforcing would break, from the decision log"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_log_source_options(parser)
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help="the config in force, to make remedies concrete (default: as run, if it exists)",
    )
    parser.add_argument("--all", action="store_true", help="also list the flows that pass")
    formats = parser.add_mutually_exclusive_group()
    for name in ("json", "csv", "html"):
        formats.add_argument(f"--{name}", action="store_true", help=f"{name.upper()} output")


def main(args: argparse.Namespace) -> int:
    """0 on success, 1 on an error (a bad source, option or config)."""
    config_path = optional_config_path(args)
    config = None
    if config_path is not None:
        config = load_or_report(config_path)
        if config is None:
            if args.config:
                return EXIT_ERROR
            # The default file, unreadable here: the remedies then come from the log alone.
            print("relaymilter: report: going on without the config", file=sys.stderr)
    try:
        selection = selection_from_args(args)
        report = build_report(
            selection.entries(),
            config,
            selection.since,
            selection.until,
            args.top,
            args.all,
            selection.stats,
        )
        name = "json" if args.json else "csv" if args.csv else "html" if args.html else "text"
        sys.stdout.write(FORMATS[name](report))
        sys.stdout.flush()
    except (SourceError, ValueError) as exc:
        print(f"relaymilter: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        print(f"relaymilter: report failed: {exc!r}", file=sys.stderr)
        return EXIT_ERROR
    if selection.stats.errors:
        # The cursor stays where it was: what could not be read is read next time.
        return EXIT_OK
    selection.cursor.save()  # only once the report is out
    return EXIT_OK
