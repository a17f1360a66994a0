"""Table-driven tests of the decision, through the same Transaction the milter uses."""

from __future__ import annotations

import pytest

from relaymilter.config import parse_config
from relaymilter.core.domains import parse_envelope_address
from relaymilter.core.model import Config
from relaymilter.core.networks import parse_client_address
from relaymilter.core.policy import Transaction, decide, parse_recipient
from relaymilter.core.tlsidentity import certificate_from_mapping

from ..scenarios import CONFIG, SCENARIOS, Scenario


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_config(CONFIG, "scenarios.yml")


def run_scenario(config: Config, scenario: Scenario) -> Transaction:
    presented = certificate_from_mapping(scenario.macros)
    address = parse_client_address(scenario.client)
    return Transaction(config, address, presented, scenario.mail_from)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario(config: Config, scenario: Scenario) -> None:
    transaction = run_scenario(config, scenario)
    attribution = transaction.attribution
    assert (attribution.organization.name if attribution else None) == scenario.organization
    assert (attribution.kind if attribution else None) == scenario.kind
    for recipient, action, reason in scenario.recipients:
        decision = transaction.decide(f"<{recipient}>")
        assert (decision.action, decision.reason) == (action, reason), recipient
        assert (decision.reply is not None) == (action == "reject")


def test_reject_reply_is_exchange_onlines(config: Config) -> None:
    decision = run_scenario(config, SCENARIOS[2]).decide("<kate@tailspintoys.com>")
    assert str(decision.reply) == (
        "550 5.7.64 Relay Access Denied ATTR36. For more details please refer to "
        "https://support.microsoft.com/kb/3169958."
    )


def test_two_transactions_on_one_connection_are_independent(config: Config) -> None:
    address = parse_client_address("192.0.2.10")
    first = Transaction(config, address, None, "<app@contoso.com>")
    second = Transaction(config, address, None, "<>")
    assert first.decide("<x@example.net>").action == "continue"
    assert second.decide("<x@example.net>").action == "reject"
    assert first.decide("<y@example.net>").action == "continue"


def test_monitor_mode_logs_would_reject() -> None:
    config = parse_config("mode: monitor\n" + CONFIG, "monitor.yml")
    transaction = Transaction(config, parse_client_address("192.0.2.10"), None, "<>")
    decision = transaction.decide("<kate@tailspintoys.com>")
    assert (decision.action, decision.reason) == ("would-reject", "attr36")


def test_configured_reply() -> None:
    text = 'reject: {code: 554, status: 5.7.1, text: "Relay access denied (100% sure)"}\n'
    config = parse_config(text + CONFIG, "reply.yml")
    transaction = Transaction(config, parse_client_address("192.0.2.10"), None, "<>")
    assert str(transaction.decide("<a@b.example>").reply) == (
        "554 5.7.1 Relay access denied (100% sure)"
    )


def test_unattributed_decision_never_rejects(config: Config) -> None:
    sender = parse_envelope_address("<>")
    decision = decide(config, None, sender, parse_recipient("<a@b.example>"))
    assert (decision.action, decision.reason) == ("continue", "unattributed")


def test_certificate_takes_precedence_over_ip(config: Config) -> None:
    presented = certificate_from_mapping(
        {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Contoso Issuing CA"}
    )
    transaction = Transaction(config, parse_client_address("192.0.2.10"), presented, "<>")
    assert transaction.attribution is not None
    assert transaction.attribution.kind == "certificate"
    assert transaction.attribution.connector_name == "onprem-cert"
    assert transaction.attribution.certificate_name == "mail.contoso.com"


def test_exact_connector_beats_wildcard() -> None:
    text = """\
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - {name: wildcard, tls_sender_certificate_name: "*.contoso.com"}
  - name: mail
    accepted_domains: [mail.contoso.com]
    connectors:
      - {name: exact, tls_sender_certificate_name: mail.contoso.com}
"""
    config = parse_config(text, "exact.yml")
    presented = certificate_from_mapping({"{cert_subject}": "mail.contoso.com"})
    transaction = Transaction(config, parse_client_address("203.0.113.1"), presented, "<>")
    assert transaction.attribution is not None
    assert (transaction.attribution.organization.name, transaction.attribution.connector_name) == (
        "mail",
        "exact",
    )


STAGED = """\
mode: monitor
organizations:
  - name: contoso
    mode: soft
    accepted_domains: [contoso.com]
    connectors:
      - {name: printers, sender_ip_addresses: [192.0.2.200/32], mode: enforce}
      - {name: onprem-ip, sender_ip_addresses: [192.0.2.0/24]}
  - name: fabrikam
    accepted_domains: [fabrikam.com]
    connectors:
      - {name: fab-ip, sender_ip_addresses: [198.51.100.0/24]}
"""


def test_the_most_specific_mode_wins_and_soft_refuses_temporarily() -> None:
    config = parse_config(STAGED, "staged.yml")

    def refusal(client: str) -> tuple[str, str, str]:
        transaction = Transaction(config, parse_client_address(client), None, "<>")
        decision = transaction.decide("<kate@tailspintoys.com>")
        return decision.action, decision.mode, str(decision.reply)

    assert refusal("192.0.2.7") == (
        "soft-reject",
        "soft",
        "451 4.7.64 Relay Access Denied ATTR36. For more details please refer to "
        "https://support.microsoft.com/kb/3169958.",
    )
    assert refusal("192.0.2.200")[:2] == ("reject", "enforce")
    assert refusal("198.51.100.1")[:2] == ("would-reject", "monitor")
    internal = Transaction(config, parse_client_address("192.0.2.7"), None, "<>")
    assert internal.decide("<a@contoso.com>").mode == "soft"
    assert config.summary().endswith("mode monitor; enforce: contoso/printers; soft: contoso"), (
        config.summary()
    )


@pytest.mark.parametrize("space", ["\u00a0", "\u3000", "\u0085", "\u001c", "\u001f", "\u2028"])
def test_unicode_white_space_is_part_of_the_domain_the_mta_routes_on(
    config: Config, space: str
) -> None:
    # Sendmail relayed u@contoso.com\u00a0 to the literal domain "contoso.com\u00a0":
    # that is not contoso.com, so the recipient is external (and the sender's domain
    # is not the organization's).
    transaction = Transaction(config, parse_client_address("192.0.2.7"), None, "<>")
    for rcpt in (f"<u@contoso.com{space}>", f"<u@{space}contoso.com>", f"{space}<u@contoso.com>"):
        assert (transaction.decide(rcpt).action, transaction.decide(rcpt).reason) == (
            "reject",
            "attr36",
        ), repr(rcpt)
    sender = Transaction(config, parse_client_address("192.0.2.7"), None, f"<a@contoso.com{space}>")
    assert sender.decide("<kate@tailspintoys.com>").reason == "attr36"
    assert parse_envelope_address(f"<a@contoso.com{space}>").domain != "contoso.com"
    # What the MTAs do take off: ASCII white space around the address.
    assert transaction.decide(" \t<u@contoso.com> ").reason == "internal-recipient"
