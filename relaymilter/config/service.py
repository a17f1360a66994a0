"""The service's own keys: socket, mode, on_error, reject, metrics and policy_service."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from typing import Optional, Sequence, Tuple

from yaml.nodes import Node, ScalarNode, SequenceNode

from ..base.socketspec import SocketSpec, SocketSpecError, parse_socket_spec
from ..core.model import (
    DEFAULT_REJECT_CODE,
    DEFAULT_REJECT_STATUS,
    DEFAULT_REJECT_TEXT,
    DEFAULT_SOCKET,
    MODE_ENFORCE,
    MODES,
    ON_ERROR_ACCEPT,
    ON_ERROR_TEMPFAIL,
    MetricsSettings,
    PolicyServiceSettings,
    Reply,
)
from . import keys
from .reader import Field, NodeReader

# libmilter refuses longer reply lines (MAXREPLYLEN 980) with the code in front.
MAX_REPLY_TEXT = 900


#: (what a socket is, for messages; its spec): the sockets a metrics endpoint must not take.
Sockets = Sequence[Tuple[str, str]]


def read_socket(reader: NodeReader, field: Optional[Field]) -> str:
    if field is None:
        return DEFAULT_SOCKET
    return _socket(reader, field[1], "socket", "the milter") or DEFAULT_SOCKET


def _socket(reader: NodeReader, node: Node, path: str, who: str) -> Optional[str]:
    value = reader.string(node, path)
    if value is None:
        return None
    try:
        spec = parse_socket_spec(value)
    except SocketSpecError as exc:
        reader.error(node, path, str(exc))
        return value
    if listens_on_all_interfaces(spec):
        reader.warn(
            node,
            path,
            f"{value!r} listens on all interfaces: any host that reaches port {spec.port} "
            f"can use {who} to test addresses; name 127.0.0.1 (or a unix socket) "
            "unless the MTA is on another host, and then firewall the port",
        )
    return value


def listens_on_all_interfaces(spec: SocketSpec) -> bool:
    """An inet socket without a host, or on the wildcard address, takes any host's connection."""
    return not spec.is_unix and (spec.host is None or spec.host in ("0.0.0.0", "::", "::0"))


def read_mode(reader: NodeReader, field: Optional[Field]) -> str:
    if field is None:
        return MODE_ENFORCE
    return reader.choice(field[1], "mode", MODES) or MODE_ENFORCE


def read_on_error(reader: NodeReader, field: Optional[Field]) -> str:
    if field is None:
        return ON_ERROR_TEMPFAIL
    choices = (ON_ERROR_TEMPFAIL, ON_ERROR_ACCEPT)
    return reader.choice(field[1], "on_error", choices) or ON_ERROR_TEMPFAIL


# -- reject ------------------------------------------------------------------


def read_reject(reader: NodeReader, field: Optional[Field]) -> Reply:
    default = Reply(DEFAULT_REJECT_CODE, DEFAULT_REJECT_STATUS, DEFAULT_REJECT_TEXT)
    if field is None:
        return default
    fields = reader.fields(field[1], "reject", keys.REJECT)
    if fields is None:
        return default
    code, status, text = default.code, default.status, default.text
    if "code" in fields:
        code = _reject_code(reader, fields["code"][1]) or code
    if "status" in fields:
        status = _reject_status(reader, fields["status"][1]) or status
    if "text" in fields:
        node = fields["text"][1]
        value = reader.string(node, "reject.text")
        if value is not None and _reply_text_ok(reader, node, value):
            text = value
    if code[0] != status[0]:
        reader.error(
            field[1],
            "reject",
            f"code {code} and status {status} disagree (both must be 4xx/4.x.x or 5xx/5.x.x)",
        )
    return Reply(code, status, text)


