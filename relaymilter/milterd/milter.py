"""The pymilter adapter: one RelayMilter per SMTP connection, judging each RCPT TO.

Thin by design: it reads the envelope and the MTA's macros, hands them to
``relaymilter.policy`` and turns the decision into a milter reply. It
negotiates away every protocol step it does not use and asks the MTA for the
macros it needs itself (so attaching it needs no ``milter_*_macros`` edits).
"""

from __future__ import annotations

import itertools
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import Milter

from ..core.model import ON_ERROR_TEMPFAIL, STALE_SNAPSHOT_REPLY, TEMPFAIL_REPLY, Reply
from ..core.networks import IPAddress, parse_client_address
from ..core.policy import REFUSING_ACTIONS, Decision, Transaction
from ..core.tlsidentity import certificate_from_mapping, certificate_macros
from ..daemon.decisions import (
    log_decision,
    log_internal_error,
    log_stale_snapshot,
    transaction_record,
)
from ..daemon.runtime import Runtime, observe
from ..decisionlog.logfmt import quote
from ..decisionlog.record import QuotedRecord

if TYPE_CHECKING:  # imported only with a metrics: section (prometheus_client)
    from ..daemon.metrics import Metrics

logger = logging.getLogger("relaymilter")

#: The certificate macros. Both MTAs compute TLS macros at any stage, so asking
#: for them at RCPT TO (not only at EHLO) still works when a client skips the
#: second EHLO after STARTTLS.
MAIL_MACROS = ("{cert_subject}", "{cert_issuer}", "{verify}", "{cn_subject}", "{cn_issuer}")
#: Macros asked for at RCPT TO: the queue id (Postfix sets it only after the
#: first accepted recipient), the client address (so that the connect step,
#: and its Python call, can be skipped), Sendmail's certificate fingerprints,
#: and the recipient as the MTA resolved it (Postfix applies the percent hack,
#: bang paths and dequoting there), which must be internal too.
RCPT_MACROS = ("i", "{client_addr}", "{cert_fp}", "{cert_md5}", "{rcpt_addr}")
#: Every macro is asked for at RCPT TO, the only step that needs them, and every
#: other step gets an empty list. Sendmail writes a step's macro packet and its
#: command in two write()s; over TCP the second waits for our delayed ACK of the
#: first (Nagle), about 40 ms. With an empty list Sendmail sends no macro packet
#: at all (a list of unknown names would still send an empty one), so only RCPT
#: TO pays. Sendmail picks the milter's end-of-message list only when the milter
#: also sent an end-of-headers list (milter_data() tests the EOH flag for both),
#: hence the EOH entry. Postfix writes macros and command in one write and treats
#: an empty list as "use main.cf's list": no change there.
SYMLISTS = (
    (Milter.M_CONNECT, ()),
    (Milter.M_HELO, ()),
    (Milter.M_ENVFROM, ()),
    (Milter.M_ENVRCPT, MAIL_MACROS + RCPT_MACROS),
    (Milter.M_DATA, ()),
    (Milter.M_EOH, ()),
    (Milter.M_EOM, ()),
)

# The protocol steps asked of the MTA. The MTA never sends headers, body or
# unknown commands, nor HELO (its macros still arrive), and the callbacks that
# only take note (connect, MAIL FROM) are not answered.
LOCAL_PROTOCOL = (
    Milter.P_NOHELO
    | Milter.P_NOHDRS
    | Milter.P_NOBODY
    | Milter.P_NOUNKNOWN
    | Milter.P_NODATA
    | Milter.P_NOEOH
    | Milter.P_NR_CONN
    | Milter.P_NR_MAIL
)
# Over TCP, every write the MTA makes must be answered: Postfix sends a macro
# packet even for a skipped step, and two unanswered writes in a row meet
# Nagle's algorithm on the MTA side and a delayed ACK on ours, a 40 ms stall
# per message. DATA and end-of-headers are therefore taken (pymilter answers
# them in C, there is no Python callback) and every step gets a reply.
STREAM_PROTOCOL = Milter.P_NOHELO | Milter.P_NOHDRS | Milter.P_NOBODY | Milter.P_NOUNKNOWN

