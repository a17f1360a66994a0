"""The configuration: the YAML file (and the snapshot of the sources) into ``core.model.Config``.

``load_config`` is the one way in, for ``run``, reload, ``check-config`` and
``sync``: it reads the file section by section (``loader``), checking every
mapping against ``keys`` (the one table of every key, held against
relaymilter.yml(5) by a test), and raises ``ConfigError`` listing every error
with its file, line and key. Imports only the core and the base.
"""

from .errors import ConfigError, ConfigIssue
from .identity import config_identity
from .loader import load_config, load_sources_settings, parse_config
from .snapshot import SNAPSHOT_FILE_LIMIT, SnapshotText
from .sources import conninfo_problem, default_snapshot

__all__ = [
    "SNAPSHOT_FILE_LIMIT",
    "ConfigError",
    "ConfigIssue",
    "SnapshotText",
    "config_identity",
    "conninfo_problem",
    "default_snapshot",
    "load_config",
    "load_sources_settings",
    "parse_config",
]
