"""Log line helpers: escaping client-supplied values and the per-recipient decision line."""

from __future__ import annotations

import logging
from typing import Dict, Optional

from .journal import FIELDS_ATTR

logger = logging.getLogger("relaymilter")


def escape(value: Optional[str]) -> str:
    """Make a client-supplied value safe for one log line.

    CR, LF, other control characters, backslashes and undecodable bytes
    (surrogate escapes) become visible escapes, so a client cannot forge lines.
    """
    if value is None:
        return "-"
    if value.isascii() and value.isprintable() and "\\" not in value:
        return value  # the usual case, checked in C
    out = []
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code < 32 or code == 127:
            out.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte from the MTA
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF or 0x80 <= code < 0xA0:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def log_fields(**fields: Optional[str]) -> Dict[str, Dict[str, str]]:
    """``extra=`` for a log call: structured fields for the journal (upper-case keys)."""
    return {FIELDS_ATTR: {key.upper(): value for key, value in fields.items() if value is not None}}
