"""Fixtures for the packaging tests: the .deb and .rpm, built once per session, and guests.

The builds run packaging/build-deb and packaging/build-rpm, which fail unless
lintian and rpmlint are clean, into a temporary dist directory (the
checkout's dist/ is left alone).

Nothing is ever installed on this machine. The .deb is installed, run,
upgraded and purged only in ``guest``: a throwaway container of each Debian
release in ``container.RELEASES`` (12 and 13), each with its own systemd as
PID 1 (container.py). Every test that uses a guest runs once per release;
each guest is booted once and removed after its tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Dict, Iterator, List, Optional

import pytest

from ..support import REPO, MilterSession
from . import container
from .container import Guest
from .trees import SOURCE

# Debian's tools and python3 first: never a pyenv or venv interpreter.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Build:
    package: Path
    output: str


def require_tools(*tools: str, optional: bool = False) -> None:
    """Skip (locally) or fail (in CI, where scripts/bootstrap installs them) without the tools.

    ``optional``: a tool scripts/bootstrap does not promise; skip, with the reason, even in CI.
    """
    missing = [tool for tool in tools if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        if optional:
            pytest.skip(f"missing {', '.join(missing)} (not installed by scripts/bootstrap)")
        message = f"missing {', '.join(missing)} (scripts/bootstrap installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def run(command: List[str], timeout: float = 300, **kwargs: object) -> str:
    """Run a command with the system PATH; fail the test with its output if it fails."""
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive"},
        **kwargs,  # type: ignore[call-overload]
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output}"
    return output


@pytest.fixture(scope="session")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="session")
def deb(dist_dir: Path) -> Build:
    require_tools("dpkg-buildpackage", "dh", "lintian", "git")
    output = run([str(REPO / "packaging" / "build-deb"), str(dist_dir)])
    (package,) = dist_dir.glob("relaymilter_*_all.deb")
    return Build(package, output)


@pytest.fixture(scope="session")
def rpm(dist_dir: Path) -> Build:
    require_tools("rpmbuild", "rpmlint", "git")
    output = run([str(REPO / "packaging" / "build-rpm"), str(dist_dir)])
    (package,) = dist_dir.glob("relaymilter-*.noarch.rpm")
    return Build(package, output)


# -- the guest ----------------------------------------------------------------------------

GUEST_DEB = "/root/relaymilter.deb"
CONF = "/etc/relaymilter/relaymilter.yml"
SHIPPED_CONF = "/root/relaymilter.yml.shipped"
TEST_DROP_INS = "/run/systemd/system/relaymilter.service.d"
APT_INSTALL = [
    "apt-get",
    "install",
    "-y",
    "-q",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
]


# How long each guest was up (a package's guest stays up while the other
# modules' tests run), for the terminal summary.
GUEST_TIMES: Dict[str, Dict[str, float]] = {}


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for label, times in GUEST_TIMES.items():
        if "total" not in times:
            continue
        built = times.get("base")
        tree = f"built in {built:.1f} s" if built else "cached"
        terminalreporter.write_line(
            f"{label}: up {times['total']:.1f} s (tree {tree}, boot {times.get('boot', 0):.1f} s)"
        )


def guest_label(kind: str, release: str) -> str:
    """How the terminal summary names a guest."""
    return f"{kind}, Debian {container.RELEASES.get(release, '')} ({release})".replace("  ", " ")


@pytest.fixture(
    scope="package",
    params=list(container.RELEASES),
    ids=[f"debian{version}" for version in container.RELEASES.values()],
)
def release(request: pytest.FixtureRequest) -> str:
    """The Debian release of the guest: every guest test runs on each."""
    return str(request.param)


@pytest.fixture(scope="package")
def guest(deb: Build, release: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """A booted guest of ``release`` with the .deb copied in (not installed yet).

    Its journal and console are kept in the session's temporary directory
    (guest-logs-RELEASE/) for reading after a failure.
    """
    require_root("boots a throwaway systemd container")
    require_tools("mmdebstrap", "nsenter", "mount", "umount", "dpkg-deb", "apt-get")
    nspawn = container.find_nspawn()
    if nspawn is None:
        try:
            nspawn = container.ensure_nspawn()
        except container.ContainerError as exc:
            message = f"no systemd-nspawn (scripts/bootstrap unpacks it): {exc}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    # pytest tears fixtures down on KeyboardInterrupt, not on SIGTERM: make
    # "kill PID" clean up the guest too. (SIGKILL leaves it to the next
    # session's container.sweep.)
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    times = GUEST_TIMES.setdefault(guest_label("packaging guest", release), {})
    base = container.ensure_base(release)
    logs = tmp_path_factory.mktemp(f"guest-logs-{release}")
    try:
        with Guest(base.path, nspawn, logs) as booted:
            booted.copy_in(deb.package, GUEST_DEB)
            built = f"base tree built in {base.built_in:.1f} s, " if base.built_in else ""
            container.log(
                f"{release} guest ready after {time.monotonic() - started:.1f} s ({built}"
                f"boot {booted.boot_seconds or 0:.1f} s); logs in {logs}"
            )
            times.update(boot=booted.boot_seconds or 0, base=base.built_in or 0)
            yield booted
    finally:
        base.release()
        times["total"] = time.monotonic() - started
        if previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def package_status(guest: Guest) -> Optional[str]:
    """dpkg's "Status Version" of relaymilter in the guest, or None if it is not known."""
    result = guest.run("dpkg-query", "-W", "-f=${Status} ${Version}", "relaymilter", check=False)
    return result.stdout if result.returncode == 0 else None


