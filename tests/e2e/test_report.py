"""report and replay over a real Postfix's traffic, with relaymilter in monitor mode.

Each kind of problem flow goes through the private Postfix; ``report`` over
relaymilter's own log must name each with its remedy, and ``replay`` under the
config with the remedies applied must show the fixable ones passing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

from ..support import run_cli
from . import configs
from .targets import Target
from .util import read_from

pytestmark = pytest.mark.e2e

EXTERNAL = "kate@tailspintoys.com"


def monitor_config(target: Target) -> Dict[str, Any]:
    """The standard config in monitor mode, before the fixes: no certificate connector."""
    config = configs.standard(target.pki, mode="monitor")
    connectors = config["organizations"][0]["connectors"]
    connectors[:] = [c for c in connectors if c["name"] != "onprem-cert"]
    return config


def fixed_config(target: Target) -> Dict[str, Any]:
    """The remedies applied: a certificate connector, and contoso's subdomains accepted."""
    return configs.with_contoso_subdomains(configs.standard(target.pki, mode="monitor"))


def test_report_names_each_problem_flow_and_replay_shows_the_fix(
    target: Target, tmp_path: Path
) -> None:
    if target.name != "postfix-unix":
        pytest.skip("one MTA is enough: the report reads relaymilter's log, not the MTA's")
    monitor = monitor_config(target)
    target.use(monitor)
    offset = target.milter.offset()
    target.run("", [EXTERNAL], source_ip="127.0.0.2", starttls=False)  # a bounce
    target.run("noreply@vendor.example", [EXTERNAL], source_ip="127.0.0.2", starttls=False)
    target.run("alice@sales.contoso.com", [EXTERNAL], source_ip="127.0.0.2", starttls=False)
    for sender in ("john@a.example", "mary@b.example", "joe@c.example"):  # forwarding
        target.run(sender, [EXTERNAL], starttls=False)
    # A bounce over TLS with a verified certificate no connector matches.
    bounce = target.run("", [EXTERNAL], cert="mail")
    assert bounce.decision(EXTERNAL)["action"] == "would-reject"
    target.run("alice@contoso.com", [EXTERNAL, "ceo@contoso.com"], starttls=False)

    log = tmp_path / "relaymilter.log"
    log.write_text(read_from(target.milter.log, offset))
    config = tmp_path / "monitor.yml"
    config.write_text(configs.dump(monitor))
    result = run_cli("report", "-c", str(config), "--log", str(log), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["totals"]["decisions"] == 9
    assert report["totals"]["would_reject"] == 7
    groups: Dict[Tuple[str, str], Dict[str, Any]] = {
        (g["client_address"], g["sender_domain"]): g for g in report["groups"]
    }
    assert set(groups) == {
        ("127.0.0.2", "<>"),
        ("127.0.0.2", "vendor.example"),
        ("127.0.0.2", "sales.contoso.com"),
        ("127.0.0.1", "a.example"),
        ("127.0.0.1", "b.example"),
        ("127.0.0.1", "c.example"),
        ("127.0.0.1", "<>"),
    }
    assert all(g["action"] == "would-reject" and g["reason"] == "attr36" for g in groups.values())
    assert groups["127.0.0.2", "<>"]["remedy"] == (
        "the client 127.0.0.2 sends bounces (`<>`): give it a certificate connector "
        "(`*.contoso.com`)"
    )
    assert groups["127.0.0.2", "vendor.example"]["remedy"].startswith(
        "this application sends as `noreply@vendor.example`: change its envelope sender"
    )
    assert groups["127.0.0.2", "sales.contoso.com"]["remedy"].startswith(
        "add `sales.contoso.com` to contoso's accepted_domains"
    )
    for domain in ("a.example", "b.example", "c.example"):
        assert (
            "relays mail of outside senders (3 sender domains: forwarding)"
            in (groups["127.0.0.1", domain]["remedy"])
        )
    assert groups["127.0.0.1", "<>"]["remedy"] == (
        "the certificate `mail.contoso.com` matched no connector: add a certificate connector "
        "to contoso with tls_sender_certificate_name `*.contoso.com`"
    )
    # Postfix names the queue id only after the first accepted recipient: these
    # one-recipient transactions log NOQUEUE, which is no sample.
    assert all(g["samples"] == [] for g in groups.values())
    for flag in ("--csv", "--html"):
        other = run_cli("report", "-c", str(config), "--log", str(log), flag)
        assert other.returncode == 0 and "sales.contoso.com" in other.stdout

    fixed = tmp_path / "fixed.yml"
    fixed.write_text(configs.dump(fixed_config(target)))
    replay = run_cli("replay", "-c", str(fixed), "--log", str(log), "--json")
    assert replay.returncode == 0, replay.stderr
    allowed = {
        (g["client_address"], g["sender_domain"]): g
        for g in json.loads(replay.stdout)["newly_allowed"]
    }
    assert set(allowed) == {("127.0.0.1", "<>"), ("127.0.0.2", "sales.contoso.com")}
    assert allowed["127.0.0.1", "<>"]["connector"] == "onprem-cert"
    # The same fix, enforcing: what is left is refused, and replay says so.
    enforcing = copy.deepcopy(fixed_config(target))
    enforcing["mode"] = "enforce"
    fixed.write_text(configs.dump(enforcing))
    gate = run_cli("replay", "-c", str(fixed), "--log", str(log))
    assert gate.returncode == 1, gate.stderr
    assert "sends bounces" in gate.stdout and "vendor.example" in gate.stdout
