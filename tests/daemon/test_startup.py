"""Starting and stopping the real daemon: its socket, its exit status, and stops that no reload holds up."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from relaymilter.daemon.notify import ServiceNotifier

from ..scenarios import CONFIG
from ..support import (
    ATTR36,
    Daemon,
    MilterSession,
    free_port,
    gated_reload_command,
    readable_relaymilter_command,
    run_cli,
    running_daemon,
    stop_promptly,
    wait_for_socket,
)

# Generous: a start that fails, or a stop, takes milliseconds; the bound only
# keeps a regression from hanging the suite.
EXIT_DEADLINE = 30


@pytest.fixture()
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "relaymilter.yml"
    path.write_text(CONFIG)
    return path


def failed_start(
    config: Path, spec: str, log: Path, argv: Optional[List[str]] = None
) -> Tuple[int, str]:
    """Run a daemon expected not to start: its exit status and its log."""
    daemon = Daemon(config, spec, log, argv)
    try:
        code = daemon.process.wait(EXIT_DEADLINE)
    finally:
        daemon.stop()
    return code, daemon.log()


def verdict(spec: str) -> str:
    """The reply of the milter on ``spec`` to a recipient it refuses."""
    client = MilterSession(spec)
    try:
        client.negotiate()
        client.connect("192.0.2.10")
        client.mail("<>")
        return client.rcpt("<a@example.net>")
    finally:
        client.close()


# -- a socket in use ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["unix", "inet"])
def test_a_second_relaymilter_refuses_a_socket_in_use(
    kind: str, config_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    spec = f"unix:{path}" if kind == "unix" else f"inet:{free_port()}@127.0.0.1"
    with running_daemon(config_file, spec, tmp_path / "first.log"):
        before = os.stat(path).st_ino if kind == "unix" else None
        code, log = failed_start(config_file, spec, tmp_path / "second.log")
        assert code == 1, log
        assert f"cannot start: cannot listen on {spec}: Address already in use" in log
        # The first one is untouched: same socket file, still answering.
        if kind == "unix":
            assert os.stat(path).st_ino == before
            assert "is relaymilter already running?" in log
        assert verdict(spec) == "550 " + ATTR36


def test_a_port_another_program_listens_on(config_file: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as other:
        other.bind(("::1", 0))
        other.listen()
        spec = f"inet6:{other.getsockname()[1]}@[::1]"
        code, log = failed_start(config_file, spec, tmp_path / "port.log")
    assert code == 1, log
    assert f"cannot start: cannot listen on {spec}: Address already in use" in log


def test_a_stale_socket_from_a_crash_is_replaced(config_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as crashed:
        crashed.bind(str(path))  # closed without unlink: nothing listens any more
    spec = f"unix:{path}"
    with running_daemon(config_file, spec, tmp_path / "stale.log") as daemon:
        assert verdict(spec) == "550 " + ATTR36
        assert f"removed the stale socket {path}: nothing listened on it" in daemon.log()


def _regular_file(path: Path) -> None:
    path.write_text("precious\n")


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("precious\n")


def _symlink(path: Path) -> None:
    target = path.with_name("target")
    target.write_text("precious\n")
    path.symlink_to(target)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize(
    "make, kind",
    [
        (_regular_file, "a regular file"),
        (_directory, "a directory"),
        (_symlink, "a symbolic link"),
        (_fifo, "a FIFO"),
    ],
    ids=["file", "directory", "symlink", "fifo"],
)
def test_a_path_that_is_not_a_socket_is_never_removed(
    make: Callable[[Path], None], kind: str, config_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    make(path)
    before = os.lstat(path)
    spec = f"unix:{path}"
    code, log = failed_start(config_file, spec, tmp_path / "notsocket.log")
    assert code == 1, log
    assert (
        f"cannot start: cannot listen on {spec}: {path} exists and is {kind}, not a socket" in log
    )
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    if kind != "a FIFO":
        precious = path / "inside" if kind == "a directory" else path
        assert precious.read_text() == "precious\n"


# -- the system's reason ------------------------------------------------------


def test_a_missing_directory_is_named(config_file: Path, tmp_path: Path) -> None:
    spec = f"unix:{tmp_path}/missing/milter.sock"
    code, log = failed_start(config_file, spec, tmp_path / "missing.log")
    assert code == 1, log
    assert (
        f"cannot start: cannot listen on {spec}: No such file or directory (in {tmp_path}/missing)"
        in log
    )


@pytest.fixture()
def shared_dir() -> Iterator[Path]:
    """A directory others may enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="relaymilter-startup-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody() -> List[str]:
    """A command prefix that runs the rest as the unprivileged user nobody."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another user")
    nobody = pwd.getpwnam("nobody")
    return [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
        "--",
    ]


def test_permission_denied_is_named(shared_dir: Path, tmp_path: Path) -> None:
    # nobody runs a copy it can read: the checkout may be in /root (mode 0700).
    argv = [*as_nobody(), *readable_relaymilter_command(shared_dir), "run"]
    config = shared_dir / "relaymilter.yml"
    config.write_text(CONFIG)
    os.chmod(config, 0o644)
    closed = shared_dir / "root-only"
    closed.mkdir(mode=0o755)
    spec = f"unix:{closed}/milter.sock"
    code, log = failed_start(config, spec, tmp_path / "denied.log", argv)
    assert code == 1, log
    assert f"cannot start: cannot listen on {spec}: Permission denied" in log


def test_a_unix_socket_path_too_long_for_libmilter(config_file: Path, tmp_path: Path) -> None:
    # libmilter binds paths of at most 106 bytes (sun_path is 108, NUL included).
    longest = tmp_path / ("s" * (106 - len(str(tmp_path)) - 1))
    assert len(str(longest)) == 106
    with running_daemon(config_file, f"unix:{longest}", tmp_path / "longest.log"):
        assert verdict(f"unix:{longest}") == "550 " + ATTR36
    too_long = f"unix:{longest}x"
    code, log = failed_start(config_file, too_long, tmp_path / "too-long.log")
    assert code == 78, log
    assert (
        f"cannot start: --socket '{too_long}': the unix socket path is too long (107 bytes; at most 106"
        in log
    )
    # check-config reports it like any other error, with file, line and key.
    config_file.write_text(f"socket: {too_long}\n{CONFIG}")
    result = run_cli("check-config", "-c", str(config_file))
    assert result.returncode == 1
    assert (
        f"{config_file}:1: socket: '{too_long}': the unix socket path is too long" in result.stderr
    )


# -- exit status --------------------------------------------------------------


@pytest.mark.parametrize(
    "config_text, spec, message",
    [
        ("organizations: []\n", None, "organizations: must list at least one organization"),
        (CONFIG, "unix:relative.sock", "the unix socket path must be absolute"),
        (CONFIG, "inet:99999@127.0.0.1", "is not a port number"),
    ],
    ids=["config", "socket-relative", "socket-port"],
)
def test_a_configuration_error_exits_78(
    config_text: str, spec: Optional[str], message: str, tmp_path: Path
) -> None:
    config = tmp_path / "relaymilter.yml"
    config.write_text(config_text)
    code, log = failed_start(config, spec or f"unix:{tmp_path}/m.sock", tmp_path / "78.log")
    assert code == 78, log
    assert message in log
    assert not (tmp_path / "m.sock").exists()


def test_a_missing_config_file_exits_78(tmp_path: Path) -> None:
    code, log = failed_start(tmp_path / "absent.yml", f"unix:{tmp_path}/m.sock", tmp_path / "l")
    assert code == 78, log
    assert "No such file or directory" in log


# -- stopping -----------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGUSR2, signal.SIGTERM], ids=["USR2", "TERM"])
def test_a_clean_stop_removes_the_socket_file(
    stop_signal: signal.Signals, config_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    spec = f"unix:{path}"
    daemon = Daemon(config_file, spec, tmp_path / "stop.log")
    try:
        wait_for_socket(spec, daemon.process)
        daemon.process.send_signal(stop_signal)
        stop_promptly(daemon.process, spec, EXIT_DEADLINE)  # wakes libmilter after SIGTERM
        assert daemon.process.wait(EXIT_DEADLINE) == 0
    finally:
        daemon.stop()
    assert "stopped: " in daemon.log()
    assert not path.exists()


def test_a_stop_leaves_a_socket_file_that_is_no_longer_its_own(
    config_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "milter.sock"
    moved = tmp_path / "moved.sock"
    daemon = Daemon(config_file, f"unix:{path}", tmp_path / "replaced.log")
    try:
        wait_for_socket(f"unix:{path}", daemon.process)
        os.rename(path, moved)
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(path))  # someone else's socket now
            theirs = os.lstat(path).st_ino
            daemon.process.terminate()
            # Wake libmilter through the socket it still listens on.
            stop_promptly(daemon.process, f"unix:{moved}", EXIT_DEADLINE)
            assert daemon.process.wait(EXIT_DEADLINE) == 0
            assert os.lstat(path).st_ino == theirs
    finally:
        daemon.stop()
    assert f"left {path} alone: it is no longer the socket relaymilter created" in daemon.log()


# -- a reload never holds up a stop -------------------------------------------


def test_sigusr2_stops_during_a_reload_that_hangs(config_file: Path, tmp_path: Path) -> None:
    argv, _release = gated_reload_command(tmp_path)  # never released
    spec = f"unix:{tmp_path}/gated.sock"
    with running_daemon(config_file, spec, tmp_path / "gated.log", argv) as daemon:
        daemon.reload()
        daemon.wait_for_log("test: reload 1 waits")
        daemon.process.send_signal(signal.SIGUSR2)
        assert daemon.process.wait(EXIT_DEADLINE) == 0
    assert "stopped: " in daemon.log()


def test_a_reload_refuses_a_fifo_and_the_daemon_still_stops(
    config_file: Path, tmp_path: Path
) -> None:
    spec = f"unix:{tmp_path}/fifo.sock"
    with running_daemon(config_file, spec, tmp_path / "fifo.log") as daemon:
        config_file.unlink()
        os.mkfifo(config_file)  # nobody ever writes to it
        daemon.reload()
        log = daemon.wait_for_log("reload: failed, keeping the previous configuration")
        assert "cannot read the config file: it is a FIFO, not a regular file" in log
        assert verdict(spec) == "550 " + ATTR36
        daemon.process.send_signal(signal.SIGUSR2)
        assert daemon.process.wait(EXIT_DEADLINE) == 0


def test_reload_requests_during_a_reload_make_one_more_reload(
    config_file: Path, tmp_path: Path
) -> None:
    argv, release = gated_reload_command(tmp_path)
    spec = f"unix:{tmp_path}/gated.sock"
    with running_daemon(config_file, spec, tmp_path / "gated.log", argv) as daemon:
        daemon.reload()
        daemon.wait_for_log("test: reload 1 waits")
        config_file.write_text("mode: monitor\n" + CONFIG)
        daemon.reload()
        daemon.wait_for_log("reload: requested during a reload; one more follows it")
        daemon.reload()
        daemon.wait_for_log("reload: requested during a reload; one more is already queued")
        # Meanwhile the milter answers, with the old config.
        assert verdict(spec) == "550 " + ATTR36
        Path(f"{release}.1").touch()
        daemon.wait_for_log("test: reload 2 waits")
        Path(f"{release}.2").touch()
        daemon.wait_for_log("reload: loaded", after=daemon.log().index("reload 2 waits"))
        assert verdict(spec) == "continue"
        daemon.process.send_signal(signal.SIGUSR2)
        assert daemon.process.wait(EXIT_DEADLINE) == 0
    log = daemon.log()
    assert log.count("reload: loaded") == 2
    assert "test: reload 3 waits" not in log


def test_no_reload_news_for_systemd_once_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload that finishes after the stop must not announce READY=1.
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notifier = ServiceNotifier("the milter on inet:8894@127.0.0.1", lambda: "ok")
        notifier.stopping()
        notifier.reloading()
        notifier.reloaded()
        systemd.setblocking(False)  # sending is synchronous: all is queued already
        received = []
        while True:
            try:
                received.append(systemd.recv(4096).decode())
            except BlockingIOError:
                break
    assert [m.splitlines()[0] for m in received] == ["STOPPING=1"]
