"""relaymilter sync with the files source, the snapshot's validation, and the daemon that reads it.

The LDAP and PostgreSQL sources have their own tests against real servers
(test_source_ldap.py, test_source_postgresql.py, test_sync_servers.py); what
is common to every source (all or nothing, the guard, the lock, the status,
the daemon's reload and max_snapshot_age) is tested here with YAML fragments.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymilter.config import ConfigError, SnapshotText, load_config, parse_config
from relaymilter.config.origins import origins
from relaymilter.config.sources import conninfo_problem
from relaymilter.sync import runner as sync
from relaymilter.sync import snapshot
from relaymilter.sync.sources import SourceItem, SourceOrganization

from ..daemon.test_metrics import parse_samples, scrape
from ..support import ATTR36, Daemon, MilterSession, free_port, run_cli, running_daemon

CONFIG = """\
socket: inet:8894@127.0.0.1
organizations:
  - name: Contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: hybrid
        tls_sender_certificate_name: "*.contoso.com"
sources:
  status: status.json
  max_removed_domains: 50%
  files:
    - name: tenants
      directory: organizations.d
"""

FABRIKAM = """\
organizations:
  - name: Fabrikam
    accepted_domains: [fabrikam.com, {domain: fabrikam.net, match_subdomains: true}]
    connectors:
      - name: onprem
        sender_ip_addresses: [192.0.2.0/24]
