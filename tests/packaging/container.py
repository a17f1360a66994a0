"""Throwaway Debian machines with a real systemd as PID 1, for the packaging tests.

The tests never install relaymilter on the machine that runs them. They install
it in a guest instead: each Debian release's own systemd (252 in Debian 12
"bookworm", 257 in Debian 13 "trixie") booted by ``systemd-nspawn`` on a tree
of that release, where installing, upgrading, purging and running the package
under real systemd hurt nobody. Works where systemd is not PID 1 (build and CI
machines here), which is also the only place it was tried.

- **The releases** (``RELEASES``): a tree of the host's own release uses the
  host's apt sources; another release uses the same archive, the suites
  renamed (``bookworm`` → ``trixie``, ``-updates`` and ``-security`` alike).

- **The base tree** (``mmdebstrap``, about 30-60 s, once per release) is cached in
  ``$RELAYMILTER_TEST_CONTAINER_CACHE`` (default
  /var/cache/relaymilter-test-container) under a name hashed from its recipe:
  the packages, the hooks, this machine's apt sources and the .deb's
  dependencies. A change of any of them builds a new tree and removes the old.
  The .deb's dependencies are downloaded into the tree's apt cache, not
  installed, so that ``apt-get install ./relaymilter_*.deb`` in the guest runs
  offline exactly as on a real machine.
- **Each session** boots the tree read-only under an overlay (the upper layer is
  thrown away), with its own machine ID and ``--private-network`` (loopback
  only: no port of the host is taken, nothing leaves the machine).
- **systemd-nspawn** comes from the host if systemd-container is installed.
  Otherwise ``ensure_nspawn`` unpacks systemd-container and its
  libsystemd-shared into the cache (``apt-get download``, ``dpkg-deb -x``):
  installing systemd-container would upgrade the host's systemd packages.
- **Cleanup** (processes, the overlay mount, the cgroups, nspawn's propagation
  directory, the run directory) happens on teardown, also after a failure. A
  session that was killed outright is cleaned up by the next one (``sweep``):
  each run directory records its owner and what it started.

Standard library only: ``scripts/bootstrap`` runs ``python3 -m
tests.packaging.container tools`` before the virtualenv exists. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REPO = Path(__file__).resolve().parent.parent.parent
CACHE = Path(
    os.environ.get("RELAYMILTER_TEST_CONTAINER_CACHE", "/var/cache/relaymilter-test-container")
)
#: The Debian releases a guest can run, by codename, with their version.
RELEASES = {"bookworm": "12", "trixie": "13"}

# What the base tree is made of. python3-yaml and the other runtime
# dependencies are not installed: they come with the .deb under test.
# postfix: postinst creates the socket directory in Postfix's chroot only when
# Postfix is there. man-db: "systemd-analyze verify" looks up the unit's
# Documentation=man: pages.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "iproute2",
    "python3",
    "postfix",
    "man-db",
    # The release's own lintian checks the .deb there.
    "lintian",
)
#: Downloaded into the tree's apt cache, not installed: the guest has no network,
#: and the MTA tests replace Postfix with Sendmail in a guest of their own.
DOWNLOADED_PACKAGES = ("sendmail",)
# Timers and services that would only add noise (or network attempts) to a
# short boot.
QUIET_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "dpkg-db-backup.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
)
# mmdebstrap hooks; "$1" is the tree. (The whole mmdebstrap command is part of
# the recipe hash: a change here builds a new tree.)
ESSENTIAL_HOOKS = (
    # Postfix "Local only": a loopback-only listener, no relaying.
    'printf "%s\\n" "postfix postfix/main_mailer_type select Local only"'
    ' "postfix postfix/mailname string guest.test" | chroot "$1" debconf-set-selections',
)
CUSTOMIZE_HOOKS = (
    'echo guest > "$1/etc/hostname"',
    'printf "127.0.0.1\\tlocalhost\\n127.0.1.1\\tguest.test guest\\n'
    '::1\\tlocalhost ip6-localhost ip6-loopback\\n" > "$1/etc/hosts"',
    'chroot "$1" postconf -e myhostname=guest.test',
    # No man-db index rebuild on every dpkg run in the guest (seconds each).
    'rm -f "$1/var/lib/man-db/auto-update"',
    "for unit in "
    + " ".join(QUIET_UNITS)
    + '; do ln -sf /dev/null "$1/etc/systemd/system/$unit"; done',
)
# Bump when the build changes in a way its mmdebstrap command does not show.
RECIPE_VERSION = "1"

READY_MARK = ".relaymilter-test-ready"
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
    "DEBIAN_FRONTEND": "noninteractive",
}
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class ContainerError(Exception):
    """The harness could not do its part (not a failed check of the package)."""


def log(message: str) -> None:
    print(f"container: {message}", file=sys.stderr, flush=True)


def _run(
    command: Sequence[str],
    timeout: float = 600,
    check: bool = True,
    **kwargs: object,
) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        list(command),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"},
        **kwargs,
    )
    if check and result.returncode != 0:
        raise ContainerError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result


def wait_for(
    probe: Callable[[], Optional[T]], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something other than None (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _mounts_below(path: Path) -> List[str]:
    """Mount points at or below ``path`` in this mount namespace, deepest first."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Octal escapes (\040 for a space) as the kernel writes them.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == top or point.startswith(top + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf, but never into a mounted file system.

    An interrupted mmdebstrap can leave /proc, /sys or device mounts in its
    tree; deleting through them would delete the host's files. They are
    detached first (lazily if busy); if one stays, nothing is deleted.
    """
    if not os.path.lexists(path):
        return
    for point in _mounts_below(path):
        if _run(["umount", point], check=False).returncode != 0:
            _run(["umount", "-l", point], check=False)
    left = _mounts_below(path)
    if left:
        raise ContainerError(f"not removing {path}: still mounted there: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


# -- systemd-nspawn ------------------------------------------------------------------


@dataclass(frozen=True)
class Nspawn:
    """How to run systemd-nspawn: the binary, and its own libsystemd-shared if unpacked."""

    binary: str
    library_path: Optional[str] = None

    def env(self) -> Dict[str, str]:
        return {"LD_LIBRARY_PATH": self.library_path} if self.library_path else {}


def _unpacked_nspawn(directory: Path) -> Optional[Nspawn]:
    binary = directory / "usr" / "bin" / "systemd-nspawn"
    if not binary.is_file():
        return None
    libraries = sorted(directory.rglob("libsystemd-shared-*.so"))
    if not libraries:
        return None
    return Nspawn(str(binary), str(libraries[0].parent))


def find_nspawn() -> Optional[Nspawn]:
    """The host's systemd-nspawn, or the newest copy unpacked into the cache."""
    host = shutil.which("systemd-nspawn", path=SYSTEM_PATH)
    if host:
        return Nspawn(host)
    tools = CACHE / "tools"
    for directory in sorted(tools.glob("systemd-container_*"), reverse=True):
        found = _unpacked_nspawn(directory)
        if found:
            return found
    return None


