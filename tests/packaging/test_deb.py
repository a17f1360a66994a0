"""The .deb: built lintian-clean here; installed, run, upgraded and purged only in a guest.

The package file is checked on this machine (build, lintian, metadata,
contents), and by each release's own lintian. Everything that installs it runs
inside the throwaway Debian 12 and Debian 13 guests of conftest.py (each
release's systemd as PID 1, see container.py): this machine's
own packages, users and services are never touched, and an admin's installed
relaymilter is never purged. The daemon runs there as systemd runs it, under
the shipped unit and its sandbox. test_unit.py checks the unit's behaviour
under systemd (readiness, reload, stop, journal, watchdog).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import pytest

from ..support import REPO
from . import dependencies
from .conftest import (
    APT_INSTALL,
    CONF,
    GUEST_DEB,
    TEST_DROP_INS,
    Build,
    milter_replies,
    package_status,
    restart,
    run,
    unit_log,
    wait_for_log,
)
from .container import Guest
from .test_policy_unit import POLICY, REFUSAL, SOCKET_PATH, SOCKET_UNIT, ask

pytestmark = pytest.mark.packaging

UNIT = "/usr/lib/systemd/system/relaymilter.service"
CHROOT_DIR = "/var/spool/postfix/relaymilter"
# Every file the package installs, and where; checked again after purge.
INSTALLED_PATHS = [
    "/usr/bin/relaymilter",
    CONF,
    UNIT,
    "/usr/lib/systemd/system/relaymilter-sync.service",
    "/usr/lib/systemd/system/relaymilter-sync.timer",
    "/usr/lib/systemd/system/relaymilter-policy.service",
    "/usr/lib/systemd/system/relaymilter-policy.socket",
    "/usr/lib/sysusers.d/relaymilter.conf",
    "/usr/lib/python3/dist-packages/relaymilter/__init__.py",
    "/usr/share/man/man8/relaymilter.8.gz",
    "/usr/share/man/man5/relaymilter.yml.5.gz",
    "/usr/share/doc/relaymilter/copyright",
]
EXAMPLES = {
    "etc/postfix/main.cf.relaymilter": "/usr/share/doc/relaymilter/examples/main.cf.relaymilter",
    "etc/postfix/main.cf.relaymilter-policy": (
        "/usr/share/doc/relaymilter/examples/main.cf.relaymilter-policy"
    ),
    "etc/sendmail/relaymilter.mc": "/usr/share/doc/relaymilter/examples/relaymilter.mc",
    **{
        source: "/usr/share/doc/relaymilter/examples/" + source.rsplit("/", 1)[1]
        for source in (
            "etc/prometheus/relaymilter.rules.yml",
            "etc/grafana/relaymilter.json",
            "etc/systemd/relaymilter-report.service",
            "etc/systemd/relaymilter-report.timer",
            "etc/relaymilter/postgresql-schema.sql",
        )
    },
}
REJECT = "550 5.7.64 "


# -- the package file (on this machine) -----------------------------------------------


def test_build_is_lintian_clean(deb: Build) -> None:
    assert "build-deb: lintian clean" in deb.output
    tags = [line for line in deb.output.splitlines() if re.match(r"[EW]: relaymilter", line)]
    assert tags == []


def test_package_metadata_and_contents(deb: Build) -> None:
    fields = {
        name: run(["dpkg-deb", "-f", str(deb.package), name])
        for name in ("Depends", "Recommends", "Suggests")
    }
    assert "publicsuffix" in {item.strip() for item in fields["Depends"].split(",")}
    # The floor, in the built package: required, recommended (the journal,
    # metrics) or suggested (relaymilter sync's ldap and postgresql sources).
    declared = {item.strip() for value in fields.values() for item in value.split(",")}
    for name, minimum in dependencies.floor().items():
        assert f"{dependencies.NAMES[name][1]} (>= {minimum})" in declared, name
    suggests = {item.strip() for item in fields["Suggests"].split(",")}
    assert {"python3-ldap (>= 3.4.3)", "python3-psycopg (>= 3.1.7)"} <= suggests
    assert run(["dpkg-deb", "-I", str(deb.package), "conffiles"]).split() == [CONF]
    listing = run(["dpkg-deb", "-c", str(deb.package)])
    modes = {line.split()[-1].lstrip("."): line.split()[0] for line in listing.splitlines()}
    for path in INSTALLED_PATHS:
        assert path in modes, path
    # Every module, subpackages too (pyproject.toml lists the packages).
    for module in sorted((REPO / "relaymilter").rglob("*.py")):
        path = f"/usr/lib/python3/dist-packages/{module.relative_to(REPO)}"
        assert path in modes, f"{path} is not in the package"
    assert modes[CONF] == "-rw-r-----"
    assert modes["/usr/bin/relaymilter"] == "-rwxr-xr-x"
    for guide in (
        "README.md",
        "install.md",
        "postfix.md",
        "sendmail.md",
        "sources.md",
        "operations.md",
    ):
        path = f"/usr/share/doc/relaymilter/{guide}"
        assert path in modes or f"{path}.gz" in modes, guide  # dh_compress: if > 4 kB
    for source, installed_path in EXAMPLES.items():
        if (REPO / source).exists():
            assert installed_path in modes, f"{source} is not shipped"


# -- installed in the guest ---------------------------------------------------------------


def test_the_releases_lintian_finds_it_clean(guest: Guest) -> None:
    # The same .deb, checked by each release's own lintian (Debian 13's refuses units
    # under /lib, an aliased location, and override lines for tags it no longer knows).
    result = guest.run(
        "lintian", "--fail-on", "warning,error", "-I", "--pedantic", "--display-experimental",
        GUEST_DEB, check=False, timeout=300,
    )  # fmt: skip
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr


def getent(guest: Guest, database: str, key: str) -> List[str]:
    return guest.run("getent", database, key).stdout.strip().split(":")


def stat(guest: Guest, path: str) -> List[str]:
    """[octal mode, owner, group] of a path in the guest."""
    return guest.run("stat", "-c", "%a %U %G", path).stdout.split()


def test_installs_user_config_unit_and_socket_directory(installed: Guest) -> None:
    user = getent(installed, "passwd", "relaymilter")
    group = getent(installed, "group", "relaymilter")
    assert user[3] == group[2]
    assert user[6].endswith("nologin")
    assert int(user[2]) < 1000, "not a system user"
    for path in INSTALLED_PATHS:
        assert installed.exists(path), path
    assert stat(installed, CONF) == ["640", "root", "relaymilter"]
    assert f"Conffiles:\n {CONF} " in installed.run("dpkg", "-s", "relaymilter").stdout
    # postinst enabled and started it (Postfix is there, so: before Postfix).
    assert installed.run("systemctl", "is-enabled", "relaymilter.service").stdout.strip() == (
        "enabled"
    )
    assert installed.prop("relaymilter.service", "ActiveState") == "active"
    # The socket directory in Postfix's chroot: the guest has Postfix.
    assert stat(installed, CHROOT_DIR) == ["2750", "relaymilter", "postfix"]
    # The policy service is the admin's choice: installed, neither enabled nor
    # started, nothing put in Postfix's private/ directory.
    for unit in (SOCKET_UNIT, POLICY):
        enabled = installed.run("systemctl", "is-enabled", unit, check=False).stdout.strip()
        assert enabled == "disabled", unit
        assert installed.prop(unit, "ActiveState") == "inactive", unit
    assert not installed.exists(SOCKET_PATH)


def test_check_config_as_the_service_user(installed: Guest) -> None:
    as_service_user = ["runuser", "-u", "relaymilter", "--", "/usr/bin/relaymilter"]
    result = installed.run(*as_service_user, "check-config")
    assert f"{CONF}: OK" in result.stdout + result.stderr
    # What ExecReload's first line does with a broken file: fail, and say why.
    installed.sh(
        "install -d -m 0755 /tmp/relaymilter-test"
        " && printf 'organizations: [{name: x}]\\n' > /tmp/relaymilter-test/broken.yml"
        " && chmod 0644 /tmp/relaymilter-test/broken.yml"
    )
    result = installed.run(
        *as_service_user, "check-config", "-c", "/tmp/relaymilter-test/broken.yml", check=False
    )
    assert result.returncode == 1
    assert "accepted_domains" in result.stderr + result.stdout


def process_status(guest: Guest, pid: str) -> Dict[str, str]:
    text = guest.read(f"/proc/{pid}/status")
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def exercise(guest: Guest) -> str:
    """Decisions, a watchdog ping, a reload and a stop of the running unit; its main PID.

    Fails if the daemon logged an error or did not stop cleanly.
    """
    pid = guest.prop("relaymilter.service", "MainPID")
    mark = guest.mark()
    replies = milter_replies(guest, ["<someone@example.org>", "<user@contoso.com>"])
    assert replies[0].startswith(REJECT) and replies[1] == "continue", replies
    # The first ping comes at start, after a milter negotiation on the socket.
    assert guest.prop("relaymilter.service", "WatchdogTimestampMonotonic") != "0"
    guest.run("systemctl", "reload", "relaymilter.service")
    wait_for_log(guest, mark, "reload: loaded", pid)
    guest.run("systemctl", "stop", "relaymilter.service")
    result = guest.props("relaymilter.service", "Result", "ExecMainCode", "ExecMainStatus")
    assert result == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, result
    entries = unit_log(guest, mark)
    problems = [e["MESSAGE"] for e in entries if int(e.get("PRIORITY", "6")) <= 4]
    assert problems == []
    assert any("action=reject" in e.get("MESSAGE", "") for e in entries)
    return pid


def test_installed_daemon_serves_as_the_service_user(service: Guest) -> None:
    uid = getent(service, "passwd", "relaymilter")[2]
    gid = getent(service, "group", "relaymilter")[2]
    pid = service.prop("relaymilter.service", "MainPID")
    status = process_status(service, pid)
    assert status["Uid"].split() == [uid] * 4
    assert status["Gid"].split() == [gid] * 4
    assert status["Groups"].split() == [gid]
    assert status["CapEff"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is installed: the unit's
    listeners = service.run("ss", "-H", "-l", "-t", "-n", "-p", "sport = :8894").stdout
    assert f'(("relaymilter",pid={pid},' in listeners, listeners
    exercise(service)


def test_installed_daemon_serves_on_a_unix_socket_in_postfix_chroot(service: Guest) -> None:
    # relaymilter(8), "POSTFIX CHROOT": the socket directory postinst made, in
    # spite of ProtectSystem=strict (ReadWritePaths= in the unit).
    path = f"{CHROOT_DIR}/relaymilter.sock"
    text = service.read(CONF)
    assert "\nsocket: inet:8894@127.0.0.1\n" in text
    service.write(CONF, text.replace("\nsocket: inet:8894@127.0.0.1\n", f"\nsocket: unix:{path}\n"))
    restart(service)
    # Set-group-ID directory: the socket is in Postfix's group, 0660.
    info = service.run("stat", "-c", "%a %U %G %F", path).stdout.strip().split(maxsplit=3)
    assert info == ["660", "relaymilter", "postfix", "socket"], info
    replies = milter_replies(service, ["<someone@example.org>"], socket=f"unix:{path}")
    assert replies[0].startswith(REJECT), replies
    service.run("systemctl", "stop", "relaymilter.service")
    assert not service.exists(path), "the socket outlived the daemon"


def test_installed_daemon_runs_without_writable_executable_memory(service: Guest) -> None:
    # MemoryDenyWriteExecute=yes works in this guest: it refuses a W+X mapping
    # that is allowed without it.
    wx = (
        "import mmap; mmap.mmap(-1, 4096,"
        " prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC); print('mapped')"
    )
    transient = ["systemd-run", "--wait", "--pipe", "--quiet"]
    allowed = service.run(*transient, "python3", "-c", wx, check=False)
    assert allowed.stdout.strip() == "mapped", allowed.stderr
    refused = service.run(
        *transient, "-p", "MemoryDenyWriteExecute=yes", "python3", "-c", wx, check=False
    )
    assert refused.returncode != 0 and "PermissionError" in refused.stderr, refused
    assert service.prop("relaymilter.service", "MemoryDenyWriteExecute") == "yes"
    # The daemon, under it, does everything without an error.
    exercise(service)


def test_installed_daemon_needs_no_system_call_the_unit_forbids(service: Guest) -> None:
    # The unit answers a forbidden call with EPERM (SystemCallErrorNumber=).
    # Here a drop-in makes systemd kill the process instead (SIGSYS), so that
    # a forbidden call cannot go unnoticed; the filter itself is the unit's.
    service.run("mkdir", "-p", TEST_DROP_INS)
    service.write(
        f"{TEST_DROP_INS}/kill-on-forbidden-call.conf", "[Service]\nSystemCallErrorNumber=\n"
    )
    service.run("systemctl", "daemon-reload")
    assert service.prop("relaymilter.service", "SystemCallErrorNumber") != "1"  # not EPERM
    # Such a filter does kill in this guest: @resources is forbidden.
    renice = "import os; os.setpriority(os.PRIO_PROCESS, 0, 1); print('reniced')"
    killed = service.run(
        "systemd-run",
        "--wait",
        "--pipe",
        "-p",
        "SystemCallFilter=@system-service",
        "-p",
        "SystemCallFilter=~@privileged @resources",
        "python3",
        "-c",
        renice,
        check=False,
    )
    # systemd 252 says "code=killed/status=SYS", 257 "code=killed, status=31/SYS".
    assert re.search(r"code=killed(/|, )status=(31/)?SYS\b", killed.stderr), killed
    restart(service)
    # Start, decisions, watchdog check, reload (check-config too runs under
    # the filter) and stop, all without SIGSYS.
    exercise(service)


# -- upgrade and purge --------------------------------------------------------------------


def make_upgrade(deb: Path, workdir: Path) -> Path:
    """The same package as version -2, with a changed default configuration (built here)."""
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
    installed: Guest, deb: Build, tmp_path: Path
) -> None:
    edited = installed.read(CONF) + "# edited by the admin\n"
    installed.write(CONF, edited)
    # The admin enabled the policy service's socket, and Postfix has used it.
    installed.run("systemctl", "enable", "--now", SOCKET_UNIT)
    assert ask(installed) == REFUSAL
    policy_pid = installed.prop(POLICY, "MainPID")
    listening_since = installed.prop(SOCKET_UNIT, "ActiveEnterTimestampMonotonic")
    installed.run(*APT_INSTALL, "--reinstall", GUEST_DEB, timeout=300)
    assert installed.read(CONF) == edited

    installed.copy_in(make_upgrade(deb.package, tmp_path), "/root/relaymilter_0.1.0-2_all.deb")
    installed.run(*APT_INSTALL, "/root/relaymilter_0.1.0-2_all.deb", timeout=300)
    assert (package_status(installed) or "").endswith("0.1.0-2")
    assert installed.read(CONF) == edited, "the upgrade replaced an edited config"
    assert "a new default in version -2" in installed.read(f"{CONF}.dpkg-dist")
    assert stat(installed, CONF) == ["640", "root", "relaymilter"]
    # The upgrade restarted the daemon on the edited configuration.
    assert installed.prop("relaymilter.service", "ActiveState") == "active"
    # It restarted the policy service too, on the socket systemd kept
    # listening on all along: Postfix never found it missing.
    assert installed.props(POLICY, "ActiveState", "TriggeredBy") == {
        "ActiveState": "active",
        "TriggeredBy": SOCKET_UNIT,
    }
    assert installed.prop(POLICY, "MainPID") not in ("0", policy_pid)
    assert installed.prop(SOCKET_UNIT, "ActiveEnterTimestampMonotonic") == listening_since
    assert ask(installed) == REFUSAL

    # A leftover of a manual run, as purge may find it.
    installed.sh("mkdir -p /run/relaymilter && touch /run/relaymilter/relaymilter.sock")
    # What relaymilter sync leaves (a snapshot, an interrupted write's
    # temporary file, the status and its lock), and the sync timer, enabled
    # and started by the admin: the removal stops it, the purge disables it.
    installed.sh(
        "touch /etc/relaymilter/relaymilter.snapshot.yml"
        " /etc/relaymilter/.relaymilter.snapshot.yml.x1y2z3"
        " && mkdir -p /var/lib/relaymilter"
        " && touch /var/lib/relaymilter/sync-status.json /var/lib/relaymilter/sync-status.json.lock"
    )
    installed.run("systemctl", "enable", "--now", "relaymilter-sync.timer")
    assert installed.prop("relaymilter-sync.timer", "ActiveState") == "active"
    installed.run("apt-get", "purge", "-y", "-q", "relaymilter", timeout=300)
    assert package_status(installed) is None
    left = [
        path
        for path in [
            *INSTALLED_PATHS,
            "/etc/relaymilter",
            "/etc/systemd/system/multi-user.target.wants/relaymilter.service",
            "/etc/systemd/system/timers.target.wants/relaymilter-sync.timer",
            "/etc/systemd/system/sockets.target.wants/relaymilter-policy.socket",
            SOCKET_PATH,
            "/run/relaymilter-policy",
            "/var/lib/relaymilter",
            "/usr/lib/python3/dist-packages/relaymilter",
            "/usr/share/doc/relaymilter",
            CHROOT_DIR,
            "/run/relaymilter",
        ]
        if installed.run("test", "-e", path, "-o", "-L", path, check=False).returncode == 0
    ]
    assert left == []
    assert installed.prop("relaymilter.service", "LoadState") == "not-found"
    for unit in ("relaymilter-sync.timer", SOCKET_UNIT, POLICY):
        props = installed.props(unit, "LoadState", "ActiveState")
        assert props == {"LoadState": "not-found", "ActiveState": "inactive"}, (unit, props)
    processes = installed.run("pgrep", "-u", "relaymilter", check=False).stdout.split()
    assert processes == []
    # Debian policy: the system user stays (files it owned may remain).
    assert getent(installed, "passwd", "relaymilter")[0] == "relaymilter"
