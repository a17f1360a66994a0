"""The real ``relaymilter policy`` over its socket, driven by a policy-protocol client (Postfix's side)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from relaymilter.decisionlog.record import DecisionRecord, read_line

from ..scenarios import CONFIG, EXTERNAL, Scenario
from ..support import (
    ATTR36,
    REPO,
    Daemon,
    MilterSession,
    PolicyClient,
    free_port,
    relaymilter_command,
    running_daemon,
    wait_for_socket,
)
from .test_handler import POSTFIX_SCENARIOS, attributes_of

POLICY = [*relaymilter_command(), "policy"]
REFUSAL = f"550 {ATTR36}"
#: A relaymilter policy whose timeouts are short enough for a test: the sweep
#: runs every 0.1 s, a partial request may take 1 s, an idle connection 2 s.
QUICK_TIMEOUTS = (
    "import sys\n"
    "from relaymilter import cli\n"
    "from relaymilter.policyd import server\n"
    "server.SWEEP_INTERVAL, server.REQUEST_TIMEOUT, server.IDLE_TIMEOUT = 0.1, 1.0, 2.0\n"
    "sys.exit(cli.main())\n"
)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "relaymilter.yml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def policy(config_file: Path) -> Iterator[Daemon]:
    spec = f"unix:{config_file.parent}/policy.sock"
    with running_daemon(config_file, spec, config_file.parent / "policy.log", POLICY) as running:
        yield running


@pytest.fixture()
def client(policy: Daemon) -> Iterator[PolicyClient]:
    connection = PolicyClient(policy.spec)
    yield connection
    connection.close()


def decisions(daemon: Daemon) -> List[DecisionRecord]:
    found = (read_line(line.split(" ", 1)[-1]) for line in daemon.log().splitlines())
    return [f[0] for f in found if f is not None]


def test_the_socket_is_the_services_own_and_not_world_writable(policy: Daemon) -> None:
    path = policy.spec.split(":", 1)[1]
    assert oct(os.stat(path).st_mode & 0o777) == "0o660"


@pytest.mark.parametrize("scenario", POSTFIX_SCENARIOS, ids=[s.id for s in POSTFIX_SCENARIOS])
def test_the_scenarios_through_the_socket(client: PolicyClient, scenario: Scenario) -> None:
    for recipient, action, _ in scenario.recipients:
        answer = client.request(**attributes_of(scenario, recipient, instance=scenario.id))
        assert answer == ("DUNNO" if action == "continue" else REFUSAL), recipient


def test_the_milter_and_the_policy_service_decide_alike(
    policy: Daemon, config_file: Path, tmp_path: Path
) -> None:
    """The same transactions through both front ends: the same replies and the same records."""
    spec = f"unix:{tmp_path}/milter.sock"
    with running_daemon(config_file, spec, tmp_path / "milter.log") as milter:
        for scenario in POSTFIX_SCENARIOS:
            milter_replies = _through_the_milter(milter.spec, scenario)
            policy_replies = _through_the_policy_service(policy.spec, scenario)
            assert policy_replies == [
                "DUNNO" if reply == "continue" else reply for reply in milter_replies
            ], scenario.id
        wanted = sum(len(s.recipients) for s in POSTFIX_SCENARIOS)
        milter.wait_for_log(POSTFIX_SCENARIOS[-1].recipients[-1][0])
        by_milter = [_comparable(r) for r in decisions(milter)][-wanted:]
    by_policy = [_comparable(r) for r in decisions(policy)][-wanted:]
    assert by_policy == by_milter


def _through_the_milter(spec: str, scenario: Scenario) -> List[str]:
    session = MilterSession(spec)
    try:
        session.negotiate()
        session.connect(scenario.client)
        session.mail(scenario.mail_from, {})
        return [session.rcpt(f"<{r}>", dict(scenario.macros)) for r, _, _ in scenario.recipients]
    finally:
        session.close()


def _through_the_policy_service(spec: str, scenario: Scenario) -> List[str]:
    client = PolicyClient(spec)
    try:
        return [
            client.request(**attributes_of(scenario, r, instance=scenario.id))
            for r, _, _ in scenario.recipients
        ]
    finally:
        client.close()


def _comparable(record: DecisionRecord) -> DecisionRecord:
    # The front end's own: its connection numbers and the queue id its MTA gives.
    return record._replace(conn=None, queue_id=None)


def test_a_malformed_request_closes_only_its_connection(policy: Daemon) -> None:
    bad, good = PolicyClient(policy.spec), PolicyClient(policy.spec)
    try:
        assert good.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        bad.send(b"request=smtpd_access_policy\nthis is not an attribute\n\n")
        assert bad.closed_by_peer()
        assert good.rcpt("192.0.2.10", "", EXTERNAL, instance="2") == REFUSAL
        policy.wait_for_log("closed: not a name=value line: 'this is not an attribute'")
    finally:
        bad.close()
        good.close()


def test_an_oversized_request_is_refused_without_reading_it_all(policy: Daemon) -> None:
    client = PolicyClient(policy.spec)
    try:
        client.sock.settimeout(10)
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            # No empty line ever: the service stops reading past its limit.
            for _ in range(1000):
                client.send(b"sasl_username=" + b"x" * 4096 + b"\n")
        policy.wait_for_log("a request grows past 16384 bytes")
    finally:
        client.close()


def test_a_request_that_arrives_slowly_is_answered(client: PolicyClient) -> None:
    request = (
        b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.10\n"
        b"sender=\nrecipient=kate@tailspintoys.com\ninstance=slow\n\n"
    )
    for piece in (request[:5], request[5:40], request[40:-1], request[-1:]):
        client.send(piece)
        time.sleep(0.05)
    assert client.reply() == REFUSAL


def test_requests_in_one_write_are_answered_in_order(client: PolicyClient) -> None:
    one = "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.10\n"
    client.send(
        (
            one
            + "sender=app@contoso.com\nrecipient=a@tailspintoys.com\ninstance=i1\n\n"
            + one
            + "sender=\nrecipient=b@tailspintoys.com\ninstance=i2\n\n"
            + "request=smtpd_access_policy\nprotocol_state=CONNECT\n\n"
        ).encode()
    )
    assert [client.reply() for _ in range(3)] == ["DUNNO", REFUSAL, "DUNNO"]


def test_many_concurrent_connections(policy: Daemon) -> None:
    clients = [PolicyClient(policy.spec) for _ in range(150)]
    errors: List[BaseException] = []

    def talk(number: int, connection: PolicyClient) -> None:
        try:
            for message in range(5):
                sender = "app@contoso.com" if (number + message) % 2 else ""
                expected = "DUNNO" if sender else REFUSAL
                answer = connection.rcpt(
                    "192.0.2.10", sender, EXTERNAL, instance=f"{number}.{message}"
                )
                assert answer == expected
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(n, c)) for n, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for connection in clients:
        connection.close()
    assert errors == []


def _quick(config: Path, spec: str, log: Path) -> Daemon:
    return Daemon(config, spec, log, [sys.executable, "-c", QUICK_TIMEOUTS, "policy"])


def test_a_stalled_request_and_an_idle_connection_are_closed(
    config_file: Path, tmp_path: Path
) -> None:
    spec = f"unix:{tmp_path}/quick.sock"
    daemon = _quick(config_file, spec, tmp_path / "quick.log")
    try:
        wait_for_socket(spec, daemon.process)
        stalled, idle, busy = (PolicyClient(spec) for _ in range(3))
        stalled.send(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        assert busy.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        assert stalled.closed_by_peer(timeout=10)
        assert idle.closed_by_peer(timeout=10)
        log = daemon.wait_for_log("closed: idle for 2 s")
        assert "closed: no whole request within 1 s" in log
    finally:
        daemon.stop()


def test_a_reload_under_load_changes_new_transactions_only(
    tmp_path: Path,
) -> None:
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG)
    spec = f"unix:{tmp_path}/policy.sock"
    with running_daemon(config, spec, tmp_path / "reload.log", POLICY) as daemon:
        stop = threading.Event()
        answers: Dict[str, int] = {}
        errors: List[BaseException] = []

        def hammer(number: int) -> None:
            connection = PolicyClient(spec)
            count = 0
            try:
                while not stop.is_set():
                    count += 1
                    answer = connection.rcpt(
                        "192.0.2.10", "", EXTERNAL, instance=f"{number}.{count}"
                    )
                    answers[answer] = answers.get(answer, 0) + 1
            except BaseException as exc:
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        daemon.wait_for_log("action=reject")
        config.write_text("mode: monitor\n" + CONFIG)
        daemon.reload()
        daemon.wait_for_log("reload: loaded")
        daemon.wait_for_log("action=would-reject")
        stop.set()
        for thread in threads:
            thread.join(30)
        assert errors == []
        assert set(answers) == {REFUSAL, "DUNNO"}
        assert daemon.stop() == 0
    assert "stopped: " in daemon.log()


def test_a_broken_config_on_reload_keeps_the_old_one(tmp_path: Path) -> None:
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG)
    spec = f"unix:{tmp_path}/policy.sock"
    with running_daemon(config, spec, tmp_path / "broken.log", POLICY) as daemon:
        config.write_text("mode: sometimes\n" + CONFIG)
        daemon.reload()
        daemon.wait_for_log("reload: failed, keeping the previous configuration")
        client = PolicyClient(spec)
        assert client.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        client.close()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
def test_a_stop_is_clean_and_removes_the_socket(
    config_file: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    spec = f"unix:{tmp_path}/stop.sock"
    daemon = Daemon(config_file, spec, tmp_path / "stop.log", POLICY)
    try:
        wait_for_socket(spec, daemon.process)
        connected = PolicyClient(spec)
        assert connected.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        daemon.process.send_signal(stop_signal)
        assert daemon.process.wait(15) == 0
        assert connected.closed_by_peer()
        connected.close()
    finally:
        daemon.stop()
    assert f"stopping ({stop_signal.name})" in daemon.log()
    assert not (tmp_path / "stop.sock").exists()


def test_without_a_socket_it_says_where_to_set_one(config_file: Path) -> None:
    result = subprocess.run(
        [*POLICY, "-c", str(config_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 78
    assert "no socket: set policy_service.socket in the configuration, give --socket" in (
        result.stderr
    )


def test_the_configs_socket_is_used(tmp_path: Path) -> None:
    spec = f"unix:{tmp_path}/from-config.sock"
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG + f"policy_service:\n  socket: {spec}\n")
    process = subprocess.Popen([*POLICY, "-c", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(spec, process)  # type: ignore[arg-type]
    finally:
        process.terminate()
        assert process.wait(15) == 0


def test_a_socket_passed_by_systemd_is_used(config_file: Path, tmp_path: Path) -> None:
    """Socket activation: LISTEN_FDS=1 and LISTEN_PID, the listening socket as fd 3."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    # As systemd does: the environment names the process that exec()s the service.
    start = (
        "import os, sys\n"
        f"os.dup2({listener.fileno()}, 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    log = tmp_path / "activated.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", start, *POLICY, "-c", str(config_file)],
            pass_fds=(listener.fileno(),),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    listener.close()  # the service holds it now
    try:
        client = PolicyClient(f"unix:{path}")
        assert client.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        client.close()
    finally:
        process.terminate()
        assert process.wait(15) == 0
    assert f"listening on unix:{path}:" in log.read_text()
    # The socket is systemd's to remove, not the service's.
    assert path.exists()


def test_an_internal_error_answers_tempfail(config_file: Path, tmp_path: Path) -> None:
    spec = f"unix:{tmp_path}/faulty.sock"
    argv = [sys.executable, str(REPO / "tests" / "faulty_relaymilter.py"), "policy"]
    with running_daemon(config_file, spec, tmp_path / "faulty.log", argv) as faulty:
        client = PolicyClient(spec)
        assert client.rcpt("192.0.2.10", "app@contoso.com", "boom@example.net") == (
            "451 4.3.0 relaymilter: internal error, please try again later"
        )
        assert client.rcpt("192.0.2.10", "app@contoso.com", "fine@example.net") == "DUNNO"
        client.close()
        log = faulty.wait_for_log("RuntimeError: injected fault")
    assert "client=192.0.2.10 to=<boom@example.net> internal error in request" in log


def test_inet_socket(config_file: Path, tmp_path: Path) -> None:
    spec = f"inet:{free_port()}@127.0.0.1"
    with running_daemon(config_file, spec, tmp_path / "inet.log", POLICY):
        client = PolicyClient(spec)
        assert client.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        client.close()


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_its_own_metrics(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG + f"policy_service:\n  metrics:\n    listen: {port}\n")
    spec = f"unix:{tmp_path}/metrics.sock"
    with running_daemon(config, spec, tmp_path / "metrics.log", POLICY):
        client = PolicyClient(spec)
        assert client.rcpt("192.0.2.10", "", EXTERNAL) == REFUSAL
        client.close()
        text = _scrape(port)
    assert (
        'relaymilter_decisions_total{action="reject",connector="onprem-ip",'
        'mode="enforce",organization="contoso",reason="attr36"} 1.0'
    ) in text
    # Ours, and the readiness probe's.
    assert "relaymilter_connections_total 2.0" in text


def _systemd(tmp_path: Path) -> Tuple[socket.socket, str]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    notify.bind(path)
    notify.settimeout(10)
    return notify, path


def test_it_tells_systemd_it_is_ready_and_alive(config_file: Path, tmp_path: Path) -> None:
    notify, path = _systemd(tmp_path)
    spec = f"unix:{tmp_path}/notify-policy.sock"
    environ = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    log = tmp_path / "notify.log"
    # WATCHDOG_PID: the service's own (the interpreter that execs it keeps its PID).
    start = "import os, sys\nos.environ['WATCHDOG_PID'] = str(os.getpid())\nos.execv(sys.argv[1], sys.argv[1:])\n"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", start, *POLICY, "-c", str(config_file), "--socket", spec],
            env=environ,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        messages: List[str] = []
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert messages[0].startswith("READY=1\nSTATUS=")
        assert "decisions" in messages[0]
    finally:
        process.terminate()
        process.wait(15)
        notify.close()
