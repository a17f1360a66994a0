"""What every front end's daemon shares: no front end, no pymilter, no protocol here.

``service`` starts, serves, reloads and stops (each front end subclasses it);
``runtime`` holds the config in force and the counts; ``reloading`` builds a
new config without pausing the answers and frees the old one; ``decisions``
writes the decision, error and stale-snapshot lines; ``listener`` opens a
socket without taking over a live one; ``notify`` talks to systemd;
``snapshotwatch`` reloads a new snapshot; ``metrics`` serves Prometheus
metrics (imported only with a metrics section).
"""
