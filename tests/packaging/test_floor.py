"""The RHEL 9 floor: the code's tests on Python 3.9 with the oldest libraries the packages accept.

RHEL 9's Python is 3.9, and its libraries (with EPEL 9's) are older than
Debian 12's. The packages declare those oldest versions as their minimums
(packaging/rpm/relaymilter.spec, read by ``dependencies.floor()``). This
runs the tests of every layer that needs no server or MTA under exactly those
versions: in a container of Debian 11 "bullseye", whose Python is 3.9 too,
with a virtualenv holding the floor's versions from PyPI (pymilter, python-ldap
and systemd-python built there against bullseye's libmilter, libldap and
libsystemd).

The tree (mmdebstrap, then pip; about 2 minutes) is cached like the packaging
guests' trees, under a name hashed from its recipe: a change of the floor
builds a new one. The checkout is copied into the guest; nothing is installed
on this machine.
"""

from __future__ import annotations

import time
from typing import Dict, Iterator

import pytest

from . import container, dependencies
from .conftest import GUEST_TIMES, require_root, require_tools, run_tests_in
from .container import Guest
from .trees import FLOOR_LAYERS, FLOOR_VENV, SOURCE, floor_recipe


@pytest.fixture(scope="module")
def floor_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    require_root("boots a throwaway systemd container")
    require_tools("mmdebstrap", "nsenter", "mount", "umount")
    started = time.monotonic()
    times = GUEST_TIMES.setdefault("floor guest, Debian 11 (bullseye), Python 3.9", {})
    logs = tmp_path_factory.mktemp("floor-guest-logs")
    recipe = floor_recipe()
    tree = container.ensure_tree(recipe)
    try:
        nspawn = container.find_nspawn() or container.ensure_nspawn()
        with Guest(tree.path, nspawn, logs) as guest:
            times.update(boot=guest.boot_seconds or 0, base=tree.built_in or 0)
            container.copy_checkout(guest.root / SOURCE.lstrip("/"))
            yield guest
    finally:
        tree.release()
        times["total"] = time.monotonic() - started


def installed_versions(guest: Guest) -> Dict[str, str]:
    frozen = guest.run(f"{FLOOR_VENV}/bin/python", "-m", "pip", "freeze", "--all").stdout
    pairs = (line.split("==", 1) for line in frozen.splitlines() if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pairs}


def test_the_floor_is_what_is_installed(floor_guest: Guest) -> None:
    version = floor_guest.run(f"{FLOOR_VENV}/bin/python", "-c", "import sys; print(sys.version)")
    assert version.stdout.startswith(dependencies.python_floor() + "."), version.stdout
    installed = installed_versions(floor_guest)
    for name, minimum in dependencies.floor().items():
        assert installed.get(name.lower().replace("_", "-")) == minimum, (name, installed)


def test_the_layers_pass_on_the_floor(floor_guest: Guest) -> None:
    arguments = f"-m 'not tools' {' '.join(FLOOR_LAYERS)}"
    run_tests_in(floor_guest, FLOOR_VENV, arguments, "the floor's tests on Python 3.9")
