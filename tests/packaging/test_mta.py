"""The release's own Postfix and Sendmail with relaymilter attached from the package.

One guest per release, of its own (the MTA switch would disturb the other
modules' guest): the .deb installed, then Postfix set up with the shipped
main.cf snippet for the milter, then with the policy service's snippet and
relaymilter-policy.socket enabled instead, then Debian's ``sendmail`` package
installed in its place (offline, from the tree's apt cache) and set up as
docs/sendmail.md says: Debian's stock ``/etc/mail/tls/starttls.m4``, the
shipped snippet after it. Through each, from the guest's loopback (a real TLS
client certificate from the end-to-end tests' PKI):

- a bounce from an IP connector's address, without a certificate: refused, 550 5.7.64;
- an owned sender (``alice@contoso.com``) from there: accepted;
- a bounce from a client with a certificate that matches the certificate
  connector: accepted, and the decision line says by which connector.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from relaymilter.decisionlog.record import DecisionRecord, read_line

from ..e2e import pki as e2e_pki
from ..e2e.smtpclient import Transaction, send
from . import container
from .conftest import APT_INSTALL, CONF, GUEST_DEB, GUEST_TIMES, Build, guest_label, restart
from .container import Guest

OUTSIDE = "kate@tailspintoys.com"
OWNED = "alice@contoso.com"
SMTP_PORT = 25
PKI_DIR = "/etc/relaymilter-test-pki"
SNIPPETS = "/usr/share/doc/relaymilter/examples"
UNIX_SOCKET = "unix:/run/relaymilter/relaymilter.sock"
MILTER = "relaymilter.service"
POLICY = "relaymilter-policy.service"
POLICY_SOCKET = "relaymilter-policy.socket"
#: main.cf as the base tree has it, before any snippet.
MAIN_CF_BEFORE = "/root/main.cf.before-relaymilter"

CONFIG = f"""\
socket: {{socket}}
mode: enforce
on_error: tempfail
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: onprem-ip
        sender_ip_addresses: [127.0.0.1/32]
      - name: onprem-cert
        tls_sender_certificate_name: "*.contoso.com"
        trusted_issuers: ["{e2e_pki.CONTOSO_CA}"]