def _reject_code(reader: NodeReader, node: Node) -> Optional[str]:
    value = reader.scalar(node, "reject.code", (int, str), "a 3-digit SMTP reply code")
    if value is None:
        return None
    if isinstance(value, int) and isinstance(node, ScalarNode) and str(value) != node.value:
        reader.error(
            node,
            "reject.code",
            f"YAML reads {node.value} as the number {value} (a leading 0 means octal): "
            f"write the code without it, e.g. {node.value.lstrip('0') or '0'}",
        )
        return None
    if not re.fullmatch(r"[45][0-9][0-9]", str(value)):
        reader.error(node, "reject.code", f"must be a 4xx or 5xx reply code, not {value!r}")
        return None
    if str(value) == "421":
        reader.error(
            node,
            "reject.code",
            "421 makes Postfix close the whole session, so the internal recipients of the "
            "same transaction are lost too; use 450 or 451 for a temporary refusal",
        )
        return None
    return str(value)


def _reject_status(reader: NodeReader, node: Node) -> Optional[str]:
    value = reader.string(node, "reject.status")
    if value is not None and re.fullmatch(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}", value):
        return value
    if value is not None:
        reader.error(
            node,
            "reject.status",
            f"must be an enhanced status code like 5.7.64, not {value!r}",
        )
    return None


def _reply_text_ok(reader: NodeReader, node: Node, text: str) -> bool:
    if not (text.isascii() and text.isprintable()):
        reader.error(
            node,
            "reject.text",
            "must be one line of printable ASCII (SMTP replies are ASCII; no control characters)",
        )
        return False
    if len(text) > MAX_REPLY_TEXT:
        reader.error(node, "reject.text", f"is longer than {MAX_REPLY_TEXT} characters")
        return False
    return True


# -- metrics -----------------------------------------------------------------


def read_metrics(
    reader: NodeReader,
    field: Optional[Field],
    sockets: Sockets,
    path: str = "metrics",
    taken: Optional[MetricsSettings] = None,
) -> Optional[MetricsSettings]:
    """A ``metrics:`` section: an HTTP endpoint and/or a textfile.

    ``sockets`` and ``taken`` (another front end's metrics) are what the
    endpoint must not share.
    """
    if field is None:
        return None
    fields = reader.fields(field[1], path, keys.METRICS)
    if fields is None:
        return None
    if not fields:
        reader.error(field[1], path, "set listen, textfile or both (or leave metrics out)")
        return None
    listen = None
    if "listen" in fields:
        listen = _metrics_listen(reader, fields["listen"][1], sockets, f"{path}.listen")
        if listen is not None and taken is not None and taken.listen == listen:
            reader.error(fields["listen"][1], f"{path}.listen", "is the milter's metrics.listen")
    textfile = None
    if "textfile" in fields:
        textfile = _metrics_textfile(reader, fields["textfile"][1], f"{path}.textfile")
        if textfile is not None and taken is not None and taken.textfile == textfile:
            reader.error(
                fields["textfile"][1], f"{path}.textfile", "is the milter's metrics.textfile"
            )
    if not _have_prometheus_client():
        reader.error(
            field[0],
            path,
            "needs the Python library prometheus_client, which is not installed: "
            "install python3-prometheus-client (Debian, Ubuntu) or "
            "python3-prometheus_client (EPEL), or remove the metrics section",
        )
    return MetricsSettings(listen, textfile)


def _have_prometheus_client() -> bool:
    """Whether the metrics library is installed (looked up, not imported)."""
    try:
        return importlib.util.find_spec("prometheus_client") is not None
    except (ImportError, ValueError):  # ValueError: blocked in sys.modules
        return False


