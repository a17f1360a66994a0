"""The snapshot as the config loader reads it: the organizations ``relaymilter sync`` fetched.

With a ``sources:`` section, the snapshot file (or ``relaymilter sync``'s
candidate text) is read after the config file's organizations, in the shape
of the config file's ``organizations:`` list, and validated with them: there
is no second model. Its items' origins come into every error about them.
"""

from __future__ import annotations

import os
from typing import Any, List, NamedTuple, Optional, Tuple

import yaml
from yaml.nodes import Node, SequenceNode

from ..core.model import SnapshotFile
from ..core.sourcesettings import SourcesSettings
from . import keys
from .errors import ConfigError, ConfigIssue
from .identity import config_identity
from .organizations import OrganizationParts, OrganizationReader
from .reader import LOADER, NodeReader, read_text

#: A snapshot of 100,000 domains with an origin comment each is about 8 MB.
SNAPSHOT_FILE_LIMIT = 256 * 1024 * 1024


class SnapshotText(NamedTuple):
    """A snapshot to validate instead of the file (``relaymilter sync``'s candidate)."""

    text: str
    #: Names it in messages.
    label: str


def read_snapshot(
    organizations: OrganizationReader,
    sources: SourcesSettings,
    node: Node,
    parts: List[OrganizationParts],
    override: Optional[SnapshotText] = None,
) -> Optional[SnapshotFile]:
    """The snapshot's organizations, appended to ``parts``; the file's identity.

    ``override``: a text to read instead of the file (its identity is then None).
    """
    reader = organizations.reader
    loaded = _snapshot_text(reader, sources, node, override)
    if loaded is None:
        return None
    label, text, snapshot = loaded
    reader.read_snapshot(label, text)
    try:
        root = yaml.compose(text, Loader=LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reader.errors.append(
            ConfigIssue(label, mark.line + 1 if mark else None, "", f"not valid YAML: {exc}")
        )
        return None
    fields = reader.fields(root, "", keys.SNAPSHOT) if root else None
    if fields is None:
        reader.error(root, "", "the snapshot is empty; run relaymilter sync")
        return None
    if "organizations" in fields:
        parts.extend(organizations.read_organizations(fields["organizations"][1], snapshot=True))
        release_nodes(fields["organizations"][1])
    return snapshot


def _snapshot_text(
    reader: NodeReader, sources: SourcesSettings, node: Node, override: Optional[SnapshotText]
) -> Optional[Tuple[str, str, Optional[SnapshotFile]]]:
    if override is not None:
        return override.label, override.text, None
    path = sources.snapshot
    try:
        text, stat = read_snapshot_file(path)
    except FileNotFoundError:
        reader.error(
            node,
            "sources.snapshot",
            f"{path} does not exist yet: run 'relaymilter sync' to fetch the sources",
        )
        return None
    except ConfigError as exc:
        reader.errors.extend(exc.issues)
        return None
    digest = config_identity(text)
    return path, text, SnapshotFile(path, stat, digest, stat[3] / 1e9)


def read_snapshot_file(path: str) -> Tuple[str, Tuple[int, int, int, int]]:
    """The snapshot's text, and the identity of the very file it came from.

    Stat before and after: if sync replaced the file while it was read, read
    the new one, so that the identity never belongs to another text.
    """
    for _attempt in range(5):
        before = os.stat(path)
        text = read_text(path, SNAPSHOT_FILE_LIMIT, "the snapshot")
        after = os.stat(path)
        stat = (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)
        if (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == stat:
            return text, stat
    return text, stat


def release_nodes(node: Node) -> None:
    """Free a large node tree a few items at a time (see ``release_list``)."""
    if isinstance(node, SequenceNode):
        release_list(node.value)


def release_list(items: List[Any], chunk: int = 200) -> None:
    """Empty a large list a few items at a time, not in one deallocation.

    A snapshot of 100,000 domains is about a million nodes, and the reader's
    notes on it a few hundred thousand objects; freeing either in one go holds
    the GIL for some 40 ms, during which no milter thread answers. Between
    chunks, the interpreter lets other threads run.
    """
    while items:
        del items[-chunk:]
