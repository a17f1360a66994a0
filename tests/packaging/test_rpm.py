"""The .rpm: built rpmlint-clean; its metadata, files and scriptlets; installed in a private root.

Debian's rpm cannot install into / for real (no rpm database of Debian's
packages, so no dependencies), so the payload goes to a private --root without
scriptlets, and the installed code runs with Debian's python3 and libraries.
The scriptlets are read and syntax-checked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from ..support import REPO, MilterSession, free_port, wait_for_socket
from . import dependencies
from .conftest import SYSTEM_PATH, Build, require_tools, run

pytestmark = pytest.mark.packaging

CONF = "/etc/relaymilter/relaymilter.yml"


def rpm_query(package: Path, *args: str, db: Path) -> str:
    # --dbpath: Debian's rpm would otherwise create ~/.rpmdb.
    return run(["rpm", "--dbpath", str(db), "-qp", *args, str(package)])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "rpmdb"


def test_build_is_rpmlint_clean(rpm: Build) -> None:
    assert "build-rpm: rpmlint clean" in rpm.output
    assert "0 errors, 0 warnings" in rpm.output


def test_metadata_and_requires(rpm: Build, db: Path) -> None:
    header = rpm_query(rpm.package, "--qf", "%{NAME} %{VERSION} %{ARCH} %{LICENSE}", db=db)
    assert header == "relaymilter 0.1.0 noarch GPL-2.0-or-later"
    requires = set(rpm_query(rpm.package, "--requires", db=db).splitlines())
    for requirement in [
        f"python3 >= {dependencies.python_floor()}",
        "publicsuffix-list",
        "shadow-utils",
        "systemd",
        "/usr/bin/python3",
    ]:
        assert requirement in requires, requirement
    # The floor, in the built package: required, recommended (the journal,
    # metrics) or suggested (relaymilter sync's ldap and postgresql sources).
    weak = {
        kind: set(rpm_query(rpm.package, f"--{kind}", db=db).splitlines())
        for kind in ("recommends", "suggests")
    }
    declared = requires | weak["recommends"] | weak["suggests"]
    for name, minimum in dependencies.floor().items():
        assert f"{dependencies.NAMES[name][0]} >= {minimum}" in declared, name
    assert {"python3-ldap >= 3.4.3", "python3-psycopg3 >= 3.1.7"} <= weak["suggests"]
    # One noarch rpm for EL 9's python3.9 and Fedora's: no python(abi) pin.
    assert not [r for r in requires if r.startswith("python(abi)")]


def file_table(rpm: Build, db: Path) -> Dict[str, List[str]]:
    """path -> [mode, user, group, flags] for every file in the package."""
    fmt = (
        "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags}. %{FILENAMES}\n]"
    )
    table = {}
    for line in rpm_query(rpm.package, "--qf", fmt, db=db).splitlines():
        mode, user, group, flags, path = line.split(" ", 4)
        table[path] = [mode, user, group, flags.rstrip(".")]
    return table


def test_files_modes_and_config(rpm: Build, db: Path) -> None:
    files = file_table(rpm, db)
    assert files[CONF] == ["-rw-r-----", "root", "relaymilter", "cn"]  # %config(noreplace)
    assert files["/usr/bin/relaymilter"][0] == "-rwxr-xr-x"
    for path in [
        "/usr/lib/systemd/system/relaymilter.service",
        "/usr/lib/systemd/system/relaymilter-sync.service",
        "/usr/lib/systemd/system/relaymilter-sync.timer",
        "/usr/lib/systemd/system/relaymilter-policy.service",
        "/usr/lib/systemd/system/relaymilter-policy.socket",
        "/usr/lib/sysusers.d/relaymilter.conf",
        "/usr/share/man/man8/relaymilter.8.gz",
        "/usr/share/man/man5/relaymilter.yml.5.gz",
        "/usr/share/relaymilter/relaymilter/cli/__init__.py",
        "/usr/share/relaymilter/relaymilter/decisionlog/journal.py",
        "/usr/share/doc/relaymilter/install.md",
        "/usr/share/doc/relaymilter/postfix.md",
        "/usr/share/doc/relaymilter/sendmail.md",
        "/usr/share/doc/relaymilter/operations.md",
        "/usr/share/doc/relaymilter/examples/main.cf.relaymilter",
        "/usr/share/doc/relaymilter/examples/main.cf.relaymilter-policy",
        "/usr/share/doc/relaymilter/examples/relaymilter.mc",
        "/usr/share/doc/relaymilter/examples/relaymilter.rules.yml",
        "/usr/share/doc/relaymilter/examples/relaymilter.json",
        "/usr/share/doc/relaymilter/examples/relaymilter-report.service",
        "/usr/share/doc/relaymilter/examples/relaymilter-report.timer",
    ]:
        assert path in files, path
    # Every module, subpackages too (pyproject.toml lists the packages).
    for module in sorted((REPO / "relaymilter").rglob("*.py")):
        path = f"/usr/share/relaymilter/{module.relative_to(REPO)}"
        assert path in files, f"{path} is not in the package"
    if (REPO / "etc" / "relaymilter" / "postgresql-schema.sql").exists():
        assert "/usr/share/doc/relaymilter/examples/postgresql-schema.sql" in files
    assert [p for p in files if p.startswith("/usr/share/licenses/")], "no %license"


def scriptlets(rpm: Build, db: Path) -> Dict[str, str]:
    """{"preinstall": body, ...} from rpm --scripts."""
    text = rpm_query(rpm.package, "--scripts", db=db)
    parts = re.split(r"^(\w+) scriptlet \(using /bin/sh\):\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_scriptlets(rpm: Build, db: Path) -> None:
    scripts = scriptlets(rpm, db)
    assert set(scripts) == {"preinstall", "postinstall", "preuninstall", "postuninstall"}
    assert "useradd -r -g relaymilter" in scripts["preinstall"]
    assert "systemctl --no-reload preset relaymilter.service" in scripts["postinstall"]
    # Preset, not enabled: no preset enables relaymilter-sync.timer.
    assert "relaymilter-sync.timer" in scripts["postinstall"]
    assert not re.search(r"systemctl\b[^\n]*\benable\b", scripts["postinstall"])
    assert "install -d -o relaymilter -g postfix -m 2750" in scripts["postinstall"]
    assert "disable --now relaymilter.service" in scripts["preuninstall"]
    assert "relaymilter-sync.timer" in scripts["preuninstall"]
    assert "try-restart relaymilter.service" in scripts["postuninstall"]
    assert "rm -rf /run/relaymilter" in scripts["postuninstall"]

    # The policy service's units: preset (so, on Fedora and EL, disabled), and
    # disabled and stopped on erase; an upgrade restarts a running service and
    # leaves its socket to systemd; the socket file goes with the package.
    def listed(script: str, command: str) -> List[str]:
        # The command's words up to the redirection, continuation lines joined.
        text = scripts[script].replace("\\\n", " ")
        match = re.search(rf"{command} ([^>]*)>", text)
        assert match, (script, command)
        return match.group(1).split()

    policy = ["relaymilter-policy.socket", "relaymilter-policy.service"]
    assert listed("postinstall", "preset")[-2:] == policy
    assert listed("preuninstall", "disable --now")[-2:] == policy
    restarted = listed("postuninstall", "try-restart")
    assert "relaymilter-policy.service" in restarted
    assert "relaymilter-policy.socket" not in restarted
    assert "rm -f /var/spool/postfix/private/relaymilter-policy" in scripts["postuninstall"]
    for name, body in scripts.items():
        result = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"


@pytest.fixture
def root(rpm: Build, tmp_path: Path) -> Path:
    """The rpm's payload installed in a private root, with its user as %pre would add it."""
    require_tools("rpm")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    # rpm resolves the owner names of %attr against the root's own files.
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nrelaymilter:x:995:995::/:/sbin/nologin\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nrelaymilter:x:995:\n")
    run(["rpm", "--root", str(root), "--initdb"])
    # --nodeps: Debian's packages are not in this rpm database.
    run(["rpm", "--root", str(root), "-i", "--nodeps", "--noscripts", str(rpm.package)])
    return root


