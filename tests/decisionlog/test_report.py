"""relaymilter report: groups, remedies, totals and every format, hostile values included."""

from __future__ import annotations

import csv
import email
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import pytest

from relaymilter.decisionlog.logsource import Entry
from relaymilter.decisionlog.record import DecisionRecord
from relaymilter.decisionlog.report import (
    COLUMNS,
    Aggregator,
    Distinct,
    Report,
    as_csv,
    as_html,
    as_json,
    as_text,
    build_report,
    group_rows,
)

from .. import traffic as dl
from ..support import REPO, relaymilter_command, run_cli


def entries(logged: Iterable[dl.Logged]) -> List[Entry]:
    return [Entry(item.record, item.time, item.host) for item in logged]


def report(logged: Optional[List[dl.Logged]] = None, **kwargs: Any) -> Report:
    return build_report(entries(logged or dl.traffic()), dl.config(), **kwargs)


def by_flow(rep: Report) -> Dict[Tuple[str, str], Dict[str, Any]]:
    return {(g["client_address"], g["sender_domain"]): g for g in rep.groups}


def test_each_problem_flow_is_a_group_with_its_remedy() -> None:
    rep = report()
    groups = by_flow(rep)
    assert len(rep.groups) == 8  # only what enforcing would refuse
    assert all(g["action"] == "would-reject" and g["reason"] == "attr36" for g in rep.groups)
    app = groups["192.0.2.20", "vendor.example"]
    assert app["remedy"].startswith(
        "this application sends as `noreply@vendor.example`: change its envelope sender"
    )
    bounce = groups["192.0.2.7", "<>"]
    assert bounce["remedy"] == (
        "the client 192.0.2.7 sends bounces (`<>`): give it a certificate connector "
        "(`*.contoso.com`)"
    )
    assert (bounce["count"], bounce["recipients"], bounce["recipient_domains"]) == (6, 2, 2)
    assert bounce["first_seen"] == "2026-11-23T09:00:00Z"
    assert bounce["last_seen"] == "2026-11-25T09:00:00Z"
    assert bounce["samples"] == ["4X000021", "4X000131", "4X000241"]
    for domain in ("a.example", "b.example", "c.example"):
        assert (
            "relays mail of outside senders (3 sender domains: forwarding)"
            in (groups["192.0.2.8", domain]["remedy"])
        )
    assert groups["192.0.2.9", "sales.contoso.com"]["remedy"] == (
        "add `sales.contoso.com` to contoso's accepted_domains "
        "(or `match_subdomains: true` on contoso.com)"
    )
    assert groups["192.0.2.10", "<>"]["remedy"] == (
        "the certificate `mail.contoso.com` matched no connector: add a certificate "
        "connector to contoso with tls_sender_certificate_name `*.contoso.com`"
    )
    unverified = groups["198.51.100.5", "<>"]
    assert unverified["organization"] == "fabrikam"
    assert (
        "`smtp.fabrikam.com` but the MTA did not verify it ({verify}=FAIL)"
        in (unverified["remedy"])
    )


def test_a_certificate_under_no_accepted_domain() -> None:
    flow = dl.Flow(
        "san-only",
        "192.0.2.11",
        "",
        ["kate@tailspintoys.com"],
        {"{cert_subject}": "relay01.corp.example"},
    )
    logged = [dl.Logged(dl.START, r) for r in dl.decide(dl.config(), flow, "4Xsan")]
    (group,) = report(logged).groups
    assert group["remedy"].startswith(
        "the certificate `relay01.corp.example` matched no connector and is not under an "
        "accepted domain of contoso: give the client a certificate named under contoso.com"
    )


def test_a_certificate_an_existing_connector_refused_names_the_condition() -> None:
    # A renewed certificate from another CA: the connector exists, its issuer list does not
    # name the new CA. The remedy must not be "add a connector".
    flow = dl.Flow(
        "new-ca",
        "192.0.2.12",
        "",
        ["kate@tailspintoys.com"],
        {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "R3"},
    )
    pinned = dl.config(
        dl.FIXED.replace(
            '"*.contoso.com"\n', '"*.contoso.com"\n        trusted_issuers: ["Contoso CA"]\n'
        )
    )
    logged = [dl.Logged(dl.START, r) for r in dl.decide(pinned, flow, "4Xca")]
    (group,) = build_report(entries(logged), pinned).groups
    assert "matches connector contoso/onprem-cert" in group["remedy"], group["remedy"]
    assert "issuer `R3` is not in the connector's trusted_issuers" in group["remedy"]


