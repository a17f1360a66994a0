#!/usr/bin/env python3
"""Throughput benchmark: Postfix with and without relaymilter, driven by smtp-source.

One private Postfix 3.7 instance (Debian's binaries; nothing of the host's
Postfix is touched) gets these smtpd listeners on loopback:

  baseline     no milter: the physical limit of this machine
  relay-unix   relaymilter on a unix socket
  relay-inet   relaymilter on an inet socket (127.0.0.1)
  naive-unix   a do-nothing pymilter milter that overrides every callback
  floor-unix   the cheapest pymilter milter that asks for its own macros: relaymilter's
               negotiation, no Python callback after it (benchmarks/floor_milter.py)
  policy-unix  no milter: relaymilter's policy service (relaymilter policy), attached with
               etc/postfix/main.cf.relaymilter-policy's settings (check_policy_service
               unix:private/relaymilter-policy first in smtpd_relay_restrictions), on a
               unix socket in the private Postfix's queue directory
  floor-policy-unix
               the same settings, with the cheapest asyncio policy service instead: it
               answers DUNNO to every request without reading it (benchmarks/floor_policy.py)
  relay-metrics-unix
               relay-unix with a metrics: section (HTTP endpoint and textfile), scraped
               every second during its runs; not in --smoke runs unless --metrics-listener
  before-unix, before-inet
               with --compare DIR: the relaymilter of another checkout (for
               before/after figures taken in the same run)
  before-policy-unix
               with --compare DIR, if that checkout has a policy service: it, attached as
               policy-unix is (on private/before-policy)

And, unless --no-sendmail, three private Sendmail instances (the e2e suite's
harness, Debian's binaries, with the shipped snippet):

  sendmail-baseline     no milter
  sendmail-relay-unix   relaymilter on a unix socket (S=local:, as the snippet ships)
  sendmail-relay-inet   relaymilter on an inet socket (S=inet:)
  sendmail-before-inet  with --compare DIR: the other checkout's relaymilter, S=inet:

A Sendmail listener's ratio is to sendmail-baseline of the same round.

Mail is relayed to Postfix's smtp-sink. Postfix's load generator smtp-source
drives each listener in turn, in an order that rotates every round (A B C D,
B C D A, ...), so that the ratios of one round are taken under the same
machine conditions; between runs the queue is drained. Workloads:

  W1  20 concurrent sessions, one message per connection, one allowed external recipient
  W2  the same with connection reuse (smtp-source -d: many messages per session)
  W3  20 sessions, one message per connection, 5 recipients per message from a
      foreign sender: 2 in the organization's domain (accepted) and 3 external
      (refused with 550 5.7.64 on the milter listeners). smtp-source exits on the
      first refused recipient, so W3 uses a small asyncio SMTP client
      (``smtp_load`` below) that speaks plain SMTP the same way.

Reported per workload and listener: messages per second (min/median/max over
the rounds), the ratio to the baseline of the same round (min/median/max), the
milter's (or policy service's) CPU time per 1000 messages (from /proc/PID/stat)
and its peak RSS, and Postfix's CPU time per 1000 messages: every process of
the private Postfix, those that exited during the run included (the master's
children's time), from the start of a run until its queue has drained.

Usage:
  benchmarks/throughput.py                       # 5 rounds x 2000 messages (a few minutes)
  benchmarks/throughput.py --rounds 7 --messages 4000 --json out.json
  benchmarks/throughput.py --smoke               # 1 round, a few messages (test suite)
  benchmarks/throughput.py --workloads W1 --rounds 3 --messages 1000   # metrics on and off
  benchmarks/throughput.py --listeners floor-unix relay-unix policy-unix --rounds 9
                                                 # those, and the baseline, in the same rounds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.pki import build_pki  # noqa: E402
from tests.e2e.postfix import MASTER_SERVICES  # noqa: E402
from tests.e2e.sendmail import SendmailInstance  # noqa: E402
from tests.e2e.util import alive, descendants, free_port, kill_leftovers, wait_for  # noqa: E402
from tests.support import stop_promptly  # noqa: E402

POSTFIX = "/usr/sbin/postfix"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLICY_LISTENER = "policy-unix"
FLOOR_POLICY_LISTENER = "floor-policy-unix"
LISTENERS = (
    "baseline",
    "relay-unix",
    "relay-inet",
    "naive-unix",
    "floor-unix",
    POLICY_LISTENER,
    FLOOR_POLICY_LISTENER,
)
METRICS_LISTENER = "relay-metrics-unix"
SENDMAIL_LISTENERS = ("sendmail-baseline", "sendmail-relay-unix", "sendmail-relay-inet")
#: Seconds between two scrapes of relay-metrics-unix while it is driven.
SCRAPE_INTERVAL = 1.0
OWNED_SENDER = "app@contoso.com"
FOREIGN_SENDER = "john@fabrikam.example"
EXTERNAL_RECIPIENT = "kate@tailspintoys.example"
#: The shipped snippet that attaches the policy service to Postfix.
POLICY_SNIPPET = REPO / "etc" / "postfix" / "main.cf.relaymilter-policy"
#: The snippet's settings policy-unix takes (as -o options of its smtpd). Its TLS
#: settings are left out: no listener here offers STARTTLS, and the clients send none.
POLICY_SETTINGS = (
    "smtpd_relay_restrictions",
    "smtpd_policy_service_default_action",
    "smtpd_policy_service_timeout",
)
#: The other policy listeners' sockets, in the queue directory as the snippet's is.
POLICY_SOCKETS = {
    FLOOR_POLICY_LISTENER: "private/floor-policy",
    "before-policy-unix": "private/before-policy",
}
#: How a decision line starts in the policy service's log (stderr, not the journal).
DECISION_LINE = "INFO decision "

RELAYMILTER_CONFIG = """\
socket: inet:8894@127.0.0.1
organizations:
  - name: contoso
    accepted_domains: [contoso.com]
    connectors:
      - name: loopback
        sender_ip_addresses: [127.0.0.0/8]
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
in_flow_delay = 0
biff = no
smtputf8_enable = no
smtp_tls_security_level = none
milter_default_action = tempfail
"""


@dataclass
class Milter:
    name: str
    spec: str
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> Tuple[float, float]:
        """(user, system) CPU seconds of the milter process, all threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0


