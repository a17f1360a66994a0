"""``relaymilter sync``: organizations from LDAP, PostgreSQL and YAML fragments into the snapshot.

``runner`` fetches every source and validates the result with the config
loader; ``snapshot`` renders it as YAML and compares snapshots; ``status``
is the status file (the daemon reads it for its status line and metrics);
``sources`` are the sources themselves (python-ldap and psycopg imported only
when one is fetched). Runs on the sync timer, never in the milter process.
"""
