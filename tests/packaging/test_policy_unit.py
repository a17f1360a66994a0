"""relaymilter-policy.socket and .service under the release's systemd, in the guest of conftest.py.

The admin's step (``systemctl enable --now relaymilter-policy.socket``) makes
systemd listen in Postfix's private/ directory, with Postfix's owner; the first
request, sent as the postfix user as smtpd would, starts the service, which
answers it under the shipped unit and configuration. Then: readiness and
status, reload (valid and refused), a broken configuration at start, stop,
the watchdog, the system-call filter while serving, what systemd-analyze says, and a host
without Postfix. Every wait is for a state, a reply or a log line, never a
fixed time.

The service runs as the relaymilter user, as the milter does: every test of
this module leaves it stopped and the socket disabled (test_unit.py checks
that no relaymilter process outlives the milter's stop).
"""

from __future__ import annotations

import re
import time
from typing import Dict, Iterator, List, Optional

import pytest

from ..support import PolicyClient
from .conftest import CONF, SHIPPED_CONF, restore_shipped
from .container import Guest, wait_for
from .test_unit import (
    BROKEN_MODE,
    SECURITY_EXPOSURE,
    configure,
    notifications,
    pid1_debug,
    restarted,
)
from .test_unit import UNIT as MILTER
from .test_unit import main_pid as unit_main_pid
from .test_unit import state as unit_state

pytestmark = pytest.mark.packaging

POLICY = "relaymilter-policy.service"
SOCKET_UNIT = "relaymilter-policy.socket"
SOCKET_PATH = "/var/spool/postfix/private/relaymilter-policy"
POLICY_DROP_INS = f"/run/systemd/system/{POLICY}.d"
#: The shipped configuration's refusal (Exchange Online's own text).
REFUSAL = (
    "550 5.7.64 Relay Access Denied ATTR36."
    " For more details please refer to https://support.microsoft.com/kb/3169958."
)
#: A bounce from an address of the shipped configuration's IP connector (contoso).
BOUNCE = {
    "protocol_state": "RCPT",
    "client_address": "192.0.2.10",
    "sender": "",
    "recipient": "kate@tailspintoys.com",
    "instance": "x",
}

# Postfix's side, run in the guest as a given user: the request on stdin, the
# reply (or the error) on stdout.
GUEST_CLIENT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(30)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print(f"connect: {exc.strerror}")
    sys.exit(1)
sock.sendall(sys.stdin.buffer.read())
reply = b""
while not reply.endswith(b"\n\n"):
    chunk = sock.recv(4096)
    if not chunk:
        break
    reply += chunk