def _candidate(package: str) -> Optional[str]:
    output = _run(["apt-cache", "policy", package], check=False).stdout
    for line in output.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    return None


def ensure_nspawn() -> Nspawn:
    """systemd-nspawn, unpacked from the archive into the cache if the host lacks it.

    Not installed: systemd-container must have the same version as the host's
    systemd, so installing it would upgrade systemd itself. The unpacked copy
    runs with the libsystemd-shared of its own version (LD_LIBRARY_PATH).
    """
    if shutil.which("systemd-nspawn", path=SYSTEM_PATH):
        return Nspawn(shutil.which("systemd-nspawn", path=SYSTEM_PATH) or "systemd-nspawn")
    version = _candidate("systemd-container")
    if version is None:
        _run(["apt-get", "update", "-q"])
        version = _candidate("systemd-container")
    if version is None:
        found = find_nspawn()
        if found:
            return found
        raise ContainerError("systemd-container is not in the apt archive")
    directory = CACHE / "tools" / ("systemd-container_" + version.replace(":", "_"))
    found = _unpacked_nspawn(directory)
    if found:
        return found
    log(f"unpacking systemd-container {version} into {directory} (not installed)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as download:
        # apt-get download drops privileges to _apt, which must write here.
        with contextlib.suppress(KeyError, PermissionError):
            shutil.chown(download, user="_apt")
        _run(
            [
                "apt-get",
                "download",
                "-q",
                f"systemd-container={version}",
                f"libsystemd-shared={version}",
            ],
            cwd=download,
        )
        unpacked = Path(download) / "tree"
        for package in sorted(Path(download).glob("*.deb")):
            _run(["dpkg-deb", "-x", str(package), str(unpacked)])
        shutil.rmtree(directory, ignore_errors=True)
        unpacked.rename(directory)
    for old in (CACHE / "tools").glob("systemd-container_*"):
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)
    found = _unpacked_nspawn(directory)
    if found is None:
        raise ContainerError(f"no systemd-nspawn or libsystemd-shared in {directory}")
    return found


