"""Domain and envelope-address normalisation, shared by the config and the traffic.

Domains are compared lowercase, with one trailing dot removed, in IDNA A-label
form. A domain that cannot be normalised is represented by ``None`` and matches
nothing; so is an address literal such as ``[192.0.2.1]``, which is never an
accepted domain.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import idna

# RFC 1035 limits; an over-long name cannot be a real domain, and the IDNA codec
# enforces the per-label limit for us.
_MAX_DOMAIN_LENGTH = 253
#: The white space the MTAs take off around an address or a domain: ASCII's (C's
#: isspace), not str.strip()'s Unicode set. Sendmail relays u@contoso.com\u00a0 to
#: the domain "contoso.com\u00a0", so that is the domain to judge, not contoso.com.
ASCII_SPACE = " \t\r\n\v\f"


def normalize_domain(text: str) -> Optional[str]:
    """Return the comparison form of a domain, or None if it cannot be normalised."""
    name = text.strip(ASCII_SPACE)
    if name.endswith("."):
        name = name[:-1]
    if not name or name.startswith("[") or name.endswith("."):
        return None
    if name.isascii():
        # What the IDNA codec does to an ASCII name (it checks label lengths and
        # leaves the rest alone), without its per-label cost: this runs for
        # every sender and recipient.
        ascii_name = name.lower()
        labels = ascii_name.split(".")
        if "" in labels or max(map(len, labels)) > 63:
            return None
    else:
        # IDNA 2008 with UTS 46 mapping (not Python's IDNA 2003 codec, which
        # turns "straße" into "strasse", a different domain).
        try:
            ascii_name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    if len(ascii_name) > _MAX_DOMAIN_LENGTH or ".." in ascii_name:
        return None
    return ascii_name


# A host name as a config may name it: letters, digits, hyphens (not at either
# end of a label) and underscores, which some mail host names carry.
_HOST_NAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
)


def is_host_name(domain: str) -> bool:
    """Whether a normalised domain is a plausible host name (for validating the config)."""
    return _HOST_NAME.fullmatch(domain) is not None


# A label that some resolver would read as a number: an IPv4 address may be
# written 192.0.2.1, 3221225985, 0xc0.0.2.1 or 0300.0.2.1 (inet_aton); no
# top-level domain is numeric, so a name ending in such a label is an address.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)


def address_literal_problem(text: str) -> Optional[str]:
    """Why a configured domain is an IP address in some spelling, or None if it is not one."""
    name = text.strip(ASCII_SPACE).rstrip(".")
    last = name.rsplit(".", 1)[-1]
    if (
        name.startswith("[")
        or (":" in name and _is_ip_address(name))  # IPv6; IPv4 ends in a numeric label
        or (name and _NUMERIC_LABEL.fullmatch(last))
    ):
        return (
            f"{text!r} is an IP address (or reads as one), not a domain: "
            "an address is never an accepted domain; list the organization's domain names"
        )
    return None


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def a_label_problem(domain: str) -> Optional[str]:
    """Why a domain's ``xn--`` labels are not valid IDNA 2008 A-labels, or None."""
    for label in domain.split("."):
        if not label.startswith("xn--"):
            continue
        try:
            idna.decode(label)
        except (idna.IDNAError, UnicodeError) as exc:
            return (
                f"{label!r} in {domain} is not a valid A-label (IDNA 2008: {exc}); "
                "write the domain in Unicode, or copy its A-label from the DNS"
            )
    return None


def parent_domains(domain: str) -> Iterator[str]:
    """Yield ``domain`` and then each proper suffix: a.b.c, b.c, c."""
    while True:
        yield domain
        dot = domain.find(".")
        if dot < 0:
            return
        domain = domain[dot + 1 :]


@dataclass(frozen=True)
class EnvelopeAddress:
    """An envelope address as given at MAIL FROM or RCPT TO."""

    #: The address without angle brackets and source route ("" for the null sender).
    address: str
    #: Normalised domain, or None (null sender, no domain, literal, unnormalisable).
    domain: Optional[str]

    @property
    def is_null(self) -> bool:
        return self.address == ""


def strip_angle_brackets(text: str) -> str:
    """Remove surrounding whitespace and angle brackets (a source route stays)."""
    address = text.strip(ASCII_SPACE)
    if address.startswith("<"):
        end = address.rfind(">")
        address = address[1:end] if end > 0 else address[1:]
    return address.strip(ASCII_SPACE)


def strip_envelope(text: str) -> str:
    """Remove surrounding whitespace, angle brackets and any source route."""
    address = strip_angle_brackets(text)
    # A source route "@a,@b:user@domain" (RFC 5321 4.1.2) precedes the mailbox.
    if address.startswith("@"):
        colon = address.find(":")
        address = address[colon + 1 :] if colon >= 0 else ""
    return address


def parse_envelope_address(text: str) -> EnvelopeAddress:
    """Parse a MAIL FROM / RCPT TO argument such as ``<user@example.com>``."""
    return envelope_address(strip_envelope(text))


def envelope_address(address: str) -> EnvelopeAddress:
    """An address already without its angle brackets and source route (as a record holds it)."""
    at = address.rfind("@")
    if at < 0:
        return EnvelopeAddress(address, None)
    return EnvelopeAddress(address, normalize_domain(address[at + 1 :]))