"""

#: What docs/sendmail.md tells an admin to add after Debian's starttls.m4 include.
SENDMAIL_TLS = f"""\
include(`/etc/mail/tls/starttls.m4')dnl
define(`confSERVER_CERT', `{PKI_DIR}/server.crt')dnl
define(`confSERVER_KEY', `{PKI_DIR}/server.key')dnl
define(`confCACERT', `{PKI_DIR}/contoso-issuing-ca.pem')dnl
"""


class Relay:
    """The guest with one MTA in front of relaymilter, and the test PKI on both sides."""

    def __init__(self, guest: Guest, pki: e2e_pki.Pki) -> None:
        self.guest = guest
        self.pki = pki

    def send(self, sender: str, certificate: Optional[str] = None) -> Transaction:
        credential = self.pki.clients[certificate] if certificate else None

        def session() -> Transaction:
            return send(SMTP_PORT, sender, [OUTSIDE], cert=credential)

        return self.guest.in_network(session)

    def decisions(self, mark: str, unit: str = MILTER) -> List[DecisionRecord]:
        entries = self.guest.journal_entries(mark, "-u", unit)
        parsed = (read_line(str(entry.get("MESSAGE", ""))) for entry in entries)
        return [found[0] for found in parsed if found is not None]

    def configure_relaymilter(self, socket: str) -> None:
        self.guest.write(CONF, CONFIG.format(socket=socket))
        restart(self.guest)


@pytest.fixture(scope="module")
def relay(deb: Build, release: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A guest of ``release`` of its own with relaymilter installed and the test PKI."""
    pki = e2e_pki.build_pki(tmp_path_factory.mktemp(f"mta-pki-{release}"))
    logs = tmp_path_factory.mktemp(f"mta-guest-logs-{release}")
    started = time.monotonic()
    times = GUEST_TIMES.setdefault(guest_label("MTA guest", release), {})
    try:
        with container.booted(release, logs) as guest:
            times["boot"] = guest.boot_seconds or 0
            guest.copy_in(deb.package, GUEST_DEB)
            guest.run(*APT_INSTALL, GUEST_DEB, timeout=300)
            guest.run("cp", "-p", "/etc/postfix/main.cf", MAIN_CF_BEFORE)
            _install_pki(guest, pki)
            container.log(f"MTA guest ({release}) ready in {time.monotonic() - started:.1f} s")
            yield Relay(guest, pki)
    finally:
        times["total"] = time.monotonic() - started


def _install_pki(guest: Guest, pki: e2e_pki.Pki) -> None:
    for name in ("server.crt", "server.key", "contoso-issuing-ca.pem"):
        guest.copy_in(_pki_file(pki, name), f"{PKI_DIR}/{name}")
    guest.run("chmod", "0644", f"{PKI_DIR}/server.crt", f"{PKI_DIR}/contoso-issuing-ca.pem")
    # Sendmail refuses a key that others may read.
    guest.run("chmod", "0600", f"{PKI_DIR}/server.key")


def _pki_file(pki: e2e_pki.Pki, name: str) -> Path:
    files = {
        "server.crt": pki.server.cert,
        "server.key": pki.server.key,
        "contoso-issuing-ca.pem": pki.ca_files[e2e_pki.CONTOSO_CA],
    }
    return files[name]


def _postfix_with(relay: Relay, snippet: str) -> None:
    """The release's Postfix with one shipped main.cf snippet, as docs/postfix.md says."""
    guest = relay.guest
    guest.run("cp", "-p", MAIN_CF_BEFORE, "/etc/postfix/main.cf")
    guest.sh(f"cat {SNIPPETS}/{snippet} >> /etc/postfix/main.cf")
    guest.run("cp", f"{PKI_DIR}/contoso-issuing-ca.pem", "/etc/postfix/relaymilter-client-ca.pem")
    # The relay's own certificate (an admin's is there already), and mail for
    # the Internet handed to smtp (the base tree's "Local only" Postfix refuses it).
    guest.run(
        "postconf",
        "-e",
        f"smtpd_tls_cert_file={PKI_DIR}/server.crt",
        f"smtpd_tls_key_file={PKI_DIR}/server.key",
        "default_transport=smtp",
        "relay_transport=relay",
    )
    guest.run("postfix", "check")
    guest.run("systemctl", "restart", "postfix")
    container.wait_for(lambda: _banner(relay), 30, "Postfix to answer on port 25")


@pytest.fixture(scope="module")
def postfix(relay: Relay) -> Relay:
    """Postfix with the milter's snippet: relaymilter.service on its TCP socket."""
    relay.configure_relaymilter("inet:8894@127.0.0.1")  # the snippet's socket
    _postfix_with(relay, "main.cf.relaymilter")
    return relay


@pytest.fixture(scope="module")
def postfix_policy(relay: Relay) -> Relay:
    """Postfix with the policy service's snippet instead, and the admin's one step for it.

    The milter still runs (both front ends may, on one relay), but main.cf no
    longer names it: every decision is the policy service's.
    """
    relay.configure_relaymilter("inet:8894@127.0.0.1")
    relay.guest.run("systemctl", "enable", "--now", POLICY_SOCKET)
    _postfix_with(relay, "main.cf.relaymilter-policy")
    return relay


@pytest.fixture(scope="module")
def sendmail(relay: Relay) -> Relay:
    """Debian's Sendmail in Postfix's place, relaymilter on the snippet's unix socket."""
    guest = relay.guest
    relay.configure_relaymilter(UNIX_SOCKET)
    # Postfix goes: so does the policy service's socket in its private/.
    guest.run("systemctl", "disable", "--now", POLICY_SOCKET, POLICY)
    # Debian 13's postfix leaves its master running when sendmail replaces it.
    guest.run("systemctl", "stop", "postfix")
    # Offline: the base tree has the sendmail packages in its apt cache.
    guest.run(*APT_INSTALL, "--no-install-recommends", "sendmail", timeout=300)
    assert "confTLS_SRV_OPTIONS', `V'" in guest.read("/etc/mail/tls/starttls.m4")
    # The guest has no DNS, in which Sendmail would look up a sender's domain.
    no_dns = "FEATURE(`accept_unresolvable_domains')dnl\n"
    lines = no_dns + SENDMAIL_TLS + guest.read(f"{SNIPPETS}/relaymilter.mc")
    mc = guest.read("/etc/mail/sendmail.mc")
    assert "\nMAILER_DEFINITIONS" in mc, mc
    guest.write(
        "/etc/mail/sendmail.mc",
        mc.replace("\nMAILER_DEFINITIONS", f"\n{lines}MAILER_DEFINITIONS", 1),
    )
    guest.run("make", "-C", "/etc/mail", timeout=120)
    guest.run("systemctl", "restart", "sendmail", timeout=120)
    container.wait_for(lambda: _banner(relay), 30, "Sendmail to answer on port 25")
    return relay


def _banner(relay: Relay) -> Optional[bool]:
    def connect() -> Optional[bool]:
        try:
            with socket.create_connection(("127.0.0.1", SMTP_PORT), timeout=5) as sock:
                return sock.recv(4).startswith(b"220") or None
        except OSError:
            return None

    return relay.guest.in_network(connect)


def _check_the_three(relay: Relay, unit: str = MILTER) -> None:
    mark = relay.guest.mark()
    bounce = relay.send("")
    owned = relay.send(OWNED)
    certified = relay.send("", certificate="mail")
    assert bounce.rcpts[OUTSIDE].code == 550, bounce
    refusal = bounce.rcpts[OUTSIDE].text  # Sendmail puts "<kate@...>... " after the code
    assert refusal.startswith("5.7.64 ") and "Relay Access Denied ATTR36." in refusal, bounce
    assert owned.rcpts[OUTSIDE].code == 250, owned
    assert certified.tls_version is not None, certified.starttls
    assert certified.rcpts[OUTSIDE].code == 250, certified
    decisions = container.wait_for(
        lambda: relay.decisions(mark, unit) if len(relay.decisions(mark, unit)) >= 3 else None,
        15,
        "three decision lines",
    )
    assert [(d.reason, d.connector) for d in decisions] == [
        ("attr36", "onprem-ip"),
        ("sender-domain", "onprem-ip"),
        ("certificate", "onprem-cert"),
    ], decisions


def test_postfix_with_the_shipped_snippet(postfix: Relay) -> None:
    _check_the_three(postfix)


def test_postfix_with_the_policy_service_and_its_shipped_snippet(postfix_policy: Relay) -> None:
    guest = postfix_policy.guest
    # Not running until smtpd's first request: relaymilter-policy.socket starts it.
    assert guest.prop(POLICY, "ActiveState") == "inactive"
    _check_the_three(postfix_policy, POLICY)
    assert guest.prop(POLICY, "TriggeredBy") == POLICY_SOCKET
    assert "smtpd_milters" not in guest.run("postconf", "-n").stdout


def test_sendmail_from_debians_stock_tls_setup(sendmail: Relay) -> None:
    assert not sendmail.guest.exists("/usr/sbin/postfix")
    _check_the_three(sendmail)
