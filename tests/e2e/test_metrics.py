"""Prometheus metrics through each MTA: the counters equal the decisions it made.

relaymilter runs with a ``metrics:`` section (HTTP endpoint and textfile);
real SMTP goes through the private MTA, and the scraped counters and the
textfile are compared with the decision lines relaymilter logged.
"""

from __future__ import annotations

import collections
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from . import configs
from .targets import Target
from .util import free_port

pytestmark = pytest.mark.e2e

OWNED = "alice@contoso.com"
FOREIGN = "john@fabrikam.com"
EXTERNAL = "kate@tailspintoys.com"
INTERNAL = "ceo@contoso.com"
LABELS = ("organization", "connector", "action", "reason", "mode")

Counts = dict[tuple[str, ...], float]


def decisions(text: str) -> Counts:
    found: Counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "relaymilter_decisions_total":
                found[tuple(sample.labels[k] for k in LABELS)] = sample.value
    return found


def gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exposed")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def wait_until(condition: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_count_the_decisions_the_mta_asked_for(target: Target, tmp_path: Path) -> None:
    port = free_port()
    textfile = tmp_path / "relaymilter.prom"
    config = configs.standard(target.pki)
    metrics = {"listen": f"127.0.0.1:{port}", "textfile": str(textfile)}
    if target.front == "policy":
        config["policy_service"] = {"metrics": metrics}  # relaymilter policy's own section
    else:
        config["metrics"] = metrics
    # The endpoint is bound at start: restart rather than reload into it.
    target.milter.stop()
    target.use(config)

    before = decisions(scrape(port))
    offset = target.milter.offset()
    mixed = target.run(FOREIGN, [INTERNAL, EXTERNAL], starttls=False)
    assert mixed.reply(EXTERNAL) == target.refusal(EXTERNAL)
    owned = target.run(OWNED, [EXTERNAL], starttls=False)
    assert owned.reply(EXTERNAL) == target.accepted(EXTERNAL)
    bounce = target.run("", [EXTERNAL], cert="mail")
    assert bounce.reply(EXTERNAL) == target.accepted(EXTERNAL)

    logged = collections.Counter(
        tuple(d[k] if d[k] != "-" else "" for k in LABELS)
        for d in target.milter.decisions_since(offset)
    )
    assert logged == {
        ("contoso", "onprem-ip", "continue", "internal-recipient", "enforce"): 1,
        ("contoso", "onprem-ip", "reject", "attr36", "enforce"): 1,
        ("contoso", "onprem-ip", "continue", "sender-domain", "enforce"): 1,
        ("contoso", "onprem-cert", "continue", "certificate", "enforce"): 1,
    }
    after = scrape(port)
    counted = {k: v - before.get(k, 0.0) for k, v in decisions(after).items()}
    assert {k: v for k, v in counted.items() if v} == logged
    if target.front == "milter":
        # The MTA has closed its milter connections once its SMTP sessions ended.
        wait_until(
            lambda: gauge(scrape(port), "relaymilter_connections_in_progress") == 0,
            "the milter connections to close",
        )
    else:
        # smtpd keeps its connection to the policy service after a session, for
        # the next (smtpd_policy_service_max_idle, 300 s); its process is still there.
        assert gauge(scrape(port), "relaymilter_connections_in_progress") >= 1
    # The textfile catches up within its 5-second rewrite interval.
    wait_until(
        lambda: textfile.exists() and decisions(textfile.read_text()) == decisions(scrape(port)),
        "the textfile to show the same counters",
    )
