"""Postfix's SMTPD policy delegation protocol, as Postfix speaks it (SMTPD_POLICY_README).

A request is ``name=value`` lines ended by an empty line; the reply is one
``action=...`` line and an empty line. Attribute order does not matter,
unknown attributes are ignored (Postfix adds some over versions), and a value
may be empty. What is not a request in this form is a ``ProtocolError``: the
server then logs it and closes that connection without a reply, as the
README asks ("in case of trouble the policy server must not send a reply").
"""

from __future__ import annotations

from typing import Dict

from ..core.model import Reply
from ..core.tlsidentity import xtext_decode

#: The only request type Postfix sends.
REQUEST_TYPE = "smtpd_access_policy"
#: The stage at which relaymilter decides: the restriction lists at RCPT TO.
STATE_RCPT = "RCPT"
#: No decision: the next restriction runs. Every answer but a refusal is this.
DUNNO = "DUNNO"
#: The end of a request (and of a reply).
END = b"\n\n"
#: The longest request read, in bytes: Postfix's are well under 2 KiB (its longest
#: values are a certificate's CNs, 64 bytes each, and names of 255 at most).
MAX_REQUEST_BYTES = 16 * 1024
#: The most attributes a request may have (Postfix 3.10 sends about 30).
MAX_ATTRIBUTES = 200
#: Attributes Postfix sends xtext-encoded (``+XX``) since 2.2.11.
XTEXT_ATTRIBUTES = frozenset(("ccert_subject", "ccert_issuer"))


class ProtocolError(ValueError):
    """Not a policy request as Postfix sends one; the message says what is wrong."""


def parse_request(data: bytes) -> Dict[str, str]:
    """The attributes of one request (``data`` without its ending empty line)."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request of {len(data)} bytes, over {MAX_REQUEST_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Postfix passes an SMTP client's bytes through (a SMTPUTF8 address,
        # or worse); keep them, as the milter does with surrogateescape.
        text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if len(lines) > MAX_ATTRIBUTES:
        raise ProtocolError(f"request of {len(lines)} attributes, over {MAX_ATTRIBUTES}")
    attributes: Dict[str, str] = {}
    for line in lines:
        name, equals, value = line.partition("=")
        if not equals or not name or "\0" in line:
            raise ProtocolError(f"not a name=value line: {line[:80]!r}")
        # Postfix never repeats one; if a client did, its last value wins.
        attributes[name] = value
    if attributes.get("request") != REQUEST_TYPE:
        raise ProtocolError(f"request={attributes.get('request', '')[:80]!r}, not {REQUEST_TYPE}")
    for name in XTEXT_ATTRIBUTES:
        encoded = attributes.get(name)
        if encoded and "+" in encoded:
            attributes[name] = xtext_decode(encoded).decode("utf-8", "surrogateescape")
    return attributes


def action_of(reply: Reply) -> str:
    """The action that answers with ``reply``: an access(5) SMTP code and text."""
    return f"{reply.code} {reply.status} {reply.text}"


def reply_bytes(action: str) -> bytes:
    """The wire form of a reply: ``action=...`` and the empty line."""
    # A newline would end the reply early; the config's texts have none.
    return b"action=" + " ".join(action.split("\n")).encode("utf-8", "surrogateescape") + END
