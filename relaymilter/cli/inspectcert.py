"""``relaymilter inspect-cert``: what relaymilter sees in certificate files, and what they match."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..core.certfiles import CertificateFile, CertificateFileError, load_certificates
from ..core.certnames import normalize_certificate_name
from ..core.domains import parent_domains
from ..core.model import Config
from .common import EXIT_ERROR, EXIT_OK, config_option, load_or_report, optional_config_path

NAME = "inspect-cert"
HELP = "show what relaymilter sees in certificate files"
_TIME = "%Y-%m-%d %H:%M:%S"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument("certificates", nargs="+", metavar="CERT.pem")


def main(args: argparse.Namespace) -> int:
    path = optional_config_path(args)
    config = load_or_report(path) if path else None
    if path and config is None:
        return EXIT_ERROR
    status = EXIT_OK
    for name in args.certificates:
        try:
            bundle = load_certificates(name)
        except CertificateFileError as exc:
            print(f"relaymilter: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        for number, cert in enumerate(bundle.leaves, 1):
            if len(bundle.leaves) > 1:
                print(f"{cert.path}: certificate {number} of {len(bundle.leaves)}")
            for line in describe(cert, config):
                print(line)
        for authority in bundle.authorities:
            print(f"{bundle.path}: CA certificate {authority.subject} (ignored: not a client's)")
    return status


def describe(cert: CertificateFile, config: Optional[Config]) -> List[str]:
    lines = [
        f"{cert.path}:",
        f"  subject:     {cert.subject}",
        f"  issuer:      {cert.issuer}",
        f"  subject CN:  {cert.subject_cn or '-'}",
        f"  issuer CN:   {cert.issuer_cn or '-'}",
        f"  DNS SANs:    {', '.join(cert.dns_names) or '-'}",
        f"  valid:       {cert.not_before:{_TIME}} to {cert.not_after:{_TIME}} UTC",
        f"  SHA-256:     {cert.sha256}",
        # Postfix's policy service sends it (ccert_pubkey_fingerprint): a renewal
        # with the same key matches the file as this certificate does.
        f"  public key:  SHA-256 {cert.pubkey_sha256}",
    ]
    warnings = []
    problem = cert.validity_problem()
    if problem:
        warnings.append(f"the certificate is {problem}")
    if cert.self_signed:
        warnings.append(
            "self-signed: MTAs do not pass untrusted certificates on, so it never attributes"
        )
    if cert.dns_names:
        warnings.append(
            "MTAs pass only the subject CN to milters: list this file under a connector's "
            "certificates: for its SANs to count"
        )
    if config is not None:
        lines.extend(_connector_matches(cert, config, warnings))
    lines.extend(f"  warning: {w}" for w in warnings)
    return lines


def _connector_matches(cert: CertificateFile, config: Config, warnings: List[str]) -> List[str]:
    lines = []
    for raw in (cert.subject_cn, *cert.dns_names):
        name = normalize_certificate_name(raw)
        if name is None:
            continue
        matches = [
            f"{ref.organization.name}/{ref.connector.name}"
            + (
                ""
                if ref.connector.admits_issuer(cert.issuer_cn)
                else " (but its trusted_issuers exclude this issuer)"
            )
            for _, ref in config.certificate_connectors.lookup(name)
        ]
        lines.append(
            f"  name {name}: " + (", ".join(matches) if matches else "matches no connector")
        )
        if not matches:
            warnings.extend(_registration_hint(name, config))
    return lines


def _registration_hint(name: str, config: Config) -> List[str]:
    """The seed's note: mail.contoso.com is rarely registered; *.contoso.com is the fix."""
    bare = name[2:] if name.startswith("*.") else name
    for organization in config.organizations:
        for parent in parent_domains(bare):
            if organization.accepts(parent):
                return [
                    f"{name} is not registered with any organization; a connector "
                    f"tls_sender_certificate_name: '*.{parent}' in organization "
                    f"{organization.name!r} would match it ({parent} is registered)"
                ]
    return [f"{name} is under no accepted domain of any organization"]
