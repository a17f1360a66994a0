"""``relaymilter replay``: decide the logged recipients again under a candidate config."""

from __future__ import annotations

import argparse
import sys

from ..decisionlog.logsource import SourceError
from ..decisionlog.replay import EXIT_ERROR, as_json, as_text, replay
from .common import load_or_report
from .logoptions import add_log_source_options, selection_from_args

NAME = "replay"
HELP = "decide the logged recipients again under a config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_log_source_options(parser)
    parser.add_argument(
        "-c", "--config", required=True, metavar="CANDIDATE.yml", help="the candidate config"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    """0 nothing newly refused, 1 something is, 2 an error."""
    config = load_or_report(args.config)
    if config is None:
        return EXIT_ERROR
    try:
        selection = selection_from_args(args)
        result = replay(
            selection.entries(),
            config,
            selection.since,
            selection.until,
            args.top,
            selection.stats,
        )
        sys.stdout.write(as_json(result) if args.json else as_text(result))
        sys.stdout.flush()
    except (SourceError, ValueError) as exc:
        print(f"relaymilter: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a deploy gate must read a crash as an error, not as "refused"
        print(f"relaymilter: replay failed: {exc!r}", file=sys.stderr)
        return EXIT_ERROR
    if result.totals["errors"]:
        print("relaymilter: some records could not be read (see above)", file=sys.stderr)
        return EXIT_ERROR  # the cursor stays: the unread records are read next time
    if not result.totals["records"]:
        print("relaymilter: no decision records were read: nothing to replay", file=sys.stderr)
        return EXIT_ERROR
    selection.cursor.save()
    return result.exit_status