# -- the base tree ---------------------------------------------------------------------


def host_release() -> str:
    """The codename of this machine's Debian release (VERSION_CODENAME of os-release)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    raise ContainerError("/etc/os-release names no VERSION_CODENAME")


def apt_sources(release: str) -> List[str]:
    """The apt sources for a tree of ``release``: files, as mmdebstrap takes them.

    The host's own files for its own release; for another release, the same
    archive with the suites renamed, written into the cache.
    """
    files = apt_source_files()
    host = host_release()
    if release == host:
        return [str(path) for path in files]
    CACHE.mkdir(parents=True, exist_ok=True)
    written = []
    for number, path in enumerate(files):
        text = re.sub(rf"\b{host}(?=\b|-)", release, path.read_text())
        target = CACHE / f"sources-{release}-{number}{path.suffix}"
        target.write_text(text)
        written.append(str(target))
    return written


def apt_source_files() -> List[Path]:
    """This machine's active apt sources: the guest uses the same archive."""
    candidates = [Path("/etc/apt/sources.list")]
    sources_d = Path("/etc/apt/sources.list.d")
    candidates += sorted(sources_d.glob("*.list")) + sorted(sources_d.glob("*.sources"))
    active = []
    for path in candidates:
        if not path.is_file():
            continue
        lines = [line.strip() for line in path.read_text().splitlines()]
        if any(line and not line.startswith("#") for line in lines):
            active.append(path)
    return active


def package_dependencies() -> List[str]:
    """The .deb's Depends and Recommends (packaging/debian/control): the first of each alternative.

    Read from the source, not from a built .deb, so that the trees can be
    built before the package is. What debhelper adds (``${python3:Depends}``,
    ``${misc:Depends}``: python3, systemd) is in the base tree already.
    """
    control = (REPO / "packaging" / "debian" / "control").read_text()
    binary = control.split("\nPackage:", 1)[1]
    names = set()
    for field_name in ("Depends", "Recommends"):
        match = re.search(rf"^{field_name}:((?:.*\n)(?:[ \t].*\n)*)", binary, re.MULTILINE)
        for item in (match.group(1) if match else "").split(","):
            name = item.split("|")[0].split("(")[0].strip().removesuffix(":any")
            if name and "$" not in name:
                names.add(name)
    return sorted(names)


@dataclass(frozen=True)
class TreeRecipe:
    """What one cached tree is made of: a Debian release, packages and mmdebstrap hooks.

    ``name`` tells the kinds of tree apart (the packaging tests' ``base``, the
    floor's ``floor``); each kind keeps one tree per release, the newest recipe's.
    """

    name: str
    release: str
    packages: Sequence[str]
    essential_hooks: Sequence[str] = ()
    customize_hooks: Sequence[str] = ()
    #: Tells the reader of the log what to expect.
    expected_seconds: str = "30-60"

    def command(self, target: str) -> List[str]:
        sources = apt_sources(self.release)
        if not sources:
            raise ContainerError("no active apt sources in /etc/apt")
        return [
            "mmdebstrap",
            "--mode=root",
            "--variant=apt",
            "--include=" + ",".join(self.packages),
            *(f"--essential-hook={hook}" for hook in self.essential_hooks),
            *(f"--customize-hook={hook}" for hook in self.customize_hooks),
            # Keep the apt lists and the downloaded archives.
            "--skip=cleanup/apt",
            self.release,
            target,
            *sources,
        ]

    def text(self) -> str:
        """Everything the tree is made of: the whole command, and the apt sources' contents."""
        # Where this checkout is does not change the tree (a hook may copy from it).
        command = [part.replace(str(REPO), "$REPO") for part in self.command("TARGET")]
        recipe = {
            "version": RECIPE_VERSION,
            "command": command,
            "sources": {source: Path(source).read_text() for source in apt_sources(self.release)},
        }
        return json.dumps(recipe, sort_keys=True, indent=1)

    @property
    def kind(self) -> str:
        return f"{self.name}-{self.release}"


