"""One organization per name: the config file's own, with what the snapshot adds to it.

An organization may stand in the config file and in the snapshot (its
connectors here, its domains from Active Directory, say). Its accepted
domains are united (a wider ``match_subdomains`` wins, with a warning); a
connector must come from one place; the mode, if both set one, must agree.
The same name twice in one file is an error.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..core.model import Organization
from .organizations import OrganizationParts
from .reader import NodeReader


def merge(
    reader: NodeReader, parts: List[OrganizationParts], has_sources: bool
) -> Tuple[Organization, ...]:
    """The organizations, built from their parts in the order they were first named."""
    merged: Dict[str, OrganizationParts] = {}
    for part in parts:
        if part.name is None:
            continue
        first = merged.get(part.name)
        if first is None:
            merged[part.name] = part
        elif first.file == part.file:
            reader.path = part.file
            reader.error(
                part.node, part.path + ".name", f"duplicate organization name {part.name!r}"
            )
        else:
            reader.path = part.file
            absorb(reader, first, part)
    organizations = []
    for part in merged.values():
        reader.path = part.file
        organization = build(reader, part, has_sources)
        if organization is not None:
            organizations.append(organization)
    return tuple(organizations)


def absorb(reader: NodeReader, own: OrganizationParts, other: OrganizationParts) -> None:
    """Add what the snapshot says (``other``) of an organization the config file has too."""
    known = {domain.domain: index for index, domain in enumerate(own.domains)}
    for domain in other.domains:
        index = known.get(domain.domain)
        if index is None:
            own.domains.append(domain)
        elif domain.match_subdomains and not own.domains[index].match_subdomains:
            # As for a domain listed twice in one file: the wider entry wins, said aloud.
            own.domains[index] = domain
            reader.warn(
                other.node,
                other.path + ".accepted_domains",
                f"{domain.domain} of organization {own.name!r} is in {own.file} without "
                "match_subdomains; the snapshot's match_subdomains applies",
            )
    names = {connector.name for connector in own.connectors}
    for connector in other.connectors:
        if connector.name in names:
            reader.error(
                other.node,
                other.path + ".connectors",
                f"connector {connector.name!r} of organization {own.name!r} is in "
                f"{own.file} too; a connector must come from one place",
            )
        own.connectors.append(connector)
    if other.mode is not None and own.mode is not None and other.mode != own.mode:
        reader.error(
            other.mode_node,
            other.path + ".mode",
            f"organization {own.name!r} has mode {own.mode} in {own.file}",
        )
    own.mode = own.mode or other.mode


def build(
    reader: NodeReader, parts: OrganizationParts, has_sources: bool
) -> Optional[Organization]:
    assert parts.name is not None
    if not parts.domains:
        reader.error(
            parts.node,
            parts.path + ".accepted_domains",
            f"organization {parts.name!r} has no accepted domains"
            + (" (in the config file or the snapshot)" if has_sources else ""),
        )
        return None
    if not parts.connectors:
        reader.warn(
            parts.node,
            parts.path + ".connectors",
            f"organization {parts.name!r} has no connectors: nothing is attributed to it",
        )
    return Organization(parts.name, tuple(parts.domains), tuple(parts.connectors), parts.mode)
