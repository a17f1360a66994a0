"""Metrics under the packaged, hardened unit, in the guest of conftest.py.

The .deb's Recommends bring python3-prometheus-client; with a ``metrics:``
section the service serves /metrics on loopback and, with the ReadWritePaths=
drop-in relaymilter(8) documents, writes the textfile; systemd-analyze
security scores the unit as without metrics.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from .conftest import CONF, TEST_DROP_INS, milter_replies, restart
from .container import Guest, wait_for
from .test_unit import REJECT, SECURITY_EXPOSURE, UNIT, main_pid, state

pytestmark = pytest.mark.packaging

PORT = 9099
TEXTFILE_DIR = "/var/lib/relaymilter-metrics"
TEXTFILE = f"{TEXTFILE_DIR}/relaymilter.prom"
REFUSED = (
    'relaymilter_decisions_total{action="reject",connector="onprem-ip",mode="enforce",'
    'organization="contoso",reason="attr36"} 1.0'
)


def scrape() -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_the_unit_serves_metrics_and_writes_the_textfile(service: Guest) -> None:
    installed = service.run("dpkg-query", "-W", "-f=${Status}", "python3-prometheus-client")
    assert installed.stdout == "install ok installed"  # a Recommends of the .deb
    service.run("install", "-d", "-o", "relaymilter", "-g", "relaymilter", TEXTFILE_DIR)
    service.run("mkdir", "-p", TEST_DROP_INS)  # removed by the service fixture
    service.write(f"{TEST_DROP_INS}/metrics.conf", f"[Service]\nReadWritePaths={TEXTFILE_DIR}\n")
    service.run("systemctl", "daemon-reload")
    service.write(
        CONF,
        service.read(CONF) + f"metrics:\n  listen: {PORT}\n  textfile: {TEXTFILE}\n",
    )
    checked = service.run("runuser", "-u", "relaymilter", "--", "relaymilter", "check-config")
    assert "warning" not in (checked.stdout + checked.stderr).lower(), checked
    restart(service, UNIT)
    assert state(service) == "active/running"
    main_pid(service)

    assert milter_replies(service, ["<someone@example.org>"])[0].startswith(REJECT)
    text = service.in_network(scrape)
    assert REFUSED in text
    assert 'relaymilter_config_loads_total{result="success",trigger="start"} 1.0' in text

    def textfile_written() -> bool:
        return service.exists(TEXTFILE) and REFUSED in service.read(TEXTFILE)

    wait_for(textfile_written, 15, "the textfile with the refusal", interval=0.2)
    mode = service.run("stat", "-c", "%a %U", TEXTFILE).stdout.strip()
    assert mode == "644 relaymilter"  # readable by node_exporter despite UMask=0007

    # The listener needs no change to the unit: it scores as it does without one.
    output = service.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for relaymilter.service: ([0-9.]+)", output)
    assert match, output
    assert float(match.group(1)) <= SECURITY_EXPOSURE, output
