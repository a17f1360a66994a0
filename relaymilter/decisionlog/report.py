"""``relaymilter report``: what enforcing would break, and what it did, from the decision log.

Pure Python, no pymilter. Records stream in from ``logsource``; only the groups
are kept (organization x connector x client address x sender domain x reason x
action), each with bounded state: counts, distinct recipients and recipient
domains (exact up to ``Distinct.EXACT``, then a K-minimum-values estimate),
first and last seen, and a few sample queue ids. And at most
``2 * Aggregator.MAX_GROUPS`` groups are open at once: past that, the
smaller half is let go (their records are counted in "other"), so memory is
bounded whatever the input, however many sender domains or clients a log has.
A group kept from its first record has an exact count; one opened after
groups were let go may miss up to as many records as the largest group let
go had, and says so (``count_error``).

Each refused group gets a concrete remedy; the formats are aligned text,
``--json`` (a stable contract, see relaymilter(8)), ``--csv`` (the same
columns) and ``--html`` (one self-contained page with an inline SVG chart).
"""

from __future__ import annotations

import csv
import html
import io
import json
from array import array
from bisect import bisect_left
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from ..core.certnames import normalize_certificate_name
from ..core.domains import parent_domains
from ..core.model import Config
from ..core.networks import parse_client_address
from ..core.policy import ACTION_CONTINUE, ACTION_REJECT, ACTION_SOFT_REJECT, ACTION_WOULD_REJECT
from ..core.tlsidentity import certificate_from_mapping
from .logfmt import escape
from .logsource import Entry, Stats, iso
from .record import DecisionRecord

#: The actions a report lists by default: refused, or refused in enforce mode.
REFUSALS = frozenset((ACTION_REJECT, ACTION_SOFT_REJECT, ACTION_WOULD_REJECT))
NULL_SENDER = "<>"
SAMPLES = 5
#: The columns of --csv, and the keys of each group in --json, in order.
COLUMNS = (
    "organization",
    "connector",
    "client_address",
    "sender_domain",
    "reason",
    "action",
    "count",
    "recipients",
    "recipient_domains",
    "first_seen",
    "last_seen",
    "samples",
    "remedy",
    "count_error",
)
#: A client sending for this many foreign sender domains is forwarding mail.
FORWARDING_DOMAINS = 3


class Distinct:
    """A count of distinct values: exact up to EXACT values, then a K-minimum-values estimate.

    The values' 64-bit hashes are kept sorted in an array (8 bytes each): all
    of them up to EXACT, then only the K smallest, and the estimate is
    (K - 1) / the K-th smallest (in [0, 1)); its relative error is about
    1/sqrt(K), 6 %. At most about 2 KiB per count, however many values.
    """

    EXACT = 256
    K = 256
    __slots__ = ("_exact", "_hashes")

    def __init__(self) -> None:
        self._hashes = array("Q")
        self._exact = True

    def add(self, value: str) -> None:
        digest = hash(value) & 0xFFFFFFFFFFFFFFFF
        hashes = self._hashes
        position = bisect_left(hashes, digest)
        if position < len(hashes) and hashes[position] == digest:
            return
        if self._exact:
            hashes.insert(position, digest)
            if len(hashes) > self.EXACT:
                self._exact = False
                del hashes[self.K :]
        elif position < self.K:
            hashes.insert(position, digest)
            del hashes[self.K :]

    def __len__(self) -> int:
        if self._exact:
            return len(self._hashes)
        return round((self.K - 1) / (self._hashes[self.K - 1] / 18446744073709551616.0))


class GroupKey(NamedTuple):
    organization: Optional[str]
    connector: Optional[str]
    client_address: Optional[str]
    sender_domain: Optional[str]
    reason: Optional[str]
    action: Optional[str]


class Group:
    __slots__ = (
        "certificate",
        "count",
        "error",
        "first_seen",
        "last_seen",
        "recipient_domains",
        "recipients",
        "samples",
        "senders",
    )

    def __init__(self, error: int = 0) -> None:
        self.count = 0
        #: How many records of this group may be missing from ``count``: those it
        #: had before it was let go (see ``Aggregator``); 0 for an exact count.
        self.error = error
        self.recipients = Distinct()
        self.recipient_domains = Distinct()
        self.first_seen: Optional[float] = None
        self.last_seen: Optional[float] = None
        self.samples: List[str] = []
        #: Up to 3 distinct sender addresses (is it one application?).
        self.senders: List[str] = []
        #: The certificate the client presented, as (CN, trusted, verify, issuer CN), if any.
        self.certificate: Optional[Tuple[str, bool, Optional[str], Optional[str]]] = None


