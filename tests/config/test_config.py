"""The config file: every error names file, line and key path, all reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaymilter.config import ConfigError, load_config, parse_config
from relaymilter.core.networks import parse_client_address
from relaymilter.core.policy import Transaction
from relaymilter.core.tlsidentity import certificate_from_mapping

from ..support import REPO, make_certificate, sendmail_fingerprint

MINIMAL = """\
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [192.0.2.0/24]
"""


def errors_of(text: str, path: str = "relaymilter.yml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path)
    return [str(issue) for issue in info.value.issues]


def test_shipped_example_is_valid() -> None:
    config = load_config(str(REPO / "etc" / "relaymilter.yml"))
    assert config.socket == "inet:8894@127.0.0.1"
    assert config.warnings == ()
    assert "1 organization" in config.summary()


def test_defaults() -> None:
    config = parse_config(MINIMAL, "x.yml")
    assert (config.socket, config.mode, config.on_error) == (
        "inet:8894@127.0.0.1",
        "enforce",
        "tempfail",
    )
    assert str(config.reject).startswith("550 5.7.64 Relay Access Denied ATTR36.")


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("socket: tcp:25\n", "relaymilter.yml:1: socket: 'tcp:25': unknown socket type 'tcp'"),
        (
            "socket: unix:relative.sock\n",
            "relaymilter.yml:1: socket: 'unix:relative.sock': the unix socket path must be absolute",
        ),
        (
            "socket: inet:99999@127.0.0.1\n",
            "relaymilter.yml:1: socket: 'inet:99999@127.0.0.1': '99999' is not a port",
        ),
        (
            "mode: enforced\n",
            "relaymilter.yml:1: mode: must be one of enforce, soft, monitor, not 'enforced'",
        ),
        ("on_error: reject\n", "relaymilter.yml:1: on_error: must be one of tempfail, accept"),
        ("moed: monitor\n", "relaymilter.yml:1: moed: unknown key; did you mean 'mode'?"),
        (
            "reject: {code: 550, status: 4.7.1}\n",
            "relaymilter.yml:1: reject: code 550 and status 4.7.1 disagree",
        ),
        (
            "reject: {code: 250}\n",
            "relaymilter.yml:1: reject.code: must be a 4xx or 5xx reply code, not 250",
        ),
        (
            'reject: {status: "5.7"}\n',
            "relaymilter.yml:1: reject.status: must be an enhanced status code",
        ),
        ("reject: {text: [a]}\n", "relaymilter.yml:1: reject.text: must be a string"),
        ("mode: true\n", "relaymilter.yml:1: mode: must be a string, not boolean true"),
    ],
)
def test_top_level_errors(snippet: str, expected: str) -> None:
    errors = errors_of(snippet + MINIMAL)
    assert any(e.startswith(expected) for e in errors), errors


def test_every_error_is_reported_at_once_with_line_and_path(tmp_path: Path) -> None:
    text = """\
organizations:
  - name: contoso
    accepted_domains: [contoso.com, "bad..example", "*.wild.example"]
    connectors:
      - name: a
        sender_ip_addresses: [192.0.2.1/24, 300.1.1.1, "::ffff:192.0.2.0/120"]
        colour: blue
      - name: a
      - name: b
        tls_sender_certificate_name: a.*.contoso.com
      - name: c
        sender_ip_addresses: [192.0.2.0/24]
        trusted_issuers: [X]
      - name: d
        tls_sender_certificate_name: "*.contoso.com"
        certificates: [missing.pem]
  - name: contoso
    accepted_domains: []
    connectors: "nope"
