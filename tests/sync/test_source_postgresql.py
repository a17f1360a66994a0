"""The postgresql source against a real, throwaway PostgreSQL server (tests/pgserver.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from psycopg.conninfo import conninfo_to_dict

from relaymilter.core.sourcesettings import PostgresqlSource
from relaymilter.sync.sources import SourceError, SourceResult
from relaymilter.sync.sources.postgresql import connection_attempts, fetch

from ..pgserver import PASSWORD, PostgresServer
from ..support import REPO

LABEL = "postgresql 'hosting'"


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


def source(
    pg: PostgresServer,
    domains: Optional[str] = None,
    connectors: Optional[str] = None,
    conninfo: Optional[str] = None,
    password_file: Optional[str] = "default",
    timeout: float = 5.0,
) -> PostgresqlSource:
    return PostgresqlSource(
        name="hosting",
        conninfo=conninfo or pg.conninfo(),
        password_file=str(pg.password_file) if password_file == "default" else password_file,
        timeout=timeout,
        accepted_domains_query=domains,
        connectors_query=connectors,
    )


def domains_of(result: SourceResult) -> Dict[str, List[Any]]:
    return {o.name: [item.value for item in o.accepted_domains] for o in result.organizations}


def connectors_of(result: SourceResult) -> Dict[str, List[Any]]:
    return {o.name: [item.value for item in o.connectors] for o in result.organizations}


def failure(pg: PostgresServer, **settings: Any) -> str:
    with pytest.raises(SourceError) as caught:
        fetch(source(pg, **settings))
    message = str(caught.value)
    assert message.startswith(LABEL), message
    assert PASSWORD not in message
    return message


# -- the documented example schema and queries ---------------------------------

EXAMPLE_DATA = """
INSERT INTO relaymilter.organizations (id, name) VALUES (1, 'contoso'), (2, 'fabrikam');
INSERT INTO relaymilter.accepted_domains (organization_id, domain, match_subdomains) VALUES
  (1, 'contoso.com', false), (1, 'sub.contoso.com', true),
  (2, 'fabrikam.com', false), (2, '*.fabrikam.net', false);
INSERT INTO relaymilter.connectors (id, organization_id, name, kind, tls_sender_certificate_name, mode)
VALUES (1, 1, 'onprem-ip', 'ip', NULL, NULL),
       (2, 1, 'onprem-cert', 'certificate', '*.contoso.com', 'soft'),
       (3, 2, 'relay', 'ip', NULL, 'monitor');
INSERT INTO relaymilter.connector_addresses (connector_id, network) VALUES
  (1, '192.0.2.0/24'), (1, '2001:db8:1::/48'), (2, '198.51.100.7'), (2, '198.51.100.8'),
  (3, '203.0.113.0/24');
INSERT INTO relaymilter.connector_trusted_issuers (connector_id, issuer) VALUES
  (2, 'Contoso Issuing CA'), (2, 'Contoso Issuing CA 2');