def sender_domain(sender: Optional[str]) -> str:
    if not sender:
        return NULL_SENDER
    _local, at, domain = sender.rpartition("@")
    return domain.lower().rstrip(".") if at and domain else sender.lower()


def recipient_domain(record: DecisionRecord) -> str:
    if record.route:
        return record.route.rsplit(",", 1)[-1]
    _, at, domain = (record.recipient or "").rpartition("@")
    return domain.lower() if at else ""


def _certificate(
    record: DecisionRecord,
) -> Optional[Tuple[str, bool, Optional[str], Optional[str]]]:
    if not record.cert_subject:
        return None
    presented = certificate_from_mapping(record.certificate_macros())
    if presented is None:
        return None
    return (
        presented.subject_cn or presented.subject,
        presented.trusted,
        record.verify,
        presented.issuer_cn,
    )


class OrganizationTotals:
    __slots__ = ("actions", "decisions", "modes")

    def __init__(self) -> None:
        self.decisions = 0
        self.actions: Dict[str, int] = {}
        #: The modes its decisions were made in (a rollout moves it through several).
        self.modes: Dict[str, int] = {}

    def as_dict(self, name: Optional[str]) -> Dict[str, Any]:
        refused = sum(self.actions.get(a, 0) for a in REFUSALS)
        return {
            "organization": name,
            "decisions": self.decisions,
            "would_reject": self.actions.get(ACTION_WOULD_REJECT, 0),
            "reject": self.actions.get(ACTION_REJECT, 0),
            "soft_reject": self.actions.get(ACTION_SOFT_REJECT, 0),
            "share": round(refused / self.decisions, 4) if self.decisions else 0.0,
            "modes": sorted(self.modes),
        }


class Aggregator:
    """Groups decision records; keeps only per-group, per-organization and per-day state.

    At most ``2 * MAX_GROUPS`` groups at once: when that many are open, all
    but the ``MAX_GROUPS`` largest are let go, their records counted in
    ``dropped_records``. A group that opens later may have been let go before,
    with at most ``dropped_largest`` records: that is its ``error``.
    """

    MAX_GROUPS = 10_000

    def __init__(
        self,
        include: Optional[Callable[[DecisionRecord], bool]] = None,
        max_groups: Optional[int] = None,
    ) -> None:
        self.include = include or (lambda record: record.action in REFUSALS)
        self.max_groups = max_groups or self.MAX_GROUPS
        self.groups: Dict[GroupKey, Group] = {}
        #: Groups let go to bound memory, their records, and the largest one's count.
        self.dropped_groups = 0
        self.dropped_records = 0
        self.dropped_largest = 0
        #: Records whose log line showed a value cut (grouped by the part kept).
        self.cut = 0
        self.organizations: Dict[Optional[str], OrganizationTotals] = {}
        #: (organization, UTC day) -> [would-reject, reject + soft-reject]
        self.days: Dict[Tuple[Optional[str], str], List[int]] = {}
        self.hosts: Set[str] = set()
        self.decisions = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        #: organization -> sender domains that passed as its own (remedy hints), bounded.
        self.own_domains: Dict[str, Dict[str, int]] = {}

    def add(self, entry: Entry, record: Optional[DecisionRecord] = None) -> None:
        record = record or entry.record
        moment = entry.time
        self.decisions += 1
        if entry.host:
            self.hosts.add(entry.host)
        if moment is not None:
            if self.first is None or moment < self.first:
                self.first = moment
            if self.last is None or moment > self.last:
                self.last = moment
        if entry.cut:
            self.cut += 1
        action = record.action or "-"
        totals = self.organizations.get(record.organization)
        if totals is None:
            totals = self.organizations[record.organization] = OrganizationTotals()
        totals.decisions += 1
        totals.actions[action] = totals.actions.get(action, 0) + 1
        if record.mode:
            totals.modes[record.mode] = totals.modes.get(record.mode, 0) + 1
        if record.reason == "sender-domain" and record.organization:
            self._own_domain(record.organization, sender_domain(record.sender))
        if action in REFUSALS and moment is not None:
            day = iso(moment)[:10]  # type: ignore[index]
            counts = self.days.setdefault((record.organization, day), [0, 0])
            counts[0 if action == ACTION_WOULD_REJECT else 1] += 1
        if self.include(record):
            self.add_to_group(record, moment)

    def add_to_group(self, record: DecisionRecord, moment: Optional[float]) -> None:
        key = GroupKey(
            record.organization,
            record.connector,
            record.client,
            sender_domain(record.sender),
            record.reason,
            record.action,
        )
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= 2 * self.max_groups:
                self._let_go()
            group = self.groups[key] = Group(self.dropped_largest)
            group.certificate = _certificate(record) if record.kind != "certificate" else None
        group.count += 1
        recipient = (record.recipient or "").lower()
        group.recipients.add(recipient)
        group.recipient_domains.add(recipient_domain(record))
        if moment is not None:
            if group.first_seen is None or moment < group.first_seen:
                group.first_seen = moment
            if group.last_seen is None or moment > group.last_seen:
                group.last_seen = moment
        queue_id = record.queue_id
        if (
            queue_id
            and queue_id != "NOQUEUE"
            and len(group.samples) < SAMPLES
            and queue_id not in group.samples
        ):
            group.samples.append(queue_id)
        sender = record.sender or ""
        if len(group.senders) < 3 and sender not in group.senders:
            group.senders.append(sender)

    def _let_go(self) -> None:
        """Keep the ``max_groups`` largest groups (the first opened, among equals)."""
        ordered = sorted(self.groups.items(), key=lambda item: -item[1].count)
        for _key, group in ordered[self.max_groups :]:
            self.dropped_groups += 1
            self.dropped_records += group.count
            self.dropped_largest = max(self.dropped_largest, group.count + group.error)
        self.groups = dict(ordered[: self.max_groups])

    def _own_domain(self, organization: str, domain: str) -> None:
        counts = self.own_domains.setdefault(organization, {})
        if domain in counts or len(counts) < 20:
            counts[domain] = counts.get(domain, 0) + 1


