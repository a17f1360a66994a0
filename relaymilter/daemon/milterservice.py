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

A reload runs in a worker thread of its own, never in the signal thread: a
reload that is slow or stuck (a file that blocks, a slow disk) must not delay
the stop signal, which the signal thread waits for.

The socket is opened through ``relaymilter.listener``, which never takes over
a live milter's socket and names the system's reason for a failure.

Exit status: 0 after a clean stop, ``EXIT_CONFIG`` (78, sysexits' EX_CONFIG)
for a configuration error at start, so that systemd does not restart in a loop
(``RestartPreventExitStatus=78``), and 1 for any other failure.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, List, Optional

import Milter
import milter

from ..base.socketspec import SocketSpec, SocketSpecError, parse_socket_spec
from ..config import ConfigError, load_config
from ..core.model import Config
from ..sync.status import Freshness, load_status, status_line
from .listener import SocketFile, StartError, check_inet_bind, libmilter_open, open_unix, reason
from .milter import RelayMilter
from .notify import ServiceNotifier, milter_address
from .snapshotwatch import SnapshotWatch

if TYPE_CHECKING:  # imported only with a metrics: section (prometheus_client)
    from .metrics import MetricsService, SnapshotView

logger = logging.getLogger("relaymilter")

MILTER_NAME = "relaymilter"
RELOAD_SIGNAL = signal.SIGUSR1
STOP_SIGNAL = signal.SIGUSR2
_BLOCKED_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, RELOAD_SIGNAL, STOP_SIGNAL}
# How often a prompt stop knocks on the socket until the accept loop has ended.
_WAKE_INTERVAL = 0.05

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG


