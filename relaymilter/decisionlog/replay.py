"""``relaymilter replay``: decide every logged recipient again under a candidate config.

Pure Python, no pymilter. Each record goes through ``policy.Transaction``, the
milter's own path, with the certificate rebuilt from the recorded macros
exactly as ``explain`` builds it (``tlsidentity.certificate_from_mapping``).
The result is the difference, per group as in ``report``: flows that would
newly be refused and flows that would newly pass.

Outcomes are ordered: pass (``continue``) < ``would-reject`` (monitor) <
refused (``reject``, ``soft-reject``). A flow whose outcome rises is newly
refused (so switching a scope from monitor to enforce lists the flows that
monitor mode only warned about); one whose outcome falls is newly allowed.

Records written before the decision record carried the certificate macros
and the mode (they lack ``mode``) are replayed as far as they allow: a
certificate attribution is approximated by its matched name as a verified
subject CN, and they are counted apart.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from ..core.domains import envelope_address
from ..core.model import Config
from ..core.networks import parse_client_address
from ..core.policy import ACTION_CONTINUE, ACTION_WOULD_REJECT, Transaction, recipient_of
from ..core.tlsidentity import PresentedCertificate, certificate_from_mapping
from .logfmt import escape
from .logsource import Entry, Stats, iso
from .record import DecisionRecord
from .report import Aggregator, Remedies, group_rows, table_lines

EXIT_NOTHING_NEWLY_REFUSED = 0
EXIT_NEWLY_REFUSED = 1
EXIT_ERROR = 2


def level(action: Optional[str]) -> int:
    if action is None or action == ACTION_CONTINUE:
        return 0
    if action == ACTION_WOULD_REJECT:
        return 1
    return 2


def is_partial(record: DecisionRecord) -> bool:
    """A record of a version before the certificate macros and the mode were logged."""
    return record.mode is None


def presented_certificate(record: DecisionRecord) -> Optional[PresentedCertificate]:
    """The certificate as the MTA described it, rebuilt as ``explain`` does from its options."""
    if record.cert_subject is None and is_partial(record):
        if record.kind == "certificate" and record.certificate:
            # Older records: only the name that matched; take it as a verified CN.
            return certificate_from_mapping({"{cert_subject}": record.certificate})
        return None
    return certificate_from_mapping(record.certificate_macros())


class Replayer:
    """Re-decides records; transactions are cached per connection-level inputs."""

    CACHE = 4096

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: Dict[Tuple[Optional[str], ...], Transaction] = {}

    def decide(self, record: DecisionRecord) -> DecisionRecord:
        # Everything Transaction() is built from: the client, the certificate
        # (its macros, or for older records the name that matched) and the sender.
        key = (
            record.client,
            *record.certificate_macros().values(),
            record.kind,
            record.certificate,
            record.mode,
            record.sender,
        )
        transaction = self._cache.get(key)
        if transaction is None:
            if len(self._cache) >= self.CACHE:
                self._cache.clear()
            address = parse_client_address(record.client) if record.client else None
            # The record holds the addresses as the milter judged them, their
            # brackets already taken off: they are not parsed again.
            sender = envelope_address(record.sender or "")
            transaction = Transaction(self.config, address, presented_certificate(record), sender)
            self._cache[key] = transaction
        decision = transaction.judge(recipient_of(record.recipient or "", record.mta_rcpt))
        attribution = transaction.attribution
        return record._replace(
            organization=attribution.organization.name if attribution else None,
            connector=attribution.connector_name if attribution else None,
            kind=attribution.kind if attribution else None,
            certificate=attribution.certificate_name if attribution else None,
            mode=decision.mode,
            config=self.config.identity,
            action=decision.action,
            reason=decision.reason,
        )


class ReplayResult(NamedTuple):
    period: Dict[str, Optional[str]]
    totals: Dict[str, Any]
    newly_refused: List[Dict[str, Any]]
    newly_allowed: List[Dict[str, Any]]

    @property
    def exit_status(self) -> int:
        return EXIT_NEWLY_REFUSED if self.newly_refused else EXIT_NOTHING_NEWLY_REFUSED


def replay(
    entries: Iterable[Entry],
    config: Config,
    since: Optional[float] = None,
    until: Optional[float] = None,
    top: int = 20,
    stats: Optional[Stats] = None,
) -> ReplayResult:
    replayer = Replayer(config)
    refused = Aggregator(lambda record: True)
    allowed = Aggregator(lambda record: True)
    # The old organizations' domains help name the remedies of newly refused flows.
    everything = Aggregator(lambda record: False)
    replayed = partial = partial_changed = unchanged = cut = 0
    first: Optional[float] = None
    last: Optional[float] = None
    hosts = set()
    for entry in entries:
        old = entry.record
        replayed += 1
        if is_partial(old):
            partial += 1
        if entry.host:
            hosts.add(entry.host)
        if entry.time is not None:
            first = entry.time if first is None or entry.time < first else first
            last = entry.time if last is None or entry.time > last else last
        if entry.cut:
            # A log line showed a value cut: deciding on part of an address
            # would be a guess. The journal keeps it whole.
            cut += 1
            continue
        new = replayer.decide(old)
        everything.add(entry, new)
        before, after = level(old.action), level(new.action)
        if after != before and is_partial(old):
            # An older record lacks what decided it (the certificate's issuer,
            # say): a change may be the record's gap, not the config's. Counted
            # apart, never gating a deployment.
            partial_changed += 1
        elif after > before:
            refused.add(entry, new)
        elif after < before:
            allowed.add(entry, new)
        else:
            unchanged += 1
    refused.own_domains = everything.own_domains
    refused_rows = group_rows(refused, Remedies(refused, config), top)
    allowed_rows = group_rows(allowed, lambda key, group: "", top)
    return ReplayResult(
        period={
            "since": iso(since if since is not None else first),
            "until": iso(until if until is not None else last),
        },
        totals={
            "config": config.identity,
            "records": replayed,
            "relays": sorted(hosts),
            "partial": partial,
            "partial_changed": partial_changed,
            "cut": cut,
            "unchanged": unchanged,
            "newly_refused": refused.decisions,
            "newly_allowed": allowed.decisions,
            "unreadable_lines": stats.unreadable if stats else 0,
            "undated_skipped": stats.undated_skipped if stats else 0,
            "errors": list(stats.errors) if stats else [],
        },
        newly_refused=refused_rows,
        newly_allowed=allowed_rows,
    )


def as_json(result: ReplayResult) -> str:
    data = {
        "period": result.period,
        "totals": result.totals,
        "newly_refused": result.newly_refused,
        "newly_allowed": result.newly_allowed,
    }
    # ASCII: values from the journal may hold undecodable bytes (lone surrogates).
    return json.dumps(data, indent=2, ensure_ascii=True)


def as_text(result: ReplayResult) -> str:
    t = result.totals
    lines = [
        f"relaymilter replay under config {t['config']}",
        f"period {result.period['since'] or '-'} to {result.period['until'] or '-'}; "
        f"records: {t['records']} ({t['partial']} from older versions, replayed as far as "
        f"they allow; {t['partial_changed']} of them changed, not counted below); "
        f"unchanged: {t['unchanged']}; newly refused: {t['newly_refused']}; "
        f"newly allowed: {t['newly_allowed']}",
    ]
    if t["cut"]:
        lines.append(
            f"{t['cut']} record(s) not replayed: their log line shows a value cut (too long "
            "for a line); the journal has them whole (--journal)"
        )
    if t["unreadable_lines"]:
        lines.append(f"{t['unreadable_lines']} decision line(s) could not be read (truncated?)")
    lines.extend(f"error: {escape(e)}" for e in t["errors"])
    lines += ["", "newly refused:"]
    lines.extend(table_lines(result.newly_refused) if result.newly_refused else ["  none"])
    lines += ["", "newly allowed:"]
    lines.extend(table_lines(result.newly_allowed) if result.newly_allowed else ["  none"])
    return "\n".join(lines) + "\n"
