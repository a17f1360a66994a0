"""Where each item of a snapshot came from: the ``# origin:`` comment above it.

An error inside the snapshot quotes the origin of its item (an LDAP DN, a
row, a fragment's file and line), found as the nearest origin comment above
the error's line. Indexed only when the first such error is reported.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional

#: The comment above each item of a snapshot (``relaymilter.sync.snapshot`` writes it).
ORIGIN_COMMENT = "# origin: "


def origins(text: str) -> OriginIndex:
    """Where each item of a snapshot came from, by line (for error messages)."""
    starts: List[int] = []
    names: List[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if stripped.startswith(ORIGIN_COMMENT):
            starts.append(number)
            names.append(stripped[len(ORIGIN_COMMENT) :])
    return OriginIndex(starts, names)


@dataclass
class OriginIndex:
    starts: List[int]
    names: List[str]

    def at(self, line: Optional[int]) -> Optional[str]:
        """The origin of the item on ``line``: the nearest origin comment above it."""
        if line is None:
            return None
        position = bisect.bisect_left(self.starts, line) - 1
        return self.names[position] if position >= 0 else None
