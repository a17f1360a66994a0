"""Helpers shared by the tests: configs, certificates, the real daemon and a milter client."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import miltertest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from miltertest import codec
from miltertest import constants as mc

REPO = Path(__file__).resolve().parent.parent
ATTR36 = (
    "5.7.64 Relay Access Denied ATTR36. For more details please refer to "
    "https://support.microsoft.com/kb/3169958."
)


def relaymilter_command() -> List[str]:
    """The installed console script (the entry point users run)."""
    script = Path(sys.executable).parent / "relaymilter"
    found = str(script) if script.exists() else shutil.which("relaymilter")
    assert found, "the relaymilter entry point is not installed (run scripts/bootstrap)"
    return [found]


def readable_copy(directory: Path) -> Tuple[str, Path]:
    """The system's interpreter and a copy of the package that any user can read.

    For a test that runs relaymilter as another user: this checkout, and its
    .venv, may be in a directory only root can enter (a clone in /root, mode
    0700 on Debian). ``directory`` must be one others may enter. The
    interpreter is the real one behind .venv/bin/python, with Debian's
    packages (python3-milter and the rest) on its path.
    """
    copy = directory / "readable"
    shutil.copytree(
        REPO / "relaymilter", copy / "relaymilter", ignore=shutil.ignore_patterns("__pycache__")
    )
    for path in [copy, *copy.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    # A virtualenv others may enter has the libraries (the floor test's);
    # otherwise the system's interpreter has them, from Debian's packages.
    if _others_may_enter(Path(sys.prefix)):
        return sys.executable, copy
    return os.path.realpath(sys.executable), copy


def _others_may_enter(directory: Path) -> bool:
    return all(os.stat(path).st_mode & 0o001 for path in [directory, *directory.parents])


def readable_relaymilter_command(directory: Path) -> List[str]:
    """``relaymilter`` for another user (see ``readable_copy``)."""
    python, copy = readable_copy(directory)
    code = f"import sys; sys.path.insert(0, {str(copy)!r}); from relaymilter.cli import main; "
    return [python, "-c", code + "sys.exit(main())"]


def run_cli(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*relaymilter_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


# -- certificates -------------------------------------------------------------


def _name(cn: str, org: Optional[str] = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attributes)


def make_certificate(
    path: Path,
    cn: str,
    issuer_cn: str = "Contoso Issuing CA",
    sans: Sequence[str] = (),
    days: Tuple[int, int] = (-1, 365),
    key: Optional[ec.EllipticCurvePrivateKey] = None,
) -> x509.Certificate:
    """Write a PEM certificate (its issuer is a throwaway key: trust is the MTA's business).

    ``key``: the subject's key (a new one by default); a renewal may keep it.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
    )
    if sans:
        names = [x509.DNSName(n) for n in sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def sendmail_fingerprint(cert: x509.Certificate) -> str:
    """``{cert_fp}`` as Sendmail sends it with CertFingerprintAlgorithm sha256."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


# -- the daemon ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect_socket(spec: str, timeout: float = 5.0) -> socket.socket:
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(rest)
        return sock
    port, _, host = rest.partition("@")
    family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect((host.strip("[]"), int(port)))
    return sock


def wait_for_socket(spec: str, process: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    """Wait until the daemon accepts connections (readiness), or fail with its log."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError(f"relaymilter exited with {process.returncode}")
        try:
            connect_socket(spec, timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"relaymilter did not listen on {spec} within {deadline}s")


class Daemon:
    """A running ``relaymilter run`` (or ``policy``: see ``argv``), its socket and its log."""

    def __init__(self, config: Path, spec: str, log: Path, argv: Optional[List[str]] = None):
        self.config, self.spec, self.log_path = config, spec, log
        command = argv or [*relaymilter_command(), "run"]
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, "-c", str(config), "--socket", spec],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, deadline: float = 10.0, after: int = 0) -> str:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            log = self.log()
            if text in log[after:]:
                return log
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not logged; log:\n{self.log()}")

    def reload(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            stop_promptly(self.process, self.spec)
        self._log.close()
        return self.process.returncode


def stop_promptly(process: subprocess.Popen[bytes], spec: str, deadline: float = 15.0) -> None:
    """Wait for a terminated daemon, waking libmilter's accept loop meanwhile.

    libmilter notices a stop request only when its accept loop wakes: every
    5 s, or at once when a connection arrives.
    """
    end = time.monotonic() + deadline
    while process.poll() is None and time.monotonic() < end:
        with contextlib.suppress(OSError):
            connect_socket(spec, timeout=1).close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.1)
    if process.poll() is None:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_daemon(
    config: Path, spec: str, log: Path, argv: Optional[List[str]] = None
) -> Iterator[Daemon]:
    daemon = Daemon(config, spec, log, argv)
    try:
        wait_for_socket(spec, daemon.process)
        yield daemon
    finally:
        daemon.stop()


