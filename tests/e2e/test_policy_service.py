"""relaymilter as Postfix's policy service: what only that front end has to prove.

Every scenario of test_attribution, test_routing, test_modes and test_metrics
runs on the ``postfix-policy`` target too (a private Postfix built from the
shipped etc/postfix/main.cf.relaymilter-policy, ``relaymilter policy`` on its
``unix:private/relaymilter-policy``). This module adds:

* what Postfix 3.7 really sends a policy service (a capturing service on
  listeners with the snippet's restrictions): the ``ccert_*`` attributes for a
  verified, an unverified and no certificate, their encoding and digests, and
  the recipient's form;
* certificate files known by the certificate's digest, or its public key's
  after a renewal, and never by names alone, with either digest Postfix uses;
* that the service never permits: a client outside ``mynetworks`` cannot
  relay, whatever relaymilter thinks of it;
* the milter and the policy service deciding the same transactions alike;
* SIGKILL of the service under load: 451s meanwhile, nothing lost, nothing
  relayed unchecked.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Callable, Optional

import pytest

from . import configs
from .policycapture import PolicyCapture
from .postfix import LOCAL_NAME, PolicyPostfixInstance
from .smtpclient import Reply, Session, send
from .targets import MTA_TRUSTED, Outcome, Target, postfix_internal_form, xtext
from .util import wait_for

pytestmark = pytest.mark.e2e

OWNED = "alice@contoso.com"
FOREIGN = "john@fabrikam.com"
EXTERNAL = "kate@tailspintoys.com"
INTERNAL = "ceo@contoso.com"
L = LOCAL_NAME

#: The certificate attributes of a policy request.
CCERT = ("ccert_subject", "ccert_issuer", "ccert_fingerprint", "ccert_pubkey_fingerprint")


@pytest.fixture
def standard(policy_target: Target) -> Target:
    policy_target.use(configs.standard(policy_target.pki))
    return policy_target


def listener(target: Target, name: str, port: int, digest: str = "sha256") -> Target:
    """The policy target's relaymilter behind another listener of the same Postfix."""
    return dataclasses.replace(target, name=name, port=port, digest=digest)


# -- what Postfix sends -----------------------------------------------------------------


@pytest.mark.parametrize("digest", ["sha256", "md5"])
def test_what_postfix_sends_for_each_certificate(
    postfix_policy: PolicyPostfixInstance, policy_capture: PolicyCapture, digest: str
) -> None:
    """Subject and issuer CN only for a verified chain; the digests for any certificate.

    sha256 is compatibility level 3.6's smtpd_tls_fingerprint_digest, md5 that
    of an older main.cf: uppercase hex pairs joined by colons, either way.
    ccert_issuer is xtext ("Contoso+20Issuing+20CA"), ccert_subject too.
    """
    pki = postfix_policy.pki
    ports = postfix_policy.policy_ports
    port = ports.capture if digest == "sha256" else ports.capture_md5
    verified = {"mail", "san", "otherissuer"}
    for name in ("mail", "san", "otherissuer", "selfsigned", "untrustedca", None):
        credential = pki.clients[name] if name else None
        offset = policy_capture.offset()
        txn = send(port, "", [EXTERNAL], cert=credential)
        assert txn.tls_version is not None and txn.rcpts[EXTERNAL].code == 250, txn
        (request,) = policy_capture.wait_state(offset, "RCPT")
        assert request["encryption_protocol"] == txn.tls_version
        if credential is None:
            assert [request[a] for a in CCERT] == ["", "", "", ""], request
            continue
        assert request["ccert_fingerprint"] == credential.fingerprints[digest], name
        assert request["ccert_pubkey_fingerprint"] == credential.pubkey_fingerprints[digest], name
        if name in verified:
            assert request["ccert_subject"] == xtext(credential.subject_cn), name
            assert request["ccert_issuer"] == xtext(credential.issuer_cn), name
        else:
            assert (request["ccert_subject"], request["ccert_issuer"]) == ("", ""), name
    assert xtext(pki.clients["mail"].issuer_cn) == "Contoso+20Issuing+20CA"

    # No STARTTLS: every certificate and encryption attribute empty.
    offset = policy_capture.offset()
    send(port, "", [EXTERNAL], starttls=False)
    (plain,) = policy_capture.wait_state(offset, "RCPT")
    assert [plain[a] for a in CCERT] == ["", "", "", ""]
    assert (plain["encryption_protocol"], plain["encryption_keysize"]) == ("", "0")