class Daemon:
    def __init__(self, config_path: str, socket_override: Optional[str]) -> None:
        self.config_path = config_path
        self.socket_override = socket_override
        self.socket = ""
        self.notifier: Optional[ServiceNotifier] = None
        self.serving = threading.Event()
        self._socket_file: Optional[SocketFile] = None
        self._reloads = ReloadWorker(self.reload)
        self.metrics: Optional[MetricsService] = None
        self._watch = SnapshotWatch(
            lambda: RelayMilter.current_config, self._reloads.request, _set_stale
        )

    def status(self) -> str:
        config = RelayMilter.current_config
        text = f"{config.summary()}; {RelayMilter.counter.describe()}"
        if config.sources is not None:
            freshness = Freshness(
                self._watch.synced_at(), config.sources.max_snapshot_age, time.time()
            )
            status = load_status(config.sources.status)
            text += f"; {status_line(config.sources, status, freshness)}"
        return text

    def run(self) -> int:
        config = self._load_initial()
        if config is None:
            return EXIT_CONFIG
        self.socket = self.socket_override or config.socket
        try:
            spec = parse_socket_spec(self.socket)
        except SocketSpecError as exc:
            logger.error("cannot start: --socket %s", exc)
            return EXIT_CONFIG
        RelayMilter.current_config = config
        RelayMilter.stream_socket = not spec.is_unix
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_SIGNALS)
        try:
            # The endpoint first: once the milter socket accepts, the metrics are served.
            self._start_metrics(config)
            self._open_socket(spec)
        except StartError as exc:
            logger.error("cannot start: %s", exc)
            if self.metrics is not None:
                self.metrics.stop()
            return EXIT_FAILURE
        # From here on RelayMilter.current_config is the one reference: a
        # reload must be able to free this config (see retire).
        del config
        try:
            return self._serve()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            if self._socket_file is not None:
                self._socket_file.remove()

    def _start_metrics(self, config: Config) -> None:
        """The metrics endpoint and textfile, if the config asks for them (after the mask)."""
        if config.metrics is None:
            return
        from .metrics import TRIGGER_START, MetricsService, MetricsStartError

        service = MetricsService(config.metrics)
        service.metrics.config_loaded(config, TRIGGER_START, time.time())
        try:
            service.start()
        except MetricsStartError as exc:
            raise StartError(str(exc)) from None
        self.metrics = service
        RelayMilter.metrics = service.metrics
        service.metrics.sync.watch(self._snapshot_view)
        logger.info("metrics: serving %s", service.describe())

    def _snapshot_view(self) -> SnapshotView:
        from .metrics import SnapshotView

        config = RelayMilter.current_config
        return SnapshotView(config.sources, self._watch.synced_at(), self._watch.stale)

    def _serve(self) -> int:
        self.notifier = ServiceNotifier(self.socket, self.status)
        logger.info(
            "listening on %s: %s (%s, config %s)",
            self.socket,
            RelayMilter.current_config.summary(),
            self.config_path,
            RelayMilter.current_config.identity,
        )
        self.notifier.ready()
        self.notifier.start_watchdog()
        self._reloads.start()
        self._watch.start()
        threading.Thread(target=self._signal_loop, name="signals", daemon=True).start()
        self.serving.set()
        try:
            milter.main()
        except milter.error as exc:
            logger.error("milter stopped with an error: %s", exc)
            return EXIT_FAILURE
        finally:
            self.serving.clear()
            self._watch.stop()
            self.notifier.stopping()
        logger.info("stopped: %s", RelayMilter.counter.describe())
        return EXIT_OK

    def _load_initial(self) -> Optional[Config]:
        try:
            config = load_without_collections(self.config_path)
        except ConfigError as exc:
            logger.error(
                "cannot start: %d error(s) in %s:\n%s", len(exc.issues), self.config_path, exc
            )
            return None
        for warning in config.warnings:
            logger.warning("config: %s", warning)
        return config

    def _open_socket(self, spec: SocketSpec) -> None:
        """Listen on ``spec`` through libmilter, or raise StartError with the system's reason."""
        _register_callbacks()
        milter.setconn(self.socket)
        milter.register(MILTER_NAME, negotiate=Milter.negotiate_callback)
        try:
            if spec.is_unix and spec.path:
                self._socket_file = open_unix(self.socket, spec.path)
            else:
                check_inet_bind(self.socket, spec)
                libmilter_open(self.socket)
        except OSError as exc:
            raise StartError(f"cannot listen on {self.socket}: {reason(exc)}") from None

    def _signal_loop(self) -> None:
        while True:
            if signal.sigwait({RELOAD_SIGNAL, STOP_SIGNAL}) == STOP_SIGNAL:
                self.stop_promptly()
                return
            self._reloads.request()

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
        """Build and validate a new config; swap it in, or keep the old one and say why.

        READY=1 (and the status line) follows the swap, so that the service
        manager never reports the reload done, or the old summary, too early.
        """
        if self.notifier:
            self.notifier.reloading()
        try:
            return self._load_and_swap()
        finally:
            if self.notifier:
                self.notifier.reloaded()

    def _load_and_swap(self) -> bool:
        try:
            config = load_without_collections(self.config_path)
        except ConfigError as exc:
            logger.error(
                "reload: failed, keeping the previous configuration: %d error(s) in %s:\n%s",
                len(exc.issues),
                self.config_path,
                exc,
            )
            self._count_reload(None)
            return False
        except Exception:
            logger.error("reload: failed, keeping the previous configuration", exc_info=True)
            self._count_reload(None)
            return False
        for warning in config.warnings:
            logger.warning("config: %s", warning)
        if not self.socket_override and config.socket != self.socket:
            logger.warning(
                "reload: socket changed to %s; it takes effect on restart", config.socket
            )
        retire(RelayMilter.current_config)
        RelayMilter.current_config = config
        logger.info(
            "reload: loaded %s: %s (config %s)", self.config_path, config.summary(), config.identity
        )
        self._watch.check()
        self._count_reload(config)
        return True

    def _count_reload(self, config: Optional[Config]) -> None:
        """The reload's result in the metrics; a metrics: section added needs a restart."""
        if self.metrics is None:
            if config is not None and config.metrics is not None:
                logger.warning("reload: metrics added; they take effect on restart")
            return
        from .metrics import TRIGGER_RELOAD

        if config is None:
            self.metrics.metrics.config_failed(TRIGGER_RELOAD)
        else:
            self.metrics.metrics.config_loaded(config, TRIGGER_RELOAD, time.time())
            self.metrics.reconfigure(config)
        self.metrics.write_soon()


