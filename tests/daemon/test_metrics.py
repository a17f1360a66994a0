"""Prometheus metrics: the config section, the real endpoint and textfile of the real daemon.

The daemon is driven over its milter socket; its counters are checked against
the decision lines it logged. Every wait is for a condition, never a fixed time.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relaymilter.config import ConfigError, parse_config
from relaymilter.decisionlog.record import parse_line

from ..scenarios import CONFIG
from ..support import (
    ATTR36,
    REPO,
    Daemon,
    MilterSession,
    free_port,
    run_cli,
    running_daemon,
)

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]
DECISION_KEY = ("organization", "connector", "action", "reason", "mode")


# -- helpers ------------------------------------------------------------------


def with_metrics(base: str, **settings: object) -> str:
    """``base`` with a ``metrics:`` section (JSON is YAML: paths and addresses stay quoted)."""
    return base + "metrics: " + json.dumps(settings) + "\n"


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(port: int, path: str = "/metrics", accept: Optional[str] = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def decisions(samples: Samples) -> Dict[Tuple[str, ...], float]:
    """relaymilter_decisions_total by (organization, connector, action, reason, mode)."""
    found = {}
    for (name, labels), number in samples.items():
        if name == "relaymilter_decisions_total":
            values = dict(labels)
            found[tuple(values[k] for k in DECISION_KEY)] = number
    return found


def logged_decisions(log: str) -> Dict[Tuple[str, ...], float]:
    counts: Dict[Tuple[str, ...], float] = collections.Counter()
    for record in map(parse_line, log.splitlines()):
        if record is not None:
            key = tuple(getattr(record, k) or "" for k in DECISION_KEY)
            counts[key] += 1
    return dict(counts)


def delta(after: Dict[Tuple[str, ...], float], before: Dict[Tuple[str, ...], float]) -> dict:
    changed = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in changed.items() if v}


def wait_for(condition: Callable[[], object], what: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def send_traffic(spec: str) -> List[str]:
    """A mix of decisions of both organizations, every reason, and an unattributed client."""
    replies = []
    session = MilterSession(spec)
    try:
        session.negotiate()
        session.connect("192.0.2.10")  # contoso/onprem-ip (first in the file)
        session.mail("<>")
        replies.append(session.rcpt("<kate@tailspintoys.com>"))  # attr36
        replies.append(session.rcpt("<kate@contoso.com>"))  # internal-recipient
        session.mail("<app@contoso.com>")
        replies.append(session.rcpt("<a@example.net>"))  # sender-domain
        session.mail("<app@fabrikam.com>")  # fabrikam/fabrikam-ip: it owns the sender
        replies.append(session.rcpt("<b@example.net>"))
    finally:
        session.close()
    other = MilterSession(spec)
    try:
        other.negotiate()
        other.connect("203.0.113.99")  # nobody's
        other.mail("<x@example.org>")
        replies.append(other.rcpt("<y@example.net>"))
    finally:
        other.close()
    return replies


# -- the config section ---------------------------------------------------------


def config_issues(text: str) -> List[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "relaymilter.yml")
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (9099, ("127.0.0.1", 9099)),
        ("9099", ("127.0.0.1", 9099)),
        ("127.0.0.1:9099", ("127.0.0.1", 9099)),
        ("localhost:9099", ("127.0.0.1", 9099)),
        ("[::1]:9099", ("::1", 9099)),
    ],
)
def test_listen_defaults_to_loopback(listen: object, expected: Tuple[str, int]) -> None:
    config = parse_config(with_metrics(CONFIG, listen=listen), "relaymilter.yml")
    assert config.metrics is not None
    assert config.metrics.listen == expected
    assert config.metrics.textfile is None
    assert not [w for w in config.warnings if "metrics" in w]


def test_no_metrics_section_means_no_metrics() -> None:
    assert parse_config(CONFIG, "relaymilter.yml").metrics is None


def test_textfile_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config = parse_config(
        with_metrics(CONFIG, textfile="relaymilter.prom"), str(tmp_path / "relaymilter.yml")
    )
    assert config.metrics is not None
    assert config.metrics.listen is None
    assert config.metrics.textfile == str(tmp_path / "relaymilter.prom")


def test_metrics_errors_name_file_line_and_key(tmp_path: Path) -> None:
    text = CONFIG + "metrics:\n  listen: 127.0.0.1:99999\n  textfile: /nonexistent/dir/x.prom\n"
    text += "  interval: 5\n"
    line = CONFIG.count("\n") + 1
    assert config_issues(text) == [
        f"relaymilter.yml:{line + 1}: metrics.listen: '99999' is not a port number (1-65535)",
        f"relaymilter.yml:{line + 2}: metrics.textfile: the directory /nonexistent/dir does not "
        "exist (node_exporter's textfile collector reads its --collector.textfile.directory)",
        f"relaymilter.yml:{line + 3}: metrics.interval: unknown key (allowed: listen, textfile)",
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("metrics: {}\n", "metrics: set listen, textfile or both (or leave metrics out)"),
        ("metrics: yes\n", "metrics: must be a mapping with keys listen, textfile"),
        ("metrics:\n  listen: mail.example:9099\n", "'mail.example' is not an IP address"),
        ("metrics:\n  listen: '::1:9099'\n", "write an IPv6 address as [ADDRESS]:PORT"),
        ("metrics:\n  listen: [127.0.0.1, 9099]\n", "must be PORT or ADDRESS:PORT"),
        ("metrics:\n  listen: 127.0.0.1:0\n", "'0' is not a port number"),
        ("metrics:\n  listen: 8894\n", "port 8894 is the milter socket's (inet:8894@127.0.0.1)"),
        ("metrics:\n  textfile: ''\n", "metrics.textfile: must not be empty"),
    ],
)
def test_bad_metrics_sections(section: str, message: str) -> None:
    issues = config_issues(CONFIG + section)
    assert any(message in issue for issue in issues), issues


def test_metrics_warnings(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    text = with_metrics(CONFIG, listen="0.0.0.0:9099", textfile=str(tmp_path / "dir" / "x.txt"))
    warnings = parse_config(text, "relaymilter.yml").warnings
    assert any(
        "metrics.listen: '0.0.0.0:9099' is not a loopback address: anyone who reaches port 9099"
        in w
        for w in warnings
    ), warnings
    assert any("only *.prom files" in w for w in warnings), warnings
    (tmp_path / "x.prom").mkdir()
    issues = config_issues(with_metrics(CONFIG, textfile=str(tmp_path / "x.prom")))
    assert any("exists and is not a regular file" in i for i in issues), issues


def test_check_config_says_when_the_library_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "relaymilter.yml"
    config.write_text(with_metrics(CONFIG, listen=9099))
    # prometheus_client blocked, as if python3-prometheus-client were not installed.
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from relaymilter import cli; sys.exit(cli.main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    line = CONFIG.count("\n") + 1
    assert (
        f"{config}:{line}: metrics: needs the Python library prometheus_client, which is not "
        "installed: install python3-prometheus-client (Debian, Ubuntu) or "
        "python3-prometheus_client (EPEL), or remove the metrics section"
    ) in result.stdout + result.stderr
    ok = run_cli("check-config", "-c", str(config))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_relay_without_metrics_does_not_need_the_library(tmp_path: Path) -> None:
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG)
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from relaymilter import cli, config\n"
        "from relaymilter.milterd import milter, service\n"
        f"config.load_config({str(config)!r})\n"
        "assert cli.main(['check-config', '-c', sys.argv[1]]) == 0\n"
        "assert 'relaymilter.daemon.metrics' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_decision_child_is_made_once() -> None:
    from relaymilter.core.policy import Transaction
    from relaymilter.daemon.metrics import Metrics

    config = parse_config(CONFIG, "relaymilter.yml")
    metrics = Metrics()
    transaction = Transaction(config, None, None, "<>")
    decision = transaction.decide("<a@example.net>")
    for _ in range(3):
        metrics.decision(transaction.attribution, decision)
    samples = parse_samples(metrics.render().decode())
    assert decisions(samples) == {("", "", "continue", "unattributed", "enforce"): 3.0}
    assert len(metrics._decision_children) == 1


# -- the running daemon -----------------------------------------------------------


class MetricsDaemon:
    def __init__(self, daemon: Daemon, port: int, textfile: Path) -> None:
        self.daemon, self.port, self.textfile = daemon, port, textfile

    def samples(self) -> Samples:
        return parse_samples(scrape(self.port))

    def textfile_samples(self) -> Samples:
        return parse_samples(self.textfile.read_text()) if self.textfile.exists() else {}


@pytest.fixture(scope="module")
def metrics_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsDaemon]:
    directory = tmp_path_factory.mktemp("metrics")
    port = free_port()
    textfile = directory / "textfile" / "relaymilter.prom"
    textfile.parent.mkdir()
    config = directory / "relaymilter.yml"
    config.write_text(with_metrics(CONFIG, listen=f"127.0.0.1:{port}", textfile=str(textfile)))
    spec = f"unix:{directory}/relaymilter.sock"
    with running_daemon(config, spec, directory / "daemon.log") as daemon:
        yield MetricsDaemon(daemon, port, textfile)


def test_counters_equal_the_decisions_made(metrics_daemon: MetricsDaemon) -> None:
    daemon = metrics_daemon.daemon
    before = metrics_daemon.samples()
    log_before = len(daemon.log())
    replies = send_traffic(daemon.spec)
    assert replies == ["550 " + ATTR36, "continue", "continue", "continue", "continue"]
    log = daemon.wait_for_log("to=<y@example.net>", after=log_before)[log_before:]
    logged = logged_decisions(log)
    assert logged == {
        ("contoso", "onprem-ip", "reject", "attr36", "enforce"): 1,
        ("contoso", "onprem-ip", "continue", "internal-recipient", "enforce"): 1,
        ("contoso", "onprem-ip", "continue", "sender-domain", "enforce"): 1,
        ("fabrikam", "fabrikam-ip", "continue", "sender-domain", "enforce"): 1,
        ("", "", "continue", "unattributed", "enforce"): 1,
    }
    after = metrics_daemon.samples()
    assert delta(decisions(after), decisions(before)) == logged
    latency = "relaymilter_rcpt_decision_duration_seconds_count"
    assert value(after, latency) - value(before, latency) == 5
    assert value(after, "relaymilter_rcpt_decision_duration_seconds_sum") > 0
    opened = "relaymilter_connections_total"
    assert value(after, opened) - value(before, opened) == 2
    # Both sessions are closed: the gauge comes back down once libmilter has seen that.
    wait_for(
        lambda: value(metrics_daemon.samples(), "relaymilter_connections_in_progress") == 0,
        "no connection in progress",
    )
    assert value(after, "relaymilter_internal_errors_total", stage="envrcpt") == 0
    # No sender, recipient or client address in any label.
    text = scrape(metrics_daemon.port)
    for secret in ("tailspintoys", "example.net", "192.0.2.10", "203.0.113.99", "app@"):
        assert secret not in text


def test_the_textfile_follows_the_counters(metrics_daemon: MetricsDaemon) -> None:
    send_traffic(metrics_daemon.daemon.spec)
    # The endpoint's figures, once the decisions are all counted...
    wait_for(
        lambda: value(metrics_daemon.samples(), "relaymilter_connections_in_progress") == 0,
        "the sessions to close",
    )
    expected = decisions(metrics_daemon.samples())
    # ... reach the file at its next rewrite.
    wait_for(
        lambda: decisions(metrics_daemon.textfile_samples()) == expected,
        "the textfile to show the decisions",
    )
    textfile = metrics_daemon.textfile
    assert textfile.stat().st_mode & 0o777 == 0o644  # node_exporter's user reads it
    # Replaced atomically: only the file itself in the directory, no temporary left.
    assert [p.name for p in textfile.parent.iterdir()] == ["relaymilter.prom"]
    info = value(
        metrics_daemon.textfile_samples(),
        "relaymilter_config_info",
        identity=_identity(metrics_daemon.daemon),
        organizations="2",
        connectors="5",
        version=_version(),
    )
    assert info == 1


def _identity(daemon: Daemon) -> str:
    match = re.search(r"config ([0-9a-f]{12})\)", daemon.log())
    assert match, daemon.log()
    return match.group(1)


def _version() -> str:
    from relaymilter import __version__

    return __version__


def test_config_metrics_at_start(metrics_daemon: MetricsDaemon) -> None:
    samples = metrics_daemon.samples()
    assert value(samples, "relaymilter_config_loads_total", trigger="start", result="success") == 1
    assert value(samples, "relaymilter_config_last_reload_successful") == 1
    assert (
        abs(value(samples, "relaymilter_config_last_success_timestamp_seconds") - time.time()) < 600
    )
    assert value(samples, "relaymilter_config_organizations") == 2
    assert value(samples, "relaymilter_config_connectors") == 5
    assert value(samples, "process_resident_memory_bytes") > 0


def test_other_paths_and_openmetrics(metrics_daemon: MetricsDaemon) -> None:
    assert "/metrics" in scrape(metrics_daemon.port, "/")
    with pytest.raises(urllib.error.HTTPError) as caught:
        scrape(metrics_daemon.port, "/nothing")
    assert caught.value.code == 404
    openmetrics = scrape(metrics_daemon.port, accept="application/openmetrics-text; version=1.0.0")
    assert openmetrics.rstrip().endswith("# EOF")
    assert "# TYPE relaymilter_decisions counter" in openmetrics


def test_a_burst_of_scrapes_while_the_milter_answers(metrics_daemon: MetricsDaemon) -> None:
    results: List[object] = []
    lock = threading.Lock()

    def scraper() -> None:
        try:
            outcome: object = len(scrape(metrics_daemon.port))
        except Exception as exc:  # collected and reported below
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=scraper) for _ in range(60)]
    for thread in threads:
        thread.start()
    replies = send_traffic(metrics_daemon.daemon.spec)
    for thread in threads:
        thread.join(60)
    assert replies[0] == "550 " + ATTR36
    assert len(results) == 60
    assert all(isinstance(r, int) and r > 0 for r in results), results
    assert "relaymilter_decisions_total" in scrape(metrics_daemon.port)


def test_a_slow_client_blocks_neither_the_milter_nor_other_scrapes(
    metrics_daemon: MetricsDaemon,
) -> None:
    silent = socket.create_connection(("127.0.0.1", metrics_daemon.port), timeout=5)
    partial = socket.create_connection(("127.0.0.1", metrics_daemon.port), timeout=5)
    partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    try:
        started = time.monotonic()
        replies = send_traffic(metrics_daemon.daemon.spec)
        assert replies[0] == "550 " + ATTR36
        assert "relaymilter_decisions_total" in scrape(metrics_daemon.port)
        # Far below the clients' 10 s timeout: nothing waited for them.
        assert time.monotonic() - started < 5
    finally:
        silent.close()
        partial.close()


def test_internal_errors_and_tempfail_answers(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "relaymilter.yml"
    config.write_text(with_metrics(CONFIG, listen=port))
    spec = f"unix:{tmp_path}/faulty.sock"
    argv = [sys.executable, str(REPO / "tests" / "faulty_relaymilter.py"), "run"]
    with running_daemon(config, spec, tmp_path / "faulty.log", argv):
        session = MilterSession(spec)
        try:
            session.negotiate()
            session.connect("192.0.2.10")
            session.mail("<>")
            assert session.rcpt("<boom@example.net>").startswith("451 4.3.0")
            assert session.rcpt("<kate@contoso.com>") == "continue"
        finally:
            session.close()
        samples = parse_samples(scrape(port))
    assert value(samples, "relaymilter_internal_errors_total", stage="envrcpt") == 1
    assert value(samples, "relaymilter_tempfail_answers_total") == 1
    assert value(samples, "relaymilter_rcpt_decision_duration_seconds_count") == 2
    assert sum(decisions(samples).values()) == 1


def test_reloads_are_counted_and_the_textfile_follows(tmp_path: Path) -> None:
    port = free_port()
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    config = tmp_path / "relaymilter.yml"
    config.write_text(with_metrics(CONFIG, listen=port, textfile=str(first / "r.prom")))
    spec = f"unix:{tmp_path}/relaymilter.sock"
    with running_daemon(config, spec, tmp_path / "daemon.log") as daemon:
        wait_for(lambda: (first / "r.prom").exists(), "the first textfile")
        identity = _identity(daemon)

        def loads(result: str) -> float:
            return value(
                parse_samples(scrape(port)),
                "relaymilter_config_loads_total",
                trigger="reload",
                result=result,
            )

        # A broken file: refused, counted, and the flag drops.
        config.write_text(config.read_text() + "mode: bogus\n")
        daemon.reload()
        wait_for(lambda: loads("failure") == 1, "the failed reload to be counted")
        samples = parse_samples(scrape(port))
        assert value(samples, "relaymilter_config_last_reload_successful") == 0
        # A good one, with the textfile moved and the endpoint's address changed.
        new_port = free_port()
        text = with_metrics(
            CONFIG.replace("bücher.example", "books.example"),
            listen=new_port,
            textfile=str(second / "r.prom"),
        )
        config.write_text(text)
        daemon.reload()
        wait_for(lambda: loads("success") == 1, "the reload to be counted")
        samples = parse_samples(scrape(port))  # still on the old port
        assert value(samples, "relaymilter_config_last_reload_successful") == 1
        new_identity = [
            dict(labels)["identity"]
            for (name, labels) in samples
            if name == "relaymilter_config_info"
        ]
        assert len(new_identity) == 1 and new_identity[0] != identity
        wait_for(lambda: (second / "r.prom").exists(), "the new textfile")
        wait_for(lambda: not (first / "r.prom").exists(), "the old textfile to be removed")
        daemon.wait_for_log(
            f"reload: metrics.listen changed to 127.0.0.1:{new_port}; it takes effect on restart"
        )


def test_start_fails_when_the_endpoint_cannot_listen(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relaymilter.yml"
        config.write_text(with_metrics(CONFIG, listen=port))
        spec = f"unix:{tmp_path}/relaymilter.sock"
        result = run_cli("run", "-c", str(config), "--socket", spec)
    assert result.returncode == 1
    assert f"cannot start: metrics: cannot listen on 127.0.0.1:{port}: " in result.stderr
    assert not (tmp_path / "relaymilter.sock").exists()


def test_without_the_section_nothing_listens(tmp_path: Path) -> None:
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("no ss (iproute2)")
    config = tmp_path / "relaymilter.yml"
    config.write_text(CONFIG)
    spec = f"unix:{tmp_path}/relaymilter.sock"
    with running_daemon(config, spec, tmp_path / "daemon.log") as daemon:
        listening = subprocess.run(
            [ss, "-ltnpH"], capture_output=True, text=True, timeout=30
        ).stdout
        assert f"pid={daemon.process.pid}," not in listening
        assert "metrics" not in daemon.log()


# -- the alert rules and the dashboard in etc/ ------------------------------------------

RULES = REPO / "etc" / "prometheus" / "relaymilter.rules.yml"
DASHBOARD = REPO / "etc" / "grafana" / "relaymilter.json"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # scripts/bootstrap unpacks Debian's promtool package there (Debian 13; in
    # Debian 12 promtool comes with prometheus), without installing it.
    unpacked = Path("/var/cache/relaymilter-test-tools/promtool/usr/bin/promtool")
    found = str(unpacked) if unpacked.is_file() else shutil.which("promtool")
    assert found, (
        f"promtool is missing from {unpacked} and PATH: scripts/bootstrap unpacks Debian's"
        " promtool (Debian 13) or prometheus (Debian 12) package there"
    )
    return subprocess.run(
        [found, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


SYNC_CONFIG = """\
organizations: []
sources:
  status: status.json
  max_snapshot_age: 1h
  files:
    - name: tenants
      directory: organizations.d