# -- remedies ----------------------------------------------------------------------


class Remedies:
    """The concrete fix for each refused group, from the config (if given) and the traffic."""

    def __init__(self, aggregator: Aggregator, config: Optional[Config] = None) -> None:
        self.aggregator = aggregator
        self.config = config
        foreign: Dict[Tuple[Optional[str], Optional[str]], Set[str]] = {}
        for key in aggregator.groups:
            if key.action in REFUSALS and key.sender_domain != NULL_SENDER:
                foreign.setdefault((key.organization, key.client_address), set()).add(
                    key.sender_domain or ""
                )
        self.forwarding = {
            client: len(domains)
            for client, domains in foreign.items()
            if len(domains) >= FORWARDING_DOMAINS
        }

    def domain_of(self, organization: Optional[str]) -> str:
        """A domain of the organization, for ``*.domain`` suggestions."""
        if self.config is not None:
            for org in self.config.organizations:
                if org.name == organization and org.accepted_domains:
                    return org.accepted_domains[0].domain
        counts = self.aggregator.own_domains.get(organization or "")
        if counts:
            return max(sorted(counts), key=lambda d: counts[d])
        return "your-domain.example"

    def registered_parent(self, organization: Optional[str], name: str) -> Optional[str]:
        """The accepted domain of the organization that ``name`` lies under, if any."""
        bare = name[2:] if name.startswith("*.") else name
        candidates = [self.domain_of(organization)]
        if self.config is not None:
            for org in self.config.organizations:
                if org.name == organization:
                    candidates = [a.domain for a in org.accepted_domains]
        for parent in parent_domains(bare):
            if parent in candidates:
                return parent
        return None

    def refusing_connector(self, name: str, issuer: Optional[str], client: str) -> Optional[str]:
        """A connector whose name matches the certificate, but whose other conditions did not."""
        if self.config is None:
            return None
        normalized = normalize_certificate_name(name)
        if normalized is None:
            return None
        address = parse_client_address(client)
        for _, candidate in self.config.certificate_connectors.lookup(normalized):
            connector = candidate.connector
            where = f"{candidate.organization.name}/{connector.name}"
            if not connector.admits_issuer(issuer):
                return (
                    f"the certificate `{name}` matches connector {where}, but its issuer "
                    f"`{issuer or '-'}` is not in the connector's trusted_issuers: add it "
                    f"(a renewed certificate from another CA?)"
                )
            if not connector.admits_address(address):
                return (
                    f"the certificate `{name}` matches connector {where}, but the client "
                    f"{client} is not in its sender_ip_addresses: add the address"
                )
        return None

    def __call__(self, key: GroupKey, group: Group) -> str:
        if key.action not in REFUSALS:
            return ""
        org = key.organization or "the organization"
        client = key.client_address or "?"
        domain = self.domain_of(key.organization)
        if group.certificate is not None:
            name, trusted, verify, issuer = group.certificate
            if not trusted:
                return (
                    f"the client {client} presented the certificate `{name}` but the MTA did "
                    f"not verify it ({{verify}}={verify}): have the client send its whole chain "
                    f"and make its CA trusted (Postfix: smtpd_tls_CAfile)"
                )
            refusing = self.refusing_connector(name, issuer, client)
            if refusing is not None:
                return refusing
            registered = self.registered_parent(key.organization, name)
            if registered is None:
                return (
                    f"the certificate `{name}` matched no connector and is not under an "
                    f"accepted domain of {org}: give the client a certificate named under "
                    f"{domain} (a connector `*.{domain}`), or list its file under a "
                    f"connector's certificates: if a SAN of it is"
                )
            return (
                f"the certificate `{name}` matched no connector: add a certificate connector "
                f"to {org} with tls_sender_certificate_name `*.{registered}`"
            )
        if key.sender_domain == NULL_SENDER:
            return (
                f"the client {client} sends bounces (`<>`): give it a certificate connector "
                f"(`*.{domain}`)"
            )
        sender = key.sender_domain or ""
        parent = self.registered_parent(key.organization, sender)
        if parent is not None:
            return (
                f"add `{sender}` to {org}'s accepted_domains "
                f"(or `match_subdomains: true` on {parent})"
            )
        forwarded = self.forwarding.get((key.organization, key.client_address))
        if forwarded:
            return (
                f"the client {client} relays mail of outside senders ({forwarded} sender "
                f"domains: forwarding): give it a certificate connector (`*.{domain}`) or have "
                f"it rewrite the envelope sender (SRS)"
            )
        if len(group.senders) == 1:  # one address: an application or a device
            return (
                f"this application sends as `{group.senders[0]}`: change its envelope sender "
                f"to an address in {domain} (or, if {org} owns {sender}, add `{sender}` to its "
                f"accepted_domains)"
            )
        return (
            f"add `{sender}` to {org}'s accepted_domains (if {org} owns it); otherwise change "
            f"the senders' envelope address to one in {domain}"
        )


