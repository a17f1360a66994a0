"""What runs in the milter process: the pymilter adapter and the service around it.

``milterservice`` starts, serves, reloads and stops; ``milter`` turns each
callback into a ``core.policy`` decision and a reply; ``listener`` opens the
socket, ``notify`` talks to systemd, ``snapshotwatch`` reloads a new snapshot,
``metrics`` serves Prometheus metrics (imported only with a ``metrics:``
section). pymilter is imported only here.
"""
