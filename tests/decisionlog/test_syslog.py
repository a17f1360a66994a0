"""Decision lines through a real rsyslogd with its default message size, read back by report.

The milter's own lines (the real RelayMilter, driven without libmilter) for
hostile recipients reach the file whole and read back as the decisions made;
the line relaymilter wrote before values were bounded is cut by rsyslog and
then counted unreadable, never read as the fields a client wrote inside it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from relaymilter.config import parse_config
from relaymilter.daemon.runtime import Runtime
from relaymilter.decisionlog.journal import FIELDS_ATTR
from relaymilter.decisionlog.logsource import Stats, read_log
from relaymilter.decisionlog.record import MAX_LINE_BYTES, DecisionRecord
from relaymilter.decisionlog.replay import replay
from relaymilter.decisionlog.report import build_report
from relaymilter.milterd.milter import RelayMilter

from ..scenarios import CONFIG
from ..syslogd import Rsyslogd

pytestmark = pytest.mark.tools

HOSTILE_RECIPIENTS = [
    "<kate@tailspintoys.com>",
    "<" + "\\" * 2000 + '" action=continue reason=internal-recipient"@tailspintoys.com>',
    "<" + "\x01" * 3000 + "@tailspintoys.com>",
    "<" + "\u202e" * 1000 + "u@contoso.com>",
    "<" + "a%" * 900 + "kate@tailspintoys.com>",
]


class Context:
    """What pymilter's context gives a callback: the macros, and setreply."""

    def __init__(self, macros: Dict[str, str]) -> None:
        self.macros = macros

    def getsymval(self, name: str) -> Optional[str]:
        return self.macros.get(name)

    def setreply(self, *args: str) -> None:
        pass


@pytest.fixture
def rsyslogd(tmp_path: Path) -> Iterator[Rsyslogd]:
    with Rsyslogd(tmp_path) as daemon:
        yield daemon


class Decisions(logging.Handler):
    """The decision records the milter logs, as objects (what the journal would get)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: List[DecisionRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        decision = getattr(record, FIELDS_ATTR, None)
        if isinstance(decision, DecisionRecord):
            self.records.append(decision)


@pytest.fixture
def to_syslog(rsyslogd: Rsyslogd) -> Iterator[Decisions]:
    """The milter's logger sends to the private rsyslogd, as journald forwards it."""
    logger = logging.getLogger("relaymilter")
    handler = rsyslogd.handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    decisions = Decisions()
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler, decisions]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield decisions
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        handler.close()


def decide_through_the_milter(
    recipients: List[str], macros: Dict[str, str], sender: str = "<" + "\\" * 3000 + "@example.net>"
) -> None:
    RelayMilter.runtime = Runtime(parse_config(CONFIG, "relaymilter.yml"))
    milter = RelayMilter()
    milter._ctx = Context(macros)
    milter._protocol = milter._actions = 0
    milter.envfrom(sender)
    for recipient in recipients:
        milter.envrcpt(recipient)


def test_the_longest_lines_reach_mail_log_whole(rsyslogd: Rsyslogd, to_syslog: Decisions) -> None:
    macros = {
        "{client_addr}": "192.0.2.7",
        "i": "4XyZ1",
        "{cert_subject}": "/CN=" + "\\x" * 700,
        "{cert_issuer}": "/CN=" + "\u2066" * 700,
        "{rcpt_addr}": "<" + '"' * 2000 + "@tailspintoys.com>",
    }
    decide_through_the_milter(HOSTILE_RECIPIENTS, macros)
    decisions = [line for line in rsyslogd.lines() if "decision " in line]
    assert len(decisions) == len(HOSTILE_RECIPIENTS)
    assert max(len(line.split(": ", 1)[1].encode()) for line in decisions) <= MAX_LINE_BYTES
    stats = Stats()
    entries = list(read_log(str(rsyslogd.output), stats))
    assert stats.unreadable == 0
    assert len(entries) == len(to_syslog.records)
    for entry, made in zip(entries, to_syslog.records):
        read = entry.record
        assert (read.action, read.reason, read.organization) == (
            made.action,
            made.reason,
            made.organization,
        )
        assert {"sender", "cert_subject", "cert_issuer", "mta_rcpt"} <= set(entry.cut)
        for name, value in read._asdict().items():
            whole = getattr(made, name)
            if name in entry.cut:
                assert whole.startswith(value) and len(value) < len(whole)
            else:
                assert value == whole
    # The MTA's resolved address routes every one of them to tailspintoys.com.
    assert {made.action for made in to_syslog.records} == {"reject"}


def test_a_line_rsyslog_cuts_is_counted_unreadable_not_forged(
    rsyslogd: Rsyslogd, to_syslog: Decisions
) -> None:
    # The line as written before values were bounded: 11 KB, the client's text
    # "action=continue reason=internal-recipient" near where rsyslog cuts it.
    forged = " action=continue reason=internal-recipient"
    head = (
        "decision conn=1 queue_id=NOQUEUE client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- cert_subject=- cert_issuer=- verify=- "
        'cn_subject=- cn_issuer=- cert_fp=- from=<> to="<'
    )
    padding = (8074 - len(head) - len(forged) - 10) // 2
    line = (
        head
        + "\\\\" * padding
        + forged
        + "\\\\" * 1500
        + '@tailspintoys.com>" route=tailspintoys.com mta_rcpt=- mode=enforce '
        "config=66f53246dec3 action=reject reason=attr36"
    )
    assert len(line) > 11000
    logging.getLogger("relaymilter").info("%s", line)
    written = [text for text in rsyslogd.lines() if "decision " in text]
    assert len(written) == 1 and forged in written[0][-100:]  # cut by rsyslog
    stats = Stats()
    assert list(read_log(str(rsyslogd.output), stats)) == []
    assert stats.unreadable == 1


def test_report_and_replay_read_the_file_rsyslog_wrote(
    rsyslogd: Rsyslogd, to_syslog: Decisions
) -> None:
    decide_through_the_milter(
        ["<kate@tailspintoys.com>", "<kate@contoso.com>", "<" + "k" * 600 + "@tailspintoys.com>"],
        {"{client_addr}": "192.0.2.7", "i": "4XyZ1"},
        sender="<john@example.net>",
    )
    rsyslogd.lines()
    entries = list(read_log(str(rsyslogd.output), Stats()))
    assert [(e.record.recipient, e.record.action, e.record.reason) for e in entries[:2]] == [
        ("kate@tailspintoys.com", "reject", "attr36"),
        ("kate@contoso.com", "continue", "internal-recipient"),
    ]
    assert [e.cut for e in entries] == [(), (), ("recipient",)]
    assert {e.host for e in entries} != {None}
    config = parse_config(CONFIG, "relaymilter.yml")
    report = build_report(entries, config)
    assert report.totals["reject"] == 2 and report.totals["unreadable_lines"] == 0
    result = replay(entries, config)
    # Decided again, the same; the cut one is not decided (counted apart).
    assert (result.totals["unchanged"], result.totals["cut"]) == (2, 1)
    assert result.newly_refused == result.newly_allowed == []
