"""relaymilter-sync.service and .timer under systemd 252, in the guest of conftest.py.

The installed .deb's units: verified, scored, the timer left disabled; a sync
as the timer would start it, with a ``files`` source, writes the snapshot
(root:relaymilter 0640, like the configuration) and the status file, and the
running daemon reloads the new snapshot by itself; a sync whose result does
not validate fails the unit and leaves the snapshot alone. The unit runs as
root but keeps only CAP_CHOWN, and that one is needed. Every wait is for a
state or a log line, never a fixed time.
"""

from __future__ import annotations

import json
import re
from typing import Dict, Iterator, List

import pytest

from .conftest import CONF, SHIPPED_CONF, milter_replies, restart, unit_log, wait_for_log
from .container import Guest
from .test_unit import REJECT, UNIT, main_pid, state

pytestmark = pytest.mark.packaging

SYNC = "relaymilter-sync.service"
TIMER = "relaymilter-sync.timer"
SNAPSHOT = "/etc/relaymilter/relaymilter.snapshot.yml"
STATE_DIR = "/var/lib/relaymilter"
STATUS = f"{STATE_DIR}/sync-status.json"
FRAGMENTS = "/etc/relaymilter/organizations.d"
FRAGMENT = f"{FRAGMENTS}/fabrikam.yml"
# What an ldap or postgresql source's password_file is: root's alone.
PASSWORD_FILE = "/etc/relaymilter/source.password"
SYNC_DROP_INS = f"/run/systemd/system/{SYNC}.d"
# systemd-analyze security's exposure for relaymilter-sync.service, loaded,
# on systemd 252. It runs as root with network access, so it cannot score
# like the daemon's unit; what is left is justified in its comments.
SYNC_SECURITY_EXPOSURE = 1.9
SOURCES = """
sources:
  max_snapshot_age: 1h
  files:
    - name: fragments
      directory: organizations.d
"""
FABRIKAM_IP = "198.51.100.7"
SENDER = "<app@fabrikam.net>"


def fragment(*domains: str) -> str:
    listed = ", ".join(domains)
    return (
        "organizations:\n"
        "  - name: fabrikam\n"
        f"    accepted_domains: [{listed}]\n"
        "    connectors:\n"
        "      - name: fabrikam-ip\n"
        "        sender_ip_addresses: [198.51.100.0/24]\n"
    )


def stat(guest: Guest, path: str) -> List[str]:
    """[octal mode, owner, group] of a path in the guest."""
    return guest.run("stat", "-c", "%a %U %G", path).stdout.split()


def start_sync(guest: Guest) -> int:
    """``systemctl start`` the sync service, as the timer does; its exit status (waits for it)."""
    guest.run("systemctl", "reset-failed", SYNC, check=False)
    return guest.run("systemctl", "start", SYNC, check=False, timeout=120).returncode


def sync_result(guest: Guest) -> Dict[str, str]:
    return guest.props(SYNC, "ActiveState", "Result", "ExecMainStatus")


def sync_log(guest: Guest, mark: str) -> str:
    return guest.journal(mark, "-u", SYNC, "-o", "cat")


def as_service_user(guest: Guest, *command: str) -> int:
    return guest.run("runuser", "-u", "relaymilter", "--", *command, check=False).returncode


@pytest.fixture
def sources(service: Guest) -> Iterator[Guest]:
    """The shipped configuration with a ``files`` source and one fragment; undone afterwards.

    Afterwards the shipped configuration is back and the daemon restarted on it
    before the sync's files go, so that the next test finds the daemon as the
    ``service`` fixture leaves it.
    """
    service.run("install", "-d", "-m", "0755", FRAGMENTS)
    service.write(FRAGMENT, fragment("fabrikam.com"))
    service.sh(f"umask 077 && echo 's3cret' > {PASSWORD_FILE}")
    service.write(CONF, service.read(SHIPPED_CONF) + SOURCES)  # in place: root:relaymilter 0640
    try:
        yield service
    finally:
        service.run("rm", "-rf", SYNC_DROP_INS)
        service.run("systemctl", "daemon-reload")
        service.run("systemctl", "reset-failed", SYNC, check=False)
        service.write(CONF, service.read(SHIPPED_CONF))
        restart(service, UNIT, check=False)
        service.run("rm", "-rf", FRAGMENTS, PASSWORD_FILE, SNAPSHOT, STATE_DIR)


