"""The daemon's eye on the snapshot: reload a new one, and know how old the one in use is.

``relaymilter sync`` replaces the snapshot by renaming a new file over it, the
same text too when nothing changed (its modification time is its age). Checking the file
every few seconds costs one stat(2); when anything about it changed, its text
is hashed and compared with the snapshot in use (a new file may well get the
inode of the one loaded two syncs ago). This needs no signal from sync (so
sync needs no right over the daemon), and serves every daemon that reads the
same file. The age is that of the snapshot in use: a new file that failed to
load does not make the old data fresh, and it is tried again every minute.

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

from ..base.safefile import read_regular_file
from ..config import SNAPSHOT_FILE_LIMIT, config_identity
from ..core.model import Config
from ..sync.status import Freshness, describe_age

logger = logging.getLogger("relaymilter")

#: Seconds between two looks at the snapshot file.
CHECK_INTERVAL = 2.0
#: Seconds before a snapshot that failed to load is tried again.
RETRY_AFTER = 60.0


def file_digest(path: str) -> str:
    """The snapshot's identity as the config loader computes it (``config_identity``)."""
    data = read_regular_file(path, SNAPSHOT_FILE_LIMIT, "the snapshot")
    return config_identity(data.decode("utf-8", "surrogateescape"))


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
        # The watch thread and the reload thread both check.
        self._lock = threading.Lock()
        #: The file's (device, inode, size, mtime) when last looked at, and its digest.
        self._seen: Optional[Tuple[Tuple[int, int, int, int], str]] = None
        #: The digest a reload was last asked for, and when.
        self._requested: Optional[Tuple[str, float]] = None
        #: When the file last held the loaded snapshot's text (its modification time).
        self._refreshed: Optional[Tuple[str, float]] = None
        self._missing = False
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
        """When the text in use was written or last confirmed by a sync."""
        config = self._current()
        if config.snapshot is None:
            return None
        refreshed = self._refreshed
        if refreshed is not None and refreshed[0] == config.snapshot.digest:
            return refreshed[1]
        return config.snapshot.synced_at

    def check(self, now: Optional[float] = None) -> None:
        with self._lock:
            config = self._current()
            if config.snapshot is None or config.sources is None:
                self._mark(False, config)
                return
            self._look(config)
            self._mark(self._is_stale(config, now), config)

    def _look(self, config: Config) -> None:
        """Compare the file with the snapshot in use: by content, as an inode may be reused."""
        assert config.snapshot is not None
        try:
            info = os.stat(config.snapshot.path)
            key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            if self._seen is None or self._seen[0] != key:
                self._seen = (key, file_digest(config.snapshot.path))
        except OSError as exc:
            if not self._missing:
                logger.warning(
                    "snapshot: %s: %s; deciding from the one loaded", exc.filename, exc.strerror
                )
            self._missing = True
            return
        self._missing = False
        digest = self._seen[1]
        if digest == config.snapshot.digest:
            self._refreshed = (digest, info.st_mtime)
            self._requested = None
            return
        monotonic = time.monotonic()
        requested = self._requested
        if requested is None or requested[0] != digest:
            self._requested = (digest, monotonic)
            logger.info("snapshot: %s was replaced; reloading", config.snapshot.path)
            self._request_reload()
        elif monotonic - requested[1] > RETRY_AFTER:
            # Its reload failed (see the log): tried again now and then.
            self._requested = (digest, monotonic)
            logger.info("snapshot: %s is not the one in use; reloading again", config.snapshot.path)
            self._request_reload()

    def _is_stale(self, config: Config, now: Optional[float]) -> bool:
        assert config.sources is not None
        if config.snapshot is None:
            return False
        moment = time.time() if now is None else now
        return Freshness(self.synced_at(), config.sources.max_snapshot_age, moment).stale

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
