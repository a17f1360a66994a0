#!/usr/bin/env python3
"""Sync at scale, and what a reload of a large snapshot costs the milter's answers.

Parts (each needs only what it says):

* ``postgresql``: ORGS organizations with DOMAINS accepted domains and one IP
  connector each, in a throwaway PostgreSQL (the example schema,
  etc/relaymilter/postgresql-schema.sql), synced by ``relaymilter sync``.
* ``ldap``: ENTRIES msExchAcceptedDomain objects in a throwaway slapd with the
  AD-like schema, synced with the Active Directory preset.
* ``files``: the same organizations as YAML fragments (no server).
* ``reload``: a daemon on the ``files`` snapshot answers RCPT TO on a
  persistent milter connection in a loop while a sync adds one domain and the
  daemon reloads the snapshot; it reports every answer's latency before and
  during the reload, and counts failed answers.

Each sync is timed as a whole (the ``relaymilter sync`` process, wall clock)
and by phase: fetch (from the status file), then validate and write (the rest).

Usage:
  benchmarks/sync_scale.py                       # all parts, 10,000 organizations
  benchmarks/sync_scale.py --parts files,reload --orgs 10000 --domains 100000
  benchmarks/sync_scale.py --smoke --json out.json   # tiny, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import (  # noqa: E402
    ATTR36,
    MilterSession,
    relaymilter_command,
    running_daemon,
)

CONFIG_HEAD = """\
socket: inet:8894@127.0.0.1
sources:
  status: status.json
  max_removed_domains: 100%