print(reply.decode(), end="")
"""


def request_text(attributes: Dict[str, str]) -> str:
    lines = ["request=smtpd_access_policy", *(f"{k}={v}" for k, v in attributes.items())]
    return "\n".join(lines) + "\n\n"


def ask_as(guest: Guest, user: str, attributes: Dict[str, str] = BOUNCE) -> str:
    """One request from inside the guest as ``user``; the reply line, or why it failed."""
    result = guest.run(
        "runuser", "-u", user, "--", "python3", "-c", GUEST_CLIENT, SOCKET_PATH,
        input=request_text(attributes), check=False, timeout=60,
    )  # fmt: skip
    return result.stdout.strip()


def ask(guest: Guest, attributes: Dict[str, str] = BOUNCE) -> str:
    """One request over the socket (as root, through the guest's root); the action.

    Starts the service if it is not running: systemd holds the connection
    until it answers.
    """
    client = PolicyClient(f"unix:/proc/{guest.leader}/root{SOCKET_PATH}", timeout=30)
    try:
        return client.request(**attributes)
    finally:
        client.close()


def state(guest: Guest, unit: str = POLICY) -> str:
    return unit_state(guest, unit)


def main_pid(guest: Guest) -> str:
    return unit_main_pid(guest, POLICY)


def policy_log(guest: Guest, mark: str, *args: str) -> List[Dict[str, str]]:
    return guest.journal_entries(mark, "-u", POLICY, *args)


def policy_messages(guest: Guest, mark: str, pid: Optional[str] = None) -> List[str]:
    return [
        str(e.get("MESSAGE", ""))
        for e in policy_log(guest, mark)
        if pid is None or e.get("_PID") == pid
    ]


def wait_for_policy_log(guest: Guest, mark: str, text: str, pid: str) -> List[str]:
    def logged() -> Optional[List[str]]:
        found = policy_messages(guest, mark, pid)
        return found if any(text in message for message in found) else None

    return wait_for(logged, 15, f"{text!r} from PID {pid}", interval=0.1)


def stop_policy(guest: Guest) -> None:
    # systemctl warns on stderr that the socket can start it again: so it should.
    guest.run("systemctl", "stop", POLICY)
    guest.run("systemctl", "reset-failed", POLICY, check=False)


@pytest.fixture(scope="module", autouse=True)
def leave_nothing_running(guest: Guest) -> Iterator[None]:
    """After the module: the policy units disabled and stopped, the shipped configuration."""
    yield
    if guest.exists(POLICY_DROP_INS):
        guest.run("rm", "-rf", POLICY_DROP_INS)
        guest.run("systemctl", "daemon-reload")
    guest.run("systemctl", "disable", "--now", SOCKET_UNIT, POLICY, check=False)
    guest.run("systemctl", "reset-failed", SOCKET_UNIT, POLICY, check=False)
    # The milter still runs on the shipped file it loaded: put it back only.
    if guest.exists(SHIPPED_CONF) and guest.read(CONF) != guest.read(SHIPPED_CONF):
        guest.write(CONF, guest.read(SHIPPED_CONF))


@pytest.fixture
def policy(installed: Guest) -> Guest:
    """relaymilter-policy.socket enabled and listening, with the shipped units and configuration.

    Undoes what earlier tests left: drop-ins, an edited configuration, a
    failed unit. The service is stopped if any of that had changed, so that
    the next request starts it on the shipped files.
    """
    guest = installed
    changed = restore_shipped(guest, POLICY_DROP_INS)
    if changed or guest.prop(POLICY, "ActiveState") not in ("active", "inactive"):
        stop_policy(guest)
    guest.run("systemctl", "reset-failed", SOCKET_UNIT, check=False)
    guest.run("systemctl", "enable", "--now", SOCKET_UNIT)
    assert state(guest, SOCKET_UNIT) in ("active/listening", "active/running")
    return guest


def test_the_units_verify_and_score_as_the_milters_unit(installed: Guest) -> None:
    # man-db is in the guest, so the Documentation=man: pages are looked up too.
    verify = installed.run("systemd-analyze", "verify", SOCKET_UNIT, POLICY)
    assert "relaymilter" not in verify.stdout + verify.stderr, verify
    scores = {}
    tables = {}
    for unit in (MILTER, POLICY):
        output = installed.run("systemd-analyze", "security", "--no-pager", unit).stdout
        match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", output)
        assert match, output
        scores[unit] = float(match.group(1))
        tables[unit] = [line for line in output.splitlines() if "Overall exposure" not in line]
    assert scores[POLICY] == scores[MILTER] <= SECURITY_EXPOSURE, scores
    # Not only the sum: every check systemd makes comes out the same.
    assert tables[POLICY] == tables[MILTER]


def test_the_socket_is_postfixs_and_a_request_starts_the_service(policy: Guest) -> None:
    guest = policy
    stop_policy(guest)
    assert state(guest) == "inactive/dead"
    # systemd made it in Postfix's private/ directory (0700 postfix), with
    # Postfix's owner: smtpd, running as postfix, may connect.
    info = guest.run("stat", "-c", "%a %U %G %F", SOCKET_PATH).stdout.strip().split(maxsplit=3)
    assert info == ["660", "postfix", "postfix", "socket"], info
    check = guest.run("postfix", "check", check=False)
    assert check.returncode == 0 and "relaymilter" not in check.stdout + check.stderr, check

    with pid1_debug(guest):
        mark = guest.mark()
        # smtpd's request, as the postfix user: answered by a service that
        # was not running until now.
        assert ask_as(guest, "postfix") == f"action={REFUSAL}"
        pid = main_pid(guest)
        assert state(guest) == "active/running"
        log = policy_messages(guest, mark)
    # The service's own user could not even reach it: private/ is Postfix's.
    assert ask_as(guest, "relaymilter") == "connect: Permission denied"

    # Readiness: READY=1, with the status, once the service listened on the
    # socket systemd passed; only then did the unit become active.
    def first(pattern: str) -> int:
        found = [i for i, message in enumerate(log) if re.search(pattern, message)]
        assert found, f"no {pattern!r} in:\n" + "\n".join(log)
        return found[0]

    triggered = first(r"Changed dead -> start")
    listening = first(rf"^listening on unix:{SOCKET_PATH}: 1 organization")
    ready = first(rf"Got notification message from PID {pid}(?: \(|: )READY=1")
    running = first(r"Changed start -> running")
    assert triggered < listening < ready <= running, log
    sent = [n for n in notifications(log, pid) if n.startswith("READY=1")]
    assert "STATUS=1 organization, 2 accepted domains" in sent[0], sent
    status = guest.prop(POLICY, "StatusText")
    assert status.startswith("1 organization, 2 accepted domains"), status
    assert "mode enforce" in status and "decisions" in status, status
    props = guest.props(POLICY, "TriggeredBy", "NRestarts", "WatchdogTimestampMonotonic")
    assert props["TriggeredBy"] == SOCKET_UNIT and props["NRestarts"] == "0", props
    # The first watchdog ping comes at start, after the event loop answered.
    assert props["WatchdogTimestampMonotonic"] != "0", props

    # The decision, in the journal as the milter's are.
    (entry,) = policy_log(guest, mark, "RELAYMILTER_ACTION=reject")
    expected = {
        "_SYSTEMD_UNIT": POLICY,
        "RELAYMILTER_REASON": "attr36",
        "RELAYMILTER_CLIENT_ADDRESS": "192.0.2.10",
        "RELAYMILTER_ORGANIZATION": "contoso",
        "RELAYMILTER_CONNECTOR": "onprem-ip",
        "RELAYMILTER_RECIPIENT": "kate@tailspintoys.com",
    }
    assert {key: entry.get(key) for key in expected} == expected

    # As the milter: its own user, no capabilities, the unit's seccomp filter.
    uid = guest.run("id", "-u", "relaymilter").stdout.strip()
    text = guest.read(f"/proc/{pid}/status")
    status_fields = {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}
    assert status_fields["Uid"].split() == [uid] * 4
    assert status_fields["CapEff"] == status_fields["CapBnd"] == "0000000000000000"
    assert status_fields["NoNewPrivs"] == "1" and status_fields["Seccomp"] == "2"


def test_reload_applies_a_valid_config_and_refuses_a_broken_one(policy: Guest) -> None:
    guest = policy
    assert ask(guest, BOUNCE) == REFUSAL
    pid = main_pid(guest)
    configure(guest, "\nmode: enforce\n", "\nmode: monitor\n")
    with pid1_debug(guest):
        mark = guest.mark()
        guest.run("systemctl", "reload", POLICY)
        wait_for_policy_log(guest, mark, "reload: loaded", pid)

        def reloading_then_ready() -> Optional[List[str]]:
            sent = notifications(policy_messages(guest, mark), pid)
            reloading = [i for i, n in enumerate(sent) if n.startswith("RELOADING=1")]
            ready = [i for i, n in enumerate(sent) if n.startswith("READY=1")]
            return sent if reloading and ready and reloading[0] < ready[-1] else None

        wait_for(reloading_then_ready, 10, "RELOADING=1, then READY=1", interval=0.1)
    assert main_pid(guest) == pid and state(guest) == "active/running"
    assert "mode monitor" in guest.prop(POLICY, "StatusText")
    # monitor: the same request is now let through (DUNNO), logged would-reject.
    assert ask(guest, BOUNCE) == "DUNNO"
    wait_for_policy_log(guest, mark, "action=would-reject", pid)

    # A broken file: check-config (ExecReload=) fails the reload, says why,
    # and the service never hears of it.
    line = configure(guest, "\nmode: monitor\n", f"\n{BROKEN_MODE}\n")
    mark = guest.mark()
    assert guest.run("systemctl", "reload", POLICY, check=False).returncode != 0
    assert main_pid(guest) == pid and state(guest) == "active/running"
    shown = guest.journal(mark, "-u", POLICY, "-p", "warning", "-o", "cat")
    assert f"{CONF}:{line}: mode: must be one of" in shown, shown
    assert not [m for m in policy_messages(guest, mark, pid) if m.startswith("reload:")]
    assert ask(guest, BOUNCE) == "DUNNO"
    assert "mode monitor" in guest.prop(POLICY, "StatusText")


def test_a_broken_config_at_start_fails_without_restarting(policy: Guest) -> None:
    guest = policy
    stop_policy(guest)
    line = configure(guest, "\nmode: enforce\n", f"\n{BROKEN_MODE}\n")
    mark = guest.mark()
    assert guest.run("systemctl", "start", POLICY, check=False).returncode != 0
    props = guest.props(POLICY, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }, props
    shown = guest.journal(mark, "-u", POLICY, "-p", "err", "-o", "cat")
    assert f"{CONF}:{line}: mode: must be one of" in shown, shown
    # The socket stays: once the file is fixed, the next request starts it.
    assert state(guest, SOCKET_UNIT) == "active/listening"
    guest.write(CONF, guest.read(SHIPPED_CONF))
    guest.run("systemctl", "reset-failed", POLICY)
    assert ask(guest, BOUNCE) == REFUSAL


def test_stop_is_prompt_and_the_socket_stays(policy: Guest) -> None:
    guest = policy
    assert ask(guest, BOUNCE) == REFUSAL
    pid = main_pid(guest)
    socket_since = guest.prop(SOCKET_UNIT, "ActiveEnterTimestampMonotonic")
    mark = guest.mark()
    started = time.monotonic()
    guest.run("systemctl", "stop", POLICY)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, f"systemctl stop took {elapsed:.2f} s"
    result = guest.props(POLICY, "Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    assert result == {
        "Result": "success",
        "ExecMainCode": "1",  # exited (not killed)
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }, result
    log = policy_messages(guest, mark, pid)
    assert "stopping (SIGTERM)" in log, log
    assert not [m for m in policy_messages(guest, mark) if "SIGKILL" in m or "Killing" in m]
    assert not guest.exists("/run/relaymilter-policy")  # RuntimeDirectory= removed
    # systemd still listens, on the same socket: the next request starts a new service.
    assert state(guest, SOCKET_UNIT) == "active/listening"
    assert guest.prop(SOCKET_UNIT, "ActiveEnterTimestampMonotonic") == socket_since
    assert ask(guest, BOUNCE) == REFUSAL
    assert main_pid(guest) != pid


def test_watchdog_restarts_a_service_that_stopped_answering(policy: Guest) -> None:
    # A frozen service sends no WATCHDOG=1: systemd kills it (SIGABRT) and
    # Restart=on-failure starts a new one, which gets the same socket from
    # systemd. A drop-in shortens the shipped 20 s to 4 s (the service pings
    # every half period, whatever it is) and keeps the SIGABRT's core file
    # out of the host's core_pattern.
    guest = policy
    guest.run("mkdir", "-p", POLICY_DROP_INS)
    guest.write(
        f"{POLICY_DROP_INS}/short-watchdog.conf", "[Service]\nWatchdogSec=4s\nLimitCORE=0\n"
    )
    guest.run("systemctl", "daemon-reload")
    stop_policy(guest)
    assert ask(guest, BOUNCE) == REFUSAL
    pid = main_pid(guest)
    restarts = int(guest.prop(POLICY, "NRestarts"))
    socket_since = guest.prop(SOCKET_UNIT, "ActiveEnterTimestampMonotonic")
    mark = guest.mark()
    guest.run("kill", "-STOP", pid)

    wait_for(lambda: restarted(guest, POLICY, pid), 60, "a watchdog restart", interval=0.2)
    log = policy_messages(guest, mark)
    assert any("Watchdog timeout" in m for m in log), log
    assert any("Failed with result 'watchdog'" in m for m in log), log
    assert int(guest.prop(POLICY, "NRestarts")) == restarts + 1
    assert guest.run("kill", "-0", pid, check=False).returncode != 0, "the old service lives"
    # systemd kept listening all along, and the new service answers on it.
    assert guest.prop(SOCKET_UNIT, "ActiveEnterTimestampMonotonic") == socket_since
    assert ask(guest, BOUNCE) == REFUSAL


def test_the_system_call_filter_lets_it_serve(policy: Guest) -> None:
    # The unit answers a forbidden call with EPERM (SystemCallErrorNumber=);
    # a drop-in makes systemd kill the service instead (SIGSYS), so that a
    # forbidden call cannot go unnoticed. (test_deb.py shows that such a
    # filter does kill in the guest.) The filter itself is the unit's.
    guest = policy
    guest.run("mkdir", "-p", POLICY_DROP_INS)
    guest.write(
        f"{POLICY_DROP_INS}/kill-on-forbidden-call.conf", "[Service]\nSystemCallErrorNumber=\n"
    )
    guest.run("systemctl", "daemon-reload")
    assert guest.prop(POLICY, "SystemCallErrorNumber") != "1"  # not EPERM
    stop_policy(guest)
    mark = guest.mark()
    # Start (by activation), decisions on two connections, a watchdog ping,
    # a reload (check-config runs under the filter too) and a stop.
    assert ask(guest, BOUNCE) == REFUSAL
    pid = main_pid(guest)
    owned = {**BOUNCE, "sender": "alice@contoso.com", "instance": "y"}
    assert ask(guest, owned) == "DUNNO"
    guest.run("systemctl", "reload", POLICY)
    wait_for_policy_log(guest, mark, "reload: loaded", pid)
    assert guest.prop(POLICY, "WatchdogTimestampMonotonic") != "0"
    guest.run("systemctl", "stop", POLICY)
    result = guest.props(POLICY, "Result", "ExecMainCode", "ExecMainStatus")
    assert result == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, result
    entries = policy_log(guest, mark)
    problems = [e["MESSAGE"] for e in entries if int(e.get("PRIORITY", "6")) <= 4]
    assert problems == []


def test_without_postfix_the_socket_is_skipped_quietly(policy: Guest) -> None:
    # A host without Postfix has no /var/spool/postfix/private (and no
    # postfix user): an enabled socket unit is skipped, not failed, and
    # systemd creates nothing of Postfix's.
    guest = policy
    guest.run("systemctl", "stop", SOCKET_UNIT, POLICY)
    moved = "/var/spool/postfix/private.moved-by-test"
    guest.run("mv", "/var/spool/postfix/private", moved)
    try:
        mark = guest.mark()
        assert guest.run("systemctl", "start", SOCKET_UNIT, check=False).returncode == 0
        props = guest.props(SOCKET_UNIT, "ActiveState", "ConditionResult", "Result")
        assert props == {"ActiveState": "inactive", "ConditionResult": "no", "Result": "success"}
        assert guest.run("systemctl", "is-failed", SOCKET_UNIT, check=False).returncode != 0
        assert not guest.exists("/var/spool/postfix/private")
        entries = guest.journal_entries(mark, "-u", SOCKET_UNIT)
        loud = [e["MESSAGE"] for e in entries if int(e.get("PRIORITY", "6")) <= 4]
        assert loud == []
    finally:
        guest.run("rm", "-rf", "/var/spool/postfix/private", check=False)
        guest.run("mv", moved, "/var/spool/postfix/private")
    # Postfix back: the socket starts.
    guest.run("systemctl", "start", SOCKET_UNIT)
    assert state(guest, SOCKET_UNIT) == "active/listening"
