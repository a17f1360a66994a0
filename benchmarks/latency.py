#!/usr/bin/env python3
"""Latency of each SMTP command in one session, with and without relaymilter, per MTA.

Starts the listeners of ``throughput.py`` (a private Postfix, and three private
Sendmails unless --no-sendmail) and drives each with ONE session: --messages
messages in a row, each MAIL FROM, two RCPT TO (one internal, one external and
allowed: an owned sender), DATA and the end of the data. Prints the median and
the worst time each command took, per listener. This is where a stall shows
that throughput under load hides: Sendmail writes a milter's macros and the
command in two writes, and over TCP the second waits for the milter's delayed
acknowledgement of the first (about 40 ms).

Usage:
  benchmarks/latency.py [--messages 10] [--compare DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.throughput import OWNED_SENDER, Bench

COMMANDS = ("MAIL", "RCPT 1", "RCPT 2", "DATA", "end of data")
RECIPIENTS = ("a@contoso.com", "kate@tailspintoys.example")


def session(port: int, messages: int) -> Dict[str, List[float]]:
    """Milliseconds each command took, over one session of ``messages`` messages."""
    times: Dict[str, List[float]] = {name: [] for name in COMMANDS}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        # No Nagle on the client side: the body and its final dot are two writes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = sock.makefile("rb")

        def command(line: bytes) -> bytes:
            if line:
                sock.sendall(line + b"\r\n")
            reply = stream.readline()
            while reply[3:4] == b"-":
                reply = stream.readline()
            return reply

        def timed(name: str, line: bytes) -> bytes:
            started = time.perf_counter()
            reply = command(line)
            times[name].append((time.perf_counter() - started) * 1000)
            return reply

        command(b"")
        command(b"EHLO client.bench.test")
        for _ in range(messages):
            timed("MAIL", b"MAIL FROM:<" + OWNED_SENDER.encode() + b">")
            for number, recipient in enumerate(RECIPIENTS, 1):
                reply = timed(f"RCPT {number}", b"RCPT TO:<" + recipient.encode() + b">")
                assert reply.startswith(b"250"), reply
            timed("DATA", b"DATA")
            sock.sendall(b"Subject: relaymilter latency\r\n\r\nx\r\n")
            reply = timed("end of data", b".")
            assert reply.startswith(b"250"), reply
        command(b"QUIT")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=10, help="messages in the session")
    parser.add_argument("--compare", metavar="DIR", type=Path, help="another checkout, as well")
    parser.add_argument("--sendmail", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("must run as root (private MTA instances need it)")
    base = Path(tempfile.mkdtemp(prefix="relaymilter-latency-"))
    compare = args.compare.resolve() if args.compare else None
    bench = Bench(base, compare=compare, sendmail=args.sendmail)
    try:
        bench.start()
        print(f"one session of {args.messages} messages; ms per command: median (worst)")
        print(f"  {'listener':<22}" + "".join(f"{name:>16}" for name in COMMANDS))
        for listener in bench.listeners:
            if listener in ("naive-unix", "floor-unix"):
                continue
            times = session(bench.ports[listener], args.messages)
            cells = "".join(
                f"{statistics.median(times[name]):>9.2f} ({max(times[name]):>5.1f})"
                for name in COMMANDS
            )
            print(f"  {listener:<22}{cells}", flush=True)
            bench.drain()
    finally:
        bench.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