# -- the report ----------------------------------------------------------------------


class Report(NamedTuple):
    period: Dict[str, Optional[str]]
    totals: Dict[str, Any]
    groups: List[Dict[str, Any]]
    #: (organization, day) -> [would-reject, reject + soft-reject], for the chart.
    days: Dict[Tuple[Optional[str], str], List[int]]


def group_rows(
    aggregator: Aggregator, remedy: Callable[[GroupKey, Group], str], top: int
) -> List[Dict[str, Any]]:
    """The groups as rows (COLUMNS), largest first; then one "other" row for the rest.

    The rest: the groups beyond ``top``, and those let go to bound memory.
    """
    ordered = sorted(
        aggregator.groups.items(), key=lambda item: (-item[1].count, _sort_key(item[0]))
    )
    rows = [_row(key, group, remedy(key, group)) for key, group in ordered[: top or None]]
    rest = ordered[top:] if top else []
    if rest or aggregator.dropped_groups:
        rows.append(_other_row(aggregator, [group for _, group in rest]))
    return rows


def _other_row(aggregator: Aggregator, rest: List[Group]) -> Dict[str, Any]:
    firsts = [g.first_seen for g in rest if g.first_seen is not None]
    lasts = [g.last_seen for g in rest if g.last_seen is not None]
    remedy = []
    if rest:
        remedy.append(f"{len(rest)} more groups (--top 0 lists them all)")
    if aggregator.dropped_groups:
        remedy.append(
            f"{aggregator.dropped_records} records of {aggregator.dropped_groups} smaller "
            f"groups let go to bound memory (at most {aggregator.dropped_largest} records each)"
        )
    return {
        "organization": None,
        "connector": None,
        "client_address": None,
        "sender_domain": None,
        "reason": None,
        "action": None,
        "count": sum(g.count for g in rest) + aggregator.dropped_records,
        "recipients": sum(len(g.recipients) for g in rest),
        "recipient_domains": sum(len(g.recipient_domains) for g in rest),
        "first_seen": iso(min(firsts)) if firsts else None,
        "last_seen": iso(max(lasts)) if lasts else None,
        "samples": [],
        "remedy": "other: " + "; ".join(remedy),
        "count_error": 0,
    }


