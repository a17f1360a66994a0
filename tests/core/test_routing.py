"""Where a recipient really goes: routing forms (issue 8, point 1), by table and by property.

The MTAs deliver ``kate%tailspintoys.com@relay.contoso.com``, ``tailspintoys.com!kate@…``
and ``"kate@tailspintoys.com"@…`` to tailspintoys.com when the right-hand domain is
one of their own names; such a recipient must not count as internal.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymilter.config import parse_config
from relaymilter.core.model import AcceptedDomain, Organization
from relaymilter.core.networks import parse_client_address
from relaymilter.core.policy import Transaction, parse_recipient
from relaymilter.core.routing import route_of

CONFIG = """\
organizations:
  - name: contoso
    accepted_domains:
      - {domain: contoso.com, match_subdomains: true}
      - fabrikam-internal.example
    connectors:
      - {name: onprem-ip, sender_ip_addresses: [192.0.2.0/24]}
"""
LOCAL = "relay.contoso.com"
CONTOSO = Organization("contoso", (AcceptedDomain("contoso.com", True),), ())


@pytest.mark.parametrize(
    ("address", "hops"),
    [
        ("kate@tailspintoys.com", ["tailspintoys.com"]),
        ("Kate@Contoso.COM.", ["contoso.com"]),
        (f"kate%tailspintoys.com@{LOCAL}", [LOCAL, "tailspintoys.com"]),
        (f"tailspintoys.com!kate@{LOCAL}", [LOCAL, "tailspintoys.com"]),
        (f'"kate@tailspintoys.com"@{LOCAL}', [LOCAL, "tailspintoys.com"]),
        (f'"kate%tailspintoys.com"@{LOCAL}', [LOCAL, "tailspintoys.com"]),
        (f"kate@tailspintoys.com@{LOCAL}", [LOCAL, "tailspintoys.com"]),
        (f"tailspintoys.com::kate@{LOCAL}", [LOCAL, "tailspintoys.com"]),
        (f"kate%tailspintoys.com%{LOCAL}@{LOCAL}", [LOCAL, LOCAL, "tailspintoys.com"]),
        (f"a.example!b.example!kate@{LOCAL}", [LOCAL, "a.example", "b.example"]),
        (f"a.example!kate%b.example@{LOCAL}", [LOCAL, "b.example", "a.example"]),
        (f"@{LOCAL}:kate@tailspintoys.com", [LOCAL, "tailspintoys.com"]),
        ("@a.example,@b.example:kate@contoso.com", ["a.example", "b.example", "contoso.com"]),
        (f"kate\\@tailspintoys.com@{LOCAL}", [LOCAL, "tailspintoys.com"]),
        ('"john doe"@contoso.com', ["contoso.com"]),
        ('"john\\"doe"@contoso.com', ["contoso.com"]),
        ("kate%tailspintoys.com", ["tailspintoys.com"]),
        ("postmaster", []),
        ("", []),
        ("kate@[192.0.2.1]", [None]),
        ("kate@tailspintoys.com%contoso.com", [None]),
        ('kate@"contoso.com"', [None]),
        (f'"kate@tailspintoys.com>"@{LOCAL}', [LOCAL, None]),
    ],
)
def test_route_of(address: str, hops: List[Optional[str]]) -> None:
    assert list(route_of(address).hops) == hops


@pytest.mark.parametrize(
    ("rcpt", "reason"),
    [
        # Routing forms that leave the organization: refused (null sender, IP connector).
        (f"<kate%tailspintoys.com@{LOCAL}>", "attr36"),
        (f"<tailspintoys.com!kate@{LOCAL}>", "attr36"),
        (f'<"kate@tailspintoys.com"@{LOCAL}>', "attr36"),
        (f"<kate%tailspintoys.com%{LOCAL}@{LOCAL}>", "attr36"),
        (f"<kate@tailspintoys.com@{LOCAL}>", "attr36"),
        (f"<tailspintoys.com::kate@{LOCAL}>", "attr36"),
        (f"<@{LOCAL}:kate@tailspintoys.com>", "attr36"),
        ("<@tailspintoys.com:kate@contoso.com>", "attr36"),  # when in doubt, external
        # ... and those that stay inside: allowed.
        (f"<kate%contoso.com@{LOCAL}>", "internal-recipient"),
        (f"<contoso.com!kate@{LOCAL}>", "internal-recipient"),
        (f'<"kate@fabrikam-internal.example"@{LOCAL}>', "internal-recipient"),
        (f"<@{LOCAL}:kate@contoso.com>", "internal-recipient"),
        ("<kate@contoso.com>", "internal-recipient"),
    ],
)
def test_routing_forms_are_judged_by_where_they_go(rcpt: str, reason: str) -> None:
    config = parse_config(CONFIG, "routing.yml")
    transaction = Transaction(config, parse_client_address("192.0.2.7"), None, "<>")
    decision = transaction.decide(rcpt)
    assert decision.reason == reason
    assert decision.action == ("reject" if reason == "attr36" else "continue")


@pytest.mark.parametrize(
    ("rcpt", "rcpt_addr", "reason"),
    [
        # Postfix's {rcpt_addr} is the resolved recipient: it must be internal too.
        (f"<kate%tailspintoys.com@{LOCAL}>", "kate@tailspintoys.com", "attr36"),
        (f"<kate@{LOCAL}>", "kate@tailspintoys.com", "attr36"),
        ("<kate@contoso.com>", "kate@contoso.com", "internal-recipient"),
        ("<kate@contoso.com>", "Kate@Contoso.com", "internal-recipient"),
        # An address without a domain that the MTA completes with its own name.
        ("<kate>", f"kate@{LOCAL}", "internal-recipient"),
        # Sendmail's local mailer reports a bare user: it adds no hop.
        ("<kate@contoso.com>", "kate", "internal-recipient"),
        ("<kate@tailspintoys.com>", "kate", "attr36"),
    ],
)
def test_the_mtas_resolved_address_must_be_internal_too(
    rcpt: str, rcpt_addr: str, reason: str
) -> None:
    config = parse_config(CONFIG, "routing.yml")
    transaction = Transaction(config, parse_client_address("192.0.2.7"), None, "<>")
    assert transaction.decide(rcpt, rcpt_addr).reason == reason


def test_recipient_keeps_the_mtas_address_only_when_it_differs() -> None:
    assert parse_recipient("<kate@contoso.com>", "kate@contoso.com").resolved is None
    assert parse_recipient("<a%b.example@contoso.com>", "a@b.example").resolved == "a@b.example"


# -- properties ---------------------------------------------------------------

label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
external_domain = st.lists(label, min_size=1, max_size=3).map(lambda ls: ".".join(ls) + ".example")
internal_domain = st.lists(label, min_size=0, max_size=2).map(
    lambda ls: ".".join([*ls, "contoso.com"])
)
user = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=10)


def _quote_local(local: str) -> str:
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split(address: str) -> Tuple[str, str]:
    at = address.rfind("@")
    return address[:at], address[at + 1 :]


# Each wraps an address so that an MTA whose own name is ``via`` routes it on.
WRAPPERS: List[Callable[[str, str], str]] = [
    lambda address, via: "{}%{}@{}".format(*_split(address), via),  # percent hack
    lambda address, via: "{1}!{0}@{2}".format(*_split(address), via),  # bang path
    lambda address, via: f"{_quote_local(address)}@{via}",  # quoted local part
    lambda address, via: f"{address}@{via}",  # two at-signs
]


def _source_route(address: str, via: str) -> str:
    return f"@{via}:{address}"


@st.composite
def wrapped(draw: st.DrawFn, final: st.SearchStrategy[str]) -> Tuple[str, str]:
    """(an address wrapped in routing forms through internal names, its final domain)."""
    domain = draw(final)
    address = f"{draw(user)}@{domain}"
    for wrapper in draw(st.lists(st.sampled_from(WRAPPERS), min_size=1, max_size=4)):
        if "@" in _split(address)[0] and wrapper in WRAPPERS[:2]:
            wrapper = WRAPPERS[2]  # "%" and "!" take a simple local part: quote it
        address = wrapper(address, draw(internal_domain))
    if draw(st.booleans()):  # a source route only ever comes first
        address = _source_route(address, draw(internal_domain))
    return address, domain


@settings(max_examples=400)
@given(wrapped(external_domain))
def test_no_routing_form_makes_an_external_destination_internal(case: Tuple[str, str]) -> None:
    address, final = case
    route = route_of(address)
    assert not CONTOSO.accepts_route(route.hops)
    # The final domain is on the route, unless a hop could not be read at all.
    assert final in route.hops or None in route.hops


@settings(max_examples=200)
@given(wrapped(internal_domain))
def test_routing_forms_within_the_organization_stay_internal(case: Tuple[str, str]) -> None:
    address, final = case
    route = route_of(address)
    assert CONTOSO.accepts_route(route.hops), (address, route)
    # Mixed forms ("a!b%c@d") may be read in either order; the final domain is on the route.
    assert final in route.hops


@given(user, st.one_of(internal_domain, external_domain))
def test_a_plain_address_routes_to_its_domain(local: str, domain: str) -> None:
    assert route_of(f"{local}@{domain}").hops == (domain,)


@settings(max_examples=300)
@given(
    st.text(max_size=60), st.sampled_from(["", "@tailspintoys.example", "%tailspintoys.example"])
)
def test_any_text_with_an_external_domain_is_not_internal(text: str, tail: str) -> None:
    route = route_of(text + tail + "@contoso.com")
    if tail:
        assert not CONTOSO.accepts_route(route.hops)


@pytest.mark.parametrize(
    "address",
    [
        "vt@tailspintoys.com\x0baction=continue",
        "a@contoso.com\x00",
        'a@"contoso.com"',
        "a@con toso.com",
    ],
)
def test_a_hop_with_characters_no_host_name_has_is_not_a_domain(address: str) -> None:
    assert route_of(address).hops == (None,)