def test_remedies_without_the_config_use_the_domains_seen_in_the_log() -> None:
    rep = build_report(entries(dl.traffic()))
    assert "(`*.contoso.com`)" in by_flow(rep)["192.0.2.7", "<>"]["remedy"]


def test_totals_per_organization_and_period() -> None:
    rep = report()
    t = rep.totals
    assert rep.period == {"since": "2026-11-23T08:00:00Z", "until": "2026-11-25T18:00:00Z"}
    assert (t["decisions"], t["would_reject"], t["continue"], t["reject"]) == (39, 27, 12, 0)
    assert t["relays"] == ["relay1"]
    contoso, fabrikam, unattributed = t["organizations"]
    assert contoso == {
        "organization": "contoso",
        "decisions": 30,
        "would_reject": 24,
        "reject": 0,
        "soft_reject": 0,
        "share": 0.8,
        "modes": ["monitor"],
    }
    assert "contoso: 30 decisions" in "\n".join(as_text(rep).splitlines()[:4])
    assert "; mode monitor" in as_text(rep)
    assert fabrikam["would_reject"] == 3 and unattributed["organization"] is None
    # A given period is the report's, not the records'.
    assert report(since=dl.START, until=dl.START + 7 * dl.DAY).period["until"] == (
        "2026-11-30T08:00:00Z"
    )


def test_all_lists_passing_flows_with_their_reasons() -> None:
    reasons = {g["reason"] for g in report(everything=True).groups}
    assert reasons == {"attr36", "internal-recipient", "sender-domain", "unattributed"}


def test_enforced_and_soft_refusals_are_their_own_rows() -> None:
    enforced = [
        dl.Logged(i.time, i.record._replace(action="reject", mode="enforce"))
        for i in dl.traffic(days=1)
        if i.record.action == "would-reject"
    ]
    soft = [dl.Logged(i.time + dl.DAY, i.record._replace(action="soft-reject")) for i in enforced]
    rep = report(dl.traffic() + enforced + soft, top=0)
    actions = {g["action"] for g in rep.groups}
    assert actions == {"would-reject", "reject", "soft-reject"}
    assert (rep.totals["reject"], rep.totals["soft_reject"]) == (9, 9)
    assert rep.days["contoso", "2026-11-23"] == [8, 8]  # would-reject, reject + soft


def test_top_n_and_other() -> None:
    rep = report(top=3)
    assert len(rep.groups) == 4
    other = rep.groups[-1]
    assert other["organization"] is None and other["count"] == 27 - sum(
        g["count"] for g in rep.groups[:3]
    )
    assert other["remedy"] == "other: 5 more groups (--top 0 lists them all)"
    assert len(report(top=0).groups) == 8


def test_the_json_contract() -> None:
    data = json.loads(as_json(report()))
    assert set(data) == {"period", "totals", "groups"}
    assert set(data["period"]) == {"since", "until"}
    for group in data["groups"]:
        assert list(group) == list(COLUMNS)
        assert list(group) == [
            "organization",
            "connector",
            "client_address",
            "sender_domain",
            "reason",
            "action",
            "count",
            "recipients",
            "recipient_domains",
            "first_seen",
            "last_seen",
            "samples",
            "remedy",
            "count_error",
        ]


def test_csv_has_the_same_columns() -> None:
    rep = report()
    rows = list(csv.reader(io.StringIO(as_csv(rep))))
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == 1 + len(rep.groups)
    first = dict(zip(rows[0], rows[1]))
    assert first["count"] == str(rep.groups[0]["count"])
    assert first["samples"] == " ".join(rep.groups[0]["samples"])


def test_the_distinct_count_is_exact_then_estimated_in_bounded_memory() -> None:
    small, large = Distinct(), Distinct()
    for n in range(200):
        small.add(f"user{n % 150}@x")
    assert len(small) == 150
    for n in range(200_000):
        large.add(f"user{n}@x")
    assert abs(len(large) - 200_000) < 200_000 * 0.2
    assert not large._exact and len(large._hashes) == Distinct.K  # 2 KiB, however many


# -- hostile values ----------------------------------------------------------------

HOSTILE = DecisionRecord(
    queue_id="<img src=x onerror=alert(1)>",
    client="192.0.2.66",
    organization="contoso</td><script>alert('org')</script>",
    connector="ip\x1b[31m\r\nFAKE",
    kind="ip",
    sender="=cmd|' /C calc'!A0@evil.example\r\n",
    recipient='"<script>alert(1)</script>"@tailspintoys.com',
    route="tailspintoys.com",
    mode="monitor",
    action="would-reject",
    reason="attr36",
)


