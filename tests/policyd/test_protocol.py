"""The policy protocol: requests as Postfix writes them, and replies as it reads them."""

from __future__ import annotations

from typing import Dict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaymilter.core.model import Reply
from relaymilter.policyd.protocol import (
    MAX_ATTRIBUTES,
    MAX_REQUEST_BYTES,
    ProtocolError,
    action_of,
    parse_request,
    reply_bytes,
)

# What Postfix 3.7 sends at RCPT TO (SMTPD_POLICY_README's example, with a certificate).
POSTFIX_REQUEST = b"""request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=192.0.2.10
client_name=relay.contoso.com
client_port=41234
reverse_client_name=relay.contoso.com
server_address=192.0.2.1
server_port=25
helo_name=relay.contoso.com
sender=
recipient=kate@tailspintoys.com
recipient_count=0
queue_id=
instance=1f2a.6571a0b2.3c4d5.0
size=0
etrn_domain=
stress=
sasl_method=
sasl_username=
sasl_sender=
ccert_subject=mail.contoso.com
ccert_issuer=Contoso+20Issuing+20CA
ccert_fingerprint=68:B3:29:DA:98:93:E3:40:99:C7:D8:AD:5C:B9:C9:40
ccert_pubkey_fingerprint=A1:B2:C3:D4:E5:F6:07:18:29:3A:4B:5C:6D:7E:8F:90
encryption_protocol=TLSv1.3
encryption_cipher=TLS_AES_256_GCM_SHA384
encryption_keysize=256
policy_context=
compatibility_level=3.6
mail_version=3.7.11"""


def test_a_postfix_request() -> None:
    attributes = parse_request(POSTFIX_REQUEST)
    assert attributes["protocol_state"] == "RCPT"
    assert attributes["sender"] == ""
    assert attributes["recipient"] == "kate@tailspintoys.com"
    # xtext-decoded, as the milter gets it.
    assert attributes["ccert_issuer"] == "Contoso Issuing CA"
    assert attributes["ccert_subject"] == "mail.contoso.com"
    # Unknown attributes are kept (and ignored by the handler), new ones included.
    assert attributes["mail_version"] == "3.7.11"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not a name=value line"),
        (b"request=smtpd_access_policy\nno equals sign", "not a name=value line"),
        (b"request=smtpd_access_policy\n=value", "not a name=value line"),
        (b"request=smtpd_access_policy\nsender=a\0b", "not a name=value line"),
        (b"request=other_policy\nprotocol_state=RCPT", "not smtpd_access_policy"),
        (b"protocol_state=RCPT", "not smtpd_access_policy"),
        (b"request=smtpd_access_policy\n" + b"a=" + b"x" * MAX_REQUEST_BYTES, "bytes, over"),
        (b"request=smtpd_access_policy\n" + b"a=b\n" * MAX_ATTRIBUTES, "attributes, over"),
    ],
    ids=[
        "empty",
        "no-equals",
        "no-name",
        "nul",
        "other-request",
        "no-request",
        "oversized",
        "too-many-attributes",
    ],
)
def test_what_is_not_a_request(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_request(data)


def test_bytes_that_are_not_utf8_are_kept() -> None:
    attributes = parse_request(b"request=smtpd_access_policy\nrecipient=k\xe4te@example.net")
    assert attributes["recipient"].encode("utf-8", "surrogateescape") == b"k\xe4te@example.net"


def test_replies() -> None:
    assert reply_bytes("DUNNO") == b"action=DUNNO\n\n"
    refusal = Reply(550, "5.7.64", "Relay Access Denied ATTR36.")
    assert action_of(refusal) == "550 5.7.64 Relay Access Denied ATTR36."
    # A newline would end the reply early.
    assert reply_bytes("451 4.3.0 a\nb") == b"action=451 4.3.0 a b\n\n"


names = st.text(
    st.characters(blacklist_characters="=\n\0", blacklist_categories=("Cs",)), min_size=1
).filter(lambda name: name != "request")
values = st.text(st.characters(blacklist_characters="\n\0", blacklist_categories=("Cs",)))


@given(st.dictionaries(names, values, max_size=30))
def test_what_postfix_can_write_reads_back(attributes: Dict[str, str]) -> None:
    attributes.pop("ccert_subject", None)  # xtext-decoded: not read back verbatim
    attributes.pop("ccert_issuer", None)
    lines = ["request=smtpd_access_policy", *(f"{k}={v}" for k, v in attributes.items())]
    data = "\n".join(lines).encode("utf-8")
    if len(data) > MAX_REQUEST_BYTES:
        return
    assert parse_request(data) == {"request": "smtpd_access_policy", **attributes}
