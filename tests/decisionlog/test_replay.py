"""relaymilter replay: the logged recipients decided again under a candidate config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from relaymilter.decisionlog.logsource import Entry
from relaymilter.decisionlog.record import DecisionRecord, parse_line
from relaymilter.decisionlog.replay import Replayer, ReplayResult, replay
from relaymilter.decisionlog.report import COLUMNS

from .. import traffic as dl
from ..support import run_cli


def entries(logged: List[dl.Logged]) -> List[Entry]:
    return [Entry(item.record, item.time, item.host) for item in logged]


def flows(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(g["client_address"], g["sender_domain"]): g for g in rows}


def test_the_config_that_logged_decides_every_record_the_same() -> None:
    result = replay(entries(dl.traffic()), dl.config())
    assert result.newly_refused == [] and result.newly_allowed == []
    assert result.totals["unchanged"] == result.totals["records"] == 39
    assert result.exit_status == 0
    replayer = Replayer(dl.config())
    for item in dl.traffic(days=1):
        assert replayer.decide(item.record) == item.record


def test_the_fixed_config_lets_the_fixable_flows_pass() -> None:
    result = replay(entries(dl.traffic()), dl.config(dl.FIXED))
    allowed = flows(result.newly_allowed)
    assert set(allowed) == {("192.0.2.9", "sales.contoso.com"), ("192.0.2.10", "<>")}
    cert = allowed["192.0.2.10", "<>"]
    assert (cert["connector"], cert["reason"], cert["action"]) == (
        "onprem-cert",
        "certificate",
        "continue",
    )
    assert cert["count"] == 3 and cert["samples"] == ["4X000071", "4X000181", "4X000291"]
    assert allowed["192.0.2.9", "sales.contoso.com"]["reason"] == "sender-domain"
    assert result.newly_refused == [] and result.exit_status == 0


def test_enforcing_a_broken_candidate_lists_what_would_newly_be_refused() -> None:
    result = replay(entries(dl.traffic()), dl.config(dl.BROKEN), top=0)
    assert result.exit_status == 1
    refused = flows(result.newly_refused)
    # Monitor mode warned about these; enforcing refuses them.
    assert refused["192.0.2.7", "<>"]["action"] == "reject"
    assert "sends bounces" in refused["192.0.2.7", "<>"]["remedy"]
    # fabrikam's own mail, which passed, now fails: the candidate lost fabrikam.com.
    own = refused["198.51.100.5", "fabrikam.com"]
    assert (own["organization"], own["reason"], own["count"]) == ("fabrikam", "attr36", 3)
    assert own["remedy"].startswith("this application sends as `bob@fabrikam.com`")
    assert result.totals["newly_refused"] == sum(g["count"] for g in result.newly_refused)
    for group in result.newly_refused + result.newly_allowed:
        assert list(group) == list(COLUMNS)


def test_records_of_older_versions_are_replayed_as_far_as_they_allow() -> None:
    # Before the certificate macros, the mode and the config were logged.
    old_cert = parse_line(
        "decision conn=3 queue_id=4Xold client=192.0.2.10 organization=contoso "
        "connector=onprem-cert kind=certificate certificate=mail.contoso.com from=<> "
        "to=<kate@tailspintoys.com> route=tailspintoys.com action=continue reason=certificate"
    )
    old_ip = parse_line(
        "decision conn=4 queue_id=4Xold2 client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- from=<> to=<kate@tailspintoys.com> "
        "action=reject reason=attr36"
    )
    assert old_cert is not None and old_ip is not None
    logged = [Entry(old_cert, dl.START, "relay0"), Entry(old_ip, dl.START + 1, "relay0")]
    fixed = replay(logged, dl.config(dl.FIXED))
    assert fixed.totals["partial"] == 2 and fixed.totals["records"] == 2
    # The certificate name is taken as a verified CN: the cert connector still matches.
    # The IP record is refused again, in monitor mode now: a change, but of a record
    # that lacks what decided it, so counted apart and never gating a deployment.
    assert fixed.totals["newly_refused"] == 0 and fixed.totals["newly_allowed"] == 0
    assert fixed.totals["partial_changed"] == 1
    monitor = replay(logged, dl.config())
    assert monitor.totals["partial_changed"] == 2
    assert monitor.exit_status == 0 and not monitor.newly_refused


def test_a_sendmail_certificate_is_rebuilt_from_its_macros() -> None:
    record = DecisionRecord(
        queue_id="4Xsm",
        client="192.0.2.10",
        organization="contoso",
        connector="onprem-ip",
        kind="ip",
        cert_subject="/C=US/O=Contoso/CN=mail.contoso.com",
        cert_issuer="/CN=Contoso Issuing CA",
        verify="OK",
        cn_subject="mail.contoso.com",
        cn_issuer="Contoso Issuing CA",
        cert_fp="ab" * 32,
        sender="",
        recipient="kate@tailspintoys.com",
        route="tailspintoys.com",
        mode="monitor",
        config="x",
        action="would-reject",
        reason="attr36",
    )
    new = Replayer(dl.config(dl.FIXED)).decide(record)
    assert (new.connector, new.certificate, new.action) == (
        "onprem-cert",
        "mail.contoso.com",
        "continue",
    )
    failed = Replayer(dl.config(dl.FIXED)).decide(record._replace(verify="FAIL"))
    assert (failed.connector, failed.action) == ("onprem-ip", "would-reject")


def _result_json(stdout: str) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads(stdout)
    assert set(data) == {"period", "totals", "newly_refused", "newly_allowed"}
    return data


def test_the_command_line_and_its_exit_status(tmp_path: Path) -> None:
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(dl.traffic()))
    for name, text in (("fixed", dl.FIXED), ("broken", dl.BROKEN)):
        (tmp_path / f"{name}.yml").write_text(text)
    fixed = run_cli("replay", "-c", str(tmp_path / "fixed.yml"), "--log", str(log), "--json")
    assert fixed.returncode == 0, fixed.stderr
    assert len(_result_json(fixed.stdout)["newly_allowed"]) == 2
    broken = run_cli("replay", "-c", str(tmp_path / "broken.yml"), "--log", str(log))
    assert broken.returncode == 1, broken.stderr
    assert "newly refused:" in broken.stdout and "sends bounces" in broken.stdout
    missing = run_cli("replay", "-c", str(tmp_path / "nope.yml"), "--log", str(log))
    assert missing.returncode == 2 and "cannot read the config file" in missing.stderr
    no_log = run_cli("replay", "-c", str(tmp_path / "fixed.yml"), "--log", str(tmp_path / "x"))
    assert no_log.returncode == 2 and "No such file" in no_log.stderr


def test_result_exit_status() -> None:
    empty = ReplayResult({}, {}, [], [])
    assert empty.exit_status == 0
    assert empty._replace(newly_refused=[{}]).exit_status == 1
