"""The test harness on the other Debian release: its servers and tools, found there.

The suite runs on Debian 12. The harness must not assume it: PostgreSQL's
version (15 there, 17 in Debian 13), slapd's libslapi (``libslapi-2.5.so.0``,
``libslapi.so.2``), promtool's package (in ``prometheus``, or ``promtool``
of its own), psycopg (3.1, 3.2). This builds a tree of each other release in
``container.RELEASES`` with that release's Python libraries, runs
scripts/bootstrap-tools in it as on a fresh machine (unpacking the servers
and tools the archive offers), and runs there the tests that use them: the
sync sources against real slapd and PostgreSQL, the alert rules and the
dashboard through promtool, the decision lines through rsyslog, and the
metrics through a private Postfix.

The tree (about a minute to build) is cached like the others.
"""

from __future__ import annotations

import time
from typing import Iterator

import pytest

from . import container
from .conftest import GUEST_TIMES, guest_label, require_root, require_tools, run_tests_in
from .container import Guest
from .trees import HARNESS_TESTS, HARNESS_VENV, SOURCE, harness_recipe, other_releases


@pytest.fixture(scope="module", params=other_releases())
def harness_guest(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guest]:
    require_root("boots a throwaway systemd container")
    require_tools("mmdebstrap", "nsenter", "mount", "umount")
    release = str(request.param)
    started = time.monotonic()
    times = GUEST_TIMES.setdefault(guest_label("harness guest", release), {})
    tree = container.ensure_tree(harness_recipe(release))
    try:
        nspawn = container.find_nspawn() or container.ensure_nspawn()
        with Guest(tree.path, nspawn, tmp_path_factory.mktemp(f"harness-{release}")) as guest:
            times.update(boot=guest.boot_seconds or 0, base=tree.built_in or 0)
            container.copy_checkout(guest.root / SOURCE.lstrip("/"))
            yield guest
    finally:
        tree.release()
        times["total"] = time.monotonic() - started


def test_the_servers_and_tools_are_the_releases(harness_guest: Guest) -> None:
    tools = "/var/cache/relaymilter-test-tools"
    found = harness_guest.sh(
        f"ls -d {tools}/postgresql/usr/lib/postgresql/*/bin {tools}/promtool/usr/bin/promtool"
        f" {tools}/slapd/usr/lib/*/libslapi* {tools}/rsyslog/usr/sbin/rsyslogd"
    )
    assert found.count("\n") >= 4, found


def test_the_harness_tests_pass_there(harness_guest: Guest) -> None:
    what = f"the harness's tests in {harness_guest.base.name}"
    run_tests_in(harness_guest, HARNESS_VENV, " ".join(HARNESS_TESTS), what)
