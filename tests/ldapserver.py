"""A throwaway slapd for the LDAP source's tests, holding an Active Directory-like tree.

Built on python-ldap's ``slapdtest``. slapd is never installed on the test
machine: scripts/bootstrap unpacks Debian's slapd package into
/var/cache/relaymilter-test-tools/slapd, and this runs it from there (its
modules, schema and the libslapi it links against included); on a machine
with slapd installed, the installed one. The server
listens on loopback only: ldap:// (with StartTLS), ldaps:// and ldapi://, with
a certificate from a test CA made here; ``other_ca_file`` is an unrelated CA
for the mismatch tests.

The tree (suffix dc=contoso,dc=com) holds an Exchange configuration partition
with its accepted domains (schema stand-in: tests/data/ldap/exchange.ldif),
published in the RootDSE's configurationNamingContext as Active Directory
does, and a read-only account. Searches by anyone but the rootdn are limited
to SIZE_LIMIT entries unless paged, like Active Directory's MaxPageSize. An
anonymous client does not see configurationNamingContext (a directory that is
not Active Directory).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import pytest

from .serverpki import CertificateAuthority

try:
    import ldif
    import slapdtest
    from ldap.dn import escape_dn_chars
except ImportError as exc:  # pragma: no cover - bootstrap installs python3-ldap
    raise ImportError(f"{exc}: the LDAP tests need python3-ldap (run scripts/bootstrap)") from exc

#: Where Debian's slapd package is: unpacked by scripts/bootstrap, or installed.
SLAPD_ROOTS = (Path("/var/cache/relaymilter-test-tools/slapd"), Path("/"))


def _slapd_root() -> Path:
    for root in SLAPD_ROOTS:
        if os.access(root / "usr/sbin/slapd", os.X_OK):
            return root
    return SLAPD_ROOTS[0]


TOOLS = _slapd_root()
SLAPD = TOOLS / "usr/sbin/slapd"
DATA = Path(__file__).resolve().parent / "data" / "ldap"

SUFFIX = "dc=contoso,dc=com"
CONFIGURATION_DN = "CN=Configuration,DC=contoso,DC=com"
EXCHANGE_ORGANIZATION_DN = (
    "CN=Contoso,CN=Microsoft Exchange,CN=Services,CN=Configuration,DC=contoso,DC=com"
)
ACCEPTED_DOMAINS_DN = f"CN=Accepted Domains,CN=Transport Settings,{EXCHANGE_ORGANIZATION_DN}"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "reader secret"
#: slapd's limit for a search that is not paged (the rootdn has none).
SIZE_LIMIT = 50

LdifValue = Union[str, bytes]


def require_slapd() -> None:
    """Fail (never skip: CI always has it) when bootstrap has not unpacked slapd."""
    if not os.access(SLAPD, os.X_OK):
        pytest.fail(
            f"no slapd in {' or '.join(str(root / 'usr/sbin') for root in SLAPD_ROOTS)}:"
            " run scripts/bootstrap, which unpacks Debian's slapd package for the LDAP tests"
            " (without installing it)",
            pytrace=False,
        )


# -- LDIF ---------------------------------------------------------------------


def ldif_entries(entries: Iterable[Tuple[str, Dict[str, Sequence[LdifValue]]]]) -> str:
    """LDIF for entries given as (dn, {attribute: values}); bytes values are kept as they are."""
    out = io.StringIO()
    writer = ldif.LDIFWriter(out, cols=10000)
    for dn, attributes in entries:
        writer.unparse(
            dn,
            {
                name: [v if isinstance(v, bytes) else v.encode("utf-8") for v in values]
                for name, values in attributes.items()
            },
        )
    return out.getvalue()


def _container(dn: str) -> Tuple[str, Dict[str, Sequence[LdifValue]]]:
    return dn, {"objectClass": ["container"], "cn": [dn.split(",", 1)[0].split("=", 1)[1]]}


def _base_entries() -> List[Tuple[str, Dict[str, Sequence[LdifValue]]]]:
    # The Exchange organization's path below the configuration partition, as AD has it.
    path = ACCEPTED_DOMAINS_DN.split(",")
    stop = len(CONFIGURATION_DN.split(","))
    containers = [",".join(path[i:]) for i in range(len(path) - stop, -1, -1)]
    return [
        (SUFFIX, {"objectClass": ["domain"], "dc": ["contoso"]}),
        (
            READER_DN,
            {
                "objectClass": ["person"],
                "cn": ["reader"],
                "sn": ["reader"],
                "userPassword": [READER_PASSWORD],
            },
        ),
        *(_container(dn) for dn in containers),
    ]


def add_accepted_domains(
    server: Slapd, names: Sequence[str], parent: str = ACCEPTED_DOMAINS_DN, flags: int = 0
) -> List[str]:
    """Add an msExchAcceptedDomain entry per name below parent (one ldapadd); their DNs.

    ``flags``: msExchAcceptedDomainFlags (16: an X.400 domain, 65536: MatchSubDomains).
    """
    entries = [
        (
            f"CN={escape_dn_chars(name)},{parent}",
            {
                "objectClass": ["msExchAcceptedDomain"],
                "cn": [name],
                "msExchAcceptedDomainName": [name],
                "msExchAcceptedDomainFlags": [str(flags)],
            },
        )
        for name in names
    ]
    add_entries(server, entries)
    return [dn for dn, _ in entries]


def add_entries(
    server: Slapd, entries: Sequence[Tuple[str, Dict[str, Sequence[LdifValue]]]]
) -> None:
    """Add entries as the rootdn (over ldapi, one ldapadd)."""
    server.ldapadd(ldif_entries(entries))


# -- the server ---------------------------------------------------------------


class Slapd(slapdtest.SlapdObject):  # type: ignore[misc]
    """Debian's slapd (unpacked or installed), on loopback, with TLS and the tree above."""

    suffix = SUFFIX
    root_cn = "Manager"
    root_pw = "manager secret"
    SCHEMADIR = str(TOOLS / "etc/ldap/schema")
    SBIN_PATH = str(TOOLS / "usr/sbin")
    openldap_schema_files = (
        "core.ldif",
        "cosine.ldif",
        "inetorgperson.ldif",
        str(DATA / "exchange.ldif"),
    )

    def __init__(self) -> None:
        require_slapd()
        self._root = tempfile.mkdtemp(prefix="relaymilter-slapd-")
        self.TMPDIR = self._root
        try:
            super().__init__()
        except BaseException:
            shutil.rmtree(self._root, ignore_errors=True)
            raise
        self.ldaps_port: int = self._avail_tcp_port()
        self.ldaps_uri = f"ldaps://{self.local_host}:{self.ldaps_port}"
        self.ldap_uri = f"ldap://{self.local_host}:{self.port}"
        self._rootdse = os.path.join(self.testrundir, "rootdse.ldif")
        # Paths of the test CA's and of an unrelated CA's certificate.
        self.ca_file = os.path.join(self.testrundir, "ca.pem")
        self.other_ca_file = os.path.join(self.testrundir, "other-ca.pem")
        self.servercert = os.path.join(self.testrundir, "server.pem")
        self.serverkey = os.path.join(self.testrundir, "server.key")
        self.cafile = self.ca_file

    def _find_commands(self) -> None:
        super()._find_commands()
        # Debian's package's, whatever $SLAPD says.
        self.PATH_SLAPD = str(SLAPD)
        self.PATH_SLAPADD = str(TOOLS / "usr/sbin/slapadd")

    def _env(self) -> Dict[str, str]:
        # slapd links against its package's own libslapi: libslapi-2.5.so.0
        # in Debian 12, libslapi.so.2 in Debian 13.
        library = str(next(TOOLS.glob("usr/lib/*/libslapi*.so.*")).parent)
        existing = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LD_LIBRARY_PATH": f"{library}:{existing}" if existing else library}

    def setup_rundir(self) -> None:
        super().setup_rundir()
        ca = CertificateAuthority("relaymilter test CA")
        ca.write(Path(self.ca_file))
        ca.issue_server(Path(self.servercert), Path(self.serverkey))
        CertificateAuthority("unrelated test CA").write(Path(self.other_ca_file))
        Path(self._rootdse).write_text(
            f"dn:\nconfigurationNamingContext: {CONFIGURATION_DN}\n", encoding="utf-8"
        )

    def gen_config(self) -> str:
        rootdn = self.root_dn
        return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcServerID: {self.server_id:#x}
olcLogLevel: none
olcAuthzRegexp: {{0}}"gidnumber={os.getgid()}\\+uidnumber={os.getuid()},cn=peercred,cn=external,cn=auth" "{rootdn}"
olcTLSCACertificateFile: {self.ca_file}
olcTLSCertificateFile: {self.servercert}
olcTLSCertificateKeyFile: {self.serverkey}
olcTLSVerifyClient: never

dn: cn=module,cn=config
objectClass: olcModuleList
cn: module
olcModulePath: {TOOLS / "usr/lib/ldap"}
olcModuleLoad: back_mdb

dn: olcDatabase=frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: frontend

dn: olcDatabase=mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: mdb
olcSuffix: {self.suffix}
olcRootDN: {rootdn}
olcRootPW: {self.root_pw}
olcDbDirectory: {self._db_directory}
olcDbMaxSize: 1073741824
olcDbNoSync: TRUE
olcDbIndex: objectClass eq
olcAccess: {{0}}to attrs=userPassword by anonymous auth by * none
olcAccess: {{1}}to * by * read
olcSizeLimit: size.soft={SIZE_LIMIT} size.hard={SIZE_LIMIT} size.prtotal=unlimited
"""

    def _write_config(self) -> None:
        super()._write_config()
        # These name configurationNamingContext: slapd accepts them once the schema is there.
        # Only bound users see it, so that an anonymous client sees a directory that
        # is not Active Directory.
        change = f"""\
dn: cn=config
changetype: modify
add: olcRootDSE
olcRootDSE: {self._rootdse}

dn: olcDatabase={{-1}}frontend,cn=config
changetype: modify
add: olcAccess
olcAccess: {{0}}to dn.base="" attrs=configurationNamingContext by users read by * none
olcAccess: {{1}}to * by * read
"""
        self._cli_popen(
            str(TOOLS / "usr/sbin/slapmodify"), ["-n0"], stdin_data=change.encode("utf-8")
        )

    def add_accepted_domains(
        self, names: Sequence[str], parent: str = ACCEPTED_DOMAINS_DN
    ) -> List[str]:
        return add_accepted_domains(self, names, parent)

    def source_yaml(self, name: str, organization: str) -> str:
        """An ldap source for this server, as a config's ``sources:`` section lists it.

        The active-directory preset over LDAPS, bound as the read-only account.
        """
        password = Path(self.testrundir) / "reader.password"
        password.write_text(READER_PASSWORD + "\n", encoding="utf-8")
        source = {
            "name": name,
            "preset": "active-directory",
            "organization": organization,
            "uris": [self.ldaps_uri],
            "bind_dn": READER_DN,
            "password_file": str(password),
            "ca_file": self.ca_file,
        }
        return f"  ldap: [{json.dumps(source)}]\n"

    def start(self) -> None:
        if self._proc is None:
            super().start()
            add_entries(self, _base_entries())

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            shutil.rmtree(self._root, ignore_errors=True)

    def _cli_popen(
        self,
        ldapcommand: str,
        extra_args: Optional[List[str]] = None,
        ldap_uri: Optional[str] = None,
        stdin_data: Optional[bytes] = None,
    ) -> Tuple[bytes, bytes]:
        if ldapcommand.split("/")[-1].startswith("ldap"):
            args = [ldapcommand, "-H", ldap_uri or self.default_ldap_uri, *self._cli_auth_args()]
        else:
            args = [ldapcommand, "-F", self._slapd_conf]
        args += extra_args or []
        done = subprocess.run(args, input=stdin_data, capture_output=True, env=self._env())
        if done.returncode != 0:
            raise RuntimeError(f"{args!r} failed:\n{done.stdout!r}\n{done.stderr!r}")
        return done.stdout, done.stderr

    def _test_config(self) -> None:
        command = [self.PATH_SLAPD, "-Ttest", "-F", self._slapd_conf, "-u"]
        done = subprocess.run(command, capture_output=True, text=True, env=self._env())
        if done.returncode != 0:
            raise RuntimeError(f"slapd's configuration test failed:\n{done.stdout}{done.stderr}")

    def _start_slapd(self) -> None:
        urls = [self.ldap_uri, self.ldaps_uri, self.ldapi_uri]
        command = [self.PATH_SLAPD, "-F", self._slapd_conf, "-h", " ".join(urls), "-d", "0"]
        self._proc = subprocess.Popen(command, env=self._env())
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until ldapwhoami answers (slapdtest's own readiness check) or slapd has exited."""
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                self._stopped()
                raise RuntimeError("slapd exited before opening its ports")
            try:
                self.ldapwhoami()
                return
            except RuntimeError:
                if time.monotonic() >= deadline:
                    raise
                # Polling interval; readiness is what ends the wait.
                time.sleep(0.05)


#: The name the sync benchmark (benchmarks/sync_scale.py) uses.
ActiveDirectoryLikeServer = Slapd
