"""Sync's status file: each source's last success and last error, and what the last sync changed.

Written by ``relaymilter sync`` (atomically, like the snapshot); read by
``relaymilter sync --status`` and by the daemon for its status line, in the
spirit of Exchange's ``Test-EdgeSynchronization``. Plain JSON, so a monitoring
check can read it too. The snapshot's own modification time is its age: sync
rewrites it whenever every source answered, changed or not.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..base.safefile import UnsafeFileError, read_regular_file
from ..core.model import plural
from ..core.sourcesettings import SourcesSettings
from .snapshot import CHANGE_KEYS, describe_count

STATUS_VERSION = 1
STATUS_FILE_LIMIT = 16 * 1024 * 1024

Status = Dict[str, Any]


_cache: Dict[str, Tuple[Tuple[int, int, int, int], Status]] = {}
_cache_lock = threading.Lock()


def load_status(path: str) -> Status:
    """The status file's content; empty when there is none yet or it cannot be read.

    The daemon reads it for every status line and metrics scrape: it is parsed
    again only when the file changed.
    """
    try:
        info = os.stat(path)
    except OSError:
        return {}
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    with _cache_lock:
        cached = _cache.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        data = json.loads(read_regular_file(path, STATUS_FILE_LIMIT, "the sync status"))
    except (UnsafeFileError, ValueError):
        return {}
    status: Status = data if isinstance(data, dict) else {}
    with _cache_lock:
        _cache[path] = (key, status)
    return status


@dataclass(frozen=True)
class Freshness:
    """How old the snapshot is, and whether that is past ``max_snapshot_age``."""

    synced_at: Optional[float]
    max_age: Optional[float]
    now: float

    @property
    def age(self) -> Optional[float]:
        return None if self.synced_at is None else max(0.0, self.now - self.synced_at)

    @property
    def stale(self) -> bool:
        age = self.age
        return self.max_age is not None and (age is None or age > self.max_age)


def snapshot_freshness(settings: SourcesSettings, now: Optional[float] = None) -> Freshness:
    try:
        synced_at: Optional[float] = os.stat(settings.snapshot).st_mtime
    except OSError:
        synced_at = None
    return Freshness(synced_at, settings.max_snapshot_age, time.time() if now is None else now)


def describe_age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "never"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def describe_time(stamp: Optional[float]) -> str:
    if stamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def status_line(
    settings: SourcesSettings, status: Status, freshness: Optional[Freshness] = None
) -> str:
    """One line for a status: the snapshot's age and the last sync's outcome.

    ``freshness``: the daemon's own view of the snapshot it uses; by default,
    the file's.
    """
    freshness = freshness or snapshot_freshness(settings)
    parts = [f"snapshot {describe_age(freshness.age)} old"]
    if freshness.stale:
        parts[0] += " (STALE: answering 451)"
    if status.get("last_error"):
        failed = [name for name, s in _sources(status).items() if s.get("last_error")]
        which = f" ({', '.join(failed)})" if failed else ""
        attempt = describe_age(freshness.now - status.get("last_attempt", freshness.now))
        parts.append(f"last sync failed {attempt} ago{which}")
    return ", ".join(parts)


def _sources(status: Status) -> Dict[str, Dict[str, Any]]:
    sources = status.get("sources")
    return sources if isinstance(sources, dict) else {}


def describe_status(settings: SourcesSettings, status: Status, now: Optional[float] = None) -> str:
    """``relaymilter sync --status``: what each source last did, and what the last sync changed."""
    freshness = snapshot_freshness(settings, now)
    limit = (
        f"max_snapshot_age {describe_age(settings.max_snapshot_age)}"
        if settings.max_snapshot_age
        else "no max_snapshot_age"
    )
    state = "STALE: the daemon answers 451 4.3.0" if freshness.stale else "in use"
    synced = (
        f"synced {describe_age(freshness.age)} ago ({describe_time(freshness.synced_at)})"
        if freshness.synced_at is not None
        else "never synced (the file does not exist)"
    )
    lines = [f"snapshot: {settings.snapshot}", f"  {synced}, {limit}: {state}"]
    if not status:
        lines.append(f"no sync has run yet ({settings.status} is missing)")
        return "\n".join(lines)
    outcome = f"failed: {status['last_error']}" if status.get("last_error") else "ok"
    lines.append(f"last sync: {describe_time(status.get('last_attempt'))}: {outcome}")
    lines.append(f"last successful sync: {describe_time(status.get('last_success'))}")
    for name, source in _sources(status).items():
        lines.extend(_describe_source(name, source, freshness.now))
    lines.extend(_describe_change(status.get("last_change")))
    return "\n".join(lines)


def _describe_source(name: str, source: Dict[str, Any], now: float) -> List[str]:
    kind = source.get("kind", "?")
    success = source.get("last_success")
    lines = [f"source {kind} {name!r}:"]
    lines.append(
        f"  last success: {describe_time(success)}"
        + (f" ({describe_age(now - success)} ago)" if success else "")
    )
    if success:
        counts = ", ".join(
            plural(source.get(key, 0), key[:-1])
            for key in ("organizations", "domains", "connectors")
        )
        lines.append(
            f"  read {plural(source.get('records', 0), 'record')} in "
            f"{source.get('seconds', 0):.2f} s from {source.get('detail', '?')}: {counts}"
        )
    notes = source.get("notes")
    if success and isinstance(notes, list):
        lines.extend(f"  {note}" for note in notes)
        if source.get("more_notes"):
            lines.append(f"  and {source['more_notes']} more")
    if source.get("last_error"):
        lines.append(
            f"  last error ({describe_time(source.get('last_attempt'))}): {source['last_error']}"
        )
    return lines


def _describe_change(change: Any) -> List[str]:
    if not isinstance(change, dict):
        return ["last change: none recorded"]
    organizations = change.get("organizations") or {}
    lines = [f"last change: {describe_time(change.get('at'))}"]
    if not organizations:
        lines.append("  (the first snapshot)" if change.get("first") else "  nothing")
    for name, parts in organizations.items():
        described = []
        for key in CHANGE_KEYS:
            value = parts.get(key)
            if not isinstance(value, dict):
                continue
            examples = ", ".join(value.get("examples", []))
            more = value["count"] - len(value.get("examples", []))
            extra = f" and {more} more" if more > 0 else ""
            described.append(f"{describe_count(key, value['count'])} ({examples}{extra})")
        lines.append(f"  {name}: " + "; ".join(described))
    more = change.get("more_organizations") or 0
    if more:
        lines.append(f"  and {more} more organizations")
    return lines
