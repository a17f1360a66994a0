"""The relay decision: attribute the connection to an organization, then judge each recipient.

Pure Python, no pymilter: the milter adapter and ``relaymilter explain`` both
call ``Transaction`` so that they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

from .certnames import normalize_certificate_name
from .domains import EnvelopeAddress, parse_envelope_address, strip_angle_brackets
from .model import (
    KIND_CERTIFICATE,
    KIND_IP,
    MODE_ENFORCE,
    MODE_SOFT,
    Attribution,
    Config,
    Reply,
)
from .networks import IPAddress
from .routing import NO_ROUTE, Route, route_of
from .tlsidentity import PresentedCertificate

__all__ = [
    "KIND_CERTIFICATE",
    "KIND_IP",
    "Attribution",
    "Decision",
    "Recipient",
    "Transaction",
    "decide",
    "parse_recipient",
    "recipient_of",
]

REASON_INTERNAL = "internal-recipient"
REASON_CERTIFICATE = "certificate"
REASON_SENDER_DOMAIN = "sender-domain"
REASON_ATTR36 = "attr36"
REASON_UNATTRIBUTED = "unattributed"
#: Every reason a decision may give.
REASONS = frozenset(
    (REASON_INTERNAL, REASON_CERTIFICATE, REASON_SENDER_DOMAIN, REASON_ATTR36, REASON_UNATTRIBUTED)
)

ACTION_CONTINUE = "continue"
ACTION_REJECT = "reject"
ACTION_WOULD_REJECT = "would-reject"
#: Soft mode: refused with a temporary failure (451 4.7.64), so nothing bounces.
ACTION_SOFT_REJECT = "soft-reject"
#: The actions that refuse the recipient at the MTA.
REFUSING_ACTIONS = frozenset((ACTION_REJECT, ACTION_SOFT_REJECT))
#: Every action a decision may take.
ACTIONS = frozenset((ACTION_CONTINUE, ACTION_REJECT, ACTION_WOULD_REJECT, ACTION_SOFT_REJECT))


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


class Recipient(NamedTuple):
    """A recipient as given at RCPT TO, and where it routes."""

    #: The address without angle brackets (a source route, if any, kept).
    address: str
    #: The domains it routes through: the given address's, then those of the
    #: address the MTA resolved it to, when that differs.
    route: Route
    #: The MTA's resolved address ({rcpt_addr}) when it differs from the given one.
    resolved: Optional[str] = None


def parse_recipient(rcpt_to: str, resolved: Optional[str] = None) -> Recipient:
    """A RCPT TO argument, and optionally the MTA's ``{rcpt_addr}`` for it.

    The MTA's address adds its hops only when it has a domain: Sendmail's
    local mailer reports a bare user name, which says nothing about routing.
    """
    mta_address = strip_angle_brackets(resolved) if resolved else None
    return recipient_of(strip_angle_brackets(rcpt_to), mta_address)


def recipient_of(address: str, mta_address: Optional[str] = None) -> Recipient:
    """A recipient from addresses already without their angle brackets (as a record holds them).

    ``replay`` decides from these, not from the RCPT TO argument: taking the
    brackets off a second time would change an address such as
    ``<u@relay.contoso.com>%tailspintoys.com``, and so its route.
    """
    route = route_of(address)
    if mta_address and mta_address.lower() != address.lower() and "@" in mta_address:
        extra = route_of(mta_address).hops
        route = Route(route.hops + tuple(hop for hop in extra if hop not in route.hops))
        return Recipient(address, route, mta_address)
    return Recipient(address, route)


class Decision(NamedTuple):
    recipient: str
    #: continue, reject or would-reject (monitor mode).
    action: str
    reason: str
    #: The reply sent to the client (action reject) or that would be (would-reject).
    reply: Optional[Reply] = None
    route: Route = NO_ROUTE
    #: The MTA's resolved address, when it differs from the given one.
    resolved: Optional[str] = None
    #: The mode in force for this decision (the connector's, organization's or config's).
    mode: str = MODE_ENFORCE


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
    recipient: Recipient,
) -> Decision:
    """Judge one recipient of an attributed (or unattributed) transaction."""
    reason = _reason(attribution, sender, recipient)
    mode = attribution.mode if attribution is not None else config.mode
    if reason is not None:
        return Decision(
            recipient.address,
            ACTION_CONTINUE,
            reason,
            None,
            recipient.route,
            recipient.resolved,
            mode,
        )
    if mode == MODE_ENFORCE:
        action, reply = ACTION_REJECT, config.reject
    elif mode == MODE_SOFT:
        action, reply = ACTION_SOFT_REJECT, config.soft_reject
    else:
        action, reply = ACTION_WOULD_REJECT, config.reject
    return Decision(
        recipient.address,
        action,
        REASON_ATTR36,
        reply,
        recipient.route,
        recipient.resolved,
        mode,
    )


def _reason(
    attribution: Optional[Attribution], sender: EnvelopeAddress, recipient: Recipient
) -> Optional[str]:
    """Why the recipient may pass, or None when it is refused (ATTR36)."""
    if attribution is None:
        return REASON_UNATTRIBUTED
    organization = attribution.organization
    if organization.accepts_route(recipient.route.hops):
        return REASON_INTERNAL
    if attribution.kind == KIND_CERTIFICATE:
        return REASON_CERTIFICATE
    if not sender.is_null and organization.accepts(sender.domain):
        return REASON_SENDER_DOMAIN
    return None


class Transaction:
    """One MAIL FROM and its recipients on a connection; each RCPT is judged on its own."""

    def __init__(
        self,
        config: Config,
        address: Optional[IPAddress],
        presented: Optional[PresentedCertificate],
        mail_from: Union[str, EnvelopeAddress],
    ) -> None:
        """``mail_from``: the MAIL FROM argument, or the sender already parsed (``replay``)."""
        self.config = config
        if isinstance(mail_from, EnvelopeAddress):
            self.sender = mail_from
        else:
            self.sender = parse_envelope_address(mail_from)
        self.attribution = attribute_connection(config, address, presented).for_sender(self.sender)

    def decide(self, rcpt_to: str, resolved: Optional[str] = None) -> Decision:
        """Judge one RCPT TO; ``resolved`` is the MTA's ``{rcpt_addr}`` for it, if sent."""
        return self.judge(parse_recipient(rcpt_to, resolved))

    def judge(self, recipient: Recipient) -> Decision:
        """Judge one recipient already parsed (``parse_recipient``, or ``recipient_of``)."""
        return decide(self.config, self.attribution, self.sender, recipient)