def hostile_report() -> Report:
    logged = [dl.Logged(dl.START + n, HOSTILE) for n in range(3)]
    return report(dl.traffic() + logged)


def test_text_output_escapes_controls() -> None:
    text = as_text(hostile_report())
    assert "\x1b" not in text and "\r" not in text
    assert "ip\\x1b[31m\\x0d\\x0aFAKE" in text
    assert not any(line.startswith("FAKE") for line in text.splitlines())


def test_csv_output_escapes_controls_and_formulas() -> None:
    out = as_csv(hostile_report())
    assert "\x1b" not in out and "\r" not in out
    rows = list(csv.reader(io.StringIO(out)))
    assert len(rows) == 10
    assert not any(cell.startswith(("=", "+", "@")) for row in rows for cell in row)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: Set[str] = set()
        self.attributes: Set[str] = set()

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)


def test_html_escapes_everything_and_is_self_contained() -> None:
    page = as_html(hostile_report())
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "tr",
        "th", "td", "svg", "rect", "line", "text", "polyline", "circle",
    }  # fmt: skip
    assert not any(a.startswith("on") for a in parser.attributes)
    assert "<script" not in page and "<img" not in page
    assert "\r" not in page and "\x1b" not in page  # a mail body without bare CRs
    assert "contoso&lt;/td&gt;&lt;script&gt;alert(&#x27;org&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # a sample queue id
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and "src=" not in page.replace("src=x", "")


# -- rendered in a real browser ------------------------------------------------------


def _png_pixels(data: bytes) -> Tuple[int, int, List[bytes]]:
    """Width, height and RGB(A) rows of a non-interlaced 8-bit PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            assert body[8] == 8 and body[12] == 0, "8-bit, not interlaced"
            channels = {2: 3, 6: 4}[body[9]]
        elif kind == b"IDAT":
            chunks += body
    raw = zlib.decompress(chunks)
    stride = width * channels
    rows: List[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up = previous[x]
            corner = previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(r) for r in rows]


def test_the_html_page_renders_its_chart_in_headless_chromium(tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (scripts/bootstrap installs it)")
    page = tmp_path / "report.html"
    page.write_text(as_html(hostile_report()))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            "--window-size=900,700",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    width, height, rows = _png_pixels(shot.read_bytes())
    channels = len(rows[0]) // width
    # The chart is the page's first graphic: under the heading and the summary,
    # 760 x 260 px. Count the pixels of its first organization's colour
    # (#c0392b, contoso's lines and points) in that band.
    red = 0
    for y in range(100, min(height, 520)):
        row = rows[y]
        for x in range(0, min(width, 800)):
            r, g, b = row[x * channels : x * channels + 3]
            if abs(r - 0xC0) < 24 and abs(g - 0x39) < 24 and abs(b - 0x2B) < 24:
                red += 1
    assert red > 500, f"the chart is blank ({red} chart pixels)"


def test_the_command_line_formats(tmp_path: Path) -> None:
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(dl.traffic()))
    config = tmp_path / "relaymilter.yml"
    config.write_text(dl.MONITOR)
    base = ("report", "-c", str(config), "--log", str(log))
    text = run_cli(*base)
    assert text.returncode == 0, text.stderr
    assert "sends bounces (`<>`)" in text.stdout
    data = json.loads(run_cli(*base, "--json").stdout)
    assert len(data["groups"]) == 8
    assert run_cli(*base, "--csv").stdout.startswith(",".join(COLUMNS))
    assert run_cli(*base, "--html").stdout.startswith("<!DOCTYPE html>")
    both = run_cli(*base, "--csv", "--json")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_the_example_timer_unit_mails_the_html_report(tmp_path: Path) -> None:
    """Run the service's ExecStart as systemd would: unit escapes undone, our binaries."""
    unit = (REPO / "etc" / "systemd" / "relaymilter-report.service").read_text()
    timer = (REPO / "etc" / "systemd" / "relaymilter-report.timer").read_text()
    assert "OnCalendar=" in timer and "Unit=" not in timer  # the .service of the same name
    joined = unit.replace("\\\n", " ")
    exec_start = next(
        line.split("=", 1)[1] for line in joined.splitlines() if line.startswith("ExecStart=")
    )
    # systemd: "%%" is "%", and C escapes in quoted words ("\\\\" is a backslash).
    argv = shlex.split(exec_start.replace("%%", "%"), posix=True)
    argv = [arg.replace("\\\\", "\\") for arg in argv]
    assert argv[:2] == ["/bin/sh", "-ec"]
    log = dl.write(tmp_path / "mail.log", dl.syslog_lines(dl.traffic()))
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sendmail"
    fake.write_text(f"#!/bin/sh\ncat > {tmp_path / 'mail.txt'}\n")
    fake.chmod(0o755)
    script = (
        argv[2]
        .replace("/usr/sbin/sendmail", str(fake))
        .replace(
            "/usr/bin/relaymilter report",
            f"{relaymilter_command()[0]} report --log {log}",
        )
    )
    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path), "REPORT_TO": "postmaster"}
    subprocess.run(["/bin/sh", "-ec", script], env=env, check=True, timeout=60)
    mail = (tmp_path / "mail.txt").read_bytes()
    # SMTP: no line longer than 998 octets (RFC 5321 4.5.3.1.6), or MTAs break it.
    assert max(len(line) for line in mail.split(b"\n")) <= 998
    assert max(len(line.encode()) for line in as_html(report()).splitlines()) > 998
    message = email.message_from_bytes(mail)
    assert message["To"] == "postmaster"
    assert message.get_content_type() == "text/html"
    assert message["Content-Transfer-Encoding"] == "base64"
    body = message.get_payload(decode=True).decode("utf-8")
    assert body.startswith("<!DOCTYPE html>") and "sends bounces" in body
    assert json.loads((tmp_path / "cursor.json").read_text())["hosts"]["relay1"]


