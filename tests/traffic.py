"""Decision logs for the report, replay and log-source tests: made by the real policy.

``traffic()`` decides each flow through ``policy.Transaction`` and builds the
record exactly as the milter does (``milter._log_decision``); the writers put
the records in the forms relaymilter's logs take: stderr lines, syslog lines
(rsyslog's RFC 3339 and traditional formats, rotated and compressed) and real
journal files made by ``systemd-journal-remote`` from Journal Export Format.
"""

from __future__ import annotations

import datetime as dt
import gzip
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

import pytest

from relaymilter.config import parse_config
from relaymilter.core.model import Config
from relaymilter.core.networks import parse_client_address
from relaymilter.core.policy import Transaction
from relaymilter.core.tlsidentity import certificate_from_mapping, certificate_macros
from relaymilter.decisionlog.record import DecisionRecord

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"

#: Monitor mode: what the admin runs before enforcing.
MONITOR = """\
mode: monitor
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [192.0.2.0/24]
  - name: fabrikam
    accepted_domains: [fabrikam.com]
    connectors:
      - name: fab-ip
        sender_ip_addresses: [198.51.100.0/24]
"""

#: MONITOR with the report's remedies applied, still in monitor mode.
FIXED = """\
mode: monitor
organizations:
  - name: contoso
    accepted_domains: [contoso.com, {domain: sales.contoso.com, match_subdomains: true}]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [192.0.2.0/24]
      - name: onprem-cert
        tls_sender_certificate_name: "*.contoso.com"
  - name: fabrikam
    accepted_domains: [fabrikam.com]
    connectors:
      - name: fab-ip
        sender_ip_addresses: [198.51.100.0/24]
"""

#: A candidate that enforces, and in which fabrikam forgot its own domain.
BROKEN = """\
mode: enforce
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [192.0.2.0/24]
  - name: fabrikam
    accepted_domains: [fabrikam.net]
    connectors:
      - name: fab-ip
        sender_ip_addresses: [198.51.100.0/24]
"""

START = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone.utc).timestamp()
DAY = 86400.0


def config(text: str = MONITOR) -> Config:
    return parse_config(text, "test.yml")


class Logged(NamedTuple):
    time: float
    record: DecisionRecord
    host: str = "relay1"


class Flow(NamedTuple):
    name: str
    client: str
    sender: str
    recipients: Sequence[str]
    macros: Optional[Dict[str, str]] = None


