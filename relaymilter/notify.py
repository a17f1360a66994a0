"""systemd notification: READY, RELOADING, STOPPING (the watchdog comes with packaging)."""

from __future__ import annotations

import os
import socket
from typing import Callable


class ServiceNotifier:
    """Tells systemd (when NOTIFY_SOCKET is set) how the daemon is doing."""

    def __init__(self, socket_spec: str, status: Callable[[], str]) -> None:
        self._socket_spec = socket_spec
        self._status = status
        self._address = os.environ.get("NOTIFY_SOCKET")

    def _send(self, message: str) -> None:
        if not self._address:
            return
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)

    def ready(self) -> None:
        self._send(f"READY=1\nSTATUS={self._status()}")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def reloaded(self) -> None:
        self._send(f"READY=1\nSTATUS={self._status()}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def start_watchdog(self) -> None:
        """The watchdog arrives with the systemd unit."""
