"""Where ``report`` and ``replay`` read decision records from: journals and log files.

Pure Python, no pymilter. Records are parsed only through ``relaymilter.record``
(``from_journal`` for journal entries, ``read_line`` for log lines), so there
is no second field list. Everything streams: one entry or line at a time.

Sources:

* the journal (default): the local system journal, relaymilter's entries
  (``SYSLOG_IDENTIFIER=relaymilter`` or ``_SYSTEMD_UNIT=relaymilter.service``);
  ``--journal-dir`` and ``--journal-file`` read journals copied from other
  relays. Read with python3-systemd's ``systemd.journal.Reader`` (a maintained
  binding of sd-journal, packaged by Debian and RHEL), imported only here, so
  that a relay without it still runs the milter and reads log files;
* plain log files (``--log``): relaymilter's stderr lines, or the same lines
  with a syslog prefix as rsyslog writes them to /var/log/mail.log (RFC 3339
  or traditional timestamps), plain or compressed (gzip, bzip2, xz: recognised
  by their magic bytes, so rotated ``mail.log.2.gz`` files work as they are).

Incremental runs (``--cursor-file``): the file keeps, per journal source, the
cursor of the last entry read and, per host of the log files, the time of the
last record read and how many records carried that very time. The next run
starts after them. Log lines without a timestamp (bare stderr lines) carry no
position and are read again on every run.
"""

from __future__ import annotations

import bz2
import contextlib
import datetime as dt
import gzip
import json
import lzma
import os
import re
import tempfile
import time
import zlib
from typing import IO, Any, Dict, Iterator, List, NamedTuple, Optional, Tuple

from ..base.safefile import UnsafeFileError, read_regular_file
from .record import DecisionRecord, from_journal, read_line

JOURNAL_PREFIX = "RELAYMILTER_"
IDENTIFIER = "relaymilter"
UNIT = "relaymilter.service"
#: A longer log line is cut there and its rest skipped: no line can take unbounded memory.
MAX_LINE = 64 * 1024
#: A cursor file names a few journals and hosts.
CURSOR_FILE_LIMIT = 1024 * 1024


class SourceError(Exception):
    """A source that cannot be read at all (missing file, no journal support)."""


class Entry(NamedTuple):
    record: DecisionRecord
    #: Seconds since the epoch, or None for a line without a timestamp.
    time: Optional[float]
    #: The relay that logged it (journal ``_HOSTNAME``, syslog host), if known.
    host: Optional[str]
    #: The fields a log line showed cut (too long for a line; the journal has them whole).
    cut: Tuple[str, ...] = ()


class Stats:
    """What the readers saw besides records (for the report's totals)."""

    def __init__(self) -> None:
        self.unreadable = 0  # decision lines that did not parse (truncated, garbled)
        self.undated_skipped = 0  # records without a time, left out by --since/--until
        self.errors: List[str] = []  # sources that failed part-way (a truncated .gz)


# -- time --------------------------------------------------------------------

_UNITS = {
    "us": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "weeks": 604800.0,
    "M": 2629800.0,
    "month": 2629800.0,
    "months": 2629800.0,
    "y": 31557600.0,
    "year": 31557600.0,
    "years": 31557600.0,
}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
_ABSOLUTE = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[ T](\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?)?"
    r"\s*(Z|UTC|[+-]\d{2}:?\d{2})?"
)


def _span(text: str) -> Optional[float]:
    """``2h 30min`` in seconds (systemd.time(7) time spans), or None."""
    text = text.strip()
    if not text:
        return None
    total, position = 0.0, 0
    for match in _SPAN.finditer(text):
        if text[position : match.start()].strip():
            return None
        unit = match.group(2)
        factor = _UNITS.get(unit, _UNITS.get(unit.lower()) if unit != "M" else None)
        if factor is None:
            return None
        total += float(match.group(1)) * factor
        position = match.end()
    if text[position:].strip() or position == 0:
        return None
    return total


