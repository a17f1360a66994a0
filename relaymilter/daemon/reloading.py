"""Reloading the configuration in a running daemon, without pausing its answers.

``ReloadWorker`` runs reloads in a thread of their own, one at a time;
``load_without_collections`` builds a config without a pause for Python's
garbage collector; ``retire`` frees the replaced one a piece at a time.
Shared by the milter and the policy service.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from typing import Callable, List

from ..config import load_config
from ..core.model import Config

logger = logging.getLogger("relaymilter")


#: Seconds between thread switches while a config loads (Python's default: 0.005).
LOAD_SWITCH_INTERVAL = 0.0005


def load_without_collections(path: str) -> Config:
    """Load a config without a pause of the whole process for Python's garbage collector.

    A config of 100,000 domains is millions of objects. Allocating them
    triggers full collections, each walking every object with the GIL held:
    0.5 to 0.8 s during which no connection can be answered. Automatic
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
    some 40 ms; in whichever thread drops the last reference, a serving thread
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