"""


def test_the_documented_schema_and_queries(pg: PostgresServer) -> None:
    pg.load_schema()
    pg.execute(EXAMPLE_DATA)
    domains, connectors = pg.example_queries()
    result = fetch(source(pg, domains, connectors))
    assert domains_of(result) == {
        "contoso": ["contoso.com", {"domain": "sub.contoso.com", "match_subdomains": True}],
        # ORDER BY domain: '*' sorts before letters.
        "fabrikam": [{"domain": "fabrikam.net", "match_subdomains": True}, "fabrikam.com"],
    }
    assert connectors_of(result) == {
        "contoso": [
            # Two addresses times two issuers: four rows, one connector.
            {
                "name": "onprem-cert",
                "sender_ip_addresses": ["198.51.100.7/32", "198.51.100.8/32"],
                "tls_sender_certificate_name": "*.contoso.com",
                "trusted_issuers": ["Contoso Issuing CA", "Contoso Issuing CA 2"],
                "mode": "soft",
            },
            {"name": "onprem-ip", "sender_ip_addresses": ["192.0.2.0/24", "2001:db8:1::/48"]},
        ],
        "fabrikam": [
            {"name": "relay", "sender_ip_addresses": ["203.0.113.0/24"], "mode": "monitor"}
        ],
    }
    assert result.records == 4 + 4 + 2 + 1
    assert result.detail == f"host 127.0.0.1 port {pg.port}, database relaymilter"
    contoso = result.organizations[0]
    assert contoso.origin == f"{LABEL}: accepted_domains_query row 1 (contoso: contoso.com)"
    assert contoso.connectors[0].origin == (
        f"{LABEL}: connectors_query row 1 (contoso: connector onprem-cert)"
    )
    assert contoso.connectors[1].origin.startswith(f"{LABEL}: connectors_query row 5 ")


def test_the_example_schema_at_scale(pg: PostgresServer) -> None:
    pg.load_organizations(200, 5)
    domains, connectors = pg.example_queries()
    result = fetch(source(pg, domains, connectors))
    assert len(result.organizations) == 200
    assert sum(len(o.accepted_domains) for o in result.organizations) == 1000
    first = result.organizations[0]
    assert first.name == "org1"
    assert [d.value for d in first.accepted_domains] == [
        {"domain": "d1.org1.example", "match_subdomains": True},
        "d2.org1.example",
        "d3.org1.example",
        "d4.org1.example",
        "org1.example",
    ]
    assert [c.value["name"] for c in first.connectors] == ["cert-0", "ip-0"]
    assert first.connectors[1].value["sender_ip_addresses"] == ["10.0.1.0/32", "2001:db8:1::/48"]


def test_a_connector_whose_addresses_are_missing_fails_through_kind(pg: PostgresServer) -> None:
    pg.load_schema()
    pg.execute(EXAMPLE_DATA)
    pg.execute("DELETE FROM relaymilter.connector_addresses WHERE connector_id = 3")
    domains, connectors = pg.example_queries()
    message = failure(pg, domains=domains, connectors=connectors)
    assert (
        "connectors_query row 7 (fabrikam: connector relay): kind ip needs sender_ip_addresses"
        in message
    )


# -- domains ------------------------------------------------------------------


def test_star_domains_and_match_subdomains(pg: PostgresServer) -> None:
    query = """
        SELECT * FROM (VALUES
          ('a', '*.one.example', NULL::boolean),
          ('a', 'two.example', true),
          ('a', 'three.example', false),
          ('a', 'four.example', NULL),
          ('b', ' *.five.example ', false)
        ) AS t (organization, domain, match_subdomains)
    """
    result = fetch(source(pg, query))
    assert domains_of(result) == {
        "a": [
            {"domain": "one.example", "match_subdomains": True},
            {"domain": "two.example", "match_subdomains": True},
            "three.example",
            "four.example",
        ],
        "b": [{"domain": "five.example", "match_subdomains": True}],
    }
    assert result.records == 5


def test_match_subdomains_is_optional_and_values_pass_through_unchecked(pg: PostgresServer) -> None:
    # Syntax is the sync's business (with the row as origin), not the source's.
    query = (
        "SELECT 'a' AS organization, d AS domain FROM unnest(ARRAY['com', '192.0.2.1', 'x y']) d"
    )
    result = fetch(source(pg, query))
    assert domains_of(result) == {"a": ["com", "192.0.2.1", "x y"]}
    assert result.organizations[0].accepted_domains[2].origin == (
        f"{LABEL}: accepted_domains_query row 3 (a: x y)"
    )


def test_a_numeric_organization_and_a_percent_sign(pg: PostgresServer) -> None:
    query = """
        SELECT 42 AS organization, domain FROM (VALUES ('a.example'), ('b.test')) t (domain)
        WHERE domain LIKE '%.example'
    """
    assert domains_of(fetch(source(pg, query))) == {"42": ["a.example"]}


def test_a_null_organization_names_the_row(pg: PostgresServer) -> None:
    query = """
        SELECT * FROM (VALUES ('a', 'a.example'), (NULL, 'b.example'))
        AS t (organization, domain)
    """
    message = failure(pg, domains=query)
    assert message == (
        f"{LABEL}: accepted_domains_query row 2 (NULL: b.example): organization is NULL"
    )


def test_a_null_domain_names_the_row(pg: PostgresServer) -> None:
    query = "SELECT 'a' AS organization, NULL::text AS domain"
    assert failure(pg, domains=query).endswith("row 1 (a: NULL): domain is NULL")


def test_a_match_subdomains_that_is_not_boolean(pg: PostgresServer) -> None:
    query = "SELECT 'a' AS organization, 'a.example' AS domain, 'yes' AS match_subdomains"
    assert "match_subdomains is 'yes', not a boolean" in failure(pg, domains=query)


def test_a_value_that_is_not_text(pg: PostgresServer) -> None:
    query = "SELECT 'a' AS organization, '\\x00'::bytea AS domain"
    assert "row 1 (a: b'\\x00'): domain is b'\\x00' (bytes), not text" in failure(pg, domains=query)


def test_unknown_and_missing_columns_list_the_expected_ones(pg: PostgresServer) -> None:
    message = failure(pg, domains="SELECT 'a' AS organization, 'a.example' AS dom")
    assert message == (
        f"{LABEL}: accepted_domains_query: unknown column 'dom', no column 'domain'; "
        "expected the columns organization, domain and optionally match_subdomains"
    )
    message = failure(pg, connectors="SELECT 'a' AS organisation, 'c' AS name")
    assert message == (
        f"{LABEL}: connectors_query: unknown column 'organisation', no column 'organization'; "
        "expected the columns organization, name and optionally kind, sender_ip_addresses, "
        "tls_sender_certificate_name, trusted_issuers, mode"
    )
    message = failure(pg, domains="SELECT 'a' AS organization, 'x' AS domain, 'y' AS domain")
    assert "column 'domain' twice" in message


def test_a_query_without_rows_to_return(pg: PostgresServer) -> None:
    assert "accepted_domains_query returns no rows" in failure(
        pg, domains="SET LOCAL work_mem = '8MB'"
    )


def test_a_query_outside_the_connections_encoding(pg: PostgresServer) -> None:
    conninfo = pg.conninfo(client_encoding="LATIN1")
    message = failure(pg, domains="SELECT '€' AS organization, 'a' AS domain", conninfo=conninfo)
    assert message.startswith(f"{LABEL}: accepted_domains_query: not in the connection's encoding")


def test_no_rows_is_no_organizations(pg: PostgresServer) -> None:
    result = fetch(source(pg, "SELECT 'a' AS organization, 'b' AS domain WHERE false"))
    assert result.organizations == []
    assert result.records == 0


# -- connectors ---------------------------------------------------------------


def test_connector_rows_are_merged_in_row_order(pg: PostgresServer) -> None:
    query = """
        SELECT * FROM (VALUES
          ('a', 'c1', '192.0.2.0/24', 'Issuer 1'),
          ('a', 'c2', '198.51.100.0/24', NULL),
          ('a', 'c1', '2001:db8::/32', 'Issuer 2'),
          ('a', 'c1', '192.0.2.0/24', 'Issuer 1'),
          ('b', 'c1', '203.0.113.0/24', NULL)
        ) AS t (organization, name, sender_ip_addresses, trusted_issuers)
    """
    result = fetch(source(pg, connectors=query))
    assert connectors_of(result) == {
        "a": [
            {
                "name": "c1",
                "sender_ip_addresses": ["192.0.2.0/24", "2001:db8::/32"],
                "trusted_issuers": ["Issuer 1", "Issuer 2"],
            },
            {"name": "c2", "sender_ip_addresses": ["198.51.100.0/24"]},
        ],
        "b": [{"name": "c1", "sender_ip_addresses": ["203.0.113.0/24"]}],
    }
    assert result.records == 5
    assert result.organizations[0].connectors[0].origin == (
        f"{LABEL}: connectors_query row 1 (a: connector c1)"
    )


def test_array_and_scalar_columns(pg: PostgresServer) -> None:
    query = """
        SELECT 'a' AS organization, 'arrays' AS name,
               ARRAY['192.0.2.0/24'::cidr, '2001:db8::/32'::cidr, NULL] AS sender_ip_addresses,
               '*.a.example' AS tls_sender_certificate_name,
               ARRAY['Issuer 1', 'Issuer 2'] AS trusted_issuers
        UNION ALL
        SELECT 'a', 'arrays', ARRAY['198.51.100.7'::cidr], '*.a.example', ARRAY['Issuer 1']
        UNION ALL
        SELECT 'a', 'inet', NULL, NULL, NULL
    """
    inet = """
        SELECT 'b' AS organization, 'inet' AS name, 'ip' AS kind,
               '198.51.100.7'::inet AS sender_ip_addresses
        UNION ALL SELECT 'b', 'inet', 'ip', '192.0.2.1/24'::inet
        UNION ALL SELECT 'b', 'inet', 'ip', '2001:db8::1'::inet
    """
    result = fetch(source(pg, connectors=query))
    assert connectors_of(result)["a"] == [
        {
            "name": "arrays",
            "sender_ip_addresses": ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7/32"],
            "tls_sender_certificate_name": "*.a.example",
            "trusted_issuers": ["Issuer 1", "Issuer 2"],
        },
        {"name": "inet"},
    ]
    assert connectors_of(fetch(source(pg, connectors=inet))) == {
        "b": [
            {
                "name": "inet",
                "sender_ip_addresses": ["198.51.100.7", "192.0.2.1/24", "2001:db8::1"],
            }
        ]
    }


def test_both_queries_one_organization_list(pg: PostgresServer) -> None:
    result = fetch(
        source(
            pg,
            "SELECT 'a' AS organization, 'a.example' AS domain",
            "SELECT 'b' AS organization, 'c' AS name, '192.0.2.0/24' AS sender_ip_addresses"
            " UNION ALL SELECT 'a', 'c', '198.51.100.0/24'",
        )
    )
    assert [o.name for o in result.organizations] == ["a", "b"]
    assert connectors_of(result)["a"] == [{"name": "c", "sender_ip_addresses": ["198.51.100.0/24"]}]
    assert result.records == 3


@pytest.mark.parametrize(
    ("kind", "addresses", "certificate_name", "problem"),
    [
        (
            "certificate",
            "'192.0.2.0/24'",
            "NULL",
            "kind certificate needs a tls_sender_certificate_name",
        ),
        ("ip", "'192.0.2.0/24'", "'*.a.example'", "kind ip has a tls_sender_certificate_name"),
        ("ip", "NULL", "NULL", "kind ip needs sender_ip_addresses"),
        ("ip", "ARRAY[]::text[]", "NULL", "kind ip needs sender_ip_addresses"),
        ("smtp", "'192.0.2.0/24'", "NULL", "kind is 'smtp', not ip or certificate"),
    ],
)
def test_kind_is_checked_against_the_row(
    pg: PostgresServer, kind: str, addresses: str, certificate_name: str, problem: str
) -> None:
    query = f"""
        SELECT 'a' AS organization, 'c' AS name, '{kind}' AS kind,
               {addresses} AS sender_ip_addresses, {certificate_name} AS tls_sender_certificate_name
    """
    assert failure(pg, connectors=query) == (
        f"{LABEL}: connectors_query row 1 (a: connector c): {problem}"
    )


def test_kind_that_holds(pg: PostgresServer) -> None:
    query = """
        SELECT 'a' AS organization, 'cert' AS name, 'certificate' AS kind,
               NULL AS sender_ip_addresses, '*.a.example' AS tls_sender_certificate_name
    """
    result = fetch(source(pg, connectors=query))
    assert connectors_of(result) == {
        "a": [{"name": "cert", "tls_sender_certificate_name": "*.a.example"}]
    }


def test_conflicting_certificate_names_name_both_rows(pg: PostgresServer) -> None:
    query = """
        SELECT * FROM (VALUES
          ('a', 'c', '*.a.example', 'Issuer 1'),
          ('a', 'd', '*.a.example', NULL),
          ('a', 'c', 'smtp.a.example', 'Issuer 2')
        ) AS t (organization, name, tls_sender_certificate_name, trusted_issuers)
    """
    assert failure(pg, connectors=query) == (
        f"{LABEL}: connectors_query row 1 (a: connector c) and row 3: one connector, "
        "two different tls_sender_certificate_names: '*.a.example' and 'smtp.a.example'"
    )


def test_conflicting_modes_name_both_rows(pg: PostgresServer) -> None:
    query = """
        SELECT * FROM (VALUES ('a', 'c', 'soft'), ('a', 'c', NULL))
        AS t (organization, name, mode)
    """
    assert failure(pg, connectors=query).endswith(
        "row 1 (a: connector c) and row 2: one connector, two different modes: 'soft' and NULL"
    )


def test_a_null_connector_name_names_the_row(pg: PostgresServer) -> None:
    query = "SELECT 'a' AS organization, NULL::text AS name"
    assert failure(pg, connectors=query) == (
        f"{LABEL}: connectors_query row 1 (a: connector NULL): name is NULL"
    )


# -- the transaction ----------------------------------------------------------


def test_one_read_only_repeatable_read_transaction(pg: PostgresServer) -> None:
    settings = """
        SELECT current_setting('transaction_isolation') || ' '
               || current_setting('transaction_read_only') || ' '
               || current_setting('statement_timeout') || ' '
               || current_setting('application_name') AS organization,
               pg_backend_pid()::text AS domain
    """
    result = fetch(source(pg, settings, settings.replace("domain", "name"), timeout=3))
    domain = result.organizations[0].accepted_domains[0].value
    assert result.organizations[0].name == "repeatable read on 3s relaymilter-sync"
    # The same backend for both queries (one session).
    assert result.organizations[0].connectors[0].value == {"name": domain}


def test_application_name_of_the_conninfo_wins(pg: PostgresServer) -> None:
    query = "SELECT current_setting('application_name') AS organization, 'a.example' AS domain"
    result = fetch(source(pg, query, conninfo=pg.conninfo(application_name="mine")))
    assert result.organizations[0].name == "mine"


def test_a_query_that_writes_fails(pg: PostgresServer) -> None:
    pg.execute(
        "CREATE TABLE IF NOT EXISTS scratch (organization text, domain text);"
        "GRANT INSERT ON scratch TO relaymilter"
    )
    insert = "INSERT INTO scratch VALUES ('a', 'a.example') RETURNING organization, domain"
    message = failure(pg, domains=insert)
    assert message == (
        f"{LABEL}: accepted_domains_query: cannot execute INSERT in a read-only transaction"
    )
    # Nor may a second statement end the transaction and write.
    sneaky = f"SELECT 'a' AS organization, 'b' AS domain; COMMIT; {insert}"
    message = failure(pg, domains=sneaky)
    assert "cannot insert multiple commands into a prepared statement" in message
    assert pg.query("SELECT count(*) FROM scratch") == [(0,)]


def test_a_slow_query_times_out(pg: PostgresServer) -> None:
    start = time.monotonic()
    message = failure(
        pg, domains="SELECT 'a' AS organization, pg_sleep(5)::text AS domain", timeout=1
    )
    assert time.monotonic() - start < 3
    assert message == (
        f"{LABEL}: accepted_domains_query: canceling statement due to statement timeout"
    )


def test_a_query_error_gives_the_servers_reason(pg: PostgresServer) -> None:
    message = failure(pg, connectors="SELECT * FROM no_such_table")
    assert message == f'{LABEL}: connectors_query: relation "no_such_table" does not exist'


# -- connecting ---------------------------------------------------------------


def test_a_wrong_password_fails(pg: PostgresServer, tmp_path: Path) -> None:
    wrong = tmp_path / "password"
    wrong.write_text("not-the-password\n")
    message = failure(pg, domains="SELECT 1", password_file=str(wrong))
    assert message == (
        f'{LABEL}: cannot connect: connection to server at "127.0.0.1", port {pg.port} failed:'
        ' FATAL: password authentication failed for user "relaymilter"'
    )
    assert "not-the-password" not in message


def test_the_password_from_a_pgpass_file(
    pg: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(pg.pgpass_line())
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    query = "SELECT 'a' AS organization, 'a.example' AS domain"
    assert domains_of(fetch(source(pg, query, password_file=None))) == {"a": ["a.example"]}
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    message = failure(pg, domains=query, password_file=None)
    assert "no password supplied" in message or "password authentication failed" in message


def test_an_empty_password_file(pg: PostgresServer, tmp_path: Path) -> None:
    empty = tmp_path / "password"
    empty.write_text("")
    message = failure(pg, domains="SELECT 1", password_file=str(empty))
    assert message == f"{LABEL}: {empty}: the password file is empty"


def test_a_conninfo_that_libpq_refuses(pg: PostgresServer) -> None:
    message = failure(pg, domains="SELECT 1", conninfo=pg.conninfo(sslmode="sometimes"))
    assert message.startswith(f"{LABEL}: cannot connect: ")
    assert 'invalid sslmode value: "sometimes"' in message


def test_keepalive_settings_of_the_conninfo_are_kept(pg: PostgresServer) -> None:
    conninfo = pg.conninfo(keepalives_idle="7") + " keepalives=0"
    query = "SELECT 'a' AS organization, 'a.example' AS domain"
    assert domains_of(fetch(source(pg, query, conninfo=conninfo))) == {"a": ["a.example"]}


def test_a_server_that_is_down(pg: PostgresServer) -> None:
    pg.stop()
    try:
        start = time.monotonic()
        message = failure(pg, domains="SELECT 1")
        assert time.monotonic() - start < 3
    finally:
        pg.start()
    assert message == (
        f'{LABEL}: cannot connect: connection to server at "127.0.0.1", port {pg.port} failed:'
        " Connection refused"
    )


def test_every_host_tried_is_named(pg: PostgresServer) -> None:
    pg.stop()
    try:
        conninfo = pg.conninfo(host="127.0.0.2,127.0.0.1")
        message = failure(pg, domains="SELECT 1", conninfo=conninfo)
    finally:
        pg.start()
    assert message == (
        f'{LABEL}: cannot connect: connection to server at "127.0.0.2", port {pg.port} failed:'
        f' Connection refused; connection to server at "127.0.0.1", port {pg.port} failed:'
        " Connection refused"
    )


def test_failover_to_the_second_host(pg: PostgresServer) -> None:
    # Nothing listens on 127.0.0.2 at this port: libpq tries the next host.
    conninfo = pg.conninfo(host="127.0.0.2,127.0.0.1", port=f"{pg.port},{pg.port}")
    query = "SELECT 'a' AS organization, 'a.example' AS domain"
    result = fetch(source(pg, query, conninfo=conninfo))
    assert result.detail == f"host 127.0.0.1 port {pg.port}, database relaymilter"


def test_tls_verify_full_with_the_right_ca(pg: PostgresServer) -> None:
    conninfo = pg.conninfo(sslmode="verify-full", sslrootcert=str(pg.ca_file))
    query = """
        SELECT 'a' AS organization, ssl::text || ' ' || version AS domain
        FROM pg_stat_ssl WHERE pid = pg_backend_pid()
    """
    result = fetch(source(pg, query, conninfo=conninfo))
    assert result.organizations[0].accepted_domains[0].value.startswith("true TLSv1.")


def test_tls_verify_full_with_another_ca_fails(pg: PostgresServer) -> None:
    conninfo = pg.conninfo(sslmode="verify-full", sslrootcert=str(pg.other_ca_file))
    message = failure(pg, domains="SELECT 1", conninfo=conninfo)
    assert message.startswith(f"{LABEL}: cannot connect: ")
    assert "SSL error: certificate verify failed" in message


def test_without_psycopg_the_error_names_the_packages(pg: PostgresServer) -> None:
    # A fresh interpreter in which "import psycopg" fails, as on a host without it.
    program = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from relaymilter.sync.sources import SourceError\n"
        "from relaymilter.sync.sources.postgresql import fetch\n"
        "from relaymilter.core.sourcesettings import PostgresqlSource\n"
        "try:\n"
        "    fetch(PostgresqlSource('hosting', 'host=x', None, 1.0, 'SELECT 1', None))\n"
        "except SourceError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert result.stdout.startswith(f"{LABEL}: psycopg 3 is not installed"), result.stderr
    assert "python3-psycopg on Debian" in result.stdout
    assert "python3-psycopg3 from EPEL" in result.stdout


@pytest.mark.parametrize(
    ("conninfo", "expected"),
    [
        ("host=a", [{"host": "a"}]),
        ("host=a,b port=5", [{"host": "a", "port": "5"}, {"host": "b", "port": "5"}]),
        ("host=a,b port=5,6", [{"host": "a", "port": "5"}, {"host": "b", "port": "6"}]),
        (
            "host=a,b hostaddr=192.0.2.1,192.0.2.2 dbname=d",
            [
                {"host": "a", "hostaddr": "192.0.2.1", "dbname": "d"},
                {"host": "b", "hostaddr": "192.0.2.2", "dbname": "d"},
            ],
        ),
        ("hostaddr=192.0.2.1,192.0.2.2", [{"hostaddr": "192.0.2.1"}, {"hostaddr": "192.0.2.2"}]),
        # What libpq explains better itself goes to it whole.
        ("host=a,b port=5,6,7", [{"host": "a,b", "port": "5,6,7"}]),
        ("host=a hostaddr=192.0.2.1,192.0.2.2", [{"host": "a", "hostaddr": "192.0.2.1,192.0.2.2"}]),
        ("host=a,,b", [{"host": "a,,b"}]),
    ],
)
def test_connection_attempts(
    conninfo: str, expected: List[Dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT"):
        monkeypatch.delenv(variable, raising=False)
    assert connection_attempts(conninfo_to_dict(conninfo)) == expected


def test_connection_attempts_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "a,b")
    monkeypatch.setenv("PGPORT", "5")
    monkeypatch.delenv("PGHOSTADDR", raising=False)
    assert connection_attempts({"dbname": "d"}) == [
        {"dbname": "d", "host": "a", "port": "5"},
        {"dbname": "d", "host": "b", "port": "5"},
    ]
