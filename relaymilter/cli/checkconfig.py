"""``relaymilter check-config``: validate the config file, print what is loaded and the warnings."""

from __future__ import annotations

import argparse
import gc
import sys

from ..decisionlog.journal import stderr_is_journal
from .common import (
    EXIT_ERROR,
    EXIT_OK,
    WARNING_PREFIX,
    config_option,
    config_path,
    load_or_report,
)

NAME = "check-config"
HELP = "validate the config file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_option(parser)


def main(args: argparse.Namespace) -> int:
    path = config_path(args)
    gc.disable()  # see relaymilter.sync.runner.run: a large config loads three times faster
    config = load_or_report(path)
    if config is None:
        return EXIT_ERROR
    print(f"{path}: OK: {config.summary()}")
    if config.sources is not None:
        from ..sync.status import load_status, status_line

        sources = ", ".join(f"{s.kind} {s.name!r}" for s in config.sources.sources)
        state = status_line(config.sources, load_status(config.sources.status))
        print(f"sources: {sources}: {state}")
    journal = stderr_is_journal()
    for warning in config.warnings:
        if journal:
            print(f"{WARNING_PREFIX}warning: {warning}", file=sys.stderr)
        else:
            print(f"warning: {warning}")
    return EXIT_OK
