"""relaymilter configurations used by the scenarios (the public YAML schema)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .pki import CONTOSO_CA, Pki

REJECT_TEXT = (
    "Relay Access Denied ATTR36. For more details please refer to "
    "https://support.microsoft.com/kb/3169958."
)


def standard(pki: Pki, mode: str = "enforce") -> dict[str, Any]:
    """Contoso: relays from 127.0.0.1 and 127.0.0.2 by IP, or by certificate.

    127.0.0.3 belongs to no connector. The IP connector also covers the
    certificate scenarios' client (127.0.0.1), so a certificate that is *not*
    honoured shows up as an IP attribution (foreign sender refused) rather than
    as no attribution at all.
    """
    return {
        "mode": mode,
        "on_error": "tempfail",
        "organizations": [
            {
                "name": "contoso",
                "accepted_domains": ["contoso.com"],
                "connectors": [
                    {"name": "onprem-ip", "sender_ip_addresses": ["127.0.0.1/32"]},
                    {"name": "branch-ip", "sender_ip_addresses": ["127.0.0.2/32"]},
                    {
                        "name": "onprem-cert",
                        "tls_sender_certificate_name": "*.contoso.com",
                        "trusted_issuers": [CONTOSO_CA],
                        # CN=relay01.corp.example: only its SAN smtp.contoso.com matches.
                        "certificates": [str(pki.clients["san"].cert)],
                    },
                ],
            }
        ],
    }


def with_contoso_subdomains(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with contoso.com accepted with every name below it.

    The MTAs' own name relay.contoso.com is then an accepted domain, as in the
    issue's report: routing forms such as kate%tailspintoys.com@relay.contoso.com
    name it, and must still count as external.
    """
    changed = copy.deepcopy(config)
    domains = changed["organizations"][0]["accepted_domains"]
    domains[domains.index("contoso.com")] = {"domain": "contoso.com", "match_subdomains": True}
    return changed


def with_fabrikam_accepted(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with fabrikam.com added to contoso's accepted domains."""
    changed = copy.deepcopy(config)
    changed["organizations"][0]["accepted_domains"].append("fabrikam.com")
    return changed


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


# Valid YAML, invalid relaymilter config: a reload must refuse it.
BROKEN = """\
mode: enforce
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [not-an-address]
"""
