"""``relaymilter policy``: the Postfix policy service's daemon (daemon.service does the rest).

The socket: the one systemd passes (``relaymilter-policy.socket``: systemd
creates it in Postfix's ``private/`` directory with Postfix's owner, which
this service's user could not), else ``--socket``, else the config's
``policy_service.socket``. A unix socket of its own is made as the milter's is
(``daemon.listener``: never over a live one, mode 0660).

Signals, taken by the event loop: SIGUSR1 reloads (in the reload worker, so
the loop keeps answering); SIGTERM, SIGINT, SIGUSR2 and SIGHUP stop at once
(every answer has gone out: deciding never waits). Under systemd the watchdog
checks that the event loop still runs callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
import threading
from typing import Any, Dict, Optional

from ..base.socketspec import SocketSpec
from ..core.model import Config, MetricsSettings
from ..daemon.listener import StartError, check_inet_bind, open_unix, reason
from ..daemon.notify import SelfCheck
from ..daemon.runtime import Runtime
from ..daemon.service import EXIT_FAILURE, EXIT_OK, Service
from .server import PolicyServer

logger = logging.getLogger("relaymilter")

#: The first descriptor systemd passes (sd_listen_fds(3)).
LISTEN_FDS_START = 3
#: Connections the kernel queues while the loop is busy: Postfix's smtpd processes connect at once.
BACKLOG = 512
#: How asyncio serves a unix socket. Python 3.13's asyncio, by default, stats the
#: socket's path at start and removes the file when the server closes: the
#: file is systemd's (relaymilter-policy.socket keeps listening on it) or the
#: service's own, removed on a clean stop as the milter's; and in Postfix's
#: private/ (0700 postfix) the stat fails, which stopped the service at start.
UNIX_SERVER_OPTIONS: Dict[str, Any] = {"backlog": BACKLOG}
if sys.version_info >= (3, 13):
    UNIX_SERVER_OPTIONS["cleanup_socket"] = False
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP)
RELOAD_SIGNAL = signal.SIGUSR1


class PolicyService(Service):
    name = "the policy service"

    def __init__(self, config_path: str, socket_override: Optional[str]) -> None:
        self.inherited = inherited_socket()
        if self.inherited is not None and socket_override is None:
            socket_override = describe_socket(self.inherited)
        super().__init__(config_path, socket_override)
        self.listening: Optional[socket.socket] = self.inherited
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.stopped: Optional[asyncio.Event] = None

    def socket_of(self, config: Config) -> Optional[str]:
        return config.policy_service.socket if config.policy_service else None

    def metrics_of(self, config: Config) -> Optional[MetricsSettings]:
        return config.policy_service.metrics if config.policy_service else None

    def missing_socket(self) -> str:
        return (
            "no socket: set policy_service.socket in the configuration, give --socket, "
            "or start relaymilter-policy.socket, whose socket systemd passes on"
        )

    def prepare(self, spec: SocketSpec, runtime: Runtime) -> None:
        # The loop's own signal handlers take them; the worker threads must not.
        signal.pthread_sigmask(signal.SIG_BLOCK, {RELOAD_SIGNAL, *STOP_SIGNALS})

    def listen(self, spec: SocketSpec) -> None:
        if self.listening is not None:
            return  # systemd's
        try:
            if spec.is_unix and spec.path:
                path = spec.path
                self.socket_file = open_unix(self.socket, path, lambda: self._bind_unix(path))
            else:
                check_inet_bind(self.socket, spec)
                self._bind_inet(spec)
        except OSError as exc:
            raise StartError(f"cannot listen on {self.socket}: {reason(exc)}") from None

    def _bind_unix(self, path: str) -> None:
        self.listening = listening_socket(socket.AF_UNIX, path)

    def _bind_inet(self, spec: SocketSpec) -> None:
        family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
        address = socket.getaddrinfo(spec.host, spec.port, family, socket.SOCK_STREAM)[0][4]
        self.listening = listening_socket(family, address, reuse_address=True)

    def self_check(self) -> Optional[SelfCheck]:
        return self._loop_answers

    def _loop_answers(self, timeout: float) -> Optional[str]:
        """Whether the event loop runs a callback within ``timeout``: it answers every request."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return "the event loop is not running"
        ran = threading.Event()
        try:
            loop.call_soon_threadsafe(ran.set)
        except RuntimeError:
            return "the event loop is closed"
        if not ran.wait(timeout):
            return f"the event loop did not run within {timeout:g} s"
        return None

    def serve(self) -> int:
        assert self.listening is not None and self.runtime is not None
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            return loop.run_until_complete(self._serve_until_stopped(self.listening, self.runtime))
        except OSError as exc:
            logger.error("the policy service stopped with an error: %s", reason(exc))
            return EXIT_FAILURE
        finally:
            loop.close()

    async def _serve_until_stopped(self, listening: socket.socket, runtime: Runtime) -> int:
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        for number in STOP_SIGNALS:
            loop.add_signal_handler(number, self._stop, stopped, number)
        loop.add_signal_handler(RELOAD_SIGNAL, self.reloads.request)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {RELOAD_SIGNAL, *STOP_SIGNALS})
        connections = PolicyServer(runtime, loop)
        listening.setblocking(False)
        factory = connections.protocol_factory()
        # asyncio listens again with its own backlog (100 by default): ours.
        if listening.family == socket.AF_UNIX:
            server = await loop.create_unix_server(factory, sock=listening, **UNIX_SERVER_OPTIONS)
        else:
            server = await loop.create_server(factory, sock=listening, backlog=BACKLOG)
        connections.start_sweeps()
        await stopped.wait()
        server.close()
        connections.close_all()
        await server.wait_closed()
        return EXIT_OK

    def _stop(self, stopped: asyncio.Event, number: int) -> None:
        logger.info("stopping (%s)", signal.Signals(number).name)
        stopped.set()


def listening_socket(family: int, address: Any, reuse_address: bool = False) -> socket.socket:
    """A stream socket bound to ``address`` and listening, closed again if either fails."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def inherited_socket() -> Optional[socket.socket]:
    """The listening socket systemd passed (LISTEN_FDS, for this process), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "")
    if not count.isdigit() or int(count) < 1:
        return None
    # Not for a child that inherits the environment.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    fd = LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise StartError(f"the descriptor {fd} systemd passed is not a socket")
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock


def describe_socket(sock: socket.socket) -> str:
    """The socket spec of a listening socket (what the logs and the status name)."""
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address}"
    if sock.family == socket.AF_INET6:
        return f"inet6:{address[1]}@{address[0]}"
    return f"inet:{address[1]}@{address[0]}"


def run(config_path: str, socket_override: Optional[str]) -> int:
    try:
        service = PolicyService(config_path, socket_override)
    except StartError as exc:
        logger.error("cannot start: %s", exc)
        return EXIT_FAILURE
    return service.run()
