"""relaymilter.service under a real systemd 252, in the guest of conftest.py.

Readiness (Type=notify), the status text, reload (valid and refused), stop by
SIGUSR2, the journal's fields and priorities, a broken configuration at start,
the watchdog, and what systemd-analyze says about the unit. Every wait is for
a state or a log line, never a fixed time.
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from .conftest import (
    CONF,
    TEST_DROP_INS,
    messages,
    milter_replies,
    restart,
    unit_log,
    wait_for_log,
)
from .container import Guest, wait_for

pytestmark = pytest.mark.packaging

UNIT = "relaymilter.service"
REJECT = "550 5.7.64 "
# systemd-analyze security's exposure for the shipped unit, loaded, on
# systemd 252 (1.4 with --offline=yes). Lower is better; the remaining
# points are justified in the unit's comments.
SECURITY_EXPOSURE = 1.2
# A broken configuration: the daemon and check-config report it as
# "relaymilter.yml:LINE: mode: ...".
BROKEN_MODE = "mode: not-a-mode"


def state(guest: Guest, unit: str = UNIT) -> str:
    props = guest.props(unit, "ActiveState", "SubState")
    return f"{props['ActiveState']}/{props['SubState']}"


def main_pid(guest: Guest, unit: str = UNIT) -> str:
    pid = guest.prop(unit, "MainPID")
    assert pid not in ("", "0"), f"{unit} has no main process ({state(guest, unit)})"
    return pid


@contextlib.contextmanager
def pid1_debug(guest: Guest) -> Iterator[None]:
    """PID 1 at log level debug: it then logs each notification and state change."""
    level = guest.run("systemctl", "log-level").stdout.strip()
    guest.run("systemctl", "log-level", "debug")
    try:
        yield
    finally:
        guest.run("systemctl", "log-level", level)


def notification_pattern(pid: str) -> str:
    """PID 1's debug line for a notification: systemd 252 "from PID 12 (READY=1, …)",
    257 "from PID 12: READY=1, …"; the group is the notification."""
    return rf"Got notification message from PID {pid}(?: \((.*)\)$|: (.*)$)"


def notifications(log: List[str], pid: str) -> List[str]:
    """The sd_notify messages PID 1 got from ``pid``, e.g. "READY=1, STATUS=…"."""
    found = (re.search(notification_pattern(pid), message) for message in log)
    return [match.group(1) or match.group(2) for match in found if match]


def restarted(guest: Guest, unit: str, pid: str) -> Optional[str]:
    """The main PID of ``unit`` once a process other than ``pid`` runs it, else None."""
    props = guest.props(unit, "MainPID", "ActiveState", "SubState")
    new = props["MainPID"]
    running = (props["ActiveState"], props["SubState"]) == ("active", "running")
    return new if running and new not in ("0", pid) else None


def configure(guest: Guest, old: str, new: str) -> int:
    """Edit the installed configuration in place; the line number of the change."""
    text = guest.read(CONF)
    assert old in text, old
    guest.write(CONF, text.replace(old, new, 1))
    start = text.index(old) + len(old) - len(old.lstrip("\n"))
    return text[:start].count("\n") + 1


def test_unit_passes_systemd_analyze_verify_and_security(installed: Guest) -> None:
    # man-db is in the guest, so the Documentation=man: pages are looked up too.
    verify = installed.run("systemd-analyze", "verify", UNIT)
    assert "relaymilter" not in verify.stdout + verify.stderr, verify
    for args in ([UNIT], ["--offline=yes", f"/usr/lib/systemd/system/{UNIT}"]):
        output = installed.run("systemd-analyze", "security", "--no-pager", *args).stdout
        match = re.search(r"Overall exposure level for relaymilter.service: ([0-9.]+)", output)
        assert match, output
        limit = SECURITY_EXPOSURE if args == [UNIT] else SECURITY_EXPOSURE + 0.2
        assert float(match.group(1)) <= limit, output


def test_start_waits_for_ready_and_sets_the_status(service: Guest) -> None:
    service.run("systemctl", "stop", UNIT)
    with pid1_debug(service):
        mark = service.mark()
        # For Type=notify, "systemctl start" returns once READY=1 has come.
        service.run("systemctl", "start", UNIT)
        assert state(service) == "active/running"
    pid = main_pid(service)
    log = [e["MESSAGE"] for e in unit_log(service, mark)]

    def first(pattern: str) -> int:
        found = [i for i, message in enumerate(log) if re.search(pattern, message)]
        assert found, f"no {pattern!r} in:\n" + "\n".join(log)
        return found[0]

    listening = first(r"^listening on inet:8894@127\.0\.0\.1: 1 organization")
    ready = first(
        rf"Got notification message from PID {pid}(?: \(|: )READY=1, STATUS=1 organization"
    )
    running = first(r"Changed start -> running")
    started = first(r"^Started relaymilter\.service")
    assert first(r"Changed dead -> start") < listening < ready <= running < started
    status = service.prop(UNIT, "StatusText")
    assert status.startswith("1 organization, 2 accepted domains"), status
    assert "mode enforce" in status and "0 decisions" in status, status


def test_reload_applies_a_valid_config_in_the_same_process(service: Guest) -> None:
    pid = main_pid(service)
    assert milter_replies(service, ["<someone@example.org>"])[0].startswith(REJECT)
    configure(service, "\nmode: enforce\n", "\nmode: monitor\n")
    with pid1_debug(service):
        mark = service.mark()
        service.run("systemctl", "reload", UNIT)
        wait_for_log(service, mark, "reload: loaded", pid)

        def reloading_then_ready() -> Optional[List[str]]:
            sent = notifications(messages(unit_log(service, mark)), pid)
            reloading = [i for i, n in enumerate(sent) if n.startswith("RELOADING=1")]
            ready = [i for i, n in enumerate(sent) if n.startswith("READY=1")]
            return sent if reloading and ready and reloading[0] < ready[-1] else None

        wait_for(reloading_then_ready, 10, "RELOADING=1, then READY=1", interval=0.1)
    assert main_pid(service) == pid and state(service) == "active/running"
    # READY=1 follows the swap: the status line already names the new config.
    assert "mode monitor" in service.prop(UNIT, "StatusText")
    # monitor: the same transaction is now accepted (and logged would-reject).
    assert milter_replies(service, ["<someone@example.org>"]) == ["continue"]
    wait_for_log(service, mark, "action=would-reject", pid)


def refuse_a_reload(guest: Guest) -> Tuple[str, str, int]:
    """A reload with a broken configuration; the main PID, the journal mark and the line."""
    pid = main_pid(guest)
    line = configure(guest, "\nmode: enforce\n", f"\n{BROKEN_MODE}\n")
    mark = guest.mark()
    result = guest.run("systemctl", "reload", UNIT, check=False)
    assert result.returncode != 0, "a broken configuration was reloaded"
    return pid, mark, line


def test_reload_refuses_a_broken_config_and_keeps_the_old_one(service: Guest) -> None:
    pid, mark, line = refuse_a_reload(service)
    assert main_pid(service) == pid and state(service) == "active/running"
    log = [e["MESSAGE"] for e in unit_log(service, mark)]
    # check-config (ExecReload=) said why; the daemon was never signalled.
    assert any(f"{CONF}:{line}: mode: must be one of" in m for m in log), log
    assert not [m for m in log if m.startswith("reload:")], log
    assert milter_replies(service, ["<someone@example.org>"])[0].startswith(REJECT)
    assert "mode enforce" in service.prop(UNIT, "StatusText")


def test_refused_reload_reasons_are_warnings_in_the_journal(service: Guest) -> None:
    # "journalctl -p warning" shows why, not only systemd's "Reload failed".
    # check-config marks its lines with sd-daemon prefixes (<3>, <4>) when
    # its output is the journal; systemd's SyslogLevelPrefix=yes makes
    # them the entries' priorities.
    _, mark, line = refuse_a_reload(service)
    shown = service.journal(mark, "-u", UNIT, "-p", "warning", "-o", "cat")
    assert f"{CONF}:{line}: mode: must be one of" in shown, shown


def test_decisions_reach_the_journal_with_fields_and_priority(service: Guest) -> None:
    uid = service.run("id", "-u", "relaymilter").stdout.strip()
    mark = service.mark()
    replies = milter_replies(service, ["<someone@example.org>"], queue_id="4JournalQ1")
    assert replies[0].startswith(REJECT)

    def rejected() -> Optional[List[Dict[str, str]]]:
        entries = unit_log(service, mark, "RELAYMILTER_ACTION=reject")
        return entries or None

    entry = wait_for(rejected, 10, "the reject entry in the journal", interval=0.1)[0]
    expected = {
        "PRIORITY": "6",
        "SYSLOG_FACILITY": "2",
        "SYSLOG_IDENTIFIER": "relaymilter",
        "_SYSTEMD_UNIT": UNIT,
        "_UID": uid,
        "_TRANSPORT": "journal",  # the native protocol, not the stderr stream
        "RELAYMILTER_ACTION": "reject",
        "RELAYMILTER_REASON": "attr36",
        "RELAYMILTER_CLIENT_ADDRESS": "192.0.2.10",
        "RELAYMILTER_ORGANIZATION": "contoso",
        "RELAYMILTER_CONNECTOR": "onprem-ip",
        "RELAYMILTER_KIND": "ip",
        "RELAYMILTER_RECIPIENT": "someone@example.org",
        "RELAYMILTER_QUEUE_ID": "4JournalQ1",
    }
    assert {key: entry.get(key) for key in expected} == expected
    assert "app@example.net" in entry.get("RELAYMILTER_SENDER", "")
    assert entry["MESSAGE"].startswith("decision ")


def test_stop_is_prompt_by_sigusr2(service: Guest) -> None:
    pid = main_pid(service)
    with pid1_debug(service):
        mark = service.mark()
        started = time.monotonic()
        service.run("systemctl", "stop", UNIT)
        elapsed = time.monotonic() - started

        def stopping() -> Optional[List[str]]:
            sent = notifications(messages(unit_log(service, mark)), pid)
            return sent if any(n.startswith("STOPPING=1") for n in sent) else None

        wait_for(stopping, 10, "STOPPING=1", interval=0.1)
    # libmilter's own SIGTERM handling would take up to 5 s.
    assert elapsed < 2.5, f"systemctl stop took {elapsed:.2f} s"
    result = service.props(UNIT, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    assert result == {
        "Result": "success",
        "ExecMainCode": "1",  # exited (not killed)
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }
    log = messages(unit_log(service, mark))
    assert "stopping (SIGUSR2)" in log, log
    assert not [m for m in log if "SIGKILL" in m or "Killing" in m], log
    assert not service.exists("/run/relaymilter")  # RuntimeDirectory= removed
    assert service.run("pgrep", "-u", "relaymilter", check=False).stdout == ""


def test_broken_config_at_start_fails_without_restarting(service: Guest) -> None:
    # "relaymilter run" exits 78 (EX_CONFIG) on a configuration error, and
    # RestartPreventExitStatus=78 keeps Restart=on-failure from retrying a
    # start that cannot succeed: the unit ends "failed", with the reason.
    line = configure(service, "\nmode: enforce\n", f"\n{BROKEN_MODE}\n")
    mark = service.mark()
    result = restart(service, UNIT, check=False)
    assert result.returncode != 0
    # Restart=on-failure would have put it in activating/auto-restart at once.
    props = service.props(UNIT, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {
        "ActiveState": "failed",
        "SubState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }, props
    reason = f"{CONF}:{line}: mode: must be one of"
    status = service.run("systemctl", "status", "--no-pager", "-n", "20", UNIT, check=False)
    assert status.returncode == 3 and "Active: failed" in status.stdout, status.stdout
    assert reason in status.stdout, status.stdout
    shown = service.journal(mark, "-u", UNIT, "-p", "err", "-o", "cat")
    assert reason in shown, shown


def test_watchdog_restarts_a_daemon_that_stopped_answering(service: Guest) -> None:
    # WatchdogSec=20s as shipped: a frozen daemon sends no WATCHDOG=1, systemd
    # kills it with SIGABRT and Restart=on-failure starts a new one (~24 s).
    # No core file of that SIGABRT, though (the kernel's core_pattern is the
    # host's).
    service.run("mkdir", "-p", TEST_DROP_INS)
    service.write(f"{TEST_DROP_INS}/no-core.conf", "[Service]\nLimitCORE=0\n")
    service.run("systemctl", "daemon-reload")
    restart(service, UNIT)
    pid = main_pid(service)
    assert int(pid) > 1
    restarts = int(service.prop(UNIT, "NRestarts"))
    mark = service.mark()
    service.run("kill", "-STOP", pid)

    wait_for(lambda: restarted(service, UNIT, pid), 60, "a watchdog restart", interval=0.2)
    log = [e["MESSAGE"] for e in unit_log(service, mark)]
    assert any("Watchdog timeout" in m for m in log), log
    assert any("SIGABRT" in m for m in log), log
    assert any("Failed with result 'watchdog'" in m for m in log), log
    assert int(service.prop(UNIT, "NRestarts")) == restarts + 1
    assert service.run("kill", "-0", pid, check=False).returncode != 0, "the old daemon lives"
    assert milter_replies(service, ["<someone@example.org>"])[0].startswith(REJECT)