def test_what_postfix_sends_for_each_recipient(
    postfix_policy: PolicyPostfixInstance, policy_capture: PolicyCapture
) -> None:
    """The recipient in Postfix's internal form; the queue ID once a recipient was accepted.

    Only RCPT requests come (the snippet calls the service from
    smtpd_relay_restrictions alone), all with one ``instance`` per transaction.
    """
    rcpts = [
        f'"quoted@tailspintoys.com"@{L}',
        f"pct%tailspintoys.com@{L}",
        f"tailspintoys.com!bang@{L}",
        f"@{L}:route@tailspintoys.com",
        f"@{L},@tailspintoys.com:kate@contoso.com",
        '"a b"@tailspintoys.com',
        "kate@RELAY.Contoso.COM",
    ]
    offset = policy_capture.offset()
    with Session(postfix_policy.policy_ports.capture, starttls=False) as session:
        txn = session.transaction("", rcpts)
    assert txn.accepted == rcpts  # the capturing service says DUNNO; mynetworks permits
    requests = policy_capture.wait_state(offset, "RCPT", len(rcpts))
    assert len(policy_capture.since(offset)) == len(rcpts)  # no other protocol_state
    assert [r["recipient"] for r in requests] == [
        f"quoted@tailspintoys.com@{L}",
        f"pct%tailspintoys.com@{L}",
        f"tailspintoys.com!bang@{L}",
        "route@tailspintoys.com",
        "kate@contoso.com",
        "a b@tailspintoys.com",
        "kate@RELAY.Contoso.COM",
    ]
    assert [r["recipient"] for r in requests] == [postfix_internal_form(r) for r in rcpts]
    assert len({r["instance"] for r in requests}) == 1
    assert requests[0]["queue_id"] == ""
    assert txn.data is not None and txn.queued
    assert {r["queue_id"] for r in requests[1:]} == {txn.data.text.rsplit(" ", 1)[-1]}
    assert {r["sender"] for r in requests} == {""}
    assert {r["recipient_count"] for r in requests} == {"0"}


# -- certificates -------------------------------------------------------------------------


def assert_certificate(outcome: Outcome, certificate: str) -> None:
    decision = outcome.decision(EXTERNAL)
    assert (decision["action"], decision["reason"]) == ("continue", "certificate"), decision
    assert (decision["kind"], decision["connector"]) == ("certificate", "onprem-cert")
    assert decision["certificate"] == certificate
    assert EXTERNAL in outcome.delivered_to


def assert_ip_refused(target: Target, outcome: Outcome) -> None:
    decision = outcome.decision(EXTERNAL)
    assert outcome.reply(EXTERNAL) == target.refusal(EXTERNAL)
    assert (decision["action"], decision["reason"]) == ("reject", "attr36"), decision
    assert (decision["kind"], decision["connector"], decision["certificate"]) == (
        "ip",
        "onprem-ip",
        "-",
    )
    assert outcome.delivered is None


