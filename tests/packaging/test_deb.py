"""The .deb: built lintian-clean, installed on this machine, run as its user, upgraded, purged.

Installing touches the real system (that is the point), so the package is
installed once for the module and purged at the end; the last test upgrades
over an edited configuration and purges, checking that nothing is left but
the system user. While the package is installed, its copy of relaymilter in
/usr/lib/python3/dist-packages is importable by every Python on the machine:
keep the window short.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set

import pytest

from ..support import REPO, MilterSession
from .conftest import SYSTEM_PATH, Build, require_root, require_tools, run

pytestmark = pytest.mark.packaging

CONF = Path("/etc/relaymilter/relaymilter.yml")
UNIT = Path("/lib/systemd/system/relaymilter.service")
CHROOT_DIR = Path("/var/spool/postfix/relaymilter")
APT = [
    "apt-get",
    "install",
    "-y",
    "-q",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
]
# Every file the package installs, and where; checked again after purge.
INSTALLED_PATHS = [
    "/usr/bin/relaymilter",
    str(CONF),
    str(UNIT),
    "/usr/lib/sysusers.d/relaymilter.conf",
    "/usr/lib/python3/dist-packages/relaymilter/__init__.py",
    "/usr/share/man/man8/relaymilter.8.gz",
    "/usr/share/man/man5/relaymilter.yml.5.gz",
    "/usr/share/doc/relaymilter/copyright",
]
EXAMPLES = {
    "etc/postfix/main.cf.relaymilter": "/usr/share/doc/relaymilter/examples/main.cf.relaymilter",
    "etc/sendmail/relaymilter.mc": "/usr/share/doc/relaymilter/examples/relaymilter.mc",
}


def dpkg_status() -> Optional[str]:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status} ${Version}", "relaymilter"],
        capture_output=True,
        text=True,
    )
    return result.stdout if result.returncode == 0 else None


def purge() -> None:
    if dpkg_status() is not None:
        run(["apt-get", "purge", "-y", "-q", "relaymilter"])


@pytest.fixture(scope="module")
def installer(deb: Build) -> Iterator[Build]:
    require_root("installs the .deb on this machine")
    require_tools("apt-get", "dpkg", "systemd-analyze", "runuser", "setpriv")
    purge()  # a leftover from an interrupted run
    yield deb
    purge()


@pytest.fixture
def installed(installer: Build) -> Build:
    """The package, installed (again, if an earlier test purged it)."""
    if not (dpkg_status() or "").startswith("install ok installed"):
        run([*APT, str(installer.package)])
    return installer


# -- the package file ------------------------------------------------------------


def test_build_is_lintian_clean(deb: Build) -> None:
    assert "build-deb: lintian clean" in deb.output
    tags = [line for line in deb.output.splitlines() if re.match(r"[EW]: relaymilter", line)]
    assert tags == []


def test_package_metadata_and_contents(deb: Build) -> None:
    depends = run(["dpkg-deb", "-f", str(deb.package), "Depends"])
    for dependency in (
        "python3-milter",
        "python3-yaml",
        "python3-cryptography",
        "python3-sdnotify",
        "python3-idna",
    ):
        assert dependency in depends
    assert run(["dpkg-deb", "-I", str(deb.package), "conffiles"]).split() == [str(CONF)]
    listing = run(["dpkg-deb", "-c", str(deb.package)])
    modes = {line.split()[-1].lstrip("."): line.split()[0] for line in listing.splitlines()}
    for path in INSTALLED_PATHS:
        assert path in modes, path
    assert modes[str(CONF)] == "-rw-r-----"
    assert modes["/usr/bin/relaymilter"] == "-rwxr-xr-x"
    for guide in ("README.md", "install.md", "postfix.md", "sendmail.md"):
        path = f"/usr/share/doc/relaymilter/{guide}"
        assert path in modes or f"{path}.gz" in modes, guide  # dh_compress: if > 4 kB
    for source, installed_path in EXAMPLES.items():
        if (REPO / source).exists():
            assert installed_path in modes, f"{source} is not shipped"


# -- installed on this machine ----------------------------------------------------


def test_installs_user_config_unit_and_socket_directory(installed: Build) -> None:
    user = pwd.getpwnam("relaymilter")
    group = grp.getgrnam("relaymilter")
    assert user.pw_gid == group.gr_gid
    assert user.pw_shell.endswith("nologin")
    assert user.pw_uid < 1000, "not a system user"
    for path in INSTALLED_PATHS:
        assert Path(path).exists(), path
    info = CONF.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == (0, group.gr_gid)
    assert f"Conffiles:\n {CONF} " in run(["dpkg", "-s", "relaymilter"])
    assert run(["systemctl", "is-enabled", "relaymilter.service"]).strip() == "enabled"
    # The socket directory in Postfix's chroot exists iff Postfix was there.
    try:
        postfix = grp.getgrnam("postfix")
    except KeyError:
        assert not CHROOT_DIR.exists()
    else:
        info = CHROOT_DIR.stat()
        assert (info.st_uid, info.st_gid) == (user.pw_uid, postfix.gr_gid)
        assert stat.S_IMODE(info.st_mode) == 0o2750


def test_unit_passes_systemd_analyze(installed: Build) -> None:
    output = run(["systemd-analyze", "verify", str(UNIT)])
    assert "relaymilter" not in output, output
    security = run(["systemd-analyze", "security", "--offline=yes", str(UNIT)])
    match = re.search(r"Overall exposure level for relaymilter.service: ([0-9.]+)", security)
    assert match, security
    # 1.4 ("OK") when written; what is left is justified in the unit's comments.
    assert float(match.group(1)) <= 2.0, security


def test_check_config_as_the_service_user(installed: Build, tmp_path: Path) -> None:
    output = run(["runuser", "-u", "relaymilter", "--", "/usr/bin/relaymilter", "check-config"])
    assert f"{CONF}: OK" in output
    # What ExecReload's first line does with a broken file: fail, and say why.
    broken = Path(tempfile.mkdtemp(prefix="relaymilter-deb-")) / "broken.yml"
    try:
        broken.write_text("organizations: [{name: x}]\n")
        os.chmod(broken.parent, 0o755)
        os.chmod(broken, 0o644)
        result = subprocess.run(
            ["runuser", "-u", "relaymilter", "--", "/usr/bin/relaymilter", "check-config"],
            capture_output=True,
            text=True,
            env={"PATH": SYSTEM_PATH, "RELAYMILTER_CONFIG": str(broken)},
            timeout=60,
        )
        assert result.returncode == 1
        assert "accepted_domains" in result.stderr + result.stdout
    finally:
        broken.unlink()
        broken.parent.rmdir()


class NotifySocket:
    """A fake NOTIFY_SOCKET the service user may write to."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)

    def receive_until(self, key: str, timeout: float = 10) -> Dict[str, str]:
        self.sock.settimeout(timeout)
        while True:
            data = self.sock.recv(65536).decode()
            message = dict(line.split("=", 1) for line in data.splitlines())
            if key in message:
                return message