def parse_time(text: str, now: Optional[float] = None) -> float:
    """A time as journalctl's ``--since``/``--until`` take it (systemd.time(7)), in epoch seconds.

    ``2026-11-30 08:00:00`` (seconds, time or both optional; local time unless
    a ``Z``/``UTC``/``+hh:mm`` follows), ``today``, ``yesterday``, ``tomorrow``,
    ``now``, ``@EPOCH``, ``-2h``/``+1d`` and ``3 weeks ago``.
    """
    now = time.time() if now is None else now
    value = text.strip()
    lowered = value.lower()
    if lowered == "now":
        return now
    if lowered in ("today", "yesterday", "tomorrow"):
        midnight = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
        days = {"today": 0, "yesterday": -1, "tomorrow": 1}[lowered]
        return (midnight + dt.timedelta(days=days)).timestamp()
    if value.startswith("@"):
        try:
            return float(value[1:])
        except ValueError:
            raise ValueError(f"not a time: {text!r}") from None
    if value[:1] in "+-" and value[1:]:
        span = _span(value[1:])
        if span is not None:
            return now + span if value[0] == "+" else now - span
    if lowered.endswith(" ago"):
        span = _span(value[:-4])
        if span is not None:
            return now - span
    if lowered.endswith(" left"):
        span = _span(value[:-5])
        if span is not None:
            return now + span
    match = _ABSOLUTE.fullmatch(value)
    if match:
        year, month, day, hour, minute, second, fraction, zone = match.groups()
        try:
            moment = dt.datetime(
                int(year),
                int(month),
                int(day),
                int(hour or 0),
                int(minute or 0),
                int(second or 0),
                int((fraction or "0").ljust(6, "0")),
            )
        except ValueError:
            raise ValueError(f"not a time: {text!r}") from None
        if zone is None:
            return moment.timestamp()  # local time, as journalctl
        return moment.replace(tzinfo=_zone(zone)).timestamp()
    raise ValueError(
        f"not a time: {text!r} (use e.g. '2026-11-30 08:00', 'yesterday', '-7d', '2 weeks ago')"
    )


def _zone(text: str) -> dt.timezone:
    if text in ("Z", "UTC"):
        return dt.timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    return dt.timezone(sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))


def iso(moment: Optional[float]) -> Optional[str]:
    """``2026-11-30T07:03:34Z`` (UTC, whole seconds), or None."""
    if moment is None:
        return None
    stamp = dt.datetime.fromtimestamp(int(moment), dt.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- log files -----------------------------------------------------------------

# rsyslog's RSYSLOG_FileFormat (Debian 12's default) and the traditional format:
#   2026-11-30T07:03:34.123456+00:00 relay1 relaymilter[123]: decision ...
#   Nov 30 07:03:34 relay1 relaymilter[123]: decision ...
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)? "
    r"(\S+) ([^\s\[:]+)(?:\[\d+\])?: "
)
_TRADITIONAL = re.compile(
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([ \d]\d) (\d\d):(\d\d):(\d\d) "
    r"(\S+) ([^\s\[:]+)(?:\[\d+\])?: "
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


def _open_log(path: str) -> IO[str]:
    """A text stream of the file, decompressed when its magic bytes say so."""
    with open(path, "rb") as probe:
        magic = probe.read(6)
    kwargs: Dict[str, Any] = {"encoding": "utf-8", "errors": "surrogateescape"}
    stream: IO[str]
    if magic[:2] == b"\x1f\x8b":
        stream = gzip.open(path, "rt", **kwargs)  # noqa: SIM115
    elif magic[:3] == b"BZh":
        stream = bz2.open(path, "rt", **kwargs)  # noqa: SIM115
    elif magic == b"\xfd7zXZ\x00":
        stream = lzma.open(path, "rt", **kwargs)  # noqa: SIM115
    else:
        stream = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    return stream


def _lines(stream: IO[str]) -> Iterator[str]:
    """The stream's lines, each cut at MAX_LINE (the rest of an over-long line is skipped)."""
    while True:
        line = stream.readline(MAX_LINE)
        if not line:
            return
        if len(line) >= MAX_LINE and not line.endswith("\n"):
            while True:  # skip the rest
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith("\n"):
                    break
            continue  # a cut line is not a record
        yield line


class _YearGuess:
    """Traditional syslog stamps have no year: the latest one not after the file's mtime."""

    def __init__(self, reference: float) -> None:
        self.reference = dt.datetime.fromtimestamp(reference + 86400)

    def stamp(self, month: int, day: int, hour: int, minute: int, second: int) -> Optional[float]:
        year = self.reference.year
        for candidate in (year, year - 1):
            try:
                moment = dt.datetime(candidate, month, day, hour, minute, second)
            except ValueError:  # 29 Feb in another year
                continue
            if moment <= self.reference:
                return moment.timestamp()
        return None


def split_syslog(
    line: str, years: Optional[_YearGuess] = None
) -> Tuple[Optional[float], Optional[str], Optional[str], str]:
    """(time, host, program, message) of a syslog line; (None, None, None, line) if plain."""
    match = _RFC3339.match(line)
    if match:
        year, month, day, hour, minute, second, fraction, zone, host, program = match.groups()
        try:
            moment = dt.datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second),
                int((fraction or "0")[:6].ljust(6, "0")),
                tzinfo=_zone(zone) if zone else None,
            )
        except ValueError:
            return None, None, None, line
        return moment.timestamp(), host, program, line[match.end() :]
    match = _TRADITIONAL.match(line)
    if match:
        month_name, day, hour, minute, second, host, program = match.groups()
        guess = years or _YearGuess(time.time())
        stamp = guess.stamp(_MONTHS[month_name], int(day), int(hour), int(minute), int(second))
        return stamp, host, program, line[match.end() :]
    return None, None, None, line


