"""A private Sendmail 8.17 from Debian's packages, beside the installed Postfix.

sendmail-bin conflicts with postfix as a package, so its .debs are fetched
with ``apt-get download`` (cached in ~/.cache/relaymilter-e2e/) and unpacked
with ``dpkg -x``; nothing is installed and nothing under /etc, /var or /dev is
written. What it takes, each learnt the hard way (see
/work/shared/reference/sendmail-e2e.md):

* libwrap.so.0 is unpacked privately and found through LD_LIBRARY_PATH, which
  the loader ignores for a setgid binary: the private copy gets ``chmod g-s``;
* sendmail sleeps 60 s at start on a hostname without a dot, and resolves it
  before reading the .cf: it runs in ``unshare --uts --mount`` with an FQDN
  hostname and private /etc/hosts and /etc/nsswitch.conf bind-mounted;
* everything lives under /tmp (mode 1777), which sendmail distrusts for the
  TLS files unless ``DontBlameSendmail=TrustStickyBit`` (STARTTLS silently
  disappears otherwise); key files must be 0600;
* sendmail only logs to syslog: the namespace gets a private /dev whose
  /dev/log is a datagram socket this module reads into a log file.

STARTTLS starts from Debian's stock setup, as docs/sendmail.md describes it:
the .mc includes the starttls.m4 that Debian's ``update_tlsm4`` generates (its
``confTLS_SRV_OPTIONS`` ``V`` included), then the admin's edits after that
include (the test PKI's server certificate and CAs), then the shipped snippet
etc/sendmail/relaymilter.mc, unchanged but for the milter's socket: its last
line is what makes Sendmail ask clients for a certificate again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .pki import Pki
from .util import (
    HarnessError,
    alive,
    can_connect_tcp,
    cmdline,
    descendants,
    free_ports,
    read_from,
    size,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "etc" / "sendmail" / "relaymilter.mc"
SNIPPET_SOCKET = "S=local:/run/relaymilter/relaymilter.sock"
PACKAGES = ("sendmail-bin", "sendmail-base", "sendmail-cf", "libwrap0", "m4")
HOSTNAME = "sendmail.e2e.test"
#: One of Sendmail's local names ($=w), under contoso.com.
LOCAL_NAME = "relay.contoso.com"
LIBDIR = "usr/lib/x86_64-linux-gnu"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "relaymilter-e2e"


def _download(debs: Path) -> None:
    cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *PACKAGES]
    if subprocess.run(cmd, cwd=debs, capture_output=True).returncode == 0:
        return
    # A fresh machine may have no package lists yet.
    subprocess.run(["apt-get", "-q", "update"], capture_output=True, check=True)
    result = subprocess.run(cmd, cwd=debs, capture_output=True, text=True)
    if result.returncode != 0:
        raise HarnessError(f"apt-get download {' '.join(PACKAGES)} failed:\n{result.stderr}")


def unpacked_root() -> Path:
    """Download (once) and unpack (once) the Sendmail packages; return the root."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    # Concurrent test runs share the cache: one downloads and unpacks at a time.
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _unpack(cache)


def _unpack(cache: Path) -> Path:
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    if not all(list(debs.glob(f"{p}_*.deb")) for p in PACKAGES):
        _download(debs)
    files = sorted(str(max(debs.glob(f"{p}_*.deb"))) for p in PACKAGES)
    # One unpacked tree per set of .debs: a newer download gets a fresh tree.
    stamp = "\n".join(files)
    root = cache / "root"
    marker = root / ".unpacked-from"
    if marker.exists() and marker.read_text() == stamp:
        return root
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    for deb in files:
        subprocess.run(["dpkg", "-x", deb, str(root)], check=True)
    # setgid makes the loader ignore LD_LIBRARY_PATH (needed for libwrap.so.0).
    os.chmod(root / "usr/libexec/sendmail/sendmail", 0o755)
    marker.write_text(stamp)
    return root


def render_snippet(socket_equate: str) -> str:
    """The shipped snippet with its socket replaced (``S=local:PATH`` or ``S=inet:PORT@HOST``)."""
    text = SNIPPET.read_text()
    if SNIPPET_SOCKET not in text:
        raise HarnessError(f"{SNIPPET} no longer contains {SNIPPET_SOCKET!r}; update the harness")
    return text.replace(SNIPPET_SOCKET, socket_equate)


#: What the generated starttls.m4 includes from Debian's /usr/share/sendmail/.
DEBIAN_INCLUDE = "include(`/usr/share/sendmail/"


