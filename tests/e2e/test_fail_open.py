"""Why the snippets insist on failing closed.

With relaymilter down, an MTA configured without the snippet's setting relays
a message that relaymilter would have refused: Postfix with
``milter_default_action = accept``, Sendmail without ``F=T``, and Postfix with
relaymilter as its policy service and ``smtpd_policy_service_default_action =
DUNNO``. (With the snippets as shipped, see
test_modes.py::test_milter_down_means_tempfail.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .pki import Pki
from .postfix import PolicyPostfixInstance, PostfixInstance
from .sendmail import SendmailInstance
from .sink import Sink
from .smtpclient import send

pytestmark = pytest.mark.e2e

FOREIGN = "john@fabrikam.com"
EXTERNAL = "kate@tailspintoys.com"


def without_f_t(snippet: str) -> str:
    assert ", F=T'" in snippet
    return snippet.replace(", F=T'", "'")


@pytest.fixture(scope="module")
def sendmail_without_f_t(e2e_dir: Path, pki: Pki, sink: Sink) -> Iterator[SendmailInstance]:
    instance = SendmailInstance(
        e2e_dir / "sendmail-no-F-T", pki, sink.port, without_f_t, milter_socket="inet"
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


def test_postfix_default_action_accept_relays_unchecked(
    postfix: PostfixInstance, sink: Sink
) -> None:
    txn = send(postfix.ports.fail_open, FOREIGN, [EXTERNAL], starttls=False)
    assert txn.rcpts[EXTERNAL].line == "250 2.1.5 Ok"
    assert sink.wait(txn.token).rcpts == [EXTERNAL]


def test_postfix_policy_default_action_dunno_relays_unchecked(
    postfix_policy: PolicyPostfixInstance, sink: Sink
) -> None:
    # The snippet's smtpd_relay_restrictions with a service nobody serves.
    txn = send(postfix_policy.policy_ports.fail_open, FOREIGN, [EXTERNAL], starttls=False)
    assert txn.rcpts[EXTERNAL].line == "250 2.1.5 Ok"
    assert sink.wait(txn.token).rcpts == [EXTERNAL]
    assert not postfix_policy.policy_socket.with_name("relaymilter-policy-dead").exists()


def test_sendmail_without_f_t_relays_unchecked(
    sendmail_without_f_t: SendmailInstance, sink: Sink
) -> None:
    cf = (sendmail_without_f_t.run / "sendmail.cf").read_text()
    assert f"Xrelaymilter, S=inet:{sendmail_without_f_t.milter_port}@127.0.0.1\n" in cf
    txn = send(sendmail_without_f_t.port, FOREIGN, [EXTERNAL], starttls=False)
    assert txn.rcpts[EXTERNAL].line == f"250 2.1.5 <{EXTERNAL}>... Recipient ok"
    assert sink.wait(txn.token).rcpts == [EXTERNAL]
