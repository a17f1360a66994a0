"""The metrics endpoint: ``GET /metrics`` over HTTP, in one thread that no client can stall.

One thread and a selector serve every client: it reads each request as it
arrives, renders the metrics into memory once the request is whole, and
writes the answer as the client takes it. So a client holds nothing while it
dawdles: a slow or silent client costs one entry in the selector, never a
thread or a slot that a scrape would wait for. Each client has a deadline for
its whole request (``REQUEST_DEADLINE``, from its connection), and one for
reading the answer; past it, it is closed, however often it sends a byte. At
most ``MAX_CONNECTIONS`` are open: one more closes the oldest, which a
prompt scraper never is. The milter never waits for any of this: the
exposition reads each counter under the counter's own lock.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from typing import Dict, Optional, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

logger = logging.getLogger("relaymilter")

#: Seconds a client has, from its connection, to send its whole request.
REQUEST_DEADLINE = 10.0
#: Seconds a client has to read the answer.
RESPONSE_DEADLINE = 10.0
#: Clients open at once; one more closes the one that connected first.
MAX_CONNECTIONS = 64
#: The longest request line and headers taken (Prometheus sends a few hundred bytes).
MAX_REQUEST_BYTES = 8192
_INDEX = b"relaymilter: the metrics are at /metrics\n"


class _Client:
    __slots__ = ("deadline", "incoming", "outgoing", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.incoming = b""
        self.outgoing: Optional[bytes] = None


class MetricsServer:
    """The endpoint on ``address``; ``serve_forever`` in a thread, ``shutdown`` from another."""

    def __init__(
        self,
        address: Tuple[str, int],
        registry: CollectorRegistry,
        request_deadline: float = REQUEST_DEADLINE,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.request_deadline = request_deadline
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address: Tuple[str, int] = self.socket.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._clients: Dict[socket.socket, _Client] = {}
        self._stop = threading.Event()
        self._stopped = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            while not self._stop.is_set():
                for key, events in self._selector.select(self._timeout(poll_interval)):
                    self._dispatch(key.fileobj, events)  # type: ignore[arg-type]
                self._expire(time.monotonic())
        finally:
            for sock in list(self._clients):
                self._close(sock)
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop ``serve_forever`` and wait until it has."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        self._stopped.wait()

    def server_close(self) -> None:
        self._selector.close()
        for sock in (self.socket, self._wake_reader, self._wake_writer):
            sock.close()

    # -- the loop ------------------------------------------------------------------------

    def _timeout(self, poll_interval: float) -> float:
        if not self._clients:
            return poll_interval
        soonest = min(client.deadline for client in self._clients.values())
        return max(0.0, min(poll_interval, soonest - time.monotonic()))

    def _dispatch(self, sock: socket.socket, events: int) -> None:
        if sock is self.socket:
            self._accept()
        elif sock is self._wake_reader:
            with contextlib.suppress(OSError):
                sock.recv(64)
        else:
            try:
                if events & selectors.EVENT_READ:
                    self._read(sock)
                elif events & selectors.EVENT_WRITE:
                    self._write(sock)
            except OSError as exc:
                logger.debug("metrics: client failed: %s", exc)
                self._close(sock)

    def _accept(self) -> None:
        while True:
            try:
                sock, _address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again at the next event
                logger.warning("metrics: cannot accept a client: %s", exc)
                return
            if len(self._clients) >= MAX_CONNECTIONS:
                oldest = min(self._clients.values(), key=lambda client: client.deadline)
                logger.debug("metrics: %d clients open; closing the oldest", MAX_CONNECTIONS)
                self._close(oldest.sock)
            sock.setblocking(False)
            self._clients[sock] = _Client(sock, time.monotonic() + self.request_deadline)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        client = self._clients[sock]
        data = sock.recv(4096)
        if not data:
            self._close(sock)
            return
        client.incoming += data
        head, found, _ = client.incoming.partition(b"\r\n\r\n")
        if not found:
            head, found, _ = client.incoming.partition(b"\n\n")
        if not found:
            if len(client.incoming) > MAX_REQUEST_BYTES:
                self._answer(client, 431, "Request Header Fields Too Large")
            return
        self._respond(client, head.decode("latin-1"))

    def _respond(self, client: _Client, head: str) -> None:
        lines = head.splitlines()
        parts = lines[0].split() if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._answer(client, 400, "Bad Request")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method != "GET":
            self._answer(client, 405, "Method Not Allowed", extra="Allow: GET\r\n")
        elif target == "/metrics":
            accept = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "accept":
                    accept = value.strip()
            encoder, content_type = choose_encoder(accept)
            self._answer(client, 200, "OK", encoder(self.registry), content_type)
        elif target == "/":
            self._answer(client, 200, "OK", _INDEX, "text/plain; charset=utf-8")
        else:
            self._answer(client, 404, "Not Found")

    def _answer(
        self,
        client: _Client,
        status: int,
        reason: str,
        body: Optional[bytes] = None,
        content_type: str = "text/plain; charset=utf-8",
        extra: str = "",
    ) -> None:
        if body is None:
            body = f"{status} {reason}\n".encode()
        head = (
            f"HTTP/1.0 {status} {reason}\r\nServer: relaymilter\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n"
        )
        client.outgoing = head.encode("latin-1") + body
        client.incoming = b""
        client.deadline = time.monotonic() + RESPONSE_DEADLINE
        self._selector.modify(client.sock, selectors.EVENT_WRITE)

    def _write(self, sock: socket.socket) -> None:
        client = self._clients[sock]
        assert client.outgoing is not None
        sent = sock.send(client.outgoing)
        client.outgoing = client.outgoing[sent:]
        if not client.outgoing:
            self._close(sock)

    def _expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            logger.debug("metrics: closing a client past its deadline")
            self._close(client.sock)

    def _close(self, sock: socket.socket) -> None:
        self._clients.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