def _sort_key(key: GroupKey) -> Tuple[str, ...]:
    return tuple(value or "" for value in key)


def _row(key: GroupKey, group: Group, remedy: str) -> Dict[str, Any]:
    return {
        "organization": key.organization,
        "connector": key.connector,
        "client_address": key.client_address,
        "sender_domain": key.sender_domain,
        "reason": key.reason,
        "action": key.action,
        "count": group.count,
        "recipients": len(group.recipients),
        "recipient_domains": len(group.recipient_domains),
        "first_seen": iso(group.first_seen),
        "last_seen": iso(group.last_seen),
        "samples": list(group.samples),
        "remedy": remedy,
        "count_error": group.error,
    }


def build_report(
    entries: Iterable[Entry],
    config: Optional[Config] = None,
    since: Optional[float] = None,
    until: Optional[float] = None,
    top: int = 20,
    everything: bool = False,
    stats: Optional[Stats] = None,
) -> Report:
    aggregator = Aggregator((lambda record: True) if everything else None)
    add = aggregator.add
    for entry in entries:
        add(entry)
    rows = group_rows(aggregator, Remedies(aggregator, config), top)
    return Report(
        period={
            "since": iso(since if since is not None else aggregator.first),
            "until": iso(until if until is not None else aggregator.last),
        },
        totals=totals(aggregator, stats),
        groups=rows,
        days=aggregator.days,
    )


def totals(aggregator: Aggregator, stats: Optional[Stats]) -> Dict[str, Any]:
    actions: Dict[str, int] = {}
    for org in aggregator.organizations.values():
        for action, count in org.actions.items():
            actions[action] = actions.get(action, 0) + count
    decisions = aggregator.decisions
    refused = sum(actions.get(a, 0) for a in REFUSALS)
    return {
        "decisions": decisions,
        "relays": sorted(aggregator.hosts),
        "continue": actions.get(ACTION_CONTINUE, 0),
        "would_reject": actions.get(ACTION_WOULD_REJECT, 0),
        "reject": actions.get(ACTION_REJECT, 0),
        "soft_reject": actions.get(ACTION_SOFT_REJECT, 0),
        "share": round(refused / decisions, 4) if decisions else 0.0,
        "groups": len(aggregator.groups),
        "groups_let_go": aggregator.dropped_groups,
        "records_let_go": aggregator.dropped_records,
        "cut_records": aggregator.cut,
        "organizations": [
            totals.as_dict(name)
            for name, totals in sorted(
                aggregator.organizations.items(), key=lambda item: item[0] or "\uffff"
            )
        ],
        "unreadable_lines": stats.unreadable if stats else 0,
        "undated_skipped": stats.undated_skipped if stats else 0,
        "errors": list(stats.errors) if stats else [],
    }


# -- formats -------------------------------------------------------------------------------


def as_json(report: Report) -> str:
    data = {"period": report.period, "totals": report.totals, "groups": report.groups}
    # ASCII: values from the journal may hold undecodable bytes (lone surrogates).
    return json.dumps(data, indent=2, ensure_ascii=True)


def _cell(value: Any) -> str:
    """A value for a terminal or a spreadsheet: controls escaped, no formula."""
    if value is None:
        return "-"
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    text = escape(str(value))
    return text


def as_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in report.groups:
        writer.writerow(_csv_cell(row[column]) for column in COLUMNS)
    return out.getvalue()


#: What a spreadsheet reads as the start of a formula (OWASP's "CSV Injection" list).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> str:
    """A value for a spreadsheet: controls escaped, and never a formula.

    A text that starts like a formula gets a leading ``'``, which spreadsheets
    take as "this is text"; a number stays a number.
    """
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    cell = _cell(value)
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