@pytest.mark.parametrize("digest", ["sha256", "md5"])
def test_certificate_file_known_by_digest_renewal_by_public_key_never_by_names(
    standard: Target, postfix_policy: PolicyPostfixInstance, digest: str
) -> None:
    """The connector lists "san"'s file (CN=relay01.corp.example, SAN smtp.contoso.com).

    * "san" itself: found by ccert_fingerprint, its SAN counts;
    * "san-renewed": the same key, not listed, its own SAN relay01.corp.example
      only: found by ccert_pubkey_fingerprint, the listed file's SAN counts;
    * "san-impostor": the same subject and issuer CNs, another key: not that
      file (names alone never match when digests come), so a bounce is refused.
    """
    port = postfix_policy.policy_ports.policy
    if digest == "md5":
        port = postfix_policy.policy_ports.md5
    target = listener(standard, f"postfix-policy-{digest}", port, digest)
    pki = target.pki

    listed = target.run("", [EXTERNAL], cert="san")
    assert_certificate(listed, "smtp.contoso.com")
    decision = listed.decision(EXTERNAL)
    assert decision["cert_fp"] == pki.clients["san"].fingerprints[digest]
    assert decision["cert_pubkey_fp"] == pki.clients["san"].pubkey_fingerprints[digest]
    assert (decision["cert_subject"], decision["cert_issuer"]) == (
        "relay01.corp.example",
        "Contoso Issuing CA",  # xtext-decoded
    )

    # explain takes no public key digest: it could not find the renewal.
    renewed = target.run("", [EXTERNAL], cert="san-renewed", check_explain=False)
    assert_certificate(renewed, "smtp.contoso.com")
    renewal = pki.clients["san-renewed"]
    assert renewed.decision(EXTERNAL)["cert_fp"] == renewal.fingerprints[digest]
    assert renewal.pubkey_fingerprints == pki.clients["san"].pubkey_fingerprints
    assert renewal.fingerprints != pki.clients["san"].fingerprints

    impostor = target.run("", [EXTERNAL], cert="san-impostor")
    assert_ip_refused(target, impostor)
    assert impostor.decision(EXTERNAL)["cert_subject"] == "relay01.corp.example"


def test_certificate_files_by_front_end(targets: Callable[[str], Target]) -> None:
    """The same three certificates through each front end (where they differ, and why).

    Postfix's milter macros carry only the two CNs, so the milter takes any
    certificate of the same subject and issuer CN for the listed one, the
    impostor too; Sendmail's {cert_fp} finds the listed certificate only, not
    its renewal; the policy service has both digests.
    """
    expected = {
        "postfix-unix": {"san": True, "san-renewed": True, "san-impostor": True},
        "sendmail-unix": {"san": True, "san-renewed": False, "san-impostor": False},
        "postfix-policy": {"san": True, "san-renewed": True, "san-impostor": False},
    }
    for name, by_cert in expected.items():
        target = targets(name)
        target.use(configs.standard(target.pki))
        for cert, honoured in by_cert.items():
            outcome = target.run("", [EXTERNAL], cert=cert, check_explain=cert == "san")
            if honoured:
                assert_certificate(outcome, "smtp.contoso.com")
            else:
                assert_ip_refused(target, outcome)


# -- the service never permits ----------------------------------------------------------


def test_client_outside_mynetworks_cannot_relay_whatever_relaymilter_says(
    standard: Target, postfix_policy: PolicyPostfixInstance
) -> None:
    """The snippet's smtpd_relay_restrictions, on a listener with an empty mynetworks.

    check_policy_service comes first, before permit_mynetworks, as the snippet
    has it (SMTPD_POLICY_README warns against that for a service that may say
    OK). relaymilter only ever says DUNNO or refuses, so Postfix's own
    defer_unauth_destination still stops every relay attempt, even those
    relaymilter lets through (an owned sender, a trusted certificate, a
    recipient it counts as internal).
    """
    target = listener(standard, "postfix-policy-outsider", postfix_policy.policy_ports.outsider)

    def relay_denied(rcpt: str) -> str:
        return f"454 4.7.1 <{rcpt}>: Relay access denied"

    cases = [
        # (client, certificate, sender, recipient, relaymilter's reason)
        ("127.0.0.3", None, FOREIGN, EXTERNAL, "unattributed"),
        ("127.0.0.1", None, OWNED, EXTERNAL, "sender-domain"),
        ("127.0.0.1", "mail", "", EXTERNAL, "certificate"),
        ("127.0.0.1", None, FOREIGN, INTERNAL, "internal-recipient"),
    ]
    for client, cert, sender, rcpt, reason in cases:
        outcome = target.run(sender, [rcpt], cert, starttls=cert is not None, source_ip=client)
        assert (outcome.decision(rcpt)["action"], outcome.decision(rcpt)["reason"]) == (
            "continue",
            reason,
        )
        assert outcome.reply(rcpt) == relay_denied(rcpt), (client, sender, rcpt)
        assert outcome.delivered is None

    # relaymilter's refusal comes first, from the same listener.
    refused = target.run(FOREIGN, [EXTERNAL], starttls=False)
    assert refused.reply(EXTERNAL) == target.refusal(EXTERNAL)
    # And the listener does accept mail: for Postfix's own domain.
    local = f"kate@{L}"
    accepted = target.run(FOREIGN, [local], starttls=False, source_ip="127.0.0.3")
    assert accepted.reply(local) == target.accepted(local)
    assert accepted.delivered_to == [local]