"""
    errors = errors_of(text)
    assert errors == [
        "relaymilter.yml:3: organizations[0].accepted_domains[1]: 'bad..example' is not a valid domain name",
        "relaymilter.yml:3: organizations[0].accepted_domains[2]: '*.wild.example' is not a valid domain "
        "name (use match_subdomains: true instead of a wildcard)",
        "relaymilter.yml:6: organizations[0].connectors[0].sender_ip_addresses[0]: '192.0.2.1/24' has host "
        "bits set; did you mean 192.0.2.0/24?",
        "relaymilter.yml:6: organizations[0].connectors[0].sender_ip_addresses[1]: '300.1.1.1' is not an IP "
        "address or CIDR network ('300.1.1.1' does not appear to be an IPv4 or IPv6 network)",
        "relaymilter.yml:6: organizations[0].connectors[0].sender_ip_addresses[2]: '::ffff:192.0.2.0/120' is "
        "IPv4-mapped; write the IPv4 form (clients are matched as IPv4)",
        "relaymilter.yml:7: organizations[0].connectors[0].colour: unknown key (allowed: name, "
        "sender_ip_addresses, tls_sender_certificate_name, trusted_issuers, certificates, mode)",
        "relaymilter.yml:8: organizations[0].connectors[1]: a connector needs sender_ip_addresses, "
        "tls_sender_certificate_name, or both",
        "relaymilter.yml:8: organizations[0].connectors[1].name: duplicate connector name 'a' in "
        "organization 'contoso'",
        "relaymilter.yml:10: organizations[0].connectors[2].tls_sender_certificate_name: a wildcard is allowed "
        "only as the whole first label, as in '*.contoso.com'",
        "relaymilter.yml:13: organizations[0].connectors[3].trusted_issuers: only applies to a connector "
        "with tls_sender_certificate_name",
        f"relaymilter.yml:16: organizations[0].connectors[4].certificates[0]: cannot read certificate file "
        f"{Path('relaymilter.yml').resolve().parent / 'missing.pem'}: No such file or directory",
        "relaymilter.yml:17: organizations[1].name: duplicate organization name 'contoso'",
        "relaymilter.yml:18: organizations[1].accepted_domains: must list at least one domain",
        "relaymilter.yml:19: organizations[1].connectors: must be a list of connectors",
    ]


def test_unregistered_certificate_name_names_the_remedy() -> None:
    text = MINIMAL + "      - name: hcw\n        tls_sender_certificate_name: mail.contoso.com\n"
    (error,) = errors_of(text)
    assert error == (
        "relaymilter.yml:8: organizations[0].connectors[1].tls_sender_certificate_name: connector 'hcw': "
        "'mail.contoso.com' is not a domain registered with organization 'contoso'; use '*.contoso.com' "
        "(as Exchange's Hybrid Configuration Wizard does; contoso.com is registered) or add "
        "mail.contoso.com to accepted_domains"
    )


def test_unregistered_wildcard_domain() -> None:
    text = MINIMAL + "      - name: w\n        tls_sender_certificate_name: '*.fabrikam.com'\n"
    (error,) = errors_of(text)
    assert "'*.fabrikam.com' needs fabrikam.com registered with organization 'contoso'" in error


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the config file is empty"),
        ("organizations: [\n", "not valid YAML"),
        ("- a\n", "must be a mapping with keys"),
        ("socket: inet:1@127.0.0.1\n", "organizations: required key is missing"),
        ("organizations: []\n", "must list at least one organization"),
    ],
)
def test_structural_errors(text: str, message: str) -> None:
    assert any(message in e for e in errors_of(text)), errors_of(text)


def test_duplicate_yaml_key_is_an_error() -> None:
    errors = errors_of("mode: enforce\nmode: monitor\n" + MINIMAL)
    assert errors == ["relaymilter.yml:2: mode: duplicate key"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "absent.yml"))
    assert (
        str(info.value)
        == f"{tmp_path / 'absent.yml'}: cannot read the config file: No such file or directory"
    )


def test_overlapping_ip_connectors_warn() -> None:
    text = (
        MINIMAL
        + """\
  - name: fabrikam
    accepted_domains: [fabrikam.com]
    connectors:
      - {name: f, sender_ip_addresses: ["192.0.2.128/25", "2001:db8::/32"]}
