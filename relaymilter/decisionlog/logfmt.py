"""Log line helpers: escaping client-supplied values and the per-recipient decision line."""

from __future__ import annotations

import logging
import re
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


#: A value written bare: printable ASCII without space, quote or backslash.
BARE = re.compile(r"[!#-\[\]-~]+")


def quote(value: Optional[str]) -> str:
    """One ``key=value`` value of a log line that no value can make ambiguous.

    Bare when it is printable ASCII without spaces, quotes or backslashes;
    otherwise in double quotes, with ``\\``, ``\"`` and every character that
    is not printable (controls, Unicode line and paragraph separators,
    bidirectional controls, undecodable bytes) as a backslash escape. So a
    parser that reads ``key=`` then a bare token or a quoted string always
    gets the fields that were written. None is ``-``; the string ``-`` is
    quoted to stay distinct.
    """
    if value is None:
        return "-"
    if value != "-" and BARE.fullmatch(value):
        return value  # the usual case, checked in C
    out = ['"']
    for char in value:
        code = ord(char)
        if char == "\\" or char == '"':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte from the MTA
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def unquote(token: str) -> str:
    """The value ``quote`` wrote (for readers of the log: tests, reports)."""
    if not (len(token) >= 2 and token.startswith('"') and token.endswith('"')):
        return token
    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)", _unescape, token[1:-1])


def _unescape(match: re.Match[str]) -> str:
    escaped = match.group(1)
    if len(escaped) == 1:
        return escaped
    return chr(int(escaped[1:], 16))


#: A ``key=value`` field of a log line as ``quote`` writes values.
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]\S*)')


def log_fields(**fields: Optional[str]) -> Dict[str, Dict[str, str]]:
    """``extra=`` for a log call: structured fields for the journal (upper-case keys)."""
    return {FIELDS_ATTR: {key.upper(): value for key, value in fields.items() if value is not None}}
