"""What every front end's daemon does the same way: load, serve, reload, report, stop.

A front end (the milter, the policy service) subclasses ``Service`` and
supplies how it listens and serves; this class loads the configuration (a
config error at start exits ``EXIT_CONFIG``, 78, so that systemd does not
restart in a loop), starts the metrics, tells systemd it is ready, reloads in
a worker thread (check first, then swap the one reference in ``Runtime``; a
bad config keeps the old one), reloads a new snapshot of ``sources:`` on its
own, and says in the status line what is loaded and decided.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from ..base.socketspec import SocketSpec, SocketSpecError, parse_socket_spec
from ..config import ConfigError
from ..core.model import Config, MetricsSettings
from ..sync.status import Freshness, load_status, status_line
from .listener import SocketFile, StartError
from .notify import SelfCheck, ServiceNotifier
from .reloading import ReloadWorker, load_without_collections, retire
from .runtime import Runtime
from .snapshotwatch import SnapshotWatch

if TYPE_CHECKING:  # imported only with a metrics: section (prometheus_client)
    from .metrics import MetricsService, SnapshotView

logger = logging.getLogger("relaymilter")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG


class Service:
    """One front end's daemon. Subclasses give ``socket_of``, ``listen``, ``serve`` and ``what``."""

    #: How the service names itself in its log lines ("the milter").
    name = "the service"

    def __init__(self, config_path: str, socket_override: Optional[str]) -> None:
        self.config_path = config_path
        self.socket_override = socket_override
        self.socket = ""
        self.runtime: Optional[Runtime] = None
        self.notifier: Optional[ServiceNotifier] = None
        self.metrics: Optional[MetricsService] = None
        self.socket_file: Optional[SocketFile] = None
        self.reloads = ReloadWorker(self.reload)
        self.watch = SnapshotWatch(self.current_config, self.reloads.request, self._set_stale)

    # -- what a front end gives --------------------------------------------------

    def socket_of(self, config: Config) -> Optional[str]:
        """The socket the config names for this front end (None: none)."""
        raise NotImplementedError

    def metrics_of(self, config: Config) -> Optional[MetricsSettings]:
        """The metrics the config asks of this front end."""
        raise NotImplementedError

    def prepare(self, spec: SocketSpec, runtime: Runtime) -> None:
        """Before the socket opens: what the front end sets up (signal masks, its classes)."""

    def listen(self, spec: SocketSpec) -> None:
        """Open the socket, or raise StartError with the reason."""
        raise NotImplementedError

    def serve(self) -> int:
        """Serve until stopped; the exit status."""
        raise NotImplementedError

    def self_check(self) -> Optional[SelfCheck]:
        """The watchdog's self-check, once the socket listens."""
        return None

    # -- the shared part ---------------------------------------------------------

    def current_config(self) -> Config:
        assert self.runtime is not None, "the service has not started"
        return self.runtime.config

    def run(self) -> int:
        config = self._load_initial()
        if config is None:
            return EXIT_CONFIG
        socket = self.socket_override or self.socket_of(config)
        if socket is None:
            logger.error("cannot start: %s", self.missing_socket())
            return EXIT_CONFIG
        self.socket = socket
        try:
            spec = parse_socket_spec(self.socket)
        except SocketSpecError as exc:
            logger.error("cannot start: --socket %s", exc)
            return EXIT_CONFIG
        self.runtime = Runtime(config)
        self.prepare(spec, self.runtime)
        try:
            # The endpoint first: once the socket accepts, the metrics are served.
            self._start_metrics(config)
            self.listen(spec)
        except StartError as exc:
            logger.error("cannot start: %s", exc)
            if self.metrics is not None:
                self.metrics.stop()
            return EXIT_FAILURE
        # From here on Runtime.config is the one reference: a reload must be
        # able to free this config (see reloading.retire).
        del config
        try:
            return self._serve()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            if self.socket_file is not None:
                self.socket_file.remove()

    def missing_socket(self) -> str:
        return "no socket: give one with --socket"

    def status(self) -> str:
        runtime = self.runtime
        assert runtime is not None
        config = runtime.config
        text = f"{config.summary()}; {runtime.counter.describe()}"
        if config.sources is not None:
            freshness = Freshness(
                self.watch.synced_at(), config.sources.max_snapshot_age, time.time()
            )
            status = load_status(config.sources.status)
            text += f"; {status_line(config.sources, status, freshness)}"
        return text

    def _serve(self) -> int:
        runtime = self.runtime
        assert runtime is not None
        self.notifier = ServiceNotifier(
            f"{self.name} on {self.socket}", self.status, self.self_check()
        )
        logger.info(
            "listening on %s: %s (%s, config %s)",
            self.socket,
            runtime.config.summary(),
            self.config_path,
            runtime.config.identity,
        )
        self.notifier.ready()
        self.notifier.start_watchdog()
        self.reloads.start()
        self.watch.start()
        try:
            status = self.serve()
        finally:
            self.watch.stop()
            self.notifier.stopping()
        if status == EXIT_OK:
            logger.info("stopped: %s", runtime.counter.describe())
        return status

    def _set_stale(self, stale: bool) -> None:
        if self.runtime is not None:
            self.runtime.set_stale(stale)

    def _start_metrics(self, config: Config) -> None:
        """The metrics endpoint and textfile, if the config asks for them."""
        settings = self.metrics_of(config)
        if settings is None:
            return
        from .metrics import TRIGGER_START, MetricsService, MetricsStartError

        service = MetricsService(settings)
        service.metrics.config_loaded(config, TRIGGER_START, time.time())
        try:
            service.start()
        except MetricsStartError as exc:
            raise StartError(str(exc)) from None
        self.metrics = service
        assert self.runtime is not None
        self.runtime.metrics = service.metrics
        service.metrics.sync.watch(self._snapshot_view)
        logger.info("metrics: serving %s", service.describe())

    def _snapshot_view(self) -> SnapshotView:
        from .metrics import SnapshotView

        config = self.current_config()
        return SnapshotView(config.sources, self.watch.synced_at(), self.watch.stale)

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
        if not self.socket_override and self.socket_of(config) != self.socket:
            logger.warning(
                "reload: socket changed to %s; it takes effect on restart",
                self.socket_of(config) or "nothing",
            )
        runtime = self.runtime
        assert runtime is not None
        retire(runtime.config)
        runtime.config = config
        logger.info(
            "reload: loaded %s: %s (config %s)", self.config_path, config.summary(), config.identity
        )
        self.watch.check()
        self._count_reload(config)
        return True

    def _count_reload(self, config: Optional[Config]) -> None:
        """The reload's result in the metrics; a metrics section added needs a restart."""
        if self.metrics is None:
            if config is not None and self.metrics_of(config) is not None:
                logger.warning("reload: metrics added; they take effect on restart")
            return
        from .metrics import TRIGGER_RELOAD

        if config is None:
            self.metrics.metrics.config_failed(TRIGGER_RELOAD)
        else:
            self.metrics.metrics.config_loaded(config, TRIGGER_RELOAD, time.time())
            self.metrics.reconfigure(self.metrics_of(config))
        self.metrics.write_soon()
