"""Organizations from PostgreSQL: two queries, columns by name, in one read-only snapshot.

Only ``relaymilter sync`` imports this module, and only with a postgresql
source configured: psycopg 3 is an optional dependency. The values pass
through as the YAML would write them; the sync validates them as it validates
the YAML file, naming each item's row.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ...core.sourcesettings import PostgresqlSource
from . import OrganizationCollector, SourceError, SourceResult, domain_item, read_secret

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.types.string import TextLoader
except ImportError as exc:  # pragma: no cover - depends on the host's packages
    _IMPORT_ERROR: Optional[str] = str(exc)
else:
    _IMPORT_ERROR = None

Row = Tuple[Any, ...]

#: Unless the conninfo (or PGAPPNAME) names another, for pg_stat_activity.
APPLICATION_NAME = "relaymilter-sync"
#: Rows converted per round; libpq holds the whole result anyway.
BATCH = 5000
#: Lines of an error kept: libpq writes one per host tried.
REASON_LINES = 6
#: The conninfo keys that hold one value per host, and their environment variables.
HOST_PARAMETERS = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT"}

DOMAIN_COLUMNS = ("organization", "domain")
DOMAIN_OPTIONAL = ("match_subdomains",)
CONNECTOR_COLUMNS = ("organization", "name")
CONNECTOR_OPTIONAL = (
    "kind",
    "sender_ip_addresses",
    "tls_sender_certificate_name",
    "trusted_issuers",
    "mode",
)
KINDS = ("ip", "certificate")
_ADDRESS_TYPES = (
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
)


def fetch(source: PostgresqlSource) -> SourceResult:
    """Run the source's queries and gather their organizations, domains and connectors."""
    label = f"postgresql {source.name!r}"
    if _IMPORT_ERROR is not None:
        raise SourceError(
            f"{label}: psycopg 3 is not installed (install python3-psycopg on Debian and Ubuntu, "
            f"python3-psycopg3 from EPEL on RHEL 9): {_IMPORT_ERROR}"
        )
    try:
        password = read_secret(source.password_file) if source.password_file else None
    except SourceError as exc:
        raise SourceError(f"{label}: {exc}") from None
    conn = _connect(source, password, label)
    try:
        return _read(conn, source, label, password)
    finally:
        conn.close()


def _connect(
    source: PostgresqlSource, password: Optional[str], label: str
) -> psycopg.Connection[Row]:
    """Connect to the first host that answers, naming every host's reason if none does."""
    options = _connection_options(source, password)
    reasons: List[str] = []
    for attempt in connection_attempts(conninfo_to_dict(source.conninfo)):
        try:
            conn = psycopg.connect(**{**attempt, **options})
        except psycopg.Error as exc:
            reasons.append(_reason(exc, password))
            continue
        return _configure(conn)
    raise SourceError(f"{label}: cannot connect: {_joined(reasons)}")


def _connection_options(source: PostgresqlSource, password: Optional[str]) -> Dict[str, Any]:
    seconds = max(1, math.ceil(source.timeout))
    options: Dict[str, Any] = {
        "connect_timeout": seconds,
        "fallback_application_name": APPLICATION_NAME,
    }
    # statement_timeout bounds the server's work, not a server or network
    # that falls silent: TCP keepalives notice that, unless the admin tuned them.
    given = conninfo_to_dict(source.conninfo)
    keepalives = {"keepalives_idle": seconds, "keepalives_interval": seconds, "keepalives_count": 3}
    options.update((key, value) for key, value in keepalives.items() if key not in given)
    # Without one, libpq's own ~/.pgpass (or PGPASSFILE) applies.
    if password is not None:
        options["password"] = password
    return options


