"""Normalisation and matching: tables, and hypothesis properties against brute-force definitions."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymilter.base.socketspec import SocketSpecError, parse_socket_spec
from relaymilter.core.certnames import (
    CertificateNameIndex,
    CertificatePattern,
    PatternError,
    normalize_certificate_name,
    parse_pattern,
)
from relaymilter.core.domains import normalize_domain, parse_envelope_address
from relaymilter.core.model import AcceptedDomain, Organization
from relaymilter.core.networks import NetworkTable, parse_client_address

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-") and not s.endswith("-")
)
domain = st.lists(label, min_size=1, max_size=5).map(".".join)
unicode_label = st.text(alphabet="abcäöüßéñ中文", min_size=1, max_size=8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Contoso.COM", "contoso.com"),
        ("contoso.com.", "contoso.com"),
        ("contoso.com..", None),
        ("bücher.example", "xn--bcher-kva.example"),
        ("straße.de", "xn--strae-oqa.de"),  # IDNA 2008: not "strasse.de" as in IDNA 2003
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("\uff23\uff2f\uff2e\uff34\uff2f\uff33\uff2f.com", "contoso.com"),  # full-width
        ("[192.0.2.1]", None),
        ("", None),
        ("a..b", None),
        ("x" * 64 + ".com", None),
    ],
)
def test_normalize_domain(text: str, expected: str | None) -> None:
    assert normalize_domain(text) == expected


@pytest.mark.parametrize(
    ("text", "address", "domain"),
    [
        ("<>", "", None),
        ("", "", None),
        ("<user@Contoso.com>", "user@Contoso.com", "contoso.com"),
        ("user@contoso.com", "user@contoso.com", "contoso.com"),
        ("<@a.example,@b.example:user@contoso.com>", "user@contoso.com", "contoso.com"),
        ('<"odd@local"@contoso.com>', '"odd@local"@contoso.com', "contoso.com"),
        ("<postmaster>", "postmaster", None),
        ("<u@[192.0.2.1]>", "u@[192.0.2.1]", None),
        ("<jörg@bücher.example>", "jörg@bücher.example", "xn--bcher-kva.example"),
    ],
)
def test_parse_envelope_address(text: str, address: str, domain: str | None) -> None:
    parsed = parse_envelope_address(text)
    assert (parsed.address, parsed.domain) == (address, domain)


@given(domain)
def test_normalisation_ignores_case_and_one_trailing_dot(name: str) -> None:
    assert normalize_domain(name.upper() + ".") == normalize_domain(name) == name


@given(st.lists(unicode_label, min_size=1, max_size=3).map(".".join))
def test_normalisation_is_idempotent_and_matches_punycode(name: str) -> None:
    normalized = normalize_domain(name)
    if normalized is not None:
        assert normalize_domain(normalized) == normalized
        assert normalized.isascii()


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*.contoso.com", "contoso.com", True),
        ("*.contoso.com", "mail.contoso.com", True),
        ("*.contoso.com", "a.b.contoso.com", True),
        ("*.contoso.com", "*.contoso.com", True),
        ("*.contoso.com", "evilcontoso.com", False),
        ("*.contoso.com", "contoso.com.evil.net", False),
        ("*.contoso.com", "com", False),
        ("mail.contoso.com", "mail.contoso.com", True),
        ("mail.contoso.com", "MAIL.Contoso.COM.", True),
        ("mail.contoso.com", "a.mail.contoso.com", False),
        ("mail.contoso.com", "*.contoso.com", False),
        ("*.bücher.example", "mx.xn--bcher-kva.example", True),
    ],
)
def test_pattern_matching(pattern: str, name: str, matches: bool) -> None:
    parsed = parse_pattern(pattern)
    normalized = normalize_certificate_name(name)
    assert normalized is not None
    assert parsed.matches(normalized) is matches
    index: CertificateNameIndex[str] = CertificateNameIndex()
    index.add(parsed, "x")
    assert bool(index.lookup(normalized)) is matches


@pytest.mark.parametrize(
    "pattern", ["a.*.contoso.com", "*contoso.com", "mail.*", "*.*.contoso.com", "*.com", "*"]
)
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        parse_pattern(pattern)


@given(
    st.lists(st.tuples(domain, st.booleans()), min_size=1, max_size=8),
    st.lists(label, max_size=3),
    domain,
)
def test_name_index_agrees_with_the_definition(
    patterns: list[tuple[str, bool]], prefix: list[str], base: str
) -> None:
    index: CertificateNameIndex[CertificatePattern] = CertificateNameIndex()
    parsed = set()
    for text, wildcard in patterns:
        try:
            pattern = parse_pattern(("*." if wildcard else "") + text)
        except PatternError:
            continue
        parsed.add(pattern)
        index.add(pattern, pattern)
    name = ".".join([*prefix, base])
    expected = {
        p for p in parsed if name == p.domain or (p.wildcard and name.endswith("." + p.domain))
    }
    assert {pattern for _, pattern in index.lookup(name)} == expected


@given(
    st.lists(st.tuples(domain, st.booleans()), min_size=1, max_size=6),
    st.lists(label, max_size=3),
    domain,
)
def test_accepted_agrees_with_the_definition(
    accepted: list[tuple[str, bool]], prefix: list[str], base: str
) -> None:
    organization = Organization("o", tuple(AcceptedDomain(d, m) for d, m in accepted), ())
    candidate = ".".join([*prefix, base])
    expected = any(candidate == d or (m and candidate.endswith("." + d)) for d, m in accepted)
    assert organization.accepts(candidate) is expected


networks_v4 = st.builds(
    lambda address, prefix: ipaddress.ip_network(
        f"{ipaddress.IPv4Address(address)}/{prefix}", strict=False
    ),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
networks_v6 = st.builds(
    lambda address, prefix: ipaddress.ip_network(
        f"{ipaddress.IPv6Address(address)}/{prefix}", strict=False
    ),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)


@settings(max_examples=200)
@given(
    st.lists(st.one_of(networks_v4, networks_v6), max_size=12),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**128 - 1),
)
def test_network_table_agrees_with_brute_force(networks: list, v4: int, v6: int) -> None:
    table: NetworkTable[int] = NetworkTable()
    for number, network in enumerate(networks):
        table.add(network, number)
    for address in (ipaddress.IPv4Address(v4), ipaddress.IPv6Address(v6)):
        expected = {
            n for n, net in enumerate(networks) if net.version == address.version and address in net
        }
        assert set(table.lookup(address)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("IPv6:2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("/var/run/socket", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_client_address(text: str | None, expected: str | None) -> None:
    address = parse_client_address(text)
    assert (str(address) if address else None) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "unix:/run/relaymilter/relaymilter.sock",
        "local:/tmp/x",
        "inet:8894@127.0.0.1",
        "inet6:8894@[::1]",
        "inet:25",
    ],
)
def test_valid_socket_specs(spec: str) -> None:
    parse_socket_spec(spec)


@pytest.mark.parametrize(
    "spec", ["8894", "unix:x", "inet:0@127.0.0.1", "inet:x@h", "inet6:1@127.0.0.1", "tcp:1@h"]
)
def test_invalid_socket_specs(spec: str) -> None:
    with pytest.raises(SocketSpecError):
        parse_socket_spec(spec)