def test_installs_and_verifies_in_a_private_root(rpm: Build, root: Path) -> None:
    assert run(["rpm", "--root", str(root), "-V", "--nodeps", "relaymilter"]) == ""
    info = (root / CONF.lstrip("/")).stat()
    assert (oct(info.st_mode & 0o777), info.st_uid, info.st_gid) == ("0o640", 0, 995)
    # An edited config survives a reinstall, and is kept as .rpmsave on erase.
    config = root / CONF.lstrip("/")
    config.write_text(config.read_text() + "# edited\n")
    upgrade = ["rpm", "--root", str(root), "-U", "--replacepkgs", "--nodeps", "--noscripts"]
    run([*upgrade, str(rpm.package)])
    assert config.read_text().endswith("# edited\n")
    run(["rpm", "--root", str(root), "-e", "--nodeps", "--noscripts", "relaymilter"])
    assert not (root / "usr" / "bin" / "relaymilter").exists()
    assert (root / "etc" / "relaymilter" / "relaymilter.yml.rpmsave").exists()


def wrapper(root: Path) -> Path:
    """The rpm's /usr/bin/relaymilter, pointed at the private root's code directory."""
    text = (root / "usr" / "bin" / "relaymilter").read_text()
    assert text.startswith("#!/usr/bin/python3\n")
    relocated = root / "relaymilter-wrapper"
    relocated.write_text(
        text.replace('"/usr/share/relaymilter"', f'"{root}/usr/share/relaymilter"')
    )
    return relocated


