"""What a scenario runs against: one MTA listener with its relaymilter process.

Targets:
  * ``postfix-unix``: Postfix, chrooted smtpd, milter on the snippet's unix socket;
  * ``postfix-inet``: Postfix, smtpd not chrooted, milter on an inet socket;
  * ``postfix-policy``: another Postfix, chrooted smtpd, no milter: relaymilter
    as its policy service (``relaymilter policy``) through the shipped
    main.cf.relaymilter-policy, on its ``unix:private/relaymilter-policy``;
  * ``sendmail-unix``: Sendmail, milter on the snippet's unix socket (S=local:);
  * ``sendmail-inet``: Sendmail, milter on an inet socket.

``Target.run`` sends one transaction and collects everything a test asserts
on: the SMTP replies, relaymilter's decision lines, and what the MTA relayed
to the sink.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .configs import REJECT_TEXT
from .milterproc import RelayMilterProcess, explain
from .pki import Credential, Pki
from .postfix import POLICY_SNIPPET, snippet_setting
from .sink import Received, Sink
from .smtpclient import Reply, Session, Transaction

# Which client certificates chain to a CA the MTAs trust.
MTA_TRUSTED = {"mail", "otherissuer", "san", "san-renewed", "san-impostor"}
#: What a Postfix smtpd answers at RCPT TO when the policy service cannot be
#: reached: the snippet's smtpd_policy_service_default_action.
POLICY_DOWN_REPLY = snippet_setting(
    POLICY_SNIPPET.read_text(), "smtpd_policy_service_default_action"
)


def xtext(value: str) -> str:
    """RFC 3461 xtext, as Sendmail encodes its certificate DN macros."""
    return "".join(f"+{ord(c):02X}" if c < "!" or c > "~" or c in '+\\()<>"' else c for c in value)


@dataclass
class Outcome:
    txn: Transaction
    decisions: dict[str, dict[str, str]]  # by recipient
    delivered: Optional[Received]

    def reply(self, rcpt: str) -> str:
        return self.txn.rcpts[rcpt].line

    def decision(self, rcpt: str) -> dict[str, str]:
        return self.decisions[rcpt]

    @property
    def delivered_to(self) -> list[str]:
        return self.delivered.rcpts if self.delivered else []


@dataclass
class Target:
    name: str
    mta: str  # "postfix" or "sendmail"
    port: int
    milter: RelayMilterProcess
    sink: Sink
    pki: Pki
    mta_log: Callable[[int], str]  # text of the MTA's log after an offset
    mta_log_size: Callable[[], int]
    #: How relaymilter is attached: "milter", or "policy" (Postfix's check_policy_service).
    front: str = "milter"
    #: The policy front end: Postfix's smtpd_tls_fingerprint_digest on this listener.
    digest: str = "sha256"

    def __str__(self) -> str:
        return self.name

    @property
    def resolves_rcpt(self) -> bool:
        """Whether relaymilter gets the MTA's resolved recipient (``{rcpt_addr}``)."""
        return self.front == "milter"

    def recipient_seen(self, rcpt: str) -> str:
        """The recipient as relaymilter gets it (a decision's ``to``).

        A milter gets the address as the client gave it. Postfix sends a policy
        service its internal form: a quoted local part unquoted, a source route
        dropped (``"a@b"@c`` comes as ``a@b@c``, ``@c:a@b`` as ``a@b``).
        """
        if self.front != "policy":
            return rcpt
        return postfix_internal_form(rcpt)

    # -- what the client sees ---------------------------------------------

    def refusal(self, rcpt: str) -> str:
        """The exact RCPT reply a client gets for an ATTR36 refusal."""
        return self.as_client_sees(f"550 5.7.64 {REJECT_TEXT}", rcpt)

    def as_client_sees(self, reply: str, rcpt: str) -> str:
        """relaymilter's reply to ``rcpt`` (code, status, text) as the MTA passes it on.

        Postfix passes a milter's reply verbatim. Sendmail inserts ``<address>... ``
        after the enhanced status code. Postfix formats a policy service's
        action as it does any access(5) result: ``<address>: Recipient address
        rejected: `` before the text, the address in its internal form.
        """
        code, status, text = reply.split(" ", 2)
        if self.mta == "sendmail":
            return f"{code} {status} <{rcpt}>... {text}"
        if self.front == "policy":
            seen = self.recipient_seen(rcpt)  # Postfix names it in its internal form
            return f"{code} {status} <{seen}>: Recipient address rejected: {text}"
        return reply

    def accepted(self, rcpt: str) -> str:
        if self.mta == "sendmail":
            return f"250 2.1.5 <{rcpt}>... Recipient ok"
        return "250 2.1.5 Ok"

    @property
    def no_recipients_data_reply(self) -> str:
        """The reply to DATA when every recipient was refused."""
        if self.mta == "sendmail":
            return "503 5.0.0 Need RCPT (recipient)"
        return "554 5.5.1 Error: no valid recipients"

    @property
    def milter_down_reply(self) -> str:
        """The reply to MAIL FROM when the milter cannot be reached."""
        if self.mta == "sendmail":
            return "451 4.3.2 Please try again later"  # F=T
        return "451 4.7.1 Service unavailable - try again later"  # milter_default_action

    def policy_down_reply(self, rcpt: str) -> str:
        """The reply to RCPT TO when the policy service cannot be reached."""
        return self.as_client_sees(POLICY_DOWN_REPLY, rcpt)

    @property
    def milter_down_starttls_reply(self) -> str:
        """The reply to STARTTLS when the milter cannot be reached."""
        if self.mta == "sendmail":
            return "454 4.7.0 Please try again later"
        return "454 4.3.0 Try again later"

    # -- running a scenario -----------------------------------------------

    def use(self, config: dict[str, Any]) -> None:
        self.milter.ensure(config)

    def session(self, cert: Optional[str] = None, **kwargs: Any) -> Session:
        """An open SMTP session; ``cert`` names a client certificate of the PKI."""
        credential = self.pki.clients[cert] if cert else None
        return Session(self.port, cert=credential, **kwargs)

    def run(
        self,
        mail_from: str,
        rcpts: list[str],
        cert: Optional[str] = None,
        *,
        session: Optional[Session] = None,
        check_explain: bool = True,
        mta_refuses: Collection[str] = (),
        delivered_as: Optional[Mapping[str, str]] = None,
        **kwargs: Any,
    ) -> Outcome:
        """One transaction; wait for its decisions and, if queued, its delivery.

        Without ``session`` a new SMTP session is opened (``kwargs`` as for
        ``Session``) and closed afterwards. ``mta_refuses``: recipients the MTA
        itself refuses, so relaymilter never sees them. ``delivered_as``: the
        address the sink gets for an accepted recipient that the MTA rewrites
        (``kate%contoso.com@relay.contoso.com`` arrives as ``kate@contoso.com``).
        """
        if session is None:
            with self.session(cert, **kwargs) as fresh:
                return self.run(
                    mail_from,
                    rcpts,
                    session=fresh,
                    check_explain=check_explain,
                    mta_refuses=mta_refuses,
                    delivered_as=delivered_as,
                )
        offset = self.milter.offset()
        txn = session.transaction(mail_from, rcpts)
        reached_milter = [
            r for r, reply in txn.rcpts.items() if reply.code != 503 and r not in mta_refuses
        ]
        found = self.milter.wait_decisions(offset, len(reached_milter)) if reached_milter else []
        assert len(found) == len(reached_milter), f"decisions {found} for {reached_milter}"
        # One connection judges its recipients in order: the n-th line is the n-th RCPT.
        decisions = dict(zip(reached_milter, found))
        for rcpt, decision in decisions.items():
            seen = self.recipient_seen(rcpt)
            assert decision["to"] in (seen, _without_source_route(seen)), (rcpt, decision)
        delivered = self.sink.wait(txn.token) if txn.queued else None
        outcome = Outcome(txn, decisions, delivered)
        if delivered is not None:
            expected = sorted((delivered_as or {}).get(r, r) for r in txn.accepted)
            assert sorted(delivered.rcpts) == expected, (
                f"the sink got {delivered.rcpts}, expected {expected}"
            )
            assert delivered.mail_from == mail_from
        if check_explain and decisions:
            self.check_explain(outcome, session)
        return outcome

    # -- relaymilter explain must agree with the live decision ---------------

    def macros(self, cert: Optional[Credential], starttls: bool) -> list[str]:
        """explain's arguments for the certificate macros this MTA sends."""
        if not starttls:
            return []
        if self.front == "policy":
            # Subject and issuer CN only for a trusted chain (the service takes
            # no certificate without them); the digests as Postfix computes them.
            if cert is None or not self._trusted(cert):
                return []
            return [
                "--cert-subject",
                cert.subject_cn,
                "--cert-issuer",
                cert.issuer_cn,
                "--cert-fingerprint",
                cert.fingerprints[self.digest],
            ]
        if self.mta == "postfix":
            # Postfix sends subject and issuer CN, and only for a trusted chain.
            if cert is None or not self._trusted(cert):
                return []
            return ["--cert-subject", cert.subject_cn, "--cert-issuer", cert.issuer_cn]
        if cert is None:
            return ["--verify", "NO"]
        return [
            "--verify",
            "OK" if self._trusted(cert) else "FAIL",
            "--cert-subject",
            xtext(f"/CN={cert.subject_cn}"),
            "--cert-issuer",
            xtext(f"/CN={cert.issuer_cn}"),
            "--cn-subject",
            xtext(cert.subject_cn),
            "--cn-issuer",
            xtext(cert.issuer_cn),
            "--cert-fingerprint",
            cert.sha256,
        ]

    def _trusted(self, cert: Credential) -> bool:
        return any(cert is self.pki.clients[name] for name in MTA_TRUSTED)

    def check_explain(self, outcome: Outcome, session: Session) -> None:
        """``relaymilter explain``, fed the macros this MTA sent, must agree.

        That includes ``{rcpt_addr}``: each decision's ``mta_rcpt`` (``-`` when
        the MTA's address was the one given) goes back in as ``--rcpt-addr``.
        """
        args = ["--client-address", session.source_ip, "--mail-from", outcome.txn.mail_from]
        args += self.macros(session.cert, session.starttls)
        decisions = list(outcome.decisions.items())
        for rcpt, _ in decisions:
            args.append(f"--rcpt={self.recipient_seen(rcpt)}")
        if any(d.get("mta_rcpt", "-") != "-" for _, d in decisions):
            for rcpt, decision in decisions:
                mta_rcpt = decision["mta_rcpt"]
                args.append(f"--rcpt-addr={rcpt if mta_rcpt == '-' else mta_rcpt}")
        result = explain(self.milter.config_path, args)
        assert len(result["recipients"]) == len(decisions), result
        for (rcpt, decision), predicted in zip(decisions, result["recipients"]):
            assert (predicted["action"], predicted["reason"]) == (
                decision["action"],
                decision["reason"],
            ), f"explain disagrees with {self.name} for {rcpt}: {predicted} vs {decision}"
            if "route" in decision and "route" in predicted:
                hops = ",".join(h or "?" for h in predicted["route"]) or "-"
                assert hops == decision["route"], (rcpt, predicted, decision)
            if "mta_rcpt" in decision and "mta_rcpt" in predicted:
                assert (predicted["mta_rcpt"] or "-") == decision["mta_rcpt"], (rcpt, predicted)
            if decision["action"] == "continue":
                assert predicted["reply"] is None, predicted
            else:
                # What relaymilter answers (or, in monitor mode, would have
                # answered) is the refusal the client gets, bar Sendmail's prefix.
                assert self.as_client_sees(predicted["reply"], rcpt) == self.refusal(rcpt), (
                    predicted["reply"]
                )
                if decision["action"] == "reject":
                    assert outcome.reply(rcpt) == self.refusal(rcpt), outcome.reply(rcpt)
        attribution = result["attribution"]
        live = decisions[0][1]
        for key in ("organization", "connector", "kind"):
            assert (attribution[key] or "-") == live[key], (key, attribution, live)


def postfix_internal_form(address: str) -> str:
    """An address as Postfix hands it to a policy service (observed with Postfix 3.7).

    The source route is dropped and a quoted local part unquoted, its
    backslash escapes undone; the rest is as the client wrote it.
    """
    address = _without_source_route(address)
    if address.startswith('"'):
        end = 1
        local = []
        while end < len(address) and address[end] != '"':
            if address[end] == "\\" and end + 1 < len(address):
                end += 1
            local.append(address[end])
            end += 1
        return "".join(local) + address[end + 1 :]
    return address


def _without_source_route(address: str) -> str:
    """``@a,@b:user@c`` without its source route (as older decision lines wrote it)."""
    if address.startswith("@") and ":" in address:
        return address.split(":", 1)[1]
    return address


def is_tempfail(reply: Optional[Reply]) -> bool:
    return reply is not None and 400 <= reply.code < 500
