"""``relaymilter run``: the milter's daemon (daemon.service does the loading, reloading, status).

Signals: libmilter runs its own thread that ``sigwait``s for SIGHUP, SIGTERM and
SIGINT and treats each of them as "stop". A Python handler could not reliably
see SIGHUP before libmilter does, so reload is SIGUSR1, taken by a thread of
ours with ``sigwait``. All these signals are blocked in the main thread before
any thread starts, so every thread inherits the mask and each signal reaches
exactly the thread that waits for it.

libmilter notices a stop request only when its accept loop wakes: every 5 s,
or at once when a connection arrives. SIGUSR2 (the unit's ``KillSignal=``) is a
prompt stop: the same stop request, then a connection to our own socket to
wake the loop.

A reload runs in a worker thread of its own, never in the signal thread: a
reload that is slow or stuck (a file that blocks, a slow disk) must not delay
the stop signal, which the signal thread waits for.

The socket is opened through ``daemon.listener``, which never takes over
a live milter's socket and names the system's reason for a failure.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from typing import Optional

import Milter
import milter

from ..base.socketspec import SocketSpec, SocketSpecError
from ..core.model import Config, MetricsSettings
from ..daemon.listener import StartError, check_inet_bind, open_unix, reason
from ..daemon.notify import SelfCheck, socket_address
from ..daemon.runtime import Runtime
from ..daemon.service import EXIT_FAILURE, EXIT_OK, Service
from .milter import RelayMilter
from .selfcheck import milter_self_check

logger = logging.getLogger("relaymilter")

MILTER_NAME = "relaymilter"
RELOAD_SIGNAL = signal.SIGUSR1
STOP_SIGNAL = signal.SIGUSR2
_BLOCKED_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, RELOAD_SIGNAL, STOP_SIGNAL}
# How often a prompt stop knocks on the socket until the accept loop has ended.
_WAKE_INTERVAL = 0.05


class MilterService(Service):
    name = "the milter"

    def __init__(self, config_path: str, socket_override: Optional[str]) -> None:
        super().__init__(config_path, socket_override)
        self.serving = threading.Event()

    def socket_of(self, config: Config) -> Optional[str]:
        return config.socket

    def metrics_of(self, config: Config) -> Optional[MetricsSettings]:
        return config.metrics

    def prepare(self, spec: SocketSpec, runtime: Runtime) -> None:
        RelayMilter.runtime = runtime
        RelayMilter.stream_socket = not spec.is_unix
        # Before any thread starts: every thread inherits the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)

    def listen(self, spec: SocketSpec) -> None:
        """Listen on ``spec`` through libmilter, or raise StartError with the system's reason."""
        _register_callbacks()
        milter.setconn(self.socket)
        milter.register(MILTER_NAME, negotiate=Milter.negotiate_callback)
        try:
            if spec.is_unix and spec.path:
                self.socket_file = open_unix(self.socket, spec.path, self._libmilter_open)
            else:
                check_inet_bind(self.socket, spec)
                self._libmilter_open()
        except OSError as exc:
            raise StartError(f"cannot listen on {self.socket}: {reason(exc)}") from None

    def _libmilter_open(self) -> None:
        try:
            # False: libmilter must not unlink an existing socket file, which
            # could be a running milter's; open_unix removed a stale one.
            milter.opensocket(False)
        except milter.error as exc:
            # The trial bind passed, so this is rare; libmilter logs the reason
            # to syslog only.
            raise StartError(f"cannot listen on {self.socket}: libmilter: {exc}") from None

    def self_check(self) -> Optional[SelfCheck]:
        return milter_self_check(self.socket)

    def serve(self) -> int:
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()
        self.serving.set()
        try:
            milter.main()
        except milter.error as exc:
            logger.error("milter stopped with an error: %s", exc)
            return EXIT_FAILURE
        finally:
            self.serving.clear()
        return EXIT_OK

    def _signal_loop(self) -> None:
        while True:
            if signal.sigwait({RELOAD_SIGNAL, STOP_SIGNAL}) == STOP_SIGNAL:
                self.stop_promptly()
                return
            self.reloads.request()

    def stop_promptly(self) -> None:
        """Ask libmilter to stop, and wake its accept loop until it has."""
        logger.info("stopping (SIGUSR2)")
        # smfi_stop() sets the stop flag, then waits for the accept loop.
        threading.Thread(target=milter.stop, name="stop", daemon=True).start()
        try:
            family, address = socket_address(self.socket)
        except (SocketSpecError, OSError):
            return  # libmilter still stops, within 5 s
        while self.serving.is_set():
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as knock:
                knock.settimeout(1)
                knock.connect(address)
            time.sleep(_WAKE_INTERVAL)


def _register_callbacks() -> None:
    """Route libmilter's events to the per-connection RelayMilter.

    Only the events relaymilter uses get a Python callback. pymilter answers
    an event without a callback (EOM, abort, and the ones negotiated away)
    in C, without taking the GIL, so a message costs no Python call after its
    last RCPT TO. The close callback stays: it breaks the reference cycle
    between pymilter's context and the RelayMilter instance.
    """
    Milter.factory = RelayMilter
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_close_callback(Milter.close_callback)


def run(config_path: str, socket_override: Optional[str]) -> int:
    return MilterService(config_path, socket_override).run()