# -- the same decisions through either front end --------------------------------------

#: Fields of a decision record that are the front end's own (see the test below).
FRONT_END_FIELDS = {"conn", "queue_id", "cert_fp", "cert_pubkey_fp", "mta_rcpt", "to"}


def test_milter_and_policy_service_decide_alike(targets: Callable[[str], Target]) -> None:
    """The same transactions through Postfix's milter and its policy service.

    The RCPT replies, DATA, what reached the sink and the decision records
    agree, but for what each front end gets from Postfix:

    * ``conn``: each daemon numbers its own connections; Postfix opens a milter
      connection per SMTP session, but keeps a policy connection per smtpd
      process, for session after session;
    * ``queue_id``: two instances, two queue IDs; either front end gets NOQUEUE
      until Postfix has accepted a recipient of the transaction;
    * ``cert_fp``, ``cert_pubkey_fp``: only the policy service gets digests
      (and records them only for a verified certificate);
    * ``mta_rcpt``: only the milter gets {rcpt_addr};
    * ``to`` (and so ``route``): the policy service gets the recipient in
      Postfix's internal form (quotes removed, a source route dropped), the
      milter as the client wrote it.

    A refusal reaches the client with Postfix's prefix for access(5) results
    (``<address>: Recipient address rejected: ``) from the policy service, verbatim
    from the milter.
    """
    milter, policy = targets("postfix-unix"), targets("postfix-policy")
    config = configs.with_contoso_subdomains(configs.standard(milter.pki))
    for target in (milter, policy):
        target.use(config)
    transactions: list[tuple[str, list[str], Optional[str], str]] = [
        (FOREIGN, [INTERNAL, EXTERNAL], None, "127.0.0.1"),
        (OWNED, [EXTERNAL, INTERNAL], None, "127.0.0.2"),
        ("", [EXTERNAL], "mail", "127.0.0.1"),
        (FOREIGN, [EXTERNAL], "san", "127.0.0.1"),
        (FOREIGN, [EXTERNAL], "otherissuer", "127.0.0.1"),
        ("", [EXTERNAL], "selfsigned", "127.0.0.1"),
        (FOREIGN, [EXTERNAL, INTERNAL], None, "127.0.0.3"),
        (
            "",
            [
                f"pct%tailspintoys.com@{L}",
                f"tailspintoys.com!bang@{L}",
                f'"quoted@tailspintoys.com"@{L}',
                f"nested%tailspintoys.com%{L}@{L}",
                f"@{L}:route@tailspintoys.com",
                f"double@tailspintoys.com@{L}",
                f"tailspintoys.com::decnet@{L}",
                f"pct%contoso.com@{L}",
                f"contoso.com!bang@{L}",
                f'"quoted@contoso.com"@{L}',
                f"kate@{L.upper()}",
                INTERNAL,
            ],
            None,
            "127.0.0.1",
        ),
    ]
    rewritten = {
        f"pct%contoso.com@{L}": "pct@contoso.com",
        f"contoso.com!bang@{L}": "bang@contoso.com",
        f'"quoted@contoso.com"@{L}': "quoted@contoso.com",
    }
    for mail_from, rcpts, cert, client in transactions:
        outcomes = [
            t.run(
                mail_from,
                rcpts,
                cert,
                starttls=cert is not None,
                source_ip=client,
                delivered_as=rewritten,
            )
            for t in (milter, policy)
        ]
        by_milter, by_policy = outcomes
        for rcpt in rcpts:
            seen = by_milter.reply(rcpt)
            if by_milter.decision(rcpt)["action"] == "reject":
                seen = policy.as_client_sees(seen, rcpt)
            assert by_policy.reply(rcpt) == seen, rcpt
            mine, theirs = by_milter.decision(rcpt), by_policy.decision(rcpt)
            assert set(mine) == set(theirs)
            differ = {k for k in mine if mine[k] != theirs[k]}
            # The route is worked out from "to": the same when "to" is.
            allowed = FRONT_END_FIELDS | ({"route"} if "to" in differ else set())
            assert differ <= allowed, (rcpt, {k: (mine[k], theirs[k]) for k in differ})
            assert theirs["to"] == policy.recipient_seen(rcpt)
            assert theirs["mta_rcpt"] == "-"
            # Two Postfix instances, two queue IDs; NOQUEUE alike until a recipient is accepted.
            assert (mine["queue_id"] == "NOQUEUE") == (theirs["queue_id"] == "NOQUEUE")
            # Digests only from the policy service, and only for a verified certificate.
            assert mine["cert_fp"] == mine["cert_pubkey_fp"] == "-"
            if cert in MTA_TRUSTED:
                credential = policy.pki.clients[cert]
                assert theirs["cert_fp"] == credential.fingerprints["sha256"]
                assert theirs["cert_pubkey_fp"] == credential.pubkey_fingerprints["sha256"]
            else:
                assert theirs["cert_fp"] == theirs["cert_pubkey_fp"] == "-"
        assert _data_line(by_milter.txn.data) == _data_line(by_policy.txn.data)
        assert sorted(by_milter.delivered_to) == sorted(by_policy.delivered_to)


