"""relaymilter with an injected fault: any recipient containing "boom" raises inside the policy.

The daemon, libmilter and the socket are the real ones; only Transaction.decide is wrapped,
so the test sees what an MTA would get from a genuine internal error.
"""

from __future__ import annotations

import sys
from typing import Optional

from relaymilter import cli
from relaymilter.core import policy

_decide = policy.Transaction.decide


def _faulty_decide(
    self: policy.Transaction, rcpt_to: str, resolved: Optional[str] = None
) -> policy.Decision:
    if "boom" in rcpt_to:
        raise RuntimeError("injected fault")
    return _decide(self, rcpt_to, resolved)


policy.Transaction.decide = _faulty_decide  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
