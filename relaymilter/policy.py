"""The relay decision: attribute the connection to an organization, then judge each recipient.

Pure Python, no pymilter: the milter adapter and ``relaymilter explain`` both
call ``Transaction`` so that they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from .certnames import normalize_certificate_name
from .domains import EnvelopeAddress, parse_envelope_address
from .model import KIND_CERTIFICATE, KIND_IP, Attribution, Config, Reply
from .networks import IPAddress
from .tlsidentity import PresentedCertificate

__all__ = ["KIND_CERTIFICATE", "KIND_IP", "Attribution", "Decision", "Transaction", "decide"]

REASON_INTERNAL = "internal-recipient"
REASON_CERTIFICATE = "certificate"
REASON_SENDER_DOMAIN = "sender-domain"
REASON_ATTR36 = "attr36"
REASON_UNATTRIBUTED = "unattributed"

ACTION_CONTINUE = "continue"
ACTION_REJECT = "reject"
ACTION_WOULD_REJECT = "would-reject"


@dataclass(frozen=True)
class ConnectionAttribution:
    """What the client's address and certificate say, before the sender is known."""

    certificate: Optional[Attribution]
    #: IP connectors that match, at most one per organization, in file order.
    ip_candidates: Tuple[Attribution, ...]

    def for_sender(self, sender: EnvelopeAddress) -> Optional[Attribution]:
        """The attribution of one transaction: certificate first, else IP.

        When IP connectors of several organizations match, the organization
        that accepts the sender's domain wins; otherwise the first in file order.
        """
        if self.certificate is not None:
            return self.certificate
        if not self.ip_candidates:
            return None
        for candidate in self.ip_candidates:
            if candidate.organization.accepts(sender.domain):
                return candidate
        return self.ip_candidates[0]


@dataclass(frozen=True)
class Decision:
    recipient: str
    #: continue, reject or would-reject (monitor mode).
    action: str
    reason: str
    #: The reply sent to the client (action reject) or that would be (would-reject).
    reply: Optional[Reply] = None


def certificate_names(config: Config, presented: PresentedCertificate) -> List[str]:
    """The names a trusted certificate carries: its CN, plus the DNS SANs of a matching file."""
    names = [presented.subject_cn] if presented.subject_cn else []
    for known in config.certificate_files.find(presented):
        names.extend(known.dns_names)
    normalized = (normalize_certificate_name(name) for name in names)
    return list(dict.fromkeys(n for n in normalized if n is not None))


def attribute_certificate(
    config: Config, address: Optional[IPAddress], presented: Optional[PresentedCertificate]
) -> Optional[Attribution]:
    """Rule 1: a trusted certificate matching a certificate connector (most specific wins)."""
    if presented is None or not presented.trusted or not config.certificate_connectors:
        return None
    best: Optional[Tuple[int, int, Attribution, str]] = None
    for name in certificate_names(config, presented):
        for rank, candidate in config.certificate_connectors.lookup(name):
            connector = candidate.connector
            if not connector.admits_issuer(presented.issuer_cn) or not connector.admits_address(
                address
            ):
                continue
            if best is None or (rank, connector.order) < best[:2]:
                best = (rank, connector.order, candidate, name)
    if best is None:
        return None
    return replace(best[2], certificate_name=best[3])


def attribute_ip(config: Config, address: Optional[IPAddress]) -> Tuple[Attribution, ...]:
    """Rule 2: the IP connectors whose networks hold the address, one per organization."""
    if address is None:
        return ()
    found = config.ip_connectors.lookup(address)  # already in file order
    if len(found) < 2:
        return found
    candidates: Dict[str, Attribution] = {}
    for attribution in found:
        candidates.setdefault(attribution.organization.name, attribution)
    return tuple(candidates.values())


def attribute_connection(
    config: Config, address: Optional[IPAddress], presented: Optional[PresentedCertificate]
) -> ConnectionAttribution:
    return ConnectionAttribution(
        attribute_certificate(config, address, presented), attribute_ip(config, address)
    )


def decide(
    config: Config,
    attribution: Optional[Attribution],
    sender: EnvelopeAddress,
    recipient: EnvelopeAddress,
) -> Decision:
    """Judge one recipient of an attributed (or unattributed) transaction."""
    if attribution is None:
        return Decision(recipient.address, ACTION_CONTINUE, REASON_UNATTRIBUTED)
    organization = attribution.organization
    if organization.accepts(recipient.domain):
        return Decision(recipient.address, ACTION_CONTINUE, REASON_INTERNAL)
    if attribution.kind == KIND_CERTIFICATE:
        return Decision(recipient.address, ACTION_CONTINUE, REASON_CERTIFICATE)
    if not sender.is_null and organization.accepts(sender.domain):
        return Decision(recipient.address, ACTION_CONTINUE, REASON_SENDER_DOMAIN)
    action = ACTION_REJECT if config.enforcing else ACTION_WOULD_REJECT
    return Decision(recipient.address, action, REASON_ATTR36, config.reject)


class Transaction:
    """One MAIL FROM and its recipients on a connection; each RCPT is judged on its own."""

    def __init__(
        self,
        config: Config,
        address: Optional[IPAddress],
        presented: Optional[PresentedCertificate],
        mail_from: str,
    ) -> None:
        self.config = config
        self.sender = parse_envelope_address(mail_from)
        self.attribution = attribute_connection(config, address, presented).for_sender(self.sender)

    def decide(self, rcpt_to: str) -> Decision:
        return decide(self.config, self.attribution, self.sender, parse_envelope_address(rcpt_to))
