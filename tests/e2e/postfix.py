"""A private, throwaway Postfix instance (Debian's installed binaries).

``postfix -c DIR start`` with its own main.cf/master.cf, queue and data
directories, loopback listeners on free ports and ``maillog_file`` for the
log. The host's /etc/postfix, /var/spool/postfix and any running MTA are
never touched.

Two smtpd listeners share the instance, one per milter socket kind:

* ``inet``: smtpd is not chrooted and uses the snippet's active
  ``smtpd_milters = inet:127.0.0.1:8894`` line, with the port filled in;
* ``unix``: smtpd runs chrooted in the private queue directory (as Debian's
  master.cf does) and takes the snippet's commented alternative
  ``smtpd_milters = unix:/relaymilter/relaymilter.sock``, which Postfix
  resolves inside the chroot, i.e. ``QUEUE/relaymilter/relaymilter.sock``.

The shipped snippet etc/postfix/main.cf.relaymilter is appended to main.cf
with only its host-specific values (CA file, port) substituted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .pki import Pki
from .util import (
    HarnessError,
    alive,
    can_connect_tcp,
    descendants,
    free_ports,
    kill_leftovers,
    read_from,
    size,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "etc" / "postfix" / "main.cf.relaymilter"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_DAEMONS = "/usr/lib/postfix/sbin/"

# Values in the snippet that only make sense on a real host; the harness
# swaps them for the private instance's and checks that each one is there.
SNIPPET_CA_FILE = "/etc/postfix/relaymilter-client-ca.pem"
SNIPPET_UNIX_MILTER = "unix:/relaymilter/relaymilter.sock"
SNIPPET_INET_MILTER = "inet:127.0.0.1:8894"
UNIX_SOCKET_IN_CHROOT = "relaymilter/relaymilter.sock"
#: One of Postfix's own domains (myhostname, in mydestination), under contoso.com.
LOCAL_NAME = "relay.contoso.com"

MAIN_CF = """\
# Private instance for relaymilter's end-to-end tests (generated).
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
# A host name under the accepted domain contoso.com, and local as in Debian's
# default mydestination: Postfix's defaults allow_percent_hack, swap_bangpath
# and resolve_dequoted_address then route kate%tailspintoys.com@$myhostname
# and the like elsewhere (tests/e2e/test_routing.py).
myhostname = {local_name}
mydomain = e2e.test
myorigin = $myhostname
mydestination = $myhostname, localhost
local_recipient_maps =
alias_maps =
alias_database =
# Every recipient, local or not, is relayed to the sink.
local_transport = smtp:[127.0.0.1]:{sink_port}
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
# The MTA's own relay rule: the whole loopback net may relay, so relaymilter's
# decision is the only thing between a client and the sink.
mynetworks = 127.0.0.0/8
{relay_restrictions}# No DNS: the chrooted smtpd has no resolver files, and tests must not wait on DNS.
smtpd_peername_lookup = no
maillog_file = {log}
maillog_file_prefixes = {base}
in_flow_delay = 0
biff = no
smtputf8_enable = no
smtpd_tls_cert_file = {server_cert}
smtpd_tls_key_file = {server_key}
smtpd_tls_loglevel = 1

