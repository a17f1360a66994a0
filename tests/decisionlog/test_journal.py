"""relaymilter.decisionlog.journal: what journald would receive, checked on a fake journal socket.

The fake socket is an AF_UNIX datagram socket like /run/systemd/journal/socket;
``parse_entry`` decodes the native protocol independently of the code under
test (systemd's "Native Journal Protocol" document).
"""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from relaymilter.decisionlog import journal
from relaymilter.decisionlog.journal import FIELDS_ATTR, JournalHandler, configure_logging

from ..support import REPO, MilterSession, running_daemon

Entry = Dict[str, bytes]


def parse_entry(datagram: bytes) -> Entry:
    """Decode one native-protocol entry: NAME=value lines and binary-safe NAME + length."""
    fields: Entry = {}
    rest = datagram
    while rest:
        line_end = rest.index(b"\n")
        line = rest[:line_end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            rest = rest[line_end + 1 :]
        else:
            name = line
            (size,) = struct.unpack("<Q", rest[line_end + 1 : line_end + 9])
            value = rest[line_end + 9 : line_end + 9 + size]
            assert rest[line_end + 9 + size : line_end + 10 + size] == b"\n"
            rest = rest[line_end + 10 + size :]
        assert name.decode() not in fields, f"field {name!r} twice"
        fields[name.decode()] = value
    return fields


class FakeJournal:
    """A datagram socket standing in for journald's, receiving plain entries and memfds."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        # Large enough for the memfd test's datagram-size probe not to matter.
        self.sock.settimeout(5)

    def receive(self) -> Entry:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:
            assert not data, "an entry comes either inline or in a memfd"
            return self._read_memfd(fds[0])
        return parse_entry(data)

    def _read_memfd(self, fd: int) -> Entry:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            # journald refuses an unsealed memfd.
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
            size = os.fstat(fd).st_size
            entry = parse_entry(os.pread(fd, size, 0))
            entry["__MEMFD"] = b"1"
            return entry
        finally:
            os.close(fd)

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return True
        except BlockingIOError:
            return False
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_journal(tmp_path: Path) -> Iterator[FakeJournal]:
    fake = FakeJournal(tmp_path / "journal.socket")
    yield fake
    fake.close()


@pytest.fixture
def logger(fake_journal: FakeJournal) -> Iterator[logging.Logger]:
    log = logging.getLogger("relaymilter.test-journal")
    handler = JournalHandler(socket_path=fake_journal.path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.handlers[:] = []
    handler.close()


DECISION_FIELDS = {
    "ACTION": "reject",
    "REASON": "recipient-and-sender-outside-accepted-domains",
    "QUEUE_ID": "4XyZ1234",
    "CLIENT_ADDRESS": "192.0.2.10",
    "ORGANIZATION": "contoso",
    "CONNECTOR": "onprem-ip",
    "KIND": "ip",
    "CERTIFICATE": "mail.contoso.com",
    "SENDER": "app@example.net",
    "RECIPIENT": "someone@example.org",
}


def test_a_decision_carries_priority_identifier_and_every_field(
    logger: logging.Logger, fake_journal: FakeJournal
) -> None:
    logger.info("decision to=<someone@example.org>", extra={FIELDS_ATTR: DECISION_FIELDS})
    entry = fake_journal.receive()
    assert entry["MESSAGE"] == b"decision to=<someone@example.org>"
    assert entry["PRIORITY"] == b"6"
    assert entry["SYSLOG_IDENTIFIER"] == b"relaymilter"
    assert entry["SYSLOG_FACILITY"] == b"2"  # mail, like the MTA's own lines
    for key, value in DECISION_FIELDS.items():
        assert entry[f"RELAYMILTER_{key}"] == value.encode()
    assert entry["CODE_FUNC"] == b"test_a_decision_carries_priority_identifier_and_every_field"
    assert entry["CODE_FILE"] == __file__.encode()
    # journald stamps the entry itself: no timestamp, no level in the text.
    assert not any(name.endswith("TIMESTAMP") for name in entry)
    assert not fake_journal.pending(), "one record, one entry"


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, b"7"),
        (logging.INFO, b"6"),
        (logging.WARNING, b"4"),
        (logging.ERROR, b"3"),
        (logging.CRITICAL, b"2"),
    ],
)
def test_levels_map_to_syslog_priorities(
    logger: logging.Logger, fake_journal: FakeJournal, level: int, priority: bytes
) -> None:
    logger.log(level, "message")
    assert fake_journal.receive()["PRIORITY"] == priority


def test_values_with_newlines_use_the_binary_safe_encoding(
    logger: logging.Logger, fake_journal: FakeJournal
) -> None:
    sender = "evil@example.net\nRELAYMILTER_ACTION=continue"
    logger.warning("two\nlines", extra={FIELDS_ATTR: {"SENDER": sender}})
    raw, _ = fake_journal.sock.recvfrom(1 << 16)
    # NAME, newline, 64-bit little-endian length, the value, newline.
    assert b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n" in raw
    entry = parse_entry(raw)
    assert entry["MESSAGE"] == b"two\nlines"
    assert entry["RELAYMILTER_SENDER"] == sender.encode()
    # The injected line stayed inside the value: no forged field.
    assert "RELAYMILTER_ACTION" not in entry


def test_surrogate_escaped_bytes_from_the_mta_are_sent_as_the_original_bytes(
    logger: logging.Logger, fake_journal: FakeJournal
) -> None:
    raw_sender = b"j\xf6rg@example.net"  # latin-1, not UTF-8
    sender = raw_sender.decode("utf-8", "surrogateescape")
    logger.info("decision", extra={FIELDS_ATTR: {"SENDER": sender, "RECIPIENT": "ü@example.org"}})
    entry = fake_journal.receive()
    assert entry["RELAYMILTER_SENDER"] == raw_sender
    assert entry["RELAYMILTER_RECIPIENT"] == "ü@example.org".encode()


def test_odd_keys_are_normalised_or_dropped(
    logger: logging.Logger, fake_journal: FakeJournal
) -> None:
    fields = {"queue_id": "A1", "client-address": "192.0.2.1", "X" * 60: "too long", "N": None}
    logger.info("fields", extra={FIELDS_ATTR: fields})
    entry = fake_journal.receive()
    assert entry["RELAYMILTER_QUEUE_ID"] == b"A1"
    assert entry["RELAYMILTER_CLIENT_ADDRESS"] == b"192.0.2.1"
    assert not [name for name in entry if name.startswith("RELAYMILTER_X")]
    assert "RELAYMILTER_N" not in entry


def test_a_traceback_stays_in_the_one_entry(
    logger: logging.Logger, fake_journal: FakeJournal
) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger.error("reload: failed", exc_info=True)
    entry = fake_journal.receive()
    assert entry["PRIORITY"] == b"3"
    assert entry["MESSAGE"].startswith(b"reload: failed\nTraceback (most recent call last):")
    assert entry["MESSAGE"].endswith(b"ValueError: boom")
    assert not fake_journal.pending()


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(
    logger: logging.Logger, fake_journal: FakeJournal
) -> None:
    big = "x" * (4 << 20)  # above any AF_UNIX datagram limit
    logger.info("big", extra={FIELDS_ATTR: {"REASON": big}})
    entry = fake_journal.receive()
    assert entry["__MEMFD"] == b"1"
    assert entry["MESSAGE"] == b"big"
    assert entry["RELAYMILTER_REASON"] == big.encode()


def test_without_journald_records_fall_back_to_stderr_with_a_priority_prefix(
    tmp_path: Path,
) -> None:
    stream = io.StringIO()
    handler = JournalHandler(socket_path=str(tmp_path / "missing.socket"), fallback=stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("relaymilter", logging.ERROR, __file__, 1, "lost?", None, None)
    handler.emit(record)
    handler.emit(record)
    handler.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<4>WARNING journald unreachable")
    assert lines[1:] == ["<3>ERROR lost?", "<3>ERROR lost?"]


# -- detecting the journal stream -------------------------------------------


def _stream_id(fd: int) -> str:
    status = os.fstat(fd)
    return f"{status.st_dev}:{status.st_ino}"


def test_journal_stream_must_name_our_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "wb") as stderr, open(tmp_path / "other", "wb") as other:
        fd = stderr.fileno()
        assert journal.stderr_is_journal({"JOURNAL_STREAM": _stream_id(fd)}, fd)
        # Inherited by a process whose stderr was redirected: not the journal.
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": _stream_id(other.fileno())}, fd)
        assert not journal.stderr_is_journal({}, fd)
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd)
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": "1:"}, fd)


def test_configure_logging_under_systemd_writes_only_to_the_journal(
    fake_journal: FakeJournal, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(journal, "JOURNAL_SOCKET", fake_journal.path)
    monkeypatch.setenv("JOURNAL_STREAM", _stream_id(2))  # pytest's capture file is our stderr
    configure_logging(logging.INFO)
    try:
        log = logging.getLogger("relaymilter.daemon-test")
        log.debug("below the level")
        log.info("listening", extra={FIELDS_ATTR: {"ACTION": "start"}})
        entry = fake_journal.receive()
        assert entry["MESSAGE"] == b"listening"  # no "INFO " prefix: PRIORITY says it
        assert entry["RELAYMILTER_ACTION"] == b"start"
        assert entry["LOGGER"] == b"relaymilter.daemon-test"
        assert not fake_journal.pending()
        assert capfd.readouterr().err == "", "logged twice (journal and stderr)"
    finally:
        _reset_relaymilter_logger()


def _reset_relaymilter_logger() -> None:
    root = logging.getLogger("relaymilter")
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = []
    root.propagate = True


def test_outside_systemd_each_record_is_one_plain_line_on_stderr() -> None:
    code = (
        "import logging\n"
        "from relaymilter.decisionlog.journal import configure_logging, FIELDS_ATTR\n"
        "configure_logging()\n"
        "log = logging.getLogger('relaymilter')\n"
        "log.debug('hidden')\n"
        "log.info('listening on inet:8894@127.0.0.1', extra={FIELDS_ATTR: {'ACTION': 'x'}})\n"
        "log.warning('config: something')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "INFO listening on inet:8894@127.0.0.1\nWARNING config: something\n"


# -- the real daemon -----------------------------------------------------------

# Runs "relaymilter run" with the journal socket pointed at the fake one; the
# rest is the real code path: JOURNAL_STREAM detection, configure_logging, and
# the lead's decision logging.
_DAEMON_WITH_FAKE_JOURNAL = (
    "import sys\n"
    "import relaymilter.decisionlog.journal\n"
    "relaymilter.decisionlog.journal.JOURNAL_SOCKET = sys.argv.pop(1)\n"
    "from relaymilter.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _receive_until(fake: FakeJournal, wanted: str) -> List[Entry]:
    entries = []
    while True:
        entry = fake.receive()
        entries.append(entry)
        if entry.get("RELAYMILTER_ACTION") == wanted.encode():
            return entries


def _find(entries: List[Entry], **fields: str) -> Optional[Entry]:
    for entry in entries:
        if all(entry.get(name) == value.encode() for name, value in fields.items()):
            return entry
    return None


def test_the_daemon_logs_decisions_with_fields_journalctl_can_match(
    fake_journal: FakeJournal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr_path = tmp_path / "daemon.log"
    spec = f"unix:{tmp_path}/milter.sock"
    # The daemon's stderr will be daemon.log: tell it that is the journal stream.
    stderr_path.touch()
    status = os.stat(stderr_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
    argv = [sys.executable, "-c", _DAEMON_WITH_FAKE_JOURNAL, fake_journal.path, "run"]
    with running_daemon(REPO / "etc" / "relaymilter.yml", spec, stderr_path, argv) as daemon:
        session = MilterSession(spec)
        session.negotiate()
        session.connect("192.0.2.10")
        session.mail("<app@example.net>", {"i": "4XyZ1234"})
        reply = session.rcpt("<someone@example.org>", {"i": "4XyZ1234"})
        session.close()
        assert reply.startswith("550 5.7.64")
        entries = _receive_until(fake_journal, "reject")
        # A clean stop takes libmilter ~5 s after a session; not needed here.
        daemon.process.kill()
        daemon.process.wait()
    reject = _find(entries, RELAYMILTER_ACTION="reject")
    assert reject is not None
    assert reject["PRIORITY"] in (b"5", b"6", b"4")
    assert reject["SYSLOG_IDENTIFIER"] == b"relaymilter"
    assert reject["RELAYMILTER_QUEUE_ID"] == b"4XyZ1234"
    assert reject["RELAYMILTER_CLIENT_ADDRESS"] == b"192.0.2.10"
    assert reject["RELAYMILTER_ORGANIZATION"] == b"contoso"
    assert reject["RELAYMILTER_CONNECTOR"] == b"onprem-ip"
    assert reject["RELAYMILTER_KIND"] == b"ip"
    assert reject["RELAYMILTER_SENDER"] == b"app@example.net"
    assert reject["RELAYMILTER_RECIPIENT"] == b"someone@example.org"
    assert b"someone@example.org" in reject["MESSAGE"]
    # Under the journal, nothing is written to stderr as well.
    assert stderr_path.read_text() == ""
