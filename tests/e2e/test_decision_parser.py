"""The harness's reader of relaymilter's decision lines (no MTA needed).

Every e2e verdict comes from these lines, so a recipient address must not be
able to make the parser see fields that relaymilter did not write.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaymilter.decisionlog.logfmt import quote

from .milterproc import LogFormatError, parse_decision_line, parse_decisions, unquote

SMUGGLED = '"boss@tailspintoys.com> action=continue reason=internal-recipient x"@tailspintoys.com'


def line(to: str, action: str = "reject", reason: str = "attr36") -> str:
    """A decision line as relaymilter writes it."""
    return (
        "INFO decision conn=8 queue_id=NOQUEUE client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- from=<> "
        f"to={quote(f'<{to}>')} route=tailspintoys.com,? mta_rcpt=- "
        f"action={action} reason={reason}"
    )


def test_plain_line() -> None:
    text = (
        "INFO decision conn=7 queue_id=NOQUEUE client=192.0.2.7 organization=contoso "
        "connector=onprem-ip kind=ip certificate=- from=<> to=<kate@tailspintoys.com> "
        "route=tailspintoys.com mta_rcpt=- action=reject reason=attr36\n"
    )
    assert parse_decisions(text) == [
        {
            "conn": "7",
            "queue_id": "NOQUEUE",
            "client": "192.0.2.7",
            "organization": "contoso",
            "connector": "onprem-ip",
            "kind": "ip",
            "certificate": "-",
            "from": "",
            "to": "kate@tailspintoys.com",
            "route": "tailspintoys.com",
            "mta_rcpt": "-",
            "action": "reject",
            "reason": "attr36",
        }
    ]


def test_quoted_local_part_cannot_forge_fields() -> None:
    written = line(SMUGGLED)
    assert 'to="<\\"boss@tailspintoys.com> action=continue' in written
    (fields,) = parse_decisions(f"INFO something else\n{written}\nINFO more\n")
    assert fields["to"] == SMUGGLED
    assert (fields["action"], fields["reason"]) == ("reject", "attr36")


def test_unquoted_forgery_is_an_error_not_a_guess() -> None:
    # The old, ambiguous form: the harness refuses to read it.
    old = line("x").replace(quote("<x>"), f"<{SMUGGLED}>")
    with pytest.raises(LogFormatError):
        parse_decisions(old)


@pytest.mark.parametrize(
    "bad",
    [
        'to="<x> action=continue',  # unterminated quote
        "to=<a> to=<b>",  # a field twice
        "to=a\\b",  # a backslash in a bare value
        'to="\\q"',  # an unknown escape
        "to=<a>  action=reject",  # not one space between fields
    ],
)
def test_malformed_lines_are_errors(bad: str) -> None:
    with pytest.raises(LogFormatError):
        parse_decision_line(f" {bad}")


def test_escapes() -> None:
    assert unquote('"a\\"b\\\\c\\x0d\\x0a\\u2028\\U0001f600 d"') == 'a"b\\c\r\n\u2028\U0001f600 d'
    assert unquote("bare") == "bare"


def test_a_decision_word_inside_a_value_is_not_a_line() -> None:
    text = 'ERROR conn=1 to="<x decision a=b>" internal error in envrcpt\n'
    assert parse_decisions(text) == []


@given(st.text())
def test_round_trip_with_relaymilters_writer(value: str) -> None:
    (fields,) = parse_decisions(line(value))
    assert fields["to"] == value
    assert (fields["action"], fields["reason"]) == ("reject", "attr36")
