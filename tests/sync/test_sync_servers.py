"""relaymilter sync, the command, against a real slapd and a real PostgreSQL.

The failure cases an admin meets: a source down at the first sync or later
(the last good snapshot stays, the status says so), wrong credentials, a
certificate that does not verify, a record that does not validate (named by
its DN or its row), a result that would wipe most domains, two syncs at once.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from relaymilter.config import load_config

from ..ldapserver import READER_DN, READER_PASSWORD, Slapd, add_accepted_domains, add_entries
from ..pgserver import PostgresServer
from ..support import relaymilter_command, run_cli

HEAD = """\
socket: inet:8894@127.0.0.1
organizations:
  - name: Contoso
    connectors:
      - name: hybrid
        tls_sender_certificate_name: "*.contoso.com"
sources:
  status: status.json
  max_removed_domains: 50%
"""


@pytest.fixture(scope="module")
def slapd() -> Iterator[Slapd]:
    server = Slapd()
    try:
        server.start()
        add_accepted_domains(server, ["contoso.com", "*.contoso.net"])
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        server.load_organizations(20, 3)
        yield server


def ldap_source(slapd: Slapd, directory: Path, **changes: Any) -> Dict[str, Any]:
    password = directory / "ad.password"
    password.write_text(READER_PASSWORD + "\n")
    source: Dict[str, Any] = {
        "name": "ad",
        "preset": "active-directory",
        "organization": "Contoso",
        "uris": [slapd.ldaps_uri],
        "bind_dn": READER_DN,
        "password_file": str(password),
        "ca_file": str(slapd.ca_file),
    }
    source.update(changes)
    return source


def pg_source(postgres: PostgresServer, **changes: Any) -> Dict[str, Any]:
    domains, connectors = postgres.example_queries()
    source: Dict[str, Any] = {
        "name": "hosting",
        "conninfo": postgres.conninfo(sslmode="verify-full", sslrootcert=str(postgres.ca_file)),
        "password_file": str(postgres.password_file),
        "accepted_domains_query": domains,
        "connectors_query": connectors,
    }
    source.update(changes)
    return source


def write_config(directory: Path, ldap: Any = None, postgresql: Any = None) -> Path:
    # Contoso's connector is in the file, its domains come from Active Directory.
    text = (
        HEAD
        if ldap is not None
        else HEAD.split("organizations:")[0] + "sources:" + HEAD.split("sources:")[1]
    )
    if ldap is not None:
        text += f"  ldap: [{json.dumps(ldap)}]\n"
    if postgresql is not None:
        text += f"  postgresql: [{json.dumps(postgresql)}]\n"
    path = directory / "relaymilter.yml"
    path.write_text(text)
    return path


def sync(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("sync", "-c", str(config), *args)


def status(config: Path) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads((config.parent / "status.json").read_text())
    return data


def test_active_directory_gives_the_domains_a_connector_of_the_file_needs(
    slapd: Slapd, tmp_path: Path
) -> None:
    config = write_config(tmp_path, ldap=ldap_source(slapd, tmp_path))
    result = sync(config)
    assert result.returncode == 0, result.stderr
    assert "changed Contoso: 2 domains added (contoso.com, *.contoso.net)" in result.stdout
    contoso = load_config(str(config)).organizations[0]
    assert contoso.accepts("mail.contoso.net") and contoso.connectors[0].name == "hybrid"


def test_an_x400_domain_is_skipped_and_match_subdomains_is_honoured(
    slapd: Slapd, tmp_path: Path
) -> None:
    # Organizations migrated from older Exchange versions often keep an X.400
    # authoritative domain (flag 16); it once failed every sync ("not a valid domain
    # name"). Flag 65536 is Exchange's MatchSubDomains.
    parent = "OU=legacy,dc=contoso,dc=com"
    add_entries(slapd, [(parent, {"objectClass": ["organizationalUnit"], "ou": ["legacy"]})])
    add_accepted_domains(slapd, ["contoso.com"], parent)
    add_accepted_domains(slapd, ["C=US;A= ;P=Contoso;O=Exchange;"], parent, flags=16)
    add_accepted_domains(slapd, ["contoso.net"], parent, flags=65536 | 1)
    config = write_config(tmp_path, ldap=ldap_source(slapd, tmp_path, base=parent))
    result = sync(config)
    assert result.returncode == 0, result.stderr
    note = "skipped the X.400 accepted domain 'C=US;A= ;P=Contoso;O=Exchange;'"
    assert f"ldap 'ad': {note}" in result.stdout
    assert "not an SMTP domain" in result.stdout
    assert "changed Contoso: 2 domains added (contoso.com, *.contoso.net)" in result.stdout
    contoso = load_config(str(config)).organizations[0]
    assert contoso.accepts("mail.contoso.net") and not contoso.accepts("mail.contoso.com")
    (noted,) = status(config)["sources"]["ad"]["notes"]
    assert note in noted and ",ou=legacy,dc=contoso,dc=com)" in noted  # its DN, as slapd gives it
    assert note in run_cli("sync", "-c", str(config), "--status").stdout


def test_a_directory_down_at_the_first_sync(slapd: Slapd, tmp_path: Path) -> None:
    config = write_config(tmp_path, ldap=ldap_source(slapd, tmp_path, uris=["ldaps://127.0.0.1:1"]))
    result = sync(config)
    assert result.returncode == 1
    assert "ldaps://127.0.0.1:1" in result.stderr and "the snapshot is unchanged" in result.stderr
    assert not (tmp_path / "relaymilter.snapshot.yml").exists()
    shown = sync(config, "--status")
    assert shown.returncode == 1 and "last success: never" in shown.stdout


def test_wrong_credentials(slapd: Slapd, tmp_path: Path) -> None:
    config = write_config(tmp_path, ldap=ldap_source(slapd, tmp_path))
    (tmp_path / "ad.password").write_text("not the password\n")
    result = sync(config)
    assert result.returncode == 1
    assert "Invalid credentials" in result.stderr
    assert "not the password" not in result.stderr + result.stdout


def test_a_certificate_that_does_not_verify(slapd: Slapd, tmp_path: Path) -> None:
    source = ldap_source(slapd, tmp_path, ca_file=str(slapd.other_ca_file))
    result = sync(write_config(tmp_path, ldap=source))
    assert result.returncode == 1
    assert "certificate verify failed" in result.stderr


def test_an_invalid_entry_is_named_by_its_dn(slapd: Slapd, tmp_path: Path) -> None:
    dns = add_accepted_domains(slapd, ["co.uk"])
    try:
        result = sync(write_config(tmp_path, ldap=ldap_source(slapd, tmp_path)))
    finally:
        slapd.ldapdelete(dns[0])
    assert result.returncode == 1
    assert "co.uk is a public suffix" in result.stderr
    assert f"(from ldap 'ad': {dns[0]})".lower() in result.stderr.lower()


def test_postgresql_down_later_keeps_the_last_good_snapshot(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, postgresql=pg_source(postgres))
    assert sync(config).returncode == 0
    snapshot = (tmp_path / "relaymilter.snapshot.yml").read_text()
    postgres.stop()
    try:
        result = sync(config)
    finally:
        postgres.start()
    assert result.returncode == 1 and "postgresql 'hosting'" in result.stderr
    assert (tmp_path / "relaymilter.snapshot.yml").read_text() == snapshot
    recorded = status(config)
    assert recorded["sources"]["hosting"]["last_error"]
    assert recorded["sources"]["hosting"]["last_success"] < recorded["last_attempt"]
    shown = sync(config, "--status")
    assert shown.returncode == 1
    assert "last error" in shown.stdout and "last success:" in shown.stdout
    assert len(load_config(str(config)).organizations) == 20  # still decides as before


def test_an_invalid_row_is_named(postgres: PostgresServer, tmp_path: Path) -> None:
    postgres.execute(
        "INSERT INTO relaymilter.accepted_domains (organization_id, domain) "
        "SELECT id, 'not a domain' FROM relaymilter.organizations WHERE name = 'org3'"
    )
    try:
        result = sync(write_config(tmp_path, postgresql=pg_source(postgres)))
    finally:
        postgres.execute("DELETE FROM relaymilter.accepted_domains WHERE domain = 'not a domain'")
    assert result.returncode == 1
    assert "'not a domain' is not a valid domain name" in result.stderr
    assert "(from postgresql 'hosting': accepted_domains_query row" in result.stderr
    assert "org3" in result.stderr


def test_a_result_that_would_wipe_most_domains_is_refused(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path, postgresql=pg_source(postgres))
    assert sync(config).returncode == 0
    before = (tmp_path / "relaymilter.snapshot.yml").read_text()
    # A query that suddenly sees a fraction of the tenants (a broken view, a bad grant).
    narrowed = pg_source(postgres)
    for query in ("accepted_domains_query", "connectors_query"):
        narrowed[query] = (
            f"SELECT * FROM ({narrowed[query]}) AS q WHERE organization IN ('org1', 'org2')"
        )
    write_config(tmp_path, postgresql=narrowed)
    result = sync(config)
    assert result.returncode == 1
    assert "more than max_removed_domains (50%)" in result.stderr
    assert (tmp_path / "relaymilter.snapshot.yml").read_text() == before


def test_two_syncs_at_once(postgres: PostgresServer, tmp_path: Path) -> None:
    config = write_config(tmp_path, postgresql=pg_source(postgres))
    command = [*relaymilter_command(), "sync", "-c", str(config)]
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(run.wait(60), run.communicate()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert set(codes) <= {0, 75} and 0 in codes, results
    for code, (_out, err) in results:
        if code == 75:
            assert "another sync is running" in err
    assert load_config(str(config)).organizations  # one whole snapshot, whoever wrote it
    assert not list(tmp_path.glob(".relaymilter.snapshot.yml.*"))  # no temporary file left
