"""``relaymilter run``: load the config, open the milter socket, serve, reload on SIGUSR1.

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
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from typing import Optional

import Milter
import milter

from .config import ConfigError, load_config
from .milter import RelayMilter
from .model import Config
from .notify import ServiceNotifier, milter_address
from .socketspec import SocketSpec, SocketSpecError, parse_socket_spec

logger = logging.getLogger("relaymilter")

MILTER_NAME = "relaymilter"
RELOAD_SIGNAL = signal.SIGUSR1
STOP_SIGNAL = signal.SIGUSR2
_BLOCKED_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, RELOAD_SIGNAL, STOP_SIGNAL}
# How often a prompt stop knocks on the socket until the accept loop has ended.
_WAKE_INTERVAL = 0.05


class Daemon:
    def __init__(self, config_path: str, socket_override: Optional[str]) -> None:
        self.config_path = config_path
        self.socket_override = socket_override
        self.socket = ""
        self.notifier: Optional[ServiceNotifier] = None
        self.serving = threading.Event()

    def status(self) -> str:
        config = RelayMilter.current_config
        return f"{config.summary()}; {RelayMilter.counter.describe()}"

    def run(self) -> int:
        config = self._load_initial()
        if config is None:
            return 1
        self.socket = self.socket_override or config.socket
        try:
            spec = parse_socket_spec(self.socket)
        except SocketSpecError as exc:
            logger.error("cannot start: --socket %s", exc)
            return 1
        RelayMilter.current_config = config
        RelayMilter.stream_socket = not spec.is_unix
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
        if not self._open_socket(spec):
            return 1
        self.notifier = ServiceNotifier(self.socket, self.status)
        logger.info("listening on %s: %s (%s)", self.socket, config.summary(), self.config_path)
        self.notifier.ready()
        self.notifier.start_watchdog()
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()
        self.serving.set()
        try:
            milter.main()
        except milter.error as exc:
            logger.error("milter stopped with an error: %s", exc)
            return 1
        finally:
            self.serving.clear()
            self.notifier.stopping()
        logger.info("stopped: %s", RelayMilter.counter.describe())
        return 0

    def _load_initial(self) -> Optional[Config]:
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            logger.error(
                "cannot start: %d error(s) in %s:\n%s", len(exc.issues), self.config_path, exc
            )
            return None
        for warning in config.warnings:
            logger.warning("config: %s", warning)
        return config

    def _open_socket(self, spec: SocketSpec) -> bool:
        _register_callbacks()
        milter.setconn(self.socket)
        milter.register(MILTER_NAME, negotiate=Milter.negotiate_callback)
        if spec.is_unix and spec.path and not os.path.isdir(os.path.dirname(spec.path)):
            logger.error("cannot start: directory %s does not exist", os.path.dirname(spec.path))
            return False
        # A unix socket is born 0660 (never world-writable): the MTA reaches it
        # through group membership.
        previous = os.umask(0o117) if spec.is_unix else None
        try:
            milter.opensocket(True)
        except milter.error as exc:
            logger.error("cannot start: cannot listen on %s: %s", self.socket, exc)
            return False
        finally:
            if previous is not None:
                os.umask(previous)
        if spec.is_unix and spec.path:
            os.chmod(spec.path, 0o660)
        return True

    def _signal_loop(self) -> None:
        while True:
            if signal.sigwait({RELOAD_SIGNAL, STOP_SIGNAL}) == STOP_SIGNAL:
                self.stop_promptly()
                return
            self.reload()

    def stop_promptly(self) -> None:
        """Ask libmilter to stop, and wake its accept loop until it has."""
        logger.info("stopping (SIGUSR2)")
        # smfi_stop() sets the stop flag, then waits for the accept loop.
        threading.Thread(target=milter.stop, name="stop", daemon=True).start()
        try:
            family, address = milter_address(self.socket)
        except (SocketSpecError, OSError):
            return  # libmilter still stops, within 5 s
        while self.serving.is_set():
            with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as knock:
                knock.settimeout(1)
                knock.connect(address)
            time.sleep(_WAKE_INTERVAL)

    def reload(self) -> bool:
        """Build and validate a new config; swap it in, or keep the old one and say why."""
        if self.notifier:
            self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            logger.error(
                "reload: failed, keeping the previous configuration: %d error(s) in %s:\n%s",
                len(exc.issues),
                self.config_path,
                exc,
            )
            return False
        except Exception:
            logger.error("reload: failed, keeping the previous configuration", exc_info=True)
            return False
        finally:
            if self.notifier:
                self.notifier.reloaded()
        for warning in config.warnings:
            logger.warning("config: %s", warning)
        if not self.socket_override and config.socket != self.socket:
            logger.warning(
                "reload: socket changed to %s; it takes effect on restart", config.socket
            )
        RelayMilter.current_config = config
        logger.info("reload: loaded %s: %s", self.config_path, config.summary())
        return True


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
    return Daemon(config_path, socket_override).run()
