"""Checks across organizations, once the config file and the snapshot are read and merged.

A certificate connector's name must be registered with its own organization
(the seed's step 3b), a domain belongs to one organization, and IP connectors
of different organizations that cover the same addresses get a warning.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

from yaml.nodes import Node

from ..core.certnames import CertificatePattern
from ..core.domains import parent_domains
from ..core.model import MODE_MONITOR, AcceptedDomain, Organization
from .errors import ConfigIssue
from .organizations import AcceptedEntry, Registration
from .reader import NodeReader


def check_registrations(
    reader: NodeReader,
    registrations: Sequence[Registration],
    organizations: Tuple[Organization, ...],
) -> None:
    by_name = {organization.name: organization for organization in organizations}
    for item in registrations:
        organization = by_name.get(item.organization)
        if organization is not None:
            reader.path = item.file
            check_registration(
                reader, item.node, item.path, item.connector, item.pattern, organization
            )
    reader.path = reader.config_path


def check_registration(
    reader: NodeReader,
    node: Node,
    path: str,
    name: str,
    pattern: CertificatePattern,
    organization: Organization,
) -> None:
    """The seed's step 3b: the connector's domain must be registered with its organization."""
    if organization.accepts(pattern.domain):
        return
    where = path + ".tls_sender_certificate_name"
    if pattern.wildcard:
        reader.error(
            node,
            where,
            f"connector {name!r}: {pattern.text!r} needs {pattern.domain} registered with "
            f"organization {organization.name!r}; add {pattern.domain} to its accepted_domains",
        )
        return
    registered = next((p for p in parent_domains(pattern.domain) if organization.accepts(p)), None)
    if registered is not None:
        remedy = (
            f"use '*.{registered}' (as Exchange's Hybrid Configuration Wizard does; "
            f"{registered} is registered) or add {pattern.domain} to accepted_domains"
        )
    else:
        remedy = (
            f"register {pattern.domain} (or a parent domain and use a '*.' name) "
            "in accepted_domains"
        )
    reader.error(
        node,
        where,
        f"connector {name!r}: {pattern.text!r} is not a domain registered with "
        f"organization {organization.name!r}; {remedy}",
    )


def check_domain_owners(reader: NodeReader, accepted: List[AcceptedEntry]) -> None:
    """A domain belongs to one organization, as in Exchange Online.

    Otherwise one tenant could register another's domain and so claim its
    certificate connector (``*.contoso.com`` needs contoso.com registered),
    or make its recipients "internal". ``match_subdomains`` counts: it
    claims every name below the domain. Two entries overlap when they are
    equal or one is below the other and that one matches subdomains, so
    walking each entry's parents finds every pair: O(domains x labels).
    """
    owners: Dict[str, List[int]] = {}
    for position, entry in enumerate(accepted):
        owners.setdefault(entry.accepted.domain, []).append(position)
    reported: Set[Tuple[int, int]] = set()
    for position, entry in enumerate(accepted):
        domain = entry.accepted.domain
        for parent in parent_domains(domain):
            for other_position in owners.get(parent, ()):
                other = accepted[other_position]
                if other.organization == entry.organization:
                    continue
                if parent != domain and not other.accepted.match_subdomains:
                    continue
                pair = (max(position, other_position), min(position, other_position))
                if pair not in reported:
                    reported.add(pair)
                    _report_shared_domain(reader, accepted[pair[0]], accepted[pair[1]])


def _report_shared_domain(reader: NodeReader, entry: AcceptedEntry, other: AcceptedEntry) -> None:
    """Reported at the later of the two entries (positions follow the files)."""
    where = f"line {other.line}" if other.file == entry.file else f"{other.file}:{other.line}"
    origin = reader.origin(other.file, other.line)
    if origin:
        where += f", from {origin}"
    reader.errors.append(
        ConfigIssue(
            entry.file,
            entry.line,
            entry.path,
            f"{_describe_accepted(entry.accepted)} overlaps "
            f"{_describe_accepted(other.accepted)} of organization {other.organization!r} "
            f"({where}): a domain belongs to one organization (as in Exchange "
            "Online); remove it from one of them",
            reader.origin(entry.file, entry.line),
        )
    )


def _describe_accepted(accepted: AcceptedDomain) -> str:
    return accepted.domain + (" (with match_subdomains)" if accepted.match_subdomains else "")


def check_overlaps(reader: NodeReader, organizations: Tuple[Organization, ...]) -> None:
    """Warn when IP connectors of different organizations cover the same addresses."""
    # One sweep over the networks sorted by (version, first address):
    # O(n log n), so a config with 10,000 connectors is still quick to check.
    spans = sorted(
        (
            net.version,
            int(net.network_address),
            int(net.broadcast_address),
            org.name,
            conn.name,
            str(net),
        )
        for org in organizations
        for conn in org.connectors
        if not conn.is_certificate_connector
        for net in conn.sender_ip_addresses
    )
    reported: Set[Tuple[str, str]] = set()
    open_spans: List[Tuple[int, int, int, str, str, str]] = []
    for span in spans:
        version, start, _end, org, conn, text = span
        open_spans = [s for s in open_spans if s[0] == version and s[2] >= start]
        for other in open_spans:
            pair = (other[3], org)
            if other[3] != org and pair not in reported:
                reported.add(pair)
                reader.warn(
                    None,
                    "organizations",
                    f"IP connectors overlap: {other[5]} ({other[3]}/{other[4]}) and {text} "
                    f"({org}/{conn}); the organization accepting the sender's domain wins, "
                    "else the first in file order",
                )
        open_spans.append(span)


def monitor_only(mode: str, organizations: Tuple[Organization, ...]) -> bool:
    """Whether every organization and connector is in monitor mode (nothing is ever refused)."""
    modes = {mode}
    for organization in organizations:
        modes.add(organization.mode or mode)
        modes.update(c.mode for c in organization.connectors if c.mode)
    return modes == {MODE_MONITOR}