# -- hostile values in every format, and memory bounded whatever the input --------------


def flow_from(sender: str) -> dl.Logged:
    base = next(i for i in dl.traffic(days=1) if i.record.action == "would-reject")
    return dl.Logged(base.time, base.record._replace(sender=sender))


FORMULAS = ["-2+3+cmd|'/c calc'!a0", '=HYPERLINK("x")', "+1", "@SUM(A1)", "\tx", "\rx"]


def test_no_csv_cell_can_start_a_formula() -> None:
    rows = list(csv.reader(io.StringIO(as_csv(report([flow_from(f"a@{f}") for f in FORMULAS])))))
    cells = [cell for row in rows[1:] for cell in row]
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells)
    domains = {row[COLUMNS.index("sender_domain")] for row in rows[1:]}
    assert "'-2+3+cmd|'/c calc'!a0" in domains and "'+1" in domains
    counts = [row[COLUMNS.index("count")] for row in rows[1:]]
    assert all(count.isdigit() for count in counts)  # numbers stay numbers


@pytest.mark.parametrize("character", ["\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200b"])
def test_invisible_and_bidirectional_characters_show_in_every_format(character: str) -> None:
    rep = report([flow_from(f"a@{character}gro.osotnoc")])
    escaped = f"\\u{ord(character):04x}gro.osotnoc"
    for render in (as_text, as_csv, as_html):
        out = render(rep)
        assert character not in out, render.__name__
        assert escaped in out, render.__name__
    assert character not in as_json(rep) and escaped in as_json(rep)  # JSON's own escape


def test_memory_is_bounded_and_the_big_groups_stay_exact() -> None:
    heavy = [flow_from(f"bounce@heavy{n}.example.com") for n in range(3)]
    logged: List[dl.Logged] = []
    for n in range(20_100):  # over 20,000 sender domains of one record each
        logged.append(flow_from(f"a@s{n}.example.net"))
        if n % 10 == 0:
            logged.append(heavy[n % 3])
    logged.extend([flow_from("late@example.org")] * 50)
    aggregator = Aggregator(max_groups=100)
    largest = 0
    for entry in entries(logged):
        aggregator.add(entry)
        largest = max(largest, len(aggregator.groups))
    assert largest <= 200
    rows = group_rows(aggregator, lambda key, group: "", top=5)
    counts = {row["sender_domain"]: (row["count"], row["count_error"]) for row in rows[:-1]}
    # Kept from their first record: exact.
    for n in range(3):
        assert counts[f"heavy{n}.example.com"] == (sum(r is heavy[n] for r in logged), 0)
    # Opened after groups were let go: the count shown, and what it may miss.
    count, error = counts["example.org"]
    assert count <= 50 <= count + error and error > 0
    other = rows[-1]
    assert other["sender_domain"] is None and "let go to bound memory" in other["remedy"]
    assert sum(row["count"] for row in rows) == len(logged)
    text = as_text(build_report(entries(logged), dl.config(), top=5))
    assert "memory bound:" in text  # over 2 x 10,000 groups
    assert re.search(r"^50\+1 +would-reject .* example\.org ", text, re.MULTILINE)
