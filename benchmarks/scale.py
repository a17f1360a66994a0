#!/usr/bin/env python3
"""Scale benchmark of relaymilter's policy core (no MTA, no milter protocol).

For each size (accepted domains x connectors) it writes a generated config, and
in a fresh interpreter measures: load time (YAML to validated model), resident
memory after loading, and the latency of one decision (attribution of a
transaction plus the verdict on one recipient) over a random sample of clients
(IPv4, IPv6, IPv4-mapped, with and without certificates), senders and recipients:
p50 and p99. With --daemon-rss it also starts ``relaymilter run`` on the largest
config and reads the daemon's RSS from /proc.

Usage:
  benchmarks/scale.py                      # the full matrix (about a minute)
  benchmarks/scale.py --smoke              # tiny sizes, for the test suite
  benchmarks/scale.py --sizes 100000x10000 --samples 50000 --daemon-rss --json out.json
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import stop_promptly  # noqa: E402

FULL_SIZES = [(d, c) for d in (10, 1_000, 100_000) for c in (10, 1_000, 10_000)]
SMOKE_SIZES = [(10, 10), (200, 50)]


def organizations_for(connectors: int) -> int:
    return max(1, connectors // 100)


def generate_config(domains: int, connectors: int, seed: int = 1) -> str:
    """A config with ``domains`` accepted domains and ``connectors`` connectors.

    Connectors are 60% IPv4 networks (/16 to /32), 20% IPv6 networks (/32 to /64)
    and 20% certificate names (``*.hostsN.orgK.example``), spread over organizations.
    """
    rng = random.Random(seed)
    orgs = organizations_for(connectors)
    lines = ["organizations:"]
    for org in range(orgs):
        lines += [f"  - name: org{org}", "    accepted_domains:"]
        lines.append(f"      - {{domain: org{org}.example, match_subdomains: true}}")
        share = range(org, domains - orgs, orgs) if domains > orgs else range(0)
        lines += [f"      - d{i}.org{org}.example" for i in share]
        lines.append("    connectors:")
        for number in range(org, connectors, orgs):
            kind = number % 5
            if kind < 3:
                prefix = rng.randint(16, 32)
                net = ipaddress.IPv4Network((rng.getrandbits(32), prefix), strict=False)
                lines.append(f"      - {{name: c{number}, sender_ip_addresses: [{net}]}}")
            elif kind == 3:
                prefix = rng.randint(32, 64)
                net = ipaddress.IPv6Network((rng.getrandbits(128), prefix), strict=False)
                lines.append(f"      - {{name: c{number}, sender_ip_addresses: ['{net}']}}")
            else:
                pattern = f"*.hosts{number}.org{org}.example"
                lines.append(
                    f"      - {{name: c{number}, tls_sender_certificate_name: '{pattern}'}}"
                )
    return "\n".join(lines) + "\n"


def rss_kib() -> Tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def sample_inputs(config: Any, count: int, seed: int) -> List[Tuple[Any, Any, str, str]]:
    """(client address, presented certificate, MAIL FROM, RCPT TO) tuples."""
    from relaymilter.core.networks import parse_client_address
    from relaymilter.core.tlsidentity import certificate_from_mapping

    rng = random.Random(seed)
    networks = [
        n for o in config.organizations for c in o.connectors for n in c.sender_ip_addresses
    ]
    patterns = [
        c.certificate_pattern
        for o in config.organizations
        for c in o.connectors
        if c.certificate_pattern
    ]
    domains = [a.domain for o in config.organizations for a in o.accepted_domains]
    samples = []
    for _ in range(count):
        roll = rng.random()
        if networks and roll < 0.5:
            net = rng.choice(networks)
            address = net.network_address + rng.randrange(net.num_addresses)
            text = (
                f"::ffff:{address}" if address.version == 4 and rng.random() < 0.1 else str(address)
            )
        elif roll < 0.75:
            text = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        else:
            text = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        certificate = None
        if patterns and rng.random() < 0.2:
            name = f"mx{rng.randrange(9)}.{rng.choice(patterns).domain}"
            certificate = certificate_from_mapping(
                {"{cert_subject}": name, "{cert_issuer}": "Bench CA"}
            )
        sender = (
            f"<u@{rng.choice(domains)}>"
            if rng.random() < 0.5
            else rng.choice(["<>", "<u@else.example>"])
        )
        rcpt = f"<r@{rng.choice(domains)}>" if rng.random() < 0.3 else "<r@external.example>"
        samples.append((parse_client_address(text), certificate, sender, rcpt))
    return samples


def measure_one(domains: int, connectors: int, samples: int) -> Dict[str, Any]:
    """Runs in a fresh interpreter: load, memory, decision latency."""
    from relaymilter.config import load_config
    from relaymilter.core.policy import Transaction

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.yml"
        path.write_text(generate_config(domains, connectors))
        before, _ = rss_kib()
        start = time.perf_counter()
        config = load_config(str(path))
        load_seconds = time.perf_counter() - start
        after, peak = rss_kib()
    inputs = sample_inputs(config, samples, seed=domains + connectors)
    latencies = []
    rejected = 0
    clock = time.perf_counter_ns
    for address, certificate, sender, rcpt in inputs:
        start_ns = clock()
        decision = Transaction(config, address, certificate, sender).decide(rcpt)
        latencies.append(clock() - start_ns)
        rejected += decision.action == "reject"
    latencies.sort()
    return {
        "domains": domains,
        "connectors": connectors,
        "organizations": len(config.organizations),
        "load_seconds": round(load_seconds, 3),
        "config_rss_mib": round((after - before) / 1024, 1),
        "process_rss_mib": round(after / 1024, 1),
        "peak_rss_mib": round(peak / 1024, 1),
        "samples": len(latencies),
        "rejected": rejected,
        "p50_us": round(latencies[len(latencies) // 2] / 1000, 2),
        "p99_us": round(latencies[int(len(latencies) * 0.99)] / 1000, 2),
        "mean_us": round(statistics.fmean(latencies) / 1000, 2),
    }


def measure_in_subprocess(domains: int, connectors: int, samples: int) -> Dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        f"{domains}x{connectors}",
        "--samples",
        str(samples),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return dict(json.loads(result.stdout))


def daemon_rss(domains: int, connectors: int) -> Dict[str, Any]:
    """Start ``relaymilter run`` on the generated config; its RSS once it listens."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.yml"
        path.write_text(generate_config(domains, connectors))
        sock = Path(tmp) / "m.sock"
        start = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relaymilter",
                "run",
                "-c",
                str(path),
                "--socket",
                f"unix:{sock}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"relaymilter exited with {process.returncode}")
                try:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(str(sock))
                    break
                except OSError:
                    time.sleep(0.02)
            ready = time.perf_counter() - start
            status = Path(f"/proc/{process.pid}/status").read_text()
            values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            return {
                "domains": domains,
                "connectors": connectors,
                "ready_seconds": round(ready, 2),
                "rss_mib": round(int(values["VmRSS"].split()[0]) / 1024, 1),
                "peak_rss_mib": round(int(values["VmHWM"].split()[0]) / 1024, 1),
            }
        finally:
            process.terminate()
            stop_promptly(process, f"unix:{sock}")