def connection_attempts(given: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The conninfo's parameters once per host it lists, in the order libpq tries them.

    With ``host=a,b`` libpq (under psycopg 3.1) reports every host's failure,
    but psycopg 3.2 tries the hosts one by one itself and raises only the last
    error. Trying them here, one at a time, names every host's reason on both.
    What libpq alone can judge (a port list that matches no host list, an
    empty entry, which means libpq's default, not PGHOST) goes to it whole.
    """
    lists = {key: str(value).split(",") for key, value in _host_values(given).items()}
    hosts = max((len(lists[key]) for key in ("host", "hostaddr") if key in lists), default=1)
    counts_match = all(
        len(values) == hosts or (key == "port" and len(values) == 1)
        for key, values in lists.items()
    )
    if hosts < 2 or not counts_match or any("" in values for values in lists.values()):
        return [given]
    attempts = [
        {**given, **{key: values[index % len(values)] for key, values in lists.items()}}
        for index in range(hosts)
    ]
    if given.get("load_balance_hosts") == "random":
        random.shuffle(attempts)
    return attempts


def _host_values(given: Dict[str, Any]) -> Dict[str, Any]:
    """host, hostaddr and port: the conninfo's, else the environment's (as libpq reads them)."""
    values = {}
    for key, variable in HOST_PARAMETERS.items():
        value = given.get(key, os.environ.get(variable))
        if value is not None:
            values[key] = value
    return values


def _configure(conn: psycopg.Connection[Row]) -> psycopg.Connection[Row]:
    # PostgreSQL's own text of inet and cidr is what the YAML would hold;
    # psycopg's ipaddress objects would be parsed only to be printed again.
    for name in ("inet", "cidr"):
        conn.adapters.register_loader(name, TextLoader)
    # Both queries in one snapshot: an organization renamed between them would
    # otherwise have its domains under one name and its connectors under the
    # other. Read-only: the queries are the admin's text; this catches a
    # mistake in them.
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


def _read(
    conn: psycopg.Connection[Row], source: PostgresqlSource, label: str, password: Optional[str]
) -> SourceResult:
    collector = OrganizationCollector()
    records = 0
    with _reporting(label, "cannot set the statement timeout", password):
        # SET LOCAL: a pooler (pgbouncer) hands the session on after the transaction.
        milliseconds = str(max(1, round(source.timeout * 1000)))
        conn.execute(b"SELECT set_config('statement_timeout', %s, true)", (milliseconds,))
    if source.accepted_domains_query is not None:
        with _reporting(label, "accepted_domains_query", password):
            records += _read_domains(conn, source.accepted_domains_query, label, collector)
    if source.connectors_query is not None:
        with _reporting(label, "connectors_query", password):
            records += _read_connectors(conn, source.connectors_query, label, collector)
    return collector.result(records, _describe(conn))


def _describe(conn: psycopg.Connection[Row]) -> str:
    info = conn.info
    return f"host {info.host} port {info.port}, database {info.dbname}"


@contextlib.contextmanager
def _reporting(label: str, what: str, password: Optional[str]) -> Iterator[None]:
    """Turn psycopg's errors into SourceError, with libpq's or the server's reason."""
    try:
        yield
    except psycopg.Error as exc:
        raise SourceError(f"{label}: {what}: {_reason(exc, password)}") from None


def _joined(reasons: List[str]) -> str:
    """Each host's reason once, the first few of a long list."""
    unique = list(dict.fromkeys(reasons))
    text = "; ".join(unique[:REASON_LINES])
    if len(unique) > REASON_LINES:
        text += f"; and {len(unique) - REASON_LINES} more"
    return text


def _reason(exc: psycopg.Error, password: Optional[str]) -> str:
    # The server's own message is without the "LINE 1: ..." excerpt that str() adds.
    reason = _libpq_message(exc) or exc.diag.message_primary or str(exc) or type(exc).__name__
    # libpq's indented lines are hints ("Is the server running on that host...").
    lines = [line for line in reason.splitlines() if line.strip()]
    lines = [line for line in lines if not line[0].isspace()] or lines
    # sslmode=prefer tries with TLS, then without: the same failure twice.
    unique = dict.fromkeys(" ".join(line.split()) for line in lines)
    text = "; ".join(list(unique)[:REASON_LINES])
    detail = exc.diag.message_detail
    if detail and exc.diag.message_primary:
        text += f" ({' '.join(detail.split())})"
    # libpq does not echo the password; this is in case some layer ever does.
    if password:
        text = text.replace(password, "********")
    return text


def _libpq_message(exc: psycopg.Error) -> str:
    """libpq's message of a failed connection, which psycopg 3.1 shortens to its last part.

    It names each host tried, and what failed there.
    """
    pgconn = exc.pgconn
    if pgconn is None:
        return ""
    return pgconn.error_message.decode("utf-8", "replace")


# -- queries -------------------------------------------------------------------


def _rows(
    conn: psycopg.Connection[Row],
    query: str,
    required: Sequence[str],
    optional: Sequence[str],
    what: str,
) -> Tuple[Dict[str, int], Iterator[Row]]:
    """Run a query; its column positions by name, and its rows."""
    try:
        text = query.encode(conn.info.encoding)
    except UnicodeEncodeError as exc:
        raise SourceError(f"{what}: not in the connection's encoding: {exc}") from None
    cursor = conn.cursor()
    # prepare=True: the extended protocol, which refuses several statements
    # in one query (a "COMMIT; ..." would end the read-only transaction).
    cursor.execute(text, prepare=True)
    if cursor.description is None:
        raise SourceError(f"{what} returns no rows: {_expected(required, optional)}")
    names = [column.name for column in cursor.description]
    return _positions(names, required, optional, what), _fetch(cursor)


def _fetch(cursor: psycopg.Cursor[Row]) -> Iterator[Row]:
    while True:
        batch = cursor.fetchmany(BATCH)
        if not batch:
            return
        yield from batch


def _positions(
    names: Sequence[str], required: Sequence[str], optional: Sequence[str], what: str
) -> Dict[str, int]:
    positions: Dict[str, int] = {}
    problems = []
    for position, name in enumerate(names):
        if name not in required and name not in optional:
            problems.append(f"unknown column {name!r}")
        elif name in positions:
            problems.append(f"column {name!r} twice")
        else:
            positions[name] = position
    problems.extend(f"no column {name!r}" for name in required if name not in positions)
    if problems:
        raise SourceError(f"{what}: {', '.join(problems)}; {_expected(required, optional)}")
    return positions


def _expected(required: Sequence[str], optional: Sequence[str]) -> str:
    return f"expected the columns {', '.join(required)} and optionally {', '.join(optional)}"


# -- accepted domains ----------------------------------------------------------


def _read_domains(
    conn: psycopg.Connection[Row], query: str, label: str, collector: OrganizationCollector
) -> int:
    what = f"{label}: accepted_domains_query"
    columns, rows = _rows(conn, query, DOMAIN_COLUMNS, DOMAIN_OPTIONAL, what)
    organization_at, domain_at = columns["organization"], columns["domain"]
    subdomains_at = columns.get("match_subdomains")
    count = 0
    for count, row in enumerate(rows, 1):
        organization, domain = row[organization_at], row[domain_at]
        subdomains = False if subdomains_at is None else row[subdomains_at]
        # The common case checked inline: this loop runs for every domain.
        if type(organization) is str and type(domain) is str and type(subdomains) is bool:
            origin = f"{what} row {count} ({organization}: {domain})"
        else:
            origin = f"{what} row {count} ({_show(organization)}: {_show(domain)})"
            organization = _required_text(organization, "organization", origin)
            domain = _required_text(domain, "domain", origin)
            subdomains = _flag(subdomains, origin)
        collector.add_domain(organization, domain_item(domain, subdomains), origin)
    return count


def _flag(value: Any, origin: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SourceError(f"{origin}: match_subdomains is {value!r}, not a boolean")
    return value


def _required_text(value: Any, column: str, origin: str) -> str:
    if value is None:
        raise SourceError(f"{origin}: {column} is NULL")
    return _text(value, column, origin)


def _text(value: Any, column: str, origin: str) -> str:
    if isinstance(value, str):
        return value
    # inet and cidr come as ipaddress objects; an organization may be a number.
    if isinstance(value, (int, *_ADDRESS_TYPES)) and not isinstance(value, bool):
        return str(value)
    raise SourceError(f"{origin}: {column} is {value!r} ({type(value).__name__}), not text")


# -- connectors ----------------------------------------------------------------


@dataclass
class _Connector:
    """One connector, from one or more rows."""

    organization: str
    name: str
    #: The first row's.
    row: int
    origin: str
    #: kind, tls_sender_certificate_name and mode: the same in every row.
    settings: Tuple[Optional[str], Optional[str], Optional[str]]
    addresses: Dict[str, None] = field(default_factory=dict)
    issuers: Dict[str, None] = field(default_factory=dict)

    def value(self) -> Dict[str, Any]:
        value: Dict[str, Any] = {"name": self.name}
        if self.addresses:
            value["sender_ip_addresses"] = list(self.addresses)
        if self.settings[1] is not None:
            value["tls_sender_certificate_name"] = self.settings[1]
        if self.issuers:
            value["trusted_issuers"] = list(self.issuers)
        if self.settings[2] is not None:
            value["mode"] = self.settings[2]
        return value


_SETTINGS = ("kind", "tls_sender_certificate_name", "mode")
#: The order _connector_row unpacks a row's columns in.
_CONNECTOR_ROW = (
    "organization",
    "name",
    "kind",
    "sender_ip_addresses",
    "tls_sender_certificate_name",
    "trusted_issuers",
    "mode",
)


def _read_connectors(
    conn: psycopg.Connection[Row], query: str, label: str, collector: OrganizationCollector
) -> int:
    what = f"{label}: connectors_query"
    columns, rows = _rows(conn, query, CONNECTOR_COLUMNS, CONNECTOR_OPTIONAL, what)
    positions = [columns.get(name) for name in _CONNECTOR_ROW]
    connectors: Dict[Tuple[str, str], _Connector] = {}
    count = 0
    for count, row in enumerate(rows, 1):
        _merge(connectors, _connector_row(row, positions, what, count))
    for connector in connectors.values():
        collector.add_connector(connector.organization, connector.value(), connector.origin)
    return count


def _connector_row(
    row: Row, positions: Sequence[Optional[int]], what: str, number: int
) -> _Connector:
    organization, name, kind, addresses, certificate_name, issuers, mode = (
        None if position is None else row[position] for position in positions
    )
    origin = f"{what} row {number} ({_show(organization)}: connector {_show(name)})"
    connector = _Connector(
        _required_text(organization, "organization", origin),
        _required_text(name, "name", origin),
        number,
        origin,
        (
            _optional_text(kind, "kind", origin),
            _optional_text(certificate_name, "tls_sender_certificate_name", origin),
            _optional_text(mode, "mode", origin),
        ),
        dict.fromkeys(_texts(addresses, "sender_ip_addresses", origin)),
        dict.fromkeys(_texts(issuers, "trusted_issuers", origin)),
    )
    _check_kind(connector)
    return connector


def _optional_text(value: Any, column: str, origin: str) -> Optional[str]:
    return None if value is None else _text(value, column, origin)


def _texts(value: Any, column: str, origin: str) -> List[str]:
    """A scalar or an array column's values; NULLs (of an outer join, of the array) are none."""
    if value is None:
        return []
    if isinstance(value, list):
        return [_text(item, column, origin) for item in _flatten(value) if item is not None]
    return [_text(value, column, origin)]


def _flatten(values: List[Any]) -> Iterator[Any]:
    # A multidimensional array comes as nested lists.
    for value in values:
        if isinstance(value, list):
            yield from _flatten(value)
        else:
            yield value


def _check_kind(connector: _Connector) -> None:
    kind, certificate_name = connector.settings[0], connector.settings[1]
    if kind is None:
        return
    problem = None
    if kind not in KINDS:
        problem = f"kind is {kind!r}, not ip or certificate"
    elif kind == "certificate" and not certificate_name:
        problem = "kind certificate needs a tls_sender_certificate_name"
    elif kind == "ip" and certificate_name:
        problem = "kind ip has a tls_sender_certificate_name"
    elif kind == "ip" and not connector.addresses:
        problem = "kind ip needs sender_ip_addresses"
    if problem is not None:
        raise SourceError(f"{connector.origin}: {problem}")


def _merge(connectors: Dict[Tuple[str, str], _Connector], row: _Connector) -> None:
    """Unite a row with the earlier rows of its connector, in row order."""
    key = (row.organization, row.name)
    first = connectors.get(key)
    if first is None:
        connectors[key] = row
        return
    for name, mine, theirs in zip(_SETTINGS, first.settings, row.settings):
        if mine != theirs:
            raise SourceError(
                f"{first.origin} and row {row.row}: one connector, two different {name}s: "
                f"{_quoted(mine)} and {_quoted(theirs)}"
            )
    first.addresses.update(row.addresses)
    first.issuers.update(row.issuers)


def _show(value: Any) -> str:
    """A value in an origin, for humans."""
    return "NULL" if value is None else str(value)


def _quoted(value: Optional[str]) -> str:
    return "NULL" if value is None else repr(value)
