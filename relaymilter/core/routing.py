"""Where a recipient address really goes: the domains an MTA routes it through.

An address such as ``kate%tailspintoys.com@relay.contoso.com`` names an
accepted domain, yet Postfix (``allow_percent_hack``, ``swap_bangpath``,
``resolve_dequoted_address``, all on by default) and Sendmail (ruleset 3)
deliver it to ``kate@tailspintoys.com`` when ``relay.contoso.com`` is one of
their own names. So a recipient is internal only if every domain on its route
is accepted: the domain after the rightmost ``@``, then whatever the local
part still routes to, worked out the way the MTAs do it:

- a quoted local part is dequoted (``"kate@tailspintoys.com"@local``);
- ``@`` in the local part: the rightmost one splits again;
- ``%``: the rightmost one becomes ``@`` (the percent hack);
- ``!``: ``site!rest`` goes to ``site`` (a bang path; every element but the
  last is a host), and so does DECnet's ``site::rest``;
- a source route ``@a,@b:`` names hops too. Postfix ignores it and Sendmail
  may follow it; either way its domains must be accepted.

A hop that is not a plain domain (an address literal, a name with characters
no host name has) is ``None`` and matches nothing, so the address counts as
external: when in doubt, it is external.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

from .domains import ASCII_SPACE, is_host_name, normalize_domain

# Characters that make a local part route somewhere; an address without any of
# them (and without a source route) is the common case and takes the fast path.
_ROUTING_CHARACTERS = frozenset('%!"\\:@')
# Nested forms are unwound one level per round; real addresses need a few.
# Past this, the address is treated as unroutable (external).
_MAX_HOPS = 16


class Route(NamedTuple):
    """The domains an address routes through, nearest first; the last is where it ends.

    ``hops`` is empty for an address without a domain; a hop is None when it
    is not a domain that could be accepted (a literal, a malformed name, or
    an address too deeply nested to follow).
    """

    hops: Tuple[Optional[str], ...]

    @property
    def is_simple(self) -> bool:
        """Whether the address goes straight to its one domain (no routing form)."""
        return len(self.hops) == 1

    def describe(self) -> str:
        """``a,b,c`` for the log (``?`` for a hop that is not a domain, ``-`` for none)."""
        if not self.hops:
            return "-"
        return ",".join(hop if hop is not None else "?" for hop in self.hops)


NO_ROUTE = Route(())


def route_of(address: str) -> Route:
    """The route of an envelope address already stripped of its angle brackets."""
    at = address.rfind("@")
    # The fast path: user@domain with nothing in it that routes elsewhere.
    if at > 0 and _ROUTING_CHARACTERS.isdisjoint(address[:at]):
        return Route((_hop(address[at + 1 :]),))
    return Route(tuple(_hops(address)))


def _hops(address: str) -> List[Optional[str]]:
    hops: List[Optional[str]] = []
    rest = address
    if rest.startswith("@"):
        route, _, rest = rest.partition(":")
        hops.extend(_hop(part.strip(ASCII_SPACE).lstrip("@")) for part in route.split(","))
    for _ in range(_MAX_HOPS):
        masked = _mask_quoted(rest)
        at = masked.rfind("@")
        if at >= 0:
            hops.append(_hop(rest[at + 1 :]))
            rest, masked = rest[:at], masked[:at]
        step = _next_step(rest, masked)
        if step is None:
            return hops
        site, rest = step
        if site is not None:
            hops.append(_hop(site))
    hops.append(None)  # nested deeper than any real address: do not follow
    return hops


def _next_step(local: str, masked: str) -> Optional[Tuple[Optional[str], str]]:
    """How a local part routes on: (a hop to add now, what remains), or None.

    Unquoted routing characters first, as the MTAs tokenize; then a quoted
    local part is dequoted and looked at again.
    """
    if "@" in masked:
        return None, local  # another user@domain: the next round splits it
    percent = masked.rfind("%")
    if percent >= 0:
        return None, local[:percent] + "@" + local[percent + 1 :]
    bang = masked.find("!")
    decnet = masked.find("::")
    if bang >= 0 and (decnet < 0 or bang < decnet):
        return local[:bang], local[bang + 1 :]
    if decnet >= 0:
        return local[:decnet], local[decnet + 2 :]
    dequoted = _dequote(local)
    if dequoted != local and (any(char in dequoted for char in "@%!") or "::" in dequoted):
        return None, dequoted
    return None


def _mask_quoted(address: str) -> str:
    """``address`` with every quoted or backslash-escaped character replaced by ``_``."""
    if '"' not in address and "\\" not in address:
        return address
    out = []
    quoted = escaped = False
    for char in address:
        if escaped:
            out.append("_")
            escaped = False
        elif char == "\\":
            out.append("_")
            escaped = True
        elif char == '"':
            out.append("_")
            quoted = not quoted
        else:
            out.append("_" if quoted else char)
    return "".join(out)


def _dequote(local: str) -> str:
    """A local part as the MTA resolves it: quotes removed, backslash escapes undone."""
    if '"' not in local and "\\" not in local:
        return local
    out = []
    escaped = False
    for char in local:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char != '"':
            out.append(char)
    return "".join(out)


def _hop(text: str) -> Optional[str]:
    """A hop's comparison form, or None when it is not a plain host name.

    The host-name check also keeps anything a client or an MTA left in the
    name (control characters, quotes, routing syntax) out of the route.
    """
    domain = normalize_domain(text)
    return domain if domain is not None and is_host_name(domain) else None
