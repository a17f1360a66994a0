"""The validated, immutable configuration model and its look-up indexes.

Built once per load by ``relaymilter.config``; never changed afterwards, so a
connection can keep the object it started with while a reload swaps in a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

from .certfiles import CertificateFile
from .certnames import CertificateNameIndex, CertificatePattern
from .networks import IPAddress, IPNetwork, NetworkTable
from .sourcesettings import SourcesSettings
from .tlsidentity import PresentedCertificate

MODE_ENFORCE = "enforce"
MODE_MONITOR = "monitor"
#: Refuse with a temporary failure (451 4.7.64): the sender keeps the message
#: and retries, so nothing bounces (a stage between monitor and enforce).
MODE_SOFT = "soft"
MODES = (MODE_ENFORCE, MODE_SOFT, MODE_MONITOR)
ON_ERROR_TEMPFAIL = "tempfail"
ON_ERROR_ACCEPT = "accept"

DEFAULT_CONFIG_PATH = "/etc/relaymilter/relaymilter.yml"
DEFAULT_SOCKET = "inet:8894@127.0.0.1"
DEFAULT_REJECT_CODE = "550"
DEFAULT_REJECT_STATUS = "5.7.64"
DEFAULT_REJECT_TEXT = (
    "Relay Access Denied ATTR36. For more details please refer to "
    "https://support.microsoft.com/kb/3169958."
)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply relaymilter gives: code, enhanced status code and text."""

    code: str
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def is_permanent(self) -> bool:
        return self.code.startswith("5")


SOFT_REJECT_CODE = "451"
SOFT_REJECT_STATUS = "4.7.64"

TEMPFAIL_REPLY = Reply("451", "4.3.0", "relaymilter: internal error, please try again later")
#: Past max_snapshot_age: no decision on stale data (as Postfix answers a table that is down).
STALE_SNAPSHOT_REPLY = Reply(
    "451", "4.3.0", "relaymilter: organization data is out of date, please try again later"
)


@dataclass(frozen=True)
class SnapshotFile:
    """The snapshot file a config was loaded with."""

    path: str
    #: (device, inode, size, mtime in ns) when it was read: a new sync changes them.
    stat: Tuple[int, int, int, int]
    #: A hash of its text, to tell a rewritten snapshot from a refreshed one.
    digest: str
    #: When it was written or last confirmed by a sync (its modification time).
    synced_at: float


@dataclass(frozen=True)
class AcceptedDomain:
    domain: str
    match_subdomains: bool = False


@dataclass(frozen=True)
class Connector:
    """An on-premises connector: how a connection is recognised as the organization's."""

    name: str
    organization: str
    #: Position in the file across all organizations; the first wins ties.
    order: int
    sender_ip_addresses: Tuple[IPNetwork, ...] = ()
    certificate_pattern: Optional[CertificatePattern] = None
    #: Issuer CNs, casefolded; empty means any issuer the MTA trusts.
    trusted_issuers: FrozenSet[str] = frozenset()
    certificates: Tuple[CertificateFile, ...] = ()
    #: This connector's own mode; None: the organization's.
    mode: Optional[str] = None

    @property
    def is_certificate_connector(self) -> bool:
        return self.certificate_pattern is not None

    def admits_address(self, address: Optional[IPAddress]) -> bool:
        """Whether the client address satisfies this connector's address restriction."""
        if not self.sender_ip_addresses:
            return True
        if address is None:
            return False
        return any(
            address.version == network.version and address in network
            for network in self.sender_ip_addresses
        )

    def admits_issuer(self, issuer_cn: Optional[str]) -> bool:
        if not self.trusted_issuers:
            return True
        return issuer_cn is not None and issuer_cn.casefold() in self.trusted_issuers


