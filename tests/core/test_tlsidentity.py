"""The client certificate from each MTA's macros (values as seen on Postfix 3.7 and Sendmail 8.17)."""

from __future__ import annotations

import pytest

from relaymilter.core.tlsidentity import certificate_from_mapping, dn_attribute, xtext_decode

RICH_DN = (
    "/C=US/ST=New+20York/L=New+20York/O=Contoso+20Ltd.+20+28Test+5C+2BDev+29/OU=Mail+5C/Relay"
    "/CN=mail.contoso.com/emailAddress=postmaster@contoso.com"
)


def test_postfix_cn_is_trusted() -> None:
    cert = certificate_from_mapping(
        {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Contoso CA"}
    )
    assert cert is not None
    assert (cert.subject_cn, cert.issuer_cn, cert.trusted, cert.fingerprint) == (
        "mail.contoso.com",
        "Contoso CA",
        True,
        None,
    )


@pytest.mark.parametrize("verify", ["OK", "FAIL", "NO", "NOT", None])
def test_sendmail_dn_needs_verify_ok(verify: str | None) -> None:
    macros = {"{cert_subject}": "/CN=mail.contoso.com", "{cert_issuer}": "/CN=Contoso+20CA"}
    if verify is not None:
        macros["{verify}"] = verify
    cert = certificate_from_mapping(macros)
    assert cert is not None
    assert cert.trusted is (verify == "OK")
    assert (cert.subject_cn, cert.issuer_cn) == ("mail.contoso.com", "Contoso CA")


def test_bare_cn_with_failed_verify_fails_closed() -> None:
    cert = certificate_from_mapping({"{cert_subject}": "mail.contoso.com", "{verify}": "FAIL"})
    assert cert is not None and not cert.trusted


@pytest.mark.parametrize(
    "macros", [{}, {"{cert_subject}": ""}, {"{cert_subject}": "", "{verify}": "NO"}]
)
def test_no_certificate(macros: dict[str, str]) -> None:
    assert certificate_from_mapping(macros) is None


def test_sendmail_rich_subject_and_cn_macros() -> None:
    cert = certificate_from_mapping(
        {
            "{cert_subject}": RICH_DN,
            "{cert_issuer}": "/C=US/O=SM+20Probe+20Test+20CA/CN=SM+20Probe+20Root+20CA",
            "{cn_subject}": "mail.contoso.com",
            "{cn_issuer}": "SM+20Probe+20Root+20CA",
            "{verify}": "OK",
            "{cert_fp}": "64:D3:68:EF:" + "00:" * 27 + "9D",
        }
    )
    assert cert is not None
    assert cert.subject_cn == "mail.contoso.com"
    assert cert.issuer_cn == "SM Probe Root CA"
    assert cert.fingerprint == "64d368ef" + "00" * 27 + "9d"
    assert "O=Contoso Ltd. (Test\\+Dev)" in cert.subject


def test_dn_parsing_honours_openssl_escapes() -> None:
    assert dn_attribute(RICH_DN, "OU") == "Mail/Relay"
    assert dn_attribute(RICH_DN, "O") == "Contoso Ltd. (Test+Dev)"
    assert (
        dn_attribute("/O=Contoso+20B+5CxC3+5CxBCcher+20GmbH/CN=mail.contoso.com", "O")
        == "Contoso Bücher GmbH"
    )
    assert dn_attribute(RICH_DN, "CN") == "mail.contoso.com"


def test_cn_from_dn_when_cn_macro_is_missing() -> None:
    cert = certificate_from_mapping({"{cert_subject}": RICH_DN, "{verify}": "OK"})
    assert cert is not None and cert.subject_cn == "mail.contoso.com"


def test_md5_fingerprint_when_no_cert_fp() -> None:
    cert = certificate_from_mapping(
        {
            "{cert_subject}": "/CN=x",
            "{verify}": "OK",
            "{cert_md5}": "97:F3:D0:90:" + "AB:" * 11 + "8F:AB",
        }
    )
    assert cert is not None and cert.fingerprint == "97f3d090" + "ab" * 11 + "8fab"


def test_xtext_decode() -> None:
    assert xtext_decode("a+2Bb+20c") == b"a+b c"
    assert xtext_decode("+5CxC3") == b"\\xC3"
