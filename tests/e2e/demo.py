"""See relaymilter decide on a real MTA: ``scripts/demo``.

Starts a private Postfix 3.7 (with the shipped etc/postfix/main.cf.relaymilter),
a sink and relaymilter on the snippet's chrooted unix socket, then sends three
messages from 127.0.0.1, which the demo config attributes to "contoso" by IP:
one from an owned sender, a bounce (null sender) and a forwarded message. It
prints each RCPT TO reply as the client saw it, relaymilter's decision lines and
what reached the sink, then tears everything down. Nothing of the host's
Postfix is touched.
"""

from __future__ import annotations

import shutil
import smtplib
import sys
import tempfile
from pathlib import Path

from .configs import dump
from .milterproc import RelayMilterProcess
from .pki import build_pki
from .postfix import PostfixInstance
from .sink import Sink
from .util import read_from

CONFIG = {
    "organizations": [
        {
            "name": "contoso",
            "accepted_domains": ["contoso.com"],
            "connectors": [{"name": "onprem-ip", "sender_ip_addresses": ["127.0.0.1/32"]}],
        }
    ]
}
MESSAGES = [
    ("app@contoso.com", "kate@tailspintoys.com", "an owned sender"),
    ("", "kate@tailspintoys.com", "a bounce (null sender)"),
    ("john@fabrikam.com", "kate@tailspintoys.com", "forwarded mail from an outside sender"),
]


def send(port: int, sender: str, recipient: str) -> str:
    """The reply to RCPT TO, as the SMTP client sees it."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="demo.client.test", timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        code, text = smtp.rcpt(recipient)
        if code == 250:
            smtp.data(b"Subject: relaymilter demo\r\n\r\nhello\r\n")
        return f"{code} {text.decode()}"


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="relaymilter-demo-"))
    base.chmod(0o755)  # Postfix's daemons (user postfix) read files in here
    sink = Sink().start()
    postfix = PostfixInstance(base / "postfix", build_pki(base / "pki"), sink.port)
    milter = RelayMilterProcess("demo", base / "relaymilter", f"unix:{postfix.unix_milter_socket}")
    try:
        postfix.start()
        milter.ensure(CONFIG)
        print(f"relaymilter config:\n{dump(CONFIG)}")
        offset = milter.offset()
        for sender, recipient, what in MESSAGES:
            reply = send(postfix.ports.unix, sender, recipient)
            print(f"{what}: MAIL FROM:<{sender}> RCPT TO:<{recipient}>\n  -> {reply}")
        milter.wait_decisions(offset, len(MESSAGES))
        print("\nrelaymilter's log:")
        print(read_from(milter.log, offset).rstrip())
        print("\nreached the sink:")
        sink.wait("relaymilter demo")
        for message in sink.find("relaymilter demo"):
            print(f"  from=<{message.mail_from}> to={message.rcpts}")
    finally:
        milter.request_stop()
        milter.stop()
        postfix.stop()
        sink.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
