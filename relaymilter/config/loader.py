"""Loading the config file (and the snapshot) into the immutable model, with every error at once.

Each error names the file, the line and the key path, e.g.
``relaymilter.yml:14: organizations[0].connectors[1].sender_ip_addresses[2]: …``.
The same code path serves ``run``, reload, ``check-config`` and ``sync``.
The root mapping is read here, section by section: the service keys
(``service``), the sources (``sources``), the organizations
(``organizations``) and the snapshot's (``snapshot``), merged (``merge``),
then checked across organizations (``checks``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from yaml.nodes import MappingNode, Node, ScalarNode

from ..base.safefile import CONFIG_FILE_LIMIT
from ..core.model import MODE_MONITOR, ON_ERROR_ACCEPT, Config, build_indexes
from ..core.sourcesettings import SourcesSettings
from . import keys
from .checks import check_domain_owners, check_overlaps, check_registrations, monitor_only
from .errors import ConfigError
from .identity import config_identity
from .merge import merge
from .organizations import OrganizationParts, OrganizationReader
from .reader import NodeReader, compose, read_text
from .service import (
    read_metrics,
    read_mode,
    read_on_error,
    read_policy_service,
    read_reject,
    read_socket,
)
from .snapshot import SnapshotText, read_snapshot, release_list
from .sources import read_sources


def load_config(path: str, snapshot: Optional[SnapshotText] = None) -> Config:
    """Read, validate and build the config at ``path``; raise ConfigError listing every error.

    With a ``sources:`` section, the organizations of the snapshot file (or of
    ``snapshot``) are merged with the file's own and validated with them.
    """
    return parse_config(read_text(path, CONFIG_FILE_LIMIT, "the config file"), path, snapshot)


def parse_config(text: str, path: str, snapshot: Optional[SnapshotText] = None) -> Config:
    """Validate and build a config from YAML text; ``path`` names it in messages."""
    root = compose(text, path)
    reader = NodeReader(path, text)
    config = read_root(reader, root, snapshot)
    if reader.errors or config is None:
        raise ConfigError(reader.sorted_errors())
    return config


def load_sources_settings(path: str) -> Tuple[Optional[SourcesSettings], List[str]]:
    """The ``sources:`` section alone (for ``relaymilter sync``), and its warnings.

    The rest of the file is validated later, with the organizations sync fetched.
    """
    text = read_text(path, CONFIG_FILE_LIMIT, "the config file")
    reader = NodeReader(path, text)
    root = compose(text, path)
    settings = None
    if isinstance(root, MappingNode):
        for key_node, value_node in root.value:
            if isinstance(key_node, ScalarNode) and key_node.value == "sources":
                settings = read_sources(reader, (key_node, value_node))
    if reader.errors:
        raise ConfigError(reader.sorted_errors())
    return settings, [str(w) for w in reader.warnings]


def read_root(
    reader: NodeReader, root: Optional[Node], override: Optional[SnapshotText] = None
) -> Optional[Config]:
    """The whole configuration, or None when the reader has errors."""
    if root is None:
        reader.error(None, "", "the config file is empty")
        return None
    fields = reader.fields(root, "", keys.ROOT)
    if fields is None:
        return None
    sources = read_sources(reader, fields["sources"]) if "sources" in fields else None
    has_sources = "sources" in fields
    for key in keys.ROOT.required_without_sources:
        if key not in fields and not has_sources:
            reader.error(root, key, "required key is missing")
    socket = read_socket(reader, fields.get("socket"))
    mode = read_mode(reader, fields.get("mode"))
    on_error = read_on_error(reader, fields.get("on_error"))
    reject = read_reject(reader, fields.get("reject"))
    metrics = read_metrics(reader, fields.get("metrics"), [("milter socket", socket)])
    policy_service = read_policy_service(reader, fields.get("policy_service"), socket, metrics)
    organization_reader = OrganizationReader(reader, has_sources)
    parts: List[OrganizationParts] = []
    if "organizations" in fields:
        parts = organization_reader.read_organizations(fields["organizations"][1])
    snapshot = None
    if sources is not None:
        snapshot = read_snapshot(
            organization_reader, sources, fields["sources"][1], parts, override
        )
    organizations = merge(reader, parts, has_sources)
    release_list(parts)
    reader.path = reader.config_path
    check_registrations(reader, organization_reader.registrations, organizations)
    check_domain_owners(reader, organization_reader.accepted)
    release_list(organization_reader.accepted)
    if reader.errors:
        return None
    check_overlaps(reader, organizations)
    if mode == MODE_MONITOR:
        reader.warn(fields["mode"][1], "mode", "monitor mode: refusals are only logged")
    if on_error == ON_ERROR_ACCEPT:
        reader.warn(fields["on_error"][1], "on_error", "internal errors will let mail through")
    ip_table, names, files = build_indexes(organizations, mode)
    snapshot_text = reader.snapshot[1] if reader.snapshot else ""
    return Config(
        path=reader.config_path,
        socket=socket,
        mode=mode,
        on_error=on_error,
        reject=reject,
        organizations=organizations,
        warnings=tuple(str(w) for w in reader.warnings),
        ip_connectors=ip_table,
        certificate_connectors=names,
        certificate_files=files,
        identity=config_identity(reader.text + snapshot_text),
        metrics=metrics,
        policy_service=policy_service,
        sources=sources,
        snapshot=snapshot,
        monitor_only=monitor_only(mode, organizations),
    )
