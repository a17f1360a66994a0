"""A throwaway PostgreSQL server for the sync tests: ``initdb`` and ``pg_ctl`` in a temporary directory.

The newest PostgreSQL found is used: an installed one (Debian's
/usr/lib/postgresql/VERSION/bin), else the one scripts/bootstrap unpacks
into the cache (15 on Debian 12, 17 on Debian 13).

The server runs as ``nobody`` (initdb refuses root), listens on 127.0.0.1 on a
free port with TLS, and on a unix socket in its directory. Over TCP only the
role ``relaymilter`` may log in, with a password (scram-sha-256), so wrong
credentials really fail; the harness's superuser ``postgres`` uses the unix
socket without a password, for setup. The host's own cluster is never touched.
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import psycopg

from .serverpki import CertificateAuthority
from .support import REPO, free_port

#: Where Debian's postgresql-VERSION packages are, installed or unpacked.
INSTALL_ROOTS = (Path("/"), Path("/var/cache/relaymilter-test-tools/postgresql"))
SCHEMA_FILE = REPO / "etc" / "relaymilter" / "postgresql-schema.sql"
ROLE = "relaymilter"
PASSWORD = "s3cret-Pg!pass"
DATABASE = "relaymilter"
SUPERUSER = "postgres"
RUN_AS = "nobody"

# Settings for speed and isolation: nothing here needs to survive a crash.
_CONFIG = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{socket_dir}'
ssl = on
ssl_cert_file = '{directory}/server.crt'
ssl_key_file = '{directory}/server.key'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 30
shared_buffers = 32MB
log_min_messages = warning
"""

_HBA = f"""
local all {SUPERUSER} trust
host all {ROLE} 127.0.0.1/32 scram-sha-256
"""


def bin_dir() -> Path:
    """The bin directory of the newest PostgreSQL installed or unpacked."""
    found = [
        directory
        for root in INSTALL_ROOTS
        for directory in root.glob("usr/lib/postgresql/*/bin")
        if os.access(directory / "initdb", os.X_OK) and directory.parent.name.isdigit()
    ]
    if not found:
        places = " or ".join(str(root / "usr/lib/postgresql/VERSION/bin") for root in INSTALL_ROOTS)
        raise AssertionError(
            f"no PostgreSQL server binaries (initdb, pg_ctl) in {places}: run scripts/bootstrap,"
            " which unpacks Debian's postgresql-VERSION package without installing it"
        )
    return max(found, key=lambda directory: int(directory.parent.name))


