"""Log line helpers: escaping client-supplied values and the per-recipient decision line."""

from __future__ import annotations

import logging
import re
from typing import Dict, List, Optional

from .journal import FIELDS_ATTR

logger = logging.getLogger("relaymilter")


def escape(value: Optional[str]) -> str:
    """Make a client-supplied value safe to print: for one log line, a terminal, a report.

    CR, LF, other control characters, backslashes, undecodable bytes
    (surrogate escapes) and every other character that is not printable
    (bidirectional controls such as U+202E, zero-width and other format
    characters, line and paragraph separators, non-breaking spaces) become
    visible escapes, so a client can neither forge lines nor make text read
    other than it is.
    """
    if value is None:
        return "-"
    if value.isprintable() and "\\" not in value:
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
        elif ch.isprintable():
            out.append(ch)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


#: A value written bare: printable ASCII without space, quote or backslash.
BARE = re.compile(r"[!#-\[\]-~]+")
#: The most bytes (UTF-8) one value takes in a line, quotes included; a longer value is
#: cut. So a decision line stays under syslog's usual 8 KiB whatever the client sends.
MAX_VALUE_BYTES = 480
#: How a cut value ends, inside its quotes: ``\+N``, N being the characters left out.
#: ``quote`` never writes a backslash before ``+`` otherwise, so it cannot be forged.
_CUT = re.compile(r'\\\+([0-9]+)"\Z')


def quote(value: Optional[str], limit: int = MAX_VALUE_BYTES) -> str:
    """One ``key=value`` value of a log line that no value can make ambiguous.

    Bare when it is printable ASCII without spaces, quotes or backslashes;
    otherwise in double quotes, with ``\\``, ``\"`` and every character that
    is not printable (controls, Unicode line and paragraph separators,
    bidirectional controls, undecodable bytes) as a backslash escape. So a
    parser that reads ``key=`` then a bare token or a quoted string always
    gets the fields that were written. None is ``-``; the string ``-`` is
    quoted to stay distinct. A value whose quoted form would take more than
    ``limit`` bytes is cut, marked ``\\+N`` before its closing quote.
    """
    if value is None:
        return "-"
    if value != "-" and len(value) <= limit and BARE.fullmatch(value):
        return value  # the usual case, checked in C
    pieces = [_escaped(char) for char in value]
    size = 2 + sum(len(piece) if piece.isascii() else len(piece.encode()) for piece in pieces)
    if size <= limit:
        return '"' + "".join(pieces) + '"'
    return _cut(pieces, limit)


def _escaped(char: str) -> str:
    code = ord(char)
    if char == "\\" or char == '"':
        return "\\" + char
    if char.isprintable():
        return char
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte from the MTA
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _cut(pieces: List[str], limit: int) -> str:
    """The first characters whose quoted form fits in ``limit`` with the ``\\+N`` mark."""
    # The mark's own size depends on N: reserve room for the longest N first.
    budget = limit - 2 - len(f"\\+{len(pieces)}")
    kept = []
    for piece in pieces:
        budget -= len(piece.encode())
        if budget < 0:
            break
        kept.append(piece)
    return '"' + "".join(kept) + f'\\+{len(pieces) - len(kept)}"'


def unquote(token: str) -> str:
    """The value ``quote`` wrote (for a cut value, the part it kept)."""
    if not (len(token) >= 2 and token.startswith('"') and token.endswith('"')):
        return token
    cut = _CUT.search(token)
    inside = token[1 : cut.start()] if cut else token[1:-1]
    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)", _unescape, inside)


def left_out(token: str) -> int:
    """How many characters ``quote`` left out of the value ``token`` (0: it is whole)."""
    cut = _CUT.search(token) if token.endswith('"') else None
    return int(cut.group(1)) if cut else 0


def _unescape(match: re.Match[str]) -> str:
    escaped = match.group(1)
    if len(escaped) == 1:
        return escaped
    return chr(int(escaped[1:], 16))


#: A value as ``quote`` writes it: a quoted string (an unterminated one does not
#: match), or a bare token.
_VALUE = r'"(?:[^"\\]|\\.)*"|[!#-\[\]-~]+'
#: A ``key=value`` field of a log line, its key and its value captured.
FIELD = re.compile(rf"(\w+)=({_VALUE})")
#: Fields separated by one space, and nothing else.
FIELD_SEQUENCE = re.compile(rf"\w+=(?:{_VALUE})(?: \w+=(?:{_VALUE}))*")


def log_fields(**fields: Optional[str]) -> Dict[str, Dict[str, str]]:
    """``extra=`` for a log call: structured fields for the journal (upper-case keys)."""
    return {FIELDS_ATTR: {key.upper(): value for key, value in fields.items() if value is not None}}