"""


def exposed_names(site: Path) -> set:
    """Every sample name relaymilter exposes, once each metric has a value.

    With a ``sources:`` section and a first ``relaymilter sync`` in ``site``:
    the snapshot's and the sources' families exist only then.
    """
    from relaymilter.config import load_config
    from relaymilter.core.policy import Transaction
    from relaymilter.daemon.metrics import TRIGGER_RELOAD, Metrics, SnapshotView

    config = parse_config(CONFIG, "relaymilter.yml")
    metrics = Metrics()
    transaction = Transaction(config, None, None, "<>")
    metrics.decision(transaction.attribution, transaction.decide("<a@example.net>"))
    metrics.internal_error("envrcpt")
    metrics.tempfail()
    metrics.stale_snapshot()
    metrics.rcpt_seconds(0.001)
    metrics.connection_opened()
    metrics.config_loaded(config, TRIGGER_RELOAD, time.time())
    metrics.config_failed(TRIGGER_RELOAD)
    (site / "organizations.d").mkdir()
    (site / "organizations.d" / "fabrikam.yml").write_text(
        "organizations: [{name: Fabrikam, accepted_domains: [fabrikam.com], "
        "connectors: [{name: onprem, sender_ip_addresses: [192.0.2.0/24]}]}]\n"
    )
    (site / "relaymilter.yml").write_text(SYNC_CONFIG)
    synced = run_cli("sync", "-c", str(site / "relaymilter.yml"))
    assert synced.returncode == 0, synced.stdout + synced.stderr
    sources = load_config(str(site / "relaymilter.yml")).sources
    metrics.sync.watch(lambda: SnapshotView(sources, time.time(), False))
    return {name for name, _ in parse_samples(metrics.render().decode())}


def dashboard_queries() -> List[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    return queries


@pytest.mark.tools
def test_alert_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 12 rules found" in checked.stdout
    tested = promtool("test", "rules", "relaymilter.rules.test.yml", cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    names = {rule["alert"] for group in yaml_load(RULES)["groups"] for rule in group["rules"]}
    assert {
        "RelaymilterInternalErrors",
        "RelaymilterReloadFailed",
        "RelaymilterRefusalsJump",
        "RelaymilterSyncFailing",
        "RelaymilterSyncSourceDown",
        "RelaymilterSnapshotOld",
        "RelaymilterSnapshotStale",
        "RelaymilterStaleSnapshotAnswers",
    } <= names


def yaml_load(path: Path) -> dict:
    import yaml

    loaded: dict = yaml.safe_load(path.read_text())
    return loaded


@pytest.mark.tools
def test_dashboard_has_the_panels_and_valid_queries(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Refusals per organization",
        "Decisions by reason",
        "RCPT decision latency",
        "Configuration loads and reloads",
        "Sources and snapshot (relaymilter sync)",
        "Snapshot stale",
        "Last sync",
        "Snapshot age",
        "Sources up",
        "Stale snapshot answers",
    } <= titles
    by_title = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}
    assert any("organization" in q for q in by_title["Refusals per organization"])
    assert any("by (reason)" in q for q in by_title["Decisions by reason"])
    assert sum("histogram_quantile" in q for q in by_title["RCPT decision latency"]) == 3
    assert any("time() - " in q for q in by_title["Snapshot age"])
    assert any("by (source, kind)" in q for q in by_title["Sources up"])
    # Unique ids, inside the 24 columns, no two panels on the same cell.
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    taken: Dict[Tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, (panel["title"], taken.get((x, y)))
                taken[x, y] = panel["title"]
    # Every query is PromQL that promtool parses (Grafana's variables filled in).
    queries = [
        q.replace("$__rate_interval", "5m").replace("$instance", ".*") for q in dashboard_queries()
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard_query_{i}", "expr": q} for i, q in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.rules.yml").write_text(json.dumps(rules))
    checked = promtool("check", "rules", "dashboard.rules.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rules_and_dashboard_name_only_metrics_that_exist(tmp_path: Path) -> None:
    exposed = exposed_names(tmp_path)
    referenced = set(re.findall(r"\brelaymilter_[a-z_]+", RULES.read_text()))
    for query in dashboard_queries():
        referenced.update(re.findall(r"\brelaymilter_[a-z_]+", query))
    assert referenced and referenced <= exposed, referenced - exposed


# -- through a private Postfix --------------------------------------------------------


@pytest.mark.tools
def test_benchmark_counts_every_decision_through_postfix(tmp_path: Path) -> None:
    """The throughput benchmark's metrics listener, in a tiny run: Postfix, smtp-source and
    relaymilter with metrics on; its counters equal the recipients Postfix had judged."""
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "throughput.py"),
            "--smoke",
            "--metrics-listener",
            "--workloads",
            "W1",
            "W3",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert {r["listener"] for r in figures["runs"]} >= {"relay-unix", "relay-metrics-unix"}
    # 20 messages of one recipient (W1), 20 of five (W3).
    assert figures["summary"]["metrics_decisions"] == {"judged": 120, "counted": 120}
    assert "warning" not in result.stderr


def test_a_textfile_that_cannot_be_written_is_logged_once_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from relaymilter.daemon.metrics import Metrics, TextfileWriter

    directory = tmp_path / "gone"
    writer = TextfileWriter(Metrics(), str(directory / "relaymilter.prom"), interval=60)
    with caplog.at_level("INFO", logger="relaymilter"):
        writer._write()
        writer._write()
        directory.mkdir()
        writer._write()
    messages = [r.getMessage() for r in caplog.records]
    (failure,) = [m for m in messages if "cannot write" in m]  # once, not at every retry
    assert failure == (
        f"metrics: cannot write {directory}/relaymilter.prom: No such file or directory (retrying)"
    )
    assert f"metrics: {directory}/relaymilter.prom written again" in messages
    assert (directory / "relaymilter.prom").read_text().startswith("# HELP")
    assert [p.name for p in directory.iterdir()] == ["relaymilter.prom"]


def test_series_that_alerts_watch_exist_from_the_start_at_zero() -> None:
    # increase() over a series that appears at 1 never sees its first step.
    from relaymilter.daemon.metrics import Metrics

    text = Metrics().render().decode()
    for stage in ("connect", "negotiate", "envrcpt"):
        assert f'relaymilter_internal_errors_total{{stage="{stage}"}} 0.0' in text
    assert 'relaymilter_config_loads_total{result="failure",trigger="reload"} 0.0' in text


# -- the endpoint against slow clients ---------------------------------------------------


def _trickle(sock: socket.socket, stop: threading.Event, interval: float) -> None:
    """A slowloris: one byte of a request every ``interval`` seconds, never the end."""
    request = b"GET /metrics HTTP/1.1\r\nHost: relay\r\nX-Padding: " + b"x" * 1000
    for byte in request:
        if stop.wait(interval):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def test_slow_clients_cannot_stall_the_endpoint(metrics_daemon: MetricsDaemon) -> None:
    # The review: 20 clients that each send one header byte every 4 s held all 16
    # slots of the old endpoint (its timeout was per receive), and a normal scrape
    # went unanswered.
    stop = threading.Event()
    clients = [
        socket.create_connection(("127.0.0.1", metrics_daemon.port), timeout=30) for _ in range(20)
    ]
    threads = [threading.Thread(target=_trickle, args=(c, stop, 4.0)) for c in clients]
    try:
        for thread in threads:
            thread.start()
        for _ in range(3):
            assert "relaymilter_decisions_total" in scrape(metrics_daemon.port)
        assert send_traffic(metrics_daemon.daemon.spec)[0] == "550 " + ATTR36
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for client in clients:
            client.close()


def _closed_by_the_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_a_client_gets_a_deadline_for_its_whole_request() -> None:
    from relaymilter.daemon.metrics import Metrics
    from relaymilter.daemon.metricshttp import MAX_CONNECTIONS, MetricsServer

    server = MetricsServer(("127.0.0.1", 0), Metrics().registry, request_deadline=1.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    port = server.server_address[1]
    stop = threading.Event()
    try:
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        trickler = threading.Thread(target=_trickle, args=(slow, stop, 0.2))
        trickler.start()
        assert "relaymilter_decisions_total" in scrape(port)
        # A byte every 0.2 s does not buy time: closed once its 1 s are up.
        assert _closed_by_the_server(slow, within=5)
        # More connections than the endpoint keeps: the oldest make way.
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
        newest = socket.create_connection(("127.0.0.1", port))
        assert "relaymilter_decisions_total" in scrape(port)
        assert _closed_by_the_server(silent[0], within=5)
        newest.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
        assert newest.recv(100).startswith(b"HTTP/1.0 405 ")
        for sock in [*silent, newest]:
            sock.close()
        # A request too large to be one is answered, not buffered without end.
        huge = socket.create_connection(("127.0.0.1", port), timeout=5)
        huge.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 9000)
        assert huge.recv(100).startswith(b"HTTP/1.0 431 ")
        huge.close()
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join()
