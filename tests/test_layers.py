"""The package's layers, read from its imports (the AST, every import, at any depth).

cli -> the front ends (milterd, policyd) -> daemon -> decision log, sync ->
config -> core -> base: each package imports only the layers below it (the
two front ends not each other, the sync and the decision log not each other),
nothing imports cli, no module imports another into a cycle, no
module uses another's private names, and the optional libraries are imported
only where they are used. docs/development.md draws the same picture.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from .support import REPO

PACKAGE = REPO / "relaymilter"

#: What each package may import of relaymilter besides itself (and the package's face,
#: relaymilter/__init__.py, which holds only the version).
MAY_IMPORT: Dict[str, Set[str]] = {
    "base": set(),
    "core": {"base"},
    "config": {"core", "base"},
    "decisionlog": {"core", "base"},
    "sync": {"config", "core", "base"},
    "daemon": {"decisionlog", "sync", "config", "core", "base"},
    "milterd": {"daemon", "decisionlog", "sync", "config", "core", "base"},
    "policyd": {"daemon", "decisionlog", "sync", "config", "core", "base"},
    "cli": {"milterd", "policyd", "daemon", "decisionlog", "sync", "config", "core", "base"},
    "__main__": {"cli"},
}
#: Libraries that only some modules may import (each is optional or heavy).
CONFINED: Dict[str, Tuple[str, ...]] = {
    "Milter": ("relaymilter.milterd.",),
    "milter": ("relaymilter.milterd.",),
    "prometheus_client": ("relaymilter.daemon.metrics",),
    "ldap": ("relaymilter.sync.sources.ldap",),
    "psycopg": ("relaymilter.sync.sources.postgresql",),
    "systemd": ("relaymilter.decisionlog.logsource",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> Iterator[Tuple[str, int, List[str]]]:
    """(module imported, line, names taken from it) for every import in a module."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if is_package(name) else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [alias.name for alias in node.names]
            submodules = [n for n in names if f"{source}.{n}" in MODULES]
            for submodule in submodules:
                yield f"{source}.{submodule}", node.lineno, []
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                yield source, node.lineno, rest


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def internal_edges() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _, _ in imports(name):
            if target in MODULES and target != name:
                edges[name].add(target)
    return edges


def test_every_module_is_in_a_layer() -> None:
    loose = [n for n in MODULES if n != "relaymilter" and layer(n) not in MAY_IMPORT]
    assert loose == [], "modules outside the layer packages"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for name in MODULES:
        own = layer(name)
        for target, line, _ in imports(name):
            if not target.startswith("relaymilter") or target == "relaymilter":
                continue
            other = layer(target)
            if other != own and other not in MAY_IMPORT.get(own, set()):
                wrong.append(f"{MODULES[name].relative_to(REPO)}:{line}: {name} imports {target}")
    assert wrong == []


def test_nothing_imports_the_cli() -> None:
    importers = [
        name
        for name in MODULES
        if layer(name) not in ("cli", "__main__")
        for target, _, _ in imports(name)
        if target == "relaymilter.cli" or target.startswith("relaymilter.cli.")
    ]
    assert importers == []


def test_no_import_cycle() -> None:
    edges = internal_edges()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: List[List[str]] = []

    def visit(name: str, path: List[str]) -> None:
        state[name] = 1
        for target in sorted(edges[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_private_name_is_used_across_modules() -> None:
    wrong = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text())
        aliases: Dict[str, str] = {}
        for target, line, names in imports(name):
            if target.startswith("relaymilter") and target != name:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                wrong.extend(f"{name}:{line}: {target}.{n}" for n in private)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name
        modules_here = {
            local
            for local, _ in aliases.items()
            if any(target.endswith("." + local) or target == local for target in MODULES)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules_here
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                wrong.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert wrong == []


def test_optional_libraries_are_imported_only_where_they_are_used() -> None:
    wrong = []
    for name in MODULES:
        for target, line, _ in imports(name):
            allowed = CONFINED.get(target.split(".")[0])
            if allowed is not None and not name.startswith(allowed) and name not in allowed:
                wrong.append(f"{name}:{line} imports {target}")
    assert wrong == []


@pytest.mark.parametrize(
    "module", ["relaymilter.cli", "relaymilter.config", "relaymilter.decisionlog.report"]
)
def test_the_command_line_loads_no_optional_library(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"loaded = sorted(m for m in {sorted(CONFINED)!r} if m in sys.modules)\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"
