"""The policy service's connections: one asyncio event loop, no thread per connection.

Each connection from Postfix is an ``asyncio.Protocol``: bytes arrive, every
complete request (up to its empty line) is answered at once, in order, and the
rest waits for more bytes. Deciding is a few microseconds of Python and never
waits for anything, so it runs in the loop itself.

What one connection does never affects another: a request that is not in the
protocol's form, or grows past ``MAX_REQUEST_BYTES``, closes that connection
with a log line and no reply (Postfix then retries, and at last answers its
``smtpd_policy_service_default_action``). A connection idle for
``IDLE_TIMEOUT`` (longer than Postfix's own ``smtpd_policy_service_max_idle``),
or that sends part of a request and then nothing for ``REQUEST_TIMEOUT``, is
closed by a sweep every few seconds; past ``MAX_CONNECTIONS`` a new
connection is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Optional, Set

from ..daemon.runtime import Runtime, observe
from .handler import RequestHandler
from .protocol import END, MAX_REQUEST_BYTES, ProtocolError, parse_request, reply_bytes

logger = logging.getLogger("relaymilter")

#: Seconds a connection may wait between requests (Postfix closes its own after 300 s).
IDLE_TIMEOUT = 600.0
#: Seconds a request may take to arrive once its first bytes have (Postfix writes it at once).
REQUEST_TIMEOUT = 30.0
#: Connections served at once: Postfix's default limit is 100 smtpd processes per service.
MAX_CONNECTIONS = 1000
#: Seconds between sweeps for idle and stalled connections.
SWEEP_INTERVAL = 5.0


class PolicyConnection(asyncio.Protocol):
    """One connection from Postfix's smtpd."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.handler = RequestHandler(server.runtime)
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = b""
        self.last_activity = 0.0
        #: When the pending partial request began (None: between requests).
        self.partial_since: Optional[float] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.last_activity = self.server.loop.time()
        if not self.server.admit(self):
            return
        if self.server.runtime.metrics is not None:
            observe(self.server.runtime.metrics.connection_opened)

    def data_received(self, data: bytes) -> None:
        now = self.server.loop.time()
        self.last_activity = now
        buffer = self.buffer + data if self.buffer else data
        transport = self.transport
        assert transport is not None
        start = 0
        while True:
            end = buffer.find(END, start)
            if end < 0:
                break
            try:
                attributes = parse_request(buffer[start:end])
            except ProtocolError as exc:
                self.close(str(exc))
                return
            # Postfix waits for each answer before it asks again: one write each.
            transport.write(reply_bytes(self.handler.answer(attributes)))
            start = end + 2
            self.partial_since = None
        self.buffer = buffer[start:]
        if not self.buffer:
            return
        if len(self.buffer) > MAX_REQUEST_BYTES:
            self.close(f"a request grows past {MAX_REQUEST_BYTES} bytes")
        elif self.partial_since is None:
            self.partial_since = now

    def close(self, why: str) -> None:
        """Close without a reply, saying why (the protocol's answer to trouble)."""
        if self.transport is None or self.transport.is_closing():
            return
        logger.warning("policy: conn=%s closed: %s", self.handler.number, why)
        self.transport.close()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.server.forget(self) and self.server.runtime.metrics is not None:
            observe(self.server.runtime.metrics.connection_closed)


class PolicyServer:
    """The connections of one listening socket, and their sweeps."""

    def __init__(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime
        self.loop = loop
        self.connections: Set[PolicyConnection] = set()
        self._sweeper: Optional[asyncio.TimerHandle] = None

    def protocol_factory(self) -> Callable[[], PolicyConnection]:
        return lambda: PolicyConnection(self)

    def admit(self, connection: PolicyConnection) -> bool:
        if len(self.connections) >= MAX_CONNECTIONS:
            logger.warning(
                "policy: %d connections already; closing a new one (Postfix retries it)",
                len(self.connections),
            )
            assert connection.transport is not None
            connection.transport.close()
            return False
        self.connections.add(connection)
        return True

    def forget(self, connection: PolicyConnection) -> bool:
        if connection in self.connections:
            self.connections.discard(connection)
            return True
        return False

    def start_sweeps(self) -> None:
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            if connection.partial_since is not None:
                if now - connection.partial_since > REQUEST_TIMEOUT:
                    connection.close(f"no whole request within {REQUEST_TIMEOUT:g} s")
            elif now - connection.last_activity > IDLE_TIMEOUT:
                connection.close(f"idle for {IDLE_TIMEOUT:g} s")
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close_all(self) -> None:
        """At a stop: every answer has gone out (deciding never waits), so close them all."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
