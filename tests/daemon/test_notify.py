"""relaymilter.daemon.notify: sd_notify messages on a fake NOTIFY_SOCKET, and the milter's self-check.

The first part drives ServiceNotifier against fake milters; the second runs the
real daemon (``python -m relaymilter run``) as systemd would, with
NOTIFY_SOCKET and WATCHDOG_USEC, and reads what it tells systemd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from relaymilter.daemon.notify import ServiceNotifier, socket_address, watchdog_interval
from relaymilter.milterd.selfcheck import milter_check, milter_self_check

from ..support import REPO, MilterSession, connect_socket, free_port

CONFIG = REPO / "etc" / "relaymilter.yml"


def notifier_for(spec: str, status: Callable[[], str]) -> ServiceNotifier:
    """The milter's notifier, as its service makes it: the self-check on its own socket."""
    return ServiceNotifier(f"the milter on {spec}", status, milter_self_check(spec))


class FakeNotifySocket:
    """systemd's side of NOTIFY_SOCKET: an AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def receive(self, timeout: float = 5.0) -> Dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536)
        return dict(line.split("=", 1) for line in data.decode("utf-8").splitlines())

    def receive_until(self, key: str, timeout: float = 10.0) -> List[Dict[str, str]]:
        """Every message up to and including the first that sets ``key``."""
        end = time.monotonic() + timeout
        messages = []
        while True:
            message = self.receive(max(0.01, end - time.monotonic()))
            messages.append(message)
            if key in message:
                return messages

    def drain(self) -> List[Dict[str, str]]:
        messages = []
        with contextlib.suppress(socket.timeout):
            while True:
                messages.append(self.receive(0.01))
        return messages

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNotifySocket]:
    path = str(tmp_path / "notify.sock")
    fake = FakeNotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    fake.close()


class FakeMilter:
    """A milter that answers the option negotiation, or (answer=False) never replies."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.commands: List[bytes] = []
        self._open: List[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def spec(self) -> str:
        return f"inet:{self.port}@127.0.0.1"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                self._open.append(conn)
                if self.answer:
                    self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        with conn:
            while True:
                header = conn.recv(4)
                if len(header) < 4:
                    return
                (length,) = struct.unpack("!I", header)
                body = b""
                while len(body) < length:
                    body += conn.recv(length - len(body))
                self.commands.append(body[:1])
                if body[:1] == b"O":
                    reply = b"O" + struct.pack("!III", 6, 0x1FF, 0)
                    conn.sendall(struct.pack("!I", len(reply)) + reply)

    def close(self) -> None:
        self.listener.close()
        for conn in self._open:
            conn.close()


# -- notifications --------------------------------------------------------------


def test_ready_reload_and_stop_messages(systemd: FakeNotifySocket) -> None:
    notifier = notifier_for("inet:8894@127.0.0.1", lambda: "1 organization; 0 decisions")
    notifier.ready()
    assert systemd.receive() == {"READY": "1", "STATUS": "1 organization; 0 decisions"}
    notifier.reloading()
    reloading = systemd.receive()
    assert reloading["RELOADING"] == "1"
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= now_usec - int(reloading["MONOTONIC_USEC"]) < 5_000_000
    notifier.reloaded()
    assert systemd.receive()["READY"] == "1"
    notifier.stopping()
    assert systemd.receive()["STOPPING"] == "1"


def test_status_is_one_line_of_utf8_whatever_the_config_says(systemd: FakeNotifySocket) -> None:
    # sdnotify itself would encode latin-1 and silently drop the whole message.
    notifier = notifier_for("inet:8894@127.0.0.1", lambda: "organization 東京\nmode enforce")
    notifier.ready()
    assert systemd.receive() == {"READY": "1", "STATUS": "organization 東京 mode enforce"}


def test_a_failing_status_callback_does_not_lose_readiness(systemd: FakeNotifySocket) -> None:
    def broken() -> str:
        raise RuntimeError("no config yet")

    notifier_for("inet:8894@127.0.0.1", broken).ready()
    assert systemd.receive() == {"READY": "1", "STATUS": "running"}


def test_abstract_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"relaymilter-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as fake:
        fake.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier_for("inet:8894@127.0.0.1", lambda: "ok").stopping()
        fake.settimeout(5)
        assert fake.recv(1024).startswith(b"STOPPING=1\n")


def test_without_systemd_nothing_is_sent_and_nothing_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = notifier_for("inet:8894@127.0.0.1", lambda: "ok")
    assert not notifier.enabled
    notifier.ready()
    notifier.reloading()
    notifier.reloaded()
    assert not notifier.start_watchdog()
    notifier.stopping()


def test_an_unreachable_notify_socket_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    notifier = notifier_for("inet:8894@127.0.0.1", lambda: "ok")
    notifier.ready()
    assert not notifier.enabled
    assert "cannot reach systemd's NOTIFY_SOCKET" in caplog.text


# -- the watchdog ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "4242"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: Dict[str, str], expected: Optional[float]) -> None:
    assert watchdog_interval(environ, 4242) == expected


@pytest.mark.parametrize(
    ("spec", "family", "address"),
    [
        (
            "unix:/run/relaymilter/relaymilter.sock",
            socket.AF_UNIX,
            "/run/relaymilter/relaymilter.sock",
        ),
        ("local:/tmp/m.sock", socket.AF_UNIX, "/tmp/m.sock"),
        ("inet:8894@127.0.0.1", socket.AF_INET, ("127.0.0.1", 8894)),
        ("inet:8894", socket.AF_INET, ("127.0.0.1", 8894)),
        ("inet:8894@0.0.0.0", socket.AF_INET, ("127.0.0.1", 8894)),
        ("inet:8894@localhost", socket.AF_INET, ("127.0.0.1", 8894)),
        ("inet6:8894@[::1]", socket.AF_INET6, ("::1", 8894, 0, 0)),
        ("inet6:8894@::", socket.AF_INET6, ("::1", 8894, 0, 0)),
        ("inet6:8894", socket.AF_INET6, ("::1", 8894, 0, 0)),
    ],
)
def test_the_watchdog_reaches_the_milter_on_its_own_socket(
    spec: str, family: int, address: object
) -> None:
    assert socket_address(spec) == (family, address)


def test_the_self_check_negotiates_options_then_quits() -> None:
    milter = FakeMilter()
    try:
        assert milter_check(socket_address(milter.spec), timeout=2) is None
        deadline = time.monotonic() + 5
        while len(milter.commands) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert milter.commands == [b"O", b"Q"]
    finally:
        milter.close()


def test_the_self_check_fails_on_a_milter_that_does_not_answer() -> None:
    milter = FakeMilter(answer=False)
    try:
        assert milter_check(socket_address(milter.spec), timeout=0.2) == "no answer within 0.2 s"
    finally:
        milter.close()


def test_the_self_check_fails_when_nothing_listens() -> None:
    problem = milter_check(socket_address(f"inet:{free_port()}@127.0.0.1"), timeout=1)
    assert problem is not None and "refused" in problem.lower()


def _watchdog_messages(systemd: FakeNotifySocket, seconds: float) -> List[Dict[str, str]]:
    time.sleep(seconds)
    return [m for m in systemd.drain() if "WATCHDOG" in m]


def test_watchdog_pings_only_while_the_milter_answers(
    systemd: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy, silent = FakeMilter(), FakeMilter(answer=False)
    good = notifier_for(healthy.spec, lambda: "3 decisions")
    bad = notifier_for(silent.spec, lambda: "stuck")
    try:
        assert good.start_watchdog()
        pings = _watchdog_messages(systemd, 0.6)
        good.stopping()
        assert len(pings) >= 3
        assert pings[0] == {"WATCHDOG": "1", "STATUS": "3 decisions"}
        assert bad.start_watchdog()
        assert _watchdog_messages(systemd, 0.6) == []
        assert f"the milter on {silent.spec} does not answer" in caplog.text
    finally:
        bad.stopping()
        healthy.close()
        silent.close()


def test_the_first_ping_does_not_wait_for_an_interval(
    systemd: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # WatchdogSec=60: the next ping would be 30 s away, but the first is now.
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    milter = FakeMilter()
    notifier = notifier_for(milter.spec, lambda: "ok")
    try:
        assert notifier.start_watchdog()
        assert systemd.receive(timeout=2) == {"WATCHDOG": "1", "STATUS": "ok"}
    finally:
        notifier.stopping()
        milter.close()


def test_a_check_that_fails_because_the_daemon_is_stopping_is_not_reported(
    systemd: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # After SIGTERM, libmilter leaves the connection that woke its accept loop
    # unanswered and closes, a moment before the daemon calls stopping().
    # WatchdogSec=4: the first check times out after 1 s, then waits up to
    # 0.5 s for stopping() before it reports the milter as hung.
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    silent = FakeMilter(answer=False)
    notifier = notifier_for(silent.spec, lambda: "ok")
    try:
        assert notifier.start_watchdog()
        time.sleep(1.25)
        notifier.stopping()
        time.sleep(0.5)
        assert "does not answer" not in caplog.text
        assert [m for m in systemd.drain() if "WATCHDOG" in m] == []
    finally:
        silent.close()


def test_no_watchdog_thread_for_another_process(
    systemd: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert not notifier_for("inet:8894@127.0.0.1", lambda: "ok").start_watchdog()


def test_an_uncheckable_socket_still_gets_pings(
    systemd: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    notifier = notifier_for("fd:3", lambda: "ok")
    try:
        assert notifier.start_watchdog()
        assert _watchdog_messages(systemd, 0.4)
        assert "pinging without the check" in caplog.text
    finally:
        notifier.stopping()


# -- the real daemon, as systemd runs it ----------------------------------------


@contextlib.contextmanager
def daemon_under_systemd(
    systemd: FakeNotifySocket, spec: str, log: Path, config: Path = CONFIG, **environ: str
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, **environ}
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "relaymilter", "run", "-c", str(config), "--socket", spec],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_daemon_ready_only_once_listening_then_watchdog_and_stopping(
    systemd: FakeNotifySocket, tmp_path: Path
) -> None:
    spec = f"unix:{tmp_path}/milter.sock"
    log = tmp_path / "daemon.log"
    # WATCHDOG_PID unset: the watchdog is ours (systemd sets it only at times).
    with daemon_under_systemd(systemd, spec, log, WATCHDOG_USEC="1000000") as daemon:
        ready = systemd.receive_until("READY")[-1]
        # READY=1 comes after the socket listens: a milter session works at once.
        session = MilterSession(spec)
        session.negotiate()
        session.close()
        assert "1 organization" in ready["STATUS"], ready
        ping = systemd.receive_until("WATCHDOG", timeout=5)[-1]
        assert ping["WATCHDOG"] == "1" and "decision" in ping["STATUS"]

        # A stopped process answers nobody and tells systemd nothing...
        daemon.send_signal(signal.SIGSTOP)
        try:
            systemd.drain()
            assert _watchdog_messages(systemd, 1.5) == []
        finally:
            daemon.send_signal(signal.SIGCONT)
        # ...and pings again once it answers again.
        assert systemd.receive_until("WATCHDOG", timeout=5)[-1]["WATCHDOG"] == "1"

        daemon.send_signal(signal.SIGUSR1)
        reload_messages = systemd.receive_until("READY", timeout=10)
        assert any(m.get("RELOADING") == "1" for m in reload_messages)

        daemon.send_signal(signal.SIGTERM)
        assert systemd.receive_until("STOPPING", timeout=10)[-1]["STOPPING"] == "1"
        assert daemon.wait(30) == 0
    assert "listening on" in log.read_text()


def test_daemon_on_tcp_with_a_wildcard_host_checks_the_loopback(
    systemd: FakeNotifySocket, tmp_path: Path
) -> None:
    port = free_port()
    with daemon_under_systemd(
        systemd, f"inet:{port}@0.0.0.0", tmp_path / "daemon.log", WATCHDOG_USEC="400000"
    ):
        systemd.receive_until("READY")
        connect_socket(f"inet:{port}@127.0.0.1").close()
        assert systemd.receive_until("WATCHDOG", timeout=5)[-1]["WATCHDOG"] == "1"


def test_daemon_with_a_bad_config_never_says_ready(
    systemd: FakeNotifySocket, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("socket: inet:8894@127.0.0.1\norganizations: []\nmystery_key: 1\n")
    spec = f"unix:{tmp_path}/milter.sock"
    log = tmp_path / "daemon.log"
    with daemon_under_systemd(systemd, spec, log, config=bad) as daemon:
        assert daemon.wait(30) != 0
    assert systemd.drain() == []
    assert not (tmp_path / "milter.sock").exists()
    text = log.read_text()
    assert "mystery_key" in text and "organizations" in text, text


def test_a_failed_reload_reports_ready_again_with_the_old_config(
    systemd: FakeNotifySocket, tmp_path: Path
) -> None:
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG.read_text())
    spec = f"unix:{tmp_path}/milter.sock"
    with daemon_under_systemd(systemd, spec, tmp_path / "daemon.log", config=config) as daemon:
        before = systemd.receive_until("READY")[-1]["STATUS"]
        config.write_text("organizations: {broken\n")
        daemon.send_signal(signal.SIGUSR1)
        messages = systemd.receive_until("READY", timeout=10)
        assert messages[0]["RELOADING"] == "1"
        assert messages[-1]["STATUS"] == before
        assert daemon.poll() is None
