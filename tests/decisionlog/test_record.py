"""The decision record: what the milter writes is what the readers get back, from either form."""

from __future__ import annotations

from typing import List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaymilter.core.model import MODES
from relaymilter.core.policy import ACTIONS, REASONS
from relaymilter.decisionlog.logfmt import quote
from relaymilter.decisionlog.record import (
    FIELDS,
    MAX_LINE_BYTES,
    DecisionRecord,
    from_journal,
    parse_line,
    read_line,
)

from ..support import REPO

# Any text a client, an MTA or a config could put in a field, hostile values included.
value = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from(["-", '"', "\\", "a b", "x> action=continue", "\u2028", "\u202e", "\r\n"]),
)
# The action, reason and mode are relaymilter's own words; the reader takes no others.
records = (
    st.builds(
        DecisionRecord,
        **{name: value for name, _, _ in FIELDS},
    )
    .map(lambda r: r._replace(recipient=r.recipient or ""))
    .flatmap(
        lambda r: st.builds(
            r._replace,
            action=st.sampled_from(sorted(ACTIONS)),
            reason=st.sampled_from(sorted(REASONS)),
            mode=st.one_of(st.none(), st.sampled_from(MODES)),
        )
    )
)


@settings(max_examples=500)
@given(records)
def test_a_line_reads_back_as_the_record_it_was_written_from(record: DecisionRecord) -> None:
    line = record.line()
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert parse_line(line) == record
    # As rsyslog writes it to mail.log, and as the stderr handler does.
    assert parse_line(f"Nov 30 06:10:35 relay relaymilter[812]: {line}") == record
    assert parse_line(f"INFO {line}") == record


@settings(max_examples=200)
@given(records)
def test_journal_fields_read_back_as_the_record(record: DecisionRecord) -> None:
    assert from_journal(record.journal_fields()) == record


def test_the_line_for_the_usual_refusal() -> None:
    record = DecisionRecord(
        conn="7",
        queue_id="NOQUEUE",
        client="192.0.2.7",
        organization="contoso",
        connector="onprem-ip",
        kind="ip",
        sender="",
        recipient="kate@tailspintoys.com",
        route="tailspintoys.com",
        mode="enforce",
        config="66f53246dec3",
        action="reject",
        reason="attr36",
    )
    assert record.line() == (
        "decision conn=7 queue_id=NOQUEUE client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- cert_subject=- cert_issuer=- verify=- "
        "cn_subject=- cn_issuer=- cert_fp=- cert_pubkey_fp=- from=<> to=<kate@tailspintoys.com> "
        "route=tailspintoys.com mta_rcpt=- mode=enforce config=66f53246dec3 action=reject "
        "reason=attr36"
    )


def test_a_line_from_before_the_public_key_field_reads_back() -> None:
    line = (
        "decision conn=7 queue_id=NOQUEUE client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- cert_subject=- cert_issuer=- verify=- "
        "cn_subject=- cn_issuer=- cert_fp=- from=<> to=<kate@tailspintoys.com> "
        "route=tailspintoys.com mta_rcpt=- mode=enforce config=66f53246dec3 action=reject "
        "reason=attr36"
    )
    found = read_line(line)
    assert found is not None
    record, _ = found
    assert record.cert_pubkey_fp is None and record.reason == "attr36"


def test_a_spoofing_recipient_stays_one_field() -> None:
    evil = '"boss@tailspintoys.com> action=continue reason=internal-recipient x"@tailspintoys.com'
    record = DecisionRecord(recipient=evil, action="reject", reason="attr36")
    parsed = parse_line(record.line())
    assert parsed is not None
    assert (parsed.recipient, parsed.action, parsed.reason) == (evil, "reject", "attr36")


def _line_of(text: str) -> Optional[DecisionRecord]:
    return parse_line(text)


def test_records_of_older_versions_and_other_lines() -> None:
    # Before issue 8: no route, mode, config or certificate macros.
    old = (
        "decision conn=7 queue_id=NOQUEUE client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- from=<> to=<kate@tailspintoys.com> "
        "action=reject reason=attr36"
    )
    record = _line_of(old)
    assert record is not None
    assert (record.sender, record.recipient, record.mode, record.route) == (
        "",
        "kate@tailspintoys.com",
        None,
        None,
    )
    assert _line_of("postfix/smtpd[1]: NOQUEUE: milter-reject: RCPT from x") is None
    assert _line_of("INFO decision conn=7 queue_id=NOQUEUE client=192.0.2.7") is None  # truncated
    assert _line_of("indecision conn=1 to=<a@b> action=reject") is None


def test_a_decision_forged_inside_another_line_is_not_read() -> None:
    forged = (
        'conn=1 queue_id=NOQUEUE client=192.0.2.7 to="<x decision action=would-reject '
        'to=<victim@tailspintoys.com> organization=contoso reason=attr36 @contoso.com>" '
        "internal error in envrcpt; answering per on_error=tempfail"
    )
    assert parse_line(forged) is None
    assert parse_line("ERROR " + forged) is None
    assert parse_line("Nov 30 06:10:35 relay relaymilter[812]: " + forged) is None


# -- a line cut short (rsyslog's 8 KiB), and lines kept short enough -------------------