@pytest.fixture
def installed(guest: Guest) -> Guest:
    """The guest with the .deb installed (again, if an earlier test purged it)."""
    if not (package_status(guest) or "").startswith("install ok installed"):
        guest.run(*APT_INSTALL, GUEST_DEB, timeout=300)
        guest.run("cp", "-p", CONF, SHIPPED_CONF)
    return guest


@pytest.fixture
def service(installed: Guest) -> Guest:
    """relaymilter.service active with the shipped unit and configuration.

    Undoes what earlier tests left: drop-ins in /run, an edited configuration,
    a failed or stopped unit. Restarts only if something had changed.
    """
    changed = restore_shipped(installed, TEST_DROP_INS)
    state = installed.props("relaymilter.service", "ActiveState", "SubState")
    if state != {"ActiveState": "active", "SubState": "running"}:
        changed = True
    if changed:
        restart(installed)
    return installed


def restore_shipped(guest: Guest, drop_ins: str) -> bool:
    """Remove a test's drop-ins and put the shipped configuration back; whether either was off."""
    changed = False
    if guest.exists(drop_ins):
        guest.run("rm", "-rf", drop_ins)
        guest.run("systemctl", "daemon-reload")
        changed = True
    shipped = guest.read(SHIPPED_CONF)
    if guest.read(CONF) != shipped:
        guest.write(CONF, shipped)  # in place: owner and mode stay
        changed = True
    return changed


def restart(
    guest: Guest, unit: str = "relaymilter.service", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``systemctl restart``, the unit's failed state and start counter cleared first.

    systemd 257 counts every start against the unit's start limit
    (StartLimitBurst=5 in 10 s by default), and refuses a test's sixth.
    """
    guest.run("systemctl", "reset-failed", unit, check=False)
    return guest.run("systemctl", "restart", unit, check=check)


SOCKET = "inet:8894@127.0.0.1"  # the shipped relaymilter.yml's


def milter_replies(
    guest: Guest,
    recipients: List[str],
    client: str = "192.0.2.10",
    sender: str = "<app@example.net>",
    queue_id: str = "4GuestTest1",
    socket: str = SOCKET,
) -> List[str]:
    """One milter transaction with the guest's daemon, as its MTA would talk to it.

    192.0.2.10 is in the shipped configuration's IP connector (organization
    contoso), so a relay from a sender outside contoso is refused. A TCP
    socket is reached in the guest's network namespace, a unix socket through
    the guest's root.
    """
    if socket.startswith("unix:"):
        socket = f"unix:/proc/{guest.leader}/root{socket[5:]}"

    def talk() -> List[str]:
        session = MilterSession(socket)
        try:
            session.negotiate()
            session.connect(client)
            session.mail(sender, {"i": queue_id})
            return [session.rcpt(recipient) for recipient in recipients]
        finally:
            session.close()

    return talk() if socket.startswith("unix:") else guest.in_network(talk)


def unit_log(guest: Guest, mark: str, *args: str) -> List[Dict[str, str]]:
    """relaymilter.service's journal entries since ``mark`` (JSON objects)."""
    return guest.journal_entries(mark, "-u", "relaymilter.service", *args)


def messages(entries: List[Dict[str, str]], pid: Optional[str] = None) -> List[str]:
    return [str(e.get("MESSAGE", "")) for e in entries if pid is None or e.get("_PID") == pid]


def wait_for_log(guest: Guest, mark: str, text: str, pid: str, timeout: float = 15) -> List[str]:
    """Wait until the process ``pid`` has logged a message containing ``text``; its messages."""

    def logged() -> Optional[List[str]]:
        found = messages(unit_log(guest, mark), pid)
        return found if any(text in message for message in found) else None

    return container.wait_for(logged, timeout, f"{text!r} from PID {pid}", interval=0.1)


def run_tests_in(guest: Guest, venv: str, arguments: str, what: str) -> None:
    """Run pytest on the guest's copy of the checkout with ``venv``'s Python; fail with its output."""
    command = (
        f"cd {SOURCE} && PYTHONPATH={SOURCE} PYTHONDONTWRITEBYTECODE=1"
        f" {venv}/bin/python -m pytest -q -p no:cacheprovider {arguments}"
    )
    result = guest.run("/bin/sh", "-c", command, check=False, timeout=900)
    summary = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
    container.log(f"{what}: {summary[0]}")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
