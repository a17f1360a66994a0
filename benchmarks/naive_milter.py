#!/usr/bin/env python3
"""A do-nothing pymilter milter that overrides every callback: what a naive milter costs.

Usage: naive_milter.py SOCKET   (e.g. unix:/tmp/naive.sock or inet:9999@127.0.0.1)
"""

from __future__ import annotations

import sys
from typing import Any

import Milter


class NaiveMilter(Milter.Base):  # type: ignore[misc]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def hello(self, hostname: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envfrom(self, mailfrom: str, *params: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envrcpt(self, to: str, *params: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def data(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def header(self, name: str, value: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eoh(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def abort(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def close(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def unknown(self, command: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]


if __name__ == "__main__":
    import os

    os.umask(0o007)  # the socket must be writable by its group (postfix)
    Milter.factory = NaiveMilter
    Milter.runmilter("naive", sys.argv[1], 240)
