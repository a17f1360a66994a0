"""The scenario table (exchange-relay-semantics.md section 6), shared by the policy, daemon
and CLI tests so that all three layers are held to the same expectations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

CONFIG = """\
organizations:
  - name: contoso
    accepted_domains:
      - contoso.com
      - {domain: subdomain.contoso.com, match_subdomains: true}
      - bücher.example
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [192.0.2.0/25, "2001:db8:1::/48", 127.0.0.2/32]
      - name: onprem-cert
        tls_sender_certificate_name: "*.contoso.com"
        trusted_issuers: ["Contoso Issuing CA"]
      - name: host-cert
        tls_sender_certificate_name: hostname.subdomain.contoso.com
  - name: fabrikam
    accepted_domains: [fabrikam.com]
    connectors:
      - name: fabrikam-ip
        sender_ip_addresses: [192.0.2.0/24]
      - name: fabrikam-cert
        tls_sender_certificate_name: relay.fabrikam.com
        sender_ip_addresses: [198.51.100.7]
"""
# fabrikam.com must be registered for its exact-name connector to load:
CONFIG = CONFIG.replace(
    "accepted_domains: [fabrikam.com]", "accepted_domains: [fabrikam.com, relay.fabrikam.com]"
)

POSTFIX_CERT = {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Contoso Issuing CA"}
SENDMAIL_CERT = {
    "{cert_subject}": "/CN=mail.contoso.com",
    "{cert_issuer}": "/C=US/O=Contoso/CN=Contoso+20Issuing+20CA",
    "{cn_subject}": "mail.contoso.com",
    "{cn_issuer}": "Contoso+20Issuing+20CA",
    "{verify}": "OK",
}
EXTERNAL = "kate@tailspintoys.com"


@dataclass(frozen=True)
class Scenario:
    id: str
    client: str
    mail_from: str
    #: (recipient, action, reason)
    recipients: Tuple[Tuple[str, str, str], ...]
    macros: Dict[str, str] = field(default_factory=dict)
    organization: Optional[str] = None
    kind: Optional[str] = None

    def explain_args(self) -> List[str]:
        """The same facts as ``relaymilter explain`` arguments."""
        args = ["--client-address", self.client, "--mail-from", self.mail_from]
        options = {
            "{cert_subject}": "--cert-subject",
            "{cert_issuer}": "--cert-issuer",
            "{verify}": "--verify",
            "{cert_fp}": "--cert-fingerprint",
        }
        for macro, option in options.items():
            if macro in self.macros:
                args += [option, self.macros[macro]]
        for recipient, _, _ in self.recipients:
            args += ["--rcpt", recipient]
        return args


def _s(
    id: str, client: str, mail_from: str, rcpts: List[Tuple[str, str, str]], **kw: object
) -> Scenario:
    return Scenario(id, client, mail_from, tuple(rcpts), **kw)  # type: ignore[arg-type]


REJECT = "reject"
CONTINUE = "continue"

SCENARIOS = [
    _s(
        "T1 owned sender via IP",
        "192.0.2.10",
        "<app@contoso.com>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T2 foreign sender via IP",
        "192.0.2.10",
        "<fax@localhost>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T3 null sender via IP",
        "192.0.2.10",
        "<>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T4 null sender via certificate (Postfix)",
        "192.0.2.10",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros=POSTFIX_CERT,
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T4 null sender via certificate (Sendmail)",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros=SENDMAIL_CERT,
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T6 forwarding via IP",
        "192.0.2.10",
        "<john@fabrikam.example>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T6 forwarding via certificate",
        "192.0.2.10",
        "<john@fabrikam.example>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros=POSTFIX_CERT,
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T7 internal recipient, foreign sender",
        "192.0.2.10",
        "<john@fabrikam.example>",
        [("kate@contoso.com", CONTINUE, "internal-recipient")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T7 internal recipient, null sender",
        "192.0.2.10",
        "<>",
        [("postmaster@a.b.subdomain.contoso.com", CONTINUE, "internal-recipient")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T17 mixed recipients",
        "192.0.2.10",
        "<john@fabrikam.example>",
        [("kate@contoso.com", CONTINUE, "internal-recipient"), (EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T16 sender below a match_subdomains domain",
        "192.0.2.10",
        "<u@x.subdomain.contoso.com>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T16 sender below an exact-only domain",
        "192.0.2.10",
        "<u@x.contoso.com>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "case and trailing dot",
        "192.0.2.10",
        "<App@CONTOSO.COM.>",
        [("Kate@TailspinToys.COM", CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "IDNA sender (SMTPUTF8)",
        "192.0.2.10",
        "<jörg@bücher.example>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "IDNA sender as punycode",
        "192.0.2.10",
        "<joerg@xn--bcher-kva.example>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "source route",
        "192.0.2.10",
        "<@relay.example:app@contoso.com>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "address-literal sender",
        "192.0.2.10",
        "<app@[192.0.2.1]>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "IPv6 client",
        "2001:db8:1::25",
        "<>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "IPv4-mapped client",
        "::ffff:192.0.2.10",
        "<app@contoso.com>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "/32 connector",
        "127.0.0.2",
        "<>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "T21 unknown client",
        "127.0.0.3",
        "<app@contoso.com>",
        [(EXTERNAL, CONTINUE, "unattributed")],
    ),
    _s(
        "overlap: sender's organization wins",
        "192.0.2.10",
        "<sales@fabrikam.com>",
        [(EXTERNAL, CONTINUE, "sender-domain")],
        organization="fabrikam",
        kind="ip",
    ),
    _s(
        "overlap: first in file order otherwise",
        "192.0.2.10",
        "<>",
        [("x@fabrikam.com", REJECT, "attr36")],
        organization="contoso",
        kind="ip",
    ),
    _s(
        "outside the overlap",
        "192.0.2.200",
        "<app@contoso.com>",
        [(EXTERNAL, REJECT, "attr36")],
        organization="fabrikam",
        kind="ip",
    ),
    _s(
        "T11 untrusted certificate (Sendmail verify FAIL)",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={**SENDMAIL_CERT, "{verify}": "FAIL"},
    ),
    _s(
        "T11 untrusted certificate, IP path still applies",
        "192.0.2.10",
        "<>",
        [(EXTERNAL, REJECT, "attr36")],
        macros={**SENDMAIL_CERT, "{verify}": "FAIL"},
        organization="contoso",
        kind="ip",
    ),
    _s(
        "DN without verify is not trusted",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={k: v for k, v in SENDMAIL_CERT.items() if k != "{verify}"},
    ),
    _s(
        "issuer not in trusted_issuers",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Other CA"},
    ),
    _s(
        "T13 label boundary",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={"{cert_subject}": "evilcontoso.com", "{cert_issuer}": "Contoso Issuing CA"},
    ),
    _s(
        "T13 suffix trick",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={"{cert_subject}": "contoso.com.evil.net", "{cert_issuer}": "Contoso Issuing CA"},
    ),
    _s(
        "T12 apex",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros={"{cert_subject}": "contoso.com", "{cert_issuer}": "Contoso Issuing CA"},
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T12 deep name",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros={"{cert_subject}": "a.b.contoso.com", "{cert_issuer}": "Contoso Issuing CA"},
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T12 wildcard certificate name",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros={"{cert_subject}": "*.contoso.com", "{cert_issuer}": "Contoso Issuing CA"},
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T8 exact connector registered through match_subdomains",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros={"{cert_subject}": "hostname.subdomain.contoso.com", "{cert_issuer}": "Any CA"},
        organization="contoso",
        kind="certificate",
    ),
    _s(
        "T9 renewed certificate with a new name",
        "203.0.113.5",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={"{cert_subject}": "mail2.example.net", "{cert_issuer}": "Contoso Issuing CA"},
    ),
    _s(
        "certificate connector with an address restriction: right address",
        "198.51.100.7",
        "<>",
        [(EXTERNAL, CONTINUE, "certificate")],
        macros={"{cert_subject}": "relay.fabrikam.com", "{cert_issuer}": "Any CA"},
        organization="fabrikam",
        kind="certificate",
    ),
    _s(
        "certificate connector with an address restriction: wrong address",
        "198.51.100.8",
        "<>",
        [(EXTERNAL, CONTINUE, "unattributed")],
        macros={"{cert_subject}": "relay.fabrikam.com", "{cert_issuer}": "Any CA"},
    ),
    _s(
        "T19 STARTTLS without a client certificate (Sendmail)",
        "192.0.2.10",
        "<>",
        [(EXTERNAL, REJECT, "attr36")],
        macros={"{cert_subject}": "", "{verify}": "NO"},
        organization="contoso",
        kind="ip",
    ),
]