def debian_starttls(root: Path, workdir: Path) -> Path:
    """Debian's stock starttls.m4, made in ``workdir``; the relocated one's path.

    ``update_tlsm4`` (run by ``sendmailconfig``) writes /etc/mail/tls/starttls.m4
    from /etc/mail/databases, which ``parse_mc`` makes from /etc/mail/sendmail.mc.
    Debian's stock sendmail.mc defines none of the TLS settings, so every value
    is update_tlsm4's default. Here it reads an empty database of our own (a
    missing one it would make from the host's /etc/mail/sendmail.mc, if any)
    and writes ``starttls.m4.generated``, never /etc/mail. ``starttls.m4`` is
    that file with one change: its include of Debian's autoconf.m4 points into
    the unpacked ``root``.
    """
    share = root / "usr/share/sendmail"
    workdir.mkdir(parents=True, exist_ok=True)
    database = workdir / "databases"
    database.write_text("")
    generated = workdir / "starttls.m4.generated"
    cmd = ["perl", f"-I{share}", str(share / "update_tlsm4"), "-o", str(generated)]
    result = subprocess.run(
        [*cmd, "-i", str(database)], cwd=workdir, capture_output=True, text=True
    )
    if result.returncode != 0 or result.stderr.strip() or not generated.exists():
        raise HarnessError(f"update_tlsm4 failed:\n{result.stdout}{result.stderr}")
    text = generated.read_text()
    if text.count(DEBIAN_INCLUDE) != 1:
        raise HarnessError(f"{generated}: not one {DEBIAN_INCLUDE!r}; update the harness")
    relocated = workdir / "starttls.m4"
    relocated.write_text(text.replace(DEBIAN_INCLUDE, f"include(`{share}/"))
    return relocated


