"""Certificate files: what identifies them, and how a presented certificate finds its file."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives.asymmetric import ec

from relaymilter.core.certfiles import CertificateFile, load_certificates
from relaymilter.core.model import CertificateFileIndex
from relaymilter.core.tlsidentity import (
    PUBKEY_FINGERPRINT,
    PresentedCertificate,
    certificate_from_mapping,
)

from ..support import make_certificate, sendmail_fingerprint


def loaded(path: Path) -> CertificateFile:
    return load_certificates(str(path)).leaves[0]


def presented(
    fingerprint: Optional[str] = None,
    pubkey: Optional[str] = None,
    subject: str = "mail.contoso.com",
    issuer: str = "Contoso Issuing CA",
) -> PresentedCertificate:
    macros = {"{cert_subject}": subject, "{cert_issuer}": issuer}
    if fingerprint:
        macros["{cert_fp}"] = fingerprint
    if pubkey:
        macros[PUBKEY_FINGERPRINT] = pubkey
    found = certificate_from_mapping(macros)
    assert found is not None
    return found


def test_the_public_key_digest_is_what_openssl_computes(tmp_path: Path) -> None:
    # Postfix's ccert_pubkey_fingerprint: the digest of the DER SubjectPublicKeyInfo.
    path = tmp_path / "mail.pem"
    make_certificate(path, "mail.contoso.com")
    key = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-pubkey"],
        capture_output=True,
        check=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "DER"], input=key, capture_output=True, check=True
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-c"], input=der, capture_output=True, check=True
    ).stdout.decode()
    assert loaded(path).pubkey_sha256 == digest.split()[-1].upper()


def test_found_by_its_own_fingerprint(tmp_path: Path) -> None:
    cert = make_certificate(tmp_path / "mail.pem", "mail.contoso.com", sans=["smtp.contoso.com"])
    index = CertificateFileIndex([loaded(tmp_path / "mail.pem")])
    assert [f.dns_names for f in index.find(presented(sendmail_fingerprint(cert)))] == [
        ("smtp.contoso.com",)
    ]


def test_a_renewal_with_the_same_key_is_found_by_its_public_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    make_certificate(tmp_path / "old.pem", "mail.contoso.com", sans=["smtp.contoso.com"], key=key)
    renewed = make_certificate(tmp_path / "new.pem", "mail.contoso.com", key=key)
    old = loaded(tmp_path / "old.pem")
    index = CertificateFileIndex([old])
    # Postfix sends both digests; the renewed certificate's own is not listed.
    found = index.find(presented(sendmail_fingerprint(renewed), old.pubkey_sha256))
    assert found == [old]


def test_with_digests_sent_names_alone_do_not_find_a_file(tmp_path: Path) -> None:
    make_certificate(tmp_path / "listed.pem", "mail.contoso.com", sans=["smtp.contoso.com"])
    other = make_certificate(tmp_path / "other.pem", "mail.contoso.com")  # another key
    index = CertificateFileIndex([loaded(tmp_path / "listed.pem")])
    other_key = loaded(tmp_path / "other.pem").pubkey_sha256
    assert index.find(presented(sendmail_fingerprint(other), other_key)) == []


def test_without_digests_the_names_find_every_matching_file(tmp_path: Path) -> None:
    make_certificate(tmp_path / "a.pem", "mail.contoso.com", sans=["a.contoso.com"])
    make_certificate(tmp_path / "b.pem", "mail.contoso.com", sans=["b.contoso.com"])
    index = CertificateFileIndex([loaded(tmp_path / "a.pem"), loaded(tmp_path / "b.pem")])
    assert len(index.find(presented())) == 2
