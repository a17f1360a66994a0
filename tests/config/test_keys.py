"""config/keys.py, the one table of every mapping's keys, against relaymilter.yml(5), both ways.

The page marks each mapping's list of keys with a roff comment
``.\\" keys: PATH`` (invisible in the rendered page); the ``.TP`` entries at that
level are its keys. A key the loader takes must be documented there, a key
documented there must be taken, and a key the page calls required must be so.
"""

from __future__ import annotations

import re
import shlex
from typing import Dict, List, Set, Tuple

import pytest
from yaml.nodes import MappingNode

from relaymilter.config import keys
from relaymilter.config.reader import NodeReader, compose

from ..support import REPO

MAN5 = REPO / "docs" / "man" / "relaymilter.yml.5"
_MARK = re.compile(r'^\.\\" keys: (.+)$')
_KEY = re.compile(r"^[a-z_]+$")


def entry_keys(line: str) -> List[Tuple[str, bool]]:
    """The keys a ``.TP`` entry's tag names, each with whether it says "(required".

    ``.B key``, ``.BR key " (default ...)"``, ``.BR a ", " b ", " c``: in ``.BR``
    the odd arguments are bold; a bold argument is a key when it comes first or
    after a separator ending in ", " or " and ".
    """
    macro, _, rest = line.partition(" ")
    arguments = shlex.split(rest.replace("\\-", "-"))
    if macro == ".B":
        return [(a, False) for a in arguments[:1] if _KEY.match(a)]
    if macro != ".BR":
        return []
    found = []
    for index in range(0, len(arguments), 2):
        bold = arguments[index]
        before = arguments[index - 1] if index else ", "
        after = arguments[index + 1] if index + 1 < len(arguments) else ""
        if _KEY.match(bold) and (before.endswith(", ") or before.endswith(" and ")):
            found.append((bold, "(required" in after))
    return found


def documented() -> Dict[str, Dict[str, bool]]:
    """Mapping path -> {key: documented as required}, from the page's markers."""
    lines = MAN5.read_text().splitlines()
    result: Dict[str, Dict[str, bool]] = {}
    for start, line in enumerate(lines):
        mark = _MARK.match(line)
        if mark is None:
            continue
        path = "" if mark.group(1) == "(the file)" else mark.group(1)
        assert path not in result, f"{path!r} is marked twice"
        found: Dict[str, bool] = {}
        depth = 0
        for number in range(start + 1, len(lines)):
            text = lines[number]
            if text.startswith((".SH", ".SS")):
                break
            if text.startswith(".RS"):
                depth += 1
            elif text.startswith(".RE"):
                depth -= 1
                if depth < 0:
                    break
            elif text == ".TP" and depth == 0:
                found.update(entry_keys(lines[number + 1]))
        result[path] = found
    return result


DOCUMENTED = documented()


def test_every_mapping_is_documented_and_every_documented_mapping_exists() -> None:
    assert sorted(DOCUMENTED) == sorted(keys.MAPPINGS)


@pytest.mark.parametrize("path", sorted(keys.MAPPINGS))
def test_the_keys_the_loader_takes_are_the_keys_the_page_documents(path: str) -> None:
    taken = set(keys.MAPPINGS[path].allowed)
    described = set(DOCUMENTED.get(path, {}))
    assert sorted(taken - described) == [], f"{path}: taken but not documented"
    assert sorted(described - taken) == [], f"{path}: documented but not taken"


@pytest.mark.parametrize("path", sorted(keys.MAPPINGS))
def test_what_the_page_calls_required_is_required(path: str) -> None:
    table = keys.MAPPINGS[path]
    required: Set[str] = set(table.required) | set(table.required_without_sources)
    said = {key for key, is_required in DOCUMENTED.get(path, {}).items() if is_required}
    assert sorted(said - required) == []


def test_the_reader_reports_an_unknown_key_with_the_tables_keys() -> None:
    text = "organizations:\n  - name: a\n    colour: red\n"
    root = compose(text, "x.yml")
    assert isinstance(root, MappingNode)
    reader = NodeReader("x.yml", text)
    item = root.value[0][1].value[0]
    reader.fields(item, "organizations[0]", keys.ORGANIZATION)
    assert [str(e) for e in reader.errors] == [
        "x.yml:3: organizations[0].colour: unknown key (allowed: "
        + ", ".join(keys.ORGANIZATION.allowed)
        + ")"
    ]


def test_the_marker_parser_reads_the_forms_the_page_uses() -> None:
    assert entry_keys('.BR name " (required)"') == [("name", True)]
    assert entry_keys('.BR code " (default " 550 )') == [("code", False)]
    assert entry_keys('.BR organizations " (required without " sources )') == [
        ("organizations", True)
    ]
    assert entry_keys('.BR a ", " b " and " c') == [("a", False), ("b", False), ("c", False)]
    assert entry_keys('.BR filter " (required), " base') == [("filter", True), ("base", False)]
    assert entry_keys(".B text") == [("text", False)]
