"""The options ``report`` and ``replay`` share: where the decision records come from, and which."""

from __future__ import annotations

import argparse
import re
import time

from ..decisionlog.logsource import CursorFile, Selection, Sources, Stats, parse_time


def add_log_source_options(parser: argparse.ArgumentParser) -> None:
    # "--since -7d", as journalctl takes it: argparse reads an argument that starts
    # with "-" as an option unless it looks like a negative number, "-7d" included.
    parser._negative_number_matcher = re.compile(r"^-\d")
    parser.add_argument(
        "--journal",
        action="store_true",
        help="read the system journal (the default when no other source is given)",
    )
    parser.add_argument("--journal-dir", action="append", metavar="DIR", help="a journal directory")
    parser.add_argument("--journal-file", action="append", metavar="FILE", help="a journal file")
    parser.add_argument(
        "--log", action="append", metavar="FILE", help="a log file (plain, syslog, .gz)"
    )
    parser.add_argument("--since", metavar="TIME", help="journalctl's formats: '2026-11-23', '-7d'")
    parser.add_argument("--until", metavar="TIME", help="journalctl's formats")
    parser.add_argument(
        "--cursor-file",
        metavar="FILE",
        help="start after the position saved here, and save the new one (incremental runs)",
    )
    parser.add_argument(
        "--top", type=int, default=20, metavar="N", help="list N groups, then 'other' (0: all)"
    )


def selection_from_args(args: argparse.Namespace) -> Selection:
    """The sources, period and cursor file the options name; ValueError or SourceError if wrong."""
    now = time.time()
    since = parse_time(args.since, now) if args.since else None
    until = parse_time(args.until, now) if args.until else None
    if args.top < 0:
        raise ValueError("--top must be 0 (all) or more")
    sources = Sources.from_options(args.journal_dir, args.journal_file, args.log, args.journal)
    return Selection(sources, since, until, CursorFile(args.cursor_file), Stats())
