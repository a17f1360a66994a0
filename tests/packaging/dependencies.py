"""The runtime dependencies the packages declare, with their minimum versions.

The .rpm's spec is the one place the floor is written: the oldest version of
each library that RHEL 9 + EPEL 9 or Debian 12 ships. ``floor()`` reads it
from there (the floor test installs exactly those versions from PyPI); the
.deb's control file and pyproject.toml must declare the same minimums, under
their own names (tests/packaging/test_sources.py compares them).
"""

from __future__ import annotations

import re
from typing import Dict

import tomllib

from ..support import REPO

SPEC = REPO / "packaging" / "rpm" / "relaymilter.spec"
CONTROL = REPO / "packaging" / "debian" / "control"
PYPROJECT = REPO / "pyproject.toml"

#: Each library by its name on PyPI, in EL 9 + EPEL 9, and in Debian.
NAMES = {
    "pymilter": ("python3-pymilter", "python3-milter"),
    "PyYAML": ("python3-pyyaml", "python3-yaml"),
    "cryptography": ("python3-cryptography", "python3-cryptography"),
    "sdnotify": ("python3-sdnotify", "python3-sdnotify"),
    "idna": ("python3-idna", "python3-idna"),
    "systemd-python": ("python3-systemd", "python3-systemd"),
    "prometheus_client": ("python3-prometheus_client", "python3-prometheus-client"),
    "python-ldap": ("python3-ldap", "python3-ldap"),
    "psycopg": ("python3-psycopg3", "python3-psycopg"),
}

_SPEC_LINE = re.compile(
    r"^(?:Requires|Recommends|Suggests):\s+(\S+)\s+>=\s+(\S+)\s*$", re.MULTILINE
)
_CONTROL_ITEM = re.compile(r"([a-z0-9][a-z0-9+.-]+)\s+\(>=\s*([^)\s]+)\)")
_PYPROJECT_ITEM = re.compile(r"^([A-Za-z0-9_.-]+)>=(\S+)$")


def _by_pypi_name(declared: Dict[str, str], column: int) -> Dict[str, str]:
    return {
        pypi: declared[names[column]] for pypi, names in NAMES.items() if names[column] in declared
    }


def python_floor() -> str:
    """The oldest Python the .rpm accepts (``python3 >= X``)."""
    return dict(_SPEC_LINE.findall(SPEC.read_text()))["python3"]


def floor() -> Dict[str, str]:
    """PyPI name -> the .rpm's minimum version: Requires, Recommends and Suggests."""
    return _by_pypi_name(dict(_SPEC_LINE.findall(SPEC.read_text())), 0)


def debian_minimums() -> Dict[str, str]:
    """PyPI name -> the .deb's minimum version (Depends, Recommends, Suggests)."""
    return _by_pypi_name(dict(_CONTROL_ITEM.findall(CONTROL.read_text())), 1)


def pyproject_minimums() -> Dict[str, str]:
    """PyPI name -> pyproject.toml's minimum: dependencies and the optional ones but dev."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    items = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "dev":
            items += requirements
    found = dict(match.groups() for match in map(_PYPROJECT_ITEM.match, items) if match is not None)
    return {name: found[name] for name in NAMES if name in found}