def parse_size(text: str) -> Tuple[int, int]:
    domains, _, connectors = text.partition("x")
    return int(domains), int(connectors)


def report(rows: List[Dict[str, Any]], daemon: List[Dict[str, Any]]) -> str:
    header = (
        f"{'domains':>8} {'connectors':>10} {'orgs':>5} {'load s':>7} {'config MiB':>10} "
        f"{'RSS MiB':>8} {'p50 us':>7} {'p99 us':>7}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r['domains']:>8} {r['connectors']:>10} {r['organizations']:>5} "
            f"{r['load_seconds']:>7} {r['config_rss_mib']:>10} {r['process_rss_mib']:>8} "
            f"{r['p50_us']:>7} {r['p99_us']:>7}"
        )
    for d in daemon:
        lines.append(
            f"daemon with {d['domains']} domains x {d['connectors']} connectors: ready in "
            f"{d['ready_seconds']} s, RSS {d['rss_mib']} MiB (peak {d['peak_rss_mib']} MiB)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", type=parse_size, metavar="DOMAINSxCONNECTORS")
    parser.add_argument(
        "--samples", type=int, default=20_000, help="decisions timed per size (default 20000)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and samples (seconds)")
    parser.add_argument(
        "--daemon-rss", action="store_true", help="also measure the daemon on the largest size"
    )
    parser.add_argument("--json", metavar="FILE", help="write the raw figures here")
    parser.add_argument("--one", type=parse_size, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.samples)))
        return 0
    sizes = args.sizes or (SMOKE_SIZES if args.smoke else FULL_SIZES)
    samples = 200 if args.smoke else args.samples
    rows = [measure_in_subprocess(d, c, samples) for d, c in sizes]
    daemon = [daemon_rss(*max(sizes))] if args.daemon_rss else []
    print(report(rows, daemon))
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": rows, "daemon": daemon}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
