"""Loading the YAML config file into the immutable model, with every error reported at once.

Each error names the file, the line and the key path, e.g.
``relaymilter.yml:14: organizations[0].connectors[1].sender_ip_addresses[2]: …``.
The same code path serves ``run``, reload and ``check-config``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from . import publicsuffix
from . import snapshot as snapshot_file
from .certfiles import CertificateFile, CertificateFileError, load_certificates
from .certnames import CertificatePattern, PatternError, normalize_certificate_name, parse_pattern
from .domains import (
    a_label_problem,
    address_literal_problem,
    is_host_name,
    normalize_domain,
    parent_domains,
)
from .model import (
    DEFAULT_REJECT_CODE,
    DEFAULT_REJECT_STATUS,
    DEFAULT_REJECT_TEXT,
    DEFAULT_SOCKET,
    MODE_ENFORCE,
    MODE_MONITOR,
    MODES,
    ON_ERROR_ACCEPT,
    ON_ERROR_TEMPFAIL,
    AcceptedDomain,
    Config,
    Connector,
    MetricsSettings,
    Organization,
    Reply,
    SnapshotFile,
    build_indexes,
)
from .networks import IPNetwork
from .safefile import CONFIG_FILE_LIMIT, UnsafeFileError, read_regular_file
from .socketspec import SocketSpec, SocketSpecError, parse_socket_spec
from .sourceconfig import read_sources
from .sources.settings import SourcesSettings

# libmilter refuses longer reply lines (MAXREPLYLEN 980) with the code in front.
_MAX_REPLY_TEXT = 900


@dataclass(frozen=True)
class ConfigIssue:
    """One error or warning about the config file."""

    file: str
    line: Optional[int]
    path: str
    message: str
    #: Where a snapshot's item came from (an LDAP DN, a row, a fragment's file and line).
    origin: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return f"{text} (from {self.origin})" if self.origin else text


class ConfigError(Exception):
    """The config file is unusable; ``issues`` lists every error found."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


class SnapshotText(NamedTuple):
    """A snapshot to validate instead of the file (``relaymilter sync``'s candidate)."""

    text: str
    #: Names it in messages.
    label: str


def load_config(path: str, snapshot: Optional[SnapshotText] = None) -> Config:
    """Read, validate and build the config at ``path``; raise ConfigError listing every error.

    With a ``sources:`` section, the organizations of the snapshot file (or of
    ``snapshot``) are merged with the file's own and validated with them.
    """
    return parse_config(_read_text(path, CONFIG_FILE_LIMIT, "the config file"), path, snapshot)


