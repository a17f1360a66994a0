"""Fixtures for the packaging tests: the .deb and .rpm, built once per session.

The builds run packaging/build-deb and packaging/build-rpm, which fail unless
lintian and rpmlint are clean, into a temporary dist directory (the
checkout's dist/ is left alone).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

from ..support import REPO

# Debian's tools and python3 first: never a pyenv or venv interpreter.
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Build:
    package: Path
    output: str


def require_tools(*tools: str, optional: bool = False) -> None:
    """Skip (locally) or fail (in CI, where scripts/bootstrap installs them) without the tools.

    ``optional``: a tool scripts/bootstrap does not promise; skip, with the reason, even in CI.
    """
    missing = [tool for tool in tools if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        if optional:
            pytest.skip(f"missing {', '.join(missing)} (not installed by scripts/bootstrap)")
        message = f"missing {', '.join(missing)} (scripts/bootstrap installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def run(command: List[str], timeout: float = 300, **kwargs: object) -> str:
    """Run a command with the system PATH; fail the test with its output if it fails."""
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PATH": SYSTEM_PATH, "DEBIAN_FRONTEND": "noninteractive"},
        **kwargs,  # type: ignore[call-overload]
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output}"
    return output


@pytest.fixture(scope="session")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="session")
def deb(dist_dir: Path) -> Build:
    require_tools("dpkg-buildpackage", "dh", "lintian", "git")
    output = run([str(REPO / "packaging" / "build-deb"), str(dist_dir)])
    (package,) = dist_dir.glob("relaymilter_*_all.deb")
    return Build(package, output)


@pytest.fixture(scope="session")
def rpm(dist_dir: Path) -> Build:
    require_tools("rpmbuild", "rpmlint", "git")
    output = run([str(REPO / "packaging" / "build-rpm"), str(dist_dir)])
    (package,) = dist_dir.glob("relaymilter-*.noarch.rpm")
    return Build(package, output)
