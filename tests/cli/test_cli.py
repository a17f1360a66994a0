"""Each subcommand through the installed ``relaymilter`` entry point."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import List

from relaymilter import __version__

from ..support import REPO, make_certificate, relaymilter_command, run_cli

EXAMPLE = str(REPO / "etc" / "relaymilter.yml")


def test_version() -> None:
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"relaymilter {__version__}\n")


def test_check_config_ok() -> None:
    result = run_cli("check-config", "-c", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"{EXAMPLE}: OK: 1 organization, 2 accepted domains, 2 connectors "
        "(1 certificate, 1 ip), mode enforce\n"
    )


def test_check_config_env_variable_and_warnings(tmp_path: Path) -> None:
    config = tmp_path / "m.yml"
    config.write_text(Path(EXAMPLE).read_text().replace("mode: enforce", "mode: monitor"))
    result = run_cli("check-config", env={"RELAYMILTER_CONFIG": str(config)})
    assert result.returncode == 0
    assert "mode monitor" in result.stdout
    line = config.read_text().splitlines().index("mode: monitor") + 1
    assert (
        f"warning: {config}:{line}: mode: monitor mode: refusals are only logged" in result.stdout
    )


def test_check_config_lists_every_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text(
        "mode: strict\n"
        "organizations:\n"
        "  - name: contoso\n"
        "    accepted_domains: [contoso.com]\n"
        "    connectors:\n"
        "      - {name: hcw, tls_sender_certificate_name: mail.contoso.com}\n"
    )
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"relaymilter: 2 error(s) in {config}:",
        f"  {config}:1: mode: must be one of enforce, soft, monitor, not 'strict'",
        f"  {config}:6: organizations[0].connectors[0].tls_sender_certificate_name: connector 'hcw': "
        "'mail.contoso.com' is not a domain registered with organization 'contoso'; use '*.contoso.com' "
        "(as Exchange's Hybrid Configuration Wizard does; contoso.com is registered) or add "
        "mail.contoso.com to accepted_domains",
    ]


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = run_cli("check-config", "-c", str(tmp_path / "nope.yml"))
    assert result.returncode == 1
    assert "cannot read the config file: No such file or directory" in result.stderr


def test_explain_text() -> None:
    result = run_cli(
        "explain",
        "-c",
        EXAMPLE,
        "--client-address",
        "192.0.2.7",
        "--mail-from",
        "",
        "--rcpt",
        "kate@tailspintoys.com",
        "--rcpt",
        "kate@contoso.com",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "attribution: organization contoso, connector onprem-ip (ip, by client address)",
        "<kate@tailspintoys.com>: reject (attr36): 550 5.7.64 Relay Access Denied ATTR36. For more "
        "details please refer to https://support.microsoft.com/kb/3169958.",
        "<kate@contoso.com>: continue (internal-recipient)",
    ]


def test_explain_json_certificate() -> None:
    result = run_cli(
        "explain",
        "-c",
        EXAMPLE,
        "--client-address",
        "203.0.113.1",
        "--cert-subject",
        "/CN=mail.contoso.com",
        "--cert-issuer",
        "/O=Contoso/CN=Contoso Issuing CA",
        "--verify",
        "OK",
        "--mail-from",
        "<>",
        "--rcpt",
        "<john@fabrikam.com>",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "attribution": {
            "organization": "contoso",
            "connector": "onprem-cert",
            "kind": "certificate",
        },
        "mode": "enforce",
        "recipients": [
            {
                "recipient": "john@fabrikam.com",
                "action": "continue",
                "reason": "certificate",
                "route": ["fabrikam.com"],
                "mta_rcpt": None,
                "reply": None,
            }
        ],
    }


def test_explain_bad_address() -> None:
    result = run_cli(
        "explain", "-c", EXAMPLE, "--client-address", "nope", "--mail-from", "", "--rcpt", "a@b.c"
    )
    assert result.returncode == 2
    assert "'nope' is not an IP address" in result.stderr


def test_inspect_cert(tmp_path: Path) -> None:
    make_certificate(
        tmp_path / "hcw.pem",
        "mail.contoso.com",
        sans=["mail.contoso.com", "autodiscover.fabrikam.net"],
    )
    result = run_cli("inspect-cert", "-c", EXAMPLE, str(tmp_path / "hcw.pem"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  subject CN:  mail.contoso.com\n" in out
    assert "  issuer CN:   Contoso Issuing CA\n" in out
    assert "  DNS SANs:    mail.contoso.com, autodiscover.fabrikam.net\n" in out
    assert "  SHA-256:     " in out
    assert "  public key:  SHA-256 " in out
    assert "  name mail.contoso.com: contoso/onprem-cert\n" in out
    assert "  name autodiscover.fabrikam.net: matches no connector\n" in out
    assert (
        "warning: autodiscover.fabrikam.net is under no accepted domain of any organization" in out
    )


def test_inspect_cert_suggests_the_wildcard_connector(tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text(
        "organizations:\n  - name: contoso\n    accepted_domains: [contoso.com]\n"
        "    connectors: [{name: ip, sender_ip_addresses: [192.0.2.0/24]}]\n"
    )
    make_certificate(tmp_path / "old.pem", "mail.contoso.com", days=(-30, -2))
    result = run_cli("inspect-cert", "-c", str(config), str(tmp_path / "old.pem"))
    assert result.returncode == 0
    assert (
        "warning: mail.contoso.com is not registered with any organization; a connector "
        "tls_sender_certificate_name: '*.contoso.com' in organization 'contoso' would match it "
        "(contoso.com is registered)"
    ) in result.stdout
    assert "warning: the certificate is expired on" in result.stdout


def test_inspect_cert_unreadable(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
    )
    result = run_cli("inspect-cert", str(tmp_path / "junk.pem"), str(tmp_path / "absent.pem"))
    assert result.returncode == 1
    assert "is not a PEM or DER certificate" in result.stderr
    assert "cannot read" in result.stderr


def _check_config_on_a_journal_stream(config: Path, stream: Path) -> List[str]:
    """Run check-config with stderr on ``stream``, as if it were systemd's journal stream."""
    with stream.open("wb") as handle:
        info = os.fstat(handle.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        subprocess.run(
            [*relaymilter_command(), "check-config", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=handle,
            env=env,
            check=False,
        )
    return stream.read_text().splitlines()


def test_check_config_sets_journal_priorities_under_systemd(tmp_path: Path) -> None:
    """On a journal stream, errors are <3> and warnings <4> (SyslogLevelPrefix), not info."""
    bad = tmp_path / "bad.yml"
    bad.write_text("mode: strict\norganizations: []\n")
    lines = _check_config_on_a_journal_stream(bad, tmp_path / "stderr")
    assert len(lines) == 3 and all(line.startswith("<3>") for line in lines), lines
    monitor = tmp_path / "monitor.yml"
    monitor.write_text(Path(EXAMPLE).read_text().replace("mode: enforce", "mode: monitor"))
    lines = _check_config_on_a_journal_stream(monitor, tmp_path / "stderr")
    assert lines and all(line.startswith("<4>warning: ") for line in lines), lines


def _explain_json(*args: str) -> dict[str, object]:
    result = run_cli("explain", "-c", EXAMPLE, "--client-address", "192.0.2.7", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_explain_routing_forms_and_the_mtas_resolved_address() -> None:
    result = _explain_json(
        "--mail-from",
        "<>",
        "--rcpt",
        "<kate%tailspintoys.com@contoso.com>",
        "--rcpt",
        "<kate@contoso.com>",
        "--rcpt-addr",
        "kate@tailspintoys.com",
        "--rcpt-addr",
        "kate@contoso.com",
    )
    first, second = result["recipients"]  # type: ignore[misc]
    assert (first["action"], first["reason"]) == ("reject", "attr36")
    assert first["route"] == ["contoso.com", "tailspintoys.com"]
    assert first["mta_rcpt"] == "kate@tailspintoys.com"
    assert (second["action"], second["reason"]) == ("continue", "internal-recipient")
    text = run_cli(
        "explain", "-c", EXAMPLE, "--client-address", "192.0.2.7", "--mail-from", "<>",
        "--rcpt", "<tailspintoys.com!kate@contoso.com>",
    ).stdout  # fmt: skip
    assert "routes through: contoso.com,tailspintoys.com" in text


def test_explain_needs_one_rcpt_addr_per_rcpt() -> None:
    result = run_cli(
        "explain", "-c", EXAMPLE, "--client-address", "192.0.2.7", "--mail-from", "<>",
        "--rcpt", "a@contoso.com", "--rcpt", "b@contoso.com", "--rcpt-addr", "a@contoso.com",
    )  # fmt: skip
    assert result.returncode == 2
    assert "give --rcpt-addr once for each --rcpt" in result.stderr


def test_explain_json_says_would_reject_in_monitor_mode(tmp_path: Path) -> None:
    config = tmp_path / "m.yml"
    config.write_text(Path(EXAMPLE).read_text().replace("mode: enforce", "mode: monitor"))
    result = run_cli(
        "explain", "-c", str(config), "--client-address", "192.0.2.7", "--mail-from", "<>",
        "--rcpt", "kate@tailspintoys.com", "--json",
    )  # fmt: skip
    (recipient,) = json.loads(result.stdout)["recipients"]
    assert recipient["action"] == "would-reject"
    assert recipient["reply"].startswith("550 5.7.64 Relay Access Denied ATTR36.")


def test_explain_takes_sendmails_cn_macros() -> None:
    result = _explain_json(
        "--verify", "OK", "--cert-subject", "/O=Contoso/OU=Mail", "--cert-issuer", "/O=Contoso",
        "--cn-subject", "mail.contoso.com", "--cn-issuer", "Contoso Issuing CA",
        "--mail-from", "<>", "--rcpt", "kate@tailspintoys.com",
    )  # fmt: skip
    assert result["attribution"] == {
        "organization": "contoso",
        "connector": "onprem-cert",
        "kind": "certificate",
    }


def test_inspect_cert_shows_every_certificate_of_a_bundle(tmp_path: Path) -> None:
    make_certificate(tmp_path / "a.pem", "gw01.contoso.com")
    make_certificate(tmp_path / "b.pem", "gw02.contoso.com")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((tmp_path / "a.pem").read_bytes() + (tmp_path / "b.pem").read_bytes())
    result = run_cli("inspect-cert", "-c", EXAMPLE, str(bundle))
    assert result.returncode == 0, result.stderr
    assert f"{bundle}: certificate 1 of 2" in result.stdout
    assert f"{bundle}: certificate 2 of 2" in result.stdout
    assert "gw01.contoso.com" in result.stdout and "gw02.contoso.com" in result.stdout
