"""Reading decision records: real journal files, syslog and stderr logs, rotation, cursors."""

from __future__ import annotations

import datetime as dt
import gzip
import importlib
import json
import os
import sys
from pathlib import Path
from typing import List

import pytest

from relaymilter.decisionlog import logsource
from relaymilter.decisionlog.logsource import (
    CursorFile,
    JournalSpec,
    SourceError,
    Sources,
    Stats,
    parse_time,
    read_entries,
)
from relaymilter.decisionlog.record import DecisionRecord

from .. import traffic as dl
from ..support import run_cli

NOW = dt.datetime(2026, 11, 30, 12, 0, 0).timestamp()  # local time, as journalctl


def logs(*paths: Path) -> Sources:
    return Sources((), tuple(str(p) for p in paths))


def recipients(entries: List[logsource.Entry]) -> List[str]:
    return [e.record.recipient or "" for e in entries]


# -- --since/--until --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23", dt.datetime(2026, 11, 23).timestamp()),
        ("2026-11-23 08:30", dt.datetime(2026, 11, 23, 8, 30).timestamp()),
        ("2026-11-23 08:30:15", dt.datetime(2026, 11, 23, 8, 30, 15).timestamp()),
        (
            "2026-11-23T08:30:15Z",
            dt.datetime(2026, 11, 23, 8, 30, 15, tzinfo=dt.timezone.utc).timestamp(),
        ),
        (
            "2026-11-23 08:30:15 UTC",
            dt.datetime(2026, 11, 23, 8, 30, 15, tzinfo=dt.timezone.utc).timestamp(),
        ),
        ("now", NOW),
        ("today", dt.datetime(2026, 11, 30).timestamp()),
        ("yesterday", dt.datetime(2026, 11, 29).timestamp()),
        ("tomorrow", dt.datetime(2026, 12, 1).timestamp()),
        ("-7d", NOW - 7 * 86400),
        ("-1h 30min", NOW - 5400),
        ("+2h", NOW + 7200),
        ("2 weeks ago", NOW - 14 * 86400),
        ("@1700000000", 1700000000.0),
    ],
)
def test_times_in_journalctl_formats(text: str, expected: float) -> None:
    assert parse_time(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "last tuesday", "2026-13-01", "-7 parsecs", "@x"])
def test_bad_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a time"):
        parse_time(text, NOW)


# -- log files ---------------------------------------------------------------------


def test_stderr_syslog_and_rotated_gzip_lines_read_back_as_written(tmp_path: Path) -> None:
    logged = dl.traffic(days=3)
    third = len(logged) // 3
    old = dl.write(tmp_path / "mail.log.2.gz", dl.syslog_lines(logged[:third]), compress=True)
    mid = dl.write(tmp_path / "mail.log.1", dl.syslog_lines(logged[third : 2 * third], "trad"))
    new = dl.write(tmp_path / "relaymilter.err", dl.stderr_lines(logged[2 * third :]))
    stats = Stats()
    entries = list(read_entries(logs(old, mid, new), stats=stats))
    assert [e.record for e in entries] == [item.record for item in logged]
    assert [e.time for e in entries[:third]] == [item.time for item in logged[:third]]
    # Traditional stamps: local time, whole seconds, the year from the file's date.
    assert [e.time for e in entries[third : 2 * third]] == [
        float(int(item.time)) for item in logged[third : 2 * third]
    ]
    assert all(e.time is None and e.host is None for e in entries[2 * third :])
    assert {e.host for e in entries[: 2 * third]} == {"relay1"}
    assert stats.unreadable == 0 and stats.errors == []


@pytest.mark.parametrize("module", ["bz2", "lzma"])
def test_rotated_files_compressed_otherwise(tmp_path: Path, module: str) -> None:
    logged = dl.traffic(days=1)
    data = "".join(dl.syslog_lines(logged)).encode()
    path = tmp_path / "mail.log.3"  # recognised by content, not by name
    path.write_bytes(importlib.import_module(module).compress(data))
    assert [e.record for e in read_entries(logs(path))] == [i.record for i in logged]


