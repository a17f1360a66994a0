"""Several relays on one snapshot source: a domain added in PostgreSQL, synced, under load.

Two relays, each a private Postfix instance with its own relaymilter daemon
and its own config directory, whose ``sources:`` name the same throwaway
PostgreSQL (the example schema, a few hundred organizations, and contoso with
an IP connector for 127.0.0.1, where the clients connect from). A sender of
fabrikam.com, not yet contoso's, is refused at RCPT on both relays. Then
fabrikam.com is added to contoso in the database and each relay runs its own
``relaymilter sync`` (as each relay's timer would); each daemon notices its
new snapshot and reloads it. All the while, complete SMTP sessions of
contoso's own sender go through both relays, and every one of them must be
accepted and reach the sink: no session fails during the sync or the reload.
Afterwards fabrikam.com is accepted on both relays, under a new config
identity.
"""

from __future__ import annotations

import contextlib
import functools
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from ..pgserver import PostgresServer
from .milterproc import RelayMilterProcess
from .pki import Pki
from .postfix import PostfixInstance
from .sink import Sink
from .smtpclient import Transaction, send
from .targets import Target
from .util import read_from, size, wait_for

pytestmark = pytest.mark.e2e

#: Organizations org1..orgN of tests/pgserver.py, each with DOMAINS domains and
#: two connectors: enough that a sync and a reload take a moment.
ORGANIZATIONS = 400
DOMAINS = 4
OWNED = "alice@contoso.com"  # contoso's from the start
NEW = "john@fabrikam.com"  # contoso's once the database says so
EXTERNAL = "kate@tailspintoys.com"
RELAYS = ("relay-a", "relay-b")
#: Sessions each relay must complete before the sync, and after its reload.
SESSIONS_AROUND = 3
#: Seconds between two sessions of one relay's traffic: busy, without starving the machine.
PACE = 0.02

CONTOSO = """
INSERT INTO relaymilter.organizations (name) VALUES ('contoso');
INSERT INTO relaymilter.accepted_domains (organization_id, domain)
  SELECT id, 'contoso.com' FROM relaymilter.organizations WHERE name = 'contoso';
INSERT INTO relaymilter.connectors (organization_id, name, kind)
  SELECT id, 'onprem-ip', 'ip' FROM relaymilter.organizations WHERE name = 'contoso';
INSERT INTO relaymilter.connector_addresses (connector_id, network)
  SELECT c.id, '127.0.0.1/32' FROM relaymilter.connectors c
    JOIN relaymilter.organizations o ON o.id = c.organization_id
   WHERE o.name = 'contoso' AND c.name = 'onprem-ip';
"""

ADD_FABRIKAM = """
INSERT INTO relaymilter.accepted_domains (organization_id, domain)
  SELECT id, 'fabrikam.com' FROM relaymilter.organizations WHERE name = 'contoso';
"""


@dataclass
class Relay:
    name: str
    postfix: PostfixInstance
    target: Target

    @property
    def milter(self) -> RelayMilterProcess:
        return self.target.milter

    @property
    def snapshot(self) -> Path:
        # The default: next to the config, "<config stem>.snapshot.yml".
        return self.milter.config_path.with_name(f"{self.name}.snapshot.yml")


def relay_config(pg: PostgresServer) -> dict[str, Any]:
    """A relay's relaymilter.yml: no organizations of its own, all from PostgreSQL."""
    domains_query, connectors_query = pg.example_queries()
    return {
        "mode": "enforce",
        "on_error": "tempfail",
        "sources": {
            # Relative to the config's directory: each relay has its own status and lock.
            "status": "sync-status.json",
            "postgresql": [
                {
                    "name": "hosting",
                    "conninfo": pg.conninfo(sslmode="verify-full", sslrootcert=str(pg.ca_file)),
                    "password_file": str(pg.password_file),
                    "accepted_domains_query": domains_query + "\n",
                    "connectors_query": connectors_query + "\n",
                }
            ],
        },
    }