# relaymilter whose reloads wait: reload N (the initial load is not one) logs
# "test: reload N waits", then waits until the file RELEASE.N exists. Only
# reloading.load_config is wrapped: the signals, threads and socket are real.
_GATED_RELOAD = """\
import logging, os, sys, time
from relaymilter import cli
from relaymilter.daemon import reloading as daemon

release = sys.argv.pop(1)
load_config = daemon.load_config
calls = 0


def gated_load_config(path):
    global calls
    calls += 1
    if calls > 1:
        logging.getLogger("relaymilter").info("test: reload %d waits", calls - 1)
        while not os.path.exists(f"{release}.{calls - 1}"):
            time.sleep(0.01)
    return load_config(path)


daemon.load_config = gated_load_config
sys.exit(cli.main())
"""


def gated_reload_command(directory: Path) -> Tuple[List[str], Path]:
    """``relaymilter run`` whose reloads wait to be released, and the release-file prefix.

    Release reload N with ``Path(f"{prefix}.{N}").touch()``.
    """
    script = directory / "gated_relaymilter.py"
    script.write_text(_GATED_RELOAD)
    prefix = directory / "release"
    return [sys.executable, str(script), str(prefix), "run"], prefix


# -- a milter-protocol client (the MTA side) ----------------------------------


class MilterSession:
    """Speaks the MTA side of the milter protocol to the daemon, via ``miltertest``."""

    def __init__(self, spec: str) -> None:
        self.sock = connect_socket(spec)
        self.conn = miltertest.MilterConnection(self.sock)
        self.actions = 0
        self.protocol = 0
        self.symlists: Dict[int, List[str]] = {}
        self.client_address: Optional[str] = None

    def negotiate(self) -> None:
        actions, protocol = codec.optneg_mta_capable(mc.SMFI_V6_ACTS, mc.SMFI_V6_PROT)
        self.sock.sendall(codec.encode_optneg(actions, protocol))
        # Read the raw reply: miltertest ignores the symbol lists that follow.
        (length,) = struct.unpack("!I", self._read(4))
        data = self._read(length)
        assert data[:1] == b"O"
        _, self.actions, self.protocol = struct.unpack("!III", data[1:13])
        rest = data[13:]
        while rest:
            (stage,) = struct.unpack("!I", rest[:4])
            text, _, rest = rest[4:].partition(b"\0")
            self.symlists[stage] = text.decode().split()

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("milter closed the connection")
            data += chunk
        return data

    def connect(self, address: str, hostname: str = "client.example") -> None:
        # Like an MTA, send {client_addr} later if the milter asked for it.
        self.client_address = address
        if self.protocol & mc.SMFIP_NOCONNECT:
            return
        family = mc.SMFIA_INET6 if ":" in address else mc.SMFIA_INET
        self.conn._send(
            mc.SMFIC_CONNECT, hostname=hostname, family=family, port=2525, address=address
        )
        if not self.protocol & mc.SMFIP_NR_CONN:
            self.conn.recv()

    def macros(self, stage: str, values: Dict[str, str]) -> None:
        if values:
            self.conn.send_macro(stage, **values)

    def mail(self, sender: str, macros: Optional[Dict[str, str]] = None) -> None:
        self.macros(mc.SMFIC_MAIL, macros or {})
        self.conn._send(mc.SMFIC_MAIL, args=[sender])
        if not self.protocol & mc.SMFIP_NR_MAIL:
            self.conn.recv()

    def rcpt(self, recipient: str, macros: Optional[Dict[str, str]] = None) -> str:
        """The reply: "continue", or the SMTP reply text such as "550 5.7.64 …"."""
        values = dict(macros or {})
        if "{client_addr}" in self.symlists.get(3, ()) and self.client_address:
            values.setdefault("{client_addr}", self.client_address)
        self.macros(mc.SMFIC_RCPT, values)
        command, fields = self.conn.send_get(mc.SMFIC_RCPT, args=[recipient])
        if command == mc.SMFIR_CONTINUE:
            return "continue"
        if command == mc.SMFIR_REPLYCODE:
            return f"{fields['smtpcode']} {fields['text']}"
        return command

    def abort(self) -> None:
        self.conn._send(mc.SMFIC_ABORT)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn._send(mc.SMFIC_QUIT)
        self.sock.close()


class PolicyClient:
    """Postfix's side of the policy protocol: requests of ``name=value`` lines, one reply each."""

    def __init__(self, spec: str, timeout: float = 10.0) -> None:
        self.sock = connect_socket(spec, timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, **attributes: str) -> str:
        """Send one request (``request=smtpd_access_policy`` first) and return its action."""
        lines = ["request=smtpd_access_policy", *(f"{k}={v}" for k, v in attributes.items())]
        self.send(("\n".join(lines) + "\n\n").encode("utf-8", "surrogateescape"))
        return self.reply()

    def reply(self) -> str:
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the policy service closed the connection")
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        name, _, action = reply.decode("utf-8").partition("=")
        assert name == "action", reply
        return action

    def rcpt(self, client: str, sender: str, recipient: str, **more: str) -> str:
        """A RCPT TO check, as Postfix's smtpd_relay_restrictions asks it."""
        attributes = {
            "protocol_state": "RCPT",
            "protocol_name": "ESMTP",
            "client_address": client,
            "sender": sender,
            "recipient": recipient,
            "instance": more.pop("instance", "1.2.3"),
            "queue_id": more.pop("queue_id", ""),
            **more,
        }
        return self.request(**attributes)

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Whether the service closes this connection (without a reply) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()