"""


def spread(orgs: int, domains: int) -> List[List[str]]:
    """``domains`` accepted domains over ``orgs`` organizations: org{i}.example first."""
    per_org: List[List[str]] = [[f"org{i}.example"] for i in range(orgs)]
    for number in range(max(0, domains - orgs)):
        per_org[number % orgs].append(f"d{number}.org{number % orgs}.example")
    return per_org


def connector_network(org: int) -> str:
    return f"10.{org // 256 % 256}.{org % 256}.0/24"


def write_fragment(directory: Path, orgs: int, domains: int, extra: str = "") -> None:
    lines = ["organizations:"]
    for org, names in enumerate(spread(orgs, domains)):
        lines.append(f"  - name: org{org}")
        lines.append("    accepted_domains: [" + ", ".join(names) + "]")
        lines.append(
            f"    connectors: [{{name: ip, sender_ip_addresses: ['{connector_network(org)}']}}]"
        )
    if extra:
        lines.append(f"  - {{name: extra, accepted_domains: [{extra}], connectors: []}}")
    (directory / "tenants.yml").write_text("\n".join(lines) + "\n")


def run_sync(config: Path) -> Dict[str, Any]:
    started = time.perf_counter()
    result = subprocess.run(
        [*relaymilter_command(), "sync", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"sync failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    status = json.loads((config.parent / "status.json").read_text())
    fetch = sum(s.get("seconds", 0.0) for s in status["sources"].values())
    snapshot = config.parent / f"{config.stem}.snapshot.yml"
    return {
        "wall_s": round(wall, 2),
        "fetch_s": round(fetch, 2),
        "validate_and_write_s": round(wall - fetch, 2),
        "records": sum(s.get("records", 0) for s in status["sources"].values()),
        "domains": sum(s.get("domains", 0) for s in status["sources"].values()),
        "snapshot_mib": round(snapshot.stat().st_size / 2**20, 1),
    }


# -- parts -----------------------------------------------------------------------


def part_files(work: Path, orgs: int, domains: int) -> Dict[str, Any]:
    (work / "organizations.d").mkdir(exist_ok=True)
    write_fragment(work / "organizations.d", orgs, domains)
    config = work / "relaymilter.yml"
    config.write_text(CONFIG_HEAD + "  files: [{name: tenants, directory: organizations.d}]\n")
    first = run_sync(config)
    again = run_sync(config)  # unchanged: fetch, validate, refresh
    return {"first": first, "unchanged": again}


def part_postgresql(work: Path, orgs: int, domains: int) -> Dict[str, Any]:
    from tests.pgserver import PostgresServer  # the tests' throwaway server

    with PostgresServer() as server:
        # One IP and one certificate connector per organization, as the tests load them.
        server.load_organizations(orgs, max(1, domains // orgs))
        domains_query, connectors_query = server.example_queries()
        source = {
            "name": "tenants",
            "conninfo": server.conninfo(),
            "password_file": str(server.password_file),
            "accepted_domains_query": domains_query,
            "connectors_query": connectors_query,
        }
        config = work / "pg.yml"
        config.write_text(CONFIG_HEAD + f"  postgresql: [{json.dumps(source)}]\n")
        first = run_sync(config)
        again = run_sync(config)
    return {"first": first, "unchanged": again}


def part_ldap(work: Path, entries: int) -> Dict[str, Any]:
    from tests.ldapserver import ActiveDirectoryLikeServer

    with ActiveDirectoryLikeServer() as server:
        server.add_accepted_domains([f"d{n}.contoso.com" for n in range(entries)])
        config = work / "ldap.yml"
        config.write_text(CONFIG_HEAD + server.source_yaml("ad", organization="Contoso"))
        first = run_sync(config)
        again = run_sync(config)
    return {"first": first, "unchanged": again}


def part_reload(work: Path, orgs: int, domains: int) -> Dict[str, Any]:
    """Answers' latency before and during the reload of a large snapshot, on one connection."""
    config = work / "relaymilter.yml"
    # A unix socket: the test client writes a macro packet and the command
    # apart, which over TCP meets Nagle's algorithm (Postfix writes them at once).
    spec = f"unix:{work}/relaymilter.sock"
    latencies: List[Tuple[float, float]] = []  # (when, seconds)
    failures: List[str] = []
    stop = threading.Event()

    with running_daemon(config, spec, work / "daemon.log") as daemon:

        def ask() -> None:
            session = MilterSession(spec)
            session.negotiate()
            session.connect("10.0.0.7")  # org0's connector
            session.mail("<>")
            while not stop.is_set():
                started = time.perf_counter()
                reply = session.rcpt("<a@outside.example>")
                latencies.append((started, time.perf_counter() - started))
                if reply != "550 " + ATTR36:
                    failures.append(reply)
            session.close()

        client = threading.Thread(target=ask)
        client.start()
        time.sleep(2.0)  # a baseline of answers before the reload
        # The new snapshot is made aside, then renamed over the one in use (as
        # sync does): the window measured holds the daemon's reload alone,
        # not a sync process competing for the CPUs.
        staging = work / "staging"
        shutil.copytree(work / "organizations.d", staging / "organizations.d")
        shutil.copy(config, staging / config.name)
        write_fragment(staging / "organizations.d", orgs, domains, extra="new.example")
        sync = run_sync(staging / config.name)
        snapshot = f"{config.stem}.snapshot.yml"
        mark = len(daemon.log())
        reload_from = time.perf_counter()
        os.replace(staging / snapshot, work / snapshot)
        daemon.wait_for_log("reload: loaded", after=mark, deadline=600)
        reloaded_at = time.perf_counter()
        time.sleep(1.0)
        stop.set()
        client.join()
    before = [s for when, s in latencies if when < reload_from]
    during = [s for when, s in latencies if reload_from <= when <= reloaded_at]
    return {
        "sync": sync,
        "replaced_to_reloaded_s": round(reloaded_at - reload_from, 2),
        "answers_before": len(before),
        "answers_during": len(during),
        "failed_answers": len(failures),
        "before_ms": _summary(before),
        "during_ms": _summary(during),
    }


def _summary(values: List[float]) -> Dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered) * 1000, 3),
        "p99": round(ordered[int(len(ordered) * 0.99) - 1 if len(ordered) > 1 else 0] * 1000, 3),
        "max": round(ordered[-1] * 1000, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="files,reload,postgresql,ldap")
    parser.add_argument("--orgs", type=int, default=10_000)
    parser.add_argument("--domains", type=int, default=100_000)
    parser.add_argument("--ldap-entries", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.smoke:
        args.orgs, args.domains, args.ldap_entries = 20, 60, 30
    parts = args.parts.split(",")
    figures: Dict[str, Any] = {"orgs": args.orgs, "domains": args.domains}
    with tempfile.TemporaryDirectory(prefix="relaymilter-sync-bench-") as tmp:
        work = Path(tmp)
        runners: Dict[str, Callable[[], Dict[str, Any]]] = {
            "files": lambda: part_files(work, args.orgs, args.domains),
            "reload": lambda: part_reload(work, args.orgs, args.domains),
            "postgresql": lambda: part_postgresql(work, args.orgs, args.domains),
            "ldap": lambda: part_ldap(work, args.ldap_entries),
        }
        if "reload" in parts and "files" not in parts:
            parts.insert(0, "files")
        for part in parts:
            figures[part] = runners[part]()
            print(f"{part}: {json.dumps(figures[part])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
