"""Fixtures for the end-to-end suite: private Postfix and Sendmail, a sink, relaymilter.

Expensive things (PKI, MTAs, sink) live for the whole session; relaymilter
processes are per target and restarted only when a scenario needs another
configuration. Set RELAYMILTER_E2E_KEEP=1 to keep the temporary directory
(configs, MTA logs, relaymilter logs, sink messages) for reading afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from .milterproc import RelayMilterProcess
from .pki import Pki, build_pki
from .policycapture import PolicyCapture
from .postfix import PolicyPostfixInstance, PostfixInstance
from .sendmail import SendmailInstance
from .sink import Sink
from .targets import Target
from .util import read_from, size

TARGETS = ["postfix-unix", "postfix-inet", "postfix-policy", "sendmail-unix", "sendmail-inet"]


@pytest.fixture(scope="session")
def e2e_dir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the e2e suite runs private MTAs and needs root")
    path = Path(tempfile.mkdtemp(prefix="relaymilter-e2e-"))
    # Postfix's daemons run as user "postfix" and must reach files in here.
    path.chmod(0o755)
    yield path
    if os.environ.get("RELAYMILTER_E2E_KEEP"):
        print(f"\nkept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pki(e2e_dir: Path) -> Pki:
    return build_pki(e2e_dir / "pki")


@pytest.fixture(scope="session")
def sink(e2e_dir: Path) -> Iterator[Sink]:
    server = Sink(e2e_dir / "sink").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postfix(e2e_dir: Path, pki: Pki, sink: Sink) -> Iterator[PostfixInstance]:
    instance = PostfixInstance(e2e_dir / "postfix", pki, sink.port)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def postfix_policy(e2e_dir: Path, pki: Pki, sink: Sink) -> Iterator[PolicyPostfixInstance]:
    """Postfix with relaymilter as its policy service, through the policy snippet as shipped."""
    instance = PolicyPostfixInstance(e2e_dir / "postfix-policy", pki, sink.port)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def policy_capture(postfix_policy: PolicyPostfixInstance) -> Iterator[PolicyCapture]:
    """The capturing service behind the policy Postfix's capture listeners."""
    capture = PolicyCapture(postfix_policy.capture_socket).start()
    yield capture
    capture.stop()


@pytest.fixture(scope="session")
def sendmail(e2e_dir: Path, pki: Pki, sink: Sink) -> Iterator[SendmailInstance]:
    """Sendmail with the snippet as shipped: the milter on a unix socket."""
    instance = SendmailInstance(e2e_dir / "sendmail", pki, sink.port)
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="session")
def sendmail_inet(e2e_dir: Path, pki: Pki, sink: Sink) -> Iterator[SendmailInstance]:
    """Sendmail with the snippet's TCP alternative."""
    instance = SendmailInstance(e2e_dir / "sendmail-inet", pki, sink.port, milter_socket="inet")
    try:
        instance.start()
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="session")
def milters() -> Iterator[dict[str, RelayMilterProcess]]:
    """Every relaymilter process of the session, by target name; all stopped at the end."""
    registry: dict[str, RelayMilterProcess] = {}
    yield registry
    for process in registry.values():
        process.request_stop()
    for process in registry.values():
        process.stop()


def _make_target(name: str, request: pytest.FixtureRequest, e2e_dir: Path) -> Target:
    milters: dict[str, RelayMilterProcess] = request.getfixturevalue("milters")
    sink: Sink = request.getfixturevalue("sink")
    pki: Pki = request.getfixturevalue("pki")
    workdir = e2e_dir / "relaymilter"
    front = "milter"
    if name == "postfix-policy":
        pp: PolicyPostfixInstance = request.getfixturevalue("postfix_policy")
        # As the snippet's service: unix:private/relaymilter-policy in the queue
        # directory, handed to the mail owner as relaymilter-policy.socket makes it.
        milter = RelayMilterProcess(
            name,
            workdir,
            f"unix:{pp.policy_socket}",
            command="policy",
            socket_owner="postfix",
        )
        port, log, front = pp.policy_ports.policy, pp.log, "policy"
    elif name.startswith("sendmail"):
        fixture = "sendmail" if name == "sendmail-unix" else "sendmail_inet"
        sm: SendmailInstance = request.getfixturevalue(fixture)
        milter = RelayMilterProcess(name, workdir, sm.milter_spec)
        port, log = sm.port, sm.log
    else:
        pf: PostfixInstance = request.getfixturevalue("postfix")
        if name == "postfix-unix":
            milter = RelayMilterProcess(name, workdir, f"unix:{pf.unix_milter_socket}")
            port = pf.ports.unix
        else:
            milter = RelayMilterProcess(name, workdir, pf.inet_milter_spec)
            port = pf.ports.inet
        log = pf.log
    milters[name] = milter
    return Target(
        name=name,
        mta=name.split("-")[0],
        port=port,
        milter=milter,
        sink=sink,
        pki=pki,
        mta_log=lambda offset: read_from(log, offset),
        mta_log_size=lambda: size(log),
        front=front,
    )


@pytest.fixture(scope="session")
def targets(request: pytest.FixtureRequest, e2e_dir: Path) -> Callable[[str], Target]:
    """Any target by name, made once per session (``target`` takes them from here too)."""
    made: dict[str, Target] = {}

    def get(name: str) -> Target:
        if name not in made:
            made[name] = _make_target(name, request, e2e_dir)
        return made[name]

    return get


@pytest.fixture(scope="session", params=TARGETS)
def target(request: pytest.FixtureRequest, targets: Callable[[str], Target]) -> Target:
    """Each scenario runs once per target; pytest groups the tests by target."""
    return targets(request.param)


@pytest.fixture(scope="session")
def policy_target(targets: Callable[[str], Target]) -> Target:
    """The ``postfix-policy`` target alone, for the policy service's own tests."""
    return targets("postfix-policy")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    # Keep each phase's report on the item, for _logs_on_failure below.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, show what the MTA and relaymilter logged during the test."""
    name = next((n for n in ("target", "policy_target") if n in request.fixturenames), None)
    if name is None:
        yield
        return
    target: Target = request.getfixturevalue(name)
    mta_offset, milter_offset = target.mta_log_size(), target.milter.offset()
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"--- {target.mta} log ---\n{target.mta_log(mta_offset)[-6000:]}")
        print(f"--- relaymilter log ---\n{read_from(target.milter.log, milter_offset)[-6000:]}")