#: Seconds between thread switches while a config loads (Python's default: 0.005).
LOAD_SWITCH_INTERVAL = 0.0005


def load_without_collections(path: str) -> Config:
    """Load a config without a pause of the whole process for Python's garbage collector.

    A config of 100,000 domains is millions of objects. Allocating them
    triggers full collections, each walking every object with the GIL held:
    0.5 to 0.8 s during which no milter thread can answer. Automatic
    collection is off while the config loads; then the config and everything
    else alive is frozen (moved out of the collector's view, gc.freeze), so
    later collections do not walk it either. A frozen config that is
    replaced is still freed by reference counting, as it holds no cycles.

    While it loads, the interpreter switches threads every 0.5 ms instead of
    5 ms, so an answer waits at most that long for the loading thread.
    """
    enabled = gc.isenabled()
    interval = sys.getswitchinterval()
    # Garbage cycles left now would be frozen for good; earlier configs are
    # frozen already, so this walks only what was made since the last load.
    gc.collect()
    gc.disable()
    sys.setswitchinterval(LOAD_SWITCH_INTERVAL)
    try:
        config = load_config(path)
        gc.freeze()
        return config
    finally:
        sys.setswitchinterval(interval)
        if enabled:
            gc.enable()


#: How long a replaced config waits for its last connection before it is let go as it is.
RETIRE_PATIENCE = 3600.0
#: Organizations freed at a time (each is a few dozen objects).
RETIRE_CHUNK = 200


def retire(config: Config) -> None:
    """Free a replaced config a piece at a time, once no connection uses it any more.

    Freeing a config of 100,000 domains in one deallocation holds the GIL for
    some 40 ms; in whichever thread drops the last reference, a milter thread
    included. So a thread of its own keeps a reference until it is the only
    one left (connections keep the config they started with), then lets the
    pieces go a few at a time.
    """
    holder = [config]
    del config
    threading.Thread(target=_retire, args=(holder,), name="retire", daemon=True).start()


def _retire(holder: List[Config], patience: float = RETIRE_PATIENCE, poll: float = 1.0) -> None:
    config = holder.pop()
    deadline = time.monotonic() + patience
    # Our reference, and getrefcount's own argument: nobody else holds it.
    while sys.getrefcount(config) > 2 and time.monotonic() < deadline:
        time.sleep(poll)
    organizations = list(config.organizations)
    indexes = [config.ip_connectors, config.certificate_connectors, config.certificate_files]
    del config
    while indexes:
        indexes.pop()
    while organizations:
        del organizations[-RETIRE_CHUNK:]


class ReloadWorker:
    """Runs reloads in a thread of its own, one at a time.

    The signal thread only calls ``request``, which never blocks, so it is
    always free to take the stop signal. Requests that arrive while a reload
    runs are folded into one more reload after it: that one reads the file
    again, so the last edit is always loaded, and a burst of signals costs
    two reloads, not one per signal.
    """

    def __init__(self, reload: Callable[[], object]) -> None:
        self._reload = reload
        self._changed = threading.Condition()
        self._pending = False
        self._running = False
        self._thread = threading.Thread(target=self._loop, name="reload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        with self._changed:
            if self._running:
                queued = "one more is already queued" if self._pending else "one more follows it"
                logger.info("reload: requested during a reload; %s", queued)
            self._pending = True
            self._changed.notify()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._pending:
                    self._changed.wait()
                self._pending = False
                self._running = True
            try:
                self._reload()
            except Exception:  # the thread must survive to serve the next request
                logger.error("reload: failed", exc_info=True)
            finally:
                with self._changed:
                    self._running = False


def _set_stale(stale: bool) -> None:
    RelayMilter.snapshot_stale = stale


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
