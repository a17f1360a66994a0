#!/usr/bin/env python3
"""CPU of relaymilter's Python work per recipient, without an MTA or libmilter.

Drives ``RelayMilter.envfrom`` and ``envrcpt`` directly, with a stand-in for
pymilter's context that answers the macros, through the real policy, the real
decision record and the real stderr logging (to /dev/null). One message: a
foreign sender from an IP connector's address and five recipients (two
internal, three refused), as in the throughput benchmark's W3.

Usage: benchmarks/rcpt_path.py [--recipients 100000] [CHECKOUT ...]
Each CHECKOUT (default: this one) is measured in a fresh interpreter, in turn,
twice; e.g. ``benchmarks/rcpt_path.py /tmp/before .`` for before/after figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

REPO = Path(__file__).resolve().parent.parent
RECIPIENTS = [
    "<kate@contoso.com>",
    "<a@contoso.com>",
    "<x@tailspintoys.com>",
    "<y@fabrikam.com>",
    "<z@example.net>",
]


class Context:
    """What pymilter's context gives a callback: the macros, and setreply."""

    def __init__(self) -> None:
        self.macros: Dict[str, str] = {"{client_addr}": "192.0.2.7", "i": "4XyZ1"}

    def getsymval(self, name: str) -> Optional[str]:
        return self.macros.get(name)

    def setreply(self, *args: str) -> None:
        pass


def measure(checkout: Path, count: int) -> float:
    sys.path.insert(0, str(checkout))
    from relaymilter.config import load_config

    config = load_config(str(checkout / "etc" / "relaymilter.yml"))
    try:  # the front ends in packages of their own (issue 18)
        from relaymilter.daemon.runtime import Runtime
        from relaymilter.decisionlog.journal import configure_logging
        from relaymilter.milterd.milter import RelayMilter

        RelayMilter.runtime = Runtime(config)
    except ImportError:
        try:  # the layered packages (issue 15)
            from relaymilter.daemon.milter import RelayMilter  # type: ignore[no-redef]

            from relaymilter.decisionlog.journal import configure_logging
        except ImportError:  # a checkout from before them
            from relaymilter.journal import configure_logging  # type: ignore[no-redef]
            from relaymilter.milter import RelayMilter  # type: ignore[no-redef]
        RelayMilter.current_config = config

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the handler writes here
    configure_logging(logging.INFO)
    start = time.process_time()
    for _ in range(count // len(RECIPIENTS)):
        milter = RelayMilter()
        milter._ctx = Context()
        milter._protocol = milter._actions = 0
        milter.envfrom("<john@fabrikam.com>")
        for rcpt in RECIPIENTS:
            milter.envrcpt(rcpt)
    return (time.process_time() - start) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100000)
    parser.add_argument("--one", metavar="CHECKOUT", help=argparse.SUPPRESS)
    parser.add_argument("checkouts", nargs="*", default=[str(REPO)])
    args = parser.parse_args()
    if args.one:
        print(f"{measure(Path(args.one).resolve(), args.recipients):.1f}")
        return 0
    for _ in range(2):
        for checkout in args.checkouts:
            result = subprocess.run(
                [sys.executable, __file__, "--recipients", str(args.recipients), "--one", checkout],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"{checkout}: {result.stdout.strip()} us CPU per recipient")
    return 0


if __name__ == "__main__":
    sys.exit(main())