@contextlib.contextmanager
def service_process(
    socket_spec: str,
    notify: NotifySocket,
    prefix: Sequence[str] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """/usr/bin/relaymilter run as systemd would start it: the service user, umask 0007, notify.

    setpriv switches user and then execs (one PID, so signals reach the daemon);
    runuser would stay in between as the parent. ``prefix`` goes first (strace).
    """
    command = [
        *prefix,
        "setpriv",
        "--reuid=relaymilter",
        "--regid=relaymilter",
        "--init-groups",
        *daemon_command(socket_spec),
    ]
    env = {
        "PATH": SYSTEM_PATH,
        "NOTIFY_SOCKET": notify.path,
        # WatchdogSec=10: a check (immediately, then every 5 s) may take 2.5 s.
        "WATCHDOG_USEC": "10000000",
        "LANG": "C.UTF-8",
    }
    process = subprocess.Popen(
        command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, umask=0o007
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stderr is not None
        process.stderr.close()


def daemon_command(socket_spec: str) -> List[str]:
    return ["/usr/bin/relaymilter", "run", "-c", str(CONF), "--socket", socket_spec]


def socket_spec_for_test() -> str:
    if CHROOT_DIR.is_dir():
        return f"unix:{CHROOT_DIR}/relaymilter.sock"
    return "inet:18894@127.0.0.1"


@contextlib.contextmanager
def notify_socket() -> Iterator[NotifySocket]:
    # Not in pytest's tmp_path: its 0700 parents keep the service user out.
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-deb-"))
    os.chmod(directory, 0o755)
    notify = NotifySocket(directory)
    try:
        yield notify
    finally:
        notify.sock.close()
        os.unlink(notify.path)
        directory.rmdir()


def daemon_pid(process: subprocess.Popen[bytes], traced: bool) -> int:
    """The daemon's PID: the process itself, or strace's child."""
    if not traced:
        return process.pid
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def exercise(
    process: subprocess.Popen[bytes], notify: NotifySocket, spec: str, traced: bool = False
) -> str:
    """Readiness, a milter conversation, a watchdog ping, a reload and a stop; the log."""
    ready = notify.receive_until("READY")
    assert "1 organization" in ready["STATUS"]
    pid = daemon_pid(process, traced)
    if spec.startswith("unix:"):  # it exists: READY=1 comes once the socket listens
        info = os.stat(spec[5:])
        assert pwd.getpwuid(info.st_uid).pw_name == "relaymilter"
        # Set-group-ID directory: the socket is in Postfix's group.
        assert grp.getgrgid(info.st_gid).gr_name == "postfix"
        assert stat.S_IMODE(info.st_mode) == 0o660
    session = MilterSession(spec)
    session.negotiate()
    session.connect("192.0.2.10")
    session.mail("<app@example.net>", {"i": "4DebTest1"})
    assert session.rcpt("<someone@example.org>").startswith("550 5.7.64 ")
    assert session.rcpt("<user@contoso.com>") == "continue"
    session.close()
    assert notify.receive_until("WATCHDOG", timeout=10)["WATCHDOG"] == "1"
    os.kill(pid, signal.SIGUSR1)
    assert notify.receive_until("RELOADING")["RELOADING"] == "1"
    assert notify.receive_until("READY")["READY"] == "1"
    os.kill(pid, signal.SIGTERM)
    assert notify.receive_until("STOPPING")["STOPPING"] == "1"
    assert process.wait(30) == 0
    assert process.stderr is not None
    log = process.stderr.read().decode()
    assert "action=reject" in log and "reload: loaded" in log, log
    assert "Traceback" not in log and "ERROR" not in log, log
    return log


def test_installed_daemon_serves_as_the_service_user(installed: Build) -> None:
    spec = socket_spec_for_test()
    with notify_socket() as notify, service_process(spec, notify) as process:
        exercise(process, notify, spec)


# Refuses memory that is writable and executable, like the unit's
# MemoryDenyWriteExecute=yes (systemd does it with seccomp; the kernel's
# PR_SET_MDWE, Linux 6.3+, is close enough to catch a W+X mapping).
_MDWE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_SET_MDWE: ' + os.strerror(ctypes.get_errno()))\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def test_installed_daemon_runs_without_writable_executable_memory(installed: Build) -> None:
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", _MDWE, "/bin/true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"the kernel cannot refuse W+X memory: {probe.stderr.strip()}")
    spec = socket_spec_for_test()
    prefix = ["/usr/bin/python3", "-c", _MDWE]
    with notify_socket() as notify, service_process(spec, notify, prefix) as process:
        exercise(process, notify, spec)


def _filter_members(name: str) -> Set[str]:
    """The system calls in a systemd syscall group, nested groups expanded."""
    output = run(["systemd-analyze", "syscall-filter", name])
    calls: Set[str] = set()
    for line in output.splitlines()[1:]:
        item = line.strip()
        if item.startswith("@"):
            calls |= _filter_members(item)
        elif re.fullmatch(r"[a-z0-9_]+", item):
            calls.add(item)
    return calls


def test_installed_daemon_needs_no_system_call_the_unit_forbids(
    installed: Build, tmp_path: Path
) -> None:
    require_tools("strace", optional=True)
    # SystemCallFilter=@system-service, then ~@privileged @resources.
    allowed = _filter_members("@system-service") - _filter_members("@privileged")
    allowed -= _filter_members("@resources")
    trace = tmp_path / "strace.log"
    spec = socket_spec_for_test()
    prefix = ["strace", "-f", "-qq", "-o", str(trace)]
    with notify_socket() as notify, service_process(spec, notify, prefix) as process:
        exercise(process, notify, spec, traced=True)
    lines = trace.read_text().splitlines()
    # Only what runs after the exec of the daemon: systemd switches the user
    # (setpriv here) before it applies the filter.
    start = next(i for i, line in enumerate(lines) if 'execve("/usr/bin/relaymilter"' in line)
    used = {
        match.group(1)
        for line in lines[start + 1 :]
        if (match := re.match(r"\d+\s+([a-z0-9_]+)\(", line))
    }
    assert used, "strace recorded nothing"
    assert sorted(used - allowed) == []


# -- upgrade and purge ------------------------------------------------------------------


def make_upgrade(deb: Path, workdir: Path) -> Path:
    """The same package as version -2, with a changed default configuration."""
    tree = workdir / "tree"
    run(["dpkg-deb", "-R", str(deb), str(tree)])
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"(?m)^Version: .*$", "Version: 0.1.0-2", control.read_text()))
    packaged = tree / "etc" / "relaymilter" / "relaymilter.yml"
    packaged.write_text(packaged.read_text() + "# a new default in version -2\n")
    md5sums = tree / "DEBIAN" / "md5sums"
    if md5sums.exists():
        digest = run(["md5sum", "etc/relaymilter/relaymilter.yml"], cwd=str(tree)).split()[0]
        md5sums.write_text(
            re.sub(
                r"(?m)^\S+(  etc/relaymilter/relaymilter\.yml)$",
                digest + r"\1",
                md5sums.read_text(),
            )
        )
    upgrade = workdir / "relaymilter_0.1.0-2_all.deb"
    run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(upgrade)])
    return upgrade


