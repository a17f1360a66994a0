"""The decision record: written for every recipient, read back offline by report and replay.

``record`` defines it once; ``logfmt`` quotes its values, ``journal`` writes
log records to journald (or stderr); ``logsource`` reads records back from
journals and log files; ``report`` groups them, ``replay`` decides them again
under another configuration. Imports only the core and the base.
"""
