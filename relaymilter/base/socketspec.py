"""Milter socket specs: ``unix:/path`` (``local:``), ``inet:PORT@HOST``, ``inet6:PORT@HOST``."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Optional

# The longest unix socket path libmilter binds, in bytes: sun_path holds 108
# bytes on Linux, and libmilter wants room for the terminating NUL and one
# more (it refuses strlen(path) + 1 >= sizeof sun_path).
MAX_UNIX_PATH = 106


class SocketSpecError(ValueError):
    """A socket specification libmilter would not understand."""


@dataclass(frozen=True)
class SocketSpec:
    family: str  # "unix", "inet" or "inet6"
    path: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None

    @property
    def is_unix(self) -> bool:
        return self.family == "unix"


def parse_socket_spec(text: str) -> SocketSpec:
    """Parse a libmilter socket spec; raise SocketSpecError with the reason."""
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise SocketSpecError(f"{text!r}: expected unix:/path, inet:PORT@HOST or inet6:PORT@HOST")
    scheme = scheme.lower()
    if scheme in ("unix", "local"):
        if not rest.startswith("/"):
            raise SocketSpecError(f"{text!r}: the unix socket path must be absolute")
        _check_path_length(text, rest)
        return SocketSpec("unix", path=rest)
    if scheme not in ("inet", "inet6"):
        raise SocketSpecError(f"{text!r}: unknown socket type {scheme!r} (unix, inet or inet6)")
    port_text, _, host = rest.partition("@")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SocketSpecError(f"{text!r}: {port_text!r} is not a port number (1-65535)")
    host = host.strip("[]")
    if host:
        _check_host(text, scheme, host)
    return SocketSpec(scheme, host=host or None, port=int(port_text))


def _check_path_length(text: str, path: str) -> None:
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH:
        raise SocketSpecError(
            f"{text!r}: the unix socket path is too long ({size} bytes; "
            f"at most {MAX_UNIX_PATH} fit in a socket address)"
        )


def _check_host(text: str, scheme: str, host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host.replace("-", "").replace(".", "").isalnum():
            return  # a host name; libmilter resolves it
        raise SocketSpecError(f"{text!r}: {host!r} is not an address or host name") from None
    if (scheme == "inet6") != (address.version == 6):
        raise SocketSpecError(
            f"{text!r}: {scheme} needs an IPv{'6' if scheme == 'inet6' else '4'} address"
        )
