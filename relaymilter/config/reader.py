"""Reading a YAML node tree against the schema: the generic part every section uses.

``NodeReader`` checks a mapping's keys against its entry in ``keys``, reads
scalars, strings, names, choices and lists, and collects every error and
warning with the file, line and key path, so that one load reports them all.
The sections (``service``, ``organizations``, ``sources``, ``snapshot``) are
written on top of it.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ..base.safefile import UnsafeFileError, read_regular_file
from .errors import ConfigError, ConfigIssue
from .keys import Keys
from .origins import OriginIndex, origins

#: A mapping's entry: its key node and its value node.
Field = Tuple[ScalarNode, Node]
# libyaml's composer when PyYAML has it: a 100,000-domain file loads 3x faster.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG = "tag:yaml.org,2002:str"


def read_text(path: str, limit: int, what: str) -> str:
    """A file's text; ConfigError naming it when it is unsafe, unreadable or not UTF-8."""
    try:
        return read_regular_file(path, limit, what).decode("utf-8")
    except UnsafeFileError as exc:
        raise ConfigError(
            [ConfigIssue(path, None, "", f"cannot read {what}: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError as exc:
        issue = ConfigIssue(path, None, "", f"cannot read {what}: not UTF-8 ({exc})")
        raise ConfigError([issue]) from None


def compose(text: str, path: str) -> Optional[Node]:
    """The YAML node tree of a file's text; ConfigError with the line when it is not YAML."""
    try:
        return yaml.compose(text, Loader=LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(path, line, "", f"not valid YAML: {problem}")]) from None


class NodeReader:
    """Walks a YAML node tree, checking it against the schema and collecting issues."""

    def __init__(self, path: str, text: str = "") -> None:
        #: The file being read: the config file, then the snapshot.
        self.path = path
        self.config_path = path
        self.text = text
        self.errors: List[ConfigIssue] = []
        self.warnings: List[ConfigIssue] = []
        #: Relative paths in the config file are relative to its directory.
        self.base_dir = os.path.dirname(os.path.abspath(path))
        #: The snapshot being read (its label and text), for the origins of its items.
        self.snapshot: Optional[Tuple[str, str]] = None
        self._origins: Optional[OriginIndex] = None
        self._constructor: Optional[yaml.constructor.SafeConstructor] = None

    # -- reporting ---------------------------------------------------------

    def error(self, node: Optional[Node], path: str, message: str) -> None:
        self.errors.append(self._issue(line_of(node), path, message))

    def warn(self, node: Optional[Node], path: str, message: str) -> None:
        self.warnings.append(self._issue(line_of(node), path, message))

    def _issue(self, line: Optional[int], path: str, message: str) -> ConfigIssue:
        return ConfigIssue(self.path, line, path, message, self.origin(self.path, line))

    def read_snapshot(self, label: str, text: str) -> None:
        """From now on, issues are the snapshot's (named ``label``), with their items' origins."""
        self.snapshot = (label, text)
        self.path = label

    def origin(self, file: str, line: Optional[int]) -> Optional[str]:
        """A snapshot item's origin, from the comment above it (indexed on the first error)."""
        if self.snapshot is None or file != self.snapshot[0]:
            return None
        if self._origins is None:
            self._origins = origins(self.snapshot[1])
        return self._origins.at(line)

    def sorted_errors(self) -> List[ConfigIssue]:
        """The config file's errors first, then the snapshot's, each in line order."""
        return sorted(
            self.errors, key=lambda issue: (issue.file != self.config_path, issue.line or 0)
        )

    # -- generic shapes ----------------------------------------------------

    def fields(
        self, node: Node, path: str, keys: Keys, required: Optional[Sequence[str]] = None
    ) -> Optional[Dict[str, Field]]:
        """The keys of a mapping node, with unknown, duplicate and missing keys reported.

        ``required``: the keys that must be there, when not ``keys.required``.
        """
        allowed = keys.allowed
        if not isinstance(node, MappingNode):
            self.error(node, path, f"must be a mapping with keys {', '.join(allowed)}")
            return None
        found: Dict[str, Field] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            key_path = join_path(path, printable(str(key)))
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
        for key in keys.required if required is None else required:
            if key not in found:
                self.error(node, join_path(path, key), "required key is missing")
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
            self.error(node, path, f"must be {what}, not {describe_value(value)}{hint}")
            return None
        return value

    def _construct(self, node: Node) -> Any:
        # A constructor remembers every object it made: one per read, not one per process.
        if self._constructor is None:
            self._constructor = yaml.constructor.SafeConstructor()
        return self._constructor.construct_object(node)

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

    def relative_path(self, node: Node, path: str) -> Optional[str]:
        """A file name, relative to the config file's directory."""
        text = self.string(node, path)
        return os.path.join(self.base_dir, text) if text is not None else None


def line_of(node: Optional[Node]) -> Optional[int]:
    return node.start_mark.line + 1 if node is not None else None


def printable(text: str) -> str:
    """A key as read, with control and invisible characters escaped (it is printed)."""
    return text if text.isprintable() else ascii(text)[1:-1]


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    return f"{type(value).__name__} {value!r}"
