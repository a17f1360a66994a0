"""Sources of organizations: LDAP/Active Directory, PostgreSQL and YAML fragments.

Each source produces organizations in the shape the YAML file gives them
(plain values: domain strings, connector mappings), each item with its
origin (a DN, a row, a file and line). ``relaymilter sync`` writes them into
the snapshot and validates it exactly as it validates the YAML file: there is
no second model. The daemon only ever reads the snapshot; no source is queried
per message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ...base.safefile import UnsafeFileError, read_regular_file

#: A password file holds one line.
SECRET_FILE_LIMIT = 4096


class SourceError(Exception):
    """A source could not be read or returned something unusable; the message says why, where."""


@dataclass
class SourceItem:
    """An accepted domain or a connector, as the YAML would write it, and where it came from."""

    value: Any
    origin: str


@dataclass
class SourceOrganization:
    name: str
    origin: str
    accepted_domains: List[SourceItem] = field(default_factory=list)
    connectors: List[SourceItem] = field(default_factory=list)
    mode: Optional[str] = None
    #: Where the mode was set.
    mode_origin: Optional[str] = None


@dataclass
class SourceResult:
    organizations: List[SourceOrganization]
    #: Entries or rows read.
    records: int
    #: Which server answered, or which files were read, for the status.
    detail: str = ""
    #: What was read and deliberately left out (an X.400 domain), one line each.
    notes: List[str] = field(default_factory=list)


class OrganizationCollector:
    """Gathers items by organization name, keeping the order they came in."""

    def __init__(self) -> None:
        self._organizations: Dict[str, SourceOrganization] = {}
        self.notes: List[str] = []

    def organization(self, name: str, origin: str) -> SourceOrganization:
        found = self._organizations.get(name)
        if found is None:
            found = self._organizations[name] = SourceOrganization(name, origin)
        return found

    def add_domain(self, organization: str, value: Any, origin: str) -> None:
        self.organization(organization, origin).accepted_domains.append(SourceItem(value, origin))

    def add_connector(self, organization: str, value: Any, origin: str) -> None:
        self.organization(organization, origin).connectors.append(SourceItem(value, origin))

    def result(self, records: int, detail: str = "") -> SourceResult:
        return SourceResult(list(self._organizations.values()), records, detail, self.notes)


def domain_item(text: str, match_subdomains: bool = False) -> Union[str, Dict[str, Any]]:
    """An accepted domain as the YAML writes it; ``*.example.com`` is example.com and below."""
    text = text.strip()
    if text.startswith("*."):
        text, match_subdomains = text[2:], True
    if match_subdomains:
        return {"domain": text, "match_subdomains": True}
    return text


def read_secret(path: str) -> str:
    """A password from a file of its own (first line, without the line break)."""
    try:
        data = read_regular_file(path, SECRET_FILE_LIMIT, "the password file")
    except UnsafeFileError as exc:
        raise SourceError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceError(f"{path}: the password file is not UTF-8") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise SourceError(f"{path}: the password file is empty")
    return lines[0]
