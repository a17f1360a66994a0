#!/usr/bin/env python3
"""The cheapest pymilter milter that asks for its own macros: the floor under relaymilter.

It negotiates exactly what relaymilter negotiates on a unix socket (the same
protocol steps and symbol lists) but has no Python callback besides negotiate
and close, so every other event is answered by pymilter in C. What it costs is
what libmilter's thread per connection, pymilter's per-connection Python thread
state and the GIL cost before relaymilter does any work.

Usage: floor_milter.py SOCKET   (e.g. unix:/tmp/floor.sock)
"""

from __future__ import annotations

import os
import sys
from typing import Any, List

import Milter
import milter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from relaymilter.milterd.milter import LOCAL_PROTOCOL, SYMLISTS


class FloorMilter(Milter.Base):  # type: ignore[misc]
    def negotiate(self, opts: List[int]) -> Any:
        for stage, names in SYMLISTS:  # the macros relaymilter asks for, where it does
            self._ctx.setsymlist(stage, " ".join(names))
        opts[0] = Milter.SETSYMLIST
        opts[1] &= LOCAL_PROTOCOL | Milter.P_NOCONNECT
        opts[2] = opts[3] = 0
        return Milter.CONTINUE


if __name__ == "__main__":
    Milter.factory = FloorMilter
    milter.set_close_callback(Milter.close_callback)
    milter.setconn(sys.argv[1])
    milter.register("floor", negotiate=Milter.negotiate_callback)
    os.umask(0o007)  # the socket must be writable by its group (postfix)
    milter.opensocket(True)
    milter.main()
