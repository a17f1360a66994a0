"""The shipped snippets are what the private MTAs run with.

The harness builds main.cf and sendmail.mc from etc/postfix/main.cf.relaymilter,
etc/postfix/main.cf.relaymilter-policy and etc/sendmail/relaymilter.mc; these
tests check the running configuration really holds them (and nothing else milter-related, such as macro lists), so
the scenarios prove the snippets an admin copies.

Sendmail's TLS starts from Debian's stock starttls.m4, which tells Sendmail
never to ask a client for a certificate (``TLSSrvOptions`` ``V``); the
snippet's last line undoes that. A third Sendmail, built from the snippet
without that line, shows what goes wrong then (docs/sendmail.md, "Debian's
stock TLS setup asks for no certificate").
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import configs
from . import postfix as pf
from . import sendmail as sm
from .milterproc import RelayMilterProcess
from .pki import Pki
from .postfix import PolicyPostfixInstance, PostfixInstance, snippet_lines
from .sendmail import SendmailInstance
from .sink import Sink
from .targets import Target
from .util import read_from, size, wait_for

pytestmark = pytest.mark.e2e

EXTERNAL = "kate@tailspintoys.com"
#: The snippet's last line, which undoes the V of Debian's starttls.m4.
ASK_FOR_CERTIFICATES = "define(`confTLS_SRV_OPTIONS', `')dnl\n"
#: That V, as Debian's update_tlsm4 writes it.
DEBIAN_NEVER_ASK = "define(`confTLS_SRV_OPTIONS', `V')dnl   # <= EDIT\n"
#: Sendmail's log line for a STARTTLS handshake, with the {verify} macro's value.
_HANDSHAKE = re.compile(r"STARTTLS=server, relay=[^,]*, version=[^,]*, verify=(\w+),")


def postconf(instance: PostfixInstance, *args: str) -> str:
    cmd = ["postconf", "-c", str(instance.config_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def test_postfix_main_cf_holds_the_snippet(postfix: PostfixInstance) -> None:
    main_cf = (postfix.config_dir / "main.cf").read_text()
    for line in snippet_lines(pf.render_snippet(postfix.pki.ca_bundle, postfix.ports.milter_inet)):
        assert line in main_cf.splitlines(), line
    inet_milter = pf.SNIPPET_INET_MILTER.replace("8894", str(postfix.ports.milter_inet))
    assert postconf(postfix, "-h", "smtpd_milters").strip() == inet_milter
    assert postconf(postfix, "-h", "milter_default_action").strip() == "tempfail"
    assert postconf(postfix, "-h", "smtpd_tls_ask_ccert").strip() == "yes"
    assert postconf(postfix, "-h", "smtpd_tls_CAfile").strip() == str(postfix.pki.ca_bundle)


def test_postfix_needs_no_milter_macro_settings(postfix: PostfixInstance) -> None:
    # relaymilter asks for its macros itself: every milter_*_macros is Postfix's default.
    changed = postconf(postfix, "-n")
    assert "_macros" not in changed


def test_postfix_unix_listener_is_chrooted_and_uses_the_snippet_alternative(
    postfix: PostfixInstance,
) -> None:
    services = postconf(postfix, "-M").splitlines()
    unix = next(s for s in services if s.startswith(f"127.0.0.1:{postfix.ports.unix} "))
    assert unix.split()[4] == "y"  # chroot column, as in Debian's master.cf
    overrides = postconf(postfix, "-P")
    assert (
        f"127.0.0.1:{postfix.ports.unix}/inet/smtpd_milters = {pf.SNIPPET_UNIX_MILTER}" in overrides
    )
    # The inet listener runs with main.cf's (the snippet's active) line.
    assert f"127.0.0.1:{postfix.ports.inet}/inet/smtpd_milters" not in overrides


def test_postfix_policy_main_cf_holds_the_policy_snippet(
    postfix_policy: PolicyPostfixInstance,
) -> None:
    snippet = pf.render_policy_snippet(postfix_policy.pki.ca_bundle)
    main_cf = (postfix_policy.config_dir / "main.cf").read_text()
    assert snippet in main_cf  # whole, as shipped but for the CA file
    assert snippet_lines(snippet) == snippet_lines(main_cf)[-len(snippet_lines(snippet)) :]
    # In force as Postfix reads it: the service first in smtpd_relay_restrictions.
    relay = postconf(postfix_policy, "-h", "smtpd_relay_restrictions").strip()
    assert relay == pf.snippet_setting(snippet, "smtpd_relay_restrictions")
    assert relay.startswith(f"check_policy_service {pf.SNIPPET_POLICY_SERVICE}, ")
    for name in ("smtpd_policy_service_default_action", "smtpd_policy_service_timeout"):
        assert postconf(postfix_policy, "-h", name).strip() == pf.snippet_setting(snippet, name)
    assert postconf(postfix_policy, "-h", "smtpd_tls_ask_ccert").strip() == "yes"
    assert postconf(postfix_policy, "-h", "smtpd_tls_CAfile").strip() == str(
        postfix_policy.pki.ca_bundle
    )
    # No milter: the policy service alone; compatibility level 3.6's digest.
    assert postconf(postfix_policy, "-h", "smtpd_milters").strip() == ""
    names = [line.split(" = ")[0] for line in postconf(postfix_policy, "-n").splitlines()]
    assert not [name for name in names if "milter" in name], names
    # Its default: ${{$compatibility_level} <level {3.6} ? {md5} : {sha256}}.
    assert postconf(postfix_policy, "-xh", "smtpd_tls_fingerprint_digest").strip() == "sha256"


def test_postfix_policy_listener_runs_main_cf_chrooted(
    postfix_policy: PolicyPostfixInstance,
) -> None:
    port = postfix_policy.policy_ports.policy
    services = postconf(postfix_policy, "-M").splitlines()
    listener = next(s for s in services if s.startswith(f"127.0.0.1:{port} "))
    assert listener.split()[4] == "y"  # chrooted: unix:private/... is inside the chroot
    overrides = postconf(postfix_policy, "-P")
    assert [o for o in overrides.splitlines() if o.startswith(f"127.0.0.1:{port}/")] == [
        f"127.0.0.1:{port}/inet/syslog_name = postfix/smtpd-policy"
    ]


def test_sendmail_cf_holds_the_snippet(
    sendmail: SendmailInstance, sendmail_inet: SendmailInstance
) -> None:
    mc = (sendmail.run / "e2e.mc").read_text()
    for line in sm.render_snippet(sendmail.socket_equate).splitlines():
        assert line in mc.splitlines(), line
    cf = (sendmail.run / "sendmail.cf").read_text().splitlines()
    # As shipped: a unix socket (S=local:), only its path replaced.
    assert f"Xrelaymilter, S=local:{sendmail.run / 'relaymilter.sock'}, F=T" in cf
    inet = (sendmail_inet.run / "sendmail.cf").read_text().splitlines()
    assert f"Xrelaymilter, S=inet:{sendmail_inet.milter_port}@127.0.0.1, F=T" in inet
    assert "O InputMailFilters=relaymilter" in cf
    assert "O CertFingerprintAlgorithm=sha256" in cf
    # The snippet's empty confTLS_SRV_OPTIONS: no "=", no V.
    assert [line for line in cf if "TLSSrvOptions" in line] == ["O TLSSrvOptions"]


def test_sendmail_tls_is_debians_starttls_m4_then_the_admins_lines(
    sendmail: SendmailInstance,
) -> None:
    tls = sendmail.run / "tls"
    generated = (tls / "starttls.m4.generated").read_text()
    assert DEBIAN_NEVER_ASK in generated
    assert "ifelse(sm_enable_tls, `yes', `dnl\n" in generated
    # Included as generated, only its include of autoconf.m4 moved to the unpacked root.
    share = sendmail.root / "usr/share/sendmail"
    relocated = generated.replace("include(`/usr/share/sendmail/", f"include(`{share}/")
    assert (tls / "starttls.m4").read_text() == relocated
    mc = (sendmail.run / "e2e.mc").read_text()
    include = f"include(`{tls / 'starttls.m4'}')dnl\n"
    snippet = sm.render_snippet(sendmail.socket_equate)
    assert mc.index(include) < mc.index("define(`confSERVER_CERT'") < mc.index(snippet)
    # The harness leaves TLSSrvOptions to the snippet.
    define = "define(`confTLS_SRV_OPTIONS'"
    assert mc.count(define) == snippet.count(define) == 1
    cf = (sendmail.run / "sendmail.cf").read_text().splitlines()
    # starttls.m4's TLS block is in (it vanishes without Debian's autoconf.m4) ...
    assert "O Timeout.starttls=2m" in cf
    assert "O DontBlameSendmail=\tTrustStickyBit,GroupReadableKeyFile" in cf
    # ... and the lines after its include win.
    assert f"O ServerCertFile={sendmail.pki.server.cert}" in cf
    assert f"O ServerKeyFile={sendmail.pki.server.key}" in cf
    assert f"O CACertFile={sendmail.pki.ca_bundle}" in cf
    assert f"O CACertPath={sendmail.run / 'cacerts'}" in cf


def test_sendmail_snippet_before_the_starttls_include_is_overridden(
    sendmail: SendmailInstance, tmp_path: Path
) -> None:
    mc = (sendmail.run / "e2e.mc").read_text()
    include = f"include(`{sendmail.run / 'tls' / 'starttls.m4'}')dnl\n"
    snippet = sm.render_snippet(sendmail.socket_equate)
    assert include in mc and snippet in mc
    (tmp_path / "before.mc").write_text(mc.replace(snippet, "").replace(include, snippet + include))
    cf = sm.build_cf(sendmail.root, tmp_path / "before.mc").splitlines()
    assert [line for line in cf if "TLSSrvOptions" in line] == ["O TLSSrvOptions=V"]


def without_last_line(snippet: str) -> str:
    assert snippet.endswith(ASK_FOR_CERTIFICATES)
    return snippet[: -len(ASK_FOR_CERTIFICATES)]


@pytest.fixture(scope="module")
def sendmail_never_asking(
    e2e_dir: Path, pki: Pki, sink: Sink
) -> Iterator[tuple[SendmailInstance, Target]]:
    """Sendmail with Debian's starttls.m4 and the snippet without its last line."""
    name = "sendmail-tls-v"
    instance = SendmailInstance(e2e_dir / name, pki, sink.port, without_last_line)
    milter = RelayMilterProcess(name, e2e_dir / "relaymilter", instance.milter_spec)
    target = Target(
        name=name,
        mta="sendmail",
        port=0,
        milter=milter,
        sink=sink,
        pki=pki,
        mta_log=lambda offset: read_from(instance.log, offset),
        mta_log_size=lambda: size(instance.log),
    )
    try:
        instance.start()
        target.port = instance.port
        yield instance, target
    finally:
        milter.stop()
        instance.close()


