"""The settings of each source of organizations, as read from the config's ``sources:`` section.

Plain immutable data: reading them needs neither python-ldap nor psycopg, so
``check-config`` validates a source's settings without connecting and a relay
that does not sync does not need those libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

#: ``preset: active-directory``: Exchange's accepted domains in the configuration partition.
PRESET_ACTIVE_DIRECTORY = "active-directory"
AD_ACCEPTED_DOMAIN_FILTER = "(objectClass=msExchAcceptedDomain)"
AD_ACCEPTED_DOMAIN_ATTRIBUTE = "msExchAcceptedDomainName"
#: Exchange's AcceptedDomainFlags: bits 0-1 the type (authoritative, external or
#: internal relay), bit 2 the default domain, bit 4 an X.400 domain (its name is an
#: X.400 address, not an SMTP domain), bit 16 MatchSubDomains.
AD_ACCEPTED_DOMAIN_FLAGS_ATTRIBUTE = "msExchAcceptedDomainFlags"
AD_FLAG_X400 = 1 << 4
AD_FLAG_MATCH_SUBDOMAINS = 1 << 16


@dataclass(frozen=True)
class LdapDomainMapping:
    """Which entries hold accepted domains, and whose they are.

    The organization is either fixed (``organization``) or named by an
    attribute of each entry (``organization_attribute``); exactly one is set.
    A value ``*.example.com`` of the domain attribute means example.com with
    ``match_subdomains``, as in Exchange.
    """

    filter: str
    domain_attribute: str
    organization: Optional[str] = None
    organization_attribute: Optional[str] = None
    #: Search base; None: the source's ``base``.
    base: Optional[str] = None
    #: Exchange's flags attribute (the Active Directory preset): an X.400 domain is
    #: skipped, and MatchSubDomains means ``match_subdomains``.
    flags_attribute: Optional[str] = None


@dataclass(frozen=True)
class LdapConnectorMapping:
    """Which entries are connectors, and the attribute holding each connector setting."""

    filter: str
    name_attribute: str
    organization: Optional[str] = None
    organization_attribute: Optional[str] = None
    sender_ip_addresses_attribute: Optional[str] = None
    tls_sender_certificate_name_attribute: Optional[str] = None
    trusted_issuers_attribute: Optional[str] = None
    base: Optional[str] = None


@dataclass(frozen=True)
class LdapSource:
    name: str
    #: Tried in order until one answers (libldap's own failover).
    uris: Tuple[str, ...]
    #: None (Active Directory preset only): the RootDSE's configurationNamingContext.
    base: Optional[str]
    bind_dn: Optional[str]
    #: Absolute path; read by ``relaymilter sync`` only, never by the daemon.
    password_file: Optional[str]
    starttls: bool
    #: Absolute path of the CA certificate(s) that the server's certificate must chain to.
    ca_file: Optional[str]
    #: Seconds, for connecting and for each operation.
    timeout: float
    page_size: int
    accepted_domains: Optional[LdapDomainMapping]
    connectors: Optional[LdapConnectorMapping]
    preset: Optional[str] = None

    kind = "ldap"


@dataclass(frozen=True)
class PostgresqlSource:
    """Queries run in one read-only transaction.

    ``accepted_domains_query`` returns the columns ``organization``, ``domain``
    and optionally ``match_subdomains``. ``connectors_query`` returns
    ``organization`` and ``name``, and optionally ``kind`` (``ip`` or
    ``certificate``), ``sender_ip_addresses``, ``tls_sender_certificate_name``,
    ``trusted_issuers`` and ``mode``; rows with the same organization and name
    are one connector (addresses and issuers are united), so a normalized
    schema needs no aggregation.
    """

    name: str
    #: libpq connection string or URI, without a password.
    conninfo: str
    password_file: Optional[str]
    timeout: float
    accepted_domains_query: Optional[str]
    connectors_query: Optional[str]

    kind = "postgresql"


@dataclass(frozen=True)
class FilesSource:
    """A directory of YAML fragments, each with an ``organizations:`` list."""

    name: str
    directory: str
    pattern: str = "*.yml"

    kind = "files"


Source = Union[LdapSource, PostgresqlSource, FilesSource]


@dataclass(frozen=True)
class SourcesSettings:
    #: Absolute path of the snapshot that the daemon loads; written by ``relaymilter sync``.
    snapshot: str
    #: Absolute path of sync's status file (JSON).
    status: str
    #: Seconds; past it, the daemon answers a temporary failure. None: no limit.
    max_snapshot_age: Optional[float]
    #: Share (0..1) of the snapshot's domains a sync may remove without --force.
    max_removed_domains: float
    sources: Tuple[Source, ...]