def test_other_programs_truncated_and_overlong_lines(tmp_path: Path) -> None:
    good = dl.traffic(days=1)[:3]
    lines = dl.syslog_lines(good)
    cut = lines[1][: len(lines[1]) // 3] + "\n"  # a line cut short (disk full, crash)
    log = dl.write(
        tmp_path / "mail.log",
        [
            "2026-11-23T08:00:00.000000+00:00 relay1 postfix/smtpd[1]: connect from x[192.0.2.7]\n",
            # another program's line that mentions a decision, with a forged record
            "2026-11-23T08:00:00.000000+00:00 relay1 cron[2]: decision to=<a@b> action=continue\n",
            lines[0],
            cut,
            "x" * (logsource.MAX_LINE * 3) + " decision to=<big@x> action=reject\n",
            lines[2],
            "\x00\xff garbage decision queue_id=x\n",
        ],
    )
    stats = Stats()
    entries = list(read_entries(logs(log), stats=stats))
    assert [e.record for e in entries] == [good[0].record, good[2].record]
    assert stats.unreadable == 2  # the cut line and the garbage


def test_hostile_values_survive_the_log(tmp_path: Path) -> None:
    hostile = DecisionRecord(
        queue_id="4Xabc",
        client="192.0.2.7",
        organization="contoso",
        sender='evil\r\nINFO decision to=<x@y> action=continue "@x',
        recipient="<script>alert(1)</script>\x1b[31m@tailspintoys.com",
        mode="monitor",
        action="would-reject",
        reason="attr36",
    )
    item = dl.Logged(dl.START, hostile)
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines([item]))
    assert len(log.read_text().splitlines()) == 1
    assert [e.record for e in read_entries(logs(log))] == [hostile]


def test_a_truncated_gzip_keeps_what_was_read(tmp_path: Path) -> None:
    logged = dl.traffic(days=2)
    data = gzip.compress("".join(dl.syslog_lines(logged)).encode())
    path = tmp_path / "mail.log.1.gz"
    path.write_bytes(data[: len(data) * 2 // 3])  # rotation in progress
    stats = Stats()
    entries = list(read_entries(logs(path), stats=stats))
    assert 0 < len(entries) < len(logged)
    assert [e.record for e in entries] == [item.record for item in logged[: len(entries)]]
    assert len(stats.errors) == 1 and "mail.log.1.gz" in stats.errors[0]


def test_since_until_and_undated_lines(tmp_path: Path) -> None:
    logged = dl.traffic(days=3)
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(logged))
    bare = dl.write(tmp_path / "err.log", dl.stderr_lines(logged[:2]))
    since, until = dl.START + dl.DAY, dl.START + 2 * dl.DAY
    stats = Stats()
    entries = list(read_entries(logs(log, bare), since, until, stats=stats))
    assert [e.record for e in entries] == [i.record for i in logged if since <= i.time <= until]
    assert stats.undated_skipped == 2


def test_the_cursor_file_reads_each_record_once_across_runs_and_rotation(tmp_path: Path) -> None:
    logged = dl.traffic(days=3)
    # Records that share a timestamp, split across the runs.
    third = len(logged) // 3
    while logged[third].time == logged[third - 1].time:
        third += 1
    third -= 1  # the first run ends in the middle of a same-time group
    cursor_path = tmp_path / "cursor.json"
    log = tmp_path / "mail.log"
    dl.write(log, dl.syslog_lines(logged[:third]))

    def run(*paths: Path) -> List[DecisionRecord]:
        cursor = CursorFile(str(cursor_path))
        records = [e.record for e in read_entries(logs(*paths), cursor=cursor)]
        cursor.save()
        return records

    assert run(log) == [i.record for i in logged[:third]]
    assert run(log) == []
    # More lines in the same file, then logrotate: mail.log -> mail.log.1.gz.
    dl.write(log, dl.syslog_lines(logged[: 2 * third]))
    assert run(log) == [i.record for i in logged[third : 2 * third]]
    rotated = dl.write(tmp_path / "mail.log.1.gz", dl.syslog_lines(logged[: 2 * third]), True)
    dl.write(log, dl.syslog_lines(logged[2 * third :]))
    assert run(rotated, log) == [i.record for i in logged[2 * third :]]
    saved = json.loads(cursor_path.read_text())
    assert saved["version"] == 1 and set(saved["hosts"]) == {"relay1"}


def test_a_broken_cursor_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cursor.json"
    path.write_text("{not json")
    with pytest.raises(SourceError, match="not a relaymilter cursor file"):
        CursorFile(str(path))


def test_saving_the_cursor_never_writes_through_a_link(tmp_path: Path) -> None:
    # A link planted where the old code wrote its temporary file, and one at the
    # cursor's own path: neither target may be written.
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    path = tmp_path / "cursor.json"
    (tmp_path / "cursor.json.tmp").symlink_to(victim)
    cursor = CursorFile(str(path))
    cursor.hosts["relay1"] = [1.0, 1]
    cursor.save()
    assert victim.read_text() == "untouched\n"
    assert json.loads(path.read_text())["hosts"] == {"relay1": [1.0, 1]}
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(SourceError):
        CursorFile(str(path))  # a link to something that is not a cursor file
    CursorFile(None).save()
    fresh = CursorFile(str(tmp_path / "other.json"))
    fresh.save()
    os.replace(tmp_path / "other.json", path)  # the link itself is replaced
    assert victim.read_text() == "untouched\n" and not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cursor.json",
        "cursor.json.tmp",
        "victim",
    ]


