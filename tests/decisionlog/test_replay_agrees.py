"""replay decides exactly what the milter decided, under the same config.

Generated transactions (hostile addresses, MTA-resolved forms, certificates of
both MTAs' shapes) go through the real RelayMilter, driven without libmilter;
its records are read back from the line it logged (and from the journal's
fields, which keep every value whole) and decided again by replay. Not one
may differ.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relaymilter.config import parse_config
from relaymilter.daemon.runtime import Runtime
from relaymilter.decisionlog.journal import FIELDS_ATTR
from relaymilter.decisionlog.record import DecisionRecord, from_journal, read_line
from relaymilter.decisionlog.replay import Replayer
from relaymilter.milterd.milter import RelayMilter

from ..scenarios import CONFIG

CONFIG_MODEL = parse_config(CONFIG, "relaymilter.yml")
DECIDED = ("organization", "connector", "kind", "certificate", "mode", "action", "reason")


class Context:
    def __init__(self, macros: Dict[str, str]) -> None:
        self.macros = macros

    def getsymval(self, name: str) -> Optional[str]:
        return self.macros.get(name)

    def setreply(self, *args: str) -> None:
        pass


class Captured(logging.Handler):
    """Each decision as the milter logged it: the line, and the record behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.logged: List[Tuple[str, DecisionRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        decision = getattr(record, FIELDS_ATTR, None)
        if isinstance(decision, DecisionRecord):
            self.logged.append((self.format(record), decision))


@pytest.fixture(scope="module")
def captured() -> Iterator[Captured]:
    logger = logging.getLogger("relaymilter")
    handler = Captured()
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


PIECES = [
    "kate",
    "@",
    "%",
    "!",
    "::",
    '"',
    "\\",
    "<",
    ">",
    ",",
    ":",
    " ",
    ".",
    "\u00a0",
    "contoso.com",
    "relay.contoso.com",
    "tailspintoys.com",
    "fabrikam.com",
    "[192.0.2.1]",
    "CONTOSO.COM.",
    "b\u00fccher.example",
    "<kate@contoso.com>",
    "kate@contoso.com",
    "%tailspintoys.com",
    "@contoso.com,@tailspintoys.com:",
]
address = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
argument = st.one_of(address, address.map(lambda a: f"<{a}>"))
long_argument = st.integers(100, 900).map(lambda n: "<" + "k\\" * n + "@tailspintoys.com>")

CERTIFICATES = [
    {},
    {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Contoso CA"},
    {"{cert_subject}": "relay.fabrikam.com", "{cert_issuer}": "Fabrikam CA"},
    {
        "{cert_subject}": "/CN=mail.contoso.com",
        "{cert_issuer}": "/CN=Contoso CA",
        "{verify}": "OK",
        "{cert_fp}": "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89",
    },
    {"{cert_subject}": "/CN=mail.contoso.com", "{cert_issuer}": "/CN=x", "{verify}": "FAIL"},
]
transactions = st.fixed_dictionaries(
    {
        "client": st.sampled_from(
            ["192.0.2.7", "192.0.2.200", "127.0.0.2", "2001:db8:1::9", "198.51.100.1", "x"]
        ),
        "certificate": st.sampled_from(CERTIFICATES),
        "mail_from": st.one_of(argument, st.just("<>"), st.just("")),
        "recipients": st.lists(
            st.tuples(
                st.one_of(argument, long_argument),
                st.one_of(st.none(), argument, st.just("kate")),
            ),
            min_size=1,
            max_size=4,
        ),
    }
)


def run_through_the_milter(transaction: Dict[str, object]) -> None:
    RelayMilter.runtime = Runtime(CONFIG_MODEL)
    milter = RelayMilter()
    macros: Dict[str, str] = {"{client_addr}": str(transaction["client"]), "i": "4XyZ1"}
    macros.update(transaction["certificate"])  # type: ignore[arg-type]
    milter._ctx = Context(macros)
    milter._protocol = milter._actions = 0
    milter.envfrom(str(transaction["mail_from"]))
    for rcpt, resolved in transaction["recipients"]:  # type: ignore[attr-defined]
        if resolved is None:
            macros.pop("{rcpt_addr}", None)
        else:
            macros["{rcpt_addr}"] = resolved
        milter.envrcpt(rcpt)


def decided(record: DecisionRecord) -> Tuple[Optional[str], ...]:
    return tuple(getattr(record, name) for name in DECIDED)


@settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(transactions)
@example(  # addresses whose brackets must not come off twice
    {
        "client": "192.0.2.7",
        "certificate": {},
        "mail_from": "<<kate@contoso.com>%tailspintoys.com>",
        "recipients": [
            ("<<u@contoso.com>%tailspintoys.com>", None),
            ("<kate@tailspintoys.com>", "<<u@contoso.com>%tailspintoys.com>"),
        ],
    }
)
def test_replay_decides_what_the_milter_decided(
    captured: Captured, transaction: Dict[str, object]
) -> None:
    captured.logged.clear()
    run_through_the_milter(transaction)
    assert len(captured.logged) == len(transaction["recipients"])  # type: ignore[arg-type]
    replayer = Replayer(CONFIG_MODEL)
    for line, live in captured.logged:
        read = read_line(line)
        assert read is not None, line
        parsed, cut = read
        if not cut:
            assert parsed == live
            assert decided(replayer.decide(parsed)) == decided(live), line
        journal = from_journal(live.journal_fields())
        assert journal == live
        assert decided(replayer.decide(journal)) == decided(live), line


def test_the_reviews_recipient_is_refused_live_and_in_replay(captured: Captured) -> None:
    # Sendmail accepts it (the review had u@relay.contoso.com, its relay's accepted
    # name); the milter logs it without its outer brackets, and replay
    # took them off a second time, calling the refusal "newly allowed".
    captured.logged.clear()
    run_through_the_milter(
        {
            "client": "192.0.2.7",
            "certificate": {},
            "mail_from": "<>",
            "recipients": [("<<u@contoso.com>%tailspintoys.com>", None)],
        }
    )
    ((line, live),) = captured.logged
    assert (live.action, live.reason) == ("reject", "attr36")
    parsed = read_line(line)
    assert parsed is not None
    again = Replayer(CONFIG_MODEL).decide(parsed[0])
    assert (again.action, again.reason) == ("reject", "attr36")
