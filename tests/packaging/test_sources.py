"""The packaging sources agree with each other and with the code: versions, unit, man pages."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import tomllib

import relaymilter
from relaymilter.cli import build_parser
from relaymilter.config import parse_config

from ..support import REPO
from . import dependencies

pytestmark = pytest.mark.packaging

UNIT = REPO / "packaging" / "relaymilter.service"
SYNC_SERVICE = REPO / "packaging" / "relaymilter-sync.service"
SYNC_TIMER = REPO / "packaging" / "relaymilter-sync.timer"
POLICY_SERVICE = REPO / "packaging" / "relaymilter-policy.service"
POLICY_SOCKET = REPO / "packaging" / "relaymilter-policy.socket"
#: The [Service] settings in which relaymilter-policy.service may differ from
#: relaymilter.service: what it runs, how it is stopped (libmilter needs
#: SIGUSR2, the policy service stops on SIGTERM) and where a unix socket of
#: its own goes. Everything else, the sandbox above all, is the same.
POLICY_OWN_SETTINGS = frozenset({"ExecStart", "KillSignal", "RuntimeDirectory", "ReadWritePaths"})
MAN8 = REPO / "docs" / "man" / "relaymilter.8"
MAN5 = REPO / "docs" / "man" / "relaymilter.yml.5"


def unit_settings(path: Path) -> Dict[Tuple[str, str], List[str]]:
    """(section, key) -> values, in order; systemd allows a key several times."""
    settings: Dict[Tuple[str, str], List[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def test_versions_agree() -> None:
    version = relaymilter.__version__
    changelog = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"relaymilter ({version}-")
    spec = (REPO / "packaging" / "rpm" / "relaymilter.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version)}$", spec, re.MULTILINE)
    for page in (MAN8, MAN5):
        assert f'"relaymilter {version}"' in page.read_text().splitlines()[2], page


def test_declared_minimums_agree() -> None:
    floor = dependencies.floor()
    # Every library the code imports is declared, with a minimum.
    assert set(floor) == set(dependencies.NAMES)
    assert dependencies.debian_minimums() == floor
    assert dependencies.pyproject_minimums() == floor
    requires_python = tomllib.loads(dependencies.PYPROJECT.read_text())["project"]
    assert requires_python["requires-python"] == f">={dependencies.python_floor()}"


def test_the_unit_has_readiness_watchdog_reload_and_sandbox() -> None:
    s = unit_settings(UNIT)
    assert s["Service", "Type"] == ["notify"]
    assert s["Service", "User"] == ["relaymilter"]
    assert s["Service", "UMask"] == ["0007"]
    assert s["Service", "Restart"] == ["on-failure"]
    # A configuration error (exit 78, EX_CONFIG) is not retried forever.
    assert s["Service", "RestartPreventExitStatus"] == ["78"]
    assert s["Service", "WatchdogSec"]
    assert (
        "postfix.service" in s["Unit", "Before"][0] and "sendmail.service" in s["Unit", "Before"][0]
    )
    # Validate first, then SIGUSR1 (SIGHUP would stop libmilter).
    assert s["Service", "ExecReload"] == [
        "/usr/bin/relaymilter check-config -c ${RELAYMILTER_CONFIG}",
        "/bin/kill -USR1 $MAINPID",
    ]
    assert s["Service", "ExecStart"] == ["/usr/bin/relaymilter run -c ${RELAYMILTER_CONFIG}"]
    assert s["Service", "Environment"] == ["RELAYMILTER_CONFIG=/etc/relaymilter/relaymilter.yml"]
    assert s["Service", "RuntimeDirectory"] == ["relaymilter"]
    assert s["Service", "ReadWritePaths"] == ["-/var/spool/postfix/relaymilter"]
    for key, value in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("CapabilityBoundingSet", ""),
    ]:
        assert s["Service", key] == [value], key
    assert s["Service", "SystemCallFilter"][0] == "@system-service"
    assert ("Service", "PIDFile") not in s  # Type=notify knows the main PID
    assert s["Install", "WantedBy"] == ["multi-user.target"]


def test_the_debian_unit_is_the_shared_one() -> None:
    debian = REPO / "packaging" / "debian" / "relaymilter.service"
    assert debian.read_text() == UNIT.read_text()


def test_the_sync_service_is_a_hardened_root_oneshot() -> None:
    s = unit_settings(SYNC_SERVICE)
    assert s["Service", "Type"] == ["oneshot"]
    assert ("Service", "User") not in s  # root: password files, chown to the group
    assert s["Service", "ExecStart"] == ["/usr/bin/relaymilter sync -c ${RELAYMILTER_CONFIG}"]
    assert s["Service", "Environment"] == ["RELAYMILTER_CONFIG=/etc/relaymilter/relaymilter.yml"]
    assert s["Service", "SuccessExitStatus"] == ["75"]  # another sync holds the lock
    assert s["Unit", "Wants"] == ["network-online.target"]
    assert "network-online.target" in s["Unit", "After"][0]
    assert s["Unit", "Documentation"][0].startswith("man:relaymilter(8)")
    for key, value in [
        ("CapabilityBoundingSet", "CAP_CHOWN"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadWritePaths", "/etc/relaymilter"),
        ("StateDirectory", "relaymilter"),
        ("UMask", "0077"),
        ("ProtectHome", "tmpfs"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ]:
        assert s["Service", key] == [value], key
    assert s["Service", "SystemCallFilter"][0] == "@system-service"
    assert ("Install", "WantedBy") not in s  # started by the timer only


def test_the_sync_timer_runs_every_5_minutes_with_a_random_delay() -> None:
    s = unit_settings(SYNC_TIMER)
    assert s["Timer", "OnBootSec"] == ["1min"]
    assert s["Timer", "OnUnitActiveSec"] == ["5min"]
    assert s["Timer", "RandomizedDelaySec"] == ["30s"]
    assert s["Install", "WantedBy"] == ["timers.target"]


@pytest.mark.parametrize(
    "unit", [SYNC_SERVICE, SYNC_TIMER, POLICY_SERVICE, POLICY_SOCKET], ids=lambda p: p.name
)
def test_the_debian_units_are_the_shared_ones(unit: Path) -> None:
    debian = REPO / "packaging" / "debian" / f"relaymilter.{unit.name}"
    assert debian.is_symlink() and debian.read_text() == unit.read_text()


def test_the_sync_timer_is_not_enabled_on_install() -> None:
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    assert "dh_installsystemd --name=relaymilter-sync --no-enable relaymilter-sync.timer" in rules
    spec = (REPO / "packaging" / "rpm" / "relaymilter.spec").read_text()
    assert "%systemd_post relaymilter.service relaymilter-sync.service relaymilter-sync.timer" in (
        spec
    )
    # rpm: the presets decide, and no preset file of ours enables the timer.
    assert not list((REPO / "packaging").rglob("*.preset"))
    assert ".preset" not in spec


def test_the_policy_service_has_readiness_watchdog_reload_and_restart() -> None:
    s = unit_settings(POLICY_SERVICE)
    assert s["Service", "Type"] == ["notify"]
    assert s["Service", "User"] == ["relaymilter"]
    assert s["Service", "ExecStart"] == ["/usr/bin/relaymilter policy -c ${RELAYMILTER_CONFIG}"]
    # The milter's reload: validate first, then SIGUSR1.
    assert s["Service", "ExecReload"] == unit_settings(UNIT)["Service", "ExecReload"]
    assert s["Service", "Restart"] == ["on-failure"]
    assert s["Service", "RestartPreventExitStatus"] == ["78"]
    assert s["Service", "WatchdogSec"] == ["20s"]
    # SIGTERM (the default) stops it at once.
    assert ("Service", "KillSignal") not in s
    # Not the milter's: systemd removes a RuntimeDirectory= when its unit stops.
    assert s["Service", "RuntimeDirectory"] == ["relaymilter-policy"]
    # The socket systemd passes needs no path opened: nothing in Postfix's spool.
    assert ("Service", "ReadWritePaths") not in s
    assert s["Unit", "Documentation"][0].startswith("man:relaymilter(8)")
    assert s["Install", "WantedBy"] == ["multi-user.target"]


def test_the_policy_service_has_the_milters_sandbox() -> None:
    def shared(path: Path) -> Dict[str, List[str]]:
        return {
            key: values
            for (section, key), values in unit_settings(path).items()
            if section == "Service" and key not in POLICY_OWN_SETTINGS
        }

    assert shared(POLICY_SERVICE) == shared(UNIT)

    # And the hardening block itself, line for line, in the same order.
    def hardening(path: Path) -> List[str]:
        lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
        start = lines.index("NoNewPrivileges=yes")
        return [line for line in lines[start : lines.index("[Install]")] if line]

    assert hardening(POLICY_SERVICE) == hardening(UNIT)
    assert "SystemCallFilter=@system-service" in hardening(UNIT)


def test_the_policy_socket_is_postfixs_and_only_where_postfix_is() -> None:
    s = unit_settings(POLICY_SOCKET)
    assert s["Socket", "ListenStream"] == ["/var/spool/postfix/private/relaymilter-policy"]
    # main.cf.relaymilter-policy names it relative to Postfix's queue directory.
    snippet = (REPO / "etc" / "postfix" / "main.cf.relaymilter-policy").read_text()
    assert "check_policy_service unix:private/relaymilter-policy," in snippet
    assert s["Socket", "SocketUser"] == ["postfix"]
    assert s["Socket", "SocketGroup"] == ["postfix"]
    assert s["Socket", "SocketMode"] == ["0660"]
    assert s["Socket", "RemoveOnStop"] == ["yes"]
    # A host without Postfix: skipped, neither failed nor Postfix's directory made.
    assert s["Unit", "ConditionPathIsDirectory"] == ["/var/spool/postfix/private"]
    assert ("Socket", "Service") not in s  # relaymilter-policy.service, by its name
    assert ("Socket", "Accept") not in s  # one service for every connection
    assert s["Install", "WantedBy"] == ["sockets.target"]


def test_the_policy_units_are_not_enabled_on_install() -> None:
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    assert "dh_installsystemd --name=relaymilter-policy --no-enable relaymilter-policy.service" in (
        rules
    )
    assert (
        "dh_installsystemd --name=relaymilter-policy --no-enable --no-stop-on-upgrade"
        " relaymilter-policy.socket"
    ) in rules
    spec = (REPO / "packaging" / "rpm" / "relaymilter.spec").read_text()
    units = "relaymilter-policy.socket relaymilter-policy.service"
    assert (
        f"%systemd_post relaymilter.service relaymilter-sync.service relaymilter-sync.timer {units}"
        in spec
    )
    assert (
        f"%systemd_preun relaymilter.service relaymilter-sync.service relaymilter-sync.timer {units}"
        in spec
    )
    # An upgrade restarts a running service, never the socket (Postfix keeps it).
    restart = re.search(r"^%systemd_postun_with_restart (.*)$", spec, re.MULTILINE)
    assert restart and restart.group(1).split()[-1] == "relaymilter-policy.service", restart
    assert "relaymilter-policy.socket" not in restart.group(1)
    for path in ("%{_unitdir}/relaymilter-policy.service", "%{_unitdir}/relaymilter-policy.socket"):
        assert f"\n{path}\n" in spec, path


def test_every_example_in_the_tree_is_shipped_by_both_packages() -> None:
    # Everything in etc/ but the configuration itself and the Prometheus
    # rules' unit tests (promtool's, run by tests/test_metrics.py) is an
    # example; each may be missing from a tree (they are written
    # separately), so both packages list them by name and ship those that
    # exist.
    examples = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "etc").rglob("*")
        if path.is_file()
        and path != REPO / "etc" / "relaymilter.yml"
        and not path.name.endswith(".test.yml")
    )
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    installexamples = rules.split("override_dh_installexamples:", 1)[1].split("\n\n", 1)[0]
    spec = (REPO / "packaging" / "rpm" / "relaymilter.spec").read_text()
    loop = spec.split("for snippet in ", 1)[1].split("; do", 1)[0]
    debian = re.findall(r"etc/[\w./-]+", installexamples)
    rpm = re.findall(r"etc/[\w./-]+", loop)
    assert debian == rpm, "debian/rules and the spec ship different examples"
    for example in examples:
        assert example in debian, f"{example} is not shipped"


def test_sysusers_creates_the_system_user() -> None:
    lines = [
        line
        for line in (REPO / "packaging" / "relaymilter.sysusers").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == ['u relaymilter - "relaymilter mail filter"']


@pytest.mark.parametrize("page", [MAN8, MAN5], ids=lambda p: p.name)
def test_man_pages_render_without_warnings(page: Path) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def _roff_text(page: Path) -> str:
    """The page's text with roff's escaped hyphens made plain."""
    return page.read_text().replace("\\-", "-")


def test_relaymilter_8_documents_every_command_and_option() -> None:
    text = _roff_text(MAN8)
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))
    for name, sub in subparsers.choices.items():
        assert f".B {name}" in text, f"command {name} is not documented"
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"{name} {option} is not documented"
    assert "--version" in text
    for signal_name in ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGTERM"):
        assert signal_name in text


CONFIG_KEYS = [
    "socket",
    "mode",
    "on_error",
    "reject",
    "code",
    "status",
    "text",
    "organizations",
    "name",
    "accepted_domains",
    "domain",
    "match_subdomains",
    "connectors",
    "sender_ip_addresses",
    "tls_sender_certificate_name",
    "trusted_issuers",
    "certificates",
]


def test_relaymilter_yml_5_documents_every_key() -> None:
    text = _roff_text(MAN5)
    config_source = (REPO / "relaymilter" / "config" / "keys.py").read_text()
    for key in CONFIG_KEYS:
        assert key in text, f"{key} is not documented"
        # Still a key the loader knows (a rename must update the page).
        assert f'"{key}"' in config_source, f"{key} is no longer a config key"


def test_the_example_in_relaymilter_yml_5_is_a_valid_config() -> None:
    text = _roff_text(MAN5)
    example = text.split(".SH EXAMPLE\n.nf\n", 1)[1].split("\n.fi\n", 1)[0]
    # The certificate file it names does not exist here.
    example = "\n".join(line for line in example.splitlines() if "certificates:" not in line)
    config = parse_config(example, "relaymilter.yml.5")
    assert [org.name for org in config.organizations] == ["contoso"]
