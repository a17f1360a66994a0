"""Client addresses and a prefix table for matching them against configured networks."""

from __future__ import annotations

import bisect
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

    Networks are added while a config is built; ``freeze`` then cuts the address
    space into disjoint intervals, each with the values of the networks covering
    it, so that a lookup is one binary search whatever the number of networks or
    of distinct prefix lengths. Values come out in the order they were added.
    """

    def __init__(self) -> None:
        self._entries: Dict[int, List[Tuple[int, int, V]]] = {4: [], 6: []}
        self._starts: Dict[int, List[int]] = {4: [], 6: []}
        self._ends: Dict[int, List[int]] = {4: [], 6: []}
        self._values: Dict[int, List[Tuple[V, ...]]] = {4: [], 6: []}
        self._frozen = True

    def add(self, network: IPNetwork, value: V) -> None:
        first, last = int(network.network_address), int(network.broadcast_address)
        self._entries[network.version].append((first, last, value))
        self._frozen = False

    def freeze(self) -> None:
        """Build the interval arrays (once, before the table is shared between threads)."""
        for version, entries in self._entries.items():
            self._starts[version], self._ends[version], self._values[version] = _segments(entries)
        self._frozen = True

    def lookup(self, address: IPAddress) -> Tuple[V, ...]:
        if not self._frozen:
            self.freeze()
        version = address.version
        number = int(address)
        index = bisect.bisect_right(self._starts[version], number) - 1
        if index >= 0 and number <= self._ends[version][index]:
            return self._values[version][index]
        return ()

    def __bool__(self) -> bool:
        return bool(self._entries[4] or self._entries[6])


def _segments(
    entries: List[Tuple[int, int, V]],
) -> Tuple[List[int], List[int], List[Tuple[V, ...]]]:
    """Disjoint [start, end] intervals with the values (in insertion order) covering each."""
    events: List[Tuple[int, int, int]] = []  # (position, +1 open / -1 close, entry index)
    for index, (first, last, _) in enumerate(entries):
        events.append((first, 1, index))
        events.append((last + 1, -1, index))
    events.sort()
    starts: List[int] = []
    ends: List[int] = []
    values: List[Tuple[V, ...]] = []
    active: Dict[int, None] = {}
    previous: Tuple[int, ...] = ()
    position = 0
    while position < len(events):
        point = events[position][0]
        while position < len(events) and events[position][0] == point:
            _, change, index = events[position]
            if change > 0:
                active[index] = None
            else:
                active.pop(index, None)
            position += 1
        if not active:
            continue
        end = events[position][0] - 1 if position < len(events) else point
        indices = tuple(sorted(active))
        if indices == previous and ends and ends[-1] == point - 1:
            ends[-1] = end  # the same networks as the interval before: merge
        else:
            starts.append(point)
            ends.append(end)
            values.append(tuple(entries[index][2] for index in indices))
        previous = indices
    return starts, ends, values
