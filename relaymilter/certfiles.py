"""Reading certificate files (PEM) with ``cryptography``.

Neither MTA passes a client certificate's subjectAltNames to a milter, so a
connector may list the PEM files of its clients' certificates: when the
presented certificate is one of them, that file's DNS SANs count as the
certificate's names.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

# Sendmail's {cert_fp} uses CertFingerprintAlgorithm (any OpenSSL digest) and
# {cert_md5} MD5; keep every digest an admin is likely to configure.
_FINGERPRINT_ALGORITHMS = (hashes.MD5, hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)


class CertificateFileError(ValueError):
    """A certificate file that cannot be read or parsed."""


@dataclass(frozen=True)
class CertificateFile:
    """The parts of a certificate file that identify a client and name it."""

    path: str
    subject: str
    issuer: str
    subject_cn: Optional[str]
    #: The issuer CN, or its O when there is no CN (what Postfix sends).
    issuer_cn: Optional[str]
    dns_names: Tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str
    #: Lowercase hex digests (MD5, SHA-1, SHA-256, SHA-384, SHA-512).
    fingerprints: FrozenSet[str]

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer

    def validity_problem(self, now: Optional[datetime.datetime] = None) -> Optional[str]:
        """A warning when the certificate is expired or not yet valid, else None."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if now < self.not_before:
            return f"not valid before {self.not_before:%Y-%m-%d %H:%M:%S} UTC"
        if now > self.not_after:
            return f"expired on {self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        return None


def _first_attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> Optional[str]:
    values = name.get_attributes_for_oid(oid)
    if not values:
        return None
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _utc(cert: x509.Certificate, attribute: str) -> datetime.datetime:
    # cryptography >= 42 has timezone-aware *_utc properties; older ones (Debian
    # 12 ships 38) return naive datetimes in UTC.
    aware = getattr(cert, attribute + "_utc", None)
    if isinstance(aware, datetime.datetime):
        return aware
    naive: datetime.datetime = getattr(cert, attribute)
    return naive.replace(tzinfo=datetime.timezone.utc)


def _dns_names(cert: x509.Certificate) -> Tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(extension.value.get_values_for_type(x509.DNSName))


def describe_certificate(cert: x509.Certificate, path: str) -> CertificateFile:
    """Extract the identifying parts of a parsed certificate."""
    fingerprints = frozenset(
        cert.fingerprint(algorithm()).hex() for algorithm in _FINGERPRINT_ALGORITHMS
    )
    return CertificateFile(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        subject_cn=_first_attribute(cert.subject, NameOID.COMMON_NAME),
        issuer_cn=_first_attribute(cert.issuer, NameOID.COMMON_NAME)
        or _first_attribute(cert.issuer, NameOID.ORGANIZATION_NAME),
        dns_names=_dns_names(cert),
        not_before=_utc(cert, "not_valid_before"),
        not_after=_utc(cert, "not_valid_after"),
        sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        fingerprints=fingerprints,
    )


def load_certificate_file(path: str) -> CertificateFile:
    """Read the first certificate of a PEM (or DER) file; raise CertificateFileError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CertificateFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        # cryptography parses extensions lazily: a malformed one fails here.
        return describe_certificate(cert, path)
    except ValueError as exc:
        raise CertificateFileError(f"{path} is not a PEM or DER certificate: {exc}") from exc
    except Exception as exc:
        raise CertificateFileError(f"{path}: cannot read the certificate: {exc}") from exc