def read_log(path: str, stats: Stats) -> Iterator[Entry]:
    """The decision records of one log file (plain, syslog-prefixed, compressed)."""
    try:
        stream = _open_log(path)
        mtime = os.stat(path).st_mtime
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror or exc}") from None
    years = _YearGuess(mtime)
    with stream:
        try:
            for line in _lines(stream):
                if "decision " not in line:
                    continue
                moment, host, program, message = split_syslog(line, years)
                if program is not None and not program.startswith(IDENTIFIER):
                    continue  # another program's line
                read = read_line(message)
                if read is None:
                    stats.unreadable += 1
                    continue
                yield Entry(read[0], moment, host, read[1])
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            # A compressed file cut short (rotation in progress): keep what was read.
            stats.errors.append(f"{path}: {exc}")


# -- journals -------------------------------------------------------------------


class JournalSpec(NamedTuple):
    """A journal to read: the system's (both None), a directory, or files."""

    directory: Optional[str] = None
    files: Tuple[str, ...] = ()

    @property
    def key(self) -> str:
        if self.directory:
            return f"journal-dir:{os.path.abspath(self.directory)}"
        if self.files:
            return "journal-file:" + ",".join(os.path.abspath(f) for f in self.files)
        return "journal"


def _journal_reader(spec: JournalSpec) -> Any:
    try:
        from systemd import journal  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        raise SourceError(
            "reading the journal needs python3-systemd (apt install python3-systemd, "
            "dnf install python3-systemd); or give --log FILE"
        ) from None
    for path in (spec.directory, *spec.files):
        if path and not os.path.exists(path):
            raise SourceError(f"{path}: no such file or directory")
    try:
        if spec.directory:
            reader = journal.Reader(path=spec.directory)
        elif spec.files:
            reader = journal.Reader(files=list(spec.files))
        else:
            reader = journal.Reader()
    except (OSError, ValueError) as exc:
        raise SourceError(f"{spec.key}: cannot open the journal: {exc}") from None
    return reader


def read_journal(
    spec: JournalSpec,
    since: Optional[float],
    until: Optional[float],
    cursor: Optional[str],
    positions: Dict[str, Any],
) -> Iterator[Entry]:
    """relaymilter's decision records in a journal, from ``cursor`` or ``since`` on.

    Uses the binding's raw accessors (``_next``, ``_get_all``): the public
    ``get_next`` converts every field of every entry (UUIDs, datetimes),
    which costs more than the whole report.
    """
    reader = _journal_reader(spec)
    with reader:
        reader.add_match(SYSLOG_IDENTIFIER=IDENTIFIER)
        reader.add_disjunction()
        reader.add_match(_SYSTEMD_UNIT=UNIT)
        skip_cursor = None
        if cursor:
            reader.seek_cursor(cursor)
            skip_cursor = cursor
        elif since is not None:
            reader.seek_realtime(since)
        prefix = JOURNAL_PREFIX
        cut = len(prefix)
        while reader._next():
            if skip_cursor is not None:
                if reader.test_cursor(skip_cursor):
                    skip_cursor = None
                    continue
                skip_cursor = None
            raw = reader._get_all()
            moment = reader._get_realtime() / 1e6
            if since is not None and moment < since:
                continue
            if until is not None and moment > until:
                break
            positions[spec.key] = reader._get_cursor()
            fields = {
                key[cut:]: _text(value) for key, value in raw.items() if key.startswith(prefix)
            }
            record = from_journal(fields)
            if record is None:
                continue  # a start-up or reload message
            host = raw.get("_HOSTNAME")
            yield Entry(record, moment, _text(host) if host is not None else None)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