# ---- etc/postfix/{snippet_name}, as shipped (host values substituted) ----
{snippet}
"""

MILTER_RELAY_RESTRICTIONS = (
    "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n"
)

# The services of a private instance (Debian's master.cf, nothing chrooted);
# the benchmarks use them too.
MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MASTER_CF = """\
# Private instance for relaymilter's end-to-end tests (generated).
127.0.0.1:{unix_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-unix
  -o smtpd_milters={unix_milter}
127.0.0.1:{inet_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtpd-inet
# Only for showing why the snippet sets tempfail: a milter that is never up,
# with milter_default_action = accept.
127.0.0.1:{fail_open_port} inet n - n - - smtpd
  -o syslog_name=postfix/smtpd-fail-open
  -o smtpd_milters=inet:127.0.0.1:{dead_milter_port}
  -o milter_default_action=accept
"""


def snippet_lines(text: str) -> list[str]:
    """The active (non-comment, non-blank) lines of a config snippet."""
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def render_snippet(ca_file: Path, milter_port: int) -> str:
    """The shipped snippet with the private PKI's CA file and the milter's port."""
    text = SNIPPET.read_text()
    for needed in (
        SNIPPET_CA_FILE,
        f"smtpd_milters = {SNIPPET_INET_MILTER}\n",
        f"# smtpd_milters = {SNIPPET_UNIX_MILTER}\n",
    ):
        if needed not in text:
            raise HarnessError(f"{SNIPPET} no longer contains {needed!r}; update the harness")
    text = text.replace(SNIPPET_CA_FILE, str(ca_file))
    active = f"smtpd_milters = {SNIPPET_INET_MILTER}\n"
    return text.replace(active, active.replace("8894", str(milter_port)))


@dataclass
class PostfixPorts:
    unix: int  # smtpd chrooted, milter on the unix socket
    inet: int  # smtpd not chrooted, milter on an inet socket
    milter_inet: int
    fail_open: int  # smtpd with milter_default_action = accept ...
    dead_milter: int  # ... and a milter port nobody listens on

    @classmethod
    def pick(cls) -> PostfixPorts:
        return cls(*free_ports(5))


class PostfixInstance:
    def __init__(self, base: Path, pki: Pki, sink_port: int) -> None:
        self.base = base
        self.pki = pki
        self.sink_port = sink_port
        self.config_dir = base / "etc"
        self.queue_dir = base / "queue"
        self.data_dir = base / "data"
        self.log = base / "maillog"
        self.ports = PostfixPorts(0, 0, 0, 0, 0)

    @property
    def unix_milter_socket(self) -> Path:
        """Where the chrooted smtpd finds the snippet's unix socket, seen from the host."""
        return self.queue_dir / UNIX_SOCKET_IN_CHROOT

    @property
    def inet_milter_spec(self) -> str:
        """The libmilter spelling of the inet listener's milter socket."""
        return f"inet:{self.ports.milter_inet}@127.0.0.1"

    def _main_cf(self, relay_restrictions: str, snippet_name: str, snippet: str) -> str:
        return MAIN_CF.format(
            base=self.base,
            local_name=LOCAL_NAME,
            queue=self.queue_dir,
            data=self.data_dir,
            sink_port=self.sink_port,
            log=self.log,
            server_cert=self.pki.server.cert,
            server_key=self.pki.server.key,
            relay_restrictions=relay_restrictions,
            snippet_name=snippet_name,
            snippet=snippet,
        )

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        main = self._main_cf(
            MILTER_RELAY_RESTRICTIONS,
            SNIPPET.name,
            render_snippet(self.pki.ca_bundle, self.ports.milter_inet),
        )
        (self.config_dir / "main.cf").write_text(main)
        master = MASTER_CF.format(
            unix_port=self.ports.unix,
            inet_port=self.ports.inet,
            unix_milter=SNIPPET_UNIX_MILTER,
            fail_open_port=self.ports.fail_open,
            dead_milter_port=self.ports.dead_milter,
        )
        (self.config_dir / "master.cf").write_text(master + MASTER_SERVICES)

    def _prepare_dirs(self) -> None:
        # Postfix daemons run as "postfix" and must traverse every parent
        # directory (the caller makes the ones above ``base`` traversable).
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        self._prepare_socket_dir()

    def _prepare_socket_dir(self) -> None:
        # The unix-socket milter lives inside the chroot. Like the Debian package's
        # /var/spool/postfix/relaymilter: group postfix and set-group-ID, so the
        # 0660 socket relaymilter creates there is in group postfix.
        socket_dir = self.unix_milter_socket.parent
        socket_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(socket_dir, "root", "postfix")
        os.chmod(socket_dir, 0o2750)

    def _pick_ports(self) -> None:
        self.ports = PostfixPorts.pick()

    def _listeners(self) -> tuple[int, ...]:
        """The smtpd ports that must accept connections once started."""
        return (self.ports.unix, self.ports.inet, self.ports.fail_open)

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )

    def start(self) -> None:
        """Start on fresh free ports; retry if another process grabs one first."""
        self._prepare_dirs()
        for _attempt in range(3):
            self._pick_ports()
            self._write_config()
            offset = size(self.log)
            result = self._postfix("start", check=False)
            if result.returncode == 0 and self._wait_listening(offset):
                return
            self.stop()
            if "Address already in use" not in read_from(self.log, offset) + result.stderr:
                raise HarnessError(
                    f"postfix start failed:\n{result.stderr}\n{self.log_since(offset)}"
                )
        raise HarnessError("postfix: no free ports after 3 attempts")

    def _wait_listening(self, log_offset: int) -> bool:
        def ready() -> bool:
            log = read_from(self.log, log_offset)
            if "Address already in use" in log:
                raise _PortTaken
            if "duplicate master.cf entry" in log:
                raise HarnessError(f"two listeners on one port:\n{log}")
            return all(can_connect_tcp("127.0.0.1", port) for port in self._listeners())

        try:
            wait_for(ready, 30, "the private postfix listeners")
        except _PortTaken:
            return False
        return True

    def master_pid(self) -> int:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def stop(self) -> None:
        """``postfix stop``, then make sure master and every child are gone."""
        pid = self.master_pid()
        if not pid or not alive(pid):
            return
        processes = [pid, *descendants(pid)]
        self._postfix("stop", check=False)
        with contextlib.suppress(HarnessError):
            wait_for(lambda: not any(alive(p) for p in processes), 10, "postfix to exit")
        kill_leftovers(processes, POSTFIX_DAEMONS)

    def log_since(self, offset: int) -> str:
        return read_from(self.log, offset)


class _PortTaken(Exception):
    pass


# ---- Postfix with relaymilter as its policy service ---------------------------

POLICY_SNIPPET = REPO / "etc" / "postfix" / "main.cf.relaymilter-policy"
#: The snippet's service: relative to the queue directory, so a chrooted smtpd reaches it.
SNIPPET_POLICY_SERVICE = "unix:private/relaymilter-policy"
POLICY_SOCKET_IN_QUEUE = "private/relaymilter-policy"
#: Where the harness's capturing policy server listens (``policycapture``).
CAPTURE_SOCKET_IN_QUEUE = "private/policy-capture"
#: A policy service nobody serves, for the fail-open listener.
DEAD_POLICY_SOCKET_IN_QUEUE = "private/relaymilter-policy-dead"

POLICY_MASTER_CF = """\
# Private instance for relaymilter's end-to-end tests: relaymilter as a policy
# service (generated). Every smtpd runs chrooted in the queue directory, as in
# Debian's master.cf, and main.cf's smtpd_relay_restrictions (the snippet's)
# call the service at unix:private/relaymilter-policy.
127.0.0.1:{policy_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-policy
# The same, with the digest of a main.cf below compatibility level 3.6.
127.0.0.1:{md5_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-policy-md5
  -o smtpd_tls_fingerprint_digest=md5
# Clients outside mynetworks: only Postfix's own rules can let them relay.
127.0.0.1:{outsider_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-outsider
  -o mynetworks=
# The snippet's restrictions with a service that records what Postfix sends.
127.0.0.1:{capture_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-capture
  -o {{ smtpd_relay_restrictions = {capture_restrictions} }}
127.0.0.1:{capture_md5_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-capture-md5
  -o {{ smtpd_relay_restrictions = {capture_restrictions} }}
  -o smtpd_tls_fingerprint_digest=md5
# Only for showing why the default action must not be DUNNO: a service that
# is never up, and DUNNO when it cannot be reached.
127.0.0.1:{fail_open_port} inet n - y - - smtpd
  -o syslog_name=postfix/smtpd-policy-fail-open
  -o {{ smtpd_relay_restrictions = {dead_restrictions} }}
  -o smtpd_policy_service_default_action=DUNNO
"""


def render_policy_snippet(ca_file: Path) -> str:
    """The shipped policy snippet with the private PKI's CA file."""
    text = POLICY_SNIPPET.read_text()
    for needed in (SNIPPET_CA_FILE, f"check_policy_service {SNIPPET_POLICY_SERVICE},\n"):
        if needed not in text:
            raise HarnessError(
                f"{POLICY_SNIPPET} no longer contains {needed!r}; update the harness"
            )
    return text.replace(SNIPPET_CA_FILE, str(ca_file))


def snippet_setting(text: str, name: str) -> str:
    """A setting of a main.cf snippet, its continuation lines joined (as Postfix reads it)."""
    value: Optional[list[str]] = None
    for line in text.splitlines():
        if value is not None:
            if line[:1] in (" ", "\t") and line.strip() and not line.lstrip().startswith("#"):
                value.append(line.strip())
                continue
            break
        key, equals, rest = line.partition("=")
        if equals and key.strip() == name and not line.startswith("#"):
            value = [rest.strip()] if rest.strip() else []
    if value is None:
        raise HarnessError(f"no {name} in the snippet")
    return " ".join(value)


@dataclass
class PolicyPorts:
    policy: int  # the snippet as shipped
    md5: int  # ... with smtpd_tls_fingerprint_digest = md5
    outsider: int  # ... with an empty mynetworks
    capture: int  # ... with the capturing service instead of relaymilter
    capture_md5: int  # ... and md5
    fail_open: int  # a dead service and smtpd_policy_service_default_action = DUNNO

    @classmethod
    def pick(cls) -> PolicyPorts:
        return cls(*free_ports(6))


class PolicyPostfixInstance(PostfixInstance):
    """A private Postfix with relaymilter as its policy service (and no milter).

    main.cf is the milter instance's, with the shipped
    etc/postfix/main.cf.relaymilter-policy in place of the milter snippet (only
    the CA file substituted) and without the harness's own
    smtpd_relay_restrictions: the snippet's are in force.
    """

    def __init__(self, base: Path, pki: Pki, sink_port: int) -> None:
        super().__init__(base, pki, sink_port)
        self.policy_ports = PolicyPorts(0, 0, 0, 0, 0, 0)

    @property
    def policy_socket(self) -> Path:
        """The snippet's unix:private/relaymilter-policy, seen from the host."""
        return self.queue_dir / POLICY_SOCKET_IN_QUEUE

    @property
    def capture_socket(self) -> Path:
        return self.queue_dir / CAPTURE_SOCKET_IN_QUEUE

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        snippet = render_policy_snippet(self.pki.ca_bundle)
        main = self._main_cf("", POLICY_SNIPPET.name, snippet)
        (self.config_dir / "main.cf").write_text(main)
        restrictions = snippet_setting(snippet, "smtpd_relay_restrictions")
        ports = self.policy_ports
        master = POLICY_MASTER_CF.format(
            policy_port=ports.policy,
            md5_port=ports.md5,
            outsider_port=ports.outsider,
            capture_port=ports.capture,
            capture_md5_port=ports.capture_md5,
            capture_restrictions=restrictions.replace(
                SNIPPET_POLICY_SERVICE, f"unix:{CAPTURE_SOCKET_IN_QUEUE}"
            ),
            fail_open_port=ports.fail_open,
            dead_restrictions=restrictions.replace(
                SNIPPET_POLICY_SERVICE, f"unix:{DEAD_POLICY_SOCKET_IN_QUEUE}"
            ),
        )
        (self.config_dir / "master.cf").write_text(master + MASTER_SERVICES)

    def _prepare_socket_dir(self) -> None:
        pass  # private/ is Postfix's own: postfix start makes it

    def _pick_ports(self) -> None:
        self.policy_ports = PolicyPorts.pick()

    def _listeners(self) -> tuple[int, ...]:
        ports = self.policy_ports
        return (
            ports.policy,
            ports.md5,
            ports.outsider,
            ports.capture,
            ports.capture_md5,
            ports.fail_open,
        )
