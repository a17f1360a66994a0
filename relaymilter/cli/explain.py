"""``relaymilter explain``: the decision the milter would make, without an MTA."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from ..core.model import Config
from ..core.networks import parse_client_address
from ..core.policy import Decision, Transaction
from ..core.tlsidentity import certificate_from_mapping
from .common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, config_option, config_path, load_or_report

NAME = "explain"
HELP = "show the decision the milter would make"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument("--client-address", required=True, metavar="IP")
    parser.add_argument("--cert-subject", metavar="S", help="Postfix: subject CN; Sendmail: DN")
    parser.add_argument("--cert-issuer", metavar="S", help="Postfix: issuer CN; Sendmail: DN")
    parser.add_argument("--verify", metavar="V", help="Sendmail's {verify}, e.g. OK")
    parser.add_argument("--cert-fingerprint", metavar="FP", help="Sendmail's {cert_fp}/{cert_md5}")
    parser.add_argument("--cn-subject", metavar="S", help="Sendmail's {cn_subject}")
    parser.add_argument("--cn-issuer", metavar="S", help="Sendmail's {cn_issuer}")
    parser.add_argument(
        "--mail-from", required=True, metavar="ADDR", help="'' or '<>' is the null sender"
    )
    parser.add_argument("--rcpt", required=True, action="append", metavar="ADDR")
    parser.add_argument(
        "--rcpt-addr",
        action="append",
        metavar="ADDR",
        help="the MTA's {rcpt_addr} for each --rcpt, in the same order (as the log's mta_rcpt)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    resolved: List[Optional[str]] = list(args.rcpt_addr or [None] * len(args.rcpt))
    if len(resolved) != len(args.rcpt):
        print("relaymilter: give --rcpt-addr once for each --rcpt, or not at all", file=sys.stderr)
        return EXIT_USAGE
    config = load_or_report(config_path(args))
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
        print(json.dumps(explanation(config, transaction, decisions), indent=2))
        return EXIT_OK
    for line in explanation_lines(transaction, decisions):
        print(line)
    return EXIT_OK


def explanation(
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


def explanation_lines(transaction: Transaction, decisions: List[Decision]) -> List[str]:
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