@dataclass(frozen=True)
class Organization:
    name: str
    accepted_domains: Tuple[AcceptedDomain, ...]
    connectors: Tuple[Connector, ...]
    #: This organization's own mode; None: the config's.
    mode: Optional[str] = None
    _exact: FrozenSet[str] = field(init=False, repr=False, compare=False)
    _subtrees: FrozenSet[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # frozen dataclass: derived look-up sets are set once here.
        object.__setattr__(self, "_exact", frozenset(a.domain for a in self.accepted_domains))
        subtrees = frozenset(a.domain for a in self.accepted_domains if a.match_subdomains)
        object.__setattr__(self, "_subtrees", subtrees)

    def accepts(self, domain: Optional[str]) -> bool:
        """accepted(O, d): d is an accepted domain, or below one with match_subdomains."""
        if domain is None:
            return False
        if domain in self._exact:
            return True
        subtrees = self._subtrees
        if not subtrees:
            return False
        # Walk the labels: a.b.c, b.c, c (parent_domains, inlined: hot path).
        while True:
            if domain in subtrees:
                return True
            dot = domain.find(".")
            if dot < 0:
                return False
            domain = domain[dot + 1 :]

    def accepts_route(self, hops: Tuple[Optional[str], ...]) -> bool:
        """Whether every domain a recipient routes through, and finally reaches, is accepted."""
        if len(hops) == 1:
            return self.accepts(hops[0])  # the usual case, without a generator
        return bool(hops) and all(self.accepts(hop) for hop in hops)


KIND_CERTIFICATE = "certificate"
KIND_IP = "ip"


@dataclass(frozen=True)
class Attribution:
    """The organization a transaction is attributed to, and through which connector.

    The indexes hold one prebuilt Attribution per connector, so that the
    per-transaction path allocates nothing for the common case.
    """

    organization: Organization
    connector: Connector
    kind: str
    #: The certificate name that matched (kind certificate only).
    certificate_name: Optional[str] = None
    #: The mode in force for this connector: its own, else its organization's,
    #: else the config's (the most specific wins); resolved once per load.
    mode: str = MODE_ENFORCE

    @property
    def connector_name(self) -> str:
        return self.connector.name


class CertificateFileIndex:
    """Finds the configured certificate files for the certificate an MTA describes."""

    def __init__(self, files: List[CertificateFile]) -> None:
        self._by_fingerprint: Dict[str, CertificateFile] = {}
        self._by_pubkey: Dict[str, List[CertificateFile]] = {}
        self._by_names: Dict[Tuple[str, str], List[CertificateFile]] = {}
        for cert in files:
            for digest in cert.fingerprints:
                self._by_fingerprint.setdefault(digest, cert)
            for digest in cert.pubkey_fingerprints:
                self._by_pubkey.setdefault(digest, []).append(cert)
            if cert.subject_cn and cert.issuer_cn:
                key = (cert.subject_cn.casefold(), cert.issuer_cn.casefold())
                self._by_names.setdefault(key, []).append(cert)

    def find(self, presented: PresentedCertificate) -> List[CertificateFile]:
        """By the digests the MTA sent, else by subject and issuer CN.

        Sendmail sends the certificate's digest, Postfix's policy service that
        and the public key's: the certificate itself, else every file with the
        same key (a renewal that kept its key). Only without a digest (Postfix's
        milter macros) do names decide; then every matching file counts: an old
        and a renewed certificate of one host share their CNs but may differ in
        their SANs.
        """
        if presented.fingerprint or presented.pubkey_fingerprint:
            known = self._by_fingerprint.get(presented.fingerprint or "")
            if known is not None:
                return [known]
            return list(self._by_pubkey.get(presented.pubkey_fingerprint or "", ()))
        if presented.subject_cn and presented.issuer_cn:
            key = (presented.subject_cn.casefold(), presented.issuer_cn.casefold())
            return self._by_names.get(key, [])
        return []


@dataclass(frozen=True)
class MetricsSettings:
    """The ``metrics:`` section: where the Prometheus metrics are served and written."""

    #: The HTTP endpoint's (host, port); None: no endpoint.
    listen: Optional[Tuple[str, int]] = None
    #: The file rewritten for node_exporter's textfile collector; None: no file.
    textfile: Optional[str] = None


@dataclass(frozen=True)
class PolicyServiceSettings:
    """The ``policy_service:`` section: what ``relaymilter policy`` listens on and serves."""

    #: Where it listens when systemd does not hand it a socket; None: nowhere of its own.
    socket: Optional[str] = None
    #: Its own metrics (the milter's are the top-level ``metrics:``).
    metrics: Optional[MetricsSettings] = None


@dataclass(frozen=True)
class Config:
    """A complete, validated configuration."""

    path: str
    socket: str
    mode: str
    on_error: str
    reject: Reply
    organizations: Tuple[Organization, ...]
    warnings: Tuple[str, ...] = ()
    #: A short hash of the file's text: which config made a decision (in every record).
    identity: str = "-"
    #: The ``metrics:`` section; None without it (nothing listens, nothing is written).
    metrics: Optional[MetricsSettings] = None
    #: The ``policy_service:`` section; None without it.
    policy_service: Optional[PolicyServiceSettings] = None
    #: The ``sources:`` section; None without it (the config file is all there is).
    sources: Optional[SourcesSettings] = None
    #: The snapshot as loaded: its file's identity, to notice when sync replaces it.
    snapshot: Optional[SnapshotFile] = None
    #: Every organization and connector is in monitor mode: nothing is ever refused.
    monitor_only: bool = False
    ip_connectors: NetworkTable[Attribution] = field(
        default_factory=NetworkTable, repr=False, compare=False
    )
    certificate_connectors: CertificateNameIndex[Attribution] = field(
        default_factory=CertificateNameIndex, repr=False, compare=False
    )
    certificate_files: CertificateFileIndex = field(
        default_factory=lambda: CertificateFileIndex([]), repr=False, compare=False
    )

    @property
    def soft_reject(self) -> Reply:
        """The refusal in soft mode: a temporary failure with the configured text."""
        return Reply(SOFT_REJECT_CODE, SOFT_REJECT_STATUS, self.reject.text)

    def modes(self) -> str:
        """Which organizations and connectors are in which mode, for check-config."""
        scoped: Dict[str, List[str]] = {}
        for organization in self.organizations:
            if organization.mode and organization.mode != self.mode:
                scoped.setdefault(organization.mode, []).append(organization.name)
            inherited = organization.mode or self.mode
            for connector in organization.connectors:
                if connector.mode and connector.mode != inherited:
                    scoped.setdefault(connector.mode, []).append(
                        f"{organization.name}/{connector.name}"
                    )
        parts = [f"mode {self.mode}"]
        parts.extend(f"{mode}: {', '.join(names)}" for mode, names in sorted(scoped.items()))
        return "; ".join(parts)

    def summary(self) -> str:
        """One line: what is loaded."""
        domains = sum(len(o.accepted_domains) for o in self.organizations)
        connectors = [c for o in self.organizations for c in o.connectors]
        certificate = sum(1 for c in connectors if c.is_certificate_connector)
        return (
            f"{plural(len(self.organizations), 'organization')}, "
            f"{plural(domains, 'accepted domain')}, "
            f"{plural(len(connectors), 'connector')} "
            f"({certificate} certificate, {len(connectors) - certificate} ip), "
            f"{self.modes()}"
        )


def plural(number: int, noun: str) -> str:
    """``3 connectors``, ``1 connector``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def effective_mode(default: str, organization: Organization, connector: Connector) -> str:
    """The most specific mode: the connector's, else the organization's, else ``default``."""
    return connector.mode or organization.mode or default


def build_indexes(
    organizations: Tuple[Organization, ...], default_mode: str = MODE_ENFORCE
) -> Tuple[NetworkTable[Attribution], CertificateNameIndex[Attribution], CertificateFileIndex]:
    """The look-up structures for attribution, built once per load (in file order)."""
    ip_table: NetworkTable[Attribution] = NetworkTable()
    names: CertificateNameIndex[Attribution] = CertificateNameIndex()
    files: List[CertificateFile] = []
    for organization in organizations:
        for connector in organization.connectors:
            mode = effective_mode(default_mode, organization, connector)
            if connector.certificate_pattern is not None:
                names.add(
                    connector.certificate_pattern,
                    Attribution(organization, connector, KIND_CERTIFICATE, mode=mode),
                )
                files.extend(connector.certificates)
            else:
                attribution = Attribution(organization, connector, KIND_IP, mode=mode)
                for network in connector.sender_ip_addresses:
                    ip_table.add(network, attribution)
    ip_table.freeze()
    return ip_table, names, CertificateFileIndex(files)