def _read_text(path: str, limit: int, what: str) -> str:
    try:
        return read_regular_file(path, limit, what).decode("utf-8")
    except UnsafeFileError as exc:
        raise ConfigError(
            [ConfigIssue(path, None, "", f"cannot read {what}: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError as exc:
        issue = ConfigIssue(path, None, "", f"cannot read {what}: not UTF-8 ({exc})")
        raise ConfigError([issue]) from None


def config_identity(text: str) -> str:
    """A short hash of the config's text: names the config behind each logged decision."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def parse_config(text: str, path: str, snapshot: Optional[SnapshotText] = None) -> Config:
    """Validate and build a config from YAML text; ``path`` names it in messages."""
    root = _compose(text, path)
    reader = _Reader(path, text, snapshot)
    config = reader.read_root(root)
    if reader.errors or config is None:
        raise ConfigError(reader.sorted_errors())
    release_list(reader.accepted)
    return config


def load_sources_settings(path: str) -> Tuple[Optional[SourcesSettings], List[str]]:
    """The ``sources:`` section alone (for ``relaymilter sync``), and its warnings.

    The rest of the file is validated later, with the organizations sync fetched.
    """
    text = _read_text(path, CONFIG_FILE_LIMIT, "the config file")
    reader = _Reader(path, text)
    root = _compose(text, path)
    settings = None
    if isinstance(root, MappingNode):
        for key_node, value_node in root.value:
            if isinstance(key_node, ScalarNode) and key_node.value == "sources":
                settings = read_sources(reader, (key_node, value_node))
    if reader.errors:
        raise ConfigError(reader.sorted_errors())
    return settings, [str(w) for w in reader.warnings]


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


def _compose(text: str, path: str) -> Optional[Node]:
    try:
        return yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(path, line, "", f"not valid YAML: {problem}")]) from None


# libyaml's composer when PyYAML has it: a 100,000-domain file loads 3x faster.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Field = Tuple[ScalarNode, Node]
_STR_TAG = "tag:yaml.org,2002:str"


class _Reader:
    """Walks the YAML node tree, checking it against the schema and collecting issues."""

    def __init__(self, path: str, text: str = "", snapshot: Optional[SnapshotText] = None) -> None:
        #: The file being read: the config file, then the snapshot.
        self.path = path
        self.config_path = path
        self.text = text
        self.snapshot_override = snapshot
        self.errors: List[ConfigIssue] = []
        self.warnings: List[ConfigIssue] = []
        self.base_dir = os.path.dirname(os.path.abspath(path))
        self.has_sources = False
        self._order = 0
        #: Every accepted domain as read, with its node, for the cross-organization check.
        self.accepted: List[_AcceptedEntry] = []
        #: Connectors' certificate names, checked once the organizations are merged.
        self._registrations: List[_Registration] = []
        self._suffixes: Optional[publicsuffix.PublicSuffixList] = None
        self._suffix_problem: Optional[str] = None
        self._snapshot: Optional[Tuple[str, str]] = None
        self._origins: Optional[snapshot_file.OriginIndex] = None
        self._constructor: Optional[yaml.constructor.SafeConstructor] = None

    # -- reporting ---------------------------------------------------------

    def error(self, node: Optional[Node], path: str, message: str) -> None:
        self.errors.append(self._issue(_line(node), path, message))

    def warn(self, node: Optional[Node], path: str, message: str) -> None:
        self.warnings.append(self._issue(_line(node), path, message))

    def _issue(self, line: Optional[int], path: str, message: str) -> ConfigIssue:
        return ConfigIssue(self.path, line, path, message, self._origin(self.path, line))

    def _origin(self, file: str, line: Optional[int]) -> Optional[str]:
        """A snapshot item's origin, from the comment above it (indexed on the first error)."""
        if self._snapshot is None or file != self._snapshot[0]:
            return None
        if self._origins is None:
            self._origins = snapshot_file.origins(self._snapshot[1])
        return self._origins.at(line)

    def _construct(self, node: Node) -> Any:
        # A constructor remembers every object it made: one per read, not one per process.
        if self._constructor is None:
            self._constructor = yaml.constructor.SafeConstructor()
        return self._constructor.construct_object(node)

    def sorted_errors(self) -> List[ConfigIssue]:
        """The config file's errors first, then the snapshot's, each in line order."""
        return sorted(
            self.errors, key=lambda issue: (issue.file != self.config_path, issue.line or 0)
        )

    # -- generic shapes ----------------------------------------------------

    def fields(
        self, node: Node, path: str, allowed: Sequence[str], required: Sequence[str] = ()
    ) -> Optional[Dict[str, _Field]]:
        """The keys of a mapping node, with unknown, duplicate and missing keys reported."""
        if not isinstance(node, MappingNode):
            self.error(node, path, f"must be a mapping with keys {', '.join(allowed)}")
            return None
        found: Dict[str, _Field] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            key_path = _join(path, _printable(str(key)))
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(
                    key_node, key_path, f"unknown key{extra} (allowed: {', '.join(allowed)})"
                )
            elif key in found:
                self.error(key_node, key_path, "duplicate key")
            else:
                found[key] = (key_node, value_node)
        for key in required:
            if key not in found:
                self.error(node, _join(path, key), "required key is missing")
        return found

    def scalar(self, node: Node, path: str, kinds: Tuple[type, ...], what: str) -> Any:
        if not isinstance(node, ScalarNode):
            self.error(node, path, f"must be {what}")
            return None
        # Plain strings are most of a config; only other tags need the constructor.
        try:
            value = node.value if node.tag == _STR_TAG else self._construct(node)
        except Exception as exc:  # a bad !!timestamp, an unknown !tag, ...
            reason = str(exc).splitlines()[0]
            self.error(
                node, path, f"must be {what}; cannot read {node.value!r} as {node.tag}: {reason}"
            )
            return None
        # bool is an int subclass; "yes" must not pass as a number or vice versa.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            hint = ""
            if isinstance(value, int) and ":" in node.value:
                hint = " (YAML reads an unquoted a:b:c as a number: quote IPv6 addresses)"
            self.error(node, path, f"must be {what}, not {_describe(value)}{hint}")
            return None
        return value

    def string(self, node: Node, path: str) -> Optional[str]:
        value = self.scalar(node, path, (str,), "a string")
        if isinstance(value, str) and not value.strip():
            self.error(node, path, "must not be empty")
            return None
        return value if isinstance(value, str) else None

    def name(self, node: Node, path: str) -> Optional[str]:
        """An organization's or connector's name: it appears in every decision line."""
        value = self.string(node, path)
        if value is not None and not value.isprintable():
            self.error(
                node,
                path,
                f"{value!r} has control or invisible characters (line breaks, bidirectional "
                "controls); a name must be printable",
            )
            return None
        return value

    def choice(self, node: Node, path: str, choices: Sequence[str]) -> Optional[str]:
        value = self.string(node, path)
        if value is not None and value not in choices:
            self.error(node, path, f"must be one of {', '.join(choices)}, not {value!r}")
            return None
        return value

    def sequence(self, node: Node, path: str, what: str) -> List[Node]:
        if not isinstance(node, SequenceNode):
            self.error(node, path, f"must be a list of {what}")
            return []
        return list(node.value)

    # -- sections ----------------------------------------------------------

    def read_root(self, root: Optional[Node]) -> Optional[Config]:
        if root is None:
            self.error(None, "", "the config file is empty")
            return None
        allowed = ("socket", "mode", "on_error", "reject", "organizations", "metrics", "sources")
        fields = self.fields(root, "", allowed)
        if fields is None:
            return None
        sources = read_sources(self, fields["sources"]) if "sources" in fields else None
        self.has_sources = "sources" in fields
        if "organizations" not in fields and not self.has_sources:
            self.error(root, "organizations", "required key is missing")
        socket = self.read_socket(fields.get("socket"))
        mode = MODE_ENFORCE
        if "mode" in fields:
            mode = self.choice(fields["mode"][1], "mode", MODES) or mode
        on_error = ON_ERROR_TEMPFAIL
        if "on_error" in fields:
            choices = (ON_ERROR_TEMPFAIL, ON_ERROR_ACCEPT)
            on_error = self.choice(fields["on_error"][1], "on_error", choices) or on_error
        reject = self.read_reject(fields.get("reject"))
        metrics = self.read_metrics(fields.get("metrics"), socket)
        parts: List[_OrganizationParts] = []
        if "organizations" in fields:
            parts = self.read_organizations(fields["organizations"][1])
        snapshot = None
        if sources is not None:
            snapshot = self.read_snapshot(sources, fields["sources"][1], parts)
        organizations = self.merge(parts)
        release_list(parts)
        self.path = self.config_path
        self.check_registrations(organizations)
        self.check_domain_owners()
        if self.errors:
            return None
        self.check_overlaps(organizations)
        if mode == MODE_MONITOR:
            self.warn(fields["mode"][1], "mode", "monitor mode: refusals are only logged")
        if on_error == ON_ERROR_ACCEPT:
            self.warn(fields["on_error"][1], "on_error", "internal errors will let mail through")
        ip_table, names, files = build_indexes(organizations, mode)
        snapshot_text = self._snapshot[1] if self._snapshot else ""
        return Config(
            path=self.config_path,
            socket=socket,
            mode=mode,
            on_error=on_error,
            reject=reject,
            organizations=organizations,
            warnings=tuple(str(w) for w in self.warnings),
            ip_connectors=ip_table,
            certificate_connectors=names,
            certificate_files=files,
            identity=config_identity(self.text + snapshot_text),
            metrics=metrics,
            sources=sources,
            snapshot=snapshot,
            monitor_only=_monitor_only(mode, organizations),
        )

    # -- the snapshot and the merge -------------------------------------------

    def read_snapshot(
        self, sources: SourcesSettings, node: Node, parts: List[_OrganizationParts]
    ) -> Optional[SnapshotFile]:
        """The snapshot's organizations, appended to ``parts``; the file's identity."""
        loaded = self.snapshot_text(sources, node)
        if loaded is None:
            return None
        label, text, snapshot = loaded
        self._snapshot = (label, text)
        self.path = label
        try:
            root = yaml.compose(text, Loader=_LOADER)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            self.errors.append(
                ConfigIssue(label, mark.line + 1 if mark else None, "", f"not valid YAML: {exc}")
            )
            return None
        fields = self.fields(root, "", ("organizations",), ("organizations",)) if root else None
        if fields is None:
            self.error(root, "", "the snapshot is empty; run relaymilter sync")
            return None
        if "organizations" in fields:
            parts.extend(self.read_organizations(fields["organizations"][1], snapshot=True))
            release_nodes(fields["organizations"][1])
        return snapshot

    def snapshot_text(
        self, sources: SourcesSettings, node: Node
    ) -> Optional[Tuple[str, str, Optional[SnapshotFile]]]:
        if self.snapshot_override is not None:
            return self.snapshot_override.label, self.snapshot_override.text, None
        path = sources.snapshot
        try:
            text, stat = _read_snapshot_file(path)
        except FileNotFoundError:
            self.error(
                node,
                "sources.snapshot",
                f"{path} does not exist yet: run 'relaymilter sync' to fetch the sources",
            )
            return None
        except ConfigError as exc:
            self.errors.extend(exc.issues)
            return None
        digest = config_identity(text)
        return path, text, SnapshotFile(path, stat, digest, stat[3] / 1e9)

    def merge(self, parts: List[_OrganizationParts]) -> Tuple[Organization, ...]:
        """One organization per name: the config file's own, with what the sources add."""
        merged: Dict[str, _OrganizationParts] = {}
        for part in parts:
            if part.name is None:
                continue
            first = merged.get(part.name)
            if first is None:
                merged[part.name] = part
            elif first.file == part.file:
                self.path = part.file
                self.error(
                    part.node, part.path + ".name", f"duplicate organization name {part.name!r}"
                )
            else:
                self.path = part.file
                first.absorb(part, self)
        organizations = []
        for part in merged.values():
            self.path = part.file
            organization = part.build(self)
            if organization is not None:
                organizations.append(organization)
        return tuple(organizations)

    def check_registrations(self, organizations: Tuple[Organization, ...]) -> None:
        by_name = {organization.name: organization for organization in organizations}
        for item in self._registrations:
            organization = by_name.get(item.organization)
            if organization is not None:
                self.path = item.file
                self.check_registration(
                    item.node, item.path, item.connector, item.pattern, organization
                )
        self.path = self.config_path

    def scoped_mode(self, fields: Dict[str, _Field], path: str) -> Optional[str]:
        """An organization's or connector's own ``mode`` (the most specific one wins)."""
        if "mode" not in fields:
            return None
        return self.choice(fields["mode"][1], path + ".mode", MODES)

    def read_socket(self, field: Optional[_Field]) -> str:
        if field is None:
            return DEFAULT_SOCKET
        value = self.string(field[1], "socket")
        if value is None:
            return DEFAULT_SOCKET
        try:
            spec = parse_socket_spec(value)
        except SocketSpecError as exc:
            self.error(field[1], "socket", str(exc))
            return value
        if listens_on_all_interfaces(spec):
            self.warn(
                field[1],
                "socket",
                f"{value!r} listens on all interfaces: any host that reaches port {spec.port} "
                "can use the milter to test addresses; name 127.0.0.1 (or a unix socket) "
                "unless the MTA is on another host, and then firewall the port",
            )
        return value

    # -- metrics -----------------------------------------------------------

    def read_metrics(self, field: Optional[_Field], socket: str) -> Optional[MetricsSettings]:
        """The optional ``metrics:`` section: an HTTP endpoint and/or a textfile."""
        if field is None:
            return None
        fields = self.fields(field[1], "metrics", ("listen", "textfile"))
        if fields is None:
            return None
        if not fields:
            self.error(field[1], "metrics", "set listen, textfile or both (or leave metrics out)")
            return None
        listen = None
        if "listen" in fields:
            listen = self.read_metrics_listen(fields["listen"][1], socket)
        textfile = None
        if "textfile" in fields:
            textfile = self.read_metrics_textfile(fields["textfile"][1])
        if not _have_prometheus_client():
            self.error(
                field[0],
                "metrics",
                "needs the Python library prometheus_client, which is not installed: "
                "install python3-prometheus-client (Debian, Ubuntu) or "
                "python3-prometheus_client (EPEL), or remove the metrics section",
            )
        return MetricsSettings(listen, textfile)

    def read_metrics_listen(self, node: Node, socket: str) -> Optional[Tuple[str, int]]:
        path = "metrics.listen"
        if isinstance(node, SequenceNode):
            self.error(node, path, "must be PORT or ADDRESS:PORT (quote an IPv6 one: '[::1]:9099')")
            return None
        value = self.scalar(node, path, (int, str), "PORT or ADDRESS:PORT")
        if value is None:
            return None
        text = str(value).strip()
        host, port_text = "127.0.0.1", text
        if text.startswith("["):
            inside, bracket, after = text[1:].partition("]")
            if not bracket or not after.startswith(":"):
                self.error(node, path, f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
                return None
            host, port_text = inside, after[1:]
        elif ":" in text:
            host, _, port_text = text.rpartition(":")
            if ":" in host:
                self.error(node, path, f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
                return None
        if host == "localhost":
            host = "127.0.0.1"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self.error(
                node, path, f"{host!r} is not an IP address (write 127.0.0.1:PORT or [::1]:PORT)"
            )
            return None
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            self.error(node, path, f"{port_text!r} is not a port number (1-65535)")
            return None
        port = int(port_text)
        if not address.is_loopback:
            self.warn(
                node,
                path,
                f"{text!r} is not a loopback address: anyone who reaches port {port} can read "
                "the metrics (organization and connector names, counts); keep it on "
                "127.0.0.1 or firewall the port",
            )
        self.check_metrics_port(node, path, str(address), port, socket)
        return str(address), port

    def check_metrics_port(self, node: Node, path: str, host: str, port: int, socket: str) -> None:
        """The endpoint cannot share the milter's own inet socket."""
        try:
            spec = parse_socket_spec(socket)
        except SocketSpecError:
            return
        if spec.is_unix or spec.port != port:
            return
        wildcards = (None, "0.0.0.0", "::", "::0")
        if spec.host in wildcards or host in ("0.0.0.0", "::") or spec.host == host:
            self.error(node, path, f"port {port} is the milter socket's ({socket})")

    def read_metrics_textfile(self, node: Node) -> Optional[str]:
        path = "metrics.textfile"
        name = self.string(node, path)
        if name is None:
            return None
        target = os.path.join(self.base_dir, name)
        directory = os.path.dirname(target)
        if not os.path.isdir(directory):
            self.error(
                node,
                path,
                f"the directory {directory} does not exist (node_exporter's textfile "
                "collector reads its --collector.textfile.directory)",
            )
            return None
        if os.path.lexists(target) and not os.path.isfile(target):
            self.error(node, path, f"{target} exists and is not a regular file")
            return None
        if not target.endswith(".prom"):
            self.warn(
                node, path, f"{target}: node_exporter's textfile collector reads only *.prom files"
            )
        if not os.access(directory, os.W_OK):
            self.warn(
                node,
                path,
                f"{directory} is not writable by this user (uid {os.getuid()}); the service "
                "user needs write access, and the unit a ReadWritePaths= drop-in "
                "(see relaymilter(8), METRICS)",
            )
        return target

    def read_reject(self, field: Optional[_Field]) -> Reply:
        default = Reply(DEFAULT_REJECT_CODE, DEFAULT_REJECT_STATUS, DEFAULT_REJECT_TEXT)
        if field is None:
            return default
        fields = self.fields(field[1], "reject", ("code", "status", "text"))
        if fields is None:
            return default
        code, status, text = default.code, default.status, default.text
        if "code" in fields:
            node = fields["code"][1]
            code = self.read_reject_code(node) or code
        if "status" in fields:
            node = fields["status"][1]
            value = self.string(node, "reject.status")
            if value is not None and re.fullmatch(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}", value):
                status = value
            elif value is not None:
                self.error(
                    node,
                    "reject.status",
                    f"must be an enhanced status code like 5.7.64, not {value!r}",
                )
        if "text" in fields:
            node = fields["text"][1]
            value = self.string(node, "reject.text")
            if value is not None and self.reply_text_ok(node, value):
                text = value
        if code[0] != status[0]:
            self.error(
                field[1],
                "reject",
                f"code {code} and status {status} disagree (both must be 4xx/4.x.x or 5xx/5.x.x)",
            )
        return Reply(code, status, text)

    def read_reject_code(self, node: Node) -> Optional[str]:
        value = self.scalar(node, "reject.code", (int, str), "a 3-digit SMTP reply code")
        if value is None:
            return None
        if isinstance(value, int) and isinstance(node, ScalarNode) and str(value) != node.value:
            self.error(
                node,
                "reject.code",
                f"YAML reads {node.value} as the number {value} (a leading 0 means octal): "
                f"write the code without it, e.g. {node.value.lstrip('0') or '0'}",
            )
            return None
        if not re.fullmatch(r"[45][0-9][0-9]", str(value)):
            self.error(node, "reject.code", f"must be a 4xx or 5xx reply code, not {value!r}")
            return None
        if str(value) == "421":
            self.error(
                node,
                "reject.code",
                "421 makes Postfix close the whole session, so the internal recipients of the "
                "same transaction are lost too; use 450 or 451 for a temporary refusal",
            )
            return None
        return str(value)

    def reply_text_ok(self, node: Node, text: str) -> bool:
        if not (text.isascii() and text.isprintable()):
            self.error(
                node,
                "reject.text",
                "must be one line of printable ASCII (SMTP replies are ASCII; no control "
                "characters)",
            )
            return False
        if len(text) > _MAX_REPLY_TEXT:
            self.error(node, "reject.text", f"is longer than {_MAX_REPLY_TEXT} characters")
            return False
        return True

    def read_organizations(self, node: Node, snapshot: bool = False) -> List[_OrganizationParts]:
        items = self.sequence(node, "organizations", "organizations")
        if isinstance(node, SequenceNode) and not items and not (snapshot or self.has_sources):
            self.error(node, "organizations", "must list at least one organization")
        return [
            parts
            for index, item in enumerate(items)
            if (parts := self.read_organization(item, f"organizations[{index}]")) is not None
        ]

    def read_organization(self, node: Node, path: str) -> Optional[_OrganizationParts]:
        # With sources, an organization's domains or connectors may all come from them.
        required = ("name",) if self.has_sources else ("name", "accepted_domains", "connectors")
        fields = self.fields(
            node, path, ("name", "accepted_domains", "connectors", "mode"), required=required
        )
        if fields is None:
            return None
        name = self.name(fields["name"][1], path + ".name") if "name" in fields else None
        key = name if name is not None else f"<{self.path}:{path}>"
        domains: List[AcceptedDomain] = []
        if "accepted_domains" in fields:
            domains = self.read_accepted_domains(
                fields["accepted_domains"][1], path + ".accepted_domains", key
            )
        connectors: List[Connector] = []
        if "connectors" in fields:
            connectors = self.read_connectors(fields["connectors"][1], path + ".connectors", key)
        mode_node = fields["mode"][1] if "mode" in fields else None
        return _OrganizationParts(
            name,
            self.path,
            path,
            node,
            domains,
            connectors,
            self.scoped_mode(fields, path),
            mode_node,
        )

    def read_accepted_domains(
        self, node: Node, path: str, organization: str
    ) -> List[AcceptedDomain]:
        items = self.sequence(node, path, "domains")
        if isinstance(node, SequenceNode) and not items and not self.has_sources:
            self.error(node, path, "must list at least one domain")
        domains: Dict[str, AcceptedDomain] = {}
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            accepted = self.read_accepted_domain(item, item_path)
            if accepted is None:
                continue
            mapping = isinstance(item, MappingNode)
            line = _line(item) or 0
            self.accepted.append(
                _AcceptedEntry(accepted, self.path, line, organization, item_path, mapping)
            )
            if accepted.domain in domains:
                self.warn(item, item_path, f"{accepted.domain} is listed twice")
                accepted = AcceptedDomain(
                    accepted.domain,
                    accepted.match_subdomains or domains[accepted.domain].match_subdomains,
                )
            domains[accepted.domain] = accepted
        return list(domains.values())

    def read_accepted_domain(self, node: Node, path: str) -> Optional[AcceptedDomain]:
        match_subdomains = False
        domain_node: Node = node
        domain_path = path
        if isinstance(node, MappingNode):
            fields = self.fields(node, path, ("domain", "match_subdomains"), required=("domain",))
            if fields is None or "domain" not in fields:
                return None
            domain_node, domain_path = fields["domain"][1], path + ".domain"
            if "match_subdomains" in fields:
                flag = self.scalar(
                    fields["match_subdomains"][1],
                    path + ".match_subdomains",
                    (bool,),
                    "true or false",
                )
                match_subdomains = bool(flag)
        elif not isinstance(node, ScalarNode):
            self.error(node, path, "must be a domain or a mapping {domain: …, match_subdomains: …}")
            return None
        text = self.string(domain_node, domain_path)
        if text is None:
            return None
        literal = address_literal_problem(text)
        if literal is not None:
            self.error(domain_node, domain_path, literal)
            return None
        domain = normalize_domain(text)
        if domain is None or not is_host_name(domain):
            hint = " (use match_subdomains: true instead of a wildcard)" if "*" in text else ""
            self.error(domain_node, domain_path, f"{text!r} is not a valid domain name{hint}")
            return None
        problem = a_label_problem(domain) or self.public_suffix_problem(domain, match_subdomains)
        if problem is not None:
            self.error(domain_node, domain_path, problem)
            return None
        return AcceptedDomain(domain, match_subdomains)

    def public_suffix_problem(self, domain: str, match_subdomains: bool) -> Optional[str]:
        suffixes = self.public_suffixes()
        if suffixes is None or not suffixes.is_public_suffix(domain):
            return None
        scope = " and, with match_subdomains, every domain under it" if match_subdomains else ""
        return (
            f"{domain} is a public suffix (Public Suffix List): accepting it would make "
            f"the organization own every sender in it{scope}; list the organization's own "
            f"domains (e.g. contoso.{domain}) instead"
        )

    def public_suffixes(self) -> Optional[publicsuffix.PublicSuffixList]:
        """The distribution's Public Suffix List, loaded once per config; None if missing."""
        if self._suffixes is None and self._suffix_problem is None:
            try:
                self._suffixes = publicsuffix.load()
            except publicsuffix.PublicSuffixListError as exc:
                self._suffix_problem = str(exc)
                self.warn(
                    None,
                    "accepted_domains",
                    f"cannot check accepted domains against the Public Suffix List ({exc}); "
                    "install Debian's publicsuffix or EL's publicsuffix-list",
                )
        return self._suffixes

    def read_connectors(self, node: Node, path: str, organization: str) -> List[Connector]:
        items = self.sequence(node, path, "connectors")
        names: Set[str] = set()
        connectors = []
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            connector = self.read_connector(item, item_path, organization)
            if connector is None:
                continue
            if connector.name in names:
                self.error(
                    item,
                    item_path + ".name",
                    f"duplicate connector name {connector.name!r} in organization {organization!r}",
                )
            names.add(connector.name)
            connectors.append(connector)
        return connectors

    def read_connector(self, node: Node, path: str, organization: str) -> Optional[Connector]:
        allowed = (
            "name",
            "sender_ip_addresses",
            "tls_sender_certificate_name",
            "trusted_issuers",
            "certificates",
            "mode",
        )
        fields = self.fields(node, path, allowed, required=("name",))
        if fields is None or "name" not in fields:
            return None
        name = self.name(fields["name"][1], path + ".name")
        networks: Tuple[IPNetwork, ...] = ()
        if "sender_ip_addresses" in fields:
            networks = self.read_networks(
                fields["sender_ip_addresses"][1], path + ".sender_ip_addresses"
            )
            self.check_everything_networks(fields["sender_ip_addresses"][1], path, networks)
        pattern = None
        if "tls_sender_certificate_name" in fields:
            pattern = self.read_pattern(
                fields["tls_sender_certificate_name"][1], path + ".tls_sender_certificate_name"
            )
        has_pattern = "tls_sender_certificate_name" in fields
        issuers = self.read_issuers(
            fields.get("trusted_issuers"), path + ".trusted_issuers", has_pattern
        )
        certificates = self.read_certificates(
            fields.get("certificates"), path + ".certificates", has_pattern, pattern
        )
        if not has_pattern and "sender_ip_addresses" not in fields:
            self.error(
                node,
                path,
                "a connector needs sender_ip_addresses, tls_sender_certificate_name, or both",
            )
        if name is None:
            return None
        if pattern is not None:
            self._registrations.append(
                _Registration(
                    self.path,
                    fields["tls_sender_certificate_name"][1],
                    path,
                    name,
                    pattern,
                    organization,
                )
            )
        self._order += 1
        return Connector(
            name=name,
            organization=organization,
            order=self._order,
            sender_ip_addresses=networks,
            certificate_pattern=pattern,
            trusted_issuers=issuers,
            certificates=certificates,
            mode=self.scoped_mode(fields, path),
        )

    def read_networks(self, node: Node, path: str) -> Tuple[IPNetwork, ...]:
        items = self.sequence(node, path, "IP addresses or CIDR networks")
        if isinstance(node, SequenceNode) and not items:
            self.error(node, path, "must list at least one address or network")
        networks = []
        for index, item in enumerate(items):
            item_path = f"{path}[{index}]"
            text = self.string(item, item_path)
            if text is None:
                continue
            network = self.parse_network(item, item_path, text.strip())
            if network is not None:
                networks.append(network)
        return tuple(networks)

    def parse_network(self, node: Node, path: str, text: str) -> Optional[IPNetwork]:
        if "%" in text:
            self.error(
                node,
                path,
                f"{text!r} has a zone id ({text[text.index('%') :]}): clients are matched by "
                "address alone; write the address or network without it",
            )
            return None
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                self.error(node, path, f"{text!r} is not an IP address or CIDR network ({exc})")
                return None
            self.error(node, path, f"{text!r} has host bits set; did you mean {loose}?")
            return None
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(
            ipaddress.IPv6Network("::ffff:0:0/96")
        ):
            self.error(
                node,
                path,
                f"{text!r} is IPv4-mapped; write the IPv4 form (clients are matched as IPv4)",
            )
            return None
        return network

    def read_pattern(self, node: Node, path: str) -> Optional[CertificatePattern]:
        text = self.string(node, path)
        if text is None:
            return None
        try:
            return parse_pattern(text.strip())
        except PatternError as exc:
            self.error(node, path, str(exc))
            return None

    def read_issuers(self, field: Optional[_Field], path: str, has_pattern: bool) -> frozenset[str]:
        if field is None:
            return frozenset()
        if not has_pattern:
            self.error(
                field[0], path, "only applies to a connector with tls_sender_certificate_name"
            )
        items = self.sequence(field[1], path, "issuer common names")
        if isinstance(field[1], SequenceNode) and not items:
            self.error(field[1], path, "must list at least one issuer (or leave the key out)")
        issuers = [self.string(item, f"{path}[{i}]") for i, item in enumerate(items)]
        return frozenset(issuer.strip().casefold() for issuer in issuers if issuer)

    def read_certificates(
        self,
        field: Optional[_Field],
        path: str,
        has_pattern: bool,
        pattern: Optional[CertificatePattern],
    ) -> Tuple[CertificateFile, ...]:
        """The leaf certificates of every listed file (a renewal bundle counts in full)."""
        if field is None:
            return ()
        if not has_pattern:
            self.error(
                field[0], path, "only applies to a connector with tls_sender_certificate_name"
            )
        certificates: List[CertificateFile] = []
        for index, item in enumerate(self.sequence(field[1], path, "certificate file paths")):
            item_path = f"{path}[{index}]"
            name = self.string(item, item_path)
            if name is None:
                continue
            try:
                bundle = load_certificates(os.path.join(self.base_dir, name))
            except CertificateFileError as exc:
                self.error(item, item_path, str(exc))
                continue
            for cert in bundle.leaves:
                if pattern is not None:
                    self.check_certificate(item, item_path, pattern, cert, len(bundle.leaves))
            certificates.extend(bundle.leaves)
        return tuple(certificates)

    # -- cross-checks ------------------------------------------------------

    def check_registration(
        self,
        node: Node,
        path: str,
        name: str,
        pattern: CertificatePattern,
        organization: Organization,
    ) -> None:
        """The seed's step 3b: the connector's domain must be registered with its organization."""
        if organization.accepts(pattern.domain):
            return
        where = path + ".tls_sender_certificate_name"
        if pattern.wildcard:
            self.error(
                node,
                where,
                f"connector {name!r}: {pattern.text!r} needs {pattern.domain} registered with "
                f"organization {organization.name!r}; add {pattern.domain} to its accepted_domains",
            )
            return
        registered = next(
            (p for p in parent_domains(pattern.domain) if organization.accepts(p)), None
        )
        if registered is not None:
            remedy = (
                f"use '*.{registered}' (as Exchange's Hybrid Configuration Wizard does; "
                f"{registered} is registered) or add {pattern.domain} to accepted_domains"
            )
        else:
            remedy = (
                f"register {pattern.domain} (or a parent domain and use a '*.' name) "
                "in accepted_domains"
            )
        self.error(
            node,
            where,
            f"connector {name!r}: {pattern.text!r} is not a domain registered with "
            f"organization {organization.name!r}; {remedy}",
        )

    def check_certificate(
        self,
        node: Node,
        path: str,
        pattern: CertificatePattern,
        cert: CertificateFile,
        in_file: int,
    ) -> None:
        which = f"{cert.path}" + (f" (CN={cert.subject_cn})" if in_file > 1 else "")
        names = [normalize_certificate_name(n) for n in (cert.subject_cn, *cert.dns_names)]
        if not any(n is not None and pattern.matches(n) for n in names):
            self.warn(node, path, f"{which}: none of its names matches {pattern.text!r}")
        problem = cert.validity_problem()
        if problem:
            self.warn(node, path, f"{which}: certificate {problem}")

    def check_everything_networks(
        self, node: Node, path: str, networks: Tuple[IPNetwork, ...]
    ) -> None:
        for network in networks:
            if network.prefixlen == 0:
                self.warn(
                    node,
                    path + ".sender_ip_addresses",
                    f"{network} matches every client: every connection the MTA lets relay is "
                    "attributed to this organization",
                )

    def check_domain_owners(self) -> None:
        """A domain belongs to one organization, as in Exchange Online.

        Otherwise one tenant could register another's domain and so claim its
        certificate connector (``*.contoso.com`` needs contoso.com registered),
        or make its recipients "internal". ``match_subdomains`` counts: it
        claims every name below the domain. Two entries overlap when they are
        equal or one is below the other and that one matches subdomains, so
        walking each entry's parents finds every pair: O(domains x labels).
        """
        owners: Dict[str, List[int]] = {}
        for position, entry in enumerate(self.accepted):
            owners.setdefault(entry.accepted.domain, []).append(position)
        reported: Set[Tuple[int, int]] = set()
        for position, entry in enumerate(self.accepted):
            domain = entry.accepted.domain
            for parent in parent_domains(domain):
                for other_position in owners.get(parent, ()):
                    other = self.accepted[other_position]
                    if other.organization == entry.organization:
                        continue
                    if parent != domain and not other.accepted.match_subdomains:
                        continue
                    pair = (max(position, other_position), min(position, other_position))
                    if pair not in reported:
                        reported.add(pair)
                        self.report_shared_domain(self.accepted[pair[0]], self.accepted[pair[1]])

    def report_shared_domain(self, entry: _AcceptedEntry, other: _AcceptedEntry) -> None:
        """Reported at the later of the two entries (positions follow the files)."""
        where = f"line {other.line}" if other.file == entry.file else f"{other.file}:{other.line}"
        origin = self._origin(other.file, other.line)
        if origin:
            where += f", from {origin}"
        self.errors.append(
            ConfigIssue(
                entry.file,
                entry.line,
                entry.path,
                f"{_describe_accepted(entry.accepted)} overlaps "
                f"{_describe_accepted(other.accepted)} of organization {other.organization!r} "
                f"({where}): a domain belongs to one organization (as in Exchange "
                "Online); remove it from one of them",
                self._origin(entry.file, entry.line),
            )
        )

    def check_overlaps(self, organizations: Tuple[Organization, ...]) -> None:
        """Warn when IP connectors of different organizations cover the same addresses."""
        # One sweep over the networks sorted by (version, first address):
        # O(n log n), so a config with 10,000 connectors is still quick to check.
        spans = sorted(
            (
                net.version,
                int(net.network_address),
                int(net.broadcast_address),
                org.name,
                conn.name,
                str(net),
            )
            for org in organizations
            for conn in org.connectors
            if not conn.is_certificate_connector
            for net in conn.sender_ip_addresses
        )
        reported: Set[Tuple[str, str]] = set()
        open_spans: List[Tuple[int, int, int, str, str, str]] = []
        for span in spans:
            version, start, _end, org, conn, text = span
            open_spans = [s for s in open_spans if s[0] == version and s[2] >= start]
            for other in open_spans:
                pair = (other[3], org)
                if other[3] != org and pair not in reported:
                    reported.add(pair)
                    self.warn(
                        None,
                        "organizations",
                        f"IP connectors overlap: {other[5]} ({other[3]}/{other[4]}) and {text} "
                        f"({org}/{conn}); the organization accepting the sender's domain wins, "
                        "else the first in file order",
                    )
            open_spans.append(span)


def _monitor_only(mode: str, organizations: Tuple[Organization, ...]) -> bool:
    modes = {mode}
    for organization in organizations:
        modes.add(organization.mode or mode)
        modes.update(c.mode for c in organization.connectors if c.mode)
    return modes == {MODE_MONITOR}


def _have_prometheus_client() -> bool:
    """Whether the metrics library is installed (looked up, not imported)."""
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def listens_on_all_interfaces(spec: SocketSpec) -> bool:
    """An inet socket without a host, or on the wildcard address, takes any host's connection."""
    return not spec.is_unix and (spec.host is None or spec.host in ("0.0.0.0", "::", "::0"))


class _AcceptedEntry(NamedTuple):
    """An accepted domain as read: where it is, and whose (kept small: there may be 100,000)."""

    accepted: AcceptedDomain
    file: str
    line: int
    organization: str
    item_path: str
    #: Written as a mapping {domain: ...}: the error points at its "domain" key.
    mapping: bool

    @property
    def path(self) -> str:
        return self.item_path + (".domain" if self.mapping else "")


class _Registration(NamedTuple):
    """A certificate connector's name, to check against its organization's merged domains."""

    file: str
    node: Node
    path: str
    connector: str
    pattern: CertificatePattern
    organization: str


@dataclass
class _OrganizationParts:
    """An organization as one file gives it; the config file's and the snapshot's are merged."""

    name: Optional[str]
    file: str
    path: str
    node: Node
    domains: List[AcceptedDomain]
    connectors: List[Connector]
    mode: Optional[str]
    mode_node: Optional[Node]

    def absorb(self, other: _OrganizationParts, reader: _Reader) -> None:
        """Add what the snapshot says of an organization the config file has too."""
        known = {domain.domain: index for index, domain in enumerate(self.domains)}
        for domain in other.domains:
            index = known.get(domain.domain)
            if index is None:
                self.domains.append(domain)
            elif domain.match_subdomains and not self.domains[index].match_subdomains:
                # As for a domain listed twice in one file: the wider entry wins, said aloud.
                self.domains[index] = domain
                reader.warn(
                    other.node,
                    other.path + ".accepted_domains",
                    f"{domain.domain} of organization {self.name!r} is in {self.file} without "
                    "match_subdomains; the snapshot's match_subdomains applies",
                )
        names = {connector.name for connector in self.connectors}
        for connector in other.connectors:
            if connector.name in names:
                reader.error(
                    other.node,
                    other.path + ".connectors",
                    f"connector {connector.name!r} of organization {self.name!r} is in "
                    f"{self.file} too; a connector must come from one place",
                )
            self.connectors.append(connector)
        if other.mode is not None and self.mode is not None and other.mode != self.mode:
            reader.error(
                other.mode_node,
                other.path + ".mode",
                f"organization {self.name!r} has mode {self.mode} in {self.file}",
            )
        self.mode = self.mode or other.mode

    def build(self, reader: _Reader) -> Optional[Organization]:
        assert self.name is not None
        if not self.domains:
            reader.error(
                self.node,
                self.path + ".accepted_domains",
                f"organization {self.name!r} has no accepted domains"
                + (" (in the config file or the snapshot)" if reader.has_sources else ""),
            )
            return None
        if not self.connectors:
            reader.warn(
                self.node,
                self.path + ".connectors",
                f"organization {self.name!r} has no connectors: nothing is attributed to it",
            )
        return Organization(self.name, tuple(self.domains), tuple(self.connectors), self.mode)


#: A snapshot of 100,000 domains with an origin comment each is about 8 MB.
SNAPSHOT_FILE_LIMIT = 256 * 1024 * 1024


def _read_snapshot_file(path: str) -> Tuple[str, Tuple[int, int, int, int]]:
    """The snapshot's text, and the identity of the very file it came from.

    Stat before and after: if sync replaced the file while it was read, read
    the new one, so that the identity never belongs to another text.
    """
    for _attempt in range(5):
        before = os.stat(path)
        text = _read_text(path, SNAPSHOT_FILE_LIMIT, "the snapshot")
        after = os.stat(path)
        stat = (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns)
        if (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns) == stat:
            return text, stat
    return text, stat


def _describe_accepted(accepted: AcceptedDomain) -> str:
    return accepted.domain + (" (with match_subdomains)" if accepted.match_subdomains else "")


def _line(node: Optional[Node]) -> Optional[int]:
    return node.start_mark.line + 1 if node is not None else None


def _printable(text: str) -> str:
    """A key as read, with control and invisible characters escaped (it is printed)."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    return f"{type(value).__name__} {value!r}"
