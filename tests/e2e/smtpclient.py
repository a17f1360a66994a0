"""SMTP client side of the scenarios: one transaction, every reply kept.

Commands after the first EHLO go through ``docmd`` rather than smtplib's
high-level calls, because those silently send an EHLO of their own (which
would spoil the "no second EHLO after STARTTLS" case) and raise on replies a
test wants to look at.
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .pki import Credential

CLIENT_HELO = "client.e2e.test"


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # everything after the code; lines of a multi-line reply joined by "\n"

    @property
    def line(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


@dataclass
class Transaction:
    token: str  # unique text in the Subject, to find the message at the sink
    mail_from: str
    banner: Optional[Reply] = None
    ehlo: Optional[Reply] = None
    starttls: Optional[Reply] = None
    tls_version: Optional[str] = None
    mail: Optional[Reply] = None
    rcpts: dict[str, Reply] = field(default_factory=dict)
    data: Optional[Reply] = None

    @property
    def accepted(self) -> list[str]:
        return [r for r, reply in self.rcpts.items() if reply.ok]

    @property
    def queued(self) -> bool:
        return self.data is not None and self.data.ok


def _context(cert: Optional[Credential], cafile: Optional[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def _reply(code: int, text: bytes) -> Reply:
    return Reply(code, text.decode("utf-8", "replace"))


def _message(token: str, mail_from: str, rcpts: list[str]) -> bytes:
    return (
        f"From: <{mail_from or 'mailer-daemon@e2e.test'}>\r\n"
        f"To: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
        f"Subject: e2e {token}\r\n"
        f"Message-ID: <{token}@client.e2e.test>\r\n"
        "\r\n"
        f"relaymilter end-to-end test {token}\r\n"
    ).encode()


class Session:
    """An open SMTP connection: banner, EHLO and, if asked, STARTTLS done.

    Several transactions may follow; ``send`` is the one-transaction shortcut.
    """

    def __init__(
        self,
        port: int,
        *,
        cert: Optional[Credential] = None,
        starttls: bool = True,
        ehlo_after_starttls: bool = True,
        source_ip: str = "127.0.0.1",
        cafile: Optional[str] = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.cert, self.starttls, self.source_ip = cert, starttls, source_ip
        self.opening = Transaction(token="", mail_from="")  # holds the session replies
        self.smtp = smtplib.SMTP(
            local_hostname=CLIENT_HELO, timeout=60, source_address=(source_ip, 0)
        )
        # smtplib sets the STARTTLS server_hostname only when the constructor
        # connects, and the constructor would hide the banner reply from us.
        self.smtp._host = host  # type: ignore[attr-defined]
        self.transactions = 0
        try:
            self.opening.banner = _reply(*self.smtp.connect(host, port))
            self.opening.ehlo = _reply(*self.smtp.ehlo())
            if starttls:
                _starttls(self.smtp, self.opening, _context(cert, cafile), ehlo_after_starttls)
        except BaseException:
            self.smtp.close()
            raise

    def transaction(self, mail_from: str, rcpts: list[str]) -> Transaction:
        """MAIL, RCPTs, and DATA whenever MAIL FROM was accepted."""
        opening = self.opening
        txn = Transaction(token=uuid.uuid4().hex[:16], mail_from=mail_from)
        txn.banner, txn.ehlo, txn.starttls = opening.banner, opening.ehlo, opening.starttls
        txn.tls_version = opening.tls_version
        try:
            if self.transactions:
                self.smtp.docmd("RSET")
            self.transactions += 1
            _envelope(self.smtp, txn, rcpts)
            if txn.mail is not None and txn.mail.ok:
                # Even with every recipient refused: the MTA must then refuse DATA too.
                txn.data = _data(self.smtp, _message(txn.token, mail_from, rcpts))
        except smtplib.SMTPServerDisconnected:
            pass  # e.g. after a 421: whatever was answered so far is in txn
        return txn

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.smtp.docmd("QUIT")
        self.smtp.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send(port: int, mail_from: str, rcpts: list[str], **session: Any) -> Transaction:
    """One SMTP session with one transaction; ``session`` as for ``Session``."""
    with Session(port, **session) as smtp:
        return smtp.transaction(mail_from, rcpts)


def _starttls(
    smtp: smtplib.SMTP, txn: Transaction, context: ssl.SSLContext, ehlo_again: bool
) -> None:
    try:
        txn.starttls = _reply(*smtp.starttls(context=context))
    except smtplib.SMTPResponseException as refused:
        error = refused.smtp_error
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else error
        txn.starttls = Reply(refused.smtp_code, text)
        return
    except smtplib.SMTPNotSupportedError:
        txn.starttls = Reply(0, "STARTTLS not offered")
        return
    txn.tls_version = smtp.sock.version()  # type: ignore[union-attr]
    if ehlo_again:
        txn.ehlo = _reply(*smtp.ehlo())


def _envelope(smtp: smtplib.SMTP, txn: Transaction, rcpts: list[str]) -> None:
    txn.mail = _reply(*smtp.docmd("MAIL", f"FROM:<{txn.mail_from}>"))
    for rcpt in rcpts:
        txn.rcpts[rcpt] = _reply(*smtp.docmd("RCPT", f"TO:<{rcpt}>"))


def _data(smtp: smtplib.SMTP, message: bytes) -> Reply:
    go_ahead = _reply(*smtp.docmd("DATA"))
    if go_ahead.code != 354:
        return go_ahead
    stuffed = message.replace(b"\r\n.", b"\r\n..")  # RFC 5321 dot-stuffing
    smtp.send(stuffed + b".\r\n")
    return _reply(*smtp.getreply())
