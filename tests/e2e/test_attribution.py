"""Scenarios 1-8: who may relay what, on real Postfix and real Sendmail.

Every test runs on each target (Postfix with the milter on a unix socket in
the chroot, Postfix with an inet socket, Postfix with relaymilter as its
policy service, Sendmail) and asserts the exact
RCPT reply the client saw, relaymilter's decision line, what reached the
sink, and that ``relaymilter explain`` predicts the same decision.
"""

from __future__ import annotations

import pytest

from . import configs
from .targets import Outcome, Target

pytestmark = pytest.mark.e2e

OWNED = "alice@contoso.com"
FOREIGN = "john@fabrikam.com"
EXTERNAL = "kate@tailspintoys.com"
INTERNAL = "ceo@contoso.com"


@pytest.fixture(autouse=True)
def _standard_config(target: Target) -> None:
    target.use(configs.standard(target.pki))


def assert_relayed(target: Target, outcome: Outcome, rcpt: str, **decision: str) -> None:
    assert outcome.reply(rcpt) == target.accepted(rcpt)
    assert outcome.decision(rcpt)["action"] == "continue"
    for key, value in decision.items():
        assert outcome.decision(rcpt)[key] == value, key
    assert rcpt in outcome.delivered_to


def assert_refused(target: Target, outcome: Outcome, rcpt: str, **decision: str) -> None:
    assert outcome.reply(rcpt) == target.refusal(rcpt)
    assert outcome.decision(rcpt)["action"] == "reject"
    assert outcome.decision(rcpt)["reason"] == "attr36"
    for key, value in decision.items():
        assert outcome.decision(rcpt)[key] == value, key
    assert rcpt not in outcome.delivered_to


# -- 1, 2: IP connector -------------------------------------------------------


def test_ip_connector_owned_sender_is_relayed(target: Target) -> None:
    outcome = target.run(OWNED, [EXTERNAL], starttls=False)
    assert_relayed(
        target, outcome, EXTERNAL, reason="sender-domain", kind="ip", connector="onprem-ip"
    )
    assert outcome.delivered is not None and outcome.delivered.mail_from == OWNED


def test_ip_connector_foreign_sender_is_refused(target: Target) -> None:
    outcome = target.run(FOREIGN, [EXTERNAL], starttls=False)
    assert_refused(
        target, outcome, EXTERNAL, kind="ip", connector="onprem-ip", organization="contoso"
    )
    # The client tries DATA anyway: the MTA refuses it, so nothing is queued.
    assert outcome.txn.data is not None
    assert outcome.txn.data.line == target.no_recipients_data_reply
    assert outcome.delivered is None


# -- 3: null sender -----------------------------------------------------------


def test_null_sender_by_ip_is_refused(target: Target) -> None:
    outcome = target.run("", [EXTERNAL], starttls=False)
    assert_refused(target, outcome, EXTERNAL, kind="ip")
    assert outcome.delivered is None


def test_null_sender_with_trusted_certificate_is_relayed(target: Target) -> None:
    outcome = target.run("", [EXTERNAL], cert="mail")
    assert_relayed(target, outcome, EXTERNAL, reason="certificate", kind="certificate")
    assert outcome.delivered is not None and outcome.delivered.mail_from == ""


# -- 4: forwarding ------------------------------------------------------------


def test_forwarding_by_ip_is_refused(target: Target) -> None:
    outcome = target.run(FOREIGN, [EXTERNAL], cert=None)
    assert_refused(target, outcome, EXTERNAL, kind="ip")
    assert outcome.delivered is None


def test_forwarding_with_certificate_is_relayed(target: Target) -> None:
    outcome = target.run(FOREIGN, [EXTERNAL], cert="mail")
    assert_relayed(
        target, outcome, EXTERNAL, reason="certificate", kind="certificate", connector="onprem-cert"
    )


# -- 5: internal and external recipients in one transaction -------------------


def test_internal_recipient_accepted_external_refused(target: Target) -> None:
    outcome = target.run(FOREIGN, [INTERNAL, EXTERNAL], starttls=False)
    assert_relayed(target, outcome, INTERNAL, reason="internal-recipient", kind="ip")
    assert_refused(target, outcome, EXTERNAL, kind="ip")
    assert outcome.txn.queued
    assert outcome.delivered_to == [INTERNAL]


# -- 6: which certificates count ----------------------------------------------


def test_ca_signed_certificate_matching_wildcard_is_relayed(target: Target) -> None:
    outcome = target.run(FOREIGN, [EXTERNAL], cert="mail")
    assert_relayed(target, outcome, EXTERNAL, kind="certificate", connector="onprem-cert")
    assert outcome.decision(EXTERNAL)["certificate"] == "mail.contoso.com"


def test_self_signed_certificate_is_not_honoured(target: Target) -> None:
    # Falls back to the IP connector, which refuses a foreign sender.
    outcome = target.run(FOREIGN, [EXTERNAL], cert="selfsigned")
    assert_refused(target, outcome, EXTERNAL, kind="ip", connector="onprem-ip")