"""


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    (tmp_path / "organizations.d").mkdir()
    (tmp_path / "relaymilter.yml").write_text(CONFIG)
    (tmp_path / "organizations.d" / "fabrikam.yml").write_text(FABRIKAM)
    return tmp_path


def fragment(site: Path, name: str, text: str) -> None:
    (site / "organizations.d" / name).write_text(textwrap.dedent(text))


def cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("sync", "-c", str(site / "relaymilter.yml"), *args)


def status(site: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((site / "status.json").read_text())


# -- the config's sources: section ------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("files: [{name: a}]", "sources.files[0].directory: required key is missing"),
        ("{}", "sources: lists no source"),
        ("max_snapshot_age: soon\n  files: []", "is not a positive duration"),
        ("max_removed_domains: 120%\n  files: []", "between 0% and 100%"),
        (
            "ldap: [{name: d, uris: ['ldap://dc1.example'], bind_dn: cn=x, "
            "password_file: p, base: dc=x, preset: active-directory, organization: C}]",
            "would send the bind password in clear",
        ),
        (
            "ldap: [{name: d, uris: ['ldaps://dc1.example'], bind_dn: cn=x, "
            "password_file: p, preset: active-directory}]",
            "the active-directory preset needs the organization",
        ),
        (
            "ldap: [{name: d, uris: ['http://dc1.example'], preset: active-directory, "
            "organization: C}]",
            "must be an ldap://, ldaps:// or ldapi:// URI",
        ),
        (
            "ldap: [{name: d, uris: ['ldaps://dc1.example'], base: 'o=x', "
            "accepted_domains: {filter: 'objectClass=x', domain_attribute: d, "
            "organization_attribute: o}}]",
            "is not an LDAP filter",
        ),
        (
            "ldap: [{name: d, uris: ['ldaps://dc1.example'], base: 'o=x', "
            "accepted_domains: {filter: '(objectClass=x)', domain_attribute: d}}]",
            "needs an organization_attribute, or an organization for the whole source",
        ),
        (
            "postgresql: [{name: p, conninfo: 'host=db password=secret', "
            "accepted_domains_query: 'SELECT 1'}]",
            "has a password: put it in password_file",
        ),
        (
            "postgresql: [{name: p, conninfo: 'postgresql://u:secret@db/relay', "
            "accepted_domains_query: 'SELECT 1'}]",
            "has a password",
        ),
        ("postgresql: [{name: p, conninfo: 'host=db'}]", "needs accepted_domains_query"),
        (
            "files: [{name: a, directory: x}, {name: a, directory: y}]",
            "two sources are named 'a'",
        ),
    ],
)
def test_source_settings_are_checked_without_connecting(
    tmp_path: Path, section: str, message: str
) -> None:
    text = CONFIG.split("sources:")[0] + f"sources:\n  {section}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(
            text, str(tmp_path / "relaymilter.yml"), SnapshotText("organizations: []", "s")
        )
    assert message in str(caught.value), str(caught.value)
    assert f"{tmp_path}/relaymilter.yml:" in str(caught.value)


def test_valid_source_settings(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    text = CONFIG.split("sources:")[0] + textwrap.dedent(
        """\
        sources:
          max_snapshot_age: 2h
          ldap:
            - name: ad
              preset: active-directory
              organization: Contoso
              uris: [ldaps://dc1.contoso.com, ldaps://dc2.contoso.com]
              bind_dn: CN=svc-relaymilter,OU=Service Accounts,DC=contoso,DC=com
              password_file: ad.password
              ca_file: ca.pem
              timeout: 10s
          postgresql:
            - name: tenants
              conninfo: host=db1,db2 dbname=relay user=relaymilter sslmode=verify-full
              password_file: pg.password
              accepted_domains_query: SELECT organization, domain FROM relay_domains
        """
    )
    config = parse_config(
        text, str(tmp_path / "relaymilter.yml"), SnapshotText("organizations: []", "s")
    )
    assert config.sources is not None
    ad, pg = config.sources.sources
    assert config.sources.max_snapshot_age == 7200
    assert ad.kind == "ldap" and ad.password_file == str(tmp_path / "ad.password")
    assert ad.accepted_domains is not None
    assert ad.accepted_domains.filter == "(objectClass=msExchAcceptedDomain)"
    assert ad.accepted_domains.organization == "Contoso" and ad.base is None
    assert pg.kind == "postgresql" and pg.timeout == 30
    assert config.sources.snapshot == str(tmp_path / "relaymilter.snapshot.yml")


@pytest.mark.parametrize(
    ("conninfo", "ok"),
    [
        ("host=db dbname=relay", True),
        ("host='a b' dbname = relay", True),
        ("postgresql://relaymilter@db1,db2/relay?sslmode=verify-full", True),
        ("host=db PASSWORD=x", False),
        ("postgresql://db/relay?password=x", False),
        ("host", False),
        ("host=db password = 's3 cr3t", False),
        ("postgresql://u:s3cr3t@[::1/db", False),
    ],
)
def test_conninfo_checks(conninfo: str, ok: bool) -> None:
    problem = conninfo_problem(conninfo)
    assert (problem is None) == ok
    assert "s3" not in (problem or "")  # never quoted back


def test_a_missing_snapshot_is_an_error_that_says_to_sync(site: Path) -> None:
    result = run_cli("check-config", "-c", str(site / "relaymilter.yml"))
    assert result.returncode == 1
    assert "relaymilter.snapshot.yml does not exist yet: run 'relaymilter sync'" in result.stderr


# -- the snapshot ------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(names=st.lists(_text, min_size=1, max_size=4, unique=True), origin=_text, value=_text)
def test_any_value_a_source_sends_reads_back_as_it_was(
    names: list,
    origin: str,
    value: str,  # type: ignore[type-arg]
) -> None:
    organizations = [
        SourceOrganization(
            name,
            origin,
            [
                SourceItem(value, origin),
                SourceItem({"domain": value, "match_subdomains": True}, origin),
            ],
            [SourceItem({"name": value, "sender_ip_addresses": [value]}, origin)],
        )
        for name in names
    ]
    text = snapshot.render(organizations)
    assert snapshot.content_of_text(text) == snapshot.content_of_sources(organizations)
    index = origins(text)
    assert len(index.starts) == 3 * len(names)
    assert all("\n" not in name for name in index.names)


def test_changes_per_organization() -> None:
    def organization(name: str, domains: list, connectors: list) -> SourceOrganization:  # type: ignore[type-arg]
        return SourceOrganization(
            name,
            "o",
            [SourceItem(d, "o") for d in domains],
            [SourceItem(c, "o") for c in connectors],
        )

    old = snapshot.content_of_sources(
        [
            organization(
                "A",
                ["a.example", "b.example"],
                [{"name": "x", "sender_ip_addresses": ["192.0.2.1"]}],
            )
        ]
    )
    new = snapshot.content_of_sources(
        [
            organization(
                "A",
                ["a.example", {"domain": "c.example", "match_subdomains": True}],
                [{"name": "x", "sender_ip_addresses": ["192.0.2.2"]}],
            ),
            organization("B", ["b.example"], []),
        ]
    )
    change = snapshot.changes(old, new)
    assert change["A"].domains_added == ["*.c.example"]
    assert change["A"].domains_removed == ["b.example"]
    assert change["A"].connectors_changed == ["x"]
    assert change["B"].domains_added == ["b.example"]
    assert snapshot.removed_domains(change) == 1


# -- relaymilter sync ----------------------------------------------------------


def test_sync_writes_a_snapshot_the_config_loads(site: Path) -> None:
    os.chmod(site / "relaymilter.yml", 0o640)
    result = cli(site)
    assert result.returncode == 0, result.stderr
    assert "changed Fabrikam: 2 domains added (fabrikam.com, *.fabrikam.net)" in result.stdout
    written = site / "relaymilter.snapshot.yml"
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
    config = load_config(str(site / "relaymilter.yml"))
    assert [o.name for o in config.organizations] == ["Contoso", "Fabrikam"]
    assert config.snapshot is not None and config.snapshot.path == str(written)
    fabrikam = config.organizations[1]
    assert fabrikam.accepts("mail.fabrikam.net") and fabrikam.accepts("fabrikam.com")
    recorded = status(site)
    assert recorded["last_error"] is None
    assert recorded["sources"]["tenants"]["domains"] == 2
    assert recorded["last_change"]["organizations"]["Fabrikam"]["domains_added"]["count"] == 2


def test_the_identity_covers_the_snapshot(site: Path) -> None:
    assert cli(site).returncode == 0
    before = load_config(str(site / "relaymilter.yml")).identity
    fragment(
        site,
        "more.yml",
        "organizations: [{name: Northwind, accepted_domains: [northwind.example], connectors: []}]\n",
    )
    assert cli(site).returncode == 0
    assert load_config(str(site / "relaymilter.yml")).identity != before


def test_a_domain_from_a_source_registers_a_certificate_connector_of_the_config(site: Path) -> None:
    # The connector is in the config file, its domain comes from a source:
    # they are validated together, after the merge.
    config = (
        (site / "relaymilter.yml")
        .read_text()
        .replace("accepted_domains: [contoso.com]", "accepted_domains: []")
    )
    (site / "relaymilter.yml").write_text(config)
    fragment(
        site, "contoso.yml", "organizations: [{name: Contoso, accepted_domains: [contoso.com]}]\n"
    )
    result = cli(site)
    assert result.returncode == 0, result.stderr
    loaded = load_config(str(site / "relaymilter.yml"))
    contoso = loaded.organizations[0]
    assert contoso.accepts("contoso.com") and contoso.connectors[0].name == "hybrid"


def test_an_invalid_record_is_named_and_the_last_good_snapshot_stays(site: Path) -> None:
    assert cli(site).returncode == 0
    good = (site / "relaymilter.snapshot.yml").read_text()
    fragment(
        site,
        "bad.yml",
        """\
        organizations:
          - name: Tailspin
            accepted_domains:
              - tailspintoys.com
              - co.uk
            connectors: []
        """,
    )
    result = cli(site)
    assert result.returncode == 1
    assert "co.uk is a public suffix" in result.stderr
    assert f"(from files 'tenants': {site}/organizations.d/bad.yml:5)" in result.stderr
    assert (site / "relaymilter.snapshot.yml").read_text() == good
    recorded = status(site)
    assert "co.uk is a public suffix" in recorded["last_error"]
    assert recorded["last_success"] < recorded["last_attempt"]
    shown = cli(site, "--status")
    assert shown.returncode == 1
    assert "last sync:" in shown.stdout and "failed: " in shown.stdout


def test_a_domain_claimed_by_two_organizations_names_both_places(site: Path) -> None:
    fragment(
        site, "steal.yml", "organizations: [{name: Mallory, accepted_domains: [contoso.com]}]\n"
    )
    result = cli(site)
    assert result.returncode == 1
    assert "contoso.com overlaps contoso.com of organization 'Contoso'" in result.stderr
    assert "steal.yml:1" in result.stderr


def test_a_failing_source_fails_the_whole_sync(site: Path) -> None:
    assert cli(site).returncode == 0
    before = (site / "relaymilter.snapshot.yml").stat().st_mtime_ns
    (site / "organizations.d" / "fabrikam.yml").write_text("organizations: [unclosed\n")
    result = cli(site)
    assert result.returncode == 1
    assert "not valid YAML" in result.stderr and "the snapshot is unchanged" in result.stderr
    assert (site / "relaymilter.snapshot.yml").stat().st_mtime_ns == before
    assert status(site)["sources"]["tenants"]["last_error"]


def test_an_unchanged_result_refreshes_the_age_only(site: Path) -> None:
    assert cli(site).returncode == 0
    path = site / "relaymilter.snapshot.yml"
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    text = path.read_text()
    result = cli(site)
    assert result.returncode == 0 and "unchanged (refreshed)" in result.stdout
    assert path.read_text() == text
    assert time.time() - path.stat().st_mtime < 60


def test_removing_more_than_the_share_is_refused_unless_forced(site: Path) -> None:
    fragment(
        site,
        "more.yml",
        "organizations: [{name: Northwind, accepted_domains: [northwind.example]}]\n",
    )
    assert cli(site).returncode == 0
    (site / "organizations.d" / "fabrikam.yml").unlink()
    dry = cli(site, "--dry-run")
    assert dry.returncode == 1
    assert (
        "would remove 2 of the snapshot's 3 domains (67%), more than max_removed_domains (50%)"
        in dry.stderr
    )
    assert cli(site).returncode == 1
    assert "fabrikam.com" in (site / "relaymilter.snapshot.yml").read_text()
    forced = cli(site, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "fabrikam.com" not in (site / "relaymilter.snapshot.yml").read_text()


def test_a_source_that_empties_is_refused_unless_forced(site: Path) -> None:
    (site / "relaymilter.yml").write_text(CONFIG.replace("50%", "100%"))
    assert cli(site).returncode == 0
    (site / "organizations.d" / "fabrikam.yml").unlink()
    result = cli(site)
    assert result.returncode == 1
    assert "files 'tenants' returned nothing, after 1 organizations last time" in result.stderr
    assert cli(site, "--force").returncode == 0


def test_dry_run_shows_the_change_and_writes_nothing(site: Path) -> None:
    result = cli(site, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would change Fabrikam: 2 domains added" in result.stdout
    assert not (site / "relaymilter.snapshot.yml").exists()
    assert not (site / "status.json").exists()


def test_a_concurrent_sync_stops_at_once(site: Path) -> None:
    with open(site / "status.json.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = cli(site)
    assert result.returncode == sync.EXIT_BUSY
    assert "another sync is running" in result.stderr
    assert not (site / "relaymilter.snapshot.yml").exists()
    assert cli(site).returncode == 0


def test_the_lock_is_never_taken_through_a_link(site: Path, tmp_path: Path) -> None:
    # As root, "open(lock, 'a')" would create or append to any file a link names.
    target = tmp_path / "elsewhere"
    (site / "status.json.lock").symlink_to(target)
    result = cli(site)
    assert result.returncode == sync.EXIT_FAILED
    assert "Too many levels of symbolic links" in result.stderr
    assert not target.exists()
    assert not (site / "relaymilter.snapshot.yml").exists()


def test_no_sources_section_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "relaymilter.yml").write_text(CONFIG.split("sources:")[0])
    result = run_cli("sync", "-c", str(tmp_path / "relaymilter.yml"))
    assert result.returncode == sync.EXIT_CONFIG and "has no sources: section" in result.stderr


def test_status_as_json(site: Path) -> None:
    assert cli(site).returncode == 0
    result = cli(site, "--status", "--json")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["stale"] is False and document["snapshot_age"] < 60
    assert document["sources"]["tenants"]["kind"] == "files"


# -- the daemon ---------------------------------------------------------------


@pytest.fixture()
def daemon(site: Path) -> Iterator[Daemon]:
    (site / "relaymilter.yml").write_text(
        CONFIG.replace("status.json\n", "status.json\n  max_snapshot_age: 1h\n")
    )
    assert cli(site).returncode == 0
    spec = f"inet:{free_port()}@127.0.0.1"
    with running_daemon(site / "relaymilter.yml", spec, site / "daemon.log") as running:
        yield running


def ask(daemon: Daemon, client: str, sender: str, recipient: str) -> str:
    session = MilterSession(daemon.spec)
    try:
        session.negotiate()
        session.connect(client)
        session.mail(sender)
        return session.rcpt(recipient)
    finally:
        session.close()


def test_the_daemon_reloads_a_new_snapshot_by_itself(site: Path, daemon: Daemon) -> None:
    assert ask(daemon, "198.51.100.7", "<>", "<a@outside.example>") == "continue"  # no connector
    fragment(
        site,
        "northwind.yml",
        "organizations: [{name: Northwind, accepted_domains: [northwind.example], "
        "connectors: [{name: ip, sender_ip_addresses: [198.51.100.0/24]}]}]\n",
    )
    mark = len(daemon.log())
    assert cli(site).returncode == 0
    daemon.wait_for_log("was replaced; reloading", after=mark)
    daemon.wait_for_log("reload: loaded", after=mark)
    assert ask(daemon, "198.51.100.7", "<>", "<a@outside.example>") == "550 " + ATTR36
    assert ask(daemon, "198.51.100.7", "<x@northwind.example>", "<a@outside.example>") == "continue"


def test_the_daemon_answers_451_past_max_snapshot_age(site: Path, daemon: Daemon) -> None:
    path = site / "relaymilter.snapshot.yml"
    mark = len(daemon.log())
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    daemon.wait_for_log("past max_snapshot_age 1h 0m: answering 451 4.3.0", after=mark)
    reply = ask(daemon, "192.0.2.5", "<x@fabrikam.com>", "<a@outside.example>")
    assert reply.startswith("451 4.3.0") and "out of date" in reply
    daemon.wait_for_log("tempfail: the snapshot is older than max_snapshot_age", after=mark)
    assert cli(site).returncode == 0  # the sources answer again
    daemon.wait_for_log("is fresh again", after=mark)
    assert ask(daemon, "192.0.2.5", "<x@fabrikam.com>", "<a@outside.example>") == "continue"


def test_a_restart_during_an_outage_decides_from_the_snapshot(site: Path) -> None:
    assert cli(site).returncode == 0
    (site / "organizations.d").rename(site / "gone")  # the source is down
    assert cli(site).returncode == 1
    spec = f"inet:{free_port()}@127.0.0.1"
    with running_daemon(site / "relaymilter.yml", spec, site / "daemon.log") as running:
        assert ask(running, "192.0.2.5", "<>", "<a@outside.example>") == "550 " + ATTR36
        assert ask(running, "192.0.2.5", "<x@fabrikam.com>", "<a@outside.example>") == "continue"


def test_the_metrics_show_the_snapshot_and_the_sources(site: Path) -> None:
    port = free_port()
    text = CONFIG.replace("status.json\n", "status.json\n  max_snapshot_age: 1h\n")
    (site / "relaymilter.yml").write_text(text + f"metrics: {{listen: '127.0.0.1:{port}'}}\n")
    assert cli(site).returncode == 0
    spec = f"inet:{free_port()}@127.0.0.1"
    with running_daemon(site / "relaymilter.yml", spec, site / "daemon.log") as running:
        samples = parse_samples(scrape(port))
        synced = samples[("relaymilter_snapshot_synced_timestamp_seconds", ())]
        assert abs(synced - (site / "relaymilter.snapshot.yml").stat().st_mtime) < 1
        assert samples[("relaymilter_snapshot_stale", ())] == 0
        assert samples[("relaymilter_snapshot_max_age_seconds", ())] == 3600
        labels = (("kind", "files"), ("source", "tenants"))
        assert samples[("relaymilter_sync_source_up", labels)] == 1
        assert samples[("relaymilter_sync_last_run_successful", ())] == 1
        assert samples[("relaymilter_sync_source_last_success_timestamp_seconds", labels)] > 0
        mark = len(running.log())
        os.utime(site / "relaymilter.snapshot.yml", (time.time() - 7200, time.time() - 7200))
        running.wait_for_log("past max_snapshot_age", after=mark)
        assert ask(running, "192.0.2.5", "<>", "<a@outside.example>").startswith("451 4.3.0")
        (site / "organizations.d" / "fabrikam.yml").write_text("organizations: [\n")
        assert cli(site).returncode == 1
        samples = parse_samples(scrape(port))
        assert samples[("relaymilter_snapshot_stale", ())] == 1
        assert samples[("relaymilter_stale_snapshot_answers_total", ())] == 1
        assert samples[("relaymilter_sync_source_up", labels)] == 0
        assert samples[("relaymilter_sync_last_run_successful", ())] == 0


def test_an_error_in_the_config_file_itself_is_a_config_error(site: Path) -> None:
    text = CONFIG.replace(
        "socket: inet:8894@127.0.0.1", "socket: inet:8894@127.0.0.1\nmode: strict"
    )
    (site / "relaymilter.yml").write_text(text)
    result = cli(site)
    assert result.returncode == sync.EXIT_CONFIG
    assert "error(s) in" in result.stderr and "itself; fix it first" in result.stderr
    assert "mode: must be one of enforce, soft, monitor" in result.stderr
    assert not (site / "relaymilter.snapshot.yml").exists()


def test_with_sources_the_config_file_may_list_no_organization(site: Path) -> None:
    text = (
        CONFIG.split("organizations:")[0]
        + "organizations: []\nsources:"
        + CONFIG.split("sources:")[1]
    )
    (site / "relaymilter.yml").write_text(text)
    assert cli(site).returncode == 0
    assert [o.name for o in load_config(str(site / "relaymilter.yml")).organizations] == [
        "Fabrikam"
    ]


def test_two_fragments_may_not_give_one_organization_two_modes(site: Path) -> None:
    fragment(
        site,
        "a.yml",
        "organizations: [{name: Northwind, mode: monitor, accepted_domains: [northwind.example]}]\n",
    )
    fragment(
        site,
        "b.yml",
        "organizations: [{name: Northwind, mode: enforce, accepted_domains: [northwind.org]}]\n",
    )
    result = cli(site)
    assert result.returncode == 1
    assert "organization 'Northwind' has mode monitor in files 'tenants'" in result.stderr
    assert "b.yml:1" in result.stderr


def test_a_monitor_only_config_keeps_deciding_on_a_stale_snapshot(site: Path) -> None:
    text = CONFIG.replace("status.json\n", "status.json\n  max_snapshot_age: 1h\n")
    (site / "relaymilter.yml").write_text("mode: monitor\n" + text)
    assert cli(site).returncode == 0
    os.utime(site / "relaymilter.snapshot.yml", (time.time() - 7200, time.time() - 7200))
    spec = f"inet:{free_port()}@127.0.0.1"
    with running_daemon(site / "relaymilter.yml", spec, site / "daemon.log") as running:
        running.wait_for_log(
            "every organization is in monitor mode, so decisions are still only logged"
        )
        assert ask(running, "192.0.2.5", "<>", "<a@outside.example>") == "continue"
        running.wait_for_log("action=would-reject")


# -- after review -------------------------------------------------------------


def test_the_watch_compares_content_not_inodes(site: Path) -> None:
    from relaymilter.daemon import snapshotwatch

    assert cli(site).returncode == 0
    config = load_config(str(site / "relaymilter.yml"))
    requests: list = []  # type: ignore[type-arg]
    watch = snapshotwatch.SnapshotWatch(lambda: config, lambda: requests.append(1), lambda s: None)
    watch.check()
    assert requests == []
    path = site / "relaymilter.snapshot.yml"
    inode = path.stat().st_ino
    # A new text in the very inode of the loaded one (ext4 reuses a freed inode).
    path.write_text(path.read_text().replace("fabrikam.com", "fabrikam.org"))
    assert path.stat().st_ino == inode
    watch.check()
    assert requests == [1]
    watch.check()  # asked once per new text...
    assert requests == [1]
    snapshotwatch.RETRY_AFTER, saved = 0.0, snapshotwatch.RETRY_AFTER
    try:
        watch.check()  # ...and again later if that reload failed
    finally:
        snapshotwatch.RETRY_AFTER = saved
    assert requests == [1, 1]


def test_a_wider_domain_from_a_source_wins_and_is_said(site: Path) -> None:
    fragment(
        site,
        "contoso.yml",
        "organizations: [{name: Contoso, accepted_domains: "
        "[{domain: contoso.com, match_subdomains: true}]}]\n",
    )
    assert cli(site).returncode == 0
    config = load_config(str(site / "relaymilter.yml"))
    assert config.organizations[0].accepts("mail.contoso.com")
    assert any("the snapshot's match_subdomains applies" in w for w in config.warnings)


def test_max_removed_domains_zero_means_zero(tmp_path: Path) -> None:
    text = CONFIG.replace("max_removed_domains: 50%", "max_removed_domains: 0")
    config = parse_config(
        text, str(tmp_path / "relaymilter.yml"), SnapshotText("organizations: []", "s")
    )
    assert config.sources is not None and config.sources.max_removed_domains == 0


def test_a_snapshot_that_cannot_be_written_fails_the_sync_and_says_so(site: Path) -> None:
    text = CONFIG.replace("status: status.json", "status: status.json\n  snapshot: gone/s.yml")
    (site / "relaymilter.yml").write_text(text)
    result = cli(site)
    assert result.returncode == 1
    assert "cannot write the snapshot" in result.stderr and "wrote" not in result.stdout
    assert "cannot write the snapshot" in status(site)["last_error"]


def test_a_domain_a_source_takes_away_is_the_sources_fault_not_the_files(site: Path) -> None:
    # Contoso's certificate connector (in the config file) needs contoso.com, which
    # comes from a source: when the source drops it, the sync is refused (exit 1).
    config = (site / "relaymilter.yml").read_text()
    (site / "relaymilter.yml").write_text(config.replace("[contoso.com]", "[]"))
    fragment(
        site, "contoso.yml", "organizations: [{name: Contoso, accepted_domains: [contoso.com]}]\n"
    )
    assert cli(site).returncode == 0
    fragment(
        site, "contoso.yml", "organizations: [{name: Contoso, accepted_domains: [contoso.org]}]\n"
    )
    result = cli(site, "--force")
    assert result.returncode == 1, result.stderr
    assert "the sources' organizations are not valid" in result.stderr
