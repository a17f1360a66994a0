"""The snapshot: the organizations the sources gave, as a YAML file the config validation reads.

``relaymilter sync`` renders what the sources returned in the very shape of the
config file's ``organizations:`` list, so the snapshot goes through the same
validation as the YAML file (there is no second model), and the daemon decides
from it without ever asking a source. Every item is preceded by a comment
naming its origin (an LDAP DN, a row, a fragment's file and line); a
validation error inside the snapshot quotes it.

Each item is written as JSON, which YAML reads as a flow collection: one item
per line, with every string quoted, whatever characters a source sends.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import yaml

from ..config.origins import ORIGIN_COMMENT
from .sources import SourceError, SourceItem, SourceOrganization

HEADER = (
    '# relaymilter snapshot, written by "relaymilter sync" from the sources in the config\'s\n'
    '# "sources:" section. Do not edit it: the next sync replaces it. Each item\'s origin\n'
    "# is in the comment above it.\n"
)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: How many names of each kind a change summary keeps per organization.
CHANGE_EXAMPLES = 20


def render(organizations: Sequence[SourceOrganization]) -> str:
    """The snapshot's text. Deterministic: the same organizations give the same bytes."""
    lines = [HEADER, "organizations:\n" if organizations else "organizations: []\n"]
    for organization in organizations:
        lines.append(_origin_line(organization.origin, ""))
        lines.append(f"- name: {_scalar(organization.name, organization.origin)}\n")
        if organization.mode is not None:
            lines.append(f"  mode: {_scalar(organization.mode, organization.origin)}\n")
        _render_items(lines, "accepted_domains", organization.accepted_domains)
        _render_items(lines, "connectors", organization.connectors)
    return "".join(lines)


def _render_items(lines: List[str], key: str, items: Sequence[SourceItem]) -> None:
    if not items:
        lines.append(f"  {key}: []\n")
        return
    lines.append(f"  {key}:\n")
    previous = None
    for item in items:
        if item.origin != previous:
            lines.append(_origin_line(item.origin, "  "))
            previous = item.origin
        lines.append(f"  - {_scalar(item.value, item.origin)}\n")


def _origin_line(origin: str, indent: str) -> str:
    printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in origin)
    return f"{indent}{ORIGIN_COMMENT}{printable}\n"


def _scalar(value: Any, origin: str) -> str:
    try:
        return _flow(value)
    except ValueError as exc:
        raise SourceError(f"{origin}: cannot be written to the snapshot: {exc}") from None


def _flow(value: Any) -> str:
    """A YAML flow value on one line, every string double-quoted and escaped."""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        # YAML 1.1 reads 1e+20 as a string; 1.0e+20 is a float.
        text = repr(value)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_quote(str(k))}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    raise ValueError(f"a {type(value).__name__} is not a string, number, list or mapping")


def _quote(text: str) -> str:
    """Printable ASCII as it is, anything else as a YAML escape: one line, no look-alikes."""
    if _PLAIN.fullmatch(text):
        return f'"{text}"'
    return '"' + "".join(_escape(char) for char in text) + '"'


