"""The LDAP source against a real, throwaway slapd (tests/ldapserver.py): no mocks."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import ldap
import pytest
from ldap.controls import SimplePagedResultsControl

from relaymilter.core.sourcesettings import (
    AD_ACCEPTED_DOMAIN_ATTRIBUTE,
    AD_ACCEPTED_DOMAIN_FILTER,
    AD_ACCEPTED_DOMAIN_FLAGS_ATTRIBUTE,
    PRESET_ACTIVE_DIRECTORY,
    LdapConnectorMapping,
    LdapDomainMapping,
    LdapSource,
)
from relaymilter.sync.sources import SourceError, SourceResult
from relaymilter.sync.sources.ldap import fetch

from ..ldapserver import (
    ACCEPTED_DOMAINS_DN,
    CONFIGURATION_DN,
    READER_DN,
    READER_PASSWORD,
    SIZE_LIMIT,
    SUFFIX,
    Slapd,
    add_accepted_domains,
    add_entries,
)

TENANTS = f"ou=tenants,{SUFFIX}"
PAGING = f"ou=paging,{SUFFIX}"
BROKEN = f"ou=broken,{SUFFIX}"
PAGED_ENTRIES = 120


@pytest.fixture(scope="module")
def server() -> Iterator[Slapd]:
    slapd = Slapd()
    try:
        slapd.start()
        _populate(slapd)
        yield slapd
    finally:
        slapd.stop()


def _populate(slapd: Slapd) -> None:
    add_accepted_domains(slapd, ["contoso.com", "*.contoso.net", "mail.contoso.org"])
    units = [
        (dn, {"objectClass": ["organizationalUnit"], "ou": [dn.split(",")[0][3:]]})
        for dn in (TENANTS, PAGING, BROKEN)
    ]
    add_entries(slapd, units)
    add_entries(slapd, _tenants() + _broken())
    add_accepted_domains(slapd, [f"d{i:03}.example" for i in range(PAGED_ENTRIES)], PAGING)


def _tenants() -> List[Any]:
    """A custom layout: a tenant is an organization with its domains, its connectors below it."""
    fabrikam, tailspin = f"o=Fabrikam,{TENANTS}", f"o=Tailspin,{TENANTS}"
    tenant = ["organization", "domainRelatedObject"]
    return [
        (
            fabrikam,
            {
                "objectClass": tenant,
                "o": ["Fabrikam"],
                "associatedDomain": ["fabrikam.com", "*.fabrikam.net"],
            },
        ),
        (
            tailspin,
            {"objectClass": tenant, "o": ["Tailspin"], "associatedDomain": ["tailspin.example"]},
        ),
        (
            f"cn=outbound,{fabrikam}",
            {
                "objectClass": ["exampleRelayConnector"],
                "cn": ["outbound"],
                "o": ["Fabrikam"],
                "exampleSenderIPAddress": ["192.0.2.10", "198.51.100.0/24"],
            },
        ),
        (
            f"cn=by-certificate,{fabrikam}",
            {
                "objectClass": ["exampleRelayConnector"],
                "cn": ["by-certificate"],
                "o": ["Fabrikam"],
                "exampleTlsCertificateName": ["relay.fabrikam.com"],
                "exampleTrustedIssuer": ["CN=Fabrikam Issuing CA", "CN=Fabrikam Root CA"],
            },
        ),
        (
            f"cn=outbound,{tailspin}",
            {
                "objectClass": ["exampleRelayConnector"],
                "cn": ["outbound"],
                "o": ["Tailspin"],
                "exampleSenderIPAddress": ["203.0.113.5"],
            },
        ),
    ]


def _broken() -> List[Any]:
    """Unusable entries, each in a subtree of its own."""
    subtrees = ["no-domain", "two-organizations", "not-utf8", "unvalidated"]
    entries: List[Any] = [
        (f"ou={name},{BROKEN}", {"objectClass": ["organizationalUnit"], "ou": [name]})
        for name in subtrees
    ]
    entries += [
        (
            f"cn=nameless,ou=no-domain,{BROKEN}",
            {"objectClass": ["msExchAcceptedDomain"], "cn": ["nameless"]},
        ),
        (
            f"cn=shared,ou=two-organizations,{BROKEN}",
            {
                "objectClass": ["exampleRelayConnector"],
                "cn": ["shared"],
                "o": ["Fabrikam", "Tailspin"],
            },
        ),
        (
            f"cn=raw,ou=not-utf8,{BROKEN}",
            {
                "objectClass": ["exampleRelayConnector"],
                "cn": ["raw"],
                "o": ["Fabrikam"],
                "exampleRawName": [b"caf\xe9"],
            },
        ),
        (
            f"cn=odd,ou=unvalidated,{BROKEN}",
            {
                "objectClass": ["exampleRelayConnector"],
                "cn": ["odd"],
                "o": ["X"],
                "exampleSenderIPAddress": ["not an address"],
            },
        ),
    ]
    return entries


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ldap") / "password"
    path.write_text(READER_PASSWORD + "\n", encoding="utf-8")
    return str(path)


def ad_source(server: Slapd, password_file: Optional[str], **changes: Any) -> LdapSource:
    """The active-directory preset as the config reader builds it."""
    source = LdapSource(
        name="ad",
        uris=(server.ldap_uri,),
        base=None,
        bind_dn=READER_DN,
        password_file=password_file,
        starttls=False,
        ca_file=None,
        timeout=5.0,
        page_size=500,
        accepted_domains=LdapDomainMapping(
            filter=AD_ACCEPTED_DOMAIN_FILTER,
            domain_attribute=AD_ACCEPTED_DOMAIN_ATTRIBUTE,
            flags_attribute=AD_ACCEPTED_DOMAIN_FLAGS_ATTRIBUTE,
            organization="Contoso",
        ),
        connectors=None,
        preset=PRESET_ACTIVE_DIRECTORY,
    )
    return dataclasses.replace(source, **changes)


def tenants_source(server: Slapd, password_file: Optional[str], **changes: Any) -> LdapSource:
    # Attribute names in a casing of their own: LDAP's are case-insensitive.
    source = ad_source(
        server,
        password_file,
        name="tenants",
        base=TENANTS,
        preset=None,
        accepted_domains=LdapDomainMapping(
            filter="(objectClass=domainRelatedObject)",
            domain_attribute="ASSOCIATEDDOMAIN",
            organization_attribute="O",
        ),
        connectors=LdapConnectorMapping(
            filter="(objectClass=exampleRelayConnector)",
            name_attribute="CN",
            organization_attribute="o",
            sender_ip_addresses_attribute="examplesenderipaddress",
            tls_sender_certificate_name_attribute="exampleTlsCertificateName",
            trusted_issuers_attribute="exampleTrustedIssuer",
        ),
    )
    return dataclasses.replace(source, **changes)


def fetch_error(source: LdapSource) -> str:
    with pytest.raises(SourceError) as caught:
        fetch(source)
    return str(caught.value)


def domains(result: SourceResult) -> Dict[str, List[Any]]:
    return {o.name: [item.value for item in o.accepted_domains] for o in result.organizations}


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, so nothing else takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- reading ------------------------------------------------------------------


def test_active_directory_preset(server: Slapd, password_file: str) -> None:
    result = fetch(ad_source(server, password_file))
    assert domains(result) == {
        "Contoso": [
            "contoso.com",
            {"domain": "contoso.net", "match_subdomains": True},
            "mail.contoso.org",
        ]
    }
    contoso = result.organizations[0]
    # slapd writes attribute types in the schema's casing: cn=, dc=.
    parent = ACCEPTED_DOMAINS_DN.replace("CN=", "cn=").replace("DC=", "dc=")
    assert [item.origin for item in contoso.accepted_domains] == [
        f"ldap 'ad': cn=contoso.com,{parent}",
        f"ldap 'ad': cn=*.contoso.net,{parent}",
        f"ldap 'ad': cn=mail.contoso.org,{parent}",
    ]
    assert contoso.connectors == []
    assert result.records == 3
    assert result.detail == f"{server.ldap_uri}, base {CONFIGURATION_DN}"


def test_a_directory_without_configuration_partition_needs_a_base(server: Slapd) -> None:
    # Anonymous: the test server shows configurationNamingContext to bound users only.
    message = fetch_error(ad_source(server, None, bind_dn=None))
    assert message == (
        f"ldap source 'ad': {server.ldap_uri} has no configurationNamingContext in its "
        "RootDSE, so it is not Active Directory: set the source's base"
    )
    result = fetch(ad_source(server, None, bind_dn=None, base=CONFIGURATION_DN))
    assert result.records == 3


def test_generic_mapping_with_domains_and_connectors(server: Slapd, password_file: str) -> None:
    result = fetch(tenants_source(server, password_file))
    assert domains(result) == {
        "Fabrikam": ["fabrikam.com", {"domain": "fabrikam.net", "match_subdomains": True}],
        "Tailspin": ["tailspin.example"],
    }
    connectors = {o.name: [item.value for item in o.connectors] for o in result.organizations}
    assert connectors == {
        "Fabrikam": [
            {"name": "outbound", "sender_ip_addresses": ["192.0.2.10", "198.51.100.0/24"]},
            {
                "name": "by-certificate",
                "tls_sender_certificate_name": "relay.fabrikam.com",
                "trusted_issuers": ["CN=Fabrikam Issuing CA", "CN=Fabrikam Root CA"],
            },
        ],
        "Tailspin": [{"name": "outbound", "sender_ip_addresses": ["203.0.113.5"]}],
    }
    fabrikam = result.organizations[0]
    assert fabrikam.origin == f"ldap 'tenants': o=Fabrikam,{TENANTS}"
    assert fabrikam.connectors[0].origin == f"ldap 'tenants': cn=outbound,o=Fabrikam,{TENANTS}"
    assert result.records == 5
    assert result.detail == f"{server.ldap_uri}, base {TENANTS}"


def test_a_mapping_searches_its_own_base(server: Slapd, password_file: str) -> None:
    mapping = LdapDomainMapping(
        filter=AD_ACCEPTED_DOMAIN_FILTER,
        domain_attribute=AD_ACCEPTED_DOMAIN_ATTRIBUTE,
        organization="Contoso",
        base=ACCEPTED_DOMAINS_DN,
    )
    result = fetch(tenants_source(server, password_file, accepted_domains=mapping, connectors=None))
    assert domains(result) == {
        "Contoso": [
            "contoso.com",
            {"domain": "contoso.net", "match_subdomains": True},
            "mail.contoso.org",
        ]
    }


def test_mappings_with_bases_of_their_own(server: Slapd) -> None:
    # No source base and no preset: the RootDSE (which anonymous cannot see here) is not read.
    source = tenants_source(server, None, bind_dn=None, base=None)
    domain_mapping = dataclasses.replace(source.accepted_domains, base=f"o=Tailspin,{TENANTS}")
    connector_mapping = dataclasses.replace(source.connectors, base=TENANTS)
    source = dataclasses.replace(
        source, accepted_domains=domain_mapping, connectors=connector_mapping
    )
    result = fetch(source)
    assert domains(result) == {"Tailspin": ["tailspin.example"], "Fabrikam": []}
    assert result.records == 4
    assert result.detail == f"{server.ldap_uri}, base o=Tailspin,{TENANTS}, {TENANTS}"


def test_paging_returns_more_entries_than_the_size_limit(server: Slapd, password_file: str) -> None:
    # Unpaged, the server stops at its limit: what paging is for.
    connection = ldap.initialize(server.ldap_uri)
    connection.simple_bind_s(READER_DN, READER_PASSWORD)
    with pytest.raises(ldap.SIZELIMIT_EXCEEDED):
        connection.search_s(PAGING, ldap.SCOPE_SUBTREE, AD_ACCEPTED_DOMAIN_FILTER, ["cn"])
    connection.unbind_s()
    for page_size in (SIZE_LIMIT - 10, SIZE_LIMIT, 1000):
        source = ad_source(server, password_file, base=PAGING, page_size=page_size)
        result = fetch(source)
        assert sorted(domains(result)["Contoso"]) == [
            f"d{i:03}.example" for i in range(PAGED_ENTRIES)
        ]
        assert result.records == PAGED_ENTRIES


def test_the_harness_serves_the_reader_pages(server: Slapd) -> None:
    # The harness's premise: the rootdn has no size limit, the reader a paged one.
    connection = ldap.initialize(server.ldap_uri)
    connection.simple_bind_s(READER_DN, READER_PASSWORD)
    control = SimplePagedResultsControl(True, size=SIZE_LIMIT, cookie=b"")
    message = connection.search_ext(
        PAGING, ldap.SCOPE_SUBTREE, AD_ACCEPTED_DOMAIN_FILTER, ["cn"], serverctrls=[control]
    )
    _type, data, _id, controls = connection.result3(message)
    assert len(data) == SIZE_LIMIT
    assert controls[0].cookie
    connection.unbind_s()


# -- servers, TLS and credentials --------------------------------------------


def test_failover_to_the_next_uri(server: Slapd, password_file: str, closed_port: int) -> None:
    uris = (f"ldap://127.0.0.1:{closed_port}", server.ldap_uri)
    result = fetch(ad_source(server, password_file, uris=uris))
    assert result.records == 3
    assert result.detail == f"{server.ldap_uri}, base {CONFIGURATION_DN}"


def test_no_server_answers(server: Slapd, password_file: str, closed_port: int) -> None:
    down = f"ldap://127.0.0.1:{closed_port}"
    message = fetch_error(
        ad_source(server, password_file, uris=(down, f"ldaps://127.0.0.1:{closed_port}"))
    )
    assert message.startswith(
        f"ldap source 'ad': no server answered: {down}: Can't contact LDAP server"
    )
    assert f"; ldaps://127.0.0.1:{closed_port}: Can't contact LDAP server" in message


#: The StartTLS extended response: messageID 1, success.
STARTTLS_RESPONSE = bytes.fromhex("3024020101781f0a0100040004008a16") + b"1.3.6.1.4.1.1466.20037"


@contextlib.contextmanager
def stalling_server(answer_starttls: bool) -> Iterator[int]:
    """A loopback port that accepts connections, then never answers (after StartTLS if told)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: List[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                held.append(connection)
                if answer_starttls:
                    connection.recv(1024)
                    connection.sendall(STARTTLS_RESPONSE)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        # shutdown() wakes the accept() that close() alone would leave waiting.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()
        for connection in held:
            connection.close()


@pytest.mark.parametrize(
    ("scheme", "starttls", "answer_starttls", "reason"),
    [
        ("ldap", False, False, "no answer within 0.5 s"),
        ("ldaps", False, False, "no TLS handshake within 0.5 s"),
        ("ldap", True, False, "no TLS handshake within 0.5 s"),
        ("ldap", True, True, "no TLS handshake within 0.5 s"),
    ],
    ids=["ldap", "ldaps", "starttls-unanswered", "starttls-then-silence"],
)
def test_a_server_that_does_not_answer_times_out(
    server: Slapd,
    password_file: str,
    scheme: str,
    starttls: bool,
    answer_starttls: bool,
    reason: str,
) -> None:
    # libldap with GnuTLS would spin for ever in a stalled handshake: the source must not.
    with stalling_server(answer_starttls) as port:
        uri = f"{scheme}://127.0.0.1:{port}"
        started = time.monotonic()
        source = ad_source(server, password_file, uris=(uri,), starttls=starttls, timeout=0.5)
        message = fetch_error(source)
    assert time.monotonic() - started < 5
    assert message == f"ldap source 'ad': no server answered: {uri}: {reason}"


def test_failover_past_a_stalled_server(server: Slapd, password_file: str) -> None:
    with stalling_server(answer_starttls=False) as port:
        uris = (f"ldaps://127.0.0.1:{port}", server.ldaps_uri)
        source = ad_source(server, password_file, uris=uris, ca_file=server.ca_file, timeout=0.5)
        assert fetch(source).detail.startswith(server.ldaps_uri)


@pytest.mark.parametrize("starttls", [False, True], ids=["ldaps", "starttls"])
def test_tls_with_ca_file(server: Slapd, password_file: str, starttls: bool) -> None:
    uri = server.ldap_uri if starttls else server.ldaps_uri
    source = ad_source(
        server, password_file, uris=(uri,), starttls=starttls, ca_file=server.ca_file
    )
    assert fetch(source).records == 3


@pytest.mark.parametrize("starttls", [False, True], ids=["ldaps", "starttls"])
def test_a_certificate_from_another_ca_is_refused(
    server: Slapd, password_file: str, starttls: bool
) -> None:
    uri = server.ldap_uri if starttls else server.ldaps_uri
    source = ad_source(
        server, password_file, uris=(uri,), starttls=starttls, ca_file=server.other_ca_file
    )
    message = fetch_error(source)
    assert message.startswith(f"ldap source 'ad': no server answered: {uri}: ")
    assert "certificate verify failed" in message


def test_wrong_password(server: Slapd, tmp_path: Path) -> None:
    wrong = tmp_path / "password"
    wrong.write_text("not the password\n", encoding="utf-8")
    message = fetch_error(ad_source(server, str(wrong)))
    assert (
        message == f"ldap source 'ad': no server answered: {server.ldap_uri}: Invalid credentials"
    )
    assert "not the password" not in message


def test_missing_password_file(server: Slapd, tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    message = fetch_error(ad_source(server, str(missing)))
    assert message.startswith("ldap source 'ad': ")
    assert str(missing) in message


def test_without_python_ldap(server: Slapd, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as if python-ldap were not installed.
    monkeypatch.setitem(sys.modules, "ldap", None)
    message = fetch_error(ad_source(server, None, bind_dn=None))
    assert "install python3-ldap (EL: python3-ldap)" in message


def test_a_bad_filter_names_source_uri_and_reason(server: Slapd, password_file: str) -> None:
    mapping = LdapDomainMapping(
        filter="(objectClass=", domain_attribute="cn", organization="Contoso"
    )
    message = fetch_error(
        tenants_source(server, password_file, accepted_domains=mapping, connectors=None)
    )
    assert (
        message
        == f"ldap source 'tenants': {server.ldap_uri}: searching '{TENANTS}' for (objectClass=: Bad search filter"
    )


def test_a_missing_base_names_the_base(server: Slapd, password_file: str) -> None:
    message = fetch_error(ad_source(server, password_file, base=f"ou=absent,{SUFFIX}"))
    assert message.startswith(
        f"ldap source 'ad': {server.ldap_uri}: searching 'ou=absent,{SUFFIX}' for {AD_ACCEPTED_DOMAIN_FILTER}: No such object"
    )


# -- unusable entries ---------------------------------------------------------


def test_an_entry_without_the_domain_attribute(server: Slapd, password_file: str) -> None:
    source = ad_source(server, password_file, base=f"ou=no-domain,{BROKEN}")
    message = fetch_error(source)
    assert (
        message
        == f"ldap source 'ad': cn=nameless,ou=no-domain,{BROKEN}: no msExchAcceptedDomainName"
    )


def _broken_connectors(
    server: Slapd, password_file: str, subtree: str, **mapping_changes: Any
) -> LdapSource:
    mapping = LdapConnectorMapping(
        filter="(objectClass=exampleRelayConnector)",
        name_attribute="cn",
        organization_attribute="o",
    )
    mapping = dataclasses.replace(mapping, **mapping_changes)
    return tenants_source(
        server,
        password_file,
        base=f"ou={subtree},{BROKEN}",
        accepted_domains=None,
        connectors=mapping,
    )


def test_an_entry_with_two_organizations(server: Slapd, password_file: str) -> None:
    message = fetch_error(_broken_connectors(server, password_file, "two-organizations"))
    assert (
        message
        == f"ldap source 'tenants': cn=shared,ou=two-organizations,{BROKEN}: o has 2 values, one is expected"
    )


def test_an_entry_without_the_organization_attribute(server: Slapd, password_file: str) -> None:
    domains_only = "(objectClass=msExchAcceptedDomain)"
    message = fetch_error(
        _broken_connectors(server, password_file, "no-domain", filter=domains_only)
    )
    assert message == f"ldap source 'tenants': cn=nameless,ou=no-domain,{BROKEN}: no o"


def test_a_value_that_is_not_utf8(server: Slapd, password_file: str) -> None:
    message = fetch_error(
        _broken_connectors(server, password_file, "not-utf8", name_attribute="exampleRawName")
    )
    assert (
        message
        == f"ldap source 'tenants': cn=raw,ou=not-utf8,{BROKEN}: exampleRawName is not UTF-8"
    )


def test_values_are_passed_through_unvalidated(server: Slapd, password_file: str) -> None:
    # The sync validates items as it validates the YAML, naming their origin.
    addresses = "exampleSenderIPAddress"
    source = _broken_connectors(
        server, password_file, "unvalidated", sender_ip_addresses_attribute=addresses
    )
    result = fetch(source)
    assert [item.value for item in result.organizations[0].connectors] == [
        {"name": "odd", "sender_ip_addresses": ["not an address"]}
    ]
