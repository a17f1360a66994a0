"""The log lines every front end writes: a decision, an internal error, a stale snapshot.

The milter and the policy service describe a transaction in the same decision
record (``decisionlog.record``), so that ``report`` and ``replay`` read either
alike; only the connection number and the certificate fields come from the
front end.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

from ..core.domains import strip_envelope
from ..core.model import STALE_SNAPSHOT_REPLY, Config
from ..core.policy import Decision, Transaction
from ..decisionlog.journal import FIELDS_ATTR
from ..decisionlog.logfmt import log_fields, quote
from ..decisionlog.record import DecisionRecord, QuotedRecord, certificate_fields

logger = logging.getLogger("relaymilter")


def transaction_record(
    conn: str,
    client: str,
    transaction: Optional[Transaction],
    mail_from: str,
    config: Config,
    certificate_macros: Mapping[str, str],
) -> QuotedRecord:
    """The part of the decision record that is the same for every recipient of a transaction."""
    attribution = transaction.attribution if transaction else None
    record = DecisionRecord(
        conn=conn,
        client=client,
        organization=attribution.organization.name if attribution else None,
        connector=attribution.connector_name if attribution else None,
        kind=attribution.kind if attribution else None,
        certificate=attribution.certificate_name if attribution else None,
        sender=transaction.sender.address if transaction else strip_envelope(mail_from),
        config=config.identity,
        **certificate_fields(certificate_macros),
    )
    return record.quoted()


def log_decision(base: QuotedRecord, decision: Decision, queue_id: str, recipient: str) -> None:
    """One decision line (and the same values as journal fields)."""
    record = base.record._replace(
        queue_id=queue_id,
        recipient=decision.recipient or strip_envelope(recipient),
        route=decision.route.describe(),
        mta_rcpt=decision.resolved,
        mode=decision.mode,
        action=decision.action,
        reason=decision.reason,
    )
    # The journal handler builds the fields from the record, only when it writes.
    logger.info("%s", record.line(base), extra={FIELDS_ATTR: record})


def log_internal_error(
    conn: str, queue_id: str, client: str, recipient: str, where: str, on_error: str
) -> None:
    """An exception while deciding: logged with its traceback, and what is answered."""
    logger.error(
        "conn=%s queue_id=%s client=%s to=%s internal error in %s; answering per on_error=%s",
        conn,
        quote(queue_id),
        client,
        quote(f"<{strip_envelope(recipient)}>"),
        where,
        on_error,
        exc_info=True,
        extra=log_fields(action="tempfail", queue_id=queue_id, client_address=client),
    )


def log_stale_snapshot(conn: str, queue_id: str, client: str, recipient: str) -> None:
    """No decision on data older than max_snapshot_age: the client retries later."""
    logger.warning(
        "conn=%s queue_id=%s client=%s to=%s tempfail: the snapshot is older than "
        "max_snapshot_age; answering %s",
        conn,
        quote(queue_id),
        client,
        quote(f"<{strip_envelope(recipient)}>"),
        STALE_SNAPSHOT_REPLY,
        extra=log_fields(
            action="tempfail",
            reason="stale-snapshot",
            queue_id=queue_id,
            client_address=client,
        ),
    )