def sync(relay: Relay) -> subprocess.CompletedProcess[str]:
    """``relaymilter sync -c`` with the relay's config, as its timer would run it."""
    return subprocess.run(
        [sys.executable, "-m", "relaymilter", "sync", "-c", str(relay.milter.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _target(
    name: str, postfix: PostfixInstance, milter: RelayMilterProcess, sink: Sink, pki: Pki
) -> Target:
    return Target(
        name=name,
        mta="postfix",
        port=postfix.ports.inet,
        milter=milter,
        sink=sink,
        pki=pki,
        mta_log=lambda offset: read_from(postfix.log, offset),
        mta_log_size=lambda: size(postfix.log),
    )


@pytest.fixture(scope="module")
def database() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        pg.load_organizations(ORGANIZATIONS, DOMAINS)
        pg.execute(CONTOSO)
        yield pg


@pytest.fixture(scope="module")
def relays(e2e_dir: Path, pki: Pki, sink: Sink, database: PostgresServer) -> Iterator[list[Relay]]:
    """Two relays: each a Postfix instance (its inet smtpd) and a relaymilter daemon."""
    with contextlib.ExitStack() as cleanup:
        found = []
        for name in RELAYS:
            base = e2e_dir / "several-relays" / name
            postfix = PostfixInstance(base / "postfix", pki, sink.port)
            cleanup.callback(postfix.stop)
            postfix.start()
            milter = RelayMilterProcess(name, base / "relaymilter", postfix.inet_milter_spec)
            cleanup.callback(milter.stop)
            milter.write_config(relay_config(database))
            relay = Relay(name, postfix, _target(name, postfix, milter, sink, pki))
            first = sync(relay)
            assert first.returncode == 0, first.stderr
            assert relay.snapshot.exists()
            milter.start()  # the daemon decides from the snapshot only
            found.append(relay)
        yield found


@pytest.fixture(autouse=True)
def _relay_logs_on_failure(request: pytest.FixtureRequest, relays: list[Relay]) -> Iterator[None]:
    offsets = [(r, size(r.postfix.log), r.milter.offset()) for r in relays]
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for relay, mta_offset, milter_offset in offsets:
            print(f"--- {relay.name}: postfix log ---\n{relay.target.mta_log(mta_offset)[-4000:]}")
            print(f"--- {relay.name}: relaymilter log ---")
            print(read_from(relay.milter.log, milter_offset)[-4000:])


# -- the background traffic -------------------------------------------------------


@dataclass
class Attempt:
    """One complete SMTP session of the background traffic."""

    relay: str
    started: float
    ended: float
    txn: Optional[Transaction]
    error: Optional[str]

    def problem(self, accepted: str) -> Optional[str]:
        """Why this session did not go through end to end, or None."""
        if self.error is not None:
            return self.error
        txn = self.txn
        assert txn is not None
        replies = [txn.banner, txn.mail, txn.rcpts.get(EXTERNAL), txn.data]
        if any(reply is None or not reply.ok for reply in replies):
            return f"replies {[r.line if r else None for r in replies]}"
        if txn.rcpts[EXTERNAL].line != accepted:
            return f"RCPT answered {txn.rcpts[EXTERNAL].line}"
        return None


@dataclass
class Traffic:
    """One thread per relay sending complete sessions, one after the other, until stopped."""

    relays: list[Relay]
    attempts: list[Attempt] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.threads = [
            threading.Thread(target=self._loop, args=(r,), name=f"traffic-{r.name}", daemon=True)
            for r in self.relays
        ]

    def _loop(self, relay: Relay) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            txn, error = None, None
            try:
                txn = send(relay.target.port, OWNED, [EXTERNAL], starttls=False)
            except (OSError, smtplib.SMTPException) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.attempts.append(Attempt(relay.name, started, time.monotonic(), txn, error))
            self.stopping.wait(PACE)

    def of(self, relay: Relay) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.relay == relay.name]

    def started_after(self, relay: Relay, moment: float) -> int:
        return sum(1 for a in self.of(relay) if a.started > moment)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=120)


def all_at_sink(sink: Sink, tokens: list[str]) -> bool:
    """Whether each message arrived, once."""
    for token in tokens:
        found = len(sink.find(token))
        assert found <= 1, f"{found} copies of {token} at the sink"
        if not found:
            return False
    return True


# -- the scenario ------------------------------------------------------------------


def test_a_domain_added_in_postgresql_is_allowed_on_both_relays_without_a_failed_session(
    relays: list[Relay], database: PostgresServer
) -> None:
    # Before: contoso's own sender goes through, fabrikam.com is refused, on both relays.
    old_identity = {}
    for relay in relays:
        target = relay.target
        owned = target.run(OWNED, [EXTERNAL], starttls=False)
        assert owned.reply(EXTERNAL) == target.accepted(EXTERNAL), relay.name
        assert owned.delivered_to == [EXTERNAL]
        refused = target.run(NEW, [EXTERNAL], starttls=False)
        assert refused.reply(EXTERNAL) == target.refusal(EXTERNAL), relay.name
        assert refused.reply(EXTERNAL).startswith("550 5.7.64 Relay Access Denied ATTR36")
        decision = refused.decision(EXTERNAL)
        assert (decision["action"], decision["reason"]) == ("reject", "attr36"), decision
        assert (decision["organization"], decision["connector"]) == ("contoso", "onprem-ip")
        assert not refused.txn.queued and not target.sink.find(refused.txn.token)
        assert owned.decision(EXTERNAL)["config"] == decision["config"]
        old_identity[relay.name] = decision["config"]

    mta_offsets = {r.name: size(r.postfix.log) for r in relays}
    milter_offsets = {r.name: r.milter.offset() for r in relays}
    sync_started: dict[str, float] = {}
    replaced_seen: dict[str, float] = {}
    loaded_seen: dict[str, float] = {}
    new_identity: dict[str, str] = {}
    run_started = time.monotonic()

    with Traffic(relays) as traffic:
        wait_for(
            lambda: all(traffic.started_after(r, run_started) >= SESSIONS_AROUND for r in relays),
            30,
            "the background sessions to get going",
        )
        database.execute(ADD_FABRIKAM)
        for relay in relays:
            sync_started[relay.name] = time.monotonic()
            result = sync(relay)
            assert result.returncode == 0, result.stderr
            assert "changed contoso: 1 domain added (fabrikam.com)" in result.stdout, result.stdout
            assert f"wrote {relay.snapshot}" in result.stdout, result.stdout

        def reloaded() -> bool:
            for relay in relays:
                log = read_from(relay.milter.log, milter_offsets[relay.name])
                now = time.monotonic()
                if f"snapshot: {relay.snapshot} was replaced; reloading" in log:
                    replaced_seen.setdefault(relay.name, now)
                loaded = re.search(
                    rf"reload: loaded {re.escape(str(relay.milter.config_path))}: .* \(config (\w+)\)",
                    log,
                )
                if loaded:
                    loaded_seen.setdefault(relay.name, now)
                    new_identity[relay.name] = loaded.group(1)
                assert "reload: failed" not in log, log
            return len(loaded_seen) == len(relays)

        wait_for(reloaded, 30, "both daemons to reload their new snapshot")
        # Keep the traffic going a little past each reload: sessions on the new config.
        wait_for(
            lambda: all(
                traffic.started_after(r, loaded_seen[r.name]) >= SESSIONS_AROUND for r in relays
            ),
            30,
            "sessions after the reloads",
        )

    # Every background session went through end to end, on both relays.
    for relay in relays:
        attempts = traffic.of(relay)
        accepted = relay.target.accepted(EXTERNAL)
        failed = [(a, a.problem(accepted)) for a in attempts if a.problem(accepted)]
        assert not failed, f"{relay.name}: {len(failed)} of {len(attempts)} failed: {failed[:5]}"
        tokens = [a.txn.token for a in attempts if a.txn is not None]
        wait_for(
            functools.partial(all_at_sink, relay.target.sink, tokens),
            30,
            f"the {len(tokens)} background messages of {relay.name} at the sink",
        )

        # relaymilter judged each of them (it neither failed open nor closed) ...
        decisions = [
            d
            for d in relay.milter.decisions_since(milter_offsets[relay.name])
            if d["from"] == OWNED
        ]
        assert len(decisions) == len(attempts), (relay.name, len(decisions), len(attempts))
        assert {(d["action"], d["reason"], d["organization"]) for d in decisions} == {
            ("continue", "sender-domain", "contoso")
        }
        # ... on the old config, then on the new one: the traffic straddled the reload.
        # One thread sent them one after the other: the n-th decision is the n-th session's.
        old, new = old_identity[relay.name], new_identity[relay.name]
        assert new != old
        identities = [d["config"] for d in decisions]
        switch = identities.index(new)
        assert switch > 0 and identities == [old] * switch + [new] * (len(identities) - switch)
        for attempt, identity in zip(attempts, identities):
            if attempt.ended < sync_started[relay.name]:
                assert identity == old
            if attempt.started > loaded_seen[relay.name]:
                assert identity == new
        # Postfix saw no milter trouble (a timeout or a dropped milter connection).
        mta_log = relay.target.mta_log(mta_offsets[relay.name])
        assert not [
            ln for ln in mta_log.splitlines() if "warning:" in ln and "milter" in ln.lower()
        ]

        # Sessions that started between this relay's sync and its reload being logged.
        window = (sync_started[relay.name], loaded_seen[relay.name])
        during = [a for a in attempts if window[0] <= a.started <= window[1]]
        reloading = [
            a
            for a in attempts
            if a.started <= loaded_seen[relay.name] and a.ended >= replaced_seen[relay.name]
        ]
        print(
            f"{relay.name}: {len(attempts)} sessions, {len(during)} started during the "
            f"{window[1] - window[0]:.2f} s from sync to reload, {len(reloading)} in flight "
            "while the reload was logged"
        )
        assert len(during) >= SESSIONS_AROUND, (relay.name, len(during))

    # One source, one result: both relays wrote the same snapshot.
    first, second = (r.snapshot.read_bytes() for r in relays)
    assert first == second and b"fabrikam.com" in first

    # After: fabrikam.com is contoso's on both relays, under the new config identity.
    for relay in relays:
        target = relay.target
        allowed = target.run(NEW, [EXTERNAL], starttls=False)
        assert allowed.reply(EXTERNAL) == target.accepted(EXTERNAL), relay.name
        assert allowed.delivered_to == [EXTERNAL]
        decision = allowed.decision(EXTERNAL)
        assert (decision["action"], decision["reason"]) == ("continue", "sender-domain"), decision
        assert (decision["organization"], decision["connector"]) == ("contoso", "onprem-ip")
        assert decision["config"] == new_identity[relay.name] != old_identity[relay.name]
    # The identity is the config's and the snapshot's content: the relays agree, before and after.
    assert len(set(old_identity.values())) == 1 and len(set(new_identity.values())) == 1
