"""The decision record: what each recipient decision logs, defined once.

The milter writes it (one ``decision`` line, and the same values as journal
fields) and the readers (``report``, ``replay``) read it back, from either form,
through this module alone: there is no second field list. A record carries
everything a replay needs to decide again through ``policy.Transaction``: the
client address, the certificate macros as the MTA sent them, the envelope and
the MTA's resolved recipient, plus the mode in force and the config's identity.

The line is ``decision key=value ...`` with values as ``logfmt.quote`` writes
them: a bare ``-`` is a missing value. Records written before a field existed
simply lack it (None).
"""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Tuple

from ..core.model import MODES
from ..core.policy import ACTIONS, REASONS
from ..core.tlsidentity import PUBKEY_FINGERPRINT
from .logfmt import BARE, FIELD, FIELD_SEQUENCE, MAX_VALUE_BYTES, left_out, quote, unquote

#: The word that starts a decision line's message.
MARKER = "decision "


class DecisionRecord(NamedTuple):
    conn: Optional[str] = None
    queue_id: Optional[str] = None
    #: The client's IP address (or what the MTA sent, if it was not one).
    client: Optional[str] = None
    organization: Optional[str] = None
    connector: Optional[str] = None
    #: ``ip`` or ``certificate``: how the connection was attributed.
    kind: Optional[str] = None
    #: The certificate name that matched a connector.
    certificate: Optional[str] = None
    #: The certificate as the MTA described it: its macros, verbatim.
    cert_subject: Optional[str] = None
    cert_issuer: Optional[str] = None
    verify: Optional[str] = None
    cn_subject: Optional[str] = None
    cn_issuer: Optional[str] = None
    cert_fp: Optional[str] = None
    #: Postfix's ccert_pubkey_fingerprint (the policy service only).
    cert_pubkey_fp: Optional[str] = None
    #: The envelope sender without angle brackets ("" for the null sender).
    sender: Optional[str] = None
    recipient: Optional[str] = None
    #: The domains the recipient routes through, comma-separated.
    route: Optional[str] = None
    #: The MTA's {rcpt_addr}, when it differed from the recipient.
    mta_rcpt: Optional[str] = None
    #: The mode in force: enforce, soft or monitor.
    mode: Optional[str] = None
    #: The identity (a short hash) of the config that decided.
    config: Optional[str] = None
    action: Optional[str] = None
    reason: Optional[str] = None

    def line(self, base: Optional[QuotedRecord] = None) -> str:
        """The log message: ``decision`` and every field, in a fixed order.

        ``base``, a record this one was made from with ``_replace`` and its
        quoted parts (``quoted()``): a field that is still the base's own value
        reuses its part. The milter quotes a transaction's fields once, not once
        per recipient.
        """
        if base is None:
            parts = [_part(p, w, value) for p, w, value in zip(_PREFIXES, _WRAPPED, self)]
        else:
            record, quoted = base
            parts = [
                done if value is old else _part(p, w, value)
                for p, w, value, old, done in zip(_PREFIXES, _WRAPPED, self, record, quoted)
            ]
        return _MARKER_WORD + " " + " ".join(parts)

    def quoted(self) -> QuotedRecord:
        """This record with its fields quoted, as a ``base`` for ``line``."""
        parts = tuple(_part(p, w, value) for p, w, value in zip(_PREFIXES, _WRAPPED, self))
        return QuotedRecord(self, parts)

    def certificate_macros(self) -> Dict[str, Optional[str]]:
        """The certificate macros as the MTA sent them (for ``certificate_from_mapping``)."""
        return {macro: getattr(self, name) for name, macro in CERTIFICATE_FIELDS}

    def journal_fields(self) -> Dict[str, str]:
        """The same values as journal fields (``RELAYMILTER_`` is prefixed by the handler)."""
        fields = {}
        for name, _, field in FIELDS:
            value = getattr(self, name)
            if value is not None:
                fields[field] = value
        return fields


