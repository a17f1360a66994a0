"""Reading certificate files (PEM) with ``cryptography``.

Neither MTA passes a client certificate's subjectAltNames to a milter, so a
connector may list the PEM files of its clients' certificates: when the
presented certificate is one of them, that file's DNS SANs count as the
certificate's names. A file is known by the digests of the whole certificate
(Sendmail's ``{cert_fp}``, Postfix's ``ccert_fingerprint``) and by those of its
public key (Postfix's ``ccert_pubkey_fingerprint``: the DER-encoded
SubjectPublicKeyInfo), so that a renewal with the same key still matches.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ..base.safefile import CERTIFICATE_FILE_LIMIT, UnsafeFileError, read_regular_file

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
    #: The SHA-256 digest of the public key (SubjectPublicKeyInfo), as ``sha256`` is written.
    pubkey_sha256: str = ""
    #: Lowercase hex digests of the public key, in the same algorithms.
    pubkey_fingerprints: FrozenSet[str] = frozenset()

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


def _digests(data: bytes) -> FrozenSet[str]:
    found = set()
    for algorithm in _FINGERPRINT_ALGORITHMS:
        digest = hashes.Hash(algorithm())
        digest.update(data)
        found.add(digest.finalize().hex())
    return frozenset(found)


def public_key_info(cert: x509.Certificate) -> bytes:
    """The certificate's SubjectPublicKeyInfo, DER-encoded: what Postfix digests."""
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def describe_certificate(cert: x509.Certificate, path: str) -> CertificateFile:
    """Extract the identifying parts of a parsed certificate."""
    fingerprints = frozenset(
        cert.fingerprint(algorithm()).hex() for algorithm in _FINGERPRINT_ALGORITHMS
    )
    key = public_key_info(cert)
    key_digest = hashes.Hash(hashes.SHA256())
    key_digest.update(key)
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
        pubkey_sha256=key_digest.finalize().hex(":").upper(),
        pubkey_fingerprints=_digests(key),
    )


@dataclass(frozen=True)
class CertificateBundle:
    """The certificates of one file: a renewal bundle may hold several leaves, and a chain."""

    path: str
    #: Client (end-entity) certificates: each one counts for its connector.
    leaves: Tuple[CertificateFile, ...]
    #: CA certificates (basicConstraints CA:TRUE) found alongside; ignored.
    authorities: Tuple[CertificateFile, ...]


_PEM_BLOCK = re.compile(
    rb"-----BEGIN (?:X509 )?CERTIFICATE-----.+?-----END (?:X509 )?CERTIFICATE-----",
    re.DOTALL,
)


def load_certificates(path: str) -> CertificateBundle:
    """Read every certificate of a PEM (or DER) file; raise CertificateFileError.

    The file must hold at least one leaf certificate; CA certificates (a chain
    appended to the leaf, say) are set apart, never matched.
    """
    try:
        data = read_regular_file(path, CERTIFICATE_FILE_LIMIT, "certificate file")
    except UnsafeFileError as exc:
        raise CertificateFileError(str(exc)) from exc
    leaves: List[CertificateFile] = []
    authorities: List[CertificateFile] = []
    for cert in _parse_all(path, data):
        (authorities if _is_ca(cert) else leaves).append(describe_certificate(cert, path))
    if not leaves:
        raise CertificateFileError(
            f"{path} holds only CA certificates ({len(authorities)}); "
            "list the client's own certificate"
        )
    return CertificateBundle(path, tuple(leaves), tuple(authorities))


def _parse_all(path: str, data: bytes) -> List[x509.Certificate]:
    try:
        if b"-----BEGIN" not in data:
            return [x509.load_der_x509_certificate(data)]
        blocks = _PEM_BLOCK.findall(data)
        if not blocks:
            raise ValueError("no CERTIFICATE block")
        certificates = [x509.load_pem_x509_certificate(block) for block in blocks]
        for cert in certificates:
            # cryptography parses extensions lazily: a malformed one fails here.
            _ = cert.extensions
        return certificates
    except ValueError as exc:
        raise CertificateFileError(f"{path} is not a PEM or DER certificate: {exc}") from exc
    except Exception as exc:
        raise CertificateFileError(f"{path}: cannot read the certificate: {exc}") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return bool(constraints.value.ca)