def _percent(share: float) -> str:
    return f"{share * 100:.1f}%"


def summary_lines(report: Report) -> List[str]:
    t = report.totals
    relays = ", ".join(_cell(r) for r in t["relays"]) or "-"
    lines = [
        f"period {report.period['since'] or '-'} to {report.period['until'] or '-'}; "
        f"relays: {relays}; decisions: {t['decisions']}; would-reject: {t['would_reject']}; "
        f"reject: {t['reject'] + t['soft_reject']} (soft {t['soft_reject']}); "
        f"refused or would be: {_percent(t['share'])}"
    ]
    for org in t["organizations"]:
        name = _cell(org["organization"]) if org["organization"] else "(unattributed)"
        lines.append(
            f"  {name}: {org['decisions']} decisions, would-reject {org['would_reject']}, "
            f"reject {org['reject'] + org['soft_reject']} (soft {org['soft_reject']}), "
            f"{_percent(org['share'])}; mode {', '.join(org['modes']) or '-'}"
        )
    if t["unreadable_lines"]:
        lines.append(f"  {t['unreadable_lines']} decision line(s) could not be read (truncated?)")
    if t["undated_skipped"]:
        lines.append(f"  {t['undated_skipped']} record(s) without a time left out by the period")
    if t["cut_records"]:
        lines.append(
            f"  {t['cut_records']} record(s) from log lines that show a value cut (too long for "
            "a line): grouped by the part shown; the journal has them whole"
        )
    if t["groups_let_go"]:
        lines.append(
            f"  memory bound: {t['groups_let_go']} smaller groups ({t['records_let_go']} "
            "records) were let go and are counted in 'other'; a COUNT shown as N+E may miss "
            "up to E records of its group"
        )
    lines.extend(f"  error: {_cell(e)}" for e in t["errors"])
    return lines


_TEXT_COLUMNS = (
    ("count", "COUNT"),
    ("action", "ACTION"),
    ("organization", "ORGANIZATION"),
    ("connector", "CONNECTOR"),
    ("client_address", "CLIENT"),
    ("sender_domain", "SENDER DOMAIN"),
    ("reason", "REASON"),
    ("recipients", "RCPTS"),
    ("recipient_domains", "RCPT DOMAINS"),
    ("first_seen", "FIRST SEEN"),
    ("last_seen", "LAST SEEN"),
    ("samples", "SAMPLES"),
)


def _text_cell(row: Dict[str, Any], key: str) -> str:
    """A cell of the text and HTML tables: a count that may miss records shows how many."""
    if key == "count" and row.get("count_error"):
        return f"{row['count']}+{row['count_error']}"
    return _cell(row[key])