#: One flow of each kind the report must name, plus traffic that passes.
FLOWS = (
    Flow("application", "192.0.2.20", "noreply@vendor.example", ["kate@tailspintoys.com"]),
    Flow("bounce", "192.0.2.7", "", ["kate@tailspintoys.com", "bob@northwind.example"]),
    Flow("forward-a", "192.0.2.8", "john@a.example", ["kate@tailspintoys.com"]),
    Flow("forward-b", "192.0.2.8", "mary@b.example", ["kate@tailspintoys.com"]),
    Flow("forward-c", "192.0.2.8", "joe@c.example", ["kate@tailspintoys.com"]),
    Flow("subdomain", "192.0.2.9", "alice@sales.contoso.com", ["kate@tailspintoys.com"]),
    Flow(
        "certificate",
        "192.0.2.10",
        "",
        ["kate@tailspintoys.com"],
        {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Contoso Issuing CA"},
    ),
    Flow(
        "unverified",
        "198.51.100.5",
        "",
        ["kate@tailspintoys.com"],
        {
            "{cert_subject}": "/C=US/O=Fabrikam/CN=smtp.fabrikam.com",
            "{cert_issuer}": "/CN=Fabrikam CA",
            "{verify}": "FAIL",
            "{cert_fp}": "ab" * 32,
        },
    ),
    Flow("owned", "192.0.2.7", "alice@contoso.com", ["kate@tailspintoys.com", "ceo@contoso.com"]),
    Flow("fabrikam-owned", "198.51.100.5", "bob@fabrikam.com", ["x@tailspintoys.com"]),
    Flow("unattributed", "203.0.113.1", "x@example.org", ["ceo@contoso.com"]),
)


def decide(cfg: Config, flow: Flow, queue_id: str, conn: int = 1) -> List[DecisionRecord]:
    """The records the milter logs for one transaction (as milter._log_decision builds them)."""
    macros = certificate_macros((flow.macros or {}).get)
    transaction = Transaction(
        cfg, parse_client_address(flow.client), certificate_from_mapping(macros), flow.sender
    )
    attribution = transaction.attribution
    records = []
    for rcpt in flow.recipients:
        decision = transaction.decide(rcpt, None)
        records.append(
            DecisionRecord(
                conn=str(conn),
                queue_id=queue_id,
                client=flow.client,
                organization=attribution.organization.name if attribution else None,
                connector=attribution.connector_name if attribution else None,
                kind=attribution.kind if attribution else None,
                certificate=attribution.certificate_name if attribution else None,
                cert_subject=macros.get("{cert_subject}"),
                cert_issuer=macros.get("{cert_issuer}"),
                verify=macros.get("{verify}"),
                cn_subject=macros.get("{cn_subject}"),
                cn_issuer=macros.get("{cn_issuer}"),
                cert_fp=macros.get("{cert_fp}") or macros.get("{cert_md5}"),
                sender=transaction.sender.address,
                recipient=decision.recipient,
                route=decision.route.describe(),
                mta_rcpt=decision.resolved,
                mode=decision.mode,
                config=cfg.identity,
                action=decision.action,
                reason=decision.reason,
            )
        )
    return records


def traffic(
    cfg: Optional[Config] = None, days: int = 3, host: str = "relay1", flows: Sequence[Flow] = FLOWS
) -> List[Logged]:
    """Every flow once a day for ``days`` days, an hour apart, in time order."""
    cfg = cfg or config()
    logged = []
    number = 0
    for day in range(days):
        for hour, flow in enumerate(flows):
            number += 1
            moment = START + day * DAY + hour * 3600 + 0.25
            for record in decide(cfg, flow, f"4X{number:05d}{host[-1]}", number):
                logged.append(Logged(moment, record, host))
    return logged


# -- writers ------------------------------------------------------------------------


def stderr_lines(logged: Iterable[Logged]) -> List[str]:
    return [f"INFO {item.record.line()}\n" for item in logged]


def syslog_lines(logged: Iterable[Logged], style: str = "rfc3339") -> List[str]:
    lines = []
    for item in logged:
        stamp = dt.datetime.fromtimestamp(item.time, dt.timezone.utc)
        if style == "rfc3339":
            prefix = stamp.strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
        else:  # traditional: local time, no year
            local = dt.datetime.fromtimestamp(item.time)
            prefix = f"{local:%b} {local.day:2d} {local:%H:%M:%S}"
        lines.append(f"{prefix} {item.host} relaymilter[812]: {item.record.line()}\n")
    return lines


def write(path: Path, lines: Iterable[str], compress: bool = False) -> Path:
    data = "".join(lines).encode("utf-8", "surrogateescape")
    if compress:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def export_entry(item: Logged, extra: Optional[Dict[str, str]] = None) -> bytes:
    """One entry in Journal Export Format, as journald would store the milter's entry."""
    fields = {
        "__REALTIME_TIMESTAMP": str(int(item.time * 1e6)),
        "__MONOTONIC_TIMESTAMP": str(int((item.time - START) * 1e6) + 1),
        "_BOOT_ID": "0123456789abcdef0123456789abcdef",
        "_HOSTNAME": item.host,
        "SYSLOG_IDENTIFIER": "relaymilter",
        "SYSLOG_FACILITY": "2",
        "PRIORITY": "6",
        "MESSAGE": item.record.line(),
    }
    fields.update({f"RELAYMILTER_{k}": v for k, v in item.record.journal_fields().items()})
    fields.update(extra or {})
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "surrogateescape")
        if b"\n" in data or any(b < 32 and b != 9 for b in data):
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out) + b"\n"


def write_journal(path: Path, entries: Iterable[bytes]) -> Path:
    """A real journal file: systemd-journal-remote turns the export stream into one."""
    if not Path(JOURNAL_REMOTE).exists():
        pytest.skip("systemd-journal-remote is not installed (scripts/bootstrap installs it)")
    assert path.suffix == ".journal"
    export = path.with_suffix(".export")
    export.write_bytes(b"".join(entries))
    subprocess.run(
        [JOURNAL_REMOTE, "-o", str(path), str(export)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    export.unlink()
    return path


def need_journal_reader() -> None:
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        pytest.skip("python3-systemd is not installed (scripts/bootstrap installs it)")
    if shutil.which("journalctl") is None:
        pytest.skip("no journalctl")