@dataclass
class Run:
    workload: str
    listener: str
    round: int
    messages: int
    seconds: float
    milter_cpu: Optional[float]
    milter_user: Optional[float] = None
    milter_sys: Optional[float] = None
    #: CPU seconds of the whole private Postfix (Postfix listeners only).
    postfix_cpu: Optional[float] = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Bench:
    base: Path
    compare: Optional[Path] = None
    sessions: int = 20
    metrics: bool = False
    sendmail: bool = True
    #: With --listeners: only these (and their MTA's baseline); None: all.
    only: Optional[FrozenSet[str]] = None
    ports: Dict[str, int] = field(default_factory=dict)
    sink: Optional[subprocess.Popen[bytes]] = None
    milters: Dict[str, Milter] = field(default_factory=dict)
    sendmails: Dict[str, SendmailInstance] = field(default_factory=dict)
    #: The snippet's settings for policy-unix's smtpd, and the check_policy_service
    #: target it names (unix:private/...).
    policy_settings: Dict[str, str] = field(default_factory=dict)
    policy_target: str = ""

    # -- set-up ----------------------------------------------------------------

    @property
    def all_postfix_listeners(self) -> Tuple[str, ...]:
        extra = (METRICS_LISTENER,) if self.metrics else ()
        before: Tuple[str, ...] = ()
        if self.compare:
            before = ("before-unix", "before-inet")
            if (self.compare / "relaymilter" / "policyd").is_dir():  # it has a policy service
                before += ("before-policy-unix",)
        return LISTENERS + extra + before

    @property
    def all_sendmail_listeners(self) -> Tuple[str, ...]:
        if not self.sendmail:
            return ()
        return SENDMAIL_LISTENERS + (("sendmail-before-inet",) if self.compare else ())

    @property
    def postfix_listeners(self) -> Tuple[str, ...]:
        return self._chosen(self.all_postfix_listeners, "baseline")

    @property
    def sendmail_listeners(self) -> Tuple[str, ...]:
        return self._chosen(self.all_sendmail_listeners, "sendmail-baseline")

    def _chosen(self, listeners: Tuple[str, ...], baseline: str) -> Tuple[str, ...]:
        """Those of ``listeners`` that --listeners names, with their baseline if any is."""
        if self.only is None:
            return listeners
        if not self.only.intersection(listeners):
            return ()
        return tuple(name for name in listeners if name in self.only or name == baseline)

    @property
    def listeners(self) -> Tuple[str, ...]:
        return self.postfix_listeners + self.sendmail_listeners

    def start(self) -> None:
        for name in (*self.listeners, "sink", "milter", "before-milter", "metrics-http"):
            self.ports[name] = free_port()
        for sub in ("etc", "queue", "data", "sockets"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        shutil.chown(self.base / "data", "postfix", "postfix")
        # smtpd (user postfix) reaches the 0660 milter sockets through their group.
        shutil.chown(self.base / "sockets", "root", "postfix")
        os.chmod(self.base / "sockets", 0o2750)
        self._start_sink()
        self._start_milters()
        self._start_postfix()
        self._start_policy_services()
        if self.sendmail_listeners:
            self._start_sendmails()

    def _start_sendmails(self) -> None:
        """Three private Sendmails: no milter, relaymilter over unix, relaymilter over inet."""
        pki = build_pki(self.base / "pki")
        config = self.base / "relaymilter.yml"
        relay = [sys.executable, "-m", "relaymilter", "run", "-c", str(config), "--socket"]
        for name in self.sendmail_listeners:
            socket = "inet" if name.endswith("-inet") else "unix"
            edit = _without_the_milter if name == "sendmail-baseline" else str
            instance = SendmailInstance(
                self.base / name, pki, self.ports["sink"], edit, milter_socket=socket
            )
            instance.start()
            self.sendmails[name] = instance
            self.ports[name] = instance.port
            if name != "sendmail-baseline":
                before = self.compare if self.compare and "-before-" in name else None
                self._start_milter(name, relay, instance.milter_spec, before or REPO)
                wait_for(lambda m=self.milters[name]: _milter_ready(m), 20, f"{name} to listen")  # type: ignore[misc]

    def _start_milter(self, name: str, command: List[str], spec: str, cwd: Path) -> None:
        log = open(self.base / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            [*command, spec],
            stdout=log,
            stderr=subprocess.STDOUT,
            # "python -m relaymilter" takes the package from its working directory.
            cwd=cwd,
            preexec_fn=_umask_007,
        )
        self.milters[name] = Milter(name, spec, process)

    def _start_sink(self) -> None:
        port = self.ports["sink"]
        self.sink = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: _connects(("127.0.0.1", port)), 10, "smtp-sink")

    def _start_milters(self) -> None:
        config = self.base / "relaymilter.yml"
        config.write_text(RELAYMILTER_CONFIG)
        sockets = self.base / "sockets"
        relay = [sys.executable, "-m", "relaymilter", "run", "-c", str(config), "--socket"]
        naive = [sys.executable, str(REPO / "benchmarks" / "naive_milter.py")]
        floor = [sys.executable, str(REPO / "benchmarks" / "floor_milter.py")]
        specs = {
            "relay-unix": (relay, f"unix:{sockets}/relay.sock"),
            **self._metrics_spec(config, sockets),
            "relay-inet": (relay, f"inet:{self.ports['milter']}@127.0.0.1"),
            "naive-unix": (naive, f"unix:{sockets}/naive.sock"),
            "floor-unix": (floor, f"unix:{sockets}/floor.sock"),
        }
        if self.compare:
            specs["before-unix"] = (relay, f"unix:{sockets}/before.sock")
            specs["before-inet"] = (relay, f"inet:{self.ports['before-milter']}@127.0.0.1")
        for name, (command, spec) in specs.items():
            if name not in self.postfix_listeners:
                continue
            cwd = self.compare if self.compare and name.startswith("before-") else REPO
            self._start_milter(name, command, spec, cwd)
        for milter in self.milters.values():
            wait_for(lambda m=milter: _milter_ready(m), 20, f"{milter.name} to listen")  # type: ignore[misc]

    def policy_services(self) -> Dict[str, Tuple[List[str], str, Path]]:
        """The policy listeners' services: command, socket (unix:private/...), working directory."""
        config = str(self.base / "relaymilter.yml")
        relay = [sys.executable, "-m", "relaymilter", "policy", "-c", config, "--socket"]
        floor = [sys.executable, str(REPO / "benchmarks" / "floor_policy.py")]
        services = {
            POLICY_LISTENER: (relay, self.policy_target, REPO),
            FLOOR_POLICY_LISTENER: (floor, f"unix:{POLICY_SOCKETS[FLOOR_POLICY_LISTENER]}", REPO),
        }
        if self.compare:
            socket = f"unix:{POLICY_SOCKETS['before-policy-unix']}"
            services["before-policy-unix"] = (relay, socket, self.compare)
        return {name: service for name, service in services.items() if name in self.listeners}

    def _start_policy_services(self) -> None:
        """relaymilter policy on the unix socket the snippet names, in the queue's private/,
        and the other policy services next to it.

        Started once Postfix has made its queue directory; smtpd connects only
        when the first RCPT TO comes. A socket is Postfix's mail owner's, as
        the packaged relaymilter-policy.socket makes it: private/ and smtpd are
        that user's alone.
        """
        for name, (command, target, cwd) in self.policy_services().items():
            # A relative path is relative to the queue directory, as smtpd resolves it.
            path = self.base / "queue" / target.partition(":")[2]
            wait_for(path.parent.is_dir, 30, f"postfix to make {path.parent}")
            self._start_milter(name, command, f"unix:{path}", cwd)
            service = self.milters[name]
            wait_for(lambda s=service: _milter_ready(s), 20, f"{name} to listen")  # type: ignore[misc]
            shutil.chown(path, "postfix", "postfix")

    def policy_options(self, target: str) -> str:
        """The snippet's settings as -o options, with ``target`` in its check_policy_service."""
        settings = dict(self.policy_settings)
        restrictions = settings["smtpd_relay_restrictions"]
        settings["smtpd_relay_restrictions"] = restrictions.replace(self.policy_target, target)
        # Values with spaces and commas: Postfix 3's -o { name = value } form.
        return "".join(f" -o {{ {k} = {v} }}" for k, v in settings.items())

    def policy_decisions(self) -> int:
        """The decision lines the policy service has logged."""
        with open(self.base / f"{POLICY_LISTENER}.log", errors="replace") as log:
            return sum(line.startswith(DECISION_LINE) for line in log)

    def _metrics_spec(self, config: Path, sockets: Path) -> Dict[str, Tuple[List[str], str]]:
        """relay-unix's milter with a metrics: section (endpoint and textfile), if asked."""
        if not self.metrics:
            return {}
        (self.base / "textfile").mkdir(exist_ok=True)
        metrics_config = self.base / "relaymilter-metrics.yml"
        metrics_config.write_text(
            RELAYMILTER_CONFIG
            + f"metrics:\n  listen: 127.0.0.1:{self.ports['metrics-http']}\n"
            + f"  textfile: {self.base / 'textfile' / 'relaymilter.prom'}\n"
        )
        command = [sys.executable, "-m", "relaymilter", "run", "-c", str(metrics_config)]
        return {METRICS_LISTENER: ([*command, "--socket"], f"unix:{sockets}/metrics.sock")}

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.ports['metrics-http']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def counted_decisions(self) -> int:
        """relaymilter_decisions_total of relay-metrics-unix, summed over its labels."""
        return round(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in self.scrape().splitlines()
                if line.startswith("relaymilter_decisions_total{")
            )
        )

    def _start_postfix(self) -> None:
        values = {
            "base": self.base,
            "sink_port": self.ports["sink"],
            "milter_port": self.ports["milter"],
        }
        values.update({name.replace("-", "_"): port for name, port in self.ports.items()})
        self.policy_settings, self.policy_target = policy_settings(POLICY_SNIPPET.read_text())
        (self.base / "etc" / "main.cf").write_text(MAIN_CF.format(**values))
        (self.base / "etc" / "master.cf").write_text(self.master_cf())
        self._postfix("start")
        for name in self.postfix_listeners:
            wait_for(lambda p=self.ports[name]: _connects(("127.0.0.1", p)), 30, f"postfix {name}")  # type: ignore[misc]

    def master_cf(self) -> str:
        lines = []
        policies = self.policy_services()
        for name in self.postfix_listeners:
            line = f"127.0.0.1:{self.ports[name]} inet n - n - - smtpd"
            milter = self.milters.get(name)
            if name in policies:
                line += self.policy_options(policies[name][1])
            elif milter is not None:
                kind, _, rest = milter.spec.partition(":")
                if kind == "unix":
                    line += f" -o smtpd_milters=unix:{rest}"
                else:  # libmilter's inet:PORT@HOST is Postfix's inet:HOST:PORT
                    port, _, host = rest.partition("@")
                    line += f" -o smtpd_milters=inet:{host}:{port}"
            lines.append(line)
        return "\n".join(lines) + "\n" + MASTER_SERVICES

    def _postfix(self, *args: str) -> None:
        subprocess.run(
            [POSTFIX, "-c", str(self.base / "etc"), *args],
            capture_output=True,
            timeout=60,
            check=False,
        )

    # -- runs ------------------------------------------------------------------

    def queue_files(self) -> int:
        queue = self.base / "queue"
        postfix = sum(
            len(files)
            for sub in ("maildrop", "incoming", "active", "deferred")
            for _, _, files in os.walk(queue / sub)
        )
        sendmail = sum(
            len(list((instance.run / "mqueue").iterdir())) for instance in self.sendmails.values()
        )
        return postfix + sendmail

    def drain(self) -> None:
        wait_for(lambda: self.queue_files() == 0, 120, "the queue to drain", interval=0.05)

    def postfix_cpu_seconds(self) -> float:
        """CPU seconds (user + system) of the private Postfix so far, its exited processes too.

        The master's own time, its live descendants' (smtpd, cleanup, qmgr,
        smtp, ...) and, for those that have exited, the time the kernel adds to
        the master's children's time when it reaps them.
        """
        pid_file = self.base / "queue" / "pid" / "master.pid"
        master = int(pid_file.read_text().split()[0])
        total = 0.0
        for pid in (master, *descendants(master)):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile: its time is the master's children's
            ticks = int(fields[11]) + int(fields[12])
            if pid == master:
                ticks += int(fields[13]) + int(fields[14])
            total += ticks / CLOCK_TICKS
        return total

    def run(self, workload: str, listener: str, number: int, messages: int) -> Run:
        milter = self.milters.get(listener)
        before = milter.cpu_seconds() if milter else (0.0, 0.0)
        on_postfix = listener in self.postfix_listeners
        postfix_before = self.postfix_cpu_seconds() if on_postfix else 0.0
        scraping = threading.Event()
        scraper = None
        if listener == METRICS_LISTENER:
            scraper = threading.Thread(target=self._scrape_until, args=(scraping,), daemon=True)
            scraper.start()
        start = time.perf_counter()
        try:
            if workload == "W3":
                asyncio.run(smtp_load(self.ports[listener], self.sessions, messages))
            else:
                self.smtp_source(workload, listener, messages)
        finally:
            seconds = time.perf_counter() - start
            scraping.set()
            if scraper is not None:
                scraper.join()
        run = Run(workload, listener, number, messages, seconds, None)
        if milter:
            after = milter.cpu_seconds()
            run.milter_user, run.milter_sys = after[0] - before[0], after[1] - before[1]
            run.milter_cpu = run.milter_user + run.milter_sys
        self.drain()
        if on_postfix:
            run.postfix_cpu = self.postfix_cpu_seconds() - postfix_before
        return run

    def _scrape_until(self, done: threading.Event) -> None:
        """Scrape the endpoint every SCRAPE_INTERVAL (a busy Prometheus) until ``done``."""
        while not done.wait(SCRAPE_INTERVAL):
            self.scrape()

    def smtp_source(self, workload: str, listener: str, messages: int) -> None:
        command = [
            SMTP_SOURCE,
            "-s",
            str(self.sessions),
            "-m",
            str(messages),
            "-l",
            "512",
            "-M",
            "client.bench.test",
            "-f",
            OWNED_SENDER,
            "-t",
            EXTERNAL_RECIPIENT,
        ]
        if workload == "W2":
            command.append("-d")  # do not disconnect: reuse the session for the next message
        result = subprocess.run(
            [*command, f"127.0.0.1:{self.ports[listener]}"],
            capture_output=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"smtp-source failed ({workload}/{listener}): "
                + result.stderr.decode(errors="replace")
            )

    # -- tear-down -------------------------------------------------------------

    def stop(self) -> None:
        pid_file = self.base / "queue" / "pid" / "master.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else 0
        processes = [pid, *descendants(pid)] if pid and alive(pid) else []
        self._postfix("stop")
        if processes:
            wait_for(lambda: not any(alive(p) for p in processes), 15, "postfix to stop")
            kill_leftovers(processes, "/usr/lib/postfix/sbin/")
        for instance in self.sendmails.values():
            instance.close()
        for milter in self.milters.values():
            milter.process.terminate()
            stop_promptly(milter.process, milter.spec)
        if self.sink:
            self.sink.terminate()
            self.sink.wait(10)


