"""systemd notifications: readiness, status, reload, stop, and a watchdog that checks the service.

Sent with the ``sdnotify`` package, only when systemd set ``NOTIFY_SOCKET``
(``Type=notify``); otherwise every method does nothing.

The watchdog (``WatchdogSec=`` in the unit) does not merely prove that the
Python process is alive: every half period it runs the front end's self-check
(the milter completes an option negotiation on its own socket; the policy
service has its event loop answer). Only if that passes is ``WATCHDOG=1``
sent, so a service that no longer answers its MTA is killed and restarted by
systemd.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional, Tuple

import sdnotify

from ..base.socketspec import parse_socket_spec

logger = logging.getLogger("relaymilter.notify")

#: (address family, socket address) to connect to.
Address = Tuple[int, Any]
#: A self-check given a timeout: None if the service answered, else why not.
SelfCheck = Callable[[float], Optional[str]]


class ServiceNotifier:
    """Tells systemd (when NOTIFY_SOCKET is set) how the daemon is doing.

    ``what`` names the service in the watchdog's log lines ("the milter on
    inet:8894@127.0.0.1"); ``status`` returns the current STATUS= text;
    ``check`` is the watchdog's self-check (None: the watchdog proves only
    that the process runs).
    """

    def __init__(
        self, what: str, status: Callable[[], str], check: Optional[SelfCheck] = None
    ) -> None:
        self._what = what
        self._status = status
        self._check = check
        self._notifier = _connect_notifier()
        self._stop = threading.Event()
        self._watchdog: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self._notifier is not None

    def ready(self) -> None:
        """The config is loaded and the socket listens."""
        self._send("READY=1", self._status_line())

    def reloading(self) -> None:
        if self._stop.is_set():
            return  # a reload still running when the daemon stops: systemd hears STOPPING last
        # MONOTONIC_USEC lets systemd (254+, Type=notify-reload) match the
        # RELOADING=1 with the reload it asked for; older versions ignore it.
        usec = time.monotonic_ns() // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def reloaded(self) -> None:
        """Back in service, with the new config or, after a failed reload, the old one."""
        if self._stop.is_set():
            return  # not back in service: stopping
        self._send("READY=1", self._status_line())

    def stopping(self) -> None:
        self._stop.set()
        self._send("STOPPING=1", "STATUS=stopping")

    def start_watchdog(self) -> bool:
        """Start the watchdog thread if systemd asked for pings; return whether it started."""
        interval = watchdog_interval(os.environ, os.getpid())
        if interval is None or self._notifier is None or self._watchdog is not None:
            return False
        self._watchdog = threading.Thread(
            target=self._watch, args=(interval,), name="watchdog", daemon=True
        )
        self._watchdog.start()
        return True

    def _watch(self, interval: float) -> None:
        # A check gets at most half an interval, plus a shorter grace on
        # failure (see _ping_if_answering): the next ping still falls inside
        # WatchdogSec = 2 * interval.
        timeout = min(5.0, interval / 2)
        healthy = True
        # Check (and ping) at once, then every interval: the first ping must
        # not wait for a whole interval after a slow start.
        while True:
            healthy = self._ping_if_answering(timeout, healthy)
            if self._stop.wait(interval):
                return

    def _ping_if_answering(self, timeout: float, healthy: bool) -> bool:
        """One self-check; WATCHDOG=1 if it passed. Logs only changes of health."""
        problem = None if self._check is None else self._check(timeout)
        if problem is None:
            self._send("WATCHDOG=1", self._status_line())
            if not healthy:
                logger.warning("watchdog: %s answers again", self._what)
            return True
        # A stopping service stops answering a moment before it says so
        # (libmilter stops accepting before milter.main() returns): a failure
        # then is the shutdown, not a hang.
        if self._stop.wait(min(1.0, timeout / 2)):
            return False
        if healthy:
            logger.error(
                "watchdog: %s does not answer (%s); not telling systemd it is alive",
                self._what,
                problem,
            )
        return False

    def _status_line(self) -> str:
        try:
            text = self._status()
        except Exception:  # a status is never worth failing a notification
            logger.debug("status text failed", exc_info=True)
            return "STATUS=running"
        # One line: a newline would end the assignment.
        return "STATUS=" + " ".join(text.split())

    def _send(self, *assignments: str) -> None:
        if self._notifier is None:
            return
        message = "\n".join(assignments)
        try:
            # sdnotify encodes with latin-1, which would fail on any other
            # character in STATUS= and drop the whole message (READY=1 too).
            # Handing it the UTF-8 bytes as latin-1 code points sends UTF-8,
            # which systemd expects.
            self._notifier.notify(message.encode("utf-8").decode("latin-1"))
        except OSError as exc:
            logger.warning("cannot notify systemd (%s): %s", exc, message.splitlines()[0])


def _connect_notifier() -> Any:
    """An sdnotify notifier bound to NOTIFY_SOCKET, or None when not run by systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        # debug=True: raise instead of silently swallowing errors.
        return sdnotify.SystemdNotifier(debug=True)
    except OSError as exc:
        logger.warning(
            "cannot reach systemd's NOTIFY_SOCKET %s: %s", os.environ["NOTIFY_SOCKET"], exc
        )
        return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Seconds between pings (half of WATCHDOG_USEC), or None if no watchdog is asked of us."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # WATCHDOG_PID names the process that must ping; a child that inherited
    # the environment must not ping for its parent.
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2_000_000


def socket_address(spec: str) -> Address:
    """Where to connect to reach a service listening on ``spec``.

    A wildcard or empty host (listening on every address) is reached on the
    loopback address of the same family.
    """
    parsed = parse_socket_spec(spec)
    if parsed.is_unix:
        return socket.AF_UNIX, parsed.path
    family = socket.AF_INET6 if parsed.family == "inet6" else socket.AF_INET
    host = parsed.host or ""
    if _is_wildcard(host):
        host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    # A host name is resolved once, as the service did when it bound the socket.
    info = socket.getaddrinfo(host, parsed.port, family, socket.SOCK_STREAM)
    return family, info[0][4]


def _is_wildcard(host: str) -> bool:
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host.upper() == "INADDR_ANY"