def test_source_route_through_an_outside_domain_differs(targets: Callable[[str], Target]) -> None:
    """``@HOST,@tailspintoys.com:kate@contoso.com``: the one form the front ends judge apart.

    Postfix drops a source route and delivers to kate@contoso.com. The milter
    gets the route and counts its hops: tailspintoys.com is not accepted, so
    it refuses (when in doubt, external). The policy service gets the address
    without the route, kate@contoso.com, internal: Postfix delivers it there.
    """
    rcpt = f"@{L},@tailspintoys.com:kate@contoso.com"
    milter, policy = targets("postfix-unix"), targets("postfix-policy")
    config = configs.with_contoso_subdomains(configs.standard(milter.pki))
    outcomes = []
    for target in (milter, policy):
        target.use(config)
        outcomes.append(
            target.run(FOREIGN, [rcpt], starttls=False, delivered_as={rcpt: "kate@contoso.com"})
        )
    by_milter, by_policy = outcomes
    assert by_milter.reply(rcpt) == milter.refusal(rcpt)
    assert by_milter.decision(rcpt)["route"] == f"{L},tailspintoys.com,contoso.com"
    assert by_policy.reply(rcpt) == policy.accepted(rcpt)
    decision = by_policy.decision(rcpt)
    assert (decision["to"], decision["reason"]) == ("kate@contoso.com", "internal-recipient")
    assert by_policy.delivered_to == ["kate@contoso.com"]


def _data_line(reply: Optional[Reply]) -> str:
    """DATA's reply without the queue ID."""
    if reply is None:
        return ""
    return reply.line.split(": queued as ")[0]


# -- SIGKILL under load -------------------------------------------------------------------


#: What the clients send, in turn (from 127.0.0.1, attributed by IP).
STREAMED = [
    (OWNED, [INTERNAL, EXTERNAL]),  # both accepted
    (FOREIGN, [INTERNAL, EXTERNAL]),  # the internal one accepted, the external one refused
    ("", [EXTERNAL]),  # refused (a bounce by IP)
]


