"""Scale of ``report`` and ``replay``: N decision records, time and peak memory.

    .venv/bin/python -m benchmarks.report_scale [--records 1000000] [--journal]
    .venv/bin/python -m benchmarks.report_scale --distinct-senders [--checkout DIR]

Writes N records (the test traffic of tests/traffic.py, with varied clients,
queue ids and recipients, about 2,000 groups) as a syslog file and, with
--journal, as journal files made by systemd-journal-remote, then runs
``relaymilter report`` and ``relaymilter replay`` over each in a child process
and prints wall time and peak RSS (getrusage of the child). Memory bounded by
groups, not records, shows as a peak RSS that hardly moves from 100,000 to
1,000,000 records.

``--distinct-senders`` is the hostile case instead: N refusals of one client,
each from a sender domain of its own (so N groups by client x sender domain),
in a gzipped mail.log, reported with and without ``--all``. ``--checkout DIR``
runs the relaymilter of another checkout, for before/after figures.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

from tests import traffic as decisionlog

ROOT = Path(__file__).resolve().parent.parent


def records(count: int) -> Iterator[decisionlog.Logged]:
    base = decisionlog.traffic(days=1)
    n = 0
    while True:
        for item in base:
            if n >= count:
                return
            record = item.record._replace(
                queue_id=f"4Y{n:08X}",
                client=f"192.0.2.{n % 200}"
                if item.record.client.startswith("192.0.2.")
                else item.record.client,
                recipient=f"user{n % 50000}@{item.record.recipient.rpartition('@')[2]}",
            )
            yield decisionlog.Logged(decisionlog.START + n * 0.5, record, f"relay{n % 3}")
            n += 1


def distinct_senders(count: int) -> Iterator[decisionlog.Logged]:
    """Refusals of one on-premises client, every one from another sender domain."""
    base = next(i for i in decisionlog.traffic(days=1) if i.record.action == "would-reject")
    for n in range(count):
        record = base.record._replace(
            queue_id=f"4Y{n:08X}",
            client="192.0.2.7",
            sender=f"news@s{n}.example.net",
            recipient=f"user{n % 50000}@tailspintoys.com",
            route="tailspintoys.com",
        )
        yield decisionlog.Logged(decisionlog.START + n * 0.01, record, "relay1")


def _rss_anon(pid: int) -> int:
    """The process's anonymous resident memory in KiB (not mapped file pages)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


#: The relaymilter command run; ``--checkout DIR`` makes it another checkout's.
COMMAND = [str(ROOT / ".venv" / "bin" / "relaymilter")]
ENVIRONMENT = dict(os.environ)
#: The child's working directory: "python -c" puts it first on the path.
WORKDIR = [str(ROOT)]


def run(label: str, args: List[str]) -> None:
    """One command in a child process: wall time and that child's own peak RSS (wait4)."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [*COMMAND, *args], stdout=out, stderr=err, env=ENVIRONMENT, cwd=WORKDIR[0]
        )
        anon = 0  # the heap's share of the RSS (RssAnon), sampled; the rest is file pages
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon(child.pid))
            time.sleep(0.1)
        child.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.monotonic() - start
        out.seek(0)
        output = out.read().decode()
        decisions = re.search(r"decisions: (\d+)|records: (\d+)", output)
        print(
            f"{label:34s} {elapsed:6.1f} s  peak RSS {usage.ru_maxrss / 1024:6.1f} MiB "
            f"(anon {anon / 1024:6.1f} MiB)  "
            f"exit {child.returncode}  {decisions.group(0) if decisions else ''}",
            flush=True,
        )
        if child.returncode not in (0, 1):
            err.seek(0)
            print(err.read().decode(), file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--journal", action="store_true")
    parser.add_argument("--distinct-senders", action="store_true")
    parser.add_argument("--checkout", metavar="DIR", help="run another checkout's relaymilter")
    options = parser.parse_args()
    if options.checkout:
        COMMAND[:] = [
            str(ROOT / ".venv" / "bin" / "python"),
            "-c",
            "import sys; from relaymilter.cli import main; sys.exit(main())",
        ]
        ENVIRONMENT["PYTHONPATH"] = WORKDIR[0] = str(Path(options.checkout).resolve())
    with tempfile.TemporaryDirectory(prefix="relaymilter-scale-") as tmp:
        work = Path(tmp)
        if options.distinct_senders:
            return distinct_senders_case(work, options.records)
        log = work / "mail.log"
        start = time.monotonic()
        with log.open("w", encoding="utf-8", errors="surrogateescape") as stream:
            # One line at a time: this process stays small, and so does the peak RSS
            # that its children inherit until their exec (Linux keeps the larger).
            for item in records(options.records):
                stream.write(decisionlog.syslog_lines([item])[0])
        print(
            f"wrote {options.records} records ({log.stat().st_size >> 20} MiB) in "
            f"{time.monotonic() - start:.1f} s",
            flush=True,
        )
        (work / "monitor.yml").write_text(decisionlog.MONITOR)
        (work / "fixed.yml").write_text(decisionlog.FIXED)
        run(
            f"report --log ({options.records})",
            ["report", "--log", str(log), "-c", str(work / "monitor.yml")],
        )
        run(
            f"replay --log ({options.records})",
            ["replay", "-c", str(work / "fixed.yml"), "--log", str(log)],
        )
        if options.journal:
            journal = work / "relay.journal"
            start = time.monotonic()
            export = work / "relay.export"
            with export.open("wb") as stream:
                for item in records(options.records):
                    stream.write(decisionlog.export_entry(item))
            subprocess.run(
                [decisionlog.JOURNAL_REMOTE, "-o", str(journal), str(export)],
                check=True,
                capture_output=True,
            )
            export.unlink()
            size = sum(f.stat().st_size for f in work.glob("*.journal")) >> 20
            print(f"journal files {size} MiB in {time.monotonic() - start:.1f} s", flush=True)
            run(
                f"report --journal-dir ({options.records})",
                ["report", "--journal-dir", str(work)],
            )
            run(
                f"replay --journal-dir ({options.records})",
                ["replay", "-c", str(work / "fixed.yml"), "--journal-dir", str(work)],
            )
    return 0


def distinct_senders_case(work: Path, count: int) -> int:
    log = work / "mail.log.gz"
    start = time.monotonic()
    with gzip.open(log, "wt", encoding="utf-8", compresslevel=6) as stream:
        for item in distinct_senders(count):
            stream.write(decisionlog.syslog_lines([item])[0])
    print(
        f"wrote {count} records from {count} sender domains "
        f"({log.stat().st_size / 2**20:.1f} MiB gzipped) in {time.monotonic() - start:.1f} s",
        flush=True,
    )
    (work / "monitor.yml").write_text(decisionlog.MONITOR)
    run(
        f"report --log ({count} senders)",
        ["report", "--log", str(log), "-c", str(work / "monitor.yml")],
    )
    run(
        f"report --all --json ({count} senders)",
        ["report", "--all", "--json", "--log", str(log), "-c", str(work / "monitor.yml")],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