def build_cf(root: Path, mc: Path) -> str:
    """sendmail.cf from the .mc file ``mc``, with the unpacked root's m4 and cf files."""
    cfdir = root / "usr/share/sendmail/cf"
    result = subprocess.run(
        [str(root / "usr/bin/m4"), f"-D_CF_DIR_={cfdir}/", f"{cfdir}/m4/cf.m4", mc.name],
        cwd=mc.parent,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or result.stderr.strip():
        raise HarnessError(f"m4 failed building sendmail.cf from {mc}:\n{result.stderr}")
    return result.stdout


MC = """\
divert(-1)dnl
Private Sendmail for relaymilter's end-to-end tests (generated).
divert(0)dnl
VERSIONID(`relaymilter e2e')dnl
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `{hostname}')dnl
define(`confEBINDIR', `{root}/usr/libexec/sendmail')dnl
define(`QUEUE_DIR', `{run}/mqueue')dnl
define(`STATUS_FILE', `{run}/sendmail.st')dnl
define(`HELP_FILE', `{root}/etc/mail/helpfile')dnl
define(`ALIAS_FILE', `{run}/aliases')dnl
define(`confPID_FILE', `{run}/sendmail.pid')dnl
define(`confDEAD_LETTER_DROP', `{run}/dead.letter')dnl
define(`confSERVICE_SWITCH_FILE', `{run}/service.switch')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
dnl Files below /tmp (mode 1777): without this STARTTLS is silently not offered.
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl
define(`confTO_IDENT', `0')dnl
define(`confLOG_LEVEL', `14')dnl
define(`confMILTER_LOG_LEVEL', `14')dnl
dnl A busy 2-core test machine must not make sendmail queue or refuse mail.
define(`confQUEUE_LA', `500')dnl
define(`confREFUSE_LA', `1000')dnl
define(`confDELAY_LA', `0')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`no_default_msa')dnl
dnl {local_name}, under the accepted domain contoso.com, is one of Sendmail's
dnl local names ($=w): kate%tailspintoys.com@{local_name} and the like then route
dnl elsewhere (tests/e2e/test_routing.py).
LOCAL_DOMAIN(`{local_name}')dnl
dnl Relay every message to the sink, local recipients' too.
define(`SMART_HOST', `esmtp:[127.0.0.1]')dnl
define(`MAIL_HUB', `esmtp:[127.0.0.1]')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {sink_port}')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {sink_port}')dnl
dnl Listen=: a queue of 256 connections (10 by default); more concurrent clients
dnl than that would wait a second each, a SYN retransmission (the benchmark's 20).
DAEMON_OPTIONS(`Port={port}, Addr=127.0.0.1, Family=inet, Name=MTA-e2e, Listen=256')dnl
dnl The MTA's own relay rule: all of 127/8 may relay (only 127.0.0.1 by default),
dnl so relaymilter's decision is the only thing between a client and the sink.
RELAY_DOMAIN(`127')dnl
dnl ---- STARTTLS: Debian's stock setup ----
dnl sm_version, sm_version_math, sm_enable_tls and the like, which starttls.m4
dnl tests: Debian's stock sendmail.mc gets them from cf/debian/autoconf.m4, through
dnl OSTYPE(`debian'). Without them starttls.m4's whole TLS block silently vanishes.
include(`{root}/usr/share/sendmail/cf/debian/autoconf.m4')dnl
dnl The starttls.m4 that Debian's update_tlsm4 generates (/etc/mail/tls/starttls.m4
dnl on Debian), its include of autoconf.m4 moved to the unpacked root.
include(`{starttls}')dnl
dnl ---- the admin's edits after that include (docs/sendmail.md) ----
dnl The test PKI's server certificate; both test CAs are trusted.
define(`confSERVER_CERT', `{server_cert}')dnl
define(`confSERVER_KEY', `{server_key}')dnl
define(`confCACERT', `{ca_bundle}')dnl
define(`confCACERT_PATH', `{cacerts}')dnl
dnl Left as generated, though absent here: the DH parameters (Sendmail logs "unsafe: No
dnl such file or directory" and uses its own) and the client certificate and key (used
dnl only for STARTTLS as a client, which the sink does not offer). confCRL is undefined.
dnl No confTLS_SRV_OPTIONS here: the snippet's line must undo starttls.m4's `V'.
dnl ---- etc/sendmail/relaymilter.mc, as shipped (milter socket substituted) ----
{snippet}
MAILER(`smtp')dnl
"""

NS_EXEC = """\
#!/bin/sh
# Runs "$@" in the private UTS+mount namespace made by unshare: FQDN hostname,
# private /etc/hosts and /etc/nsswitch.conf (no DNS), and a private /dev whose
# /dev/log is the harness's syslog socket.
set -e
R={run}
mount --bind $R/hosts /etc/hosts
mount --bind $R/nsswitch.conf /etc/nsswitch.conf
hostname {hostname}
mkdir -p $R/odev
mount --rbind /dev $R/odev
mount -t tmpfs -o mode=755 e2edev /dev
for f in $(ls -A $R/odev); do ln -s $R/odev/$f /dev/$f; done
ln -sf $R/syslog.sock /dev/log
exec "$@"
"""


class SyslogReceiver:
    """Receives sendmail's syslog datagrams and appends them to a file."""

    def __init__(self, sock_path: Path, log_path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(sock_path))
        os.chmod(sock_path, 0o666)
        self.log_path = log_path
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.log_path.open("a", buffering=1) as log:
            while True:
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    return
                if not data:  # shut down by close()
                    return
                text = data.decode("utf-8", "replace").rstrip("\n\x00")
                log.write(time.strftime("%H:%M:%S ") + text + "\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv()
        self.sock.close()


class SendmailInstance:
    def __init__(
        self,
        base: Path,
        pki: Pki,
        sink_port: int,
        edit_snippet: Callable[[str], str] = str,
        milter_socket: str = "unix",
    ) -> None:
        """``edit_snippet`` alters the shipped snippet (only to show what it prevents).

        ``milter_socket``: "unix", as the snippet ships, or "inet".
        """
        self.edit_snippet = edit_snippet
        self.milter_socket = milter_socket
        self.base = base
        self.run = base / "run"
        self.pki = pki
        self.sink_port = sink_port
        self.log = self.run / "sendmail.log"
        self.port = 0
        self.milter_port = 0
        self.root = Path()
        self.pid = 0
        self._syslog: Optional[SyslogReceiver] = None

    @property
    def milter_spec(self) -> str:
        """The socket relaymilter listens on for this Sendmail."""
        if self.milter_socket == "unix":
            return f"unix:{self.run / 'relaymilter.sock'}"
        return f"inet:{self.milter_port}@127.0.0.1"

    @property
    def socket_equate(self) -> str:
        """The snippet's S= for this Sendmail."""
        if self.milter_socket == "unix":
            return f"S=local:{self.run / 'relaymilter.sock'}"
        return f"S=inet:{self.milter_port}@127.0.0.1"

    def _prepare(self) -> None:
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "mqueue").mkdir(mode=0o700, exist_ok=True)
        (self.run / "aliases").write_text("postmaster: root\n")
        (self.run / "sendmail.st").write_text("")
        (self.run / "service.switch").write_text("hosts\tfiles\naliases\tfiles\npasswd\tfiles\n")
        short = HOSTNAME.split(".")[0]
        (self.run / "hosts").write_text(
            f"127.0.0.1\tlocalhost {HOSTNAME} {short}\n"
            "127.0.0.2\tclient2.e2e.test\n127.0.0.3\tclient3.e2e.test\n"
            f"::1\tlocalhost ip6-localhost {HOSTNAME}\n"
        )
        (self.run / "nsswitch.conf").write_text(
            "passwd: files\ngroup: files\nshadow: files\nhosts: files\n"
            "services: files\nprotocols: files\nnetworks: files\n"
        )
        ns_exec = self.run / "ns-exec.sh"
        ns_exec.write_text(NS_EXEC.format(run=self.run, hostname=HOSTNAME))
        ns_exec.chmod(0o755)
        self._hash_cas()

    def _hash_cas(self) -> None:
        """confCACERT_PATH: the test CAs under their OpenSSL hash names."""
        cacerts = self.run / "cacerts"
        cacerts.mkdir(exist_ok=True)
        for path in self.pki.ca_files.values():
            (cacerts / path.name).write_bytes(path.read_bytes())
        subprocess.run(["openssl", "rehash", str(cacerts)], check=True, capture_output=True)

    def _build_cf(self) -> None:
        starttls = debian_starttls(self.root, self.run / "tls")
        mc = MC.format(
            hostname=HOSTNAME,
            local_name=LOCAL_NAME,
            root=self.root,
            run=self.run,
            sink_port=self.sink_port,
            port=self.port,
            cacerts=self.run / "cacerts",
            ca_bundle=self.pki.ca_bundle,
            server_cert=self.pki.server.cert,
            server_key=self.pki.server.key,
            starttls=starttls,
            snippet=self.edit_snippet(render_snippet(self.socket_equate)),
        )
        (self.run / "e2e.mc").write_text(mc)
        (self.run / "sendmail.cf").write_text(build_cf(self.root, self.run / "e2e.mc"))

    def start(self) -> None:
        self.root = unpacked_root()
        self._prepare()
        self._syslog = SyslogReceiver(self.run / "syslog.sock", self.log)
        for _attempt in range(3):
            self.port, self.milter_port = free_ports(2)
            self._build_cf()
            offset = size(self.log)
            if self._launch(offset):
                return
            self.stop()
        raise HarnessError("sendmail: no free port after 3 attempts")

    def _launch(self, log_offset: int) -> bool:
        pid_file = self.run / "sendmail.pid"
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.root / LIBDIR)}
        sendmail = self.root / "usr/libexec/sendmail/sendmail"
        cmd = ["unshare", "--uts", "--mount", "--propagation", "private"]
        cmd += [str(self.run / "ns-exec.sh"), str(sendmail), "-bd", "-C", "sendmail.cf"]
        # -bd forks the daemon, which detaches (setsid) and writes its pid file.
        result = subprocess.run(cmd, cwd=self.run, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise HarnessError(f"sendmail -bd failed:\n{result.stderr}")

        def ready() -> bool:
            if "Address already in use" in read_from(self.log, log_offset):
                raise _PortTaken
            return pid_file.exists() and can_connect_tcp("127.0.0.1", self.port)

        try:
            wait_for(ready, 30, "the private sendmail to listen")
        except _PortTaken:
            self._read_pid(pid_file)  # a daemon that failed to bind may still run
            return False
        except HarnessError as err:
            self._read_pid(pid_file)
            self.stop()
            raise HarnessError(f"{err}\n{read_from(self.log, log_offset)}") from None
        self._read_pid(pid_file)
        return True

    def _read_pid(self, pid_file: Path) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.pid = int(pid_file.read_text().split()[0])

    def stop(self) -> None:
        pid = self.pid
        self.pid = 0
        if pid and alive(pid) and "sendmail" in cmdline(pid):
            processes = [pid, *descendants(pid)]
            # The daemon leads its own process group; session children share it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            with contextlib.suppress(HarnessError):
                wait_for(lambda: not any(alive(p) for p in processes), 10, "sendmail to exit")
            for p in processes:
                if alive(p):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        if self._syslog is not None:
            self._syslog.close()

    def log_since(self, offset: int) -> str:
        return read_from(self.log, offset)


class _PortTaken(Exception):
    pass
