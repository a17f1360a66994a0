"""The ``files`` source: a directory of YAML fragments, each with an ``organizations:`` list.

For sites whose configuration management drops one file per tenant. The
fragments are read as plain data, item by item, so each item's origin is its
file and line; their validation is the config file's, on the snapshot.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any, NoReturn

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ...base.safefile import CONFIG_FILE_LIMIT, UnsafeFileError, read_regular_file
from ...core.sourcesettings import FilesSource
from . import OrganizationCollector, SourceError, SourceResult

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ORGANIZATION_KEYS = ("name", "accepted_domains", "connectors", "mode")


def fetch(source: FilesSource) -> SourceResult:
    try:
        names = sorted(
            n for n in os.listdir(source.directory) if fnmatch.fnmatch(n, source.pattern)
        )
    except OSError as exc:
        raise SourceError(f"files {source.name!r}: {source.directory}: {exc.strerror}") from None
    collector = OrganizationCollector()
    records = 0
    for name in names:
        if name.startswith("."):
            continue  # editors' and configuration management's temporary files
        records += _read_fragment(source, os.path.join(source.directory, name), collector)
    return collector.result(records, f"{len(names)} files in {source.directory}")


def _read_fragment(source: FilesSource, path: str, collector: OrganizationCollector) -> int:
    try:
        text = read_regular_file(path, CONFIG_FILE_LIMIT, "the fragment").decode("utf-8")
        root = yaml.compose(text, Loader=_LOADER)
    except UnsafeFileError as exc:
        raise SourceError(f"files {source.name!r}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"files {source.name!r}: {path}: not UTF-8 ({exc})") from None
    except yaml.YAMLError as exc:
        raise SourceError(f"files {source.name!r}: {path}: not valid YAML: {exc}") from None
    if root is None:
        return 0
    organizations = _key(root, "organizations", path, source)
    if not isinstance(organizations, SequenceNode):
        _fail(source, path, organizations or root, "'organizations' must be a list")
    for node in organizations.value:
        _read_organization(source, path, node, collector)
    return len(organizations.value)


def _key(root: Node, wanted: str, path: str, source: FilesSource) -> Any:
    if not isinstance(root, MappingNode):
        _fail(source, path, root, f"must be a mapping with the key {wanted!r}")
    found = None
    for key, value in root.value:
        if not isinstance(key, ScalarNode) or key.value != wanted:
            _fail(source, path, key, f"unknown key (a fragment has only {wanted!r})")
        found = value
    if found is None:
        _fail(source, path, root, f"the key {wanted!r} is missing")
    return found


def _read_organization(
    source: FilesSource, path: str, node: Node, collector: OrganizationCollector
) -> None:
    if not isinstance(node, MappingNode):
        _fail(source, path, node, "an organization must be a mapping")
    values = {}
    for key, value in node.value:
        if not isinstance(key, ScalarNode) or key.value not in _ORGANIZATION_KEYS:
            allowed = ", ".join(_ORGANIZATION_KEYS)
            _fail(source, path, key, f"unknown key {key.value!r} (allowed: {allowed})")
        values[key.value] = value
    name = _construct(values["name"]) if "name" in values else None
    if not isinstance(name, str) or not name.strip():
        _fail(source, path, node, "an organization needs a name (a string)")
    organization = collector.organization(name, _origin(source, path, node))
    if "mode" in values:
        mode = str(_construct(values["mode"]))
        if organization.mode not in (None, mode):
            _fail(
                source,
                path,
                values["mode"],
                f"organization {name!r} has mode {organization.mode} in {organization.mode_origin}",
            )
        organization.mode = mode
        organization.mode_origin = _origin(source, path, values["mode"])
    directory = os.path.dirname(path)
    for key, add in (
        ("accepted_domains", collector.add_domain),
        ("connectors", collector.add_connector),
    ):
        items = values.get(key)
        if items is None:
            continue
        if not isinstance(items, SequenceNode):
            _fail(source, path, items, f"{key!r} must be a list")
        for item in items.value:
            value = _construct(item)
            if key == "connectors":
                value = _anchor_certificates(value, directory)
            add(name, value, _origin(source, path, item))


def _anchor_certificates(connector: Any, directory: str) -> Any:
    """A fragment's certificate paths are relative to the fragment, not to the config."""
    if isinstance(connector, dict) and isinstance(connector.get("certificates"), list):
        connector = dict(connector)
        connector["certificates"] = [
            os.path.join(directory, c) if isinstance(c, str) else c
            for c in connector["certificates"]
        ]
    return connector


def _construct(node: Node) -> Any:
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def _origin(source: FilesSource, path: str, node: Node) -> str:
    return f"files {source.name!r}: {path}:{node.start_mark.line + 1}"


def _fail(source: FilesSource, path: str, node: Node, message: str) -> NoReturn:
    raise SourceError(f"{_origin(source, path, node)}: {message}")
