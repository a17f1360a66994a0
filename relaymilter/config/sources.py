"""Reading the config's ``sources:`` section: where the snapshot is, and each source's settings.

Only settings are checked here (syntax, paths, combinations that would leak a
password): ``check-config`` and the daemon never connect to a source, and never
read its password file (the daemon's user cannot).
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

from yaml.nodes import Node

from ..core.sourcesettings import (
    AD_ACCEPTED_DOMAIN_ATTRIBUTE,
    AD_ACCEPTED_DOMAIN_FILTER,
    AD_ACCEPTED_DOMAIN_FLAGS_ATTRIBUTE,
    PRESET_ACTIVE_DIRECTORY,
    FilesSource,
    LdapConnectorMapping,
    LdapDomainMapping,
    LdapSource,
    PostgresqlSource,
    Source,
    SourcesSettings,
)
from . import keys
from .reader import Field, NodeReader

DEFAULT_STATUS = "/var/lib/relaymilter/sync-status.json"
DEFAULT_MAX_REMOVED = 0.25
DEFAULT_TIMEOUT = 30.0
DEFAULT_PAGE_SIZE = 500
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$|^\d+(\.\d+)+$")


def default_snapshot(config_path: str) -> str:
    """Next to the config: /etc/relaymilter/relaymilter.yml → relaymilter.snapshot.yml."""
    stem = os.path.splitext(os.path.basename(config_path))[0] or "relaymilter"
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), f"{stem}.snapshot.yml")


def read_sources(reader: NodeReader, field: Field) -> Optional[SourcesSettings]:
    fields = reader.fields(field[1], "sources", keys.SOURCES)
    if fields is None:
        return None
    snapshot = default_snapshot(reader.path)
    if "snapshot" in fields:
        snapshot = reader.relative_path(fields["snapshot"][1], "sources.snapshot") or snapshot
    status = DEFAULT_STATUS
    if "status" in fields:
        status = reader.relative_path(fields["status"][1], "sources.status") or status
    max_age = None
    if "max_snapshot_age" in fields:
        max_age = read_duration(reader, fields["max_snapshot_age"][1], "sources.max_snapshot_age")
    max_removed = DEFAULT_MAX_REMOVED
    if "max_removed_domains" in fields:
        node = fields["max_removed_domains"][1]
        share = _share(reader, node, "sources.max_removed_domains")
        max_removed = max_removed if share is None else share
    sources: List[Source] = []
    readers = (("files", _read_files), ("ldap", _read_ldap), ("postgresql", _read_postgresql))
    for key, read in readers:
        if key in fields:
            for index, item in enumerate(reader.sequence(fields[key][1], f"sources.{key}", key)):
                source = read(reader, item, f"sources.{key}[{index}]")
                if source is not None:
                    sources.append(source)
    _check_names(reader, field[1], sources)
    _check_libraries(reader, fields, sources)
    if not any(key in fields for key, _ in readers):
        reader.error(field[1], "sources", "lists no source (files, ldap or postgresql)")
    return SourcesSettings(snapshot, status, max_age, max_removed, tuple(sources))


def _check_names(reader: NodeReader, node: Node, sources: List[Source]) -> None:
    seen: Dict[str, str] = {}
    for source in sources:
        if source.name in seen:
            reader.error(
                node, "sources", f"two sources are named {source.name!r}: names must be unique"
            )
        seen[source.name] = source.kind
    if len({os.path.abspath(s.directory) for s in sources if isinstance(s, FilesSource)}) < sum(
        isinstance(s, FilesSource) for s in sources
    ):
        reader.error(node, "sources.files", "the same directory is listed twice")


#: The library each kind of source needs, and the packages that have it.
_LIBRARIES = {
    "ldap": ("ldap", "python-ldap (Debian and EL: python3-ldap)"),
    "postgresql": ("psycopg", "psycopg 3 (Debian: python3-psycopg; EL 9: python3-psycopg3)"),
}


def _check_libraries(reader: NodeReader, fields: Dict[str, Field], sources: List[Source]) -> None:
    """Looked up, not imported: the daemon never needs them, only relaymilter sync does."""
    for kind in sorted({source.kind for source in sources} & set(_LIBRARIES)):
        module, packages = _LIBRARIES[kind]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            reader.warn(
                fields[kind][0],
                f"sources.{kind}",
                f"relaymilter sync needs {packages}, which is not installed",
            )


def read_duration(reader: NodeReader, node: Node, path: str) -> Optional[float]:
    """``90``, ``90s``, ``15m``, ``2h`` or ``1d``."""
    value = reader.scalar(node, path, (int, float, str), "a duration such as 90s, 15m, 2h or 1d")
    if value is None:
        return None
    match = _DURATION.match(str(value))
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if seconds <= 0:
        reader.error(node, path, f"{value!r} is not a positive duration (e.g. 90s, 15m, 2h, 1d)")
        return None
    return seconds


def _share(reader: NodeReader, node: Node, path: str) -> Optional[float]:
    value = reader.scalar(node, path, (int, float, str), "a share such as 25% or 0.25")
    if value is None:
        return None
    text = str(value).strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        reader.error(node, path, f"{value!r} must be a share between 0% and 100% (or 0 and 1)")
        return None
    return share


def _name(reader: NodeReader, fields: Dict[str, Field], path: str) -> Optional[str]:
    if "name" not in fields:
        return None
    return reader.name(fields["name"][1], path + ".name")


# -- files -------------------------------------------------------------------


def _read_files(reader: NodeReader, node: Node, path: str) -> Optional[Source]:
    fields = reader.fields(node, path, keys.FILES_SOURCE)
    if fields is None:
        return None
    name = _name(reader, fields, path)
    directory = (
        reader.relative_path(fields["directory"][1], path + ".directory")
        if "directory" in fields
        else None
    )
    pattern = "*.yml"
    if "pattern" in fields:
        pattern = reader.string(fields["pattern"][1], path + ".pattern") or pattern
        if "/" in pattern:
            reader.error(fields["pattern"][1], path + ".pattern", "must be a file name pattern")
    if directory is not None and not os.path.isdir(directory):
        reader.warn(fields["directory"][1], path + ".directory", f"{directory} does not exist")
    if name is None or directory is None:
        return None
    return FilesSource(name, directory, pattern)


# -- LDAP --------------------------------------------------------------------


def _read_ldap(reader: NodeReader, node: Node, path: str) -> Optional[Source]:
    fields = reader.fields(node, path, keys.LDAP_SOURCE)
    if fields is None:
        return None
    name = _name(reader, fields, path)
    preset = None
    if "preset" in fields:
        preset = reader.choice(fields["preset"][1], path + ".preset", (PRESET_ACTIVE_DIRECTORY,))
    starttls = False
    if "starttls" in fields:
        starttls = bool(
            reader.scalar(fields["starttls"][1], path + ".starttls", (bool,), "true or false")
        )
    uris = _ldap_uris(reader, fields, path, starttls)
    bind_dn = _optional_string(reader, fields, "bind_dn", path)
    password_file = None
    if "password_file" in fields:
        password_file = reader.relative_path(fields["password_file"][1], path + ".password_file")
    if bind_dn is not None and password_file is None:
        reader.error(node, path + ".password_file", "bind_dn needs a password_file")
    if password_file is not None and bind_dn is None:
        reader.error(node, path + ".bind_dn", "password_file needs a bind_dn")
    ca_file = None
    if "ca_file" in fields:
        ca_file = reader.relative_path(fields["ca_file"][1], path + ".ca_file")
        if ca_file is not None and not os.path.isfile(ca_file):
            reader.error(fields["ca_file"][1], path + ".ca_file", f"{ca_file} is not a file")
    _check_ldap_transport(reader, fields, path, uris, starttls, bind_dn)
    timeout = DEFAULT_TIMEOUT
    if "timeout" in fields:
        timeout = read_duration(reader, fields["timeout"][1], path + ".timeout") or timeout
    page_size = DEFAULT_PAGE_SIZE
    if "page_size" in fields:
        value = reader.scalar(fields["page_size"][1], path + ".page_size", (int,), "a number")
        if isinstance(value, int) and not 1 <= value <= 100_000:
            reader.error(fields["page_size"][1], path + ".page_size", "must be 1 to 100000")
        elif isinstance(value, int):
            page_size = value
    base = _optional_string(reader, fields, "base", path)
    domains, connectors = _ldap_mappings(reader, node, fields, path, preset)
    if preset is None and base is None and not _mappings_have_base(domains, connectors):
        reader.error(node, path + ".base", "required key is missing (the search base)")
    if name is None or not uris:
        return None
    return LdapSource(
        name=name,
        uris=tuple(uris),
        base=base,
        bind_dn=bind_dn,
        password_file=password_file,
        starttls=starttls,
        ca_file=ca_file,
        timeout=timeout,
        page_size=page_size,
        accepted_domains=domains,
        connectors=connectors,
        preset=preset,
    )


def _mappings_have_base(
    domains: Optional[LdapDomainMapping], connectors: Optional[LdapConnectorMapping]
) -> bool:
    mappings = [m for m in (domains, connectors) if m is not None]
    return bool(mappings) and all(m.base is not None for m in mappings)


def _ldap_uris(
    reader: NodeReader, fields: Dict[str, Field], path: str, starttls: bool
) -> List[str]:
    if "uris" not in fields:
        return []
    node = fields["uris"][1]
    uris = []
    for index, item in enumerate(reader.sequence(node, path + ".uris", "LDAP URIs")):
        item_path = f"{path}.uris[{index}]"
        text = reader.string(item, item_path)
        if text is None:
            continue
        parts = urlsplit(text.strip())
        if parts.scheme not in ("ldap", "ldaps", "ldapi"):
            reader.error(item, item_path, f"{text!r} must be an ldap://, ldaps:// or ldapi:// URI")
        elif parts.scheme == "ldaps" and starttls:
            reader.error(item, item_path, f"{text!r}: ldaps:// is TLS already; drop starttls")
        elif parts.path not in ("", "/") or parts.query:
            reader.error(
                item, item_path, f"{text!r}: give the server only; the base goes in 'base'"
            )
        else:
            uris.append(text.strip())
    return uris


def _check_ldap_transport(
    reader: NodeReader,
    fields: Dict[str, Field],
    path: str,
    uris: List[str],
    starttls: bool,
    bind_dn: Optional[str],
) -> None:
    """A bind password must never cross the network in clear."""
    clear = [u for u in uris if u.startswith("ldap://")]
    if clear and not starttls and bind_dn is not None:
        reader.error(
            fields["uris"][1],
            path + ".uris",
            f"{clear[0]} without starttls would send the bind password in clear; "
            "use ldaps:// or set starttls: true",
        )
    if "ca_file" in fields and not starttls and not any(u.startswith("ldaps://") for u in uris):
        reader.warn(fields["ca_file"][1], path + ".ca_file", "unused without ldaps:// or starttls")


def _ldap_mappings(
    reader: NodeReader, node: Node, fields: Dict[str, Field], path: str, preset: Optional[str]
) -> Tuple[Optional[LdapDomainMapping], Optional[LdapConnectorMapping]]:
    organization = _optional_name(reader, fields, "organization", path)
    if preset == PRESET_ACTIVE_DIRECTORY:
        if organization is None:
            reader.error(
                node,
                path + ".organization",
                "the active-directory preset needs the organization that gets the domains",
            )
        for key in ("accepted_domains", "connectors"):
            if key in fields:
                reader.error(fields[key][0], f"{path}.{key}", "not with preset: active-directory")
        domains = LdapDomainMapping(
            AD_ACCEPTED_DOMAIN_FILTER,
            AD_ACCEPTED_DOMAIN_ATTRIBUTE,
            organization=organization,
            flags_attribute=AD_ACCEPTED_DOMAIN_FLAGS_ATTRIBUTE,
        )
        return domains, None
    domain_mapping = connector_mapping = None
    if "accepted_domains" in fields:
        domain_mapping = _domain_mapping(reader, fields["accepted_domains"][1], path, organization)
    if "connectors" in fields:
        connector_mapping = _connector_mapping(reader, fields["connectors"][1], path, organization)
    if "accepted_domains" not in fields and "connectors" not in fields:
        reader.error(
            node, path, "needs preset: active-directory, or accepted_domains and/or connectors"
        )
    return domain_mapping, connector_mapping


def _domain_mapping(
    reader: NodeReader, node: Node, path: str, organization: Optional[str]
) -> Optional[LdapDomainMapping]:
    path += ".accepted_domains"
    fields = reader.fields(node, path, keys.LDAP_DOMAIN_MAPPING)
    if fields is None:
        return None
    values = _mapping_values(reader, fields, path)
    owner = _owner(reader, node, fields, path, organization)
    if "filter" not in values or "domain_attribute" not in values or owner is None:
        return None
    return LdapDomainMapping(
        filter=values["filter"],
        domain_attribute=values["domain_attribute"],
        organization=organization if "organization_attribute" not in values else None,
        organization_attribute=values.get("organization_attribute"),
        base=values.get("base"),
    )


def _connector_mapping(
    reader: NodeReader, node: Node, path: str, organization: Optional[str]
) -> Optional[LdapConnectorMapping]:
    path += ".connectors"
    fields = reader.fields(node, path, keys.LDAP_CONNECTOR_MAPPING)
    if fields is None:
        return None
    values = _mapping_values(reader, fields, path)
    owner = _owner(reader, node, fields, path, organization)
    if "filter" not in values or "name_attribute" not in values or owner is None:
        return None
    return LdapConnectorMapping(
        filter=values["filter"],
        name_attribute=values["name_attribute"],
        organization=organization if "organization_attribute" not in values else None,
        organization_attribute=values.get("organization_attribute"),
        sender_ip_addresses_attribute=values.get("sender_ip_addresses_attribute"),
        tls_sender_certificate_name_attribute=values.get("tls_sender_certificate_name_attribute"),
        trusted_issuers_attribute=values.get("trusted_issuers_attribute"),
        base=values.get("base"),
    )


def _mapping_values(reader: NodeReader, fields: Dict[str, Field], path: str) -> Dict[str, str]:
    values: Dict[str, str] = {}
    for key, (_key_node, value_node) in fields.items():
        text = reader.string(value_node, f"{path}.{key}")
        if text is None:
            continue
        text = text.strip()
        if key == "filter" and not _balanced_filter(text):
            reader.error(value_node, f"{path}.{key}", f"{text!r} is not an LDAP filter")
            continue
        if key.endswith("_attribute") and not _ATTRIBUTE.match(text):
            reader.error(value_node, f"{path}.{key}", f"{text!r} is not an attribute name")
            continue
        values[key] = text
    return values


def _owner(
    reader: NodeReader,
    node: Node,
    fields: Dict[str, Field],
    path: str,
    organization: Optional[str],
) -> Optional[str]:
    """Whose entries these are: one organization for all, or an attribute naming it."""
    if "organization_attribute" in fields and organization is not None:
        reader.error(
            fields["organization_attribute"][0],
            path + ".organization_attribute",
            "give either the source's organization or an organization_attribute, not both",
        )
        return None
    if "organization_attribute" not in fields and organization is None:
        reader.error(
            node,
            path + ".organization_attribute",
            "needs an organization_attribute, or an organization for the whole source",
        )
        return None
    return organization or "attribute"


def _balanced_filter(text: str) -> bool:
    """The shape RFC 4515 asks for: parenthesised, balanced (escaped as \\28 \\29 inside values)."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _optional_string(
    reader: NodeReader, fields: Dict[str, Field], key: str, path: str
) -> Optional[str]:
    if key not in fields:
        return None
    value = reader.string(fields[key][1], f"{path}.{key}")
    return value.strip() if value is not None else None


