"""The milter's watchdog self-check: an option negotiation on its own socket.

The check goes the way an MTA's first command does (SMFIC_OPTNEG), through
libmilter's listener and a pymilter callback, so a milter whose MTA would get
no answer fails it.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Optional, Tuple

from ..base.socketspec import SocketSpecError
from ..daemon.notify import Address, SelfCheck, socket_address

logger = logging.getLogger("relaymilter.notify")

# The milter protocol's option negotiation, as an MTA sends it: version 6,
# offering every action and protocol step (libmilter aborts a negotiation
# that does not offer the actions the milter registered).
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
MILTER_VERSION = 6
SMFI_V6_ACTS = 0x1FF
SMFI_V6_PROT = 0x1FFFFF
# A reply packet larger than this is not an option negotiation reply (which
# is 13 bytes plus an optional macro list).
_MAX_REPLY = 64 * 1024


def milter_self_check(spec: str) -> Optional[SelfCheck]:
    """The check of the milter listening on ``spec``; None if its address cannot be found."""
    try:
        address = socket_address(spec)
    except (SocketSpecError, OSError) as exc:
        # Not expected: the daemon listens on this very spec. Keep the
        # service up, but say that the watchdog proves less.
        logger.warning(
            "watchdog: cannot check the milter socket %s (%s); pinging without the check",
            spec,
            exc,
        )
        return None
    return lambda timeout: milter_check(address, timeout)


def milter_check(address: Address, timeout: float) -> Optional[str]:
    """Negotiate options with the milter at ``address``; None if it answered, else why not."""
    family, sockaddr = address
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.sendall(
                _packet(
                    SMFIC_OPTNEG, struct.pack("!III", MILTER_VERSION, SMFI_V6_ACTS, SMFI_V6_PROT)
                )
            )
            command, data = _read_packet(sock)
            if command != SMFIC_OPTNEG or len(data) < 12:
                return f"unexpected reply {command!r} to the option negotiation"
            sock.sendall(_packet(SMFIC_QUIT, b""))
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return str(exc)
    return None


def _packet(command: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(command) + len(data)) + command + data


def _read_packet(sock: socket.socket) -> Tuple[bytes, bytes]:
    (length,) = struct.unpack("!I", _read_exactly(sock, 4))
    if not 1 <= length <= _MAX_REPLY:
        raise OSError(f"bad milter packet length {length}")
    body = _read_exactly(sock, length)
    return body[:1], body[1:]


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed by the milter")
        data += chunk
    return data
