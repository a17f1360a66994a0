"""relaymilter as the MTAs see it: a real ``python -m relaymilter run`` (or ``policy``) process.

One process per milter socket. It is (re)started only when a scenario needs
a different configuration; its stderr goes to a log file that the tests read
for the ``decision`` lines and ``reload:`` results.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from .util import (
    HarnessError,
    can_connect_tcp,
    can_connect_unix,
    read_from,
    size,
    wait_for,
)

# One " key=value" field of a decision line. relaymilter writes a value bare
# when it is printable ASCII without spaces, quotes or backslashes, and in
# double quotes with backslash escapes otherwise.
_FIELD = re.compile(r' (\w+)=("(?:[^"\\]|\\.)*"|[^\s"\\]+)')
_ESCAPE = re.compile(r"\\(?:([\\\"])|x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.?))")
# "INFO decision conn=...": relaymilter's stderr format is "LEVEL message".
_DECISION = re.compile(r"^(?:[A-Z]+ )?decision( .*)$", re.MULTILINE)
_RELOAD = re.compile(r"reload: .*\b(loaded|failed)\b")


class LogFormatError(ValueError):
    """A decision line that is not a plain sequence of key=value fields."""


def unquote(value: str) -> str:
    """A bare value as it is; a quoted one without its quotes, escapes undone."""
    if not value.startswith('"'):
        return value

    def unescape(match: re.Match[str]) -> str:
        char, *codes, bad = match.groups()
        if char is not None:
            return char
        for code in codes:
            if code is not None:
                return chr(int(code, 16))
        raise LogFormatError(f"unknown escape \\{bad} in {value}")

    return _ESCAPE.sub(unescape, value[1:-1])


def parse_decision_line(line: str) -> dict[str, str]:
    """The fields of one decision line (the text after ``decision``), unquoted.

    The whole line must be ``key=value`` fields, each key once: anything else
    (a value that could have smuggled in fields of its own) is an error rather
    than a guess. ``<...>`` (addresses) is unwrapped after unquoting.
    """
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        match = _FIELD.match(line, pos)
        if match is None:
            raise LogFormatError(f"unparseable decision line at {pos}: {line!r}")
        key, value = match.group(1), unquote(match.group(2))
        if key in fields:
            raise LogFormatError(f"field {key} twice in decision line: {line!r}")
        if len(value) >= 2 and value.startswith("<") and value.endswith(">"):
            value = value[1:-1]
        fields[key] = value
        pos = match.end()
    return fields


def parse_decisions(text: str) -> list[dict[str, str]]:
    """The key=value fields of every ``decision`` line (see ``parse_decision_line``)."""
    return [parse_decision_line(line) for line in _DECISION.findall(text)]


class RelayMilterProcess:
    """``relaymilter run`` (the milter) or, with ``command="policy"``, the policy service.

    ``socket_owner``: the user a unix socket is handed to once it accepts, as
    systemd's relaymilter-policy.socket makes it for Postfix's ``private/``
    directory, where only the mail owner may connect.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        socket_spec: str,
        *,
        command: str = "run",
        socket_owner: Optional[str] = None,
    ) -> None:
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket_spec = socket_spec
        self.command = command
        self.socket_owner = socket_owner
        self.config_path = workdir / f"{name}.yml"
        self.log = workdir / f"{name}.log"
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.config: Optional[dict[str, Any]] = None  # what the process runs with

    # -- configuration ---------------------------------------------------

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def write_raw_config(self, text: str) -> None:
        self.config_path.write_text(text)

    def ensure(self, config: dict[str, Any]) -> None:
        """Make the process run with ``config``: reload it if running, else start it.

        Reloading is faster than a restart.
        """
        if self.running and self.config == config:
            return
        if self.running and self.reload(yaml.safe_dump(config, sort_keys=False)) == "loaded":
            self.config = config
            return
        self.stop()
        self.write_config(config)
        self.start()
        self.config = config

    # -- process ---------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        offset = size(self.log)
        cmd = [sys.executable, "-m", "relaymilter", self.command, "-c", str(self.config_path)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--socket", self.socket_spec],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._ready, 20, f"relaymilter ({self.name}) to accept on {self.socket_spec}")
        except HarnessError as err:
            self.stop()
            raise HarnessError(
                f"{err}\n--- relaymilter log ---\n{read_from(self.log, offset)}"
            ) from None
        kind, _, path = self.socket_spec.partition(":")
        if kind == "unix" and self.socket_owner:
            shutil.chown(path, self.socket_owner, self.socket_owner)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a crash ends it: no clean-up, the socket file stays."""
        proc, self.proc, self.config = self.proc, None, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"relaymilter ({self.name}) exited with {self.proc.returncode}")
        kind, _, rest = self.socket_spec.partition(":")
        if kind == "unix":
            return can_connect_unix(Path(rest))
        port, _, host = rest.partition("@")
        return can_connect_tcp(host or "127.0.0.1", int(port))

    def request_stop(self) -> None:
        """SIGUSR2 (relaymilter's prompt stop, the unit's KillSignal) without waiting."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        """SIGUSR2 and wait; SIGKILL after 10 s."""
        self.request_stop()
        proc, self.proc, self.config = self.proc, None, None
        if proc is None:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def reload(self, config_text: str) -> str:
        """Write a new config file, SIGUSR1, and return ``loaded`` or ``failed``."""
        assert self.proc is not None and self.running, "relaymilter is not running"
        self.write_raw_config(config_text)
        offset = size(self.log)
        self.proc.send_signal(signal.SIGUSR1)
        found = wait_for(
            lambda: _RELOAD.search(read_from(self.log, offset)), 15, f"a reload line in {self.log}"
        )
        self.config = None  # no longer a dict ensure() can compare with
        return found.group(1)

    # -- log -------------------------------------------------------------

    def offset(self) -> int:
        return size(self.log)

    def decisions_since(self, offset: int) -> list[dict[str, str]]:
        return parse_decisions(read_from(self.log, offset))

    def wait_decisions(
        self, offset: int, count: int, timeout: float = 10.0
    ) -> list[dict[str, str]]:
        """Wait until ``count`` decision lines were logged after ``offset``."""

        def enough() -> Optional[list[dict[str, str]]]:
            found = self.decisions_since(offset)
            return found if len(found) >= count else None

        return wait_for(enough, timeout, f"{count} decision line(s) in {self.log}")


def explain(config_path: Path, args: list[str]) -> dict[str, Any]:
    """``python -m relaymilter explain ... --json``, parsed."""
    cmd = [sys.executable, "-m", "relaymilter", "explain", "-c", str(config_path), *args, "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"explain failed ({result.returncode}): {result.stderr}")
    with contextlib.suppress(json.JSONDecodeError):
        return dict(json.loads(result.stdout))
    raise AssertionError(f"explain printed no JSON: {result.stdout!r}")