#: (attribute, key in the line, journal field name without the RELAYMILTER_ prefix).
FIELDS: Tuple[Tuple[str, str, str], ...] = (
    ("conn", "conn", "CONN"),
    ("queue_id", "queue_id", "QUEUE_ID"),
    ("client", "client", "CLIENT_ADDRESS"),
    ("organization", "organization", "ORGANIZATION"),
    ("connector", "connector", "CONNECTOR"),
    ("kind", "kind", "KIND"),
    ("certificate", "certificate", "CERTIFICATE"),
    ("cert_subject", "cert_subject", "CERT_SUBJECT"),
    ("cert_issuer", "cert_issuer", "CERT_ISSUER"),
    ("verify", "verify", "VERIFY"),
    ("cn_subject", "cn_subject", "CN_SUBJECT"),
    ("cn_issuer", "cn_issuer", "CN_ISSUER"),
    ("cert_fp", "cert_fp", "CERT_FINGERPRINT"),
    ("cert_pubkey_fp", "cert_pubkey_fp", "CERT_PUBKEY_FINGERPRINT"),
    ("sender", "from", "SENDER"),
    ("recipient", "to", "RECIPIENT"),
    ("route", "route", "ROUTE"),
    ("mta_rcpt", "mta_rcpt", "MTA_RCPT"),
    ("mode", "mode", "MODE"),
    ("config", "config", "CONFIG"),
    ("action", "action", "ACTION"),
    ("reason", "reason", "REASON"),
)
#: The record's certificate fields and the macros they hold. ``cert_fp`` is
#: Sendmail's ``{cert_fp}``, or ``{cert_md5}`` when it sent only that.
CERTIFICATE_FIELDS: Tuple[Tuple[str, str], ...] = (
    ("cert_subject", "{cert_subject}"),
    ("cert_issuer", "{cert_issuer}"),
    ("verify", "{verify}"),
    ("cn_subject", "{cn_subject}"),
    ("cn_issuer", "{cn_issuer}"),
    ("cert_fp", "{cert_fp}"),
    ("cert_pubkey_fp", PUBKEY_FINGERPRINT),
)


def certificate_fields(macros: Mapping[str, str]) -> Dict[str, Optional[str]]:
    """The record's certificate fields from the macros the MTA sent."""
    fields = {name: macros.get(macro) for name, macro in CERTIFICATE_FIELDS}
    if fields["cert_fp"] is None:
        fields["cert_fp"] = macros.get("{cert_md5}")
    return fields


_ADDRESSES = frozenset(("sender", "recipient", "mta_rcpt"))
assert tuple(name for name, _, _ in FIELDS) == DecisionRecord._fields  # one order
_MARKER_WORD = MARKER.rstrip()
_PREFIXES = tuple(f"{key}=" for _, key, _ in FIELDS)
_WRAPPED = tuple(name in _ADDRESSES for name, _, _ in FIELDS)
_bare = BARE.fullmatch
#: The fields whose values relaymilter writes itself, with the most bytes each can take
#: (a connection counter, and words of its own vocabulary); every other value is at
#: most ``MAX_VALUE_BYTES``, cut beyond.
_OWN_VALUE_BYTES = {"conn": 20, "kind": 11, "mode": 7, "config": 12, "action": 12, "reason": 18}
#: The longest decision line, in bytes: under the 8 KiB that rsyslog carries by default
#: (``$MaxMessageSize``), with room for a syslog prefix. relaymilter(8), LOGGING, says it.
MAX_LINE_BYTES = len(_MARKER_WORD) + sum(
    1 + len(key) + 1 + _OWN_VALUE_BYTES.get(name, MAX_VALUE_BYTES) for name, key, _ in FIELDS
)


class QuotedRecord(NamedTuple):
    record: DecisionRecord
    parts: Tuple[str, ...]


def _part(prefix: str, wrap: bool, value: Optional[str]) -> str:
    """``key=value`` as ``logfmt.quote`` writes it (inlined for bare values: the usual case)."""
    if value is None:
        return prefix + "-"
    if wrap:
        value = f"<{value}>"
    if value != "-" and len(value) <= MAX_VALUE_BYTES and _bare(value):
        return prefix + value
    return prefix + quote(value)