def base_recipe(release: str) -> TreeRecipe:
    """The packaging tests' tree: a bootable system, the .deb's dependencies downloaded."""
    return TreeRecipe(
        "base",
        release,
        BASE_PACKAGES,
        ESSENTIAL_HOOKS,
        (
            *CUSTOMIZE_HOOKS,
            # The archives of what is installed already are not needed. The
            # .deb's dependencies are downloaded, not installed: the guest's
            # "apt-get install ./x.deb" then resolves them offline, as on a real
            # machine.
            'chroot "$1" apt-get clean',
            'chroot "$1" apt-get install --download-only -y -q'
            " -o APT::Install-Recommends=true " + " ".join(package_dependencies()),
            'chroot "$1" apt-get install --download-only -y -q ' + " ".join(DOWNLOADED_PACKAGES),
        ),
    )


def pip_install_hooks(venv: str, requirements: Sequence[str]) -> Tuple[str, ...]:
    """Customize hooks that install ``requirements`` from PyPI into the tree's ``venv``.

    pip runs with a clean environment, trusting what this machine trusts:
    PyPI may be reached through a proxy with a CA of its own.
    """
    cas = "/root/host-cas.pem"
    return (
        f'cp /etc/ssl/certs/ca-certificates.crt "$1{cas}"',
        f'chroot "$1" env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT={cas}'
        f" {venv}/bin/pip install -q --no-cache-dir --disable-pip-version-check "
        + " ".join(requirements),
        f'rm "$1{cas}"',
    )


def entry_point_hooks(venv: str) -> Tuple[str, ...]:
    """Customize hooks writing ``venv``/bin/relaymilter as pip would (the checkout on PYTHONPATH)."""
    script = (
        f"#!{venv}/bin/python\nimport sys\nfrom relaymilter.cli import main\nsys.exit(main())\n"
    )
    return (
        f"printf '{script}' > \"$1{venv}/bin/relaymilter\"",
        f'chmod 0755 "$1{venv}/bin/relaymilter"',
    )


def copy_checkout(target: Path) -> None:
    """This checkout's files (no VCS data, caches or virtualenv) into a guest's ``target``."""
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "dist", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"
    )
    shutil.copytree(REPO, target, ignore=ignored)


@dataclass
class Tree:
    """A cached tree, and the shared lock that keeps it while a guest uses it."""

    path: Path
    lock: IO[str]
    built_in: Optional[float] = None  # seconds, if this call built it

    def release(self) -> None:
        self.lock.close()


def ensure_tree(recipe: TreeRecipe, rebuild: bool = False) -> Tree:
    """The tree of ``recipe``: cached, or built now."""
    text = recipe.text()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = CACHE / f"{recipe.kind}-{digest}"
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / f"{recipe.kind}.lock", "w")  # noqa: SIM115 (held by the returned Tree)
    try:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if (path / READY_MARK).exists() and not rebuild:
            return Tree(path, lock)
        # Build under the exclusive lock: no guest uses a tree of this kind meanwhile.
        # (Unlock first: two holders of the shared lock that both asked for
        # the exclusive one would wait for each other forever.)
        fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX)
        built_in = None
        if not (path / READY_MARK).exists() or rebuild:
            built_in = _build_tree(path, recipe, text)
        fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_SH)
        return Tree(path, lock, built_in)
    except BaseException:
        lock.close()
        raise


def ensure_base(release: str, rebuild: bool = False) -> Tree:
    """The packaging tests' tree of ``release``: cached, or built now."""
    return ensure_tree(base_recipe(release), rebuild)


