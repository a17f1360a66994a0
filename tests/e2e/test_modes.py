"""Scenarios 9-11: monitor mode, relaymilter down, and reload, on each target (both front ends)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pytest

from . import configs
from .smtpclient import Transaction
from .targets import Target, is_tempfail

pytestmark = pytest.mark.e2e

OWNED = "alice@contoso.com"
FOREIGN = "john@fabrikam.com"
EXTERNAL = "kate@tailspintoys.com"
INTERNAL = "ceo@contoso.com"


# -- 9: monitor mode -----------------------------------------------------------


def test_monitor_mode_accepts_and_logs_would_reject(target: Target) -> None:
    target.use(configs.standard(target.pki, mode="monitor"))
    outcome = target.run(FOREIGN, [INTERNAL, EXTERNAL], starttls=False)
    assert outcome.reply(EXTERNAL) == target.accepted(EXTERNAL)
    assert outcome.decision(EXTERNAL)["action"] == "would-reject"
    assert outcome.decision(EXTERNAL)["reason"] == "attr36"
    assert outcome.decision(INTERNAL)["action"] == "continue"
    assert sorted(outcome.delivered_to) == sorted([INTERNAL, EXTERNAL])

    bounce = target.run("", [EXTERNAL], starttls=False)
    assert bounce.reply(EXTERNAL) == target.accepted(EXTERNAL)
    assert bounce.decision(EXTERNAL)["action"] == "would-reject"
    assert bounce.delivered_to == [EXTERNAL]


# -- 10: relaymilter stopped -----------------------------------------------------


@pytest.fixture
def milter_stopped(target: Target) -> Iterator[None]:
    target.use(configs.standard(target.pki))
    target.milter.stop()  # SIGUSR2, the unit's KillSignal: as systemd stops it
    yield
    target.use(configs.standard(target.pki))  # starts it again


def test_milter_down_means_tempfail(target: Target, milter_stopped: None) -> None:
    # Postfix: milter_default_action = tempfail; Sendmail: F=T. Either way
    # nothing is accepted, not even what relaymilter would have allowed.
    # (One test per target: stopping relaymilter is the slow part.)
    if target.front == "policy":
        policy_down_means_tempfail(target)
        return
    for sender in (OWNED, FOREIGN, ""):
        txn = target.session(starttls=False).transaction(sender, [INTERNAL, EXTERNAL])
        assert txn.mail is not None and txn.mail.line == target.milter_down_reply, sender
        assert not txn.accepted, sender
        assert all(is_tempfail(r) or r.code == 503 for r in txn.rcpts.values()), txn.rcpts
        assert not txn.queued
        assert not target.sink.find(txn.token)

    # The certificate does not help: STARTTLS itself is refused.
    with_cert = target.session("mail").transaction(FOREIGN, [EXTERNAL])
    assert with_cert.starttls is not None
    assert with_cert.starttls.line == target.milter_down_starttls_reply
    assert with_cert.mail is not None and with_cert.mail.line == target.milter_down_reply
    assert not with_cert.accepted
    assert not with_cert.queued


def policy_down_means_tempfail(target: Target) -> None:
    """The policy service's equivalent: smtpd_policy_service_default_action (the snippet's 451).

    Postfix asks the service at RCPT TO only, so MAIL FROM and STARTTLS pass;
    every recipient gets the default action, internal ones and those with a
    trusted certificate included, and DATA has nothing to deliver. smtpd
    tries the service twice, a second apart (smtpd_policy_service_try_limit,
    _retry_delay), per recipient: the sessions run side by side.
    """
    cases = [(sender, None) for sender in (OWNED, FOREIGN, "")] + [("", "mail")]

    def send(case: tuple[str, Optional[str]]) -> Transaction:
        sender, cert = case
        with target.session(cert, starttls=cert is not None) as session:
            return session.transaction(sender, [INTERNAL, EXTERNAL])

    with ThreadPoolExecutor(len(cases)) as pool:
        sent = list(pool.map(send, cases))
    for (sender, cert), txn in zip(cases, sent):
        if cert is not None:
            assert txn.starttls is not None and txn.starttls.code == 220, txn.starttls
            assert txn.tls_version is not None
        assert txn.mail is not None and txn.mail.line == "250 2.1.0 Ok", sender
        for rcpt in (INTERNAL, EXTERNAL):
            assert txn.rcpts[rcpt].line == target.policy_down_reply(rcpt), (sender, txn.rcpts)
        assert txn.data is not None and txn.data.line == target.no_recipients_data_reply
        assert not txn.queued
        assert not target.sink.find(txn.token)


# -- 11: reload ------------------------------------------------------------------


def test_reload_applies_to_next_connection_and_survives_broken_config(target: Target) -> None:
    standard = configs.standard(target.pki)
    target.use(standard)
    with (
        target.session(starttls=False) as before_reload,
        target.session(starttls=False) as under_way,
    ):
        # A transaction under way: its first recipient judged before the reload.
        offset = target.milter.offset()
        smtp = under_way.smtp
        assert smtp.docmd("MAIL", f"FROM:<{FOREIGN}>")[0] == 250
        assert smtp.docmd("RCPT", f"TO:<{INTERNAL}>")[0] == 250
        target.milter.wait_decisions(offset, 1)
        # The MTA is connected to relaymilter now, in the middle of a session.
        assert (
            target.milter.reload(configs.dump(configs.with_fabrikam_accepted(standard))) == "loaded"
        )

        after = target.run(FOREIGN, [EXTERNAL], starttls=False)
        assert after.reply(EXTERNAL) == target.accepted(EXTERNAL)
        assert after.decision(EXTERNAL)["reason"] == "sender-domain"
        assert after.delivered_to == [EXTERNAL]

        # Either front end: a transaction keeps the configuration it started with.
        code, text = smtp.docmd("RCPT", f"TO:<{EXTERNAL}>")
        assert f"{code} {text.decode()}" == target.refusal(EXTERNAL)
        smtp.docmd("RSET")

        old = target.run(FOREIGN, [EXTERNAL], session=before_reload, check_explain=False)
        if target.front == "milter":
            # A milter connection (one per SMTP session) keeps its configuration.
            assert old.reply(EXTERNAL) == target.refusal(EXTERNAL)
        else:
            # The policy service sees transactions, not SMTP sessions: a new one
            # on an old session takes the configuration in force at its first recipient.
            assert old.reply(EXTERNAL) == target.accepted(EXTERNAL)
            assert old.decision(EXTERNAL)["reason"] == "sender-domain"

    # A broken file is refused and the last good configuration stays in force.
    assert target.milter.reload(configs.BROKEN) == "failed"
    kept = target.run(FOREIGN, [EXTERNAL], starttls=False, check_explain=False)
    assert kept.reply(EXTERNAL) == target.accepted(EXTERNAL)
    assert kept.decision(EXTERNAL)["reason"] == "sender-domain"
    assert target.milter.running