def test_edited_config_survives_reinstall_and_upgrade_and_purge_leaves_nothing(
    installed: Build, tmp_path: Path
) -> None:
    edited = CONF.read_text() + "# edited by the admin\n"
    CONF.write_text(edited)
    run([*APT, "--reinstall", str(installed.package)])
    assert CONF.read_text() == edited

    run([*APT, str(make_upgrade(installed.package, tmp_path))])
    assert (dpkg_status() or "").endswith("0.1.0-2")
    assert CONF.read_text() == edited, "the upgrade replaced an edited config"
    assert "a new default in version -2" in Path(f"{CONF}.dpkg-dist").read_text()
    info = CONF.stat()
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_gid == grp.getgrnam("relaymilter").gr_gid

    # Runtime leftovers of a manual run, as purge finds them.
    runtime = Path("/run/relaymilter")
    runtime.mkdir(exist_ok=True)
    (runtime / "relaymilter.sock").touch()
    run(["apt-get", "purge", "-y", "-q", "relaymilter"])
    assert dpkg_status() is None
    left = [
        path
        for path in [
            *INSTALLED_PATHS,
            "/etc/relaymilter",
            "/etc/systemd/system/multi-user.target.wants/relaymilter.service",
            "/usr/lib/python3/dist-packages/relaymilter",
            "/usr/share/doc/relaymilter",
            str(CHROOT_DIR),
            str(runtime),
        ]
        if os.path.lexists(path)
    ]
    assert left == []
    # Debian policy: the system user stays (files it owned may remain).
    pwd.getpwnam("relaymilter")