# -- several sources, filters and the cursor file -------------------------------------


class Sources(NamedTuple):
    journals: Tuple[JournalSpec, ...]
    logs: Tuple[str, ...]

    @classmethod
    def from_options(
        cls,
        journal_dirs: Optional[List[str]],
        journal_files: Optional[List[str]],
        logs: Optional[List[str]],
        journal: bool = False,
    ) -> Sources:
        """The sources given on the command line; the system journal when none is."""
        specs = [JournalSpec(directory=d) for d in journal_dirs or ()]
        if journal_files:
            specs.append(JournalSpec(files=tuple(journal_files)))
        if journal or not (specs or logs):
            specs.insert(0, JournalSpec())
        return cls(tuple(specs), tuple(logs or ()))


class CursorFile:
    """The positions of an incremental run: read at start, written after a successful run."""

    VERSION = 1

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self.journals: Dict[str, Any] = {}
        self.hosts: Dict[str, List[float]] = {}  # host -> [time, records at that time]
        if path and os.path.lexists(path):
            try:
                data = json.loads(read_regular_file(path, CURSOR_FILE_LIMIT, "the cursor file"))
                self.journals = dict(data.get("journals", {}))
                self.hosts = {str(k): [float(v[0]), int(v[1])] for k, v in data["hosts"].items()}
            except UnsafeFileError as exc:
                raise SourceError(str(exc)) from None
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise SourceError(f"{path}: not a relaymilter cursor file: {exc}") from None

    def save(self) -> None:
        """Replace the file with the new positions, never writing through a link.

        The temporary file is new (O_EXCL, a random name, O_NOFOLLOW): a link
        planted in the directory beforehand is never followed; the rename
        replaces a link at the cursor's own path, never its target.
        """
        if not self.path:
            return
        data = {"version": self.VERSION, "journals": self.journals, "hosts": self.hosts}
        directory = os.path.dirname(os.path.abspath(self.path))
        handle, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp"
        )
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(data, stream, indent=1, sort_keys=True)
                stream.write("\n")
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def read_entries(
    sources: Sources,
    since: Optional[float] = None,
    until: Optional[float] = None,
    cursor: Optional[CursorFile] = None,
    stats: Optional[Stats] = None,
) -> Iterator[Entry]:
    """Every decision record of the sources, filtered by time and the cursor file.

    The cursor file's positions are updated as records are read; the caller
    saves it once its output is written.
    """
    stats = stats if stats is not None else Stats()
    cursor = cursor if cursor is not None else CursorFile(None)
    for spec in sources.journals:
        yield from read_journal(spec, since, until, cursor.journals.get(spec.key), cursor.journals)
    previous = {host: tuple(mark) for host, mark in cursor.hosts.items()}
    seen_at_mark: Dict[str, int] = {}
    for path in sources.logs:
        for entry in read_log(path, stats):
            moment = entry.time
            if moment is None:
                if since is not None or until is not None:
                    stats.undated_skipped += 1
                    continue
                yield entry
                continue
            if (since is not None and moment < since) or (until is not None and moment > until):
                continue
            host = entry.host or ""
            mark = previous.get(host)
            if mark is not None:
                if moment < mark[0]:
                    continue
                if moment == mark[0]:
                    seen_at_mark[host] = seen_at_mark.get(host, 0) + 1
                    if seen_at_mark[host] <= mark[1]:
                        continue
            latest = cursor.hosts.get(host)
            if latest is None or moment > latest[0]:
                cursor.hosts[host] = [moment, 1]
            elif moment == latest[0]:
                latest[1] += 1
            yield entry


class Selection(NamedTuple):
    """The sources, period and cursor file of a ``report`` or ``replay`` command line."""

    sources: Sources
    since: Optional[float]
    until: Optional[float]
    cursor: CursorFile
    stats: Stats

    def entries(self) -> Iterator[Entry]:
        return read_entries(self.sources, self.since, self.until, self.cursor, self.stats)