def _escape(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if " " <= char <= "~":
        return char
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        raise ValueError(f"{char!r} is not a character (undecodable input)")
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


_PLAIN = re.compile(r"[ !#-\[\]-~]*")


# -- what a sync changes ------------------------------------------------------


@dataclass
class OrganizationContent:
    """An organization of a snapshot, reduced to what a change summary compares."""

    domains: Dict[str, None] = field(default_factory=dict)
    #: Connector name → its settings, serialized for comparison.
    connectors: Dict[str, str] = field(default_factory=dict)


Content = Dict[str, OrganizationContent]


def content_of_text(text: str) -> Content:
    """The organizations of a snapshot's text; a damaged one counts as empty (it is replaced)."""
    try:
        return _content_of_data(yaml.load(text, Loader=_LOADER) or {})
    except (yaml.YAMLError, TypeError, AttributeError, ValueError):
        return {}


def _content_of_data(data: Any) -> Content:
    items = (data.get("organizations") or []) if isinstance(data, dict) else []
    return _content(
        (str(o.get("name")), o.get("accepted_domains") or [], o.get("connectors") or [])
        for o in items
        if isinstance(o, dict)
    )


def content_of_sources(organizations: Sequence[SourceOrganization]) -> Content:
    return _content(
        (
            o.name,
            [item.value for item in o.accepted_domains],
            [item.value for item in o.connectors],
        )
        for o in organizations
    )


def _content(organizations: Iterable[Tuple[str, Sequence[Any], Sequence[Any]]]) -> Content:
    content: Content = {}
    for name, domains, connectors in organizations:
        entry = content.setdefault(name, OrganizationContent())
        for domain in domains:
            entry.domains[domain_key(domain)] = None
        for connector in connectors:
            if isinstance(connector, dict):
                key = str(connector.get("name"))
                entry.connectors[key] = json.dumps(connector, sort_keys=True, default=str)
    return content


def domain_key(value: Any) -> str:
    """An accepted domain as a change summary names it: ``*.example.com`` with match_subdomains."""
    if isinstance(value, dict):
        domain = str(value.get("domain", "")).lower().rstrip(".")
        return f"*.{domain}" if value.get("match_subdomains") is True else domain
    return str(value).lower().rstrip(".")


def domain_count(content: Content) -> int:
    return sum(len(entry.domains) for entry in content.values())


@dataclass
class OrganizationChange:
    domains_added: List[str] = field(default_factory=list)
    domains_removed: List[str] = field(default_factory=list)
    connectors_added: List[str] = field(default_factory=list)
    connectors_removed: List[str] = field(default_factory=list)
    connectors_changed: List[str] = field(default_factory=list)

    def counts(self) -> Dict[str, int]:
        return {name: len(values) for name, values in self.__dict__.items()}

    def describe(self) -> str:
        parts = []
        for key, values in self.__dict__.items():
            if values:
                shown = ", ".join(values[:CHANGE_EXAMPLES])
                more = (
                    f" and {len(values) - CHANGE_EXAMPLES} more"
                    if len(values) > CHANGE_EXAMPLES
                    else ""
                )
                parts.append(f"{describe_count(key, len(values))} ({shown}{more})")
        return "; ".join(parts)

    def as_json(self) -> Dict[str, Any]:
        summary: Dict[str, Any] = {}
        for name, values in self.__dict__.items():
            if values:
                summary[name] = {"count": len(values), "examples": values[:CHANGE_EXAMPLES]}
        return summary


CHANGE_KEYS = (
    "domains_added",
    "domains_removed",
    "connectors_added",
    "connectors_removed",
    "connectors_changed",
)


def describe_count(key: str, count: int) -> str:
    """``domains_added``, 1 → "1 domain added"."""
    noun, verb = key.split("_", 1)
    return f"{count} {noun if count != 1 else noun[:-1]} {verb}"


def changes(old: Content, new: Content) -> Dict[str, OrganizationChange]:
    """What a sync changes, per organization (only organizations that change)."""
    result: Dict[str, OrganizationChange] = {}
    for name in list(old) + [n for n in new if n not in old]:
        before = old.get(name, OrganizationContent())
        after = new.get(name, OrganizationContent())
        change = OrganizationChange(
            domains_added=[d for d in after.domains if d not in before.domains],
            domains_removed=[d for d in before.domains if d not in after.domains],
            connectors_added=[c for c in after.connectors if c not in before.connectors],
            connectors_removed=[c for c in before.connectors if c not in after.connectors],
            connectors_changed=[
                c
                for c, settings in after.connectors.items()
                if c in before.connectors and before.connectors[c] != settings
            ],
        )
        if any(change.counts().values()):
            result[name] = change
    return result


def removed_domains(change_set: Mapping[str, OrganizationChange]) -> int:
    return sum(len(change.domains_removed) for change in change_set.values())
