"""The shipped snippets are what the private MTAs run with.

The harness builds main.cf and sendmail.mc from etc/postfix/main.cf.relaymilter
and etc/sendmail/relaymilter.mc; these tests check the running configuration
really holds them (and nothing else milter-related, such as macro lists), so
the scenarios prove the snippets an admin copies.
"""

from __future__ import annotations

import subprocess

import pytest

from . import postfix as pf
from . import sendmail as sm
from .postfix import PostfixInstance, snippet_lines
from .sendmail import SendmailInstance

pytestmark = pytest.mark.e2e


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


def test_sendmail_needs_no_milter_macro_settings(sendmail: SendmailInstance) -> None:
    mc = (sendmail.run / "e2e.mc").read_text()
    assert "confMILTER_MACROS" not in mc
