"""What is wrong with a configuration: every error and warning, each with its file, line and key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class ConfigIssue:
    """One error or warning about the config file."""

    file: str
    line: Optional[int]
    path: str
    message: str
    #: Where a snapshot's item came from (an LDAP DN, a row, a fragment's file and line).
    origin: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return f"{text} (from {self.origin})" if self.origin else text


class ConfigError(Exception):
    """The config file is unusable; ``issues`` lists every error found."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))
