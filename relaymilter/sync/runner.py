"""``relaymilter sync``: fetch every source, validate the result as the config, write the snapshot.

All or nothing: a source that fails, a result that does not validate, or one
that would remove more than ``max_removed_domains`` of the snapshot's domains
leaves the last good snapshot in place, records why in the status file, and
exits non-zero. When every source answered, the snapshot is written (atomic
rename, the config file's owner, group and mode), the same text too if
nothing changed: its modification time is the snapshot's age. The daemon
notices a new text (it checks every few seconds) and reloads it; sync needs
no right over the daemon, and the daemon never reads a source's credentials.

Exit status: 0 done (or, with --dry-run, shown), 1 a source failed or its
result was refused, 75 another sync holds the lock, 78 the config is unusable.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import gc
import importlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ..base.safefile import UnsafeFileError, read_regular_file
from ..config import (
    SNAPSHOT_FILE_LIMIT,
    ConfigError,
    SnapshotText,
    load_config,
    load_sources_settings,
)
from ..core.model import plural
from ..core.sourcesettings import Source, SourcesSettings
from . import snapshot
from .sources import SourceError, SourceOrganization, SourceResult
from .status import STATUS_VERSION, Status, describe_status, load_status, snapshot_freshness

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG
#: Organizations whose changes the status file keeps (the count of the others too).
CHANGED_ORGANIZATIONS_KEPT = 100
#: A source's notes (an X.400 domain skipped) the status file keeps, and the count.
NOTES_KEPT = 20

#: The module of each kind of source, imported only when a source of its kind is fetched.
_FETCHERS = {kind: f"{__package__}.sources.{kind}" for kind in ("files", "ldap", "postgresql")}


class SyncRefused(Exception):
    """The sources' result is not used; the message says why."""


class ConfigFileInvalid(SyncRefused):
    """The config file itself has errors (outside its sources: section): nothing to sync into."""


@dataclass
class Fetched:
    source: Source
    result: Optional[SourceResult]
    error: Optional[str]
    seconds: float


def fetch(source: Source) -> SourceResult:
    """One source's organizations; the source's library is imported only here."""
    module = importlib.import_module(_FETCHERS[source.kind])
    result: SourceResult = module.fetch(source)
    return result


def merge(results: Sequence[SourceResult]) -> List[SourceOrganization]:
    """One organization per name, its items in source order."""
    merged: Dict[str, SourceOrganization] = {}
    for result in results:
        for organization in result.organizations:
            found = merged.get(organization.name)
            if found is None:
                merged[organization.name] = SourceOrganization(
                    organization.name,
                    organization.origin,
                    list(organization.accepted_domains),
                    list(organization.connectors),
                    organization.mode,
                    organization.mode_origin,
                )
                continue
            found.accepted_domains.extend(organization.accepted_domains)
            found.connectors.extend(organization.connectors)
            if organization.mode is not None and found.mode not in (None, organization.mode):
                raise SyncRefused(
                    f"organization {organization.name!r}: mode {organization.mode} "
                    f"({organization.mode_origin}) and {found.mode} ({found.mode_origin})"
                )
            if found.mode is None:
                found.mode, found.mode_origin = organization.mode, organization.mode_origin
    return list(merged.values())