_BY_KEY = {key: name for name, key, _ in FIELDS}
_BY_JOURNAL_FIELD = {field: name for name, _, field in FIELDS}


def parse_line(line: str) -> Optional[DecisionRecord]:
    """The record in a log line (stderr, syslog, mail.log), or None if it holds none."""
    read = read_line(line)
    return read[0] if read is not None else None


def read_line(line: str) -> Optional[Tuple[DecisionRecord, Tuple[str, ...]]]:
    """The record in a log line, and the names of its fields that the line shows cut.

    Whatever precedes the ``decision`` marker (a syslog prefix, a level) is
    skipped. From there the line must be ``key=value`` fields, one after
    another to its end, each value a bare token or a quoted string as
    ``logfmt.quote`` writes them: a line cut inside a quoted value, or
    anything else that is not the format, gives None (unreadable), never a
    record read in part, so no text inside a value can pass for a field.
    Unknown keys are ignored, missing ones are None; the action and the
    reason must be ones relaymilter writes.
    """
    start = line.find(MARKER)
    if start < 0 or not _is_prefix(line[:start]):
        return None
    position, end = start + len(MARKER), len(line)
    while end > position and line[end - 1] in "\r\n":
        end -= 1
    # The whole rest is fields, one after another; then they are taken in order.
    rest = line[position:end]
    if FIELD_SEQUENCE.fullmatch(rest) is None:
        return None
    if '"' in rest:
        pairs = FIELD.findall(rest)
    else:  # every value bare (the usual line): split, in C
        pairs = [piece.split("=", 1) for piece in rest.split(" ")]
    known = [(name, token) for key, token in pairs if (name := _BY_KEY.get(key))]
    values: Dict[str, Optional[str]] = {
        name: None if token == "-" else token if token[0] != '"' else unquote(token)
        for name, token in known
    }
    if len(values) < len(known):
        return None  # each is written once: a second one is not relaymilter's
    cut = tuple(name for name, token in known if token[-1] == '"' and left_out(token))
    for name in _ADDRESSES.intersection(values):
        values[name] = _address(values[name], name in cut)
    if not _is_complete(values):
        return None  # a truncated line, or another program's
    return DecisionRecord(**values), cut


def _is_complete(values: Mapping[str, Optional[str]]) -> bool:
    """Whether a record has what every version writes, in the vocabulary it writes it in."""
    if values.get("recipient") is None:
        return False
    mode = values.get("mode")
    return (
        values.get("action") in ACTIONS
        and values.get("reason") in REASONS
        and (mode is None or mode in MODES)
    )


def _is_prefix(text: str) -> bool:
    """Whether ``text`` can precede a decision line's marker.

    Nothing (the journal's MESSAGE), a level word (the stderr handler's
    ``INFO``), or a syslog prefix ending in ``: ``. Never text with a quote or
    an ``=``: that is a field of another line (an internal-error line quotes
    the client's recipient, which could hold a forged ``decision ...``).
    """
    if not text:
        return True
    if not text.endswith(" ") or '"' in text or "=" in text:
        return False
    return text.endswith(": ") or text.rstrip().isalpha()


def from_journal(entry: Mapping[str, str]) -> Optional[DecisionRecord]:
    """The record in a journal entry's ``RELAYMILTER_*`` fields (prefix already removed)."""
    values = {name: entry[field] for field, name in _BY_JOURNAL_FIELD.items() if field in entry}
    if not _is_complete(values):
        return None
    return DecisionRecord(**values)


def _address(value: Optional[str], cut: bool) -> Optional[str]:
    """An address field without the angle brackets the writer put around it."""
    if value is None or not value.startswith("<"):
        return value
    if value.endswith(">") and not cut:
        return value[1:-1]
    return value[1:] if cut else value  # cut before its closing bracket
