"""Prometheus metrics: counters the milter bumps, an HTTP endpoint, a textfile for node_exporter.

Only loaded when the config has a ``metrics:`` section, so a relay without it
does not need ``prometheus_client`` (Debian's python3-prometheus-client).

The milter's hot path (``Metrics.decision``, ``Metrics.rcpt_seconds``) costs
one dict look-up of a prebuilt child and an increment under that child's own
lock. Exposition never holds a lock the milter needs while it talks to a
client: the text is rendered into memory (each child's lock held only to read
its value), then written out by the endpoint (``metricshttp``), whose one
thread no client can stall.

No label carries a sender, a recipient or a client address (unbounded
cardinality: those stay in the log). Organization and connector names come
from the config, so their number is bounded by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .. import __version__
from ..core.model import Attribution, Config, MetricsSettings
from ..core.policy import Decision
from ..core.sourcesettings import SourcesSettings
from ..sync.status import load_status
from .metricshttp import MetricsServer

logger = logging.getLogger("relaymilter")

#: Seconds between two rewrites of the textfile.
TEXTFILE_INTERVAL = 5.0
#: Seconds a stop waits for the textfile writer's last write.
STOP_TIMEOUT = 10.0
#: The RCPT decision takes microseconds; the milter protocol around it, more.
LATENCY_BUCKETS = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)

TRIGGER_START = "start"
TRIGGER_RELOAD = "reload"
RESULT_SUCCESS = "success"
RESULT_FAILURE = "failure"
#: The stages that count internal errors: the milter's callbacks, the policy service's request.
ERROR_STAGES = ("connect", "negotiate", "envrcpt", "request")

_DecisionKey = Tuple[str, str, str, str, str]


class MetricsStartError(Exception):
    """The endpoint cannot listen (the address is in use, not local, ...)."""


class Metrics:
    """The registry and the hooks the milter and the daemon call."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        self.decisions = Counter(
            "relaymilter_decisions",
            "Recipient decisions, by organization and connector (empty when unattributed), "
            "action, reason and mode in force.",
            ("organization", "connector", "action", "reason", "mode"),
            registry=registry,
        )
        self.internal_errors = Counter(
            "relaymilter_internal_errors",
            "Internal errors of relaymilter, by the milter stage they happened in.",
            ("stage",),
            registry=registry,
        )
        self.tempfail_answers = Counter(
            "relaymilter_tempfail_answers",
            "Recipients answered 451 4.3.0 after an internal error (on_error: tempfail).",
            registry=registry,
        )
        self.stale_snapshot_answers = Counter(
            "relaymilter_stale_snapshot_answers",
            "Recipients answered 451 4.3.0 because the snapshot was older than max_snapshot_age.",
            registry=registry,
        )
        self.rcpt_latency = Histogram(
            "relaymilter_rcpt_decision_duration_seconds",
            "Time in the RCPT TO callback, from its entry to its return.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connections = Counter(
            "relaymilter_connections",
            "Connections opened by the MTA: the milter's, one per SMTP connection; "
            "the policy service's, one per smtpd process, reused for many.",
            registry=registry,
        )
        self.connections_in_progress = Gauge(
            "relaymilter_connections_in_progress",
            "Connections from the MTA open now.",
            registry=registry,
        )
        self.config_loads = Counter(
            "relaymilter_config_loads",
            "Configuration loads, at start and on reload, by result.",
            ("trigger", "result"),
            registry=registry,
        )
        self.config_last_success = Gauge(
            "relaymilter_config_last_success_timestamp_seconds",
            "When the configuration in use was loaded (Unix time).",
            registry=registry,
        )
        self.config_last_reload_successful = Gauge(
            "relaymilter_config_last_reload_successful",
            "1 if the last load (start or reload) succeeded, 0 if the last reload was refused.",
            registry=registry,
        )
        self.config_info = Info(
            "relaymilter_config",
            "The configuration in use: its identity (the short hash in every decision line), "
            "its organization and connector counts, and relaymilter's version.",
            registry=registry,
        )
        self.config_organizations = Gauge(
            "relaymilter_config_organizations",
            "Organizations in the configuration in use.",
            registry=registry,
        )
        self.config_connectors = Gauge(
            "relaymilter_config_connectors",
            "Connectors in the configuration in use.",
            registry=registry,
        )
        self._decision_children: Dict[_DecisionKey, Any] = {}
        # Every series an alert watches exists from the start, at 0: increase()
        # over a series born at 1 would miss the first error or failed reload.
        self._errors: Dict[str, Any] = {
            stage: self.internal_errors.labels(stage) for stage in ERROR_STAGES
        }
        for trigger in (TRIGGER_START, TRIGGER_RELOAD):
            for result in (RESULT_SUCCESS, RESULT_FAILURE):
                self.config_loads.labels(trigger, result)
        # Bound methods of the unlabelled children: one attribute look-up less per call.
        self.rcpt_seconds: Callable[[float], None] = self.rcpt_latency.observe
        self.tempfail: Callable[[], None] = self.tempfail_answers.inc
        self.stale_snapshot: Callable[[], None] = self.stale_snapshot_answers.inc
        self.sync = SyncCollector(registry)

    # -- the milter's hooks (hot path) ---------------------------------------

    def decision(self, attribution: Optional[Attribution], decision: Decision) -> None:
        if attribution is None:
            key: _DecisionKey = ("", "", decision.action, decision.reason, decision.mode)
        else:
            key = (
                attribution.organization.name,
                attribution.connector.name,
                decision.action,
                decision.reason,
                decision.mode,
            )
        child = self._decision_children.get(key)
        if child is None:
            # labels() is thread-safe and returns the one child for the key.
            child = self._decision_children[key] = self.decisions.labels(*key)
        child.inc()

    def internal_error(self, stage: str) -> None:
        child = self._errors.get(stage)
        if child is None:
            child = self._errors[stage] = self.internal_errors.labels(stage)
        child.inc()

    def connection_opened(self) -> None:
        self.connections.inc()
        self.connections_in_progress.inc()

    def connection_closed(self) -> None:
        self.connections_in_progress.dec()

    # -- the daemon's hooks --------------------------------------------------

    def config_loaded(self, config: Config, trigger: str, now: float) -> None:
        self.config_loads.labels(trigger, RESULT_SUCCESS).inc()
        self.config_last_success.set(now)
        self.config_last_reload_successful.set(1)
        organizations = len(config.organizations)
        connectors = sum(len(o.connectors) for o in config.organizations)
        self.config_info.info(
            {
                "identity": config.identity,
                "organizations": str(organizations),
                "connectors": str(connectors),
                "version": __version__,
            }
        )
        self.config_organizations.set(organizations)
        self.config_connectors.set(connectors)

    def config_failed(self, trigger: str) -> None:
        self.config_loads.labels(trigger, RESULT_FAILURE).inc()
        self.config_last_reload_successful.set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SyncCollector(Collector):
    """The snapshot's age and each source's last sync, read when scraped.

    From the daemon's own view of the snapshot in use, and from sync's status
    file (a few kilobytes): nothing is kept up to date between scrapes.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._view: Optional[Callable[[], SnapshotView]] = None
        registry.register(self)

    def watch(self, view: Callable[[], SnapshotView]) -> None:
        self._view = view

    def describe(self) -> List[Metric]:
        return []  # the families depend on the config: no fixed description

    def collect(self) -> Iterator[Metric]:
        view = self._view() if self._view is not None else None
        if view is None or view.settings is None:
            return
        synced = GaugeMetricFamily(
            "relaymilter_snapshot_synced_timestamp_seconds",
            "When the snapshot in use was written or last confirmed by relaymilter sync.",
        )
        if view.synced_at is not None:
            synced.add_metric([], view.synced_at)
        yield synced
        yield GaugeMetricFamily(
            "relaymilter_snapshot_stale",
            "1 while the snapshot is older than max_snapshot_age (recipients get 451 4.3.0).",
            value=1 if view.stale else 0,
        )
        if view.settings.max_snapshot_age is not None:
            yield GaugeMetricFamily(
                "relaymilter_snapshot_max_age_seconds",
                "The configured max_snapshot_age.",
                value=view.settings.max_snapshot_age,
            )
        status = load_status(view.settings.status)
        if status:
            yield GaugeMetricFamily(
                "relaymilter_sync_last_run_successful",
                "1 if the last relaymilter sync wrote or confirmed the snapshot, 0 if it failed "
                "or its result was refused (validation, max_removed_domains).",
                value=0 if status.get("last_error") else 1,
            )
        yield from _source_families(status)


class SnapshotView(NamedTuple):
    settings: Optional[SourcesSettings]
    synced_at: Optional[float]
    stale: bool


def _source_families(status: Dict[str, Any]) -> Iterator[Metric]:
    success = GaugeMetricFamily(
        "relaymilter_sync_source_last_success_timestamp_seconds",
        "When relaymilter sync last read this source successfully (Unix time).",
        labels=("source", "kind"),
    )
    up = GaugeMetricFamily(
        "relaymilter_sync_source_up",
        "1 if the last relaymilter sync read this source successfully, else 0.",
        labels=("source", "kind"),
    )
    sources = status.get("sources")
    for name, source in (sources if isinstance(sources, dict) else {}).items():
        if not isinstance(source, dict):
            continue
        labels = [str(name), str(source.get("kind", ""))]
        if isinstance(source.get("last_success"), (int, float)):
            success.add_metric(labels, float(source["last_success"]))
        up.add_metric(labels, 0.0 if source.get("last_error") else 1.0)
    yield success
    yield up


# -- the HTTP endpoint ----------------------------------------------------------


# -- the textfile -----------------------------------------------------------------


def write_textfile(path: str, body: bytes) -> None:
    """Replace ``path`` atomically with ``body``, mode 0644 (node_exporter reads it).

    The temporary file is in the same directory and does not end in .prom,
    so the textfile collector never reads a half-written file.
    """
    directory, name = os.path.split(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), 0o644)  # not the service's UMask=0007
            stream.write(body)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


class TextfileWriter:
    """Rewrites the textfile every ``interval`` seconds, on request, and once more at stop."""

    def __init__(self, metrics: Metrics, path: Optional[str], interval: float) -> None:
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = False
        self._written: Optional[str] = None
        self._failing: Optional[str] = None
        self._thread = threading.Thread(target=self._loop, name="metrics-textfile", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set_path(self, path: Optional[str]) -> None:
        """A reload's textfile, written at once; the previous file is removed if it changed."""
        self.path = path
        self._wake.set()

    def write_soon(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(STOP_TIMEOUT)

    def _loop(self) -> None:
        while True:
            self._write()
            if self._stopping:
                return
            self._wake.wait(self.interval)
            self._wake.clear()

    def _write(self) -> None:
        path = self.path
        if self._written is not None and self._written != path:
            with contextlib.suppress(OSError):
                os.unlink(self._written)
            logger.info("metrics: removed %s (no longer the textfile)", self._written)
            self._written = None
        if path is None:
            return
        try:
            write_textfile(path, self.metrics.render())
        except Exception as exc:
            # Not the message: it names the random temporary file.
            problem = f"{type(exc).__name__} {getattr(exc, 'errno', '')}"
            if problem != self._failing:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                logger.warning("metrics: cannot write %s: %s (retrying)", path, reason)
            self._failing = problem
            return
        if self._failing is not None:
            logger.info("metrics: %s written again", path)
            self._failing = None
        self._written = path


# -- the whole ------------------------------------------------------------------


class MetricsService:
    """The metrics of one daemon: the registry, the endpoint and the textfile writer.

    ``listen`` is bound at start and kept until the daemon stops (like the
    milter socket, a change takes effect on restart); ``textfile`` follows
    each reload.
    """

    def __init__(self, settings: MetricsSettings, interval: float = TEXTFILE_INTERVAL) -> None:
        self.metrics = Metrics()
        self.listen = settings.listen
        self._server: Optional[MetricsServer] = None
        self._server_thread: Optional[threading.Thread] = None
        self._writer = TextfileWriter(self.metrics, settings.textfile, interval)

    def start(self) -> None:
        """Bind the endpoint (or raise MetricsStartError) and start the threads."""
        if self.listen is not None:
            try:
                self._server = MetricsServer(self.listen, self.metrics.registry)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise MetricsStartError(
                    f"metrics: cannot listen on {describe_address(self.listen)}: {reason}"
                ) from None
            self._server_thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.5},
                name="metrics-http",
                daemon=True,
            )
            self._server_thread.start()
        self._writer.start()

    def reconfigure(self, settings: Optional[MetricsSettings]) -> None:
        """After a reload: the new textfile, and a prompt rewrite with the new config's info."""
        listen = settings.listen if settings else None
        if listen != self.listen:
            logger.warning(
                "reload: metrics.listen changed to %s; it takes effect on restart",
                describe_address(listen) if listen else "nothing",
            )
        self._writer.set_path(settings.textfile if settings else None)

    def write_soon(self) -> None:
        self._writer.write_soon()

    def describe(self) -> str:
        parts = []
        if self.listen is not None:
            parts.append(f"http://{describe_address(self.listen)}/metrics")
        if self._writer.path is not None:
            parts.append(self._writer.path)
        return " and ".join(parts) or "nothing (metrics.textfile removed)"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._writer.stop()


def describe_address(address: Tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
