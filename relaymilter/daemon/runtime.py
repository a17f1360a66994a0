"""What a front end's connections share in one process: the config in force, and the counts.

The service swaps ``Runtime.config`` whole on a reload (one reference, so a
reader sees the old config or the new one, never a mix); each connection or
transaction captures it once when it starts, so a reload never changes a
decision halfway through a transaction.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..core.model import Config
from ..core.policy import REFUSING_ACTIONS, Decision

if TYPE_CHECKING:  # imported only with a metrics: section (prometheus_client)
    from .metrics import Metrics

logger = logging.getLogger("relaymilter")


class DecisionCounter:
    """Decisions so far, for the service status line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0
        self.rejected = 0
        self.errors = 0

    def count(self, decision: Optional[Decision]) -> None:
        with self._lock:
            if decision is None:
                self.errors += 1
                return
            self.total += 1
            if decision.action in REFUSING_ACTIONS:
                self.rejected += 1

    def describe(self) -> str:
        return f"{self.total} decisions, {self.rejected} rejected, {self.errors} internal errors"


class Runtime:
    """One process's config in force, its decision counts, metrics and snapshot state."""

    def __init__(self, config: Config) -> None:
        #: The config new transactions use; a reload swaps this one reference.
        self.config = config
        self.counter = DecisionCounter()
        #: Prometheus metrics (daemon.metrics), when the config asks for them.
        self.metrics: Optional[Metrics] = None
        #: The snapshot is older than max_snapshot_age (daemon.snapshotwatch).
        self.snapshot_stale = False

    def set_stale(self, stale: bool) -> None:
        self.snapshot_stale = stale


def observe(hook: Callable[..., None], *args: Any) -> None:
    """Call a metrics hook; its failure is logged and never changes a front end's answer."""
    try:
        hook(*args)
    except Exception:
        logger.error("metrics: %s failed", getattr(hook, "__name__", hook), exc_info=True)
