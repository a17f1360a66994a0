"""A front end's listening socket: never take over a live one, and say why it fails.

libmilter's ``opensocket(True)`` would unlink whatever unix socket is in the
way, a running milter's included, and reports every failure as a bare "cannot
opensocket". So the path is checked first: a live socket is refused, a stale
one (nothing listens: ECONNREFUSED) is removed, and anything that is not a
socket is left alone and refused. A trial bind with Python's socket module
then gives the system's own reason for any failure ("Address already in use",
"Permission denied"). The front end then binds for real (libmilter, or the
policy service's own socket). On a clean stop the daemon removes its unix
socket file, if it is still the one it created.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..base.safefile import describe_kind
from ..base.socketspec import SocketSpec

logger = logging.getLogger("relaymilter")

# How long a check connection to an existing unix socket may take.
_PROBE_TIMEOUT = 2.0
# How long to wait for another relaymilter that is starting or stopping on the
# same socket directory (it holds the lock for a few milliseconds).
_LOCK_WAIT = 10.0
# How often a locked directory is tried again.
_LOCK_INTERVAL = 0.05


class StartError(Exception):
    """The daemon cannot start; the message says why, for the admin."""


@dataclass(frozen=True)
class SocketFile:
    """The unix socket file this daemon created, known by its device and inode."""

    path: str
    device: int
    inode: int

    def remove(self) -> None:
        """Remove the socket file if it is still ours; whatever took its place stays."""
        with _directory_lock(self.path):
            try:
                info = os.lstat(self.path)
            except FileNotFoundError:
                return  # libmilter removes it itself when not run as root
            except OSError as exc:
                logger.warning("cannot check the socket %s: %s", self.path, reason(exc))
                return
            if (info.st_dev, info.st_ino) != (self.device, self.inode) or not stat.S_ISSOCK(
                info.st_mode
            ):
                logger.warning(
                    "left %s alone: it is no longer the socket relaymilter created", self.path
                )
                return
            try:
                os.unlink(self.path)
            except OSError as exc:
                logger.warning("cannot remove the socket %s: %s", self.path, reason(exc))


def open_unix(text: str, path: str, bind: Callable[[], None]) -> SocketFile:
    """Make way for the socket at ``path`` (see ``_clear_stale``), then ``bind`` it."""
    # Under the lock, two relaymilters starting on the same path cannot both
    # find the old socket stale and one remove the other's new socket.
    with _directory_lock(path):
        _clear_stale(text, path)
        _check_unix_bind(text, path)
        # A unix socket is born 0660 (never world-writable): the MTA reaches
        # it through group membership.
        previous = os.umask(0o117)
        try:
            bind()
        finally:
            os.umask(previous)
        os.chmod(path, 0o660)
        info = os.lstat(path)
    return SocketFile(path, info.st_dev, info.st_ino)


def _clear_stale(text: str, path: str) -> None:
    """Leave ``path`` free: absent, or a stale socket, which is removed. Refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise StartError(
            f"cannot listen on {text}: {path} exists and is {describe_kind(info.st_mode)}, "
            "not a socket; relaymilter replaces only a stale socket, so move it away or "
            "choose another path"
        )
    problem = _probe_unix(path)
    if problem is None:
        raise StartError(
            f"cannot listen on {text}: {os.strerror(errno.EADDRINUSE)}: something already "
            f"answers on {path} (is relaymilter already running?)"
        )
    if problem == errno.ENOENT:
        return  # it went away meanwhile
    if problem != errno.ECONNREFUSED:
        raise StartError(
            f"cannot listen on {text}: cannot tell whether {path} is in use: {os.strerror(problem)}"
        )
    os.unlink(path)
    logger.warning("removed the stale socket %s: nothing listened on it", path)


def _probe_unix(path: str) -> Optional[int]:
    """None if something accepts connections on the unix socket ``path``, else the errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except OSError as exc:
            # EAGAIN is a listener whose backlog is full, a timeout a slow
            # one: both are alive.
            if exc.errno in (None, errno.EAGAIN):
                return None
            return exc.errno
    return None


def _check_unix_bind(text: str, path: str) -> None:
    """Bind a trial socket at ``path`` and remove it: any failure, with the system's reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trial:
        try:
            trial.bind(path)
        except OSError as exc:
            hint = f" (in {os.path.dirname(path)})" if exc.errno == errno.ENOENT else ""
            raise StartError(f"cannot listen on {text}: {reason(exc)}{hint}") from None
        os.unlink(path)


def check_inet_bind(text: str, spec: SocketSpec) -> None:
    """Bind a trial socket as the front end will: any failure, with the system's reason."""
    family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
    try:
        found = socket.getaddrinfo(
            spec.host, spec.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartError(
            f"cannot listen on {text}: cannot resolve {spec.host}: {exc.strerror}"
        ) from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as trial:
        # libmilter sets SO_REUSEADDR: then a port that only connections in
        # TIME_WAIT hold is free, and one a socket listens on is not.
        trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            trial.bind(address)
        except OSError as exc:
            raise StartError(f"cannot listen on {text}: {reason(exc)}") from None


@contextlib.contextmanager
def _directory_lock(socket_path: str) -> Iterator[None]:
    """Hold an exclusive flock on the directory of ``socket_path``, if it can be opened.

    Only relaymilter takes this lock, for the few milliseconds of checking,
    removing and creating its socket (or removing it at a stop). Without the
    directory, or with a lock held too long, it goes on unlocked: the bind
    then reports what is wrong.
    """
    directory = os.path.dirname(socket_path) or "/"
    try:
        fd: Optional[int] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = None
    try:
        if fd is not None:
            _lock(fd, directory)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(fd: int, directory: str) -> None:
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                logger.warning("%s stays locked; going on without the lock", directory)
                return
            time.sleep(_LOCK_INTERVAL)
        except OSError:
            return  # a file system without flock


def reason(exc: OSError) -> str:
    """The system's wording for an error, without Python's "[Errno N]" and path."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
