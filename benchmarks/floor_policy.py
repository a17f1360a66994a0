#!/usr/bin/env python3
"""The cheapest asyncio policy service: the floor under ``relaymilter policy``.

It serves Postfix's policy protocol the way relaymilter's policy service does
(one asyncio event loop, an ``asyncio.Protocol`` per connection from smtpd,
one write per answer) but reads nothing of a request: it finds each request's
end (its empty line) and answers ``DUNNO``. No parsing, no decision, no log
line. What it costs is what a policy request costs Postfix and the event loop
before relaymilter does any work.

Usage: floor_policy.py SOCKET   (unix:/path; the caller gives the file to Postfix's user)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Optional

END = b"\n\n"
ANSWER = b"action=DUNNO" + END
BACKLOG = 512


class FloorPolicy(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        requests = buffer.count(END)
        if requests:
            assert self.transport is not None
            self.transport.write(ANSWER * requests)
            buffer = buffer[buffer.rfind(END) + 2 :]
        self.buffer = buffer


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stopped.set)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.umask(0o117)
    listening.bind(path)
    listening.listen(BACKLOG)
    server = await loop.create_unix_server(FloorPolicy, sock=listening, backlog=BACKLOG)
    await stopped.wait()
    server.close()
    with contextlib.suppress(FileNotFoundError):  # Python 3.13's asyncio removes it itself
        os.unlink(path)


if __name__ == "__main__":
    kind, _, where = sys.argv[1].partition(":")
    if kind != "unix" or not where:
        sys.exit(f"usage: {sys.argv[0]} unix:/path")
    asyncio.run(serve(where))
