"""Reading a file an admin named, without ever blocking or reading without bound.

The config names files (the config file itself, certificate files), and a path
can name something that is not a plain file: ``open()`` of a FIFO with no
writer blocks forever, ``read()`` of ``/dev/zero`` never ends, and opening some
devices has side effects (``/dev/watchdog`` arms the watchdog). In the daemon
either would hang the start or a reload. ``read_regular_file`` refuses all of
them, and any file larger than a limit, with a message for the admin.

Errors are raised as :class:`UnsafeFileError`, a subclass of ``OSError``, so
code that already catches ``OSError`` and reports ``exc.strerror`` keeps
working: ``strerror`` is the reason alone (``Permission denied``, ``it is a
FIFO, not a regular file``), ``filename`` the path, and ``str(exc)`` a whole
sentence naming both.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import List, Optional

#: The largest config file read (a config with 100,000 accepted domains is a few MiB).
CONFIG_FILE_LIMIT = 64 * 1024 * 1024
#: The largest certificate file read (a PEM certificate is a few KiB, a chain a few more).
CERTIFICATE_FILE_LIMIT = 1024 * 1024

# O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer.
# O_NOCTTY: opening a terminal never makes it our controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1024 * 1024

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class UnsafeFileError(OSError):
    """A file that cannot be read, or must not be: ``strerror`` says why, ``str()`` says all."""

    def __init__(self, path: str, what: str, reason: str, code: Optional[int] = None) -> None:
        super().__init__(code, reason, path)
        self.what = what

    def __str__(self) -> str:
        return f"cannot read {self.what} {self.filename}: {self.strerror}"


def read_regular_file(path: str, limit: int, what: str = "file") -> bytes:
    """Return the contents of the regular file at ``path``, at most ``limit`` bytes.

    ``what`` names the file in messages, as in "cannot read {what} {path}: …"
    ("the config file", "certificate file").
    A symbolic link to a regular file is followed. Raises UnsafeFileError for
    anything else: a missing or unreadable file (with the system's reason), a
    FIFO, a device, a directory or a socket, or a file larger than ``limit``.
    """
    # Check the path before opening it, so that a device is never opened at
    # all; then check what was opened, which is what counts if the path was
    # swapped in between.
    _check_regular(path, what, _stat(path, what))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise _os_error(path, what, exc) from None
    try:
        info = os.fstat(fd)
        _check_regular(path, what, info)
        _check_size(path, what, info.st_size, limit)
        return _read_at_most(fd, path, what, limit)
    except OSError as exc:
        raise _os_error(path, what, exc) from None
    finally:
        os.close(fd)


def describe_kind(mode: int) -> str:
    """What kind of file ``mode`` (an ``st_mode``) is, e.g. "a FIFO"."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise _os_error(path, what, exc) from None


def _check_regular(path: str, what: str, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = describe_kind(info.st_mode)
        code = errno.EISDIR if stat.S_ISDIR(info.st_mode) else errno.EINVAL
        raise UnsafeFileError(path, what, f"it is {kind}, not a regular file", code)


def _check_size(path: str, what: str, size: int, limit: int) -> None:
    if size > limit:
        raise UnsafeFileError(
            path,
            what,
            f"it is {_size(size)}, more than the limit of {_size(limit)}",
            errno.EFBIG,
        )


def _read_at_most(fd: int, path: str, what: str, limit: int) -> bytes:
    # Read one byte more than allowed: a file that grew since fstat (or that
    # reports a wrong size, as /proc files do) is refused, not cut short.
    chunks: List[bytes] = []
    remaining = limit + 1
    while remaining > 0:
        chunk = os.read(fd, min(remaining, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    if remaining <= 0:
        raise UnsafeFileError(
            path,
            what,
            f"it holds more than the limit of {_size(limit)} (it grew while being read)",
            errno.EFBIG,
        )
    return b"".join(chunks)


def _os_error(path: str, what: str, exc: OSError) -> UnsafeFileError:
    if isinstance(exc, UnsafeFileError):
        return exc
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return UnsafeFileError(path, what, reason, exc.errno)


def _size(size: int) -> str:
    """A size for a message: exact bytes, and GiB, MiB or KiB for the larger ones."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            amount = f"{size / scale:.1f}".removesuffix(".0")
            return f"{amount} {unit} ({size} bytes)"
    return f"{size} bytes" if size != 1 else "1 byte"
