"""A throwaway rsyslogd, as Debian's mail.log gets relaymilter's lines, with rsyslog's defaults.

rsyslog is never installed on the test machine: scripts/bootstrap unpacks
Debian's package (and libestr0, libfastjson4) into
/var/cache/relaymilter-test-tools/rsyslog, and this runs rsyslogd from there in
the foreground, with a private config: its own unix socket (imuxsock, not
/dev/log), the file written in RSYSLOG_FileFormat as Debian's mail.log is,
and no message size set, so rsyslog's default applies (datagrams cut at
8,096 bytes, silently).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Callable, List, Optional, Type

TOOLS = Path("/var/cache/relaymilter-test-tools/rsyslog")
RSYSLOGD = TOOLS / "usr/sbin/rsyslogd"
#: Whether the output so far shows what is awaited.
ReadyTest = Callable[[str], bool]


def require_rsyslogd() -> None:
    """Fail (never skip: CI always has it) when bootstrap has not unpacked rsyslog."""
    assert RSYSLOGD.exists(), (
        f"{RSYSLOGD} is missing: run scripts/bootstrap, which unpacks Debian's rsyslog "
        "(apt-get download rsyslog libestr0 libfastjson4)"
    )


class Rsyslogd:
    """rsyslogd on a private socket, writing ``out.log``; ready when its start line is written."""

    def __init__(self, directory: Path) -> None:
        require_rsyslogd()
        self.directory = directory
        self.socket = directory / "log.sock"
        self.output = directory / "out.log"
        (directory / "work").mkdir()
        config = directory / "rsyslog.conf"
        config.write_text(
            f'global(workDirectory="{directory / "work"}" processInternalMessages="on")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{self.socket}")\n'
            f'*.* action(type="omfile" file="{self.output}" template="RSYSLOG_FileFormat")\n'
        )
        library = next(TOOLS.glob("usr/lib/*/rsyslog")).parent
        environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("LISTEN_") and k != "NOTIFY_SOCKET"
        }
        environment["LD_LIBRARY_PATH"] = str(library)
        self.process = subprocess.Popen(
            [
                str(RSYSLOGD),
                "-n",
                "-f",
                str(config),
                "-i",
                str(directory / "rsyslogd.pid"),
                "-M",
                str(library / "rsyslog"),
            ],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._marks = 0
        # Its own "start" line is written once the inputs are running.
        self._wait_for(lambda text: "] start" in text, "its start line")

    def __enter__(self) -> Rsyslogd:
        return self

    def __exit__(
        self,
        kind: Optional[Type[BaseException]],
        value: Optional[BaseException],
        trace: Optional[TracebackType],
    ) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def handler(self, ident: str = "relaymilter[4242]: ") -> logging.Handler:
        """A logging handler that sends to this rsyslogd, facility mail, as journald forwards."""
        handler = logging.handlers.SysLogHandler(
            address=str(self.socket), facility=logging.handlers.SysLogHandler.LOG_MAIL
        )
        handler.ident = ident
        return handler

    def lines(self) -> List[str]:
        """Every line written so far, once a marker sent after them has arrived."""
        self._marks += 1
        mark = f"relaymilter-test-mark-{self._marks}"
        handler = self.handler("test[1]: ")
        try:
            handler.emit(logging.LogRecord("test", logging.INFO, "", 0, mark, None, None))
        finally:
            handler.close()
        text = self._wait_for(lambda text: mark in text, f"the marker {mark}")
        return [line for line in text.splitlines() if "relaymilter-test-mark-" not in line]

    def _wait_for(self, ready: ReadyTest, what: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.output.read_text(errors="surrogateescape") if self.output.exists() else ""
            if ready(text):
                return text
            if self.process.poll() is not None:
                output = self.process.stdout.read() if self.process.stdout else b""
                raise AssertionError(f"rsyslogd exited before {what}: {output!r}")
            assert time.monotonic() < deadline, f"rsyslogd: no {what} within {timeout} s"
            time.sleep(0.01)
