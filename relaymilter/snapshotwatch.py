"""The daemon's eye on the snapshot: reload a new one, and know how old the one in use is.

``relaymilter sync`` replaces the snapshot by renaming a new file over it (a
new inode), or, when nothing changed, only refreshes its modification time.
Checking the file every few seconds costs one stat(2), needs no signal from
sync (so sync needs no right over the daemon), and serves every daemon that
reads the same file. The age is that of the snapshot in use: a new file that
failed to load does not make the old data fresh.

Past ``max_snapshot_age`` the milter answers 451 4.3.0 to every recipient
instead of deciding on stale data (the way Postfix answers a lookup table that
is down); the flag it reads is one attribute, so the check costs nothing per
recipient.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional, Tuple

from .model import Config
from .syncstatus import describe_age

logger = logging.getLogger("relaymilter")

#: Seconds between two looks at the snapshot file.
CHECK_INTERVAL = 2.0


class SnapshotWatch:
    def __init__(
        self,
        current: Callable[[], Config],
        request_reload: Callable[[], None],
        set_stale: Callable[[bool], None],
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self._current = current
        self._request_reload = request_reload
        self._set_stale = set_stale
        self._interval = interval
        self._stop = threading.Event()
        #: The (device, inode) a reload was last asked for: asked once per new file.
        self._requested: Optional[Tuple[int, int]] = None
        #: Refreshes of the loaded file since it was loaded.
        self._refreshed: Optional[Tuple[Tuple[int, int], float]] = None
        self.stale = False
        self._thread = threading.Thread(target=self._loop, name="snapshot", daemon=True)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check()
            except Exception:  # the watch must outlive any surprise
                logger.error("snapshot: check failed", exc_info=True)

    def synced_at(self) -> Optional[float]:
        config = self._current()
        if config.snapshot is None:
            return None
        loaded = config.snapshot.stat[:2]
        if self._refreshed is not None and self._refreshed[0] == loaded:
            return self._refreshed[1]
        return config.snapshot.synced_at

    def check(self, now: Optional[float] = None) -> None:
        config = self._current()
        if config.snapshot is None or config.sources is None:
            self._mark(False, config)
            return
        try:
            info = os.stat(config.snapshot.path)
        except OSError as exc:
            if self._requested != (-1, -1):
                logger.warning(
                    "snapshot: %s: %s; deciding from the one loaded", exc.filename, exc.strerror
                )
                self._requested = (-1, -1)
        else:
            self._notice(config, (info.st_dev, info.st_ino), info.st_mtime)
        self._mark(self._is_stale(config, now), config)

    def _notice(self, config: Config, file: Tuple[int, int], mtime: float) -> None:
        assert config.snapshot is not None
        if file == config.snapshot.stat[:2]:
            self._refreshed = (file, mtime)
            self._requested = None
        elif file != self._requested:
            self._requested = file
            logger.info("snapshot: %s was replaced; reloading", config.snapshot.path)
            self._request_reload()

    def _is_stale(self, config: Config, now: Optional[float]) -> bool:
        assert config.sources is not None
        limit = config.sources.max_snapshot_age
        synced_at = self.synced_at()
        if limit is None or synced_at is None:
            return False
        return (time.time() if now is None else now) - synced_at > limit

    def _mark(self, stale: bool, config: Config) -> None:
        if stale == self.stale:
            return
        self.stale = stale
        self._set_stale(stale)
        if config.sources is None or config.snapshot is None:
            return
        limit = describe_age(config.sources.max_snapshot_age)
        synced_at = self.synced_at() or 0.0
        age = describe_age(time.time() - synced_at)
        if stale and config.monitor_only:
            logger.error(
                "snapshot: %s is %s old, past max_snapshot_age %s; every organization is in "
                "monitor mode, so decisions are still only logged (see relaymilter sync --status)",
                config.snapshot.path,
                age,
                limit,
            )
        elif stale:
            logger.error(
                "snapshot: %s is %s old, past max_snapshot_age %s: answering 451 4.3.0 to every "
                "recipient until a sync succeeds (see relaymilter sync --status)",
                config.snapshot.path,
                age,
                limit,
            )
        else:
            logger.info("snapshot: %s is fresh again (%s old); deciding", config.snapshot.path, age)