class Sync:
    def __init__(
        self,
        config_path: str,
        settings: SourcesSettings,
        out: IO[str],
        err: IO[str],
        force: bool = False,
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.out = out
        self.err = err
        self.force = force
        self.status: Status = copy.deepcopy(load_status(settings.status))
        self.now = time.time()

    def fetch_all(self) -> List[Fetched]:
        fetched = []
        for source in self.settings.sources:
            started = time.monotonic()
            try:
                result, error = fetch(source), None
            except SourceError as exc:
                result, error = None, str(exc)
            except Exception as exc:  # a bug must not look like a source's answer
                result, error = None, f"internal error: {type(exc).__name__}: {exc}"
            fetched.append(Fetched(source, result, error, time.monotonic() - started))
        return fetched

    def check_emptied(self, fetched: Sequence[Fetched]) -> None:
        """A source that returns nothing after returning something is refused (unless --force)."""
        if self.force:
            return
        sources = self.status.get("sources") or {}
        for item in fetched:
            before = (sources.get(item.source.name) or {}).get("organizations", 0)
            if item.result is not None and not item.result.organizations and before:
                item.error = (
                    f"{item.source.kind} {item.source.name!r} returned nothing, after "
                    f"{before} organizations last time; check its base, filter, query or "
                    "permissions (relaymilter sync --force takes an empty result)"
                )

    def candidate(
        self, fetched: Sequence[Fetched], old_text: Optional[str]
    ) -> Tuple[str, List[SourceOrganization]]:
        """The new snapshot's text, validated with the config file exactly as check-config does."""
        organizations = merge([item.result for item in fetched if item.result is not None])
        text = snapshot.render(organizations)
        label = f"{self.settings.snapshot} (new)"
        try:
            load_config(self.config_path, SnapshotText(text, label))
        except ConfigError as exc:
            if self.config_file_at_fault(exc, old_text):
                own = [issue for issue in exc.issues if issue.file == self.config_path]
                raise ConfigFileInvalid(
                    f"{len(own)} error(s) in {self.config_path} itself; fix it first:\n"
                    + "\n".join(str(issue) for issue in own)
                ) from None
            raise SyncRefused(
                f"the sources' organizations are not valid ({len(exc.issues)} error(s)):\n{exc}"
            ) from None
        return text, organizations

    def config_file_at_fault(self, error: ConfigError, old_text: Optional[str]) -> bool:
        """Whether the config file is wrong whatever the sources say.

        An error in the file's organizations may be the sources' doing (a
        domain its connector relies on is gone): it is the file's own only if
        the file fails with the last good snapshot too. Any other error in the
        file (its mode, socket, reply...) is the file's own.
        """
        own = [issue for issue in error.issues if issue.file == self.config_path]
        if any(issue.path.split("[")[0].split(".")[0] != "organizations" for issue in own):
            return True
        if not own or not old_text:
            return False
        try:
            load_config(self.config_path, SnapshotText(old_text, self.settings.snapshot))
        except ConfigError as again:
            return any(issue.file == self.config_path for issue in again.issues)
        return False

    def check_removals(self, change: Dict[str, snapshot.OrganizationChange], old: int) -> None:
        removed = snapshot.removed_domains(change)
        share = self.settings.max_removed_domains
        if self.force or not old or removed / old <= share:
            return
        raise SyncRefused(
            f"the sources' result would remove {removed} of the snapshot's {old} domains "
            f"({removed / old:.0%}), more than max_removed_domains ({share:.0%}); if that is "
            "intended, run relaymilter sync --force"
        )


def _settings(config_path: str, err: IO[str]) -> Tuple[Optional[SourcesSettings], List[str]]:
    """The sources: section, or None having said why (the caller exits 78)."""
    try:
        settings, warnings = load_sources_settings(config_path)
    except ConfigError as exc:
        err.write(f"relaymilter sync: {len(exc.issues)} error(s) in {config_path}:\n{exc}\n")
        return None, []
    if settings is None:
        err.write(f"relaymilter sync: {config_path} has no sources: section; nothing to sync\n")
    return settings, warnings


def run(config_path: str, dry_run: bool, force: bool, out: IO[str], err: IO[str]) -> int:
    settings, warnings = _settings(config_path, err)
    if settings is None:
        return EXIT_CONFIG
    for warning in warnings:
        err.write(f"warning: {warning}\n")
    # A short-lived process that builds millions of objects and frees them at
    # exit: Python's cyclic collector would only walk them again and again.
    gc.disable()
    try:
        with _lock(settings.status, dry_run):
            return _run_locked(Sync(config_path, settings, out, err, force), dry_run)
    except LockBusy:
        err.write(
            f"relaymilter sync: another sync is running (it holds {settings.status}.lock); "
            "this one did nothing\n"
        )
        return EXIT_BUSY
    except OSError as exc:
        err.write(f"relaymilter sync: {exc}\n")
        return EXIT_FAILED


def _run_locked(sync: Sync, dry_run: bool) -> int:
    fetched = sync.fetch_all()
    sync.check_emptied(fetched)
    failed = [item for item in fetched if item.error is not None]
    old_text = _old_snapshot(sync.settings.snapshot)
    try:
        if failed:
            raise SyncRefused("; ".join(str(item.error) for item in failed))
        text, organizations = sync.candidate(fetched, old_text)
        change: Dict[str, snapshot.OrganizationChange] = {}
        if text != old_text:  # the same text is the same organizations: nothing to compare
            old = snapshot.content_of_text(old_text) if old_text else {}
            change = snapshot.changes(old, snapshot.content_of_sources(organizations))
            sync.check_removals(change, snapshot.domain_count(old))
    except SyncRefused as exc:
        sync.err.write(f"relaymilter sync: failed, the snapshot is unchanged: {exc}\n")
        if not dry_run:
            _write_status(sync, fetched, str(exc), None, None)
        return EXIT_CONFIG if isinstance(exc, ConfigFileInvalid) else EXIT_FAILED
    if not dry_run:
        try:
            _write_snapshot(sync, text)
        except OSError as exc:
            reason = f"cannot write the snapshot {sync.settings.snapshot}: {exc}"
            sync.err.write(f"relaymilter sync: failed, the snapshot is unchanged: {reason}\n")
            _write_status(sync, fetched, reason, None, None)
            return EXIT_FAILED
    _report(sync, fetched, change, text == old_text, dry_run)
    if not dry_run:
        _write_status(sync, fetched, None, change if text != old_text else None, old_text is None)
    return EXIT_OK


def _write_snapshot(sync: Sync, text: str) -> None:
    """A new snapshot, or the same one confirmed: its modification time is its age.

    The same text is written anew too (not touched): that needs no right over
    the old file, which the unit's root without CAP_FOWNER may not have, and it
    follows the config file's owner and mode. The daemon compares contents, so
    the same text is not reloaded.
    """
    # A snapshot path that is a symbolic link (to shared storage, say) stays one.
    path = os.path.realpath(sync.settings.snapshot)
    write_like(path, text.encode("utf-8"), sync.config_path)


def _old_snapshot(path: str) -> Optional[str]:
    try:
        return read_regular_file(path, SNAPSHOT_FILE_LIMIT, "the snapshot").decode("utf-8")
    except UnsafeFileError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    except UnicodeDecodeError:
        return ""  # replaced by a good one; counts as empty for the guard


def _report(
    sync: Sync,
    fetched: Sequence[Fetched],
    change: Dict[str, snapshot.OrganizationChange],
    unchanged: bool,
    dry_run: bool,
) -> None:
    for item in fetched:
        assert item.result is not None
        sync.out.write(
            f"{item.source.kind} {item.source.name!r}: {plural(item.result.records, 'record')}, "
            f"{plural(len(item.result.organizations), 'organization')} in {item.seconds:.2f} s "
            f"({item.result.detail})\n"
        )
        for note in item.result.notes:
            sync.out.write(f"{item.source.kind} {item.source.name!r}: {note}\n")
    verb = "would change" if dry_run else "changed"
    for name, organization_change in change.items():
        sync.out.write(f"{verb} {name}: {organization_change.describe()}\n")
    if unchanged:
        sync.out.write("the snapshot is unchanged" + ("" if dry_run else " (refreshed)") + "\n")
    elif dry_run:
        sync.out.write(f"would write {sync.settings.snapshot}\n")
    else:
        sync.out.write(f"wrote {sync.settings.snapshot}; the daemon reloads it within seconds\n")


def _write_status(
    sync: Sync,
    fetched: Sequence[Fetched],
    error: Optional[str],
    change: Optional[Dict[str, snapshot.OrganizationChange]],
    first: Optional[bool],
) -> None:
    status = sync.status
    sources = status.get("sources") if isinstance(status.get("sources"), dict) else {}
    assert isinstance(sources, dict)
    configured = {source.name for source in sync.settings.sources}
    status["sources"] = sources = {k: v for k, v in sources.items() if k in configured}
    for item in fetched:
        entry = sources.setdefault(item.source.name, {})
        entry.update(kind=item.source.kind, last_attempt=sync.now, last_error=item.error)
        if item.result is not None and error is None:
            entry.update(_source_counts(item))
            entry["last_success"] = sync.now
    status.update(
        version=STATUS_VERSION,
        config=sync.config_path,
        snapshot=sync.settings.snapshot,
        last_attempt=sync.now,
        last_error=error,
    )
    if error is None:
        status["last_success"] = sync.now
    if change is not None:
        # Bounded: the daemon reads this file for its status line and metrics.
        shown = list(change.items())[:CHANGED_ORGANIZATIONS_KEPT]
        status["last_change"] = {
            "at": sync.now,
            "first": bool(first),
            "organizations": {name: c.as_json() for name, c in shown},
            "more_organizations": len(change) - len(shown),
        }
    data = json.dumps(status, indent=1, sort_keys=True, ensure_ascii=True) + "\n"
    try:
        write_like(sync.settings.status, data.encode("ascii"), sync.config_path)
    except OSError as exc:
        sync.err.write(f"relaymilter sync: cannot write the status {sync.settings.status}: {exc}\n")


def _source_counts(item: Fetched) -> Dict[str, Any]:
    assert item.result is not None
    organizations = item.result.organizations
    notes = item.result.notes
    return {
        "records": item.result.records,
        "seconds": round(item.seconds, 3),
        "detail": item.result.detail,
        # Bounded: the daemon reads this file for its status line and metrics.
        "notes": notes[:NOTES_KEPT],
        "more_notes": max(0, len(notes) - NOTES_KEPT),
        "organizations": len(organizations),
        "domains": sum(len(o.accepted_domains) for o in organizations),
        "connectors": sum(len(o.connectors) for o in organizations),
    }


def write_like(path: str, data: bytes, like: str) -> None:
    """Replace ``path`` atomically with ``data``, with the owner, group and mode of ``like``.

    Written to a temporary file in the same directory, flushed to disk, then
    renamed over the old file: a reader sees the old file or the new one,
    never a part, and a crash leaves the old one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    reference = os.stat(like)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            # The mode first: once the file is another user's, only its owner may change it.
            os.fchmod(stream.fileno(), reference.st_mode & 0o777)
            if (reference.st_uid, reference.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(stream.fileno(), reference.st_uid, reference.st_gid)
            os.fsync(stream.fileno())
        os.rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_handle)
    finally:
        os.close(directory_handle)


class LockBusy(Exception):
    """Another sync holds the lock."""


@contextlib.contextmanager
def _lock(status_path: str, dry_run: bool) -> Iterator[None]:
    """One sync at a time (a timer's and an admin's): the second one stops at once."""
    if dry_run:
        yield  # a dry run writes nothing
        return
    os.makedirs(os.path.dirname(os.path.abspath(status_path)), exist_ok=True)
    # O_NOFOLLOW: a link planted at the lock's path is refused (ELOOP), never
    # followed to create or append to a file elsewhere as root.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    lock = os.open(status_path + ".lock", flags, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy() from None
        yield
    finally:
        os.close(lock)


def show_status(config_path: str, as_json: bool, out: IO[str], err: IO[str]) -> int:
    """Exit 0 if the last sync succeeded and the snapshot is not stale, else 1."""
    settings, _warnings = _settings(config_path, err)
    if settings is None:
        return EXIT_CONFIG
    status = load_status(settings.status)
    freshness = snapshot_freshness(settings)
    if as_json:
        document = dict(status, snapshot_age=freshness.age, stale=freshness.stale)
        out.write(json.dumps(document, indent=1, sort_keys=True, ensure_ascii=True) + "\n")
    else:
        out.write(describe_status(settings, status) + "\n")
    healthy = bool(status) and not status.get("last_error") and not freshness.stale
    return EXIT_OK if healthy else EXIT_FAILED
