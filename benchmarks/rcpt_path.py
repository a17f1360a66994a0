#!/usr/bin/env python3
"""CPU of relaymilter's Python work per recipient, without an MTA or libmilter.

Each front end through the real policy, the real decision record and the real
stderr logging (to /dev/null), for one message: a foreign sender from an IP
connector's address and five recipients (two internal, three refused), as in
the throughput benchmark's W3.

* ``milter``: ``RelayMilter.envfrom`` and ``envrcpt``, called directly, with a
  stand-in for pymilter's context that answers the macros;
* ``policy``: the policy service's connection (``PolicyConnection``) fed the
  bytes of Postfix 3.7's requests, one per recipient (every attribute Postfix
  sends, as tests/e2e/test_policy_service.py captured them), with a stand-in
  for the transport that keeps the replies: the reading and parsing of a
  request are in the figure, the socket's system calls are not.

Usage: benchmarks/rcpt_path.py [--recipients 100000] [--front milter|policy]
                               [--profile] [CHECKOUT ...]
Each CHECKOUT (default: this one) is measured in a fresh interpreter, in turn,
twice; e.g. ``benchmarks/rcpt_path.py /tmp/before .`` for before/after figures.
``--profile`` prints, instead, where one front end's time goes (cProfile,
this checkout, once).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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


#: A Postfix 3.7 policy request at RCPT TO, but for the recipient (its attributes in
#: Postfix's order; values as a TLS session without a client certificate gives them).
POSTFIX_REQUEST = """request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=192.0.2.7
client_name=unknown
client_port=40312
reverse_client_name=unknown
server_address=127.0.0.1
server_port=25
helo_name=app01.contoso.com
sender=john@fabrikam.com
recipient={recipient}
recipient_count=0
queue_id=
instance=2f1.6571d7a3.9e6b1.0
size=0
etrn_domain=
stress=
sasl_method=
sasl_username=
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=TLSv1.3
encryption_cipher=TLS_AES_256_GCM_SHA384
encryption_keysize=256
policy_context=
compatibility_level=3.6
mail_version=3.7.11

"""


class Transport(asyncio.Transport):
    """An asyncio transport that keeps what the policy connection writes."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: List[bytes] = []

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.replies.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection was closed: a request was not understood")


def front_end(checkout: Path, front: str) -> Callable[[int], None]:
    """A function that sends ``n`` messages of RECIPIENTS through ``front``, set up."""
    sys.path.insert(0, str(checkout))
    from relaymilter.config import load_config

    config = load_config(str(checkout / "etc" / "relaymilter.yml"))
    if front == "policy":
        return policy_front_end(config)
    return milter_front_end(config)


def policy_front_end(config: Any) -> Callable[[int], None]:
    from relaymilter.daemon.runtime import Runtime
    from relaymilter.decisionlog.journal import configure_logging
    from relaymilter.policyd.server import PolicyConnection, PolicyServer

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the handler writes here
    configure_logging(logging.INFO)
    server = PolicyServer(Runtime(config), asyncio.new_event_loop())
    connection = PolicyConnection(server)
    transport = Transport()
    connection.connection_made(transport)
    requests = [POSTFIX_REQUEST.format(recipient=rcpt.strip("<>")).encode() for rcpt in RECIPIENTS]

    def send(messages: int) -> None:
        for number in range(messages):
            instance = f"instance=2f1.6571d7a3.9e6b1.{number}".encode()
            for request in requests:
                connection.data_received(
                    request.replace(b"instance=2f1.6571d7a3.9e6b1.0", instance)
                )
        assert len(transport.replies) == messages * len(RECIPIENTS)
        transport.replies.clear()

    return send


def milter_front_end(config: Any) -> Callable[[int], None]:
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

    def send(messages: int) -> None:
        for _ in range(messages):
            milter = RelayMilter()
            milter._ctx = Context()
            milter._protocol = milter._actions = 0
            milter.envfrom("<john@fabrikam.com>")
            for rcpt in RECIPIENTS:
                milter.envrcpt(rcpt)

    return send


def profile(front: str, count: int) -> None:
    """Where ``front``'s time goes: cProfile's top functions by their own time."""
    import cProfile
    import pstats

    send = front_end(REPO, front)
    send(100)  # imports and caches out of the way
    profiler = cProfile.Profile()
    profiler.runcall(send, count // len(RECIPIENTS))
    out = sys.__stdout__
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)


def measure(checkout: Path, count: int, front: str) -> float:
    send = front_end(checkout, front)
    start = time.process_time()
    send(count // len(RECIPIENTS))
    return (time.process_time() - start) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100000)
    parser.add_argument("--front", choices=("milter", "policy"), default="milter")
    parser.add_argument("--profile", action="store_true", help="where the time goes, once")
    parser.add_argument("--one", metavar="CHECKOUT", help=argparse.SUPPRESS)
    parser.add_argument("checkouts", nargs="*", default=[str(REPO)])
    args = parser.parse_args()
    if args.profile:
        profile(args.front, args.recipients)
        return 0
    if args.one:
        print(f"{measure(Path(args.one).resolve(), args.recipients, args.front):.1f}")
        return 0
    for _ in range(2):
        for checkout in args.checkouts:
            command = [sys.executable, __file__, "--recipients", str(args.recipients)]
            command += ["--front", args.front, "--one", checkout]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            print(f"{checkout} ({args.front}): {result.stdout.strip()} us CPU per recipient")
    return 0


if __name__ == "__main__":
    sys.exit(main())
