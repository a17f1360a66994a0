"""scripts/demo (the README's Quick start on a real MTA) keeps working."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .milterproc import parse_decisions

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_demo_shows_an_allowed_and_two_refused_messages() -> None:
    if os.geteuid() != 0:
        pytest.skip("the demo runs a private Postfix and needs root")
    result = subprocess.run(
        [sys.executable, "-m", "tests.e2e.demo"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    replies = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("->")]
    assert replies == [
        "-> 250 2.1.5 Ok",
        "-> 550 5.7.64 Relay Access Denied ATTR36. For more details please refer to https://support.microsoft.com/kb/3169958.",
        "-> 550 5.7.64 Relay Access Denied ATTR36. For more details please refer to https://support.microsoft.com/kb/3169958.",
    ]
    bounce = {"from": "", "to": "kate@tailspintoys.com", "action": "reject", "reason": "attr36"}
    decisions = parse_decisions(result.stdout)
    assert any(bounce.items() <= d.items() for d in decisions), decisions
    assert "from=<app@contoso.com> to=['kate@tailspintoys.com']" in result.stdout