@dataclasses.dataclass
class Message:
    sender: str
    rcpts: list[str]
    #: Every attempt's RCPT replies, and its token at the sink when it was queued.
    attempts: list[tuple[dict[str, Reply], Optional[str]]] = dataclasses.field(default_factory=list)

    def final(self) -> dict[str, Reply]:
        """Each recipient's last reply: the first that was not a 4xx, or the last 4xx."""
        found: dict[str, Reply] = {}
        for replies, _ in self.attempts:
            found.update(replies)
        return found


class Stream:
    """Clients sending messages one after another, retrying deferred recipients, as MTAs do."""

    def __init__(self, port: int, clients: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.messages: list[Message] = []
        self.replies: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, number: int) -> None:
        sent = number
        while not self.stop.is_set():
            sender, rcpts = STREAMED[sent % len(STREAMED)]
            sent += 1
            message = Message(sender, rcpts)
            pending = list(rcpts)
            while pending:
                txn = send(self.port, sender, pending, starttls=False)
                replies = {r: txn.rcpts[r] for r in pending if r in txn.rcpts}
                message.attempts.append((replies, txn.token if txn.queued else None))
                with self.lock:
                    self.replies.extend(r.line for r in replies.values())
                pending = [r for r in pending if r not in replies or 400 <= replies[r].code < 500]
            with self.lock:
                self.messages.append(message)

    def done(self) -> int:
        with self.lock:
            return len(self.messages)

    def saw(self, line: str) -> bool:
        with self.lock:
            return line in self.replies

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


@pytest.fixture
def restarted(policy_target: Target) -> Iterator[Target]:
    yield policy_target
    policy_target.use(configs.standard(policy_target.pki))  # whatever happened


def test_sigkill_under_load_loses_nothing(restarted: Target) -> None:
    """SIGKILL the service while two clients stream messages; restart it.

    Meanwhile smtpd answers the snippet's smtpd_policy_service_default_action
    (451 4.3.5), and the clients retry those recipients. In the end every
    recipient got the answer the config gives it, each accepted one reached
    the sink exactly once, no refused one reached it, and no recipient was
    accepted without a decision.
    """
    target = restarted
    target.use(configs.standard(target.pki))
    offset = target.milter.offset()
    down = target.policy_down_reply(EXTERNAL)
    with Stream(target.port, clients=2) as stream:
        wait_for(lambda: stream.done() >= 4, 30, "messages before the kill")
        target.milter.kill()
        wait_for(lambda: stream.saw(down), 30, f"a client to get {down!r}")
        target.use(configs.standard(target.pki))  # restarts it; ready when it accepts
        after = stream.done()
        wait_for(lambda: stream.done() >= after + 4, 30, "messages after the restart")
    messages = stream.messages
    assert any(len(m.attempts) > 1 for m in messages), "no message was retried"

    accepted = refused = 0
    for message in messages:
        final = message.final()
        for rcpt in message.rcpts:
            internal = rcpt == INTERNAL or message.sender == OWNED
            reply = final[rcpt].line
            if internal:
                assert reply == target.accepted(rcpt), (message, rcpt)
                accepted += 1
            else:
                assert reply == target.refusal(rcpt), (message, rcpt)
                refused += 1
        delivered: list[str] = []
        for _, token in message.attempts:
            if token is not None:
                delivered += target.sink.wait(token).rcpts
        assert sorted(delivered) == sorted(r for r in message.rcpts if final[r].ok), message
    # Only relaymilter's answers and the default action were given.
    assert set(stream.replies) <= {
        target.accepted(INTERNAL),
        target.refusal(EXTERNAL),
        target.policy_down_reply(INTERNAL),
        down,
    }
    decisions = target.milter.decisions_since(offset)
    actions = [d["action"] for d in decisions]
    # At least one decision per answer: a decision whose answer the kill cut
    # off is logged, and its recipient decided again at the client's retry.
    assert actions.count("continue") >= accepted
    assert actions.count("reject") >= refused
