"""Tiny runs of the benchmark scripts, so that they cannot rot (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .support import REPO


def test_scale_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "scale.py"),
            "--smoke",
            "--daemon-rss",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert [(r["domains"], r["connectors"]) for r in figures["scale"]] == [(10, 10), (200, 50)]
    assert all(r["samples"] == 200 and r["p99_us"] > 0 for r in figures["scale"])
    assert figures["daemon"][0]["rss_mib"] > 0
    assert "p99 us" in result.stdout


def test_throughput_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    listeners = {"baseline", "relay-unix", "relay-inet", "naive-unix", "floor-unix"}
    listeners |= {"policy-unix", "floor-policy-unix"}
    listeners |= {"sendmail-baseline", "sendmail-relay-unix", "sendmail-relay-inet"}
    assert {(r["workload"], r["listener"]) for r in figures["runs"]} == {
        (w, listener) for w in ("W1", "W2", "W3") for listener in listeners
    }
    assert all(r["messages"] == 20 and r["rate"] > 0 for r in figures["runs"])
    assert set(figures["summary"]["peak_rss_mib"]) == listeners - {
        "baseline",
        "sendmail-baseline",
    }
    assert figures["summary"]["W1"]["sendmail-baseline"]["ratio"]["median"] == 1.0
    # policy-unix's recipients all went through the policy service: one decision line each
    # (W1 and W2 one a message, W3 five).
    assert figures["summary"]["policy_decisions"] == {"judged": 20 + 20 + 100, "logged": 140}
    # Postfix's CPU is read for its listeners only.
    postfix_runs = [r for r in figures["runs"] if not r["listener"].startswith("sendmail-")]
    assert all(r["postfix_cpu"] is not None for r in postfix_runs)
    assert all(r["postfix_cpu"] is None for r in figures["runs"] if r not in postfix_runs)


def test_latency_benchmark_smoke() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "latency.py"), "--messages", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:]]
    assert rows == [
        "baseline",
        "relay-unix",
        "relay-inet",
        "policy-unix",
        "floor-policy-unix",
        "sendmail-baseline",
        "sendmail-relay-unix",
        "sendmail-relay-inet",
    ]


def test_sync_scale_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "sync.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sync_scale.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["files"]["first"]["domains"] == 60
    assert figures["postgresql"]["first"]["domains"] == 60
    assert figures["ldap"]["first"]["domains"] == 30
    assert figures["reload"]["failed_answers"] == 0 and figures["reload"]["answers_during"] > 0


@pytest.mark.parametrize("front", ["milter", "policy"])
def test_rcpt_path_benchmark_smoke(front: str) -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "rcpt_path.py"), "--recipients", "100"]
    result = subprocess.run(
        [*command, "--front", front], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(f"({front}):" in line for line in lines), lines
    profile = subprocess.run(
        [*command, "--front", front, "--profile"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert profile.returncode == 0 and "function calls" in profile.stdout, profile.stderr