W3_RECIPIENTS = (
    "a@contoso.com",
    "b@contoso.com",
    "c@tailspintoys.example",
    "d@tailspintoys.example",
    "e@fabrikam.example",
)
BODY = b"Subject: relaymilter benchmark\r\n\r\n" + b"x" * 480 + b"\r\n.\r\n"


async def smtp_load(port: int, sessions: int, messages: int) -> None:
    """``sessions`` concurrent clients, one message per connection, until ``messages`` are sent."""
    remaining = [messages]

    async def client() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await one_message(port)

    await asyncio.gather(*(client() for _ in range(sessions)))


async def one_message(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def command(line: bytes) -> bytes:
        if line:
            writer.write(line + b"\r\n")
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        return reply

    try:
        await command(b"")  # banner
        await command(b"EHLO client.bench.test")
        await command(b"MAIL FROM:<" + FOREIGN_SENDER.encode() + b">")
        accepted = 0
        for recipient in W3_RECIPIENTS:
            accepted += (await command(b"RCPT TO:<" + recipient.encode() + b">")).startswith(b"250")
        if accepted and (await command(b"DATA")).startswith(b"354"):
            writer.write(BODY)
            await command(b"")
        await command(b"QUIT")
    finally:
        writer.close()


def recipients_sent(runs: List[Run], listener: str) -> int:
    """The recipients ``listener``'s runs sent: one a message, five in W3."""
    return sum(
        r.messages * (len(W3_RECIPIENTS) if r.workload == "W3" else 1)
        for r in runs
        if r.listener == listener
    )


def policy_settings(snippet: str) -> Tuple[Dict[str, str], str]:
    """The snippet's POLICY_SETTINGS, and the unix: socket its check_policy_service names.

    main.cf's syntax: a line that starts with white space continues the one
    before; a comment line is skipped, even inside a continued setting.
    """
    settings: Dict[str, str] = {}
    name = ""
    for line in snippet.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if name:
                settings[name] = f"{settings[name]} {line.strip()}".strip()
            continue
        name, _, value = (part.strip() for part in line.partition("="))
        settings[name] = value
    chosen = {name: settings[name] for name in POLICY_SETTINGS}
    words = chosen["smtpd_relay_restrictions"].replace(",", " ").split()
    target = words[words.index("check_policy_service") + 1]
    if not target.startswith("unix:private/"):
        raise RuntimeError(f"{POLICY_SNIPPET.name}: expected unix:private/..., not {target}")
    return chosen, target


def _umask_007() -> None:
    os.umask(0o007)


def _without_the_milter(snippet: str) -> str:
    """The snippet without its INPUT_MAIL_FILTER line (the Sendmail baseline)."""
    lines = [line for line in snippet.splitlines() if not line.startswith("INPUT_MAIL_FILTER(")]
    return "\n".join(lines) + "\n"


def baseline_of(listener: str) -> str:
    """The listener a ratio is taken to: the same MTA without a milter."""
    return "sendmail-baseline" if listener.startswith("sendmail-") else "baseline"


def _connects(address: Any) -> bool:
    import socket

    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def _milter_ready(milter: Milter) -> bool:
    if milter.process.poll() is not None:
        raise RuntimeError(f"{milter.name} exited with {milter.process.returncode}")
    kind, _, rest = milter.spec.partition(":")
    if kind == "unix":
        return _connects(rest)
    port, _, host = rest.partition("@")
    return _connects((host, int(port)))


def summarize(
    runs: List[Run], milters: Dict[str, Milter], listeners: Tuple[str, ...]
) -> Dict[str, Any]:
    summary: Dict[str, Any] = {}
    for workload in sorted({r.workload for r in runs}):
        rows = {}
        baselines = {
            (r.listener, r.round): r.rate
            for r in runs
            if r.workload == workload and r.listener in ("baseline", "sendmail-baseline")
        }
        for listener in listeners:
            mine = [r for r in runs if r.workload == workload and r.listener == listener]
            rates = [r.rate for r in mine]
            ratios = [r.rate / baselines[baseline_of(listener), r.round] for r in mine]
            cpu = [r.milter_cpu / r.messages * 1000 for r in mine if r.milter_cpu is not None]
            user = [r.milter_user / r.messages * 1000 for r in mine if r.milter_user is not None]
            postfix = [r.postfix_cpu / r.messages * 1000 for r in mine if r.postfix_cpu is not None]
            rows[listener] = {
                "rate": _spread(rates, 0),
                "ratio": _spread(ratios, 3),
                "milter_cpu_s_per_1000": _spread(cpu, 3) if cpu else None,
                "milter_user_s_per_1000": _spread(user, 3) if user else None,
                "postfix_cpu_s_per_1000": _spread(postfix, 3) if postfix else None,
            }
        summary[workload] = rows
    summary["peak_rss_mib"] = {name: m.peak_rss_mib() for name, m in milters.items()}
    return summary


def _spread(values: List[float], digits: int) -> Dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def report(summary: Dict[str, Any]) -> str:
    lines = []
    for workload, rows in summary.items():
        if workload in ("peak_rss_mib", "metrics_decisions", "policy_decisions"):
            continue
        lines.append(
            f"{workload}: messages/s (min/median/max), ratio to the MTA's baseline "
            "(min/median/max), "
            "milter's or policy service's CPU s/1000 msgs (median: total, of which user), "
            "Postfix's CPU s/1000 msgs (median)"
        )
        for listener, row in rows.items():
            rate, ratio, cpu = row["rate"], row["ratio"], row["milter_cpu_s_per_1000"]
            user, postfix = row["milter_user_s_per_1000"], row.get("postfix_cpu_s_per_1000")
            cpu_text = f"{cpu['median']:.3f} {user['median']:.3f}" if cpu and user else f"{'-':<11}"
            postfix_text = f"{postfix['median']:.3f}" if postfix else "-"
            lines.append(
                f"  {listener:<18} {rate['min']:>7.0f} {rate['median']:>7.0f} "
                f"{rate['max']:>7.0f}   "
                f"{ratio['min']:.3f} {ratio['median']:.3f} {ratio['max']:.3f}   {cpu_text}"
                f"   {postfix_text}"
            )
    rss = ", ".join(f"{name} {value} MiB" for name, value in summary["peak_rss_mib"].items())
    lines.append(f"peak RSS: {rss}")
    if "metrics_decisions" in summary:
        counts = summary["metrics_decisions"]
        lines.append(
            f"{METRICS_LISTENER}: {counts['counted']} decisions counted, {counts['judged']} judged"
        )
    if "policy_decisions" in summary:
        counts = summary["policy_decisions"]
        lines.append(
            f"{POLICY_LISTENER}: {counts['logged']} decision lines logged, "
            f"{counts['judged']} recipients judged"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per workload (default 5)")
    parser.add_argument(
        "--messages", type=int, default=2000, help="messages per run (default 2000)"
    )
    parser.add_argument(
        "--workloads", nargs="+", default=["W1", "W2", "W3"], choices=["W1", "W2", "W3"]
    )
    parser.add_argument("--smoke", action="store_true", help="1 round of 20 messages per workload")
    parser.add_argument("--json", metavar="FILE", help="write every run and the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the instance's directory (logs)")
    parser.add_argument(
        "--sessions", type=int, default=20, help="concurrent SMTP sessions (default 20)"
    )
    parser.add_argument(
        "--metrics-listener",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"run {METRICS_LISTENER} too (default: yes, except with --smoke)",
    )
    parser.add_argument(
        "--sendmail",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the Sendmail listeners too (default: yes)",
    )
    parser.add_argument(
        "--listeners",
        nargs="+",
        metavar="NAME",
        help="only these listeners, and the baseline of their MTA (default: all of them)",
    )
    parser.add_argument(
        "--compare",
        metavar="DIR",
        type=Path,
        help="also run the relaymilter of this checkout (e.g. a git worktree of an older commit)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("must run as root (a private Postfix instance needs it)")
    rounds, messages = (1, 20) if args.smoke else (args.rounds, args.messages)
    base = Path(tempfile.mkdtemp(prefix="relaymilter-bench-"))
    compare = args.compare.resolve() if args.compare else None
    metrics = not args.smoke if args.metrics_listener is None else args.metrics_listener
    bench = Bench(
        base,
        compare=compare,
        sessions=args.sessions,
        metrics=metrics,
        sendmail=args.sendmail,
        only=frozenset(args.listeners) if args.listeners else None,
    )
    unknown = (bench.only or frozenset()).difference(
        bench.all_postfix_listeners + bench.all_sendmail_listeners
    )
    if unknown:
        os.rmdir(base)
        parser.error(f"no such listener here: {', '.join(sorted(unknown))}")
    runs: List[Run] = []
    try:
        bench.start()
        for workload in args.workloads:
            for number in range(rounds):
                listeners = bench.listeners
                shift = number % len(listeners)
                order = listeners[shift:] + listeners[:shift]
                for listener in order:
                    runs.append(bench.run(workload, listener, number, messages))
        summary = summarize(runs, bench.milters, bench.listeners)
        if METRICS_LISTENER in bench.listeners:
            # The counters must equal the recipients the listener judged.
            judged = recipients_sent(runs, METRICS_LISTENER)
            counted = bench.counted_decisions()
            summary["metrics_decisions"] = {"judged": judged, "counted": counted}
            if counted != judged:
                print(f"warning: {METRICS_LISTENER} counted {counted} of {judged}", file=sys.stderr)
        if POLICY_LISTENER in bench.listeners:
            # Every recipient of policy-unix went through the policy service, and only those.
            judged = recipients_sent(runs, POLICY_LISTENER)
            logged = bench.policy_decisions()
            summary["policy_decisions"] = {"judged": judged, "logged": logged}
            if logged != judged:
                print(f"warning: {POLICY_LISTENER} logged {logged} of {judged}", file=sys.stderr)
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(report(summary))
    if args.json:
        raw = [vars(r) | {"rate": r.rate} for r in runs]
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": raw}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