def _metrics_listen(
    reader: NodeReader, node: Node, sockets: Sockets, path: str
) -> Optional[Tuple[str, int]]:
    if isinstance(node, SequenceNode):
        reader.error(node, path, "must be PORT or ADDRESS:PORT (quote an IPv6 one: '[::1]:9099')")
        return None
    value = reader.scalar(node, path, (int, str), "PORT or ADDRESS:PORT")
    if value is None:
        return None
    text = str(value).strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        inside, bracket, after = text[1:].partition("]")
        if not bracket or not after.startswith(":"):
            reader.error(node, path, f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
            return None
        host, port_text = inside, after[1:]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            reader.error(node, path, f"{text!r}: write an IPv6 address as [ADDRESS]:PORT")
            return None
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        reader.error(
            node, path, f"{host!r} is not an IP address (write 127.0.0.1:PORT or [::1]:PORT)"
        )
        return None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        reader.error(node, path, f"{port_text!r} is not a port number (1-65535)")
        return None
    port = int(port_text)
    if not address.is_loopback:
        reader.warn(
            node,
            path,
            f"{text!r} is not a loopback address: anyone who reaches port {port} can read "
            "the metrics (organization and connector names, counts); keep it on "
            "127.0.0.1 or firewall the port",
        )
    for what, socket in sockets:
        if _same_port(socket, str(address), port):
            reader.error(node, path, f"port {port} is the {what}'s ({socket})")
    return str(address), port


def _same_port(socket: str, host: str, port: int) -> bool:
    """Whether an inet socket and an endpoint (host, port) would take the same port."""
    try:
        spec = parse_socket_spec(socket)
    except SocketSpecError:
        return False
    if spec.is_unix or spec.port != port:
        return False
    wildcards = (None, "0.0.0.0", "::", "::0")
    return spec.host in wildcards or host in ("0.0.0.0", "::") or spec.host == host


def _metrics_textfile(reader: NodeReader, node: Node, path: str) -> Optional[str]:
    target = reader.relative_path(node, path)
    if target is None:
        return None
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        reader.error(
            node,
            path,
            f"the directory {directory} does not exist (node_exporter's textfile "
            "collector reads its --collector.textfile.directory)",
        )
        return None
    if os.path.lexists(target) and not os.path.isfile(target):
        reader.error(node, path, f"{target} exists and is not a regular file")
        return None
    if not target.endswith(".prom"):
        reader.warn(
            node, path, f"{target}: node_exporter's textfile collector reads only *.prom files"
        )
    if not os.access(directory, os.W_OK):
        reader.warn(
            node,
            path,
            f"{directory} is not writable by this user (uid {os.getuid()}); the service "
            "user needs write access, and the unit a ReadWritePaths= drop-in "
            "(see relaymilter(8), METRICS)",
        )
    return target


# -- policy_service ------------------------------------------------------------


def read_policy_service(
    reader: NodeReader,
    field: Optional[Field],
    milter_socket: str,
    milter_metrics: Optional[MetricsSettings],
) -> Optional[PolicyServiceSettings]:
    """The optional ``policy_service:`` section: ``relaymilter policy``'s socket and metrics."""
    if field is None:
        return None
    fields = reader.fields(field[1], "policy_service", keys.POLICY_SERVICE)
    if fields is None:
        return None
    socket = None
    if "socket" in fields:
        node = fields["socket"][1]
        socket = _socket(reader, node, "policy_service.socket", "the policy service")
        if socket is not None and _same_socket(socket, milter_socket):
            reader.error(node, "policy_service.socket", f"is the milter's socket ({milter_socket})")
        elif socket is not None and milter_metrics is not None and milter_metrics.listen:
            host, port = milter_metrics.listen
            if _same_port(socket, host, port):
                reader.error(node, "policy_service.socket", "is the milter's metrics.listen")
    sockets = [("milter socket", milter_socket)]
    if socket is not None:
        sockets.append(("policy service socket", socket))
    metrics = read_metrics(
        reader, fields.get("metrics"), sockets, "policy_service.metrics", milter_metrics
    )
    return PolicyServiceSettings(socket, metrics)


def _same_socket(one: str, other: str) -> bool:
    try:
        first, second = parse_socket_spec(one), parse_socket_spec(other)
    except SocketSpecError:
        return False
    if first.is_unix or second.is_unix:
        return first.is_unix and second.is_unix and first.path == second.path
    return second.port is not None and _same_port(one, second.host or "0.0.0.0", second.port)
