"""What the commands share: the config file's path, loading it with a report of its errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..config import ConfigError, load_config
from ..core.model import DEFAULT_CONFIG_PATH, Config
from ..decisionlog.journal import stderr_is_journal

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

# sd-daemon(3) priority prefixes: on a journal stream (systemd's default
# SyslogLevelPrefix=yes) they set each line's priority, so the reasons for a
# refused "systemctl reload" show in "journalctl -p warning", not at info.
ERR_PREFIX = "<3>"
WARNING_PREFIX = "<4>"


def default_config_path() -> str:
    return os.environ.get("RELAYMILTER_CONFIG") or DEFAULT_CONFIG_PATH


def config_path(args: argparse.Namespace) -> str:
    """The ``-c`` option, else the default."""
    path: str = args.config or default_config_path()
    return path


def optional_config_path(args: argparse.Namespace) -> Optional[str]:
    """The ``-c`` option, else the default if it exists (for commands that can do without)."""
    path = config_path(args)
    return path if args.config or os.path.exists(path) else None


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help=f"config file (default: $RELAYMILTER_CONFIG or {DEFAULT_CONFIG_PATH})",
    )


def load_or_report(path: str) -> Optional[Config]:
    """The config at ``path``, or None having printed every error to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        prefix = ERR_PREFIX if stderr_is_journal() else ""
        print(f"{prefix}relaymilter: {len(exc.issues)} error(s) in {path}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"{prefix}  {issue}", file=sys.stderr)
        return None