def _clean_env() -> Dict[str, str]:
    """The environment without PG* variables, so nothing reaches the host's cluster."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class PostgresServer:
    """One throwaway cluster; ``with PostgresServer() as pg:`` starts it and removes it at the end."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        self.directory = Path(tempfile.mkdtemp(prefix="relaymilter-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        #: CA that signed the server's certificate, and one that did not.
        self.ca_file = self.directory / "ca.crt"
        self.other_ca_file = self.directory / "other-ca.crt"
        #: The relaymilter role's password, alone on its line (as relaymilter sync reads it).
        self.password_file = self.directory / "password"
        self.running = False

    def conninfo(self, **extra: str) -> str:
        """A libpq conninfo for the role relaymilter over TCP, without the password; ``extra`` overrides."""
        params = {
            "host": self.host,
            "port": str(self.port),
            "dbname": DATABASE,
            "user": ROLE,
            **extra,
        }
        return " ".join(f"{key}={_quote(value)}" for key, value in params.items())

    def pgpass_line(self) -> str:
        """A ~/.pgpass (PGPASSFILE) line with the role's password; the file must be mode 0600."""
        return f"{self.host}:{self.port}:{DATABASE}:{ROLE}:{PASSWORD}\n"

    def __enter__(self) -> PostgresServer:
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def setup(self) -> None:
        self._make_directory()
        self._write_certificates()
        self._as_server(
            str(self.bin / "initdb"),
            "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                _CONFIG.format(port=self.port, socket_dir=self.directory, directory=self.directory)
            )
        (self.data / "pg_hba.conf").write_text(_HBA)
        self.start()
        self._create_role_and_database()

    def _make_directory(self) -> None:
        account = pwd.getpwnam(RUN_AS)
        os.chown(self.directory, account.pw_uid, account.pw_gid)
        os.chmod(self.directory, 0o700)
        self.password_file.write_text(PASSWORD + "\n")

    def _write_certificates(self) -> None:
        ca = CertificateAuthority("relaymilter test PostgreSQL CA")
        ca.write(self.ca_file)
        CertificateAuthority("relaymilter unrelated CA").write(self.other_ca_file)
        key_file = self.directory / "server.key"
        ca.issue_server(self.directory / "server.crt", key_file)
        # PostgreSQL reads its key only if its own user owns it, mode 0600.
        account = pwd.getpwnam(RUN_AS)
        for name in ("server.crt", "server.key"):
            os.chown(self.directory / name, account.pw_uid, account.pw_gid)
        os.chmod(key_file, 0o600)

    def _as_server(self, *command: str) -> None:
        result = subprocess.run(
            ["runuser", "-u", RUN_AS, "--", *command],
            cwd=self.directory,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                f"{self.log()}"
            )

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "server.log").read_text(errors="replace")
        return ""

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._as_server(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "server.log"),
            "-w", "-t", "30", "start",
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        """Stop the server at once (a crash, as far as clients can tell)."""
        self._as_server(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
        )
        self.running = False

    def cleanup(self) -> None:
        if self.running:
            with contextlib.suppress(AssertionError, OSError, subprocess.TimeoutExpired):
                self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- SQL as the superuser -------------------------------------------------

    @contextlib.contextmanager
    def superuser(self, dbname: str = DATABASE) -> Iterator[psycopg.Connection[Tuple[object, ...]]]:
        with psycopg.connect(
            host=str(self.directory),
            port=self.port,
            user=SUPERUSER,
            dbname=dbname,
            autocommit=True,
        ) as conn:
            yield conn

    def execute(self, sql: str) -> None:
        """Run SQL (one or more statements) as the superuser in the test database."""
        with self.superuser() as conn:
            conn.execute(sql.encode())

    def query(self, sql: str) -> List[Tuple[object, ...]]:
        with self.superuser() as conn:
            return conn.execute(sql.encode()).fetchall()

    def _create_role_and_database(self) -> None:
        with self.superuser("postgres") as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'".encode())
            conn.execute(f"CREATE DATABASE {DATABASE}".encode())
        # Whatever the tests create, the role may read (and only read, unless a test grants more).
        self.execute(
            f"ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO {ROLE};"
            f"ALTER DEFAULT PRIVILEGES GRANT USAGE ON SCHEMAS TO {ROLE};"
        )

    # -- the example schema ---------------------------------------------------

    def load_schema(self) -> None:
        """(Re)create the documented example schema, empty."""
        self.execute("DROP SCHEMA IF EXISTS relaymilter CASCADE")
        self.execute(SCHEMA_FILE.read_text())
        self.execute(
            f"GRANT USAGE ON SCHEMA relaymilter TO {ROLE};"
            f"GRANT SELECT ON ALL TABLES IN SCHEMA relaymilter TO {ROLE};"
        )

    def load_organizations(
        self,
        organizations: int,
        domains: int,
        ip_connectors: int = 1,
        certificate_connectors: int = 1,
        recreate: bool = True,
    ) -> None:
        """Fill the example schema: ``organizations`` organizations, each with ``domains`` domains.

        Organization i (1..N) is ``org{i}``, with the domains ``org{i}.example``
        and ``d{j}.org{i}.example`` (j = 1.., d1 with match_subdomains),
        ``ip_connectors`` IP connectors ``ip-{k}`` of one address each
        (10.x.y.k/32; the first also 2001:db8:x::/48), and
        ``certificate_connectors`` certificate connectors ``cert-{k}``
        (``*.org{i}.example``, trusted issuer "org{i} Issuing CA"). Every
        value is distinct, so the whole set passes the sync's validation.
        """
        if recreate:
            self.load_schema()
        tables = _example_rows(organizations, domains, ip_connectors, certificate_connectors)
        with self.superuser() as conn, conn.transaction():
            for copy, rows in tables:
                with conn.cursor().copy(copy.encode()) as out:
                    out.write(rows.getvalue())
            # COPY gave the ids; later INSERTs by the tests must not reuse them.
            for table in ("organizations", "connectors"):
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('relaymilter.{table}', 'id'),"
                    f" (SELECT coalesce(max(id), 0) + 1 FROM relaymilter.{table}), false)".encode()
                )
        self.execute("ANALYZE")

    def example_queries(self) -> Tuple[str, str]:
        """The accepted-domains and connectors queries documented at the top of the schema file."""
        return example_queries()


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "._-/:" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _example_rows(
    organizations: int, domains: int, ip_connectors: int, certificate_connectors: int
) -> Sequence[Tuple[str, io.StringIO]]:
    # COPY text format, built in one go: the scale test loads 100,000 domains.
    orgs, doms, conns, addrs, issuers = (io.StringIO() for _ in range(5))
    connector_id = 0
    for i in range(1, organizations + 1):
        org = f"org{i}"
        orgs.write(f"{i}\t{org}\n")
        for j in range(domains):
            # The first is the certificate connectors' domain; the second covers a subtree.
            domain = f"{org}.example" if j == 0 else f"d{j}.{org}.example"
            doms.write(f"{i}\t{domain}\t{'t' if j == 1 else 'f'}\n")
        for k in range(ip_connectors):
            connector_id += 1
            conns.write(f"{connector_id}\t{i}\tip-{k}\tip\t\\N\t\\N\n")
            addrs.write(f"{connector_id}\t10.{i // 256 % 256}.{i % 256}.{k % 256}/32\n")
            if k == 0:
                addrs.write(f"{connector_id}\t2001:db8:{i % 65536:x}::/48\n")
        for k in range(certificate_connectors):
            connector_id += 1
            conns.write(f"{connector_id}\t{i}\tcert-{k}\tcertificate\t*.{org}.example\t\\N\n")
            issuers.write(f"{connector_id}\t{org} Issuing CA\n")
    return (
        ("COPY relaymilter.organizations (id, name) FROM STDIN", orgs),
        (
            "COPY relaymilter.accepted_domains (organization_id, domain, match_subdomains) FROM STDIN",
            doms,
        ),
        (
            "COPY relaymilter.connectors"
            " (id, organization_id, name, kind, tls_sender_certificate_name, mode) FROM STDIN",
            conns,
        ),
        ("COPY relaymilter.connector_addresses (connector_id, network) FROM STDIN", addrs),
        ("COPY relaymilter.connector_trusted_issuers (connector_id, issuer) FROM STDIN", issuers),
    )


def example_queries(schema_file: Optional[Path] = None) -> Tuple[str, str]:
    """The two queries documented in the schema file's header comment.

    Each starts after a line ``-- accepted_domains_query:`` or
    ``-- connectors_query:`` and runs until the next blank comment line.
    """
    found: Dict[str, List[str]] = {}
    current: Optional[str] = None
    for line in (schema_file or SCHEMA_FILE).read_text().splitlines():
        if not line.startswith("--"):
            break
        text = line[2:].strip()
        if text in ("accepted_domains_query:", "connectors_query:"):
            current = text[:-1]
            found[current] = []
        elif not text:
            current = None
        elif current is not None:
            found[current].append(line[2:])
    return "\n".join(found["accepted_domains_query"]), "\n".join(found["connectors_query"])
