"""Certificate names and the connector patterns (``tls_sender_certificate_name``) they match.

A pattern ``*.D`` matches D itself, every name ending in ``.D`` at any depth, and
the literal wildcard certificate name ``*.D``; a pattern N matches N only. This
is Exchange Online's connector semantics ("a domain and all subdomains"), not
RFC 6125's one-label certificate wildcard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Generic, List, Optional, Tuple, TypeVar

from .domains import is_host_name, normalize_domain, parent_domains

V = TypeVar("V")


class PatternError(ValueError):
    """A ``tls_sender_certificate_name`` that is not a valid pattern."""


@dataclass(frozen=True)
class CertificatePattern:
    """A normalised connector pattern."""

    #: The domain part: D for ``*.D``, N for N.
    domain: str
    wildcard: bool

    @property
    def text(self) -> str:
        return f"*.{self.domain}" if self.wildcard else self.domain

    def matches(self, name: str) -> bool:
        """Whether a normalised certificate name matches this pattern."""
        if not self.wildcard:
            return name == self.domain
        return name == self.domain or name.endswith("." + self.domain)


def parse_pattern(text: str) -> CertificatePattern:
    """Parse a connector's certificate name; raise PatternError with the reason."""
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    if "*" in rest:
        raise PatternError(
            "a wildcard is allowed only as the whole first label, as in '*.contoso.com'"
        )
    domain = normalize_domain(rest)
    if domain is None or not is_host_name(domain):
        raise PatternError(f"{text!r} is not a valid domain name")
    if wildcard and "." not in domain:
        raise PatternError(f"{text!r} would match a whole top-level domain")
    return CertificatePattern(domain, wildcard)


def normalize_certificate_name(text: Optional[str]) -> Optional[str]:
    """Normalise a name from a certificate (CN or DNS SAN), keeping a leading ``*.``."""
    if not text:
        return None
    if text.startswith("*."):
        rest = normalize_domain(text[2:])
        return None if rest is None else "*." + rest
    if "*" in text:
        return None
    return normalize_domain(text)


class CertificateNameIndex(Generic[V]):
    """Finds the patterns a certificate name matches without scanning every pattern.

    ``lookup`` returns (specificity, value) pairs: an exact pattern ranks before
    any wildcard, and a longer wildcard domain before a shorter one (lower is
    more specific), so that "the most exactly matching" connector can win.
    """

    def __init__(self) -> None:
        self._exact: Dict[str, List[V]] = {}
        self._wildcard: Dict[str, List[V]] = {}

    def add(self, pattern: CertificatePattern, value: V) -> None:
        table = self._wildcard if pattern.wildcard else self._exact
        table.setdefault(pattern.domain, []).append(value)

    def lookup(self, name: str) -> List[Tuple[int, V]]:
        found: List[Tuple[int, V]] = [(0, value) for value in self._exact.get(name, ())]
        # Walking the labels of the name finds D for every "*.D" that covers it,
        # including the apex (name == D) and a wildcard name "*.D" itself.
        for suffix in parent_domains(name):
            for value in self._wildcard.get(suffix, ()):
                found.append((1000 - suffix.count("."), value))
        return found

    def __bool__(self) -> bool:
        return bool(self._exact or self._wildcard)
