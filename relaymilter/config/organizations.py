"""Organizations and their connectors, as the config file and the snapshot list them.

``OrganizationReader`` reads ``organizations:`` lists into ``OrganizationParts``
(one per list item; ``merge`` makes one organization per name) and keeps the
notes that the cross-checks need once everything is read: every accepted
domain with its place, and every certificate connector's name.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..core.certfiles import CertificateFile, CertificateFileError, load_certificates
from ..core.certnames import (
    CertificatePattern,
    PatternError,
    normalize_certificate_name,
    parse_pattern,
)
from ..core.domains import (
    a_label_problem,
    address_literal_problem,
    is_host_name,
    normalize_domain,
)
from ..core.model import MODES, AcceptedDomain, Connector
from ..core.networks import IPNetwork
from . import keys, publicsuffix
from .reader import Field, NodeReader, line_of


class AcceptedEntry(NamedTuple):
    """An accepted domain as read: where it is, and whose (kept small: there may be 100,000)."""

    accepted: AcceptedDomain
    file: str
    line: int
    organization: str
    item_path: str
    #: Written as a mapping {domain: ...}: the error points at its "domain" key.
    mapping: bool

    @property
    def path(self) -> str:
        return self.item_path + (".domain" if self.mapping else "")


class Registration(NamedTuple):
    """A certificate connector's name, to check against its organization's merged domains."""

    file: str
    node: Node
    path: str
    connector: str
    pattern: CertificatePattern
    organization: str


@dataclass
class OrganizationParts:
    """An organization as one file gives it; the config file's and the snapshot's are merged."""

    name: Optional[str]
    file: str
    path: str
    node: Node
    domains: List[AcceptedDomain]
    connectors: List[Connector]
    mode: Optional[str]
    mode_node: Optional[Node]


class OrganizationReader:
    """Reads ``organizations:`` lists; notes accepted domains and certificate names for later."""

    def __init__(self, reader: NodeReader, has_sources: bool) -> None:
        self.reader = reader
        #: With sources, an organization's domains or connectors may all come from them.
        self.has_sources = has_sources
        #: Every accepted domain as read, with its node, for the cross-organization check.
        self.accepted: List[AcceptedEntry] = []
        #: Connectors' certificate names, checked once the organizations are merged.
        self.registrations: List[Registration] = []
        self._order = 0
        self._suffixes: Optional[publicsuffix.PublicSuffixList] = None
        self._suffix_problem: Optional[str] = None

    def read_organizations(self, node: Node, snapshot: bool = False) -> List[OrganizationParts]:
        items = self.reader.sequence(node, "organizations", "organizations")
        if isinstance(node, SequenceNode) and not items and not (snapshot or self.has_sources):
            self.reader.error(node, "organizations", "must list at least one organization")
        return [
            parts
            for index, item in enumerate(items)
            if (parts := self.read_organization(item, f"organizations[{index}]")) is not None
        ]

    def read_organization(self, node: Node, path: str) -> Optional[OrganizationParts]:
        reader = self.reader
        required = keys.ORGANIZATION.required
        if not self.has_sources:
            required += keys.ORGANIZATION.required_without_sources
        fields = reader.fields(node, path, keys.ORGANIZATION, required)
        if fields is None:
            return None
        name = reader.name(fields["name"][1], path + ".name") if "name" in fields else None
        key = name if name is not None else f"<{reader.path}:{path}>"
        domains: List[AcceptedDomain] = []
        if "accepted_domains" in fields:
            domains = self.read_accepted_domains(
                fields["accepted_domains"][1], path + ".accepted_domains", key
            )
        connectors: List[Connector] = []
        if "connectors" in fields:
            connectors = self.read_connectors(fields["connectors"][1], path + ".connectors", key)
        mode_node = fields["mode"][1] if "mode" in fields else None
        return OrganizationParts(
            name,
            reader.path,
            path,
            node,
            domains,
            connectors,
            self.scoped_mode(fields, path),
            mode_node,
        )

    def scoped_mode(self, fields: Dict[str, Field], path: str) -> Optional[str]:
        """An organization's or connector's own ``mode`` (the most specific one wins)."""
        if "mode" not in fields:
            return None
        return self.reader.choice(fields["mode"][1], path + ".mode", MODES)

    # -- accepted domains ------------------------------------------------------

    def read_accepted_domains(
        self, node: Node, path: str, organization: str
    ) -> List[AcceptedDomain]:
        reader = self.reader
        items = reader.sequence(node, path, "domains")
        if isinstance(node, SequenceNode) and not items and not self.has_sources:
            reader.error(node, path, "must list at least one domain")
        domains: Dict[str, AcceptedDomain] = {}
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            accepted = self.read_accepted_domain(item, item_path)
            if accepted is None:
                continue
            mapping = isinstance(item, MappingNode)
            line = line_of(item) or 0
            self.accepted.append(
                AcceptedEntry(accepted, reader.path, line, organization, item_path, mapping)
            )
            if accepted.domain in domains:
                reader.warn(item, item_path, f"{accepted.domain} is listed twice")
                accepted = AcceptedDomain(
                    accepted.domain,
                    accepted.match_subdomains or domains[accepted.domain].match_subdomains,
                )
            domains[accepted.domain] = accepted
        return list(domains.values())

    def read_accepted_domain(self, node: Node, path: str) -> Optional[AcceptedDomain]:
        reader = self.reader
        match_subdomains = False
        domain_node: Node = node
        domain_path = path
        if isinstance(node, MappingNode):
            fields = reader.fields(node, path, keys.ACCEPTED_DOMAIN)
            if fields is None or "domain" not in fields:
                return None
            domain_node, domain_path = fields["domain"][1], path + ".domain"
            if "match_subdomains" in fields:
                flag = reader.scalar(
                    fields["match_subdomains"][1],
                    path + ".match_subdomains",
                    (bool,),
                    "true or false",
                )
                match_subdomains = bool(flag)
        elif not isinstance(node, ScalarNode):
            reader.error(
                node, path, "must be a domain or a mapping {domain: …, match_subdomains: …}"
            )
            return None
        text = reader.string(domain_node, domain_path)
        if text is None:
            return None
        literal = address_literal_problem(text)
        if literal is not None:
            reader.error(domain_node, domain_path, literal)
            return None
        domain = normalize_domain(text)
        if domain is None or not is_host_name(domain):
            hint = " (use match_subdomains: true instead of a wildcard)" if "*" in text else ""
            reader.error(domain_node, domain_path, f"{text!r} is not a valid domain name{hint}")
            return None
        problem = a_label_problem(domain) or self.public_suffix_problem(domain, match_subdomains)
        if problem is not None:
            reader.error(domain_node, domain_path, problem)
            return None
        return AcceptedDomain(domain, match_subdomains)

    def public_suffix_problem(self, domain: str, match_subdomains: bool) -> Optional[str]:
        suffixes = self.public_suffixes()
        if suffixes is None or not suffixes.is_public_suffix(domain):
            return None
        scope = " and, with match_subdomains, every domain under it" if match_subdomains else ""
        return (
            f"{domain} is a public suffix (Public Suffix List): accepting it would make "
            f"the organization own every sender in it{scope}; list the organization's own "
            f"domains (e.g. contoso.{domain}) instead"
        )

    def public_suffixes(self) -> Optional[publicsuffix.PublicSuffixList]:
        """The distribution's Public Suffix List, loaded once per config; None if missing."""
        if self._suffixes is None and self._suffix_problem is None:
            try:
                self._suffixes = publicsuffix.load()
            except publicsuffix.PublicSuffixListError as exc:
                self._suffix_problem = str(exc)
                self.reader.warn(
                    None,
                    "accepted_domains",
                    f"cannot check accepted domains against the Public Suffix List ({exc}); "
                    "install Debian's publicsuffix or EL's publicsuffix-list",
                )
        return self._suffixes

    # -- connectors ----------------------------------------------------------

    def read_connectors(self, node: Node, path: str, organization: str) -> List[Connector]:
        items = self.reader.sequence(node, path, "connectors")
        names: Set[str] = set()
        connectors = []
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            connector = self.read_connector(item, item_path, organization)
            if connector is None:
                continue
            if connector.name in names:
                self.reader.error(
                    item,
                    item_path + ".name",
                    f"duplicate connector name {connector.name!r} in organization {organization!r}",
                )
            names.add(connector.name)
            connectors.append(connector)
        return connectors

    def read_connector(self, node: Node, path: str, organization: str) -> Optional[Connector]:
        reader = self.reader
        fields = reader.fields(node, path, keys.CONNECTOR)
        if fields is None or "name" not in fields:
            return None
        name = reader.name(fields["name"][1], path + ".name")
        networks: Tuple[IPNetwork, ...] = ()
        if "sender_ip_addresses" in fields:
            networks = self.read_networks(
                fields["sender_ip_addresses"][1], path + ".sender_ip_addresses"
            )
            self.check_everything_networks(fields["sender_ip_addresses"][1], path, networks)
        pattern = None
        if "tls_sender_certificate_name" in fields:
            pattern = self.read_pattern(
                fields["tls_sender_certificate_name"][1], path + ".tls_sender_certificate_name"
            )
        has_pattern = "tls_sender_certificate_name" in fields
        issuers = self.read_issuers(
            fields.get("trusted_issuers"), path + ".trusted_issuers", has_pattern
        )
        certificates = self.read_certificates(
            fields.get("certificates"), path + ".certificates", has_pattern, pattern
        )
        if not has_pattern and "sender_ip_addresses" not in fields:
            reader.error(
                node,
                path,
                "a connector needs sender_ip_addresses, tls_sender_certificate_name, or both",
            )
        if name is None:
            return None
        if pattern is not None:
            self.registrations.append(
                Registration(
                    reader.path,
                    fields["tls_sender_certificate_name"][1],
                    path,
                    name,
                    pattern,
                    organization,
                )
            )
        self._order += 1
        return Connector(
            name=name,
            organization=organization,
            order=self._order,
            sender_ip_addresses=networks,
            certificate_pattern=pattern,
            trusted_issuers=issuers,
            certificates=certificates,
            mode=self.scoped_mode(fields, path),
        )

    def read_networks(self, node: Node, path: str) -> Tuple[IPNetwork, ...]:
        items = self.reader.sequence(node, path, "IP addresses or CIDR networks")
        if isinstance(node, SequenceNode) and not items:
            self.reader.error(node, path, "must list at least one address or network")
        networks = []
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            text = self.reader.string(item, item_path)
            if text is None:
                continue
            network = self.parse_network(item, item_path, text.strip())
            if network is not None:
                networks.append(network)
        return tuple(networks)

    def parse_network(self, node: Node, path: str, text: str) -> Optional[IPNetwork]:
        reader = self.reader
        if "%" in text:
            reader.error(
                node,
                path,
                f"{text!r} has a zone id ({text[text.index('%') :]}): clients are matched by "
                "address alone; write the address or network without it",
            )
            return None
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                reader.error(node, path, f"{text!r} is not an IP address or CIDR network ({exc})")
                return None
            reader.error(node, path, f"{text!r} has host bits set; did you mean {loose}?")
            return None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(
            ipaddress.IPv6Network("::ffff:0:0/96")
        ):
            reader.error(
                node,
                path,
                f"{text!r} is IPv4-mapped; write the IPv4 form (clients are matched as IPv4)",
            )
            return None
        return network

    def check_everything_networks(
        self, node: Node, path: str, networks: Tuple[IPNetwork, ...]
    ) -> None:
        for network in networks:
            if network.prefixlen == 0:
                self.reader.warn(
                    node,
                    path + ".sender_ip_addresses",
                    f"{network} matches every client: every connection the MTA lets relay is "
                    "attributed to this organization",
                )

    # -- certificate connectors -----------------------------------------------

    def read_pattern(self, node: Node, path: str) -> Optional[CertificatePattern]:
        text = self.reader.string(node, path)
        if text is None:
            return None
        try:
            return parse_pattern(text.strip())
        except PatternError as exc:
            self.reader.error(node, path, str(exc))
            return None

    def read_issuers(self, field: Optional[Field], path: str, has_pattern: bool) -> frozenset[str]:
        if field is None:
            return frozenset()
        reader = self.reader
        if not has_pattern:
            reader.error(
                field[0], path, "only applies to a connector with tls_sender_certificate_name"
            )
        items = reader.sequence(field[1], path, "issuer common names")
        if isinstance(field[1], SequenceNode) and not items:
            reader.error(field[1], path, "must list at least one issuer (or leave the key out)")
        issuers = [reader.string(item, f"{path}[{i}]") for i, item in enumerate(items)]
        return frozenset(issuer.strip().casefold() for issuer in issuers if issuer)

    def read_certificates(
        self,
        field: Optional[Field],
        path: str,
        has_pattern: bool,
        pattern: Optional[CertificatePattern],
    ) -> Tuple[CertificateFile, ...]:
        """The leaf certificates of every listed file (a renewal bundle counts in full)."""
        if field is None:
            return ()
        reader = self.reader
        if not has_pattern:
            reader.error(
                field[0], path, "only applies to a connector with tls_sender_certificate_name"
            )
        certificates: List[CertificateFile] = []
        for index, item in enumerate(reader.sequence(field[1], path, "certificate file paths")):
            item_path = f"{path}[{index}]"
            name = reader.string(item, item_path)
            if name is None:
                continue
            try:
                bundle = load_certificates(os.path.join(reader.base_dir, name))
            except CertificateFileError as exc:
                reader.error(item, item_path, str(exc))
                continue
            for cert in bundle.leaves:
                if pattern is not None:
                    self.check_certificate(item, item_path, pattern, cert, len(bundle.leaves))
            certificates.extend(bundle.leaves)
        return tuple(certificates)

    def check_certificate(
        self,
        node: Node,
        path: str,
        pattern: CertificatePattern,
        cert: CertificateFile,
        in_file: int,
    ) -> None:
        which = f"{cert.path}" + (f" (CN={cert.subject_cn})" if in_file > 1 else "")
        names = [normalize_certificate_name(n) for n in (cert.subject_cn, *cert.dns_names)]
        if not any(n is not None and pattern.matches(n) for n in names):
            self.reader.warn(node, path, f"{which}: none of its names matches {pattern.text!r}")
        problem = cert.validity_problem()
        if problem:
            self.reader.warn(node, path, f"{which}: certificate {problem}")