def _build_tree(path: Path, recipe: TreeRecipe, text: str) -> float:
    if shutil.which("mmdebstrap", path=SYSTEM_PATH) is None:
        raise ContainerError("mmdebstrap is not installed (scripts/bootstrap installs it)")
    log(f"building the tree {path} with mmdebstrap (once; about {recipe.expected_seconds} s)")
    started = time.monotonic()
    # Old trees of this kind (another recipe), and leftovers of an interrupted build.
    for old in CACHE.glob(f"{recipe.kind}-*"):
        if old.is_dir():
            remove_tree(old)
    building = path.with_name(path.name + ".building")
    command = recipe.command(str(building))
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"},
        )
        try:
            returncode = process.wait(1800)
        except BaseException:
            # Interrupted: let mmdebstrap unmount what it mounted in the tree
            # (SIGKILL would leave /proc, /sys and /dev mounts behind).
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            remove_tree(building)
            raise
        output.seek(0)
        log_tail = "\n".join(output.read().splitlines()[-30:])
    if returncode != 0:
        remove_tree(building)
        raise ContainerError(f"mmdebstrap failed ({returncode}):\n{log_tail}")
    (building / ".relaymilter-test-recipe.json").write_text(text)
    (building / READY_MARK).touch()
    building.rename(path)
    elapsed = time.monotonic() - started
    log(f"tree built in {elapsed:.1f} s")
    return elapsed


# -- processes and cleanup ------------------------------------------------------------


