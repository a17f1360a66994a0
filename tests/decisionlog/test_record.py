"""The decision record: what the milter writes is what the readers get back, from either form."""

from __future__ import annotations

from typing import Optional

from hypothesis import given, settings
from hypothesis import strategies as st

from relaymilter.decisionlog.record import FIELDS, DecisionRecord, from_journal, parse_line

# Any text a client, an MTA or a config could put in a field, hostile values included.
value = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from(["-", '"', "\\", "a b", "x> action=continue", "\u2028", "\u202e", "\r\n"]),
)
records = st.builds(DecisionRecord, **{name: value for name, _, _ in FIELDS}).map(
    lambda r: r._replace(action=r.action or "reject", recipient=r.recipient or "")
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
        "cn_subject=- cn_issuer=- cert_fp=- from=<> to=<kate@tailspintoys.com> "
        "route=tailspintoys.com mta_rcpt=- mode=enforce config=66f53246dec3 action=reject "
        "reason=attr36"
    )


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