def test_a_missing_log_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="No such file"):
        list(read_entries(logs(tmp_path / "nope.log")))


# -- journals --------------------------------------------------------------------------


def test_a_real_journal_file_with_hostile_values_and_other_programs(tmp_path: Path) -> None:
    dl.need_journal_reader()
    logged = dl.traffic(days=2)
    hostile = logged[0].record._replace(
        sender="evil\nINFO decision action=continue", recipient="a\r\n\x1b[2J<b>@x.example"
    )
    other = dl.export_entry(logged[1], {"SYSLOG_IDENTIFIER": "postfix/smtpd"})
    entries = [dl.export_entry(dl.Logged(logged[0].time, hostile)), other]
    entries += [dl.export_entry(item) for item in logged[2:]]
    journal = dl.write_journal(tmp_path / "relay1.journal", entries)
    spec = JournalSpec(files=(str(journal),))
    found = list(read_entries(Sources((spec,), ())))
    assert [e.record for e in found] == [hostile] + [i.record for i in logged[2:]]
    assert [e.time for e in found] == pytest.approx([logged[0].time] + [i.time for i in logged[2:]])
    assert {e.host for e in found} == {"relay1"}
    # The same through the directory, and with a period.
    since, until = dl.START + 3600, dl.START + dl.DAY
    by_dir = list(read_entries(Sources((JournalSpec(str(tmp_path)),), ()), since, until))
    assert [e.record for e in by_dir] == [i.record for i in logged[2:] if since <= i.time <= until]


def test_journal_cursor_and_several_sources_at_once(tmp_path: Path) -> None:
    dl.need_journal_reader()
    relay1 = dl.traffic(days=2, host="relay1")
    relay2 = dl.traffic(days=2, host="relay2")
    (tmp_path / "j").mkdir()
    journal = dl.write_journal(tmp_path / "j" / "relay1.journal", map(dl.export_entry, relay1))
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(relay2))
    sources = Sources((JournalSpec(files=(str(journal),)),), (str(log),))
    cursor_path = str(tmp_path / "cursor.json")
    middle = relay1[len(relay1) // 2].time

    cursor = CursorFile(cursor_path)
    first = list(read_entries(sources, until=middle, cursor=cursor))
    cursor.save()
    assert {e.host for e in first} == {"relay1", "relay2"}
    cursor = CursorFile(cursor_path)
    second = list(read_entries(sources, cursor=cursor))
    cursor.save()
    assert sorted(e.record for e in first + second) == sorted(i.record for i in relay1 + relay2)
    assert list(read_entries(sources, cursor=CursorFile(cursor_path))) == []


def test_without_python3_systemd_the_journal_is_an_error_and_logs_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "systemd", None)
    with pytest.raises(SourceError, match="python3-systemd"):
        list(read_entries(Sources((JournalSpec(),), ())))
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(dl.traffic(days=1)))
    assert list(read_entries(logs(log)))


def test_the_command_line_reads_a_journal_dir_and_logs(tmp_path: Path) -> None:
    dl.need_journal_reader()
    (tmp_path / "j").mkdir()
    dl.write_journal(tmp_path / "j" / "relay1.journal", map(dl.export_entry, dl.traffic(days=1)))
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(dl.traffic(days=1, host="relay2")))
    result = run_cli(
        "report",
        "--journal-dir",
        str(tmp_path / "j"),
        "--log",
        str(log),
        "--json",
        "--since",
        "2026-11-01",
        "--until",
        "2026-12-01 00:00 UTC",
    )
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert totals["relays"] == ["relay1", "relay2"]
    assert totals["decisions"] == 2 * len(dl.traffic(days=1))
    # "-7d" as journalctl takes it, not as an option.
    relative = run_cli("report", "--log", str(log), "--since", "-3650d", "--until", "+1d")
    assert relative.returncode == 0, relative.stderr
    bad = run_cli("report", "--log", str(log), "--since", "last tuesday")
    assert bad.returncode == 1 and "not a time" in bad.stderr
