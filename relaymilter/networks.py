"""Client addresses and a prefix table for matching them against configured networks."""

from __future__ import annotations

import ipaddress
from typing import Dict, Generic, List, Optional, Tuple, TypeVar, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

V = TypeVar("V")


def parse_client_address(text: Optional[str]) -> Optional[IPAddress]:
    """Parse a client address as an MTA reports it; IPv4-mapped IPv6 becomes IPv4.

    Accepts ``192.0.2.1``, ``2001:db8::1``, ``[2001:db8::1]``, ``IPv6:2001:db8::1``
    (Sendmail's form) and ``::ffff:192.0.2.1``. Returns None for anything else.
    """
    if not text:
        return None
    value = text.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if value[:5].lower() == "ipv6:":
        value = value[5:]
    value = value.split("%", 1)[0]  # a zone index says nothing about the sender
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class NetworkTable(Generic[V]):
    """Maps networks to values; a lookup returns the values of every network holding an address.

    A lookup masks the address once per prefix length in use and probes a dict,
    so its cost depends on the number of distinct prefix lengths (at most 33 or
    129), not on the number of networks.
    """

    def __init__(self) -> None:
        self._by_prefix: Dict[Tuple[int, int], Dict[int, List[V]]] = {}
        self._prefixes: Dict[int, List[int]] = {4: [], 6: []}

    def add(self, network: IPNetwork, value: V) -> None:
        key = (network.version, network.prefixlen)
        bucket = self._by_prefix.get(key)
        if bucket is None:
            bucket = self._by_prefix[key] = {}
            self._prefixes[network.version].append(network.prefixlen)
            # Longest prefix first: the most specific networks come out first.
            self._prefixes[network.version].sort(reverse=True)
        bucket.setdefault(int(network.network_address), []).append(value)

    def lookup(self, address: IPAddress) -> List[V]:
        version = address.version
        bits = 32 if version == 4 else 128
        full = (1 << bits) - 1
        number = int(address)
        found: List[V] = []
        for prefixlen in self._prefixes[version]:
            mask = full ^ ((1 << (bits - prefixlen)) - 1)
            values = self._by_prefix[(version, prefixlen)].get(number & mask)
            if values:
                found.extend(values)
        return found

    def __bool__(self) -> bool:
        return bool(self._by_prefix)