def handshake_verify(target: Target, offset: int) -> str:
    """{verify} of the one STARTTLS handshake in the MTA's log after ``offset``."""
    found = wait_for(
        lambda: _HANDSHAKE.findall(target.mta_log(offset)), 10, f"a STARTTLS line in {target}"
    )
    assert len(found) == 1, found
    return str(found[0])


def test_sendmail_without_the_snippets_last_line_asks_for_no_certificate(
    target: Target, request: pytest.FixtureRequest
) -> None:
    """A bounce from a trusted certificate's client: refused unless Sendmail asks for it."""
    if target.mta != "sendmail":
        pytest.skip("TLSSrvOptions is Sendmail's")
    never_asking: tuple[SendmailInstance, Target] = request.getfixturevalue("sendmail_never_asking")
    instance, stock = never_asking
    cf = (instance.run / "sendmail.cf").read_text().splitlines()
    assert [line for line in cf if "TLSSrvOptions" in line] == ["O TLSSrvOptions=V"]
    for mta in (stock, target):
        mta.use(configs.standard(target.pki))

    # V: TLS, but no certificate asked for, none sent, so attributed by IP only.
    offset = stock.mta_log_size()
    # explain is not asked: it would assume the certificate reached relaymilter.
    refused = stock.run("", [EXTERNAL], cert="mail", check_explain=False)
    assert refused.txn.tls_version is not None
    assert refused.reply(EXTERNAL) == stock.refusal(EXTERNAL)
    decision = refused.decision(EXTERNAL)
    assert (decision["action"], decision["reason"]) == ("reject", "attr36")
    assert (decision["kind"], decision["connector"]) == ("ip", "onprem-ip")
    assert decision["certificate"] == decision["cert_subject"] == "-"
    assert refused.delivered is None
    # NOT: no certificate requested (NO would be: requested, none sent).
    assert handshake_verify(stock, offset) == "NOT"

    # The whole snippet: the same client and bounce, relayed by certificate.
    offset = target.mta_log_size()
    relayed = target.run("", [EXTERNAL], cert="mail")
    assert relayed.reply(EXTERNAL) == target.accepted(EXTERNAL)
    decision = relayed.decision(EXTERNAL)
    assert (decision["reason"], decision["kind"]) == ("certificate", "certificate")
    assert decision["certificate"] == "mail.contoso.com"
    assert EXTERNAL in relayed.delivered_to
    assert handshake_verify(target, offset) == "OK"


def test_sendmail_needs_no_milter_macro_settings(sendmail: SendmailInstance) -> None:
    mc = (sendmail.run / "e2e.mc").read_text()
    assert "confMILTER_MACROS" not in mc