def test_the_installed_entry_point_runs_on_the_system_python(root: Path) -> None:
    entry = wrapper(root)
    python = ["/usr/bin/python3", "-I", str(entry)]  # -I: nothing from the checkout or venv
    assert run([*python, "--version"]).strip() == "relaymilter 0.1.0"
    output = run([*python, "check-config", "-c", str(root / CONF.lstrip("/"))])
    assert "OK: 1 organization" in output
    spec = f"inet:{free_port()}@127.0.0.1"
    command = [*python, "run", "-c", str(root / CONF.lstrip("/")), "--socket", spec]
    process = subprocess.Popen(
        command,
        env={"PATH": SYSTEM_PATH},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(spec, process)
        session = MilterSession(spec)
        session.negotiate()
        session.connect("192.0.2.10")
        session.mail("<app@example.net>")
        assert session.rcpt("<someone@example.org>").startswith("550 5.7.64 ")
        session.close()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert process.stderr is not None
        log = process.stderr.read().decode()
        process.stderr.close()
    assert "action=reject" in log, log
    # The wrapper's path wins over anything else on the system python's path.
    code = f"import sys; sys.path.insert(0, {str(root / 'usr/share/relaymilter')!r}); "
    code += "import relaymilter; print(relaymilter.__file__)"
    where = run(["/usr/bin/python3", "-I", "-c", code]).strip()
    assert where == f"{root}/usr/share/relaymilter/relaymilter/__init__.py"


def test_sysusers_and_unit_are_the_shared_ones(root: Path) -> None:
    repo = Path(__file__).resolve().parents[2] / "packaging"
    unit = root / "usr" / "lib" / "systemd" / "system" / "relaymilter.service"
    sysusers = root / "usr" / "lib" / "sysusers.d" / "relaymilter.conf"
    assert unit.read_text() == (repo / "relaymilter.service").read_text()
    assert sysusers.read_text() == (repo / "relaymilter.sysusers").read_text()
    for name in (
        "relaymilter-sync.service",
        "relaymilter-sync.timer",
        "relaymilter-policy.service",
        "relaymilter-policy.socket",
    ):
        shipped = root / "usr" / "lib" / "systemd" / "system" / name
        assert shipped.read_text() == (repo / name).read_text(), name
    assert os.access(root / "usr" / "bin" / "relaymilter", os.X_OK)
