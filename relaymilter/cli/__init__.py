"""The ``relaymilter`` command: run, check-config, explain, inspect-cert."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

from . import __version__
from .certfiles import CertificateFile, CertificateFileError, load_certificates
from .certnames import normalize_certificate_name
from .config import ConfigError, load_config
from .domains import parent_domains
from .journal import configure_logging, stderr_is_journal
from .model import DEFAULT_CONFIG_PATH, Config
from .networks import parse_client_address
from .policy import Decision, Transaction
from .tlsidentity import certificate_from_mapping

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
_TIME = "%Y-%m-%d %H:%M:%S"


def default_config_path() -> str:
    return os.environ.get("RELAYMILTER_CONFIG") or DEFAULT_CONFIG_PATH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relaymilter",
        description="Relay-policy milter: Exchange Online's ATTR36 rule for Postfix and Sendmail.",
    )
    parser.add_argument("--version", action="version", version=f"relaymilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            default=None,
            metavar="FILE",
            help=f"config file (default: $RELAYMILTER_CONFIG or {DEFAULT_CONFIG_PATH})",
        )

    run = sub.add_parser("run", help="run the milter in the foreground")
    config_option(run)
    run.add_argument("--socket", metavar="SPEC", help="listen here instead of the config's socket")

    check = sub.add_parser("check-config", help="validate the config file")
    config_option(check)

    explain = sub.add_parser("explain", help="show the decision the milter would make")
    config_option(explain)
    explain.add_argument("--client-address", required=True, metavar="IP")
    explain.add_argument("--cert-subject", metavar="S", help="Postfix: subject CN; Sendmail: DN")
    explain.add_argument("--cert-issuer", metavar="S", help="Postfix: issuer CN; Sendmail: DN")
    explain.add_argument("--verify", metavar="V", help="Sendmail's {verify}, e.g. OK")
    explain.add_argument("--cert-fingerprint", metavar="FP", help="Sendmail's {cert_fp}/{cert_md5}")
    explain.add_argument("--cn-subject", metavar="S", help="Sendmail's {cn_subject}")
    explain.add_argument("--cn-issuer", metavar="S", help="Sendmail's {cn_issuer}")
    explain.add_argument(
        "--mail-from", required=True, metavar="ADDR", help="'' or '<>' is the null sender"
    )
    explain.add_argument("--rcpt", required=True, action="append", metavar="ADDR")
    explain.add_argument(
        "--rcpt-addr",
        action="append",
        metavar="ADDR",
        help="the MTA's {rcpt_addr} for each --rcpt, in the same order (as the log's mta_rcpt)",
    )
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    inspect = sub.add_parser("inspect-cert", help="show what relaymilter sees in certificate files")
    config_option(inspect)
    inspect.add_argument("certificates", nargs="+", metavar="CERT.pem")

    report = sub.add_parser("report", help="what enforcing would break, from the decision log")
    _log_source_options(report)
    report.add_argument(
        "-c",
        "--config",
        default=None,
        metavar="FILE",
        help="the config in force, to make remedies concrete (default: as run, if it exists)",
    )
    report.add_argument("--all", action="store_true", help="also list the flows that pass")
    formats = report.add_mutually_exclusive_group()
    for name in ("json", "csv", "html"):
        formats.add_argument(f"--{name}", action="store_true", help=f"{name.upper()} output")

    sync = sub.add_parser(
        "sync", help="fetch the organizations from the config's sources into the snapshot"
    )
    config_option(sync)
    modes = sync.add_mutually_exclusive_group()
    modes.add_argument(
        "--dry-run", action="store_true", help="fetch and validate, show what would change"
    )
    modes.add_argument(
        "--status", action="store_true", help="each source's last success and error, the age"
    )
    sync.add_argument(
        "--force",
        action="store_true",
        help="take a result that removes more than max_removed_domains, or an empty one",
    )
    sync.add_argument("--json", action="store_true", help="with --status: the status as JSON")

    replay = sub.add_parser("replay", help="decide the logged recipients again under a config")
    _log_source_options(replay)
    replay.add_argument(
        "-c", "--config", required=True, metavar="CANDIDATE.yml", help="the candidate config"
    )
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _log_source_options(p: argparse.ArgumentParser) -> None:
    """report and replay: where the decision records come from, and which."""
    # "--since -7d", as journalctl takes it: argparse reads an argument that starts
    # with "-" as an option unless it looks like a negative number, "-7d" included.
    p._negative_number_matcher = re.compile(r"^-\d")
    p.add_argument(
        "--journal",
        action="store_true",
        help="read the system journal (the default when no other source is given)",
    )
    p.add_argument("--journal-dir", action="append", metavar="DIR", help="a journal directory")
    p.add_argument("--journal-file", action="append", metavar="FILE", help="a journal file")
    p.add_argument("--log", action="append", metavar="FILE", help="a log file (plain, syslog, .gz)")
    p.add_argument("--since", metavar="TIME", help="journalctl's formats: '2026-11-23', '-7d'")
    p.add_argument("--until", metavar="TIME", help="journalctl's formats")
    p.add_argument(
        "--cursor-file",
        metavar="FILE",
        help="start after the position saved here, and save the new one (incremental runs)",
    )
    p.add_argument(
        "--top", type=int, default=20, metavar="N", help="list N groups, then 'other' (0: all)"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.config or default_config_path()
    if args.command == "run":
        configure_logging(logging.INFO)
        from .daemon import run  # pymilter is needed only here

        return run(path, args.socket)
    if args.command == "check-config":
        return check_config(path)
    if args.command == "explain":
        return explain(path, args)
    if args.command == "report":
        from .report import main as report_main

        return report_main(args, path if args.config or os.path.exists(path) else None)
    if args.command == "sync":
        from . import sync

        if args.status:
            return sync.show_status(path, args.json, sys.stdout, sys.stderr)
        return sync.run(path, args.dry_run, args.force, sys.stdout, sys.stderr)
    if args.command == "replay":
        from .replay import main as replay_main

        return replay_main(args, path)
    return inspect_certificates(
        path if args.config or os.path.exists(path) else None, args.certificates
    )


# sd-daemon(3) priority prefixes: on a journal stream (systemd's default
# SyslogLevelPrefix=yes) they set each line's priority, so the reasons for a
# refused "systemctl reload" show in "journalctl -p warning", not at info.
_ERR_PREFIX = "<3>"
_WARNING_PREFIX = "<4>"


def _load_or_report(path: str) -> Optional[Config]:
    try:
        return load_config(path)
    except ConfigError as exc:
        prefix = _ERR_PREFIX if stderr_is_journal() else ""
        print(f"{prefix}relaymilter: {len(exc.issues)} error(s) in {path}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"{prefix}  {issue}", file=sys.stderr)
        return None


def check_config(path: str) -> int:
    gc.disable()  # see relaymilter.sync.run: a large config loads three times faster
    config = _load_or_report(path)
    if config is None:
        return EXIT_ERROR
    print(f"{path}: OK: {config.summary()}")
    if config.sources is not None:
        from .syncstatus import load_status, status_line

        sources = ", ".join(f"{s.kind} {s.name!r}" for s in config.sources.sources)
        state = status_line(config.sources, load_status(config.sources.status))
        print(f"sources: {sources}: {state}")
    journal = stderr_is_journal()
    for warning in config.warnings:
        if journal:
            print(f"{_WARNING_PREFIX}warning: {warning}", file=sys.stderr)
        else:
            print(f"warning: {warning}")
    return EXIT_OK


def explain(path: str, args: argparse.Namespace) -> int:
    resolved: List[Optional[str]] = list(args.rcpt_addr or [None] * len(args.rcpt))
    if len(resolved) != len(args.rcpt):
        print("relaymilter: give --rcpt-addr once for each --rcpt, or not at all", file=sys.stderr)
        return EXIT_USAGE
    config = _load_or_report(path)
    if config is None:
        return EXIT_ERROR
    address = parse_client_address(args.client_address)
    if address is None:
        print(f"relaymilter: {args.client_address!r} is not an IP address", file=sys.stderr)
        return EXIT_USAGE
    macros = {
        "{cert_subject}": args.cert_subject,
        "{cert_issuer}": args.cert_issuer,
        "{verify}": args.verify,
        "{cert_fp}": args.cert_fingerprint,
        "{cn_subject}": args.cn_subject,
        "{cn_issuer}": args.cn_issuer,
    }
    transaction = Transaction(config, address, certificate_from_mapping(macros), args.mail_from)
    decisions = [transaction.decide(rcpt, mta) for rcpt, mta in zip(args.rcpt, resolved)]
    if args.json:
        print(json.dumps(_explanation(config, transaction, decisions), indent=2))
        return EXIT_OK
    for line in _explain_lines(transaction, decisions):
        print(line)
    return EXIT_OK


def _explanation(
    config: Config, transaction: Transaction, decisions: List[Decision]
) -> Dict[str, Any]:
    """explain --json: the decisions exactly as the milter makes and logs them."""
    attribution = transaction.attribution
    return {
        "attribution": {
            "organization": attribution.organization.name if attribution else None,
            "connector": attribution.connector_name if attribution else None,
            "kind": attribution.kind if attribution else None,
        },
        "mode": config.mode,
        "recipients": [
            {
                "recipient": d.recipient,
                "action": d.action,
                "reason": d.reason,
                "route": [hop for hop in d.route.hops],
                "mta_rcpt": d.resolved,
                "reply": str(d.reply) if d.reply is not None else None,
            }
            for d in decisions
        ],
    }


def _explain_lines(transaction: Transaction, decisions: List[Decision]) -> List[str]:
    attribution = transaction.attribution
    if attribution is None:
        lines = ["attribution: none (relaymilter does not interfere; the MTA's own rules decide)"]
    else:
        how = (
            f"certificate name {attribution.certificate_name}"
            if attribution.certificate_name
            else "client address"
        )
        lines = [
            f"attribution: organization {attribution.organization.name}, connector "
            f"{attribution.connector_name} ({attribution.kind}, by {how})"
        ]
    for decision in decisions:
        reply = f": {decision.reply}" if decision.reply is not None else ""
        lines.append(f"<{decision.recipient}>: {decision.action} ({decision.reason}){reply}")
        if not decision.route.is_simple or decision.resolved is not None:
            lines.append(f"  routes through: {decision.route.describe()}")
    return lines


def inspect_certificates(path: Optional[str], files: List[str]) -> int:
    config = _load_or_report(path) if path else None
    if path and config is None:
        return EXIT_ERROR
    status = EXIT_OK
    for name in files:
        try:
            bundle = load_certificates(name)
        except CertificateFileError as exc:
            print(f"relaymilter: {exc}", file=sys.stderr)
            status = EXIT_ERROR
            continue
        for number, cert in enumerate(bundle.leaves, 1):
            if len(bundle.leaves) > 1:
                print(f"{cert.path}: certificate {number} of {len(bundle.leaves)}")
            for line in describe(cert, config):
                print(line)
        for authority in bundle.authorities:
            print(f"{bundle.path}: CA certificate {authority.subject} (ignored: not a client's)")
    return status


def describe(cert: CertificateFile, config: Optional[Config]) -> List[str]:
    lines = [
        f"{cert.path}:",
        f"  subject:     {cert.subject}",
        f"  issuer:      {cert.issuer}",
        f"  subject CN:  {cert.subject_cn or '-'}",
        f"  issuer CN:   {cert.issuer_cn or '-'}",
        f"  DNS SANs:    {', '.join(cert.dns_names) or '-'}",
        f"  valid:       {cert.not_before:{_TIME}} to {cert.not_after:{_TIME}} UTC",
        f"  SHA-256:     {cert.sha256}",
    ]
    warnings = []
    problem = cert.validity_problem()
    if problem:
        warnings.append(f"the certificate is {problem}")
    if cert.self_signed:
        warnings.append(
            "self-signed: MTAs do not pass untrusted certificates on, so it never attributes"
        )
    if cert.dns_names:
        warnings.append(
            "MTAs pass only the subject CN to milters: list this file under a connector's "
            "certificates: for its SANs to count"
        )
    if config is not None:
        lines.extend(_connector_matches(cert, config, warnings))
    lines.extend(f"  warning: {w}" for w in warnings)
    return lines


def _connector_matches(cert: CertificateFile, config: Config, warnings: List[str]) -> List[str]:
    lines = []
    for raw in (cert.subject_cn, *cert.dns_names):
        name = normalize_certificate_name(raw)
        if name is None:
            continue
        matches = [
            f"{ref.organization.name}/{ref.connector.name}"
            + (
                ""
                if ref.connector.admits_issuer(cert.issuer_cn)
                else " (but its trusted_issuers exclude this issuer)"
            )
            for _, ref in config.certificate_connectors.lookup(name)
        ]
        lines.append(
            f"  name {name}: " + (", ".join(matches) if matches else "matches no connector")
        )
        if not matches:
            warnings.extend(_registration_hint(name, config))
    return lines


def _registration_hint(name: str, config: Config) -> List[str]:
    """The seed's note: mail.contoso.com is rarely registered; *.contoso.com is the fix."""
    bare = name[2:] if name.startswith("*.") else name
    for organization in config.organizations:
        for parent in parent_domains(bare):
            if organization.accepts(parent):
                return [
                    f"{name} is not registered with any organization; a connector "
                    f"tls_sender_certificate_name: '*.{parent}' in organization "
                    f"{organization.name!r} would match it ({parent} is registered)"
                ]
    return [f"{name} is under no accepted domain of any organization"]
