"""The policy service's decisions, request by request (no socket): the scenario table and more."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from relaymilter.config import parse_config
from relaymilter.core.domains import strip_envelope
from relaymilter.daemon.runtime import Runtime
from relaymilter.decisionlog.record import DecisionRecord, read_line
from relaymilter.policyd.handler import RequestHandler
from relaymilter.policyd.protocol import DUNNO

from ..scenarios import CONFIG, EXTERNAL, SCENARIOS, Scenario
from ..support import ATTR36, make_certificate, sendmail_fingerprint

#: Postfix gives a policy service only what it gives a milter in bare CNs: no DN, no {verify}.
POSTFIX_SCENARIOS = [
    s
    for s in SCENARIOS
    if "{verify}" not in s.macros and not s.macros.get("{cert_subject}", "").startswith("/")
]


def attributes_of(scenario: Scenario, recipient: str, instance: str = "1.1") -> Dict[str, str]:
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": scenario.client,
        "sender": strip_envelope(scenario.mail_from),
        "recipient": recipient,
        "instance": instance,
    }
    if "{cert_subject}" in scenario.macros:
        attributes["ccert_subject"] = scenario.macros["{cert_subject}"]
        attributes["ccert_issuer"] = scenario.macros.get("{cert_issuer}", "")
    return attributes


def handler_for(text: str = CONFIG) -> RequestHandler:
    return RequestHandler(Runtime(parse_config(text, "relaymilter.yml")))


def records(caplog: pytest.LogCaptureFixture) -> List[DecisionRecord]:
    found = [read_line(r.getMessage()) for r in caplog.records]
    return [f[0] for f in found if f is not None]


@pytest.mark.parametrize("scenario", POSTFIX_SCENARIOS, ids=[s.id for s in POSTFIX_SCENARIOS])
def test_the_scenarios(scenario: Scenario, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaymilter")
    handler = handler_for()
    actions = [handler.answer(attributes_of(scenario, r)) for r, _, _ in scenario.recipients]
    decided = records(caplog)
    for action, record, (recipient, expected, reason) in zip(actions, decided, scenario.recipients):
        assert (record.action, record.reason) == (expected, reason), recipient
        assert record.organization == scenario.organization
        assert record.kind == scenario.kind
        assert action == (DUNNO if expected == "continue" else f"550 {ATTR36}")


@pytest.mark.parametrize(
    "state", ["CONNECT", "EHLO", "HELO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN", ""]
)
def test_only_rcpt_is_decided(state: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaymilter")
    attributes = attributes_of(SCENARIOS[2], EXTERNAL)  # a bounce from an IP connector
    attributes["protocol_state"] = state
    assert handler_for().answer(attributes) == DUNNO
    assert records(caplog) == []


@pytest.mark.parametrize(
    ("mode", "action", "logged"),
    [
        ("enforce", f"550 {ATTR36}", "reject"),
        ("soft", "451 4.7.64 " + ATTR36.split(" ", 1)[1], "soft-reject"),
        ("monitor", DUNNO, "would-reject"),
    ],
)
def test_modes(mode: str, action: str, logged: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaymilter")
    handler = handler_for(f"mode: {mode}\n" + CONFIG)
    assert handler.answer(attributes_of(SCENARIOS[2], EXTERNAL)) == action
    assert [r.action for r in records(caplog)] == [logged]


def test_a_stale_snapshot_answers_tempfail_and_decides_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relaymilter")
    handler = handler_for()
    handler.runtime.set_stale(True)
    assert handler.answer(attributes_of(SCENARIOS[0], EXTERNAL)).startswith("451 4.3.0 ")
    assert records(caplog) == []
    assert "tempfail: the snapshot is older than max_snapshot_age" in caplog.text


def test_a_transaction_keeps_its_config_over_a_reload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relaymilter")
    handler = handler_for()
    first = attributes_of(SCENARIOS[2], EXTERNAL, instance="7.1")
    assert handler.answer(first) == f"550 {ATTR36}"
    handler.runtime.config = parse_config("mode: monitor\n" + CONFIG, "relaymilter.yml")
    # The next recipient of the same message: the config it started with.
    assert handler.answer({**first, "recipient": "bob@tailspintoys.com"}) == f"550 {ATTR36}"
    # The next message: the new config.
    assert handler.answer({**first, "instance": "7.2"}) == DUNNO
    assert [r.mode for r in records(caplog)] == ["enforce", "enforce", "monitor"]


def test_a_certificate_postfix_did_not_verify_does_not_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Postfix sends the digests for any certificate, the CNs only for a verified one.
    caplog.set_level(logging.INFO, "relaymilter")
    attributes = attributes_of(SCENARIOS[2], EXTERNAL)
    attributes.update(ccert_subject="", ccert_issuer="", ccert_fingerprint="AB:" * 31 + "CD")
    assert handler_for().answer(attributes) == f"550 {ATTR36}"
    (record,) = records(caplog)
    assert (record.kind, record.cert_fp) == ("ip", None)


def _files_config(tmp_path: Path, listed: Path) -> str:
    return f"""\
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [192.0.2.0/24]
      - name: smtp-cert
        tls_sender_certificate_name: "*.contoso.com"
        certificates: [{listed}]
"""


@pytest.mark.parametrize("renewed_with_the_same_key", [False, True])
def test_a_listed_certificate_file_lends_its_sans(
    tmp_path: Path, renewed_with_the_same_key: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from relaymilter.core.certfiles import load_certificates

    caplog.set_level(logging.INFO, "relaymilter")
    key = ec.generate_private_key(ec.SECP256R1())
    listed = tmp_path / "relay01.pem"
    cert = make_certificate(listed, "relay01.corp.example", sans=["smtp.contoso.com"], key=key)
    if renewed_with_the_same_key:
        cert = make_certificate(tmp_path / "renewed.pem", "relay01.corp.example", key=key)
    key_digest = load_certificates(str(listed)).leaves[0].pubkey_sha256
    handler = handler_for(_files_config(tmp_path, listed))
    attributes = attributes_of(SCENARIOS[2], EXTERNAL)
    attributes.update(
        ccert_subject="relay01.corp.example",
        ccert_issuer="Contoso Issuing CA",
        ccert_fingerprint=sendmail_fingerprint(cert),
        ccert_pubkey_fingerprint=key_digest,
    )
    assert handler.answer(attributes) == DUNNO
    (record,) = records(caplog)
    assert (record.connector, record.certificate) == ("smtp-cert", "smtp.contoso.com")
    assert record.cert_pubkey_fp == key_digest


def test_an_internal_error_answers_per_on_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from relaymilter.core import policy

    def broken(self: policy.Transaction, recipient: policy.Recipient) -> Optional[policy.Decision]:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(policy.Transaction, "judge", broken)
    attributes = attributes_of(SCENARIOS[0], EXTERNAL)
    tempfail = handler_for()
    assert tempfail.answer(attributes) == (
        "451 4.3.0 relaymilter: internal error, please try again later"
    )
    assert tempfail.runtime.counter.errors == 1
    assert handler_for("on_error: accept\n" + CONFIG).answer(attributes) == DUNNO
    assert "internal error in request; answering per on_error=tempfail" in caplog.text