def table_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """The rows as an aligned table, each followed by its remedy."""
    if not rows:
        return ["no groups"]
    cells = [[_text_cell(row, key) for key, _ in _TEXT_COLUMNS] for row in rows]
    headers = [title for _, title in _TEXT_COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row, line in zip(rows, cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if row["remedy"]:
            lines.append(f"    remedy: {_cell(row['remedy'])}")
    return lines


def as_text(report: Report) -> str:
    lines = ["relaymilter report", *summary_lines(report), ""]
    lines.extend(table_lines(report.groups))
    return "\n".join(lines) + "\n"


# -- HTML ---------------------------------------------------------------------------------

_COLOURS = ("#c0392b", "#2471a3", "#1e8449", "#b9770e", "#7d3c98", "#17a589", "#5d6d7e")


def svg_chart(days: Dict[Tuple[Optional[str], str], List[int]]) -> str:
    """Would-reject (dashed) and reject (solid) per day per organization, as inline SVG."""
    width, height, left, bottom, top_margin = 760, 260, 50, 40, 20
    all_days = sorted({day for _, day in days})
    organizations = sorted({org or "" for org, _ in days})
    if not all_days:
        return (
            f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="60" '
            'role="img"><text x="10" y="35" font-size="14">no refusals in this period</text></svg>'
        )
    peak = max(max(v) for v in days.values()) or 1
    plot_w, plot_h = width - left - 20, height - bottom - top_margin
    step = plot_w / max(len(all_days) - 1, 1)

    def x(i: int) -> float:
        return left + (i * step if len(all_days) > 1 else plot_w / 2)

    def y(v: int) -> float:
        return top_margin + plot_h - v * plot_h / peak

    parts = [
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" '
        'aria-label="would-reject and reject per day per organization">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<line x1="{left}" y1="{top_margin + plot_h}" x2="{width - 20}" '
        f'y2="{top_margin + plot_h}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top_margin}" x2="{left}" y2="{top_margin + plot_h}" '
        'stroke="#333"/>',
        f'<text x="{left - 6}" y="{top_margin + 4}" font-size="11" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top_margin + plot_h}" font-size="11" text-anchor="end">0</text>',
    ]
    label_every = max(1, len(all_days) // 8)
    for i, day in enumerate(all_days):
        if i % label_every == 0:
            parts.append(
                f'<text x="{x(i):.1f}" y="{height - bottom + 16}" font-size="10" '
                f'text-anchor="middle">{html.escape(day[5:])}</text>'
            )
    for number, org in enumerate(organizations):
        colour = _COLOURS[number % len(_COLOURS)]
        for index, dash in ((0, ' stroke-dasharray="6 3"'), (1, "")):
            points = " ".join(
                f"{x(i):.1f},{y(days.get((org or None, day), [0, 0])[index]):.1f}"
                for i, day in enumerate(all_days)
            )
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="3"{dash} '
                f'points="{points}"/>'
            )
            for i, day in enumerate(all_days):
                value = days.get((org or None, day), [0, 0])[index]
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(value):.1f}" r="4" fill="{colour}"/>')
        parts.append(
            f'<text x="{left + 10 + number * 150}" y="{height - 6}" font-size="12" '
            f'fill="{colour}">{html.escape(_cell(org or "(unattributed)"))}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #eee; }
td.n { text-align: right; }
td { white-space: nowrap; }
td.remedy { max-width: 40em; white-space: normal; }
.legend { font-size: 0.9em; color: #555; }
"""


def as_html(report: Report) -> str:
    e = html.escape
    t = report.totals
    rows_org = "".join(
        "<tr>"
        f"<td>{e(_cell(org['organization'] or '(unattributed)'))}</td>"
        f'<td class="n">{org["decisions"]}</td><td class="n">{org["would_reject"]}</td>'
        f'<td class="n">{org["reject"] + org["soft_reject"]}</td>'
        f'<td class="n">{e(_percent(org["share"]))}</td></tr>'
        for org in t["organizations"]
    )
    header = "".join(f"<th>{e(title)}</th>" for _, title in _TEXT_COLUMNS) + "<th>REMEDY</th>"
    body = []
    for row in report.groups:
        cells = []
        for key, _ in _TEXT_COLUMNS:
            value = row[key]
            text = _text_cell(row, key)  # controls made visible: no bare CR or LF in a mail
            numeric = ' class="n"' if isinstance(value, int) else ""
            cells.append(f"<td{numeric}>{e(text)}</td>")
        cells.append(f'<td class="remedy">{e(_cell(row["remedy"] or ""))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    since, until = report.period["since"] or "-", report.period["until"] or "-"
    relays = ", ".join(map(_cell, t["relays"])) or "-"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>relaymilter report {e(since)} to {e(until)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>relaymilter report</h1>"
        f"<p>Period {e(since)} to {e(until)}; relays: {e(relays)}; "
        f"decisions: {t['decisions']}; would-reject: {t['would_reject']}; "
        f"reject: {t['reject'] + t['soft_reject']}; refused or would be: "
        f"{e(_percent(t['share']))}.</p>"
        "<h2>Would-reject and reject per day</h2>"
        f"{svg_chart(report.days)}"
        '<p class="legend">Dashed: would-reject (monitor mode); solid: reject and '
        "soft-reject.</p>"
        "<h2>Organizations</h2><table><tr><th>ORGANIZATION</th><th>DECISIONS</th>"
        f"<th>WOULD-REJECT</th><th>REJECT</th><th>SHARE</th></tr>{rows_org}</table>"
        f"<h2>Flows</h2><table><tr>{header}</tr>{''.join(body)}</table>"
        "</body></html>\n"
    )


FORMATS: Dict[str, Callable[[Report], str]] = {
    "text": as_text,
    "json": as_json,
    "csv": as_csv,
    "html": as_html,
}
