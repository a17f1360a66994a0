"""A throwaway test PKI built with `cryptography`.

Two certificate authorities, both trusted by the MTAs:
  * "Contoso Issuing CA" - the one the connectors list in ``trusted_issuers``;
  * "Fabrikam Root CA"   - trusted by the MTA but not by the connector.

Client certificates (see ``CLIENTS``) cover the certificate scenarios:
a CA-signed ``CN=mail.contoso.com``, a self-signed ``CN=contoso.com``, the same
CN from the second CA, and one whose CN does not match ``*.contoso.com`` but
whose SAN does (registered with a connector's ``certificates:`` list).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CONTOSO_CA = "Contoso Issuing CA"
FABRIKAM_CA = "Fabrikam Root CA"


@dataclass(frozen=True)
class CertSpec:
    """One client certificate to issue."""

    common_name: str
    issuer: Optional[str]  # None: self-signed
    san: tuple[str, ...] = ()


CLIENTS: dict[str, CertSpec] = {
    # CA-signed, CN matches "*.contoso.com".
    "mail": CertSpec("mail.contoso.com", CONTOSO_CA, ("mail.contoso.com",)),
    # Self-signed: presented but never trusted by either MTA.
    "selfsigned": CertSpec("contoso.com", None, ("contoso.com",)),
    # Trusted by the MTA, but its issuer is not in the connector's trusted_issuers.
    "otherissuer": CertSpec("mail.contoso.com", FABRIKAM_CA, ("mail.contoso.com",)),
    # Only the SAN matches: the CN is an internal host name.
    "san": CertSpec("relay01.corp.example", CONTOSO_CA, ("smtp.contoso.com",)),
}


@dataclass
class Credential:
    cert: Path
    key: Path
    sha256: str  # "AB:CD:..." like Sendmail's {cert_fp}
    subject_cn: str
    issuer_cn: str


@dataclass
class Pki:
    """Paths of the generated files."""

    directory: Path
    ca_bundle: Path  # both CAs: what the MTAs trust
    ca_files: dict[str, Path]
    server: Credential
    clients: dict[str, Credential] = field(default_factory=dict)


def _key() -> rsa.RSAPrivateKey:
    # RSA 2048: what every OpenSSL/Sendmail build accepts for a server key.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: str, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


def _make_ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    cert = (
        _builder(cn, cn, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    cn: str,
    sans: list[x509.GeneralName],
    ca: Optional[tuple[x509.Certificate, rsa.RSAPrivateKey]],
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    issuer_cn = cn if ca is None else _cn(ca[0].subject)
    builder = (
        _builder(cn, issuer_cn, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False
        )
    signer = key if ca is None else ca[1]
    return builder.sign(signer, hashes.SHA256()), key


def _cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey
) -> Credential:
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    # Sendmail silently drops STARTTLS when a key file is group/world readable.
    os.chmod(key_path, 0o600)
    return Credential(
        cert=cert_path,
        key=key_path,
        sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        subject_cn=_cn(cert.subject),
        issuer_cn=_cn(cert.issuer),
    )


def build_pki(directory: Path) -> Pki:
    """Generate every key and certificate into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cas = {name: _make_ca(name) for name in (CONTOSO_CA, FABRIKAM_CA)}
    ca_files: dict[str, Path] = {}
    for name, (cert, _) in cas.items():
        path = directory / (name.lower().replace(" ", "-") + ".pem")
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ca_files[name] = path
    bundle = directory / "trusted-cas.pem"
    bundle.write_bytes(b"".join(p.read_bytes() for p in ca_files.values()))

    server_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = _write(directory, "server", *_make_leaf("localhost", server_sans, cas[CONTOSO_CA]))
    pki = Pki(directory=directory, ca_bundle=bundle, ca_files=ca_files, server=server)
    for stem, spec in CLIENTS.items():
        ca = None if spec.issuer is None else cas[spec.issuer]
        sans: list[x509.GeneralName] = [x509.DNSName(s) for s in spec.san]
        pki.clients[stem] = _write(directory, stem, *_make_leaf(spec.common_name, sans, ca))
    return pki
