"""The real daemon over its socket, driven by a milter-protocol client (the MTA's side)."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Iterator

import pytest
from miltertest import constants as mc

from relaymilter.decisionlog.record import DecisionRecord, parse_line

from ..scenarios import CONFIG, SCENARIOS, Scenario
from ..support import (
    ATTR36,
    REPO,
    Daemon,
    MilterSession,
    free_port,
    run_cli,
    running_daemon,
    wait_for_socket,
)

MAIL_MACROS = ["{cert_subject}", "{cert_issuer}", "{verify}", "{cn_subject}", "{cn_issuer}"]
RCPT_MACROS = ["i", "{client_addr}", "{cert_fp}", "{cert_md5}", "{rcpt_addr}"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("daemon") / "relaymilter.yml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def daemon(config_file: Path) -> Iterator[Daemon]:
    spec = f"unix:{config_file.parent}/relaymilter.sock"
    with running_daemon(config_file, spec, config_file.parent / "daemon.log") as running:
        yield running


@pytest.fixture()
def session(daemon: Daemon) -> Iterator[MilterSession]:
    client = MilterSession(daemon.spec)
    client.negotiate()
    yield client
    client.close()


def test_negotiates_away_what_it_does_not_use(session: MilterSession) -> None:
    # Only the symbol-list action; no header or body changes.
    assert session.actions == mc.SMFIF_SETSYMLIST
    skipped = mc.SMFIP_NOHELO | mc.SMFIP_NOHDRS | mc.SMFIP_NOEOH | mc.SMFIP_NOBODY
    skipped |= mc.SMFIP_NOUNKNOWN | mc.SMFIP_NODATA
    assert session.protocol & skipped == skipped
    # No connect step ({client_addr} comes with RCPT TO); MAIL FROM is not
    # answered (on a unix socket); RCPT TO is.
    wanted = mc.SMFIP_NOCONNECT | mc.SMFIP_NR_MAIL
    assert session.protocol & wanted == wanted
    not_skipped = mc.SMFIP_NOMAIL | mc.SMFIP_NORCPT | mc.SMFIP_NR_RCPT
    assert session.protocol & not_skipped == 0


def test_requests_its_own_macros(session: MilterSession) -> None:
    # Every macro at RCPT TO, and an empty list (no macro packet) everywhere else.
    assert session.symlists == {
        0: [],
        1: [],
        2: [],
        3: MAIL_MACROS + RCPT_MACROS,
        4: [],
        5: [],
        6: [],
    }


def test_replies_at_rcpt(session: MilterSession, daemon: Daemon) -> None:
    before = len(daemon.log())
    session.connect("192.0.2.10")
    session.mail("<>")
    assert session.rcpt("<kate@tailspintoys.com>") == "550 " + ATTR36
    assert session.rcpt("<kate@contoso.com>") == "continue"
    log = daemon.wait_for_log("to=<kate@contoso.com>")
    records = [r for r in map(parse_line, log[before:].splitlines()) if r is not None]
    assert records[0] == DecisionRecord(
        conn=records[0].conn,
        queue_id="NOQUEUE",
        client="192.0.2.10",
        organization="contoso",
        connector="onprem-ip",
        kind="ip",
        sender="",
        recipient="kate@tailspintoys.com",
        route="tailspintoys.com",
        mode="enforce",
        config=records[0].config,
        action="reject",
        reason="attr36",
    )
    assert records[0].config and len(records[0].config) == 12


def test_two_transactions_on_one_connection(session: MilterSession) -> None:
    session.connect("192.0.2.10")
    session.mail("<app@contoso.com>")
    assert session.rcpt("<a@example.net>") == "continue"
    session.abort()
    session.mail("<>")
    assert session.rcpt("<a@example.net>") == "550 " + ATTR36
    session.mail("<app@contoso.com>", {"{cert_subject}": ""})
    assert session.rcpt("<b@example.net>", {"i": "4XyZ1"}) == "continue"


def test_certificate_macros_at_mail_and_queue_id(session: MilterSession, daemon: Daemon) -> None:
    session.connect("203.0.113.5")
    session.mail(
        "<>", {"{cert_subject}": "mail.contoso.com", "{cert_issuer}": "Contoso Issuing CA"}
    )
    assert session.rcpt("<kate@tailspintoys.com>", {"i": "ABC123"}) == "continue"
    log = daemon.wait_for_log("queue_id=ABC123")
    (record,) = [r for r in map(parse_line, log.splitlines()) if r and r.queue_id == "ABC123"]
    assert record._replace(conn=None, config=None) == DecisionRecord(
        queue_id="ABC123",
        client="203.0.113.5",
        organization="contoso",
        connector="onprem-cert",
        kind="certificate",
        certificate="mail.contoso.com",
        cert_subject="mail.contoso.com",
        cert_issuer="Contoso Issuing CA",
        sender="",
        recipient="kate@tailspintoys.com",
        route="tailspintoys.com",
        mode="enforce",
        action="continue",
        reason="certificate",
    )


def test_client_values_are_escaped_in_the_log(session: MilterSession, daemon: Daemon) -> None:
    session.connect("192.0.2.10")
    session.mail("<evil\r\nINFO decision forged@x>")
    session.rcpt("<a\x01b@example.net>")
    log = daemon.wait_for_log("a\\x01b@example.net")
    assert 'from="<evil\\x0d\\x0aINFO decision forged@x>"' in log
    assert "\nINFO decision forged" not in log


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_explain_agrees_with_the_running_milter(
    daemon: Daemon, config_file: Path, scenario: Scenario
) -> None:
    client = MilterSession(daemon.spec)
    try:
        client.negotiate()
        client.connect(scenario.client)
        rcpt_macros = {k: v for k, v in scenario.macros.items() if k in MAIL_MACROS + RCPT_MACROS}
        client.mail(scenario.mail_from, {})
        replies = [client.rcpt(f"<{r}>", rcpt_macros) for r, _, _ in scenario.recipients]
    finally:
        client.close()
    result = run_cli("explain", "-c", str(config_file), *scenario.explain_args(), "--json")
    assert result.returncode == 0, result.stderr
    explained = json.loads(result.stdout)
    assert explained["attribution"]["organization"] == scenario.organization
    for reply, verdict, (_, action, reason) in zip(
        replies, explained["recipients"], scenario.recipients
    ):
        assert (verdict["action"], verdict["reason"]) == (action, reason)
        assert reply == ("continue" if action == "continue" else verdict["reply"])


def test_internal_error_answers_tempfail(tmp_path: Path, config_file: Path) -> None:
    spec = f"unix:{tmp_path}/faulty.sock"
    argv = [sys.executable, str(REPO / "tests" / "faulty_relaymilter.py"), "run"]
    with running_daemon(config_file, spec, tmp_path / "faulty.log", argv) as faulty:
        client = MilterSession(spec)
        client.negotiate()
        client.connect("192.0.2.10")
        client.mail("<app@contoso.com>")
        assert client.rcpt("<boom@example.net>", {"i": "Q1"}) == (
            "451 4.3.0 relaymilter: internal error, please try again later"
        )
        assert client.rcpt("<fine@example.net>") == "continue"
        client.close()
        log = faulty.wait_for_log("RuntimeError: injected fault")
    assert "queue_id=Q1 client=192.0.2.10 to=<boom@example.net> internal error in envrcpt" in log
    assert "Traceback (most recent call last)" in log


def test_on_error_accept(tmp_path: Path) -> None:
    config = tmp_path / "accept.yml"
    config.write_text("on_error: accept\n" + CONFIG)
    spec = f"unix:{tmp_path}/faulty.sock"
    argv = [sys.executable, str(REPO / "tests" / "faulty_relaymilter.py"), "run"]
    with running_daemon(config, spec, tmp_path / "faulty.log", argv):
        client = MilterSession(spec)
        client.negotiate()
        client.connect("192.0.2.10")
        client.mail("<>")
        assert client.rcpt("<boom@example.net>") == "continue"
        client.close()


def test_unix_socket_is_not_world_writable(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.spec.split(":", 1)[1]).st_mode)
    assert mode == 0o660


def test_inet_and_inet6_sockets(config_file: Path, tmp_path: Path) -> None:
    for spec in (f"inet:{free_port()}@127.0.0.1", f"inet6:{free_port()}@[::1]"):
        with running_daemon(config_file, spec, tmp_path / "inet.log"):
            client = MilterSession(spec)
            client.negotiate()
            client.connect("2001:db8:1::25")
            client.mail("<>")
            assert client.rcpt("<a@example.net>") == "550 " + ATTR36
            client.close()


def test_bad_config_exits_before_opening_the_socket(tmp_path: Path) -> None:
    config = tmp_path / "bad.yml"
    config.write_text("organizations: []\n")
    sock = tmp_path / "never.sock"
    daemon = Daemon(config, f"unix:{sock}", tmp_path / "bad.log")
    assert daemon.process.wait(20) == 78  # EX_CONFIG: systemd does not restart in a loop
    daemon.stop()
    assert not sock.exists()
    assert (
        f"cannot start: 1 error(s) in {config}:\n{config}:1: organizations: must list at least one organization"
        in daemon.log()
    )


def test_reload_swaps_config_and_a_broken_one_keeps_the_old(tmp_path: Path) -> None:
    config = tmp_path / "reload.yml"
    config.write_text(CONFIG)
    spec = f"unix:{tmp_path}/reload.sock"

    def verdict() -> str:
        client = MilterSession(spec)
        client.negotiate()
        client.connect("192.0.2.10")
        client.mail("<>")
        reply = client.rcpt("<a@example.net>")
        client.close()
        return reply

    with running_daemon(config, spec, tmp_path / "reload.log") as daemon:
        held = MilterSession(spec)  # a connection open across the reload keeps its config
        held.negotiate()
        held.connect("192.0.2.10")
        assert verdict().startswith("550 ")
        config.write_text("mode: monitor\n" + CONFIG)
        daemon.reload()
        daemon.wait_for_log("reload: loaded")
        assert verdict() == "continue"
        held.mail("<>")
        assert held.rcpt("<a@example.net>").startswith("550 ")
        held.close()
        config.write_text("mode: enforce\nbogus: 1\n" + CONFIG)
        mark = len(daemon.log())
        daemon.reload()
        log = daemon.wait_for_log("reload: failed", after=mark)
        assert "bogus: unknown key" in log
        assert verdict() == "continue"
        assert "would-reject" in daemon.log()


def test_sigusr2_stops_without_waiting_for_libmilters_accept_loop(
    config_file: Path, tmp_path: Path
) -> None:
    for spec in (f"unix:{tmp_path}/stop.sock", f"inet:{free_port()}@127.0.0.1"):
        daemon = Daemon(config_file, spec, tmp_path / "stop.log")
        try:
            wait_for_socket(spec, daemon.process)
            held = MilterSession(spec)  # an MTA connection open at the time
            held.negotiate()
            daemon.process.send_signal(signal.SIGUSR2)
            # No wake-up connection from the test here: the daemon wakes itself.
            assert daemon.process.wait(30) == 0
            held.close()
        finally:
            daemon.stop()
        log = daemon.log()
        assert "stopping (SIGUSR2)" in log
        assert "stopped: " in log


def test_a_replaced_config_is_freed_once_its_last_connection_lets_go(config_file: Path) -> None:
    import threading
    import weakref

    from relaymilter.config import load_config
    from relaymilter.daemon.reloading import _retire

    config = load_config(str(config_file))
    connection = [config]  # a connection that started before the reload
    gone = weakref.ref(config)
    retired = threading.Thread(target=_retire, args=([config], 60.0, 0.01))
    del config
    retired.start()
    retired.join(0.2)
    assert retired.is_alive() and gone() is not None  # still in use: kept
    connection.clear()
    retired.join(10)
    assert not retired.is_alive() and gone() is None