"""
    )
    config = parse_config(text, "o.yml")
    assert config.warnings == (
        "o.yml: organizations: IP connectors overlap: 192.0.2.0/24 (contoso/onprem-ip) and 192.0.2.128/25 "
        "(fabrikam/f); the organization accepting the sender's domain wins, else the first in file order",
    )


def test_monitor_and_accept_warn() -> None:
    config = parse_config("mode: monitor\non_error: accept\n" + MINIMAL, "w.yml")
    assert config.warnings == (
        "w.yml:1: mode: monitor mode: refusals are only logged",
        "w.yml:2: on_error: internal errors will let mail through",
    )


def test_certificate_files_add_their_sans(tmp_path: Path) -> None:
    cert = make_certificate(tmp_path / "gw.pem", "gw01.internal.example", sans=["mail.contoso.com"])
    other = make_certificate(tmp_path / "other.pem", "gw01.internal.example", sans=["x.example"])
    text = MINIMAL + "      - name: c\n        tls_sender_certificate_name: '*.contoso.com'\n"
    text += "        certificates: [gw.pem]\n"
    config_path = tmp_path / "c.yml"
    config_path.write_text(text)
    config = load_config(str(config_path))
    address = parse_client_address("203.0.113.9")

    def attributed(macros: dict[str, str]) -> bool:
        return (
            Transaction(config, address, certificate_from_mapping(macros), "<>").attribution
            is not None
        )

    # Postfix: no fingerprint; matched by subject CN and issuer CN.
    postfix = {"{cert_subject}": "gw01.internal.example", "{cert_issuer}": "Contoso Issuing CA"}
    assert attributed(postfix)
    assert not attributed({**postfix, "{cert_issuer}": "Another CA"})
    # Sendmail: by fingerprint, never by names alone.
    sendmail = {
        "{cert_subject}": "/CN=gw01.internal.example",
        "{verify}": "OK",
        "{cert_issuer}": "/CN=Contoso+20Issuing+20CA",
    }
    assert attributed({**sendmail, "{cert_fp}": sendmail_fingerprint(cert)})
    assert not attributed({**sendmail, "{cert_fp}": sendmail_fingerprint(other)})
    assert not attributed({**sendmail, "{cert_fp}": sendmail_fingerprint(cert), "{verify}": "FAIL"})


def test_certificate_file_warnings(tmp_path: Path) -> None:
    make_certificate(tmp_path / "old.pem", "mail.contoso.com", days=(-30, -1))
    make_certificate(tmp_path / "elsewhere.pem", "mail.example.net")
    text = MINIMAL + "      - name: c\n        tls_sender_certificate_name: '*.contoso.com'\n"
    text += "        certificates: [old.pem, elsewhere.pem]\n"
    path = tmp_path / "c.yml"
    path.write_text(text)
    warnings = load_config(str(path)).warnings
    assert len(warnings) == 2
    assert "certificates[0]" in warnings[0] and "certificate expired on" in warnings[0]
    assert (
        "certificates[1]" in warnings[1]
        and "none of its names matches '*.contoso.com'" in warnings[1]
    )


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "mode: !!int x\n",
            "relaymilter.yml:1: mode: must be a string; cannot read 'x' as tag:yaml.org,2002:int",
        ),
        (
            "socket: !!timestamp 2020-13-45\n",
            "relaymilter.yml:1: socket: must be a string; cannot read '2020-13-45'",
        ),
        (
            "mode: !foo enforce\n",
            "relaymilter.yml:1: mode: must be a string; cannot read 'enforce' as !foo",
        ),
    ],
)
def test_tagged_scalars_are_errors_not_crashes(snippet: str, expected: str) -> None:
    errors = errors_of(snippet + MINIMAL)
    assert any(e.startswith(expected) for e in errors), errors


@pytest.mark.parametrize(
    "domain",
    [
        "@contoso.com",
        "user@contoso.com",
        "http://contoso.com",
        "contoso .com",
        "contoso,com",
        "contoso.com:25",
        "-contoso.com",
    ],
)
def test_domains_must_be_host_names(domain: str) -> None:
    text = MINIMAL.replace("[contoso.com]", f"[contoso.com, {domain!r}]")
    assert errors_of(text) == [
        f"relaymilter.yml:3: organizations[0].accepted_domains[1]: {domain!r} is not a valid domain name"
    ]
    pattern = MINIMAL + f"      - {{name: c, tls_sender_certificate_name: {domain!r}}}\n"
    assert errors_of(pattern) == [
        f"relaymilter.yml:7: organizations[0].connectors[1].tls_sender_certificate_name: {domain!r} is not a valid domain name"
    ]


def test_unquoted_ipv6_gets_a_hint() -> None:
    (error,) = errors_of(MINIMAL.replace("[192.0.2.0/24]", "[1:2:3:4:5:6:7:8]"))
    assert error.endswith("(YAML reads an unquoted a:b:c as a number: quote IPv6 addresses)")


def test_connectors_are_checked_even_when_the_organization_name_is_bad() -> None:
    errors = errors_of(
        MINIMAL.replace("name: contoso", 'name: ""').replace("192.0.2.0/24", "192.0.2.1/24")
    )
    assert errors == [
        "relaymilter.yml:2: organizations[0].name: must not be empty",
        "relaymilter.yml:6: organizations[0].connectors[0].sender_ip_addresses[0]: '192.0.2.1/24' has host bits set; did you mean 192.0.2.0/24?",
    ]


def test_renewed_certificate_files_both_count_on_postfix(tmp_path: Path) -> None:
    make_certificate(tmp_path / "old.pem", "gw01.internal.example", sans=["mail.contoso.com"])
    make_certificate(tmp_path / "new.pem", "gw01.internal.example", sans=["smtp.contoso.com"])
    text = MINIMAL + "      - name: c\n        tls_sender_certificate_name: smtp.contoso.com\n"
    text = text.replace("[contoso.com]", "[contoso.com, smtp.contoso.com]")
    text += "        certificates: [old.pem, new.pem]\n"
    path = tmp_path / "c.yml"
    path.write_text(text)
    config = load_config(str(path))
    presented = certificate_from_mapping(
        {"{cert_subject}": "gw01.internal.example", "{cert_issuer}": "Contoso Issuing CA"}
    )
    transaction = Transaction(config, parse_client_address("203.0.113.9"), presented, "<>")
    assert (
        transaction.attribution is not None
        and transaction.attribution.certificate_name == "smtp.contoso.com"
    )


# -- issue 8: configs that would switch the rule off or misattribute -----------


def _with_domain(domain: str) -> str:
    return MINIMAL.replace("[contoso.com]", f"[contoso.com, {domain}]")


@pytest.mark.parametrize(
    ("domain", "message"),
    [
        ("com", "com is a public suffix (Public Suffix List)"),
        ("co.uk", "co.uk is a public suffix (Public Suffix List)"),
        ("{domain: co.uk, match_subdomains: true}", "and, with match_subdomains, every domain"),
        ("github.io", "github.io is a public suffix"),  # the list's private section
        ("foo.ck", "foo.ck is a public suffix"),  # by the wildcard rule *.ck
        ("corp", "corp is a public suffix"),  # one label: the list's implicit "*" rule
        ("192.0.2.1", "is an IP address (or reads as one), not a domain"),
        ("'3221225985'", "is an IP address (or reads as one), not a domain"),
        ("0xc0.0.2.1", "is an IP address (or reads as one), not a domain"),
        ("'[192.0.2.1]'", "is an IP address (or reads as one), not a domain"),
        ("'2001:db8::1'", "is an IP address (or reads as one), not a domain"),
        ("xn--zzzz.example", "'xn--zzzz' in xn--zzzz.example is not a valid A-label"),
    ],
)
def test_accepted_domains_that_switch_the_rule_off(domain: str, message: str) -> None:
    (error,) = errors_of(_with_domain(domain))
    assert error.startswith("relaymilter.yml:3: organizations[0].accepted_domains[1]")
    assert message in error


@pytest.mark.parametrize(
    "domain", ["www.ck", "contoso.co.uk", "bücher.example", "xn--bcher-kva.example", "a1.example"]
)
def test_ordinary_domains_pass_the_new_checks(domain: str) -> None:
    parse_config(_with_domain(domain), "relaymilter.yml")


def test_a_missing_public_suffix_list_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYMILTER_PUBLIC_SUFFIX_LIST", "/nonexistent/public_suffix_list.dat")
    config = parse_config(MINIMAL, "relaymilter.yml")
    assert any("Public Suffix List" in warning for warning in config.warnings)


TWO_ORGANIZATIONS = """\
organizations:
  - name: contoso
    accepted_domains: [{first}]
    connectors:
      - {{name: onprem-ip, sender_ip_addresses: [192.0.2.0/24]}}
  - name: tenant2
    accepted_domains: [{second}]
    connectors:
      - {{name: cert, tls_sender_certificate_name: "*.contoso.com"}}