def test_certificate_from_a_ca_the_mta_does_not_trust_is_not_honoured(target: Target) -> None:
    # CN=mail.contoso.com from "Northwind Untrusted CA", which is in no CA file:
    # presented, never verified. A bounce then has only the IP connector.
    outcome = target.run("", [EXTERNAL], cert="untrustedca")
    assert outcome.txn.tls_version is not None
    assert_refused(target, outcome, EXTERNAL, kind="ip", connector="onprem-ip")
    assert outcome.decision(EXTERNAL)["certificate"] == "-"


def test_certificate_from_untrusted_issuer_is_not_honoured(target: Target) -> None:
    # Trusted by the MTA (chains to "Fabrikam Root CA"), not listed in trusted_issuers.
    outcome = target.run(FOREIGN, [EXTERNAL], cert="otherissuer")
    assert_refused(target, outcome, EXTERNAL, kind="ip", connector="onprem-ip")


def test_certificate_matching_only_by_registered_san_is_relayed(target: Target) -> None:
    # CN=relay01.corp.example; SAN smtp.contoso.com, known only from `certificates:`.
    # Sendmail identifies it by {cert_fp}, Postfix's milter macros by subject CN +
    # issuer CN, Postfix's policy service by ccert_fingerprint.
    outcome = target.run(FOREIGN, [EXTERNAL], cert="san")
    assert_relayed(target, outcome, EXTERNAL, kind="certificate", connector="onprem-cert")


# -- 7: TLS variants ------------------------------------------------------------


def test_starttls_without_client_certificate_is_attributed_by_ip(target: Target) -> None:
    refused = target.run(FOREIGN, [EXTERNAL], cert=None)
    assert refused.txn.tls_version is not None
    assert_refused(target, refused, EXTERNAL, kind="ip")
    relayed = target.run(OWNED, [EXTERNAL], cert=None)
    assert_relayed(target, relayed, EXTERNAL, reason="sender-domain", kind="ip")


def test_plain_smtp_is_attributed_by_ip(target: Target) -> None:
    outcome = target.run(FOREIGN, [INTERNAL, EXTERNAL], starttls=False)
    assert outcome.txn.tls_version is None
    assert_relayed(target, outcome, INTERNAL, reason="internal-recipient", kind="ip")
    assert_refused(target, outcome, EXTERNAL, kind="ip")


def test_certificate_honoured_without_second_ehlo(target: Target) -> None:
    # MAIL FROM straight after the TLS handshake: the MTA sends no EHLO-stage
    # macros, so relaymilter must get the certificate at MAIL/RCPT.
    outcome = target.run(FOREIGN, [EXTERNAL], cert="mail", ehlo_after_starttls=False)
    assert outcome.txn.tls_version is not None
    assert_relayed(target, outcome, EXTERNAL, kind="certificate", connector="onprem-cert")


# -- 8: other client addresses ---------------------------------------------------


def test_client_matched_by_slash_32_connector(target: Target) -> None:
    refused = target.run(FOREIGN, [EXTERNAL], starttls=False, source_ip="127.0.0.2")
    assert_refused(target, refused, EXTERNAL, kind="ip", connector="branch-ip", client="127.0.0.2")
    relayed = target.run(OWNED, [EXTERNAL], starttls=False, source_ip="127.0.0.2")
    assert_relayed(target, relayed, EXTERNAL, reason="sender-domain", connector="branch-ip")


def test_client_matched_by_no_connector_is_left_to_the_mta(target: Target) -> None:
    # 127.0.0.3 is in no connector: relaymilter does not interfere, and both
    # MTAs' own rules (all of 127/8 may relay) let a foreign sender relay.
    outcome = target.run(FOREIGN, [EXTERNAL], starttls=False, source_ip="127.0.0.3")
    assert_relayed(target, outcome, EXTERNAL, reason="unattributed", kind="-")
    assert outcome.decision(EXTERNAL)["organization"] == "-"


# -- one session, several transactions ----------------------------------------------


def test_each_transaction_is_judged_on_its_own(target: Target) -> None:
    # MAIL FROM starts afresh: a refused transaction leaves nothing behind for
    # the next one in the same SMTP session, and vice versa.
    with target.session(starttls=False) as session:
        first = target.run(FOREIGN, [EXTERNAL], session=session)
        assert_refused(target, first, EXTERNAL, kind="ip")
        second = target.run(OWNED, [EXTERNAL], session=session)
        assert_relayed(target, second, EXTERNAL, reason="sender-domain", kind="ip")
        third = target.run(FOREIGN, [INTERNAL, EXTERNAL], session=session)
        assert_relayed(target, third, INTERNAL, reason="internal-recipient")
        assert_refused(target, third, EXTERNAL, kind="ip")
        assert third.delivered_to == [INTERNAL]
