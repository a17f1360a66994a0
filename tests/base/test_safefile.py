"""read_regular_file: regular files only, bounded, never blocking."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

from relaymilter.base.safefile import (
    CERTIFICATE_FILE_LIMIT,
    CONFIG_FILE_LIMIT,
    UnsafeFileError,
    read_regular_file,
)

from ..support import readable_copy

# Generous: a refusal takes microseconds; the bound only keeps a regression
# that blocks from hanging the suite.
DEADLINE = 30


def refusal(path: Path, limit: int = 1024, what: str = "the config file") -> UnsafeFileError:
    with pytest.raises(UnsafeFileError) as caught:
        read_regular_file(str(path), limit, what)
    return caught.value


def test_limits() -> None:
    assert CONFIG_FILE_LIMIT == 64 * 1024 * 1024
    assert CERTIFICATE_FILE_LIMIT == 1024 * 1024


def test_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "relaymilter.yml"
    path.write_bytes(b"mode: enforce\n")
    assert read_regular_file(str(path), 1024, "the config file") == b"mode: enforce\n"
    (tmp_path / "empty").write_bytes(b"")
    assert read_regular_file(str(tmp_path / "empty"), 1024) == b""


def test_a_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real.pem").write_bytes(b"pem")
    (tmp_path / "link.pem").symlink_to(tmp_path / "real.pem")
    assert read_regular_file(str(tmp_path / "link.pem"), 1024, "certificate file") == b"pem"


def test_dev_zero_is_refused() -> None:
    error = refusal(Path("/dev/zero"), limit=CONFIG_FILE_LIMIT)
    assert error.strerror == "it is a character device, not a regular file"
    assert str(error) == (
        "cannot read the config file /dev/zero: it is a character device, not a regular file"
    )
    assert error.filename == "/dev/zero"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    error = refusal(tmp_path)
    assert error.strerror == "it is a directory, not a regular file"
    assert error.errno == errno.EISDIR


def test_a_socket_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "s"))
        listener.listen()
        assert refusal(tmp_path / "s").strerror == "it is a socket, not a regular file"


def test_a_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "zero").symlink_to("/dev/zero")
    assert refusal(tmp_path / "zero").strerror == "it is a character device, not a regular file"


@pytest.fixture()
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path
    # A regression blocked in open() is released: open the other end.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # no reader left: nothing was blocked


def test_a_fifo_is_refused_without_blocking(fifo: Path) -> None:
    outcome: List[BaseException] = []

    def read() -> None:
        try:
            read_regular_file(str(fifo), 1024, "the config file")
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(DEADLINE)
    assert not reader.is_alive(), "read_regular_file blocked on a FIFO"
    assert len(outcome) == 1 and isinstance(outcome[0], UnsafeFileError), outcome
    assert outcome[0].strerror == "it is a FIFO, not a regular file"


def test_a_fifo_with_a_writer_is_refused(fifo: Path) -> None:
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets the writer open
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"mode: enforce\n")
        assert refusal(fifo).strerror == "it is a FIFO, not a regular file"
    finally:
        os.close(writer)
        os.close(reader)


def test_a_huge_sparse_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yml"
    with open(path, "wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB of nothing: reading it would take hours
    error = refusal(path, limit=CONFIG_FILE_LIMIT)
    assert error.strerror == (
        "it is 1024 GiB (1099511627776 bytes), more than the limit of 64 MiB (67108864 bytes)"
    )
    assert error.errno == errno.EFBIG


@pytest.mark.parametrize("size", [0, 1, 1023, 1024])
def test_a_file_up_to_the_limit_is_read(size: int, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * size)
    assert read_regular_file(str(path), 1024) == b"x" * size


def test_a_file_one_byte_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1025)
    assert refusal(path, limit=1024).strerror == (
        "it is 1 KiB (1025 bytes), more than the limit of 1 KiB (1024 bytes)"
    )


def test_a_file_larger_than_it_says_is_refused() -> None:
    # /proc files report size 0, like a file that grows after fstat: the read
    # itself stops one byte past the limit.
    status = Path("/proc/self/status")
    assert status.stat().st_size == 0
    error = refusal(status, limit=16)
    assert error.strerror == "it holds more than the limit of 16 bytes (it grew while being read)"


def test_a_missing_file(tmp_path: Path) -> None:
    error = refusal(tmp_path / "absent.yml")
    assert error.strerror == "No such file or directory"
    assert error.errno == errno.ENOENT
    assert (
        str(error)
        == f"cannot read the config file {tmp_path}/absent.yml: No such file or directory"
    )
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "absent.yml")
    assert refusal(dangling).strerror == "No such file or directory"


def test_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert refusal(tmp_path / "file" / "child").strerror == "Not a directory"


def test_permission_denied() -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to read as another user")
    nobody = pwd.getpwnam("nobody")
    # Not in tmp_path: its 0700 parents would refuse nobody before the file does.
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-safefile-"))
    try:
        os.chmod(directory, 0o755)
        secret = directory / "secret.pem"
        secret.write_text("secret")
        os.chmod(secret, 0o600)
        python, copy = readable_copy(directory)  # the checkout may be in /root (0700)
        code = (
            f"import sys; sys.path.insert(0, {str(copy)!r})\n"
            "from relaymilter.base.safefile import UnsafeFileError, read_regular_file\n"
            "try:\n"
            f"    read_regular_file({str(secret)!r}, 1024, 'certificate file')\n"
            "except UnsafeFileError as exc:\n"
            "    print(exc.strerror); print(exc)\n"
        )
        as_nobody = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
        result = subprocess.run(
            [*as_nobody, "--clear-groups", python, "-c", code],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            cwd="/",
        )
    finally:
        shutil.rmtree(directory)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "Permission denied",
        f"cannot read certificate file {secret}: Permission denied",
    ]


def test_it_is_an_oserror(tmp_path: Path) -> None:
    # Callers that catch OSError and report strerror keep working.
    with pytest.raises(OSError) as caught:
        read_regular_file(str(tmp_path), 1024)
    assert caught.value.strerror == "it is a directory, not a regular file"