"""


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("contoso.com", "contoso.com"),
        ("{domain: contoso.com, match_subdomains: true}", "mail.contoso.com"),
        ("mail.contoso.com", "{domain: contoso.com, match_subdomains: true}"),
        ("{domain: contoso.com, match_subdomains: true}", "{domain: contoso.com}"),
    ],
)
def test_a_domain_belongs_to_one_organization(first: str, second: str) -> None:
    text = TWO_ORGANIZATIONS.format(first=first, second=second)
    errors = [e for e in errors_of(text) if "overlaps" in e]
    assert len(errors) == 1, errors
    assert errors[0].startswith("relaymilter.yml:7: organizations[1].accepted_domains[0]")
    assert "of organization 'contoso' (line 3): a domain belongs to one organization" in errors[0]


def test_separate_domains_of_two_organizations_do_not_overlap() -> None:
    text = TWO_ORGANIZATIONS.format(first="contoso.com", second="mail.contoso.com").replace(
        '"*.contoso.com"', "mail.contoso.com"
    )
    parse_config(text, "relaymilter.yml")


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("reject: {code: 421}", "421 makes Postfix close the whole session"),
        ("reject: {code: 0550}", "YAML reads 0550 as the number 360 (a leading 0 means octal)"),
        ("reject: {text: 'Relay denied \u2014 see KB'}", "must be one line of printable ASCII"),
        ("reject: {text: 'abc\u202edef'}", "must be one line of printable ASCII"),
    ],
)
def test_replies_that_lose_mail_or_break_smtp(snippet: str, message: str) -> None:
    (error,) = errors_of(f"{snippet}\n{MINIMAL}")
    assert message in error


def test_a_network_with_a_zone_id_is_an_error() -> None:
    text = MINIMAL.replace("[192.0.2.0/24]", '["fe80::1%eth0"]')
    assert errors_of(text) == [
        "relaymilter.yml:6: organizations[0].connectors[0].sender_ip_addresses[0]: 'fe80::1%eth0' "
        "has a zone id (%eth0): clients are matched by address alone; write the address or "
        "network without it"
    ]


@pytest.mark.parametrize("name", ["con\ntoso", "contoso\u202e", "con\u2028toso", "a\x00b"])
def test_names_with_control_or_invisible_characters_are_refused(name: str) -> None:
    text = MINIMAL.replace("name: contoso", f"name: {name!r}".replace("'", '"'))
    text = text.replace("\\u", "\\u").replace("\\x00", "\\0")
    (error,) = errors_of(text)
    assert "organizations[0].name" in error and "a name must be printable" in error


def test_a_name_with_spaces_is_fine_and_quoted_in_the_log() -> None:
    config = parse_config(MINIMAL.replace("name: contoso", "name: Contoso Ltd"), "x.yml")
    assert config.organizations[0].name == "Contoso Ltd"


@pytest.mark.parametrize(
    ("network", "socket"),
    [("0.0.0.0/0", "inet:8894@127.0.0.1"), ('"::/0"', "inet:8894@0.0.0.0")],
)
def test_warnings_for_catch_all_networks_and_open_sockets(network: str, socket: str) -> None:
    text = f"socket: {socket}\n" + MINIMAL.replace("[192.0.2.0/24]", f"[{network}]")
    warnings = parse_config(text, "relaymilter.yml").warnings
    assert any("matches every client" in w for w in warnings), warnings
    assert any("listens on all interfaces" in w for w in warnings) == ("0.0.0.0" in socket)


@pytest.mark.parametrize("socket", ["inet:8894", "'inet6:8894@::'", "inet:8894@0.0.0.0"])
def test_sockets_on_all_interfaces_warn(socket: str) -> None:
    warnings = parse_config(f"socket: {socket}\n{MINIMAL}", "relaymilter.yml").warnings
    assert any("listens on all interfaces" in w for w in warnings), warnings


def _ca_certificate(path: Path, cn: str) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_every_leaf_of_a_bundle_counts_and_ca_certificates_are_ignored(tmp_path: Path) -> None:
    old = make_certificate(tmp_path / "old.pem", "gw01.internal.example", sans=["mail.contoso.com"])
    new = make_certificate(tmp_path / "new.pem", "gw02.internal.example", sans=["smtp.contoso.com"])
    _ca_certificate(tmp_path / "ca.pem", "Contoso Issuing CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        b"".join((tmp_path / n).read_bytes() for n in ("old.pem", "ca.pem", "new.pem"))
    )
    text = MINIMAL + '      - name: cert\n        tls_sender_certificate_name: "*.contoso.com"\n'
    text += "        certificates: [bundle.pem]\n"
    config = parse_config(text, str(tmp_path / "relaymilter.yml"))
    (connector,) = [c for c in config.organizations[0].connectors if c.name == "cert"]
    assert [c.subject_cn for c in connector.certificates] == [
        "gw01.internal.example",
        "gw02.internal.example",
    ]
    for cert in (old, new):
        macros = {
            "{cert_subject}": f"/CN={cert.subject.rfc4514_string()[3:]}",
            "{verify}": "OK",
            "{cert_fp}": sendmail_fingerprint(cert),
        }
        transaction = Transaction(
            config, parse_client_address("203.0.113.9"), certificate_from_mapping(macros), "<>"
        )
        assert transaction.attribution is not None, cert.subject


def test_a_file_of_ca_certificates_only_is_an_error(tmp_path: Path) -> None:
    _ca_certificate(tmp_path / "ca.pem", "Contoso Issuing CA")
    text = MINIMAL + '      - name: cert\n        tls_sender_certificate_name: "*.contoso.com"\n'
    text += "        certificates: [ca.pem]\n"
    (error,) = errors_of(text, str(tmp_path / "relaymilter.yml"))
    assert "holds only CA certificates (1); list the client's own certificate" in error


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null"])
def test_a_certificate_path_that_is_not_a_regular_file_is_refused(path: str) -> None:
    text = MINIMAL + '      - name: cert\n        tls_sender_certificate_name: "*.contoso.com"\n'
    text += f"        certificates: [{path}]\n"
    (error,) = errors_of(text)
    assert "not a regular file" in error and path in error


def test_a_config_path_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "relaymilter.yml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:
        load_config(str(fifo))
    assert "FIFO" in str(info.value)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            "policy_service:\n  socket: inet:8894@127.0.0.1\n",
            "relaymilter.yml:2: policy_service.socket: is the milter's socket "
            "(inet:8894@127.0.0.1)",
        ),
        (
            "policy_service:\n  socket: unix:relative.sock\n",
            "relaymilter.yml:2: policy_service.socket: 'unix:relative.sock': the unix socket "
            "path must be absolute",
        ),
        (
            "policy_service:\n  listen: 9100\n",
            "relaymilter.yml:2: policy_service.listen: unknown key (allowed: socket, metrics)",
        ),
        (
            "policy_service:\n  socket: inet:9100@127.0.0.1\n  metrics:\n    listen: 9100\n",
            "relaymilter.yml:4: policy_service.metrics.listen: port 9100 is the policy service "
            "socket's (inet:9100@127.0.0.1)",
        ),
        (
            "metrics:\n  listen: 9099\npolicy_service:\n  metrics:\n    listen: 9099\n",
            "relaymilter.yml:5: policy_service.metrics.listen: is the milter's metrics.listen",
        ),
        (
            "metrics:\n  listen: 9099\npolicy_service:\n  socket: inet:9099@127.0.0.1\n",
            "relaymilter.yml:4: policy_service.socket: is the milter's metrics.listen",
        ),
    ],
    ids=["milter-socket", "relative", "unknown-key", "own-socket", "milter-metrics", "port"],
)
def test_the_policy_service_section(section: str, expected: str) -> None:
    assert expected in errors_of(section + MINIMAL)


def test_the_policy_service_section_read() -> None:
    config = parse_config(
        MINIMAL + "policy_service:\n  socket: unix:/run/p.sock\n  metrics:\n    listen: 9100\n",
        "relaymilter.yml",
    )
    assert config.policy_service is not None
    assert config.policy_service.socket == "unix:/run/p.sock"
    assert config.policy_service.metrics is not None
    assert config.policy_service.metrics.listen == ("127.0.0.1", 9100)
    assert parse_config(MINIMAL, "relaymilter.yml").policy_service is None