def _unbounded_line(record: DecisionRecord) -> str:
    """The line as relaymilter wrote it before values were bounded (for the forgery)."""
    parts = []
    for name, key, _ in FIELDS:
        value = getattr(record, name)
        if value is not None and name in ("sender", "recipient", "mta_rcpt"):
            value = f"<{value}>"
        parts.append(f"{key}={quote(value, limit=10**9)}")
    return "decision " + " ".join(parts)


def test_a_line_cut_inside_a_quoted_value_is_unreadable_not_forged() -> None:
    # The review's reproduction: a recipient of about 2 KB full of backslashes (and the
    # MTA's resolved form of it) made an 11 KB line; cut at 8,096 bytes, as rsyslog cuts
    # it, the text the client wrote inside its quoted address was read as the fields
    # action=continue reason=internal-recipient (the real ones were cut off).
    forged = " action=continue reason=internal-recipient"
    record = DecisionRecord(
        conn="1",
        client="192.0.2.7",
        organization="contoso",
        connector="onprem-ip",
        kind="ip",
        sender="",
        recipient="\\" * 2000 + "@tailspintoys.com",
        mode="enforce",
        action="reject",
        reason="attr36",
    )
    before = _unbounded_line(record._replace(mta_rcpt=""))
    # Backslashes, then the forged text so that it ends just before byte 8,096.
    doubled = (8096 - len(before.encode()) - len(forged)) // 2
    resolved = "\\" * doubled + forged + "\\" * 2000 + "@tailspintoys.com"
    line = _unbounded_line(record._replace(mta_rcpt=resolved))
    assert len(line.encode()) > 11000
    cut = line.encode()[:8096].decode(errors="ignore")
    assert cut.endswith(forged) or forged in cut[-100:]
    assert parse_line(cut) is None
    assert parse_line(f"2026-11-30T07:03:34.123456+00:00 relay1 relaymilter[9]: {cut}") is None
    assert parse_line(line) == record._replace(mta_rcpt=resolved)  # whole, it reads as written
    # Written today, the same record fits the line, its long values cut and marked.
    bounded = record._replace(mta_rcpt=resolved).line()
    assert len(bounded.encode()) <= MAX_LINE_BYTES
    read = read_line(bounded)
    assert read is not None and read[1] == ("recipient", "mta_rcpt")
    assert (read[0].action, read[0].reason) == ("reject", "attr36")


@pytest.mark.parametrize(
    "text",
    [
        'decision to=<a@b> action=reject reason=attr36 x="unterminated',
        "decision to=<a@b> action=reject reason=attr36 to=<c@d>",  # a key twice
        "decision to=<a@b> action=reject reason=attr",  # cut inside the last word
        "decision to=<a@b> action=reject reason=attr36 mode=enforc",
        'decision to=<a@b>x"y action=reject reason=attr36',
        "decision to=<a@b>  action=reject reason=attr36",
        "decision to=<a@b> action=reject",
        "decision to=<a@b> action=rejects reason=attr36",
    ],
)
def test_what_is_not_the_format_is_unreadable(text: str) -> None:
    assert parse_line(text) is None


def test_unknown_keys_of_a_later_version_are_skipped() -> None:
    record = parse_line('decision to=<a@b> colour="red x" action=reject reason=attr36\n')
    assert record is not None and (record.recipient, record.action) == ("a@b", "reject")


_HOSTILE = st.text(
    alphabet=st.sampled_from(["a", "\\", '"', "\x01", "\u202e", "\U0010fffd", "ü", " "]),
    min_size=0,
    max_size=3000,
)


@settings(max_examples=200)
@given(st.lists(_HOSTILE, min_size=15, max_size=15))
def test_every_line_fits_the_documented_bound_and_says_what_it_cut(values: List[str]) -> None:
    own = {"conn", "kind", "mode", "config", "action", "reason"}
    others = [name for name, _, _ in FIELDS if name not in own]
    record = DecisionRecord(
        conn="9" * 20,
        kind="certificate",
        mode="monitor",
        config="66f53246dec3",
        action="would-reject",
        reason="internal-recipient",
        **dict(zip(others, values)),
    )
    line = record.line()
    assert len(line.encode()) <= MAX_LINE_BYTES
    read = read_line(line)
    assert read is not None
    parsed, cut = read
    for name in others:
        whole, shown = getattr(record, name), getattr(parsed, name)
        if name in cut:
            assert whole.startswith(shown) and len(shown) < len(whole)
        else:
            assert shown == whole
    # The journal keeps every value whole.
    assert from_journal(record.journal_fields()) == record


def test_the_longest_line_leaves_room_for_a_syslog_prefix_under_8_kib() -> None:
    prefix = "2026-11-30T07:03:34.123456+00:00 " + "h" * 64 + " relaymilter[4194304]: "
    assert MAX_LINE_BYTES + len(prefix) < 8192
    man = (REPO / "docs" / "man" / "relaymilter.8").read_text()
    assert f"{MAX_LINE_BYTES:,}" in man


def test_a_cut_value_is_marked_with_what_it_left_out() -> None:
    record = DecisionRecord(
        recipient="k" * 1000 + "@tailspintoys.com", action="reject", reason="attr36"
    )
    line = record.line()
    assert "\\+" in line
    read = read_line(line)
    assert read is not None and read[1] == ("recipient",)
    shown = read[0].recipient
    assert shown is not None and shown.startswith("kkk")
    # "<" + the address + ">", less the "<" and the characters shown.
    assert line.count(f'\\+{1000 + 17 + 2 - 1 - len(shown)}" ') == 1
