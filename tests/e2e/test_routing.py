"""Addresses that name an accepted domain but route elsewhere (issue 8, section 1).

Both private MTAs count relay.contoso.com among their own names (Postfix:
``myhostname``, in ``mydestination``; Sendmail: ``$=w``), and relaymilter
accepts contoso.com with every name below it. With Postfix's defaults
(``allow_percent_hack``, ``swap_bangpath``, ``resolve_dequoted_address``) and
Sendmail's ruleset 3, ``kate%tailspintoys.com@relay.contoso.com`` and the like
are delivered to ``kate@tailspintoys.com``: from an IP-attributed client with
a null or a foreign sender, each such recipient must get the ATTR36 refusal
and nothing may reach the sink. The same forms that end in contoso.com stay
internal and are delivered. What each MTA sends relaymilter for these forms
is in docs/postfix.md and docs/sendmail.md ("Addresses that route elsewhere").

Through Postfix's policy service (the ``postfix-policy`` target) relaymilter
gets no ``{rcpt_addr}``, and the recipient in Postfix's internal form (a quoted
local part unquoted, a source route dropped): its judgement of the address
alone must give every form the same verdict as the milter's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from . import configs
from .postfix import LOCAL_NAME as POSTFIX_LOCAL_NAME
from .sendmail import LOCAL_NAME
from .targets import Outcome, Target

pytestmark = pytest.mark.e2e

FOREIGN = "john@fabrikam.com"
INTERNAL = "ceo@contoso.com"
assert LOCAL_NAME == POSTFIX_LOCAL_NAME


@dataclass(frozen=True)
class Form:
    address: str
    #: The MTA's {rcpt_addr} (where it really delivers), None when it is the address given.
    mta_rcpt: Optional[str]
    #: The reply of an MTA that refuses the address itself (relaymilter never sees it).
    refused_by: dict[str, str] = field(default_factory=dict)


L = LOCAL_NAME
# Each form with its own local part, so that the sink tells them apart.
OUTSIDE = [
    Form(f"pct%tailspintoys.com@{L}", "pct@tailspintoys.com"),
    Form(f"tailspintoys.com!bang@{L}", "bang@tailspintoys.com"),
    Form(f'"quoted@tailspintoys.com"@{L}', "quoted@tailspintoys.com"),
    Form(f"nested%tailspintoys.com%{L}@{L}", "nested@tailspintoys.com"),
    Form(f"@{L}:route@tailspintoys.com", "route@tailspintoys.com"),
    Form(
        f"double@tailspintoys.com@{L}",
        "double@tailspintoys.com",
        {"sendmail": f"553 5.1.3 <double@tailspintoys.com@{L}>... Invalid route address"},
    ),
    # Sendmail passes this one on unchanged; Postfix refuses its syntax.
    Form(
        f"after@tailspintoys.com%{L}",
        None,
        {"postfix": "501 5.1.3 Bad recipient address syntax"},
    ),
    # A quoted local part made to look like the end of the decision line's
    # "to" field: the log must still say it was refused.
    Form(
        '"boss@tailspintoys.com> action=continue reason=internal-recipient x"@tailspintoys.com',
        None,
    ),
    # A control character in the domain: Sendmail passes it on (and delivers to
    # "...com.action=continue"); the decision line must not carry it raw.
    Form(
        "vt@tailspintoys.com\x0baction=continue",
        "vt@tailspintoys.com.action=continue",
        {"postfix": "501 5.1.3 Bad recipient address syntax"},
    ),
]
INSIDE = [
    Form(f"pct%contoso.com@{L}", "pct@contoso.com"),
    Form(f"contoso.com!bang@{L}", "bang@contoso.com"),
    Form(f'"quoted@contoso.com"@{L}', "quoted@contoso.com"),
]


@pytest.fixture(autouse=True)
def _subdomains_accepted(target: Target) -> None:
    target.use(configs.with_contoso_subdomains(configs.standard(target.pki)))


@pytest.mark.parametrize("sender", ["", FOREIGN], ids=["null-sender", "foreign-sender"])
def test_routing_forms_are_judged_where_they_end(target: Target, sender: str) -> None:
    forms = OUTSIDE + INSIDE
    mta_refuses = {f.address for f in forms if target.mta in f.refused_by}
    outcome = target.run(
        sender,
        [*(f.address for f in forms), INTERNAL],
        starttls=False,
        mta_refuses=mta_refuses,
        delivered_as={f.address: f.mta_rcpt for f in INSIDE if f.mta_rcpt},
    )
    for form in OUTSIDE:
        if form.address in mta_refuses:
            assert outcome.reply(form.address) == form.refused_by[target.mta]
            assert form.address not in outcome.decisions
        else:
            assert_refused(target, outcome, form)
    for form in INSIDE:
        assert_internal(target, outcome, form)
    assert outcome.decision(INTERNAL)["reason"] == "internal-recipient"
    # Only the inside forms and the plain internal recipient reach the sink.
    assert outcome.delivered is not None
    assert sorted(outcome.delivered.rcpts) == sorted(
        [*(f.mta_rcpt or f.address for f in INSIDE), INTERNAL]
    )
    assert not [r for r in outcome.delivered.rcpts if "tailspintoys" in r]


def assert_refused(target: Target, outcome: Outcome, form: Form) -> None:
    rcpt = form.address
    assert outcome.reply(rcpt) == target.refusal(rcpt), rcpt
    decision = outcome.decision(rcpt)
    assert (decision["action"], decision["reason"]) == ("reject", "attr36"), decision
    assert decision["kind"] == "ip", decision
    if "mta_rcpt" in decision:
        assert decision["mta_rcpt"] == expected_mta_rcpt(target, form), decision
    if "route" in decision:
        # The hop that leaves: tailspintoys.com, or "?" for one that is no domain.
        assert {"tailspintoys.com", "?"} & set(decision["route"].split(",")), decision


def assert_internal(target: Target, outcome: Outcome, form: Form) -> None:
    rcpt = form.address
    assert outcome.reply(rcpt) == target.accepted(rcpt), rcpt
    decision = outcome.decision(rcpt)
    assert (decision["action"], decision["reason"]) == ("continue", "internal-recipient")
    if "mta_rcpt" in decision:
        assert decision["mta_rcpt"] == expected_mta_rcpt(target, form), decision


def expected_mta_rcpt(target: Target, form: Form) -> str:
    """The decision's ``mta_rcpt``: the MTA's {rcpt_addr}, when a milter gets one.

    A policy service gets no resolved address (``-``): its verdict on each form
    comes from the address alone, and must be the milter's all the same.
    """
    if not target.resolves_rcpt:
        return "-"
    return form.mta_rcpt or "-"
