"""relaymilter with an injected fault: any recipient containing "boom" raises inside the policy.

The daemon (the milter's or the policy service's), libmilter and the socket
are the real ones; only Transaction.judge is wrapped, so the test sees what an
MTA would get from a genuine internal error.
"""

from __future__ import annotations

import sys

from relaymilter import cli
from relaymilter.core import policy

_judge = policy.Transaction.judge


def _faulty_judge(self: policy.Transaction, recipient: policy.Recipient) -> policy.Decision:
    if "boom" in recipient.address:
        raise RuntimeError("injected fault")
    return _judge(self, recipient)


policy.Transaction.judge = _faulty_judge  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
