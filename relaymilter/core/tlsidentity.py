"""The client certificate as the MTA describes it in milter macros, and whether to trust it.

Postfix sends ``{cert_subject}`` = the subject CN and ``{cert_issuer}`` = the
issuer CN, and only for a verified chain. Sendmail sends xtext-encoded one-line
DNs in ``{cert_subject}``/``{cert_issuer}`` (with OpenSSL 3's backslash escapes),
``{cn_subject}``/``{cn_issuer}``, ``{verify}`` and a fingerprint in ``{cert_fp}``
or ``{cert_md5}``, for every presented certificate, verified or not.

Postfix's policy service protocol gives the same CNs (``ccert_subject``,
``ccert_issuer``, only for a verified chain) and the digests of the certificate
and of its public key; the policy front end hands them over under the names
above, the public key's as ``{cert_pubkey_fp}`` (``PUBKEY_FINGERPRINT``, a name
no MTA sends).

Trust fails closed: a bare CN (Postfix's form) is trusted unless a ``{verify}``
other than ``OK`` came with it; a DN (Sendmail's form, starting with ``/``) is
trusted only with ``{verify}`` = ``OK``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

#: The macros relaymilter reads for the client certificate.
CERTIFICATE_MACROS = (
    "{cert_subject}",
    "{cert_issuer}",
    "{verify}",
    "{cn_subject}",
    "{cn_issuer}",
    "{cert_fp}",
    "{cert_md5}",
)

#: Where the public key's digest (Postfix's ccert_pubkey_fingerprint) travels with the macros.
PUBKEY_FINGERPRINT = "{cert_pubkey_fp}"

_XTEXT = re.compile(rb"\+([0-9A-Fa-f]{2})")
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class PresentedCertificate:
    """What the MTA told us about the client's certificate."""

    subject: str
    subject_cn: Optional[str]
    issuer_cn: Optional[str]
    #: Lowercase hex digits without separators, or None.
    fingerprint: Optional[str]
    trusted: bool
    #: The public key's digest, as ``fingerprint`` (Postfix's policy service only).
    pubkey_fingerprint: Optional[str] = None


def xtext_decode(value: str) -> bytes:
    """Decode RFC 3461 xtext (``+XX`` hex escapes) to bytes."""
    raw = value.encode("utf-8", "surrogateescape")
    return _XTEXT.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def _split_openssl_dn(raw: bytes) -> List[bytes]:
    """Split an OpenSSL one-line DN into components, honouring ``\\/``, ``\\+``, ``\\xHH``."""
    parts: List[bytes] = []
    current = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i : i + 1]
        if byte == b"\\" and i + 1 < len(raw):
            nxt = raw[i + 1 : i + 2]
            if nxt in (b"x", b"X") and re.fullmatch(rb"[0-9A-Fa-f]{2}", raw[i + 2 : i + 4]):
                current.append(int(raw[i + 2 : i + 4], 16))
                i += 4
                continue
            current += nxt
            i += 2
            continue
        if byte == b"/":
            parts.append(bytes(current))
            current = bytearray()
        else:
            current += byte
        i += 1
    parts.append(bytes(current))
    return [p for p in parts if p]


def dn_attribute(dn: str, attribute: str) -> Optional[str]:
    """The first value of ``attribute`` (e.g. "CN") in a Sendmail/OpenSSL one-line DN."""
    components = _split_openssl_dn(xtext_decode(dn))
    prefix = attribute.encode("ascii") + b"="
    for component in components:
        if component.upper().startswith(prefix.upper()):
            return component[len(prefix) :].decode("utf-8", "replace")
    return None


def normalize_fingerprint(value: Optional[str]) -> Optional[str]:
    """``AB:CD:…`` (any case, colons or not) to lowercase hex; None if not a fingerprint."""
    if not value:
        return None
    digits = value.replace(":", "").strip().lower()
    if len(digits) < 32 or not _HEX.match(digits):
        return None
    return digits


def _decoded(value: Optional[str]) -> Optional[str]:
    if not value:
        return None
    return xtext_decode(value).decode("utf-8", "replace")


def certificate_from_macros(
    getsymval: Callable[[str], Optional[str]],
) -> Optional[PresentedCertificate]:
    """Build the presented certificate from the MTA's macros; None when there is none."""
    subject = getsymval("{cert_subject}")
    if not subject:
        return None
    verify = getsymval("{verify}") or None
    issuer = getsymval("{cert_issuer}")
    fingerprint = normalize_fingerprint(getsymval("{cert_fp}") or getsymval("{cert_md5}"))
    pubkey_fingerprint = normalize_fingerprint(getsymval(PUBKEY_FINGERPRINT))
    if subject.startswith("/"):
        subject_cn = _decoded(getsymval("{cn_subject}")) or dn_attribute(subject, "CN")
        issuer_cn = _decoded(getsymval("{cn_issuer}"))
        if issuer_cn is None and issuer:
            issuer_cn = dn_attribute(issuer, "CN") or dn_attribute(issuer, "O")
        return PresentedCertificate(
            subject=_decoded(subject) or subject,
            subject_cn=subject_cn,
            issuer_cn=issuer_cn,
            fingerprint=fingerprint,
            trusted=verify == "OK",
            pubkey_fingerprint=pubkey_fingerprint,
        )
    return PresentedCertificate(
        subject=subject,
        subject_cn=subject,
        issuer_cn=issuer or None,
        fingerprint=fingerprint,
        trusted=verify is None or verify == "OK",
        pubkey_fingerprint=pubkey_fingerprint,
    )


def certificate_macros(getsymval: Callable[[str], Optional[str]]) -> Dict[str, str]:
    """The certificate macros the MTA sent, verbatim (none without a subject).

    Recorded with each decision, so that a replay can decide again from them.
    """
    subject = getsymval("{cert_subject}")
    if not subject:
        return {}
    found = {"{cert_subject}": subject}
    for name in CERTIFICATE_MACROS[1:]:
        value = getsymval(name)
        if value:
            found[name] = value
    return found


def certificate_from_mapping(macros: Mapping[str, Optional[str]]) -> Optional[PresentedCertificate]:
    """Like certificate_from_macros, from a dict of macro values (for the CLI and tests)."""
    return certificate_from_macros(macros.get)
