#!/usr/bin/env python3
"""Cost of writing one decision record to journald: relaymilter's writer vs python3-systemd's.

Runs as root, in a private mount namespace of its own (``unshare --mount``) with a
tmpfs over /run, so that a datagram socket at /run/systemd/journal/socket, which
libsystemd's ``sd_journal_sendv`` always writes to, can stand in for journald; the
host's /run is not touched. A child process drains the socket, as journald would.

For each writer it sends the same decision record (the message and its
``RELAYMILTER_*`` fields) N times and reports the time per record:

- ``relaymilter``: ``relaymilter.journal.JournalHandler`` through ``logging``, as the daemon does;
- ``python-systemd send``: ``systemd.journal.send`` with the same fields (its cheapest call);
- ``python-systemd handler``: ``systemd.journal.JournalHandler`` through ``logging``.

Usage: benchmarks/journal_writer.py [--records 50000]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SOCKET = "/run/systemd/journal/socket"


def _drain(server: socket.socket) -> None:
    while True:
        try:
            server.recv(1 << 20)
        except OSError:
            return


def _timed(label: str, count: int, send: Callable[[], None]) -> None:
    for _ in range(min(count, 2000)):
        send()  # warm up
    start = time.perf_counter()
    for _ in range(count):
        send()
    elapsed = time.perf_counter() - start
    print(f"{label:<24} {elapsed / count * 1e6:7.2f} us per record")


def measure(count: int) -> None:
    from systemd import journal as systemd_journal

    from relaymilter.decisionlog.journal import FIELDS_ATTR, JournalHandler
    from relaymilter.decisionlog.record import DecisionRecord

    os.makedirs(os.path.dirname(SOCKET), exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(SOCKET)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    # Drained by a child process, not a thread: libsystemd's send does not
    # release the GIL, so a full socket would block the drainer too.
    if os.fork() == 0:
        _drain(server)
        os._exit(0)
    server.close()

    record = DecisionRecord(
        conn="7",
        queue_id="NOQUEUE",
        client="192.0.2.7",
        organization="contoso",
        connector="onprem-ip",
        kind="ip",
        sender="",
        recipient="kate@tailspintoys.com",
        route="tailspintoys.com",
        mode="enforce",
        config="66f53246dec3",
        action="reject",
        reason="attr36",
    )
    line = record.line()
    fields: Dict[str, str] = record.journal_fields()
    prefixed = {f"RELAYMILTER_{key}": value for key, value in fields.items()}

    ours = logging.getLogger("bench.ours")
    ours.propagate = False
    ours.addHandler(JournalHandler())
    ours.setLevel(logging.INFO)
    _timed("relaymilter", count, lambda: ours.info("%s", line, extra={FIELDS_ATTR: fields}))

    _timed(
        "python-systemd send",
        count,
        lambda: systemd_journal.send(
            line, PRIORITY="6", SYSLOG_IDENTIFIER="relaymilter", SYSLOG_FACILITY="2", **prefixed
        ),
    )

    theirs = logging.getLogger("bench.theirs")
    theirs.propagate = False
    theirs.addHandler(systemd_journal.JournalHandler(SYSLOG_IDENTIFIER="relaymilter"))
    theirs.setLevel(logging.INFO)
    _timed("python-systemd handler", count, lambda: theirs.info("%s", line, extra=prefixed))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50000)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
        measure(args.records)
        return 0
    if os.geteuid() != 0:
        parser.error("must run as root (a private mount namespace)")
    command = [sys.executable, __file__, "--inside", "--records", str(args.records)]
    return subprocess.run(["unshare", "--mount", "--propagation", "private", *command]).returncode


if __name__ == "__main__":
    sys.exit(main())
