"""Logging: straight to the systemd journal under systemd, plain stderr lines elsewhere.

Under systemd (``JOURNAL_STREAM`` names the device and inode of our stderr, as
systemd.exec(5) documents), each record goes to journald over its native
protocol with its priority, ``SYSLOG_IDENTIFIER=relaymilter`` and structured
fields, so that ``journalctl -u relaymilter RELAYMILTER_ACTION=reject`` works.
Nothing is written to stderr then, so nothing is logged twice, and journald
adds the timestamp. Elsewhere each record is one ``LEVEL message`` line on
stderr, without a timestamp (the service manager or the terminal has one).

Why not python3-systemd's ``JournalHandler``, now that ``report`` and ``replay``
read the journal with python3-systemd: measured with
``benchmarks/journal_writer.py`` (30,000 decision records into a stand-in journal
socket, on the 2-core test machine), one record through ``logging`` costs the
same with either handler (31.7 µs here, 31.5 µs with python3-systemd's), and
python3-systemd's bare ``journal.send`` (19.4 µs) saves only what ``logging``
itself costs. So there is no speed to gain, while the milter would need
python3-systemd, which the packages only recommend (for the readers), and each
entry would carry python3-systemd's extra fields (the source file, line and
function, thread and process names). The writer stays ours.

The native protocol (systemd's "Native Journal Protocol" document) is one
datagram per entry on ``/run/systemd/journal/socket``:

* ``NAME=value\\n`` for a value without a newline;
* ``NAME\\n`` + the value's length as a little-endian 64-bit integer + the
  value + ``\\n`` for any value (binary-safe, used for values with newlines);
* an entry too large for one datagram is written to a sealed memfd, whose
  descriptor is sent instead (SCM_RIGHTS), as sd-journal does.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, TextIO, Tuple

#: Attribute of a LogRecord that carries structured fields (upper-case keys).
FIELDS_ATTR = "relaymilter_fields"
#: Prefix of the journal field names made from FIELDS_ATTR keys.
FIELD_PREFIX = "RELAYMILTER_"
SYSLOG_IDENTIFIER = "relaymilter"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: syslog's "mail" facility: rsyslog then files relaymilter's lines in
#: /var/log/mail.log next to the MTA's own, where admins look for a queue ID.
SYSLOG_FACILITY_MAIL = 2

# syslog priorities (sd-daemon(3)) for the logging levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_DEBUG_PRIORITY = 7
# journald accepts field names of A-Z, 0-9 and "_", at most 64 characters,
# not starting with "_" (reserved for trusted fields) or a digit.
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def configure_logging(level: int = logging.INFO) -> None:
    """Configure the ``relaymilter`` logger: journald under systemd, else plain stderr lines."""
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler()
        # The priority is a field of its own; the message needs no level.
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    # Every record would otherwise look up the process id and the thread (a
    # libmilter thread, named "Dummy-N"): neither says anything here, and a
    # decision is logged for every recipient.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("relaymilter")
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def stderr_is_journal(environ: Optional[Mapping[str, str]] = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:inode``).

    Checking the inode, not just the variable, matters: a child whose stderr
    was redirected inherits the variable but not the stream.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0-7) for a logging level; levels in between round up."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


def journal_field_name(key: str) -> Optional[str]:
    """``RELAYMILTER_<KEY>`` for a structured-field key, or None if journald would refuse it."""
    name = FIELD_PREFIX + re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return name if _FIELD_NAME.fullmatch(name) else None


def encode_value(value: str) -> bytes:
    """UTF-8, restoring the original bytes of surrogate-escaped input from the MTA."""
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a byte
        return value.encode("utf-8", "backslashreplace")


def encode_field(name: str, value: bytes) -> bytes:
    """One field of a native-protocol entry; binary-safe form when the value has a newline."""
    if b"\n" in value:
        return name.encode("ascii") + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return name.encode("ascii") + b"=" + value + b"\n"


def encode_entry(fields: Iterable[Tuple[str, str]]) -> bytes:
    return b"".join(encode_field(name, encode_value(value)) for name, value in fields)


class JournalHandler(logging.Handler):
    """Sends each record to journald as one native-protocol entry.

    If journald cannot be reached, the record is written to the fallback
    stream (stderr, which under systemd is the journal's stream too) with a
    ``<priority>`` prefix that journald understands, so no record is lost.
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        identifier: str = SYSLOG_IDENTIFIER,
        fallback: Optional[TextIO] = None,
    ) -> None:
        super().__init__()
        self.socket_path = socket_path or JOURNAL_SOCKET
        self.identifier = identifier
        self.fallback = fallback
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._journal_down = False

    def close(self) -> None:
        self._socket.close()
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            entry = encode_entry(self.fields(record, message))
        except Exception:
            self.handleError(record)
            return
        try:
            self.send(entry)
        except OSError as exc:
            self._fall_back(record, message, exc)
        else:
            self._journal_down = False

    def fields(self, record: logging.LogRecord, message: str) -> List[Tuple[str, str]]:
        """The entry's fields: message, priority, identifier, source and RELAYMILTER_*."""
        fields: List[Tuple[str, Optional[str]]] = [
            ("MESSAGE", message),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_FACILITY", str(SYSLOG_FACILITY_MAIL)),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        fields.extend(structured_fields(record))
        # A hand-made LogRecord may lack the function name; an
        # empty message is still a message.
        return [(name, value or "") for name, value in fields if value or name == "MESSAGE"]

    def send(self, entry: bytes) -> None:
        try:
            self._socket.sendto(entry, self.socket_path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(entry)

    def _send_memfd(self, entry: bytes) -> None:
        """A large entry: journald reads it from a sealed memfd passed with SCM_RIGHTS."""
        fd = os.memfd_create("relaymilter-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, entry)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
            self._socket.sendmsg([], rights, 0, self.socket_path)
        finally:
            os.close(fd)

    def _fall_back(self, record: logging.LogRecord, message: str, exc: OSError) -> None:
        stream = self.fallback or sys.stderr
        try:
            if not self._journal_down:
                stream.write(f"<4>WARNING journald unreachable, logging to stderr: {exc}\n")
                self._journal_down = True
            priority = syslog_priority(record.levelno)
            stream.write(f"<{priority}>{record.levelname} {message}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def structured_fields(record: logging.LogRecord) -> List[Tuple[str, str]]:
    """The record's FIELDS_ATTR as (RELAYMILTER_<KEY>, value) pairs; bad keys dropped.

    FIELDS_ATTR is a dict, or an object with ``journal_fields()`` (a decision
    record): then the fields are built here, only when the journal is written.
    """
    extra: Any = getattr(record, FIELDS_ATTR, None)
    if hasattr(extra, "journal_fields"):
        extra = extra.journal_fields()
    if not isinstance(extra, dict):
        return []
    pairs: Dict[str, str] = {}
    for key, value in extra.items():
        name = journal_field_name(str(key))
        if name is not None and value is not None:
            pairs[name] = str(value)
    return list(pairs.items())
