"""Every mapping of the configuration and the keys it may have: declared here, once.

The readers check each mapping against its entry (unknown, duplicate and
missing keys are errors), and ``tests/config/test_keys.py`` holds this table
against relaymilter.yml(5) in both directions: a key the code takes is
documented, and a documented key is taken.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple


class Keys(NamedTuple):
    """The keys one mapping may have, in the order messages list them."""

    allowed: Tuple[str, ...]
    required: Tuple[str, ...] = ()
    #: Required only in a config without a ``sources:`` section (the sources may supply them).
    required_without_sources: Tuple[str, ...] = ()


ROOT = Keys(
    (
        "socket",
        "mode",
        "on_error",
        "reject",
        "organizations",
        "metrics",
        "policy_service",
        "sources",
    ),
    required_without_sources=("organizations",),
)
REJECT = Keys(("code", "status", "text"))
METRICS = Keys(("listen", "textfile"))
#: The Postfix policy service's own socket and metrics (``relaymilter policy``).
POLICY_SERVICE = Keys(("socket", "metrics"))
ORGANIZATION = Keys(
    ("name", "accepted_domains", "connectors", "mode"),
    required=("name",),
    required_without_sources=("accepted_domains", "connectors"),
)
#: An accepted domain written as a mapping (a plain string is the domain alone).
ACCEPTED_DOMAIN = Keys(("domain", "match_subdomains"), required=("domain",))
CONNECTOR = Keys(
    (
        "name",
        "sender_ip_addresses",
        "tls_sender_certificate_name",
        "trusted_issuers",
        "certificates",
        "mode",
    ),
    required=("name",),
)
SOURCES = Keys(
    (
        "snapshot",
        "status",
        "max_snapshot_age",
        "max_removed_domains",
        "files",
        "ldap",
        "postgresql",
    )
)
FILES_SOURCE = Keys(("name", "directory", "pattern"), required=("name", "directory"))
LDAP_SOURCE = Keys(
    (
        "name",
        "preset",
        "organization",
        "uris",
        "base",
        "bind_dn",
        "password_file",
        "starttls",
        "ca_file",
        "timeout",
        "page_size",
        "accepted_domains",
        "connectors",
    ),
    required=("name", "uris"),
)
LDAP_DOMAIN_MAPPING = Keys(
    ("filter", "base", "domain_attribute", "organization_attribute"),
    required=("filter", "domain_attribute"),
)
LDAP_CONNECTOR_MAPPING = Keys(
    (
        "filter",
        "base",
        "name_attribute",
        "organization_attribute",
        "sender_ip_addresses_attribute",
        "tls_sender_certificate_name_attribute",
        "trusted_issuers_attribute",
    ),
    required=("filter", "name_attribute"),
)
POSTGRESQL_SOURCE = Keys(
    (
        "name",
        "conninfo",
        "password_file",
        "timeout",
        "accepted_domains_query",
        "connectors_query",
    ),
    required=("name", "conninfo"),
)
#: The snapshot file that ``relaymilter sync`` writes (not written by hand).
SNAPSHOT = Keys(("organizations",), required=("organizations",))

#: Every mapping of the config file, by where it stands (``[]``: each item of a list).
MAPPINGS: Dict[str, Keys] = {
    "": ROOT,
    "reject": REJECT,
    "metrics": METRICS,
    "policy_service": POLICY_SERVICE,
    "policy_service.metrics": METRICS,
    "organizations[]": ORGANIZATION,
    "organizations[].accepted_domains[]": ACCEPTED_DOMAIN,
    "organizations[].connectors[]": CONNECTOR,
    "sources": SOURCES,
    "sources.files[]": FILES_SOURCE,
    "sources.ldap[]": LDAP_SOURCE,
    "sources.ldap[].accepted_domains": LDAP_DOMAIN_MAPPING,
    "sources.ldap[].connectors": LDAP_CONNECTOR_MAPPING,
    "sources.postgresql[]": POSTGRESQL_SOURCE,
}