def _optional_name(
    reader: NodeReader, fields: Dict[str, Field], key: str, path: str
) -> Optional[str]:
    if key not in fields:
        return None
    return reader.name(fields[key][1], f"{path}.{key}")


# -- PostgreSQL --------------------------------------------------------------


def _read_postgresql(reader: NodeReader, node: Node, path: str) -> Optional[Source]:
    fields = reader.fields(node, path, keys.POSTGRESQL_SOURCE)
    if fields is None:
        return None
    name = _name(reader, fields, path)
    conninfo = None
    if "conninfo" in fields:
        conninfo = reader.string(fields["conninfo"][1], path + ".conninfo")
        problem = conninfo_problem(conninfo) if conninfo is not None else None
        if problem is not None:
            reader.error(fields["conninfo"][1], path + ".conninfo", problem)
            conninfo = None
    password_file = None
    if "password_file" in fields:
        password_file = reader.relative_path(fields["password_file"][1], path + ".password_file")
    timeout = DEFAULT_TIMEOUT
    if "timeout" in fields:
        timeout = read_duration(reader, fields["timeout"][1], path + ".timeout") or timeout
    queries = {}
    for key in ("accepted_domains_query", "connectors_query"):
        if key in fields:
            queries[key] = reader.string(fields[key][1], f"{path}.{key}")
    if not queries:
        reader.error(node, path, "needs accepted_domains_query and/or connectors_query")
    if name is None or conninfo is None:
        return None
    return PostgresqlSource(
        name=name,
        conninfo=conninfo,
        password_file=password_file,
        timeout=timeout,
        accepted_domains_query=queries.get("accepted_domains_query"),
        connectors_query=queries.get("connectors_query"),
    )


_CONNINFO_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)")


def conninfo_problem(conninfo: str) -> Optional[str]:
    """What is wrong with a libpq connection string, without libpq: mostly, a password in it."""
    text = conninfo.strip()
    if text.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(text)
            has_password = parts.password is not None or "password=" in unquote(parts.query)
        except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
            return f"is not a valid postgresql:// URI ({exc})"
        if has_password:
            return "has a password: put it in password_file (or ~/.pgpass), never in the config"
        return None
    position = 0
    names: List[str] = []
    while position < len(text):
        match = _CONNINFO_PAIR.match(text, position)
        if match is None or match.end() == position:
            if "password" in names:
                break
            # Not quoted back: what follows may be a password.
            return (
                f"is not a libpq connection string (key=value ... or a URI): "
                f"cannot read it from character {position + 1} on"
            )
        names.append(match.group(1).lower())
        position = match.end()
        while position < len(text) and text[position].isspace():
            position += 1
    if "password" in names:
        return "has a password: put it in password_file (or ~/.pgpass), never in the config"
    return None