def test_sync_units_verify_score_and_the_timer_is_not_enabled(installed: Guest) -> None:
    # man-db is in the guest, so the Documentation=man: pages are looked up too.
    for unit in (SYNC, TIMER):
        verify = installed.run("systemd-analyze", "verify", unit)
        assert "relaymilter" not in verify.stdout + verify.stderr, verify
    timer = installed.run("systemctl", "cat", TIMER).stdout
    assert re.search(r"(?m)^OnUnitActiveSec=5min$", timer), timer
    assert re.search(r"(?m)^RandomizedDelaySec=30s$", timer), timer
    # Installed, not enabled, not started: a configuration without sources:
    # would fail every run.
    enabled = installed.run("systemctl", "is-enabled", TIMER, check=False).stdout.strip()
    assert enabled == "disabled"
    assert installed.prop(TIMER, "ActiveState") == "inactive"
    # Only the timer starts the service: it has no [Install] section.
    static = installed.run("systemctl", "is-enabled", SYNC, check=False).stdout.strip()
    assert static == "static"
    assert installed.prop(SYNC, "ActiveState") == "inactive"  # not run on install

    output = installed.run("systemd-analyze", "security", "--no-pager", SYNC).stdout
    match = re.search(rf"Overall exposure level for {SYNC}: ([0-9.]+)", output)
    assert match, output
    assert float(match.group(1)) <= SYNC_SECURITY_EXPOSURE, output
    capabilities = installed.prop(SYNC, "CapabilityBoundingSet")
    assert capabilities == "cap_chown", capabilities


# Run in place of "relaymilter sync" under the unit's own sandbox (a drop-in
# replaces only ExecStart=): what python-ldap and psycopg need from it.
PROBE = "/usr/local/lib/relaymilter-sync-probe.py"
PROBE_SCRIPT = r"""
import ctypes, errno, grp, mmap, os, tempfile

# libpq opens ~/.postgresql/postgresql.crt unless it is missing: a home it
# may not read (ProtectHome=yes) fails every connection; an empty one does not.
try:
    os.stat("/root/.postgresql/postgresql.crt")
except OSError as exc:
    assert exc.errno == errno.ENOENT, exc
# MemoryDenyWriteExecute=yes is in force...
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise AssertionError("a W+X mapping was allowed")
except PermissionError:
    pass
# ...and still a C library can call back into Python (libffi closures: how
# psycopg's libpq binding gets libpq's notices).
libc = ctypes.CDLL(None)
compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
values = (ctypes.c_int * 3)(3, 1, 2)
def by_value(a, b):
    return ctypes.c_int.from_address(a).value - ctypes.c_int.from_address(b).value
libc.qsort(values, 3, ctypes.sizeof(ctypes.c_int), compare(by_value))
assert list(values) == [1, 2, 3], list(values)
# Root with CAP_CHOWN alone: a file in /etc/relaymilter gets the relaymilter group.
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines())
assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == 1 << 0, status
assert os.geteuid() == 0
handle, path = tempfile.mkstemp(dir="/etc/relaymilter")
try:
    os.fchown(handle, 0, grp.getgrnam("relaymilter").gr_gid)
finally:
    os.close(handle)
    os.unlink(path)
# Nothing else is writable.
for directory in ("/etc", "/usr/local/lib"):
    try:
        tempfile.mkstemp(dir=directory)
        raise AssertionError(f"{directory} is writable")
    except OSError as exc:
        assert exc.errno == errno.EROFS, exc
print("probe: all checks passed")
"""


def test_the_sandbox_lets_the_source_libraries_work(installed: Guest) -> None:
    installed.write(PROBE, PROBE_SCRIPT)
    installed.run("mkdir", "-p", SYNC_DROP_INS)
    installed.write(
        f"{SYNC_DROP_INS}/probe.conf",
        f"[Service]\nExecStart=\nExecStart=/usr/bin/python3 {PROBE}\n",
    )
    installed.run("systemctl", "daemon-reload")
    try:
        mark = installed.mark()
        result = start_sync(installed)
        log = sync_log(installed, mark)
        assert result == 0 and "probe: all checks passed" in log, log
    finally:
        installed.run("rm", "-rf", SYNC_DROP_INS, PROBE)
        installed.run("systemctl", "daemon-reload")
        installed.run("systemctl", "reset-failed", SYNC, check=False)