_connection_ids = itertools.count(1)

# pymilter's constants, typed.
CONTINUE: int = Milter.CONTINUE
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL


class RelayMilter(Milter.Base):  # type: ignore[misc]
    """The milter for one SMTP connection."""

    #: The process's config in force, counts, metrics and snapshot state
    #: (set by the service before it serves).
    runtime: Runtime
    #: Whether the milter listens on TCP (inet/inet6) rather than a unix socket.
    stream_socket = False

    def __init__(self) -> None:
        # Captured once: a reload never changes a connection halfway through.
        self.config = RelayMilter.runtime.config
        self.connection_id = next(_connection_ids)
        self.client_address: Optional[IPAddress] = None
        self.client_label = "unknown"
        self.mail_from = ""
        self.transaction: Optional[Transaction] = None
        #: The transaction's part of every decision record (built at its first recipient).
        self._record: Optional[QuotedRecord] = None
        #: The certificate macros of the current transaction, as the MTA sent them.
        self.certificate_macros: Dict[str, str] = {}
        self.failed_in: Optional[str] = None
        if RelayMilter.runtime.metrics is not None:
            observe(RelayMilter.runtime.metrics.connection_opened)

    # -- negotiation -------------------------------------------------------

    def negotiate(self, opts: List[int]) -> Any:
        """Ask for no modification actions, only the protocol steps we use, and our macros."""
        try:
            offered_actions, offered_protocol, _, _ = opts
            self._actions = offered_actions & Milter.SETSYMLIST
            if self._actions:
                # The C call directly: Milter.Base.setsymlist in pymilter 1.0.5
                # passes bytes where the extension wants str.
                for stage, names in SYMLISTS:
                    try:
                        self._ctx.setsymlist(stage, " ".join(names))
                    except Milter.error:
                        # An old libmilter (2007 smfi.c) refuses an empty list: that
                        # step then keeps the MTA's own list, as before.
                        if names:
                            raise
            wanted = STREAM_PROTOCOL if RelayMilter.stream_socket else LOCAL_PROTOCOL
            if self._actions:
                # {client_addr} arrives at RCPT TO: the connect step is not needed.
                wanted |= Milter.P_NOCONNECT
            opts[0] = self._actions
            opts[1] = self._protocol = offered_protocol & wanted
            opts[2] = opts[3] = 0
            return CONTINUE
        except Exception:
            logger.error("conn=%d negotiate failed", self.connection_id, exc_info=True)
            if RelayMilter.runtime.metrics is not None:
                observe(RelayMilter.runtime.metrics.internal_error, "negotiate")
            return Milter.ALL_OPTS

    # -- callbacks ---------------------------------------------------------

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        try:
            text = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else None
            self.client_address = parse_client_address(text)
            self.client_label = (
                str(self.client_address) if self.client_address else quote(str(hostaddr))
            )
        except Exception:
            self._note_failure("connect")
        return CONTINUE

    @Milter.noreply
    def envfrom(self, mailfrom: str, *params: str) -> int:
        # A new transaction: nothing of the previous one carries over.
        self.mail_from = mailfrom
        self.transaction = None
        self._record = None
        self.certificate_macros = {}
        return CONTINUE

    def envrcpt(self, to: str, *params: str) -> int:
        metrics = RelayMilter.runtime.metrics
        if metrics is None:
            return self._envrcpt(to)
        started = perf_counter()
        answer = self._envrcpt(to, metrics)
        observe(metrics.rcpt_seconds, perf_counter() - started)
        return answer

    def _envrcpt(self, to: str, metrics: Optional[Metrics] = None) -> int:
        runtime = RelayMilter.runtime
        if runtime.snapshot_stale and not self.config.monitor_only:
            return self._stale_snapshot(to)
        try:
            if self.failed_in is not None:
                raise RuntimeError(f"earlier failure in {self.failed_in}")
            if self.transaction is None:
                if self.client_address is None:
                    self._client_from_macro()
                self.certificate_macros = certificate_macros(self.getsymval)
                presented = certificate_from_mapping(self.certificate_macros)
                self.transaction = Transaction(
                    self.config, self.client_address, presented, self.mail_from
                )
            decision = self.transaction.decide(to, self.getsymval("{rcpt_addr}"))
            self._log_decision(decision, to)
            runtime.counter.count(decision)
            if metrics is not None:
                observe(metrics.decision, self.transaction.attribution, decision)
            if decision.action in REFUSING_ACTIONS and decision.reply is not None:
                return self._refuse(decision.reply)
            return CONTINUE
        except Exception:
            return self._internal_error("envrcpt", to)

    def close(self) -> int:
        if RelayMilter.runtime.metrics is not None:
            observe(RelayMilter.runtime.metrics.connection_closed)
        return CONTINUE

    # -- helpers -----------------------------------------------------------

    def _client_from_macro(self) -> None:
        text = self.getsymval("{client_addr}")
        self.client_address = parse_client_address(text)
        self.client_label = str(self.client_address) if self.client_address else quote(text)

    def _queue_id(self) -> str:
        try:
            return self.getsymval("i") or "NOQUEUE"
        except Exception:
            return "NOQUEUE"

    def _refuse(self, reply: Reply) -> int:
        # Sendmail uses the text as a printf format; Postfix turns %% back into %.
        self.setreply(reply.code, reply.status, reply.text.replace("%", "%%"))
        return REJECT if reply.is_permanent else TEMPFAIL

    def _note_failure(self, where: str) -> None:
        # A no-reply callback must not fail: remember, and answer at RCPT.
        logger.error(
            "conn=%d client=%s internal error in %s",
            self.connection_id,
            self.client_label,
            where,
            exc_info=True,
        )
        self.failed_in = where
        if RelayMilter.runtime.metrics is not None:
            observe(RelayMilter.runtime.metrics.internal_error, where)

    def _internal_error(self, where: str, recipient: str) -> int:
        log_internal_error(
            str(self.connection_id),
            self._queue_id(),
            self.client_label,
            recipient,
            where,
            self.config.on_error,
        )
        runtime = RelayMilter.runtime
        runtime.counter.count(None)
        metrics = runtime.metrics
        if metrics is not None:
            observe(metrics.internal_error, where)
        if self.config.on_error != ON_ERROR_TEMPFAIL:
            return CONTINUE
        if metrics is not None:
            metrics.tempfail()
        try:
            self.setreply(TEMPFAIL_REPLY.code, TEMPFAIL_REPLY.status, TEMPFAIL_REPLY.text)
        except Exception:
            logger.error("conn=%d setreply failed", self.connection_id, exc_info=True)
        return TEMPFAIL

    def _stale_snapshot(self, recipient: str) -> int:
        """No decision on data older than max_snapshot_age: the client retries later."""
        try:
            if self.client_address is None:
                self._client_from_macro()
            log_stale_snapshot(
                str(self.connection_id), self._queue_id(), self.client_label, recipient
            )
            if RelayMilter.runtime.metrics is not None:
                observe(RelayMilter.runtime.metrics.stale_snapshot)
            reply = STALE_SNAPSHOT_REPLY
            self.setreply(reply.code, reply.status, reply.text)
        except Exception:
            logger.error("conn=%d stale-snapshot reply failed", self.connection_id, exc_info=True)
        return TEMPFAIL

    def _log_decision(self, decision: Decision, recipient: str) -> None:
        if self._record is None:
            self._record = transaction_record(
                str(self.connection_id),
                self.client_label,
                self.transaction,
                self.mail_from,
                self.config,
                self.certificate_macros,
            )
        log_decision(self._record, decision, self._queue_id(), recipient)
