"""A policy server that only listens: it keeps every request Postfix sends, raw, and says DUNNO.

Attached to a listener of the private policy Postfix (``postfix.PolicyPostfixInstance``),
it shows what Postfix 3.7 really sends a policy service: which ``ccert_*``
attributes come for which certificate, how they are encoded, which digest.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from pathlib import Path

from .util import wait_for

END = b"\n\n"


class PolicyCapture:
    """A unix-socket policy server in a thread; ``requests`` holds each request's bytes."""

    def __init__(self, path: Path, owner: str = "postfix") -> None:
        self.path = path
        self.owner = owner
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._stopping = False

    def start(self) -> PolicyCapture:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._listener.bind(str(self.path))
        # smtpd connects as the mail owner; private/ is the mail owner's alone.
        shutil.chown(self.path, self.owner, self.owner)
        self._listener.listen(16)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while END in buffer:
                    request, buffer = buffer.split(END, 1)
                    with self._lock:
                        self.requests.append(request)
                    conn.sendall(b"action=DUNNO" + END)

    def offset(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, offset: int) -> list[dict[str, str]]:
        """The requests after ``offset``, as attribute dicts (values undecoded)."""
        with self._lock:
            raw = self.requests[offset:]
        return [parse(r) for r in raw]

    def wait_state(self, offset: int, state: str, count: int = 1) -> list[dict[str, str]]:
        """Wait for ``count`` requests at ``protocol_state=state`` after ``offset``."""

        def found() -> list[dict[str, str]]:
            matching = [r for r in self.since(offset) if r.get("protocol_state") == state]
            return matching if len(matching) >= count else []

        return wait_for(found, 10, f"{count} {state} request(s) at {self.path}")


def parse(request: bytes) -> dict[str, str]:
    """``name=value`` lines, as they came (no xtext decoding)."""
    attributes: dict[str, str] = {}
    for line in request.decode("utf-8", "surrogateescape").split("\n"):
        name, _, value = line.partition("=")
        attributes[name] = value
    return attributes
