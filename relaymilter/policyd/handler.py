"""One policy connection's requests, each turned into a ``core.policy`` decision and an action.

Postfix's smtpd keeps a connection to the policy service and sends over it a
request per restriction check, for one SMTP session after another. At
``protocol_state=RCPT`` the recipient is judged exactly as the milter judges
it (the same ``Transaction``, the same decision record, metrics and counts);
at any other stage the answer is ``DUNNO``. The answer is ``DUNNO`` or a
refusal, never ``OK``: wherever an admin lists the service, it can refuse a
recipient but never let one through that the other restrictions would stop.

A transaction is the requests with the same ``instance`` (Postfix's name for
one message on one SMTP connection), client and sender: its ``Transaction``
and the record's common part are made at its first recipient, with the
config in force then, and kept for the next recipients.
"""

from __future__ import annotations

import itertools
import logging
from time import perf_counter
from typing import Dict, Mapping, NamedTuple, Optional, Tuple

from ..core.domains import parse_envelope_address
from ..core.model import ON_ERROR_TEMPFAIL, STALE_SNAPSHOT_REPLY, TEMPFAIL_REPLY, Config
from ..core.networks import parse_client_address
from ..core.policy import REFUSING_ACTIONS, Transaction, recipient_of
from ..core.tlsidentity import PUBKEY_FINGERPRINT, certificate_from_mapping
from ..daemon.decisions import (
    log_decision,
    log_internal_error,
    log_stale_snapshot,
    transaction_record,
)
from ..daemon.runtime import Runtime, observe
from ..decisionlog.logfmt import quote
from ..decisionlog.record import QuotedRecord
from .protocol import DUNNO, STATE_RCPT, action_of

logger = logging.getLogger("relaymilter")

_connection_numbers = itertools.count(1)

#: The certificate attributes, and the macro names the core knows them by.
CERTIFICATE_ATTRIBUTES = (
    ("ccert_subject", "{cert_subject}"),
    ("ccert_issuer", "{cert_issuer}"),
    ("ccert_fingerprint", "{cert_fp}"),
    ("ccert_pubkey_fingerprint", PUBKEY_FINGERPRINT),
)
TEMPFAIL_ACTION = action_of(TEMPFAIL_REPLY)
STALE_SNAPSHOT_ACTION = action_of(STALE_SNAPSHOT_REPLY)


class TransactionKey(NamedTuple):
    instance: str
    client: str
    sender: str
    certificate: Tuple[str, ...]


class OpenTransaction(NamedTuple):
    key: TransactionKey
    config: Config
    transaction: Transaction
    client_label: str
    record: QuotedRecord


def certificate_macros(attributes: Mapping[str, str]) -> Dict[str, str]:
    """The certificate as the milter would get it, under the macros' names.

    Postfix sends ``ccert_subject`` only for a verified certificate (the
    digests come for any): without it there is no certificate, as for the
    milter.
    """
    if not attributes.get("ccert_subject"):
        return {}
    return {
        macro: attributes[name] for name, macro in CERTIFICATE_ATTRIBUTES if attributes.get(name)
    }


class RequestHandler:
    """The requests of one connection from Postfix, answered one at a time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.number = str(next(_connection_numbers))
        self.current: Optional[OpenTransaction] = None

    def answer(self, attributes: Mapping[str, str]) -> str:
        """The action for one request (its attributes, as ``protocol.parse_request`` gives them)."""
        if attributes.get("protocol_state") != STATE_RCPT:
            return DUNNO
        metrics = self.runtime.metrics
        if metrics is None:
            return self._answer_rcpt(attributes)
        started = perf_counter()
        action = self._answer_rcpt(attributes)
        observe(metrics.rcpt_seconds, perf_counter() - started)
        return action

    def _answer_rcpt(self, attributes: Mapping[str, str]) -> str:
        runtime = self.runtime
        recipient = attributes.get("recipient", "")
        try:
            if runtime.snapshot_stale and not runtime.config.monitor_only:
                return self._stale_snapshot(attributes, recipient)
            current = self._transaction(attributes)
            decision = current.transaction.judge(recipient_of(recipient))
            log_decision(current.record, decision, _queue_id(attributes), recipient)
            runtime.counter.count(decision)
            if runtime.metrics is not None:
                observe(runtime.metrics.decision, current.transaction.attribution, decision)
            if decision.action in REFUSING_ACTIONS and decision.reply is not None:
                return action_of(decision.reply)
            return DUNNO
        except Exception:
            return self._internal_error(attributes, recipient)

    def _transaction(self, attributes: Mapping[str, str]) -> OpenTransaction:
        macros = certificate_macros(attributes)
        key = TransactionKey(
            attributes.get("instance", ""),
            attributes.get("client_address", ""),
            attributes.get("sender", ""),
            tuple(macros.values()),
        )
        current = self.current
        if current is not None and current.key == key:
            return current
        # Captured once per transaction: a reload never changes one halfway through.
        config = self.runtime.config
        address = parse_client_address(key.client)
        label = str(address) if address else quote(key.client)
        presented = certificate_from_mapping(macros)
        sender = parse_envelope_address(key.sender)
        transaction = Transaction(config, address, presented, sender)
        record = transaction_record(self.number, label, transaction, key.sender, config, macros)
        self.current = OpenTransaction(key, config, transaction, label, record)
        return self.current

    def _stale_snapshot(self, attributes: Mapping[str, str], recipient: str) -> str:
        client = _client_label(attributes)
        log_stale_snapshot(self.number, _queue_id(attributes), client, recipient)
        if self.runtime.metrics is not None:
            observe(self.runtime.metrics.stale_snapshot)
        return STALE_SNAPSHOT_ACTION

    def _internal_error(self, attributes: Mapping[str, str], recipient: str) -> str:
        config = self.runtime.config
        try:
            log_internal_error(
                self.number,
                _queue_id(attributes),
                _client_label(attributes),
                recipient,
                "request",
                config.on_error,
            )
        except Exception:  # not even the log line: still an answer
            logger.error("conn=%s internal error", self.number, exc_info=True)
        self.runtime.counter.count(None)
        metrics = self.runtime.metrics
        if metrics is not None:
            observe(metrics.internal_error, "request")
        if config.on_error != ON_ERROR_TEMPFAIL:
            return DUNNO
        if metrics is not None:
            observe(metrics.tempfail)
        return TEMPFAIL_ACTION


def _queue_id(attributes: Mapping[str, str]) -> str:
    return attributes.get("queue_id") or "NOQUEUE"


def _client_label(attributes: Mapping[str, str]) -> str:
    text = attributes.get("client_address", "")
    address = parse_client_address(text)
    return str(address) if address else quote(text)
