"""Every tree the packaging tests boot, and their building ahead of the tests.

- ``base``, per release in ``RELEASES``: the packaging, unit and MTA tests'
  guests (container.base_recipe);
- ``floor``: Debian 11 with Python 3.9 and the floor's library versions from
  PyPI, for the RHEL 9 floor (test_floor.py);
- ``harness``, per release other than this machine's: that release's Python
  libraries and the servers and tools scripts/bootstrap-tools unpacks, for the
  harness's own tests there (test_harness_releases.py).

``python -m tests.packaging.trees prebuild`` builds those not cached yet, one
after the other. scripts/test starts it in the background while the tests
that need no tree run: on a fresh machine the trees are then ready (or being
finished; ``ensure_tree``'s lock makes a test wait) by the time the packaging
tests boot them. Needs root, and the virtualenv (the floor is read with
dependencies.py).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time
from types import FrameType
from typing import List, Optional, Sequence

from . import dependencies
from .container import (
    RELEASES,
    REPO,
    TreeRecipe,
    base_recipe,
    ensure_tree,
    entry_point_hooks,
    host_release,
    log,
    pip_install_hooks,
)

SOURCE = "/src"

# -- the floor ----------------------------------------------------------------------------

#: Debian 11: Python 3.9, as RHEL 9.
FLOOR_RELEASE = "bullseye"
FLOOR_VENV = "/opt/floor"
#: The newest releases of the test tools that still run on Python 3.9.
FLOOR_TEST_TOOLS = ("pytest==8.4.2", "hypothesis==6.141.1", "miltertest==1.0.0")
#: What building the floor's libraries from source needs, and what they run with.
FLOOR_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "pkg-config",
    "libmilter-dev",
    "libsystemd-dev",
    "libldap2-dev",
    "libsasl2-dev",
    "libpq5",
    "publicsuffix",
)
#: The layers that need no server or MTA; their tests marked "tools" are left out too.
FLOOR_LAYERS = (
    "tests/core",
    "tests/config",
    "tests/base",
    "tests/decisionlog",
    "tests/cli",
    "tests/daemon",
    "tests/sync/test_sync.py",
    "tests/test_layers.py",
)


def floor_pins() -> List[str]:
    return [f"{name}=={version}" for name, version in sorted(dependencies.floor().items())]


def floor_recipe() -> TreeRecipe:
    return TreeRecipe(
        "floor",
        FLOOR_RELEASE,
        FLOOR_PACKAGES,
        customize_hooks=(
            # The daemon tests resolve localhost.
            'printf "127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost\\n" > "$1/etc/hosts"',
            f'chroot "$1" python3 -m venv {FLOOR_VENV}',
            *pip_install_hooks(FLOOR_VENV, [*floor_pins(), *FLOOR_TEST_TOOLS]),
            *entry_point_hooks(FLOOR_VENV),
            'chroot "$1" apt-get clean',
        ),
        expected_seconds="60-120",
    )


# -- the harness on the other release -----------------------------------------------------

HARNESS_VENV = "/opt/harness"
TOOLS_SCRIPT = REPO / "scripts" / "bootstrap-tools"
#: The release's own packages of what scripts/bootstrap installs from the archive.
HARNESS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "iproute2",
    "python3",
    "python3-venv",
    "python3-pytest",
    "python3-hypothesis",
    "python3-milter",
    "python3-yaml",
    "python3-cryptography",
    "python3-sdnotify",
    "python3-idna",
    "python3-systemd",
    "python3-prometheus-client",
    "python3-ldap",
    "python3-psycopg",
    "ldap-utils",
    "publicsuffix",
    "tzdata",
)
HARNESS_TESTS = (
    "tests/sync",
    "tests/daemon/test_metrics.py",
    # The policy service over its socket on the release's Python (3.13 on
    # Debian 13, whose asyncio treats a unix server's socket file differently;
    # the milter runs there from the package, in test_unit.py and test_mta.py).
    "tests/policyd",
    "tests/decisionlog/test_syslog.py",
    # Its benchmark downloads Sendmail for the end-to-end harness: the guest
    # has no network (the end-to-end tests run on Debian 12 only).
    "--deselect=tests/daemon/test_metrics.py::test_benchmark_counts_every_decision_through_postfix",
)


def other_releases() -> List[str]:
    return [release for release in RELEASES if release != host_release()]


def harness_recipe(release: str) -> TreeRecipe:
    digest = hashlib.sha256(TOOLS_SCRIPT.read_bytes()).hexdigest()[:12]
    return TreeRecipe(
        "harness",
        release,
        HARNESS_PACKAGES,
        customize_hooks=(
            'printf "127.0.0.1\\tlocalhost\\n::1\\tlocalhost ip6-localhost\\n" > "$1/etc/hosts"',
            # scripts/bootstrap-tools as it is now (its hash names the tree).
            f'cp {TOOLS_SCRIPT} "$1/root/bootstrap-tools"  # sha256 {digest}',
            'chroot "$1" sh /root/bootstrap-tools',
            # miltertest is on PyPI only; the rest is the release's own.
            f'chroot "$1" python3 -m venv --system-site-packages {HARNESS_VENV}',
            *pip_install_hooks(HARNESS_VENV, ["miltertest==1.0.0"]),
            *entry_point_hooks(HARNESS_VENV),
            'chroot "$1" apt-get clean',
        ),
        expected_seconds="45-90",
    )


# -- building ahead ------------------------------------------------------------------------


def all_recipes() -> List[TreeRecipe]:
    """In the order the packaging tests boot them."""
    return [
        *(base_recipe(release) for release in RELEASES),
        floor_recipe(),
        *(harness_recipe(release) for release in other_releases()),
    ]


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    # Lets ensure_tree stop mmdebstrap and remove its half-built tree.
    raise KeyboardInterrupt(f"signal {signum}")


def prebuild() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    failed = 0
    for recipe in all_recipes():
        started = time.monotonic()
        try:
            tree = ensure_tree(recipe)
        except Exception as exc:  # the test that needs it builds it again, and says why
            log(f"prebuild: {recipe.kind}: {exc}")
            failed += 1
            continue
        tree.release()
        state = f"built in {tree.built_in:.1f} s" if tree.built_in else "cached"
        log(f"prebuild: {recipe.kind} {state} ({time.monotonic() - started:.1f} s)")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.packaging.trees", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("command", choices=["prebuild", "list"])
    args = parser.parse_args(argv)
    if args.command == "list":
        for recipe in all_recipes():
            print(recipe.kind)
        return 0
    return prebuild()


if __name__ == "__main__":
    sys.exit(main())