def _start_time(pid: int) -> Optional[str]:
    """A live process's start time (field 22 of /proc/PID/stat): its identity with the PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie: dead, only not reaped yet
        return None
    return fields[19]


def _alive(pid: Optional[int], start: Optional[str]) -> bool:
    return bool(pid) and start is not None and _start_time(pid or 0) == start


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == target for line in mountinfo)


@dataclass
class RunState:
    """What one guest run made on the host; saved in its directory for ``sweep``."""

    directory: Path
    machine: str
    owner: int = field(default_factory=os.getpid)
    owner_start: Optional[str] = None
    launcher: Optional[int] = None
    launcher_start: Optional[str] = None
    leader: Optional[int] = None
    leader_start: Optional[str] = None
    cgroups: List[str] = field(default_factory=list)
    created_nspawn_rundir: bool = False

    @property
    def root(self) -> Path:
        return self.directory / "root"

    def save(self) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "directory"}
        (self.directory / "state.json").write_text(json.dumps(data))

    @classmethod
    def load(cls, directory: Path) -> RunState:
        data = json.loads((directory / "state.json").read_text())
        return cls(directory=directory, **data)


def _kill(pid: Optional[int], start: Optional[str], sig: int) -> None:
    if pid and _alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def teardown(state: RunState, process: Optional[subprocess.Popen[bytes]] = None) -> None:
    """Undo everything a run made; idempotent, and each step runs whatever the others did."""

    def launcher_gone() -> Optional[bool]:
        if process is not None:
            return True if process.poll() is not None else None
        return True if not _alive(state.launcher, state.launcher_start) else None

    with contextlib.suppress(TimeoutError):
        if not launcher_gone():
            # nspawn powers the guest off on SIGTERM (SIGRTMIN+3 to its init).
            _kill(state.launcher, state.launcher_start, signal.SIGTERM)
            wait_for(launcher_gone, 15, "the guest to power off", interval=0.1)
    if not launcher_gone():
        # The guest's PID 1 takes its whole PID namespace with it.
        _kill(state.leader, state.leader_start, signal.SIGKILL)
        _kill(state.launcher, state.launcher_start, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(launcher_gone, 10, "the guest to die", interval=0.1)
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
    if state.machine:
        # nspawn cannot remove this itself when the host's /run is not a tmpfs.
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{state.machine}", ignore_errors=True)
    if _mounted(state.root) and _run(["umount", str(state.root)], check=False).returncode:
        _run(["umount", "-l", str(state.root)], check=False)
    for cgroup in state.cgroups:
        _remove_cgroup(Path(cgroup))
    remove_tree(state.directory)
    if state.created_nspawn_rundir:
        _remove_nspawn_rundir()


def _remove_cgroup(top: Path) -> None:
    """Remove a cgroup and the guest's cgroups below it, deepest first."""
    if not top.is_dir():
        return
    directories = sorted(
        (Path(root) for root, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True
    )

    def removed() -> Optional[bool]:
        for directory in directories:
            with contextlib.suppress(FileNotFoundError):
                try:
                    directory.rmdir()
                except OSError:  # EBUSY while the last processes are reaped
                    return None
        return True

    with contextlib.suppress(TimeoutError):
        wait_for(removed, 10, f"cgroup {top} to empty", interval=0.1)


def _remove_nspawn_rundir() -> None:
    """/run/systemd/nspawn, which nspawn made, once no other run of ours uses it."""
    runs = CACHE / "runs"
    if any(d.is_dir() for d in runs.glob("*")) if runs.is_dir() else False:
        return
    rundir = Path("/run/systemd/nspawn")
    with contextlib.suppress(OSError):
        for directory in sorted(
            (Path(root) for root, _, _ in os.walk(rundir)), key=lambda p: len(p.parts), reverse=True
        ):
            directory.rmdir()


def sweep() -> List[str]:
    """Clean up after runs whose owner died without tearing down (e.g. SIGKILL)."""
    cleaned: List[str] = []
    runs = CACHE / "runs"
    if not runs.is_dir():
        return cleaned
    for directory in sorted(runs.iterdir()):
        try:
            state = RunState.load(directory)
        except (OSError, ValueError, TypeError):
            # Not even the state was written: nothing was started or mounted
            # unless the mount succeeded.
            if time.time() - directory.stat().st_mtime < 60:
                continue  # being set up right now
            state = RunState(directory=directory, machine="", owner=0)
        if state.owner and _alive(state.owner, state.owner_start):
            continue
        log(f"cleaning up after a dead run: {directory}")
        teardown(state)
        cleaned.append(str(directory))
    return cleaned


# -- the guest ------------------------------------------------------------------------


def _cgroup_parents() -> List[Path]:
    """Where the guest's own cgroups go when systemd does not manage the host's tree."""
    root = Path("/sys/fs/cgroup")
    if _fs_type(root) == "cgroup2fs":
        return [root]
    parents = []
    if _fs_type(root / "unified") == "cgroup2fs":
        parents.append(root / "unified")
    if (root / "systemd").is_dir():
        parents.append(root / "systemd")  # the name=systemd v1 hierarchy
    if not parents:
        raise ContainerError("no cgroup2 hierarchy on this machine")
    return parents


def _fs_type(path: Path) -> str:
    result = _run(["stat", "-f", "-c", "%T", str(path)], check=False)
    return result.stdout.strip()


def _move_to_cgroups(cgroups: Sequence[str]) -> Callable[[], None]:
    def move() -> None:  # in the child, before exec
        for cgroup in cgroups:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                procs.write("0")

    return move


class Guest:
    """A booted guest. Use as a context manager, or call ``start`` and ``stop``.

    ``run`` executes a command in the guest (all its namespaces and its root,
    a clean environment); ``in_network`` runs host code in its network
    namespace, e.g. a milter client for the guest's loopback.
    """

    def __init__(self, base: Path, nspawn: Nspawn, logs: Optional[Path] = None) -> None:
        self.base = base
        self.nspawn = nspawn
        self.logs = logs
        self.state: Optional[RunState] = None
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.boot_seconds: Optional[float] = None

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def leader(self) -> int:
        assert self.state and self.state.leader, "the guest is not running"
        return self.state.leader

    @property
    def root(self) -> Path:
        assert self.state
        return self.state.root

    def start(self) -> None:
        sweep()
        runs = CACHE / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
        name = "rmt-" + secrets.token_hex(4)
        self.state = state = RunState(directory, name, owner_start=_start_time(os.getpid()))
        state.created_nspawn_rundir = not Path("/run/systemd/nspawn").exists()
        state.save()
        for sub in ("upper", "work", "root"):
            (directory / sub).mkdir()
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={self.base},upperdir={directory}/upper,workdir={directory}/work",
                str(state.root),
            ]
        )
        # A machine ID of its own: journal files and the like are per run.
        (state.root / "etc" / "machine-id").write_text(secrets.token_hex(16) + "\n")
        host_has_systemd = Path("/run/systemd/system").is_dir()
        if not host_has_systemd:
            # Nobody manages the host's cgroup tree: give the guest its own.
            for parent in _cgroup_parents():
                cgroup = parent / f"relaymilter-test-{name}"
                cgroup.mkdir()
                state.cgroups.append(str(cgroup))
        state.save()
        command = [
            self.nspawn.binary,
            "--quiet",
            "--boot",
            "--register=no",
            "--private-network",
            f"--machine={name}",
            f"--directory={state.root}",
            "--console=read-only",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
        ]
        if not host_has_systemd:
            command.append("--keep-unit")  # no systemd to ask for a scope
        env = {
            "PATH": SYSTEM_PATH,
            "LANG": "C.UTF-8",
            # A pure cgroup2 tree in the guest, as a real Debian 12 boot has.
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
            **self.nspawn.env(),
        }
        started = time.monotonic()
        console = open(directory / "console.log", "wb")  # noqa: SIM115
        with console:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_move_to_cgroups(state.cgroups),
            )
        state.launcher = self.process.pid
        state.launcher_start = wait_for(
            lambda: _start_time(state.launcher or 0), 5, "the launcher to start"
        )
        state.save()
        state.leader = wait_for(self._find_leader, 60, "the guest's systemd to start")
        state.leader_start = _start_time(state.leader)
        state.save()
        system_state = self._wait_for_boot()
        self.boot_seconds = time.monotonic() - started
        log(f"guest {name} booted in {self.boot_seconds:.1f} s (system {system_state})")

    def _find_leader(self) -> Optional[int]:
        """nspawn's child that is PID 1 of its own namespace, once it runs systemd."""
        assert self.process
        if self.process.poll() is not None:
            raise ContainerError(
                f"systemd-nspawn exited ({self.process.returncode}):\n{self.console()}"
            )
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if fields.get("PPid", "").strip() != str(self.process.pid):
                continue
            if (
                fields.get("NSpid", "").split()[-1:] == ["1"]
                and fields["Name"].strip() == "systemd"
            ):
                return int(entry.name)
        return None

    def _wait_for_boot(self) -> str:
        # Until PID 1 has its private bus, systemctl prints nothing or
        # "offline" (it cannot reach the manager yet: seen on a loaded
        # machine); then --wait blocks until the boot has finished. A guest
        # whose nspawn has exited will never boot.
        def booted() -> Optional[str]:
            result = self.run("systemctl", "is-system-running", "--wait", check=False)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
            exited = self.process is None or self.process.poll() is not None
            if state in ("maintenance", "stopping") or exited:
                raise ContainerError(f"the guest did not boot ({state}):\n{self.console()}")
            return None

        state = wait_for(booted, 120, "the guest to finish booting", interval=0.1)
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            log(f"the guest booted degraded: {failed.strip()}")
        return state

    def console(self) -> str:
        assert self.state
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.state.directory / "console.log")
                .read_text(errors="replace")
                .splitlines()[-30:]
            )
        return ""

    def stop(self) -> None:
        state = self.state
        if state is None:
            return
        try:
            if self.logs is not None and state.leader:
                self.logs.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(Exception):
                    journal = self.run(
                        "journalctl", "-o", "short-precise", "--no-pager", check=False, timeout=30
                    ).stdout
                    (self.logs / "guest-journal.txt").write_text(journal)
                with contextlib.suppress(OSError):
                    shutil.copy(state.directory / "console.log", self.logs / "guest-console.txt")
        finally:
            self.state = None
            teardown(state, self.process)
            self.process = None

    # -- inside the guest --

    def command(self, *args: str) -> List[str]:
        return [
            "nsenter",
            f"--target={self.leader}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--cgroup",
            "--root",
            "--wd",
            "--",
            "/usr/bin/env",
            "-i",
            *(f"{key}={value}" for key, value in GUEST_ENV.items()),
            *args,
        ]

    def run(
        self,
        *args: str,
        input: Optional[str] = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the guest. ``check``: raise with its output unless it exits 0."""
        result = subprocess.run(
            self.command(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": SYSTEM_PATH},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the guest: {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, check: bool = True) -> str:
        return self.run("/bin/sh", "-ec", script, check=check).stdout

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def write(self, path: str, text: str) -> None:
        """Write a file in the guest in place: an existing file keeps its owner and mode."""
        self.run("/bin/sh", "-c", 'cat > "$1"', "-", path, input=text)

    def copy_in(self, source: Path, destination: str) -> None:
        target = self.root / destination.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def exists(self, path: str) -> bool:
        return self.run("test", "-e", path, check=False).returncode == 0

    # -- systemd --

    def props(self, unit: str, *names: str) -> Dict[str, str]:
        output = self.run("systemctl", "show", unit, *(f"--property={n}" for n in names)).stdout
        values = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        return {name: values.get(name, "") for name in names}

    def prop(self, unit: str, name: str) -> str:
        return self.props(unit, name)[name]

    def mark(self) -> str:
        """A fresh entry in the guest's journal, and its cursor, for ``journal(after=…)``.

        Queries then use the inclusive --cursor=, on an entry that no unit
        match selects: with a match such as -u, systemd 252's --after-cursor=
        skips the first matching entry when the cursor's own entry does not match.
        """
        tag = "mark-" + secrets.token_hex(8)
        self.run("logger", "-t", "relaymilter-test", tag)

        def cursor() -> Optional[str]:
            self.run("journalctl", "--sync")
            output = self.run(
                "journalctl",
                "-q",
                "-o",
                "json",
                "SYSLOG_IDENTIFIER=relaymilter-test",
                f"MESSAGE={tag}",
            ).stdout
            return str(json.loads(output.splitlines()[0])["__CURSOR"]) if output.strip() else None

        return wait_for(cursor, 10, "a journal mark")

    def journal(self, after: str, *args: str) -> str:
        """journalctl entries from the mark ``after`` on, with extra arguments (matches)."""
        self.run("journalctl", "--sync")
        return self.run(
            "journalctl", "-q", "--no-pager", f"--cursor={after}", *args, check=False
        ).stdout

    def journal_entries(self, after: str, *args: str) -> List[Dict[str, str]]:
        output = self.journal(after, "-o", "json", *args)
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    # -- the guest's network, from the host --

    def in_network(self, call: Callable[[], T]) -> T:
        """Run ``call`` in a thread that joined the guest's network namespace.

        Sockets it opens stay in that namespace and may be used from any
        thread afterwards.
        """
        values: List[T] = []
        errors: List[BaseException] = []

        def worker() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/proc/{self.leader}/ns/net", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        error = ctypes.get_errno()
                        raise OSError(error, f"setns: {os.strerror(error)}")
                finally:
                    os.close(fd)
                values.append(call())
            except BaseException as exc:  # re-raised in the caller
                errors.append(exc)

        thread = threading.Thread(target=worker, name="guest-network")
        thread.start()
        thread.join()
        if errors:
            raise errors[0]
        return values[0]


@contextlib.contextmanager
def booted(release: str, logs: Optional[Path] = None) -> Iterator[Guest]:
    """A guest of ``release`` booted on the packaging tests' tree (built first if needed)."""
    with booted_on(base_recipe(release), logs) as guest:
        yield guest


@contextlib.contextmanager
def booted_on(recipe: TreeRecipe, logs: Optional[Path] = None) -> Iterator[Guest]:
    """A guest booted on the tree of ``recipe`` (built first if needed)."""
    nspawn = find_nspawn() or ensure_nspawn()
    tree = ensure_tree(recipe)
    try:
        with Guest(tree.path, nspawn, logs) as guest:
            yield guest
    finally:
        tree.release()


# -- command line -----------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.packaging.container", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("tools", help="make sure systemd-nspawn can run (unpack it if needed)")
    commands.add_parser("sweep", help="clean up after test sessions that were killed")
    build = commands.add_parser("build-base", help="(re)build the packaging tests' base tree")
    shell = commands.add_parser("shell", help="boot a guest with the .deb copied in; open a shell")
    shell.add_argument("deb", type=Path)
    for sub in (build, shell):
        sub.add_argument("--release", choices=sorted(RELEASES), default=host_release())
    commands.add_parser("clean", help="remove the cache (base trees and unpacked tools)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root")
    if args.command == "tools":
        print(f"systemd-nspawn: {ensure_nspawn()}")
    elif args.command == "sweep":
        print("\n".join(sweep()) or "nothing to clean up")
    elif args.command == "build-base":
        ensure_base(args.release, rebuild=True).release()
    elif args.command == "shell":
        with booted(args.release) as guest:
            guest.copy_in(args.deb, f"/root/{args.deb.name}")
            print(f"guest PID 1 is host PID {guest.leader}; exit the shell to stop it")
            subprocess.run(guest.command("/bin/bash", "-l"), check=False)
    elif args.command == "clean":
        sweep()
        remove_tree(CACHE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