def test_sync_writes_the_snapshot_the_running_daemon_reloads(sources: Guest) -> None:
    guest = sources
    # The first snapshot: the daemon cannot load a sources: config without one.
    assert start_sync(guest) == 0, sync_result(guest)
    assert sync_result(guest) == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
    }
    # The configuration's owner, group and mode, for the snapshot and the status.
    assert stat(guest, SNAPSHOT) == ["640", "root", "relaymilter"]
    assert stat(guest, STATUS) == ["640", "root", "relaymilter"]
    assert stat(guest, STATE_DIR) == ["755", "root", "root"]  # StateDirectory=
    status = json.loads(guest.read(STATUS))
    assert status["last_error"] is None and status["sources"]["fragments"]["organizations"] == 1
    assert "fabrikam.com" in guest.read(SNAPSHOT)
    # UMask=0077: the lock file is root's alone.
    assert stat(guest, f"{STATUS}.lock") == ["600", "root", "root"]

    restart(guest, UNIT)
    assert state(guest) == "active/running"
    pid = main_pid(guest)
    refused = milter_replies(guest, ["<someone@example.org>"], client=FABRIKAM_IP, sender=SENDER)
    assert refused[0].startswith(REJECT), refused  # fabrikam.net is not fabrikam's yet

    # A new domain in the source: sync writes a new snapshot, and the daemon
    # notices the new file (it looks every 2 s) and reloads it by itself.
    guest.write(FRAGMENT, fragment("fabrikam.com", "fabrikam.net"))
    mark = guest.mark()
    assert start_sync(guest) == 0, sync_log(guest, mark)
    assert "changed fabrikam: 1 domain added (fabrikam.net)" in sync_log(guest, mark)
    wait_for_log(guest, mark, f"snapshot: {SNAPSHOT} was replaced; reloading", pid)
    wait_for_log(guest, mark, "reload: loaded", pid)
    assert main_pid(guest) == pid and state(guest) == "active/running"
    replies = milter_replies(guest, ["<someone@example.org>"], client=FABRIKAM_IP, sender=SENDER)
    assert replies == ["continue"], replies
    # The status line (STATUS=) tells the snapshot's age.
    status_text = guest.prop(UNIT, "StatusText")
    assert re.search(r"snapshot \d+s old", status_text), status_text
    assert stat(guest, SNAPSHOT) == ["640", "root", "relaymilter"]

    # The daemon's user reads the snapshot and the status file, and nothing
    # of the sources' secrets; it cannot change what the sync wrote.
    assert as_service_user(guest, "cat", SNAPSHOT) == 0
    assert as_service_user(guest, "cat", STATUS) == 0
    assert as_service_user(guest, "cat", PASSWORD_FILE) != 0
    assert as_service_user(guest, "sh", "-c", f": >> {SNAPSHOT}") != 0
    assert as_service_user(guest, "touch", "/etc/relaymilter/another.yml") != 0
    # Another sync (an admin's) holds the lock: this run does nothing, and
    # that is no failure (SuccessExitStatus=75).
    busy = guest.mark()
    held = guest.run("flock", "-n", f"{STATUS}.lock", "systemctl", "start", SYNC, check=False)
    assert held.returncode == 0, held
    assert guest.props(SYNC, "ActiveState", "Result") == {
        "ActiveState": "inactive",
        "Result": "success",
    }
    assert "another sync is running" in sync_log(guest, busy)
    # No error or warning from the daemon along the way.
    problems = [e["MESSAGE"] for e in unit_log(guest, mark) if int(e.get("PRIORITY", "6")) <= 4]
    assert problems == []


def test_a_failing_sync_fails_the_unit_and_keeps_the_snapshot(sources: Guest) -> None:
    guest = sources
    assert start_sync(guest) == 0
    before = guest.run("stat", "-c", "%i %Y", SNAPSHOT).stdout
    content = guest.read(SNAPSHOT)
    guest.write(FRAGMENT, fragment("fabrikam.com", "not a domain!"))
    mark = guest.mark()
    assert start_sync(guest) != 0
    assert sync_result(guest) == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "1",
    }
    log = sync_log(guest, mark)
    assert "failed, the snapshot is unchanged" in log, log
    assert guest.run("stat", "-c", "%i %Y", SNAPSHOT).stdout == before
    assert guest.read(SNAPSHOT) == content
    status = json.loads(guest.read(STATUS))
    assert status["last_error"], status
    # relaymilter sync --status says so too (exit 1).
    shown = guest.run("relaymilter", "sync", "--status", check=False)
    assert shown.returncode == 1, shown


def test_the_sync_needs_cap_chown_and_no_other_capability(sources: Guest) -> None:
    guest = sources
    # With the unit's sandbox as shipped, the sync works (the tests above);
    # without CAP_CHOWN it cannot give the snapshot the relaymilter group.
    guest.run("mkdir", "-p", SYNC_DROP_INS)
    guest.write(f"{SYNC_DROP_INS}/no-capabilities.conf", "[Service]\nCapabilityBoundingSet=\n")
    guest.run("systemctl", "daemon-reload")
    assert guest.prop(SYNC, "CapabilityBoundingSet") == ""
    mark = guest.mark()
    assert start_sync(guest) != 0
    log = sync_log(guest, mark)
    assert "Operation not permitted" in log, log
    assert not guest.exists(SNAPSHOT)
    guest.run("rm", "-rf", SYNC_DROP_INS)
    guest.run("systemctl", "daemon-reload")
    assert guest.prop(SYNC, "CapabilityBoundingSet") == "cap_chown"
    assert start_sync(guest) == 0, sync_log(guest, mark)
    assert stat(guest, SNAPSHOT) == ["640", "root", "relaymilter"]
