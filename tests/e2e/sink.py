"""A tiny SMTP server that records every message relayed to it.

Both private MTAs relay all mail here, so a test can check what an MTA really
delivered: the envelope sender, the envelope recipients and the content.
"""

from __future__ import annotations

import re
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .util import wait_for

# <address>, where a quoted local part may hold ">" ("a> b"@example.com).
_ADDR = re.compile(r'<((?:"(?:[^"\\]|\\.)*"|[^">])*)>')


@dataclass
class Received:
    """One message as the sink got it."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    helo: str

    def has(self, token: str) -> bool:
        return token.encode() in self.data


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        self.reply("220 sink.e2e.test ESMTP e2e sink")
        helo, mail_from = "", ""
        rcpts: list[str] = []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                helo = line[5:]
                self.reply("250-sink.e2e.test\r\n250 8BITMIME" if verb == "EHLO" else "250 sink")
            elif verb == "MAIL":
                found = _ADDR.search(line)
                mail_from, rcpts = (found.group(1) if found else ""), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                found = _ADDR.search(line)
                rcpts.append(found.group(1) if found else "")
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data()
                self.server.record(Received(mail_from, rcpts, data, helo))
                self.reply("250 2.0.0 Ok: queued")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:  # RSET, NOOP and anything else
                self.reply("250 2.0.0 Ok")

    def _read_data(self) -> bytes:
        lines: list[bytes] = []
        while True:
            raw = self.rfile.readline()
            if raw in (b".\r\n", b".\n", b""):
                return b"".join(lines)
            # Undo the sender's dot-stuffing (RFC 5321 section 4.5.2).
            lines.append(raw[1:] if raw.startswith(b".") else raw)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, dump_dir: Optional[Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dump_dir = dump_dir
        self.messages: list[Received] = []
        self.lock = threading.Lock()

    def record(self, message: Received) -> None:
        with self.lock:
            self.messages.append(message)
            count = len(self.messages)
        if self.dump_dir is not None:
            # Kept for post-mortem reading of a failed run.
            head = f"X-Sink-From: <{message.mail_from}>\r\n" + "".join(
                f"X-Sink-Rcpt: <{r}>\r\n" for r in message.rcpts
            )
            (self.dump_dir / f"{count:04d}.eml").write_bytes(head.encode() + message.data)


class Sink:
    """Start with ``start()``; ``port`` is then where the MTA must relay to."""

    def __init__(self, dump_dir: Optional[Path] = None) -> None:
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
        self._server = _Server(dump_dir)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Sink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def find(self, token: str) -> list[Received]:
        with self._server.lock:
            return [m for m in self._server.messages if m.has(token)]

    def wait(self, token: str, timeout: float = 20.0) -> Received:
        """The message whose content holds ``token``, once the MTA has relayed it."""
        found = wait_for(lambda: self.find(token), timeout, f"message {token} at the sink")
        assert len(found) == 1, f"{len(found)} copies of {token} reached the sink"
        return found[0]
