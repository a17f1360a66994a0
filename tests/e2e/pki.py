"""A throwaway test PKI built with `cryptography`.

Two certificate authorities, both trusted by the MTAs:
  * "Contoso Issuing CA" - the one the connectors list in ``trusted_issuers``;
  * "Fabrikam Root CA"   - trusted by the MTA but not by the connector;
and a third that no MTA trusts ("Northwind Untrusted CA", in no CA file).

Client certificates (see ``CLIENTS``) cover the certificate scenarios:
a CA-signed ``CN=mail.contoso.com``, a self-signed ``CN=contoso.com``, the same
CN from the second CA and from the untrusted one, and one whose CN does not
match ``*.contoso.com`` but whose SAN does (registered with a connector's
``certificates:`` list), with its renewal (the same key, not registered) and
an impostor (the same CN and issuer, another key).
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
#: Issues a client certificate, but is in no MTA's CA file.
UNTRUSTED_CA = "Northwind Untrusted CA"


@dataclass(frozen=True)
class CertSpec:
    """One client certificate to issue."""

    common_name: str
    issuer: Optional[str]  # None: self-signed
    san: tuple[str, ...] = ()
    #: Another client whose key this certificate reuses (a renewal that kept its key).
    key_of: Optional[str] = None


CLIENTS: dict[str, CertSpec] = {
    # CA-signed, CN matches "*.contoso.com".
    "mail": CertSpec("mail.contoso.com", CONTOSO_CA, ("mail.contoso.com",)),
    # Self-signed: presented but never trusted by either MTA.
    "selfsigned": CertSpec("contoso.com", None, ("contoso.com",)),
    # Trusted by the MTA, but its issuer is not in the connector's trusted_issuers.
    "otherissuer": CertSpec("mail.contoso.com", FABRIKAM_CA, ("mail.contoso.com",)),
    # Only the SAN matches: the CN is an internal host name.
    "san": CertSpec("relay01.corp.example", CONTOSO_CA, ("smtp.contoso.com",)),
    # From a CA that is in no MTA's CA file: presented, never verified.
    "untrustedca": CertSpec("mail.contoso.com", UNTRUSTED_CA, ("mail.contoso.com",)),
    # "san" renewed with the same key: not registered, and without smtp.contoso.com.
    "san-renewed": CertSpec(
        "relay01.corp.example", CONTOSO_CA, ("relay01.corp.example",), key_of="san"
    ),
    # The same subject and issuer CNs as "san", another key, no matching SAN.
    "san-impostor": CertSpec("relay01.corp.example", CONTOSO_CA, ("relay01.corp.example",)),
}


@dataclass
class Credential:
    cert: Path
    key: Path
    sha256: str  # "AB:CD:..." like Sendmail's {cert_fp}
    subject_cn: str
    issuer_cn: str
    #: Digests of the certificate and of its public key (DER SubjectPublicKeyInfo),
    #: by algorithm ("sha256", "md5"), written as sha256 is.
    fingerprints: dict[str, str] = field(default_factory=dict)
    pubkey_fingerprints: dict[str, str] = field(default_factory=dict)


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
    key: Optional[rsa.RSAPrivateKey] = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = key or _key()
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
    public_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Credential(
        cert=cert_path,
        key=key_path,
        sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        subject_cn=_cn(cert.subject),
        issuer_cn=_cn(cert.issuer),
        fingerprints={name: cert.fingerprint(a()).hex(":").upper() for name, a in _DIGESTS},
        pubkey_fingerprints={name: _digest(a, public_key) for name, a in _DIGESTS},
    )


_DIGESTS = (("sha256", hashes.SHA256), ("md5", hashes.MD5))


def _digest(algorithm: type[hashes.HashAlgorithm], data: bytes) -> str:
    digest = hashes.Hash(algorithm())
    digest.update(data)
    return digest.finalize().hex(":").upper()


def build_pki(directory: Path) -> Pki:
    """Generate every key and certificate into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cas = {name: _make_ca(name) for name in (CONTOSO_CA, FABRIKAM_CA, UNTRUSTED_CA)}
    ca_files: dict[str, Path] = {}
    for name, (cert, _) in cas.items():
        if name == UNTRUSTED_CA:
            continue  # in no CA file
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
    keys: dict[str, rsa.RSAPrivateKey] = {}
    for stem, spec in CLIENTS.items():
        ca = None if spec.issuer is None else cas[spec.issuer]
        sans: list[x509.GeneralName] = [x509.DNSName(s) for s in spec.san]
        reused = keys[spec.key_of] if spec.key_of else None
        cert, key = _make_leaf(spec.common_name, sans, ca, reused)
        keys[stem] = key
        pki.clients[stem] = _write(directory, stem, cert, key)
    return pki
