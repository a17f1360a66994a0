"""Logging set-up: plain stderr lines (journald support is added with the packaging)."""

from __future__ import annotations

import logging
import sys

#: Attribute of a LogRecord that carries structured fields (upper-case keys).
FIELDS_ATTR = "relaymilter_fields"


def configure_logging(level: int = logging.INFO) -> None:
    """Send relaymilter's log records to stderr, one plain line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("relaymilter")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
