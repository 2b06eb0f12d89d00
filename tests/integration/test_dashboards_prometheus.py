"""The Grafana dashboards against a real Prometheus scraping a running `roost up --demo`.

Debian's `prometheus` package (installed by scripts/prometheus.sh when missing: the test fails, never skips,
when it cannot be) scrapes every service's /metrics each second; the test drives a little traffic through the
`roost` command (a webhook subscriber on a local receiver, a host with an unreachable BMC, a command for every
service, a dead letter, a keystone user for dcsync to carry, an update strategy), then asks Prometheus's HTTP
API for every query of every panel of every generated dashboard and wants data back.  A gauge exported at 0 is
data; a metric without any series is not.  `promtool check metrics` must be clean for every service's /metrics.

With ROOST_DASHBOARDS_TEST_DEMO=0 (or a roost whose `up` lacks `--demo`) it runs plain `roost up` (about 35 s
instead of 80): no agents, no BMC emulator, no subcloud databases; the few panels that need them are listed in
NEEDS_DEMO with why, and the test checks that exactly those are the empty ones.  The demo's heartbeats use UDP
ports of the test's own, so another demo on the machine does not interfere."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
ROOST = [sys.executable, "-m", "services.cli"]
RATE_INTERVAL = "20s"          # $__rate_interval, for a 1 s scrape interval

# Panels plain `roost up` cannot fill, and why (`roost up --demo` runs what they need).
NEEDS_DEMO = {
    "orchestrator: drain duration":
        "a lock or unlock reaches the orchestrator only for an online host: host agents",
    "orchestrator: strategy step duration":
        "a strategy needs unlocked-enabled-available controllers: host agents",
    "dcsync: changes applied at subclouds": "a subcloud agent and keystone/glance databases",
    "dcsync: sync lag": "keystone/glance databases at the controller (the change log heads)",
    "dcsync: audits by outcome": "an online subcloud (its agent) to audit",
    "dcsync: audit duration": "an online subcloud (its agent) to audit",
    "dcsync: rows repaired by audits": "an online subcloud (its agent) to audit",
}

DEAD_LETTER = """
import asyncio, sys
from pathlib import Path
from services.cli.client import BusClient, resolve_bus_url, resolve_token
async def main():
    data = Path(sys.argv[1])
    async with BusClient(resolve_bus_url(None, data), resolve_token(None, data)) as client:
        reply = await client.command("roost.cmd.dlq.list", {"limit": 0})
        print(reply.status)
asyncio.run(main())
"""


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("roost_grafana_generate", ROOT / "deploy/grafana/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The demo's heartbeats on ports of this test's own, so that another demo on the machine (another test
# session) cannot answer them.
HEARTBEAT_PORTS = {"ROOST_HEARTBEAT__PORT": str(free_udp_port()),
                   "ROOST_HEARTBEAT__AGENT_PORT": str(free_udp_port())}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_HTTP_BASE_PORT": "0", "ROOST_LOG_FORMAT": "json", **HEARTBEAT_PORTS})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(process: subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Signal the process; if it is not gone in time, kill its whole session (it leads one)."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


class Receiver(BaseHTTPRequestHandler):
    """A webhook subscriber that takes everything (2xx)."""

    received = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).received += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Site:
    data_dir: Path
    demo: bool
    services: dict[str, str]          # name -> http://host:port
    prometheus: str                   # http://127.0.0.1:port


@pytest.fixture(scope="module")
def prometheus_bin() -> Path:
    setup = subprocess.run([str(ROOT / "scripts/prometheus.sh")], capture_output=True, text=True, timeout=600)
    if setup.returncode != 0:
        pytest.fail(f"Prometheus is needed and could not be installed:\n{setup.stderr[-3000:]}")
    return Path(setup.stdout.strip().splitlines()[-1])


def roost(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*ROOST, "--data-dir", str(data_dir), *args], env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*processes: subprocess.Popen[str], timeout: float = 90) -> None:
    for p in processes:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"{' '.join(map(str, p.args))} exited {p.returncode}:\n{out}\n{err}"


def has_demo() -> bool:
    """`roost up --demo` when this roost has it; ROOST_DASHBOARDS_TEST_DEMO=0 forces plain `roost up`."""
    if os.environ.get("ROOST_DASHBOARDS_TEST_DEMO", "auto") == "0":
        return False
    help_text = subprocess.run([*ROOST, "up", "--help"], env=clean_env(), capture_output=True, text=True,
                               timeout=60).stdout
    return "--demo" in help_text


def drive_traffic(data_dir: Path, hook_url: str, demo: bool) -> None:
    """Something for every panel to show, on top of what the demo does by itself (its hosts unlocked through
    the orchestrator, its subclouds joined and audited, its webhook subscriber)."""
    password = data_dir.parent / "bmc-password"
    password.write_text("not-a-real-bmc\n")
    # A command for every service, and an invalid one: rejected, and dead-lettered by core's group.
    first = [roost(data_dir, "webhook", "add", hook_url),
             roost(data_dir, "ping"),
             roost(data_dir, "heartbeat", "status"),
             roost(data_dir, "strategy", "show"),
             subprocess.Popen([sys.executable, "-c", DEAD_LETTER, str(data_dir)], env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    if demo:
        # A user created at the controller's keystone, which dcsync carries to both subclouds; an update
        # strategy over the demo's site (applied below: its first steps are timed within seconds).
        first += [roost(data_dir, "demo", "user", "add", "alice"),
                  roost(data_dir, "strategy", "create", "r2", "--version", "2.0")]
    else:
        first.append(roost(data_dir, "subcloud", "add", "edge-1"))
    finish(*first)
    # A provisioned host is added locked: alarm 950.001 (warning), a customer log, a webhook delivery to the
    # subscriber added above.
    finish(roost(data_dir, "host", "add", "--personality", "worker", "--hostname", "worker-9",
                 "--mgmt-mac", "52:54:00:99:00:09"),
           *([roost(data_dir, "strategy", "apply")] if demo else []))
    # A BMC nobody answers at, and a power-on through it (the host is locked): BMC latency and failures now,
    # not at the next BMC audit round (every 60 s).  The demo's BMCs all answer.
    finish(roost(data_dir, "host", "update", "worker-9", "--bmc-address", "https://127.0.0.1:1",
                 "--bmc-username", "root", "--bmc-password-file", str(password)))
    finish(roost(data_dir, "host", "power-on", "worker-9"))


def prometheus_config(services: dict[str, str]) -> str:
    targets = [{"targets": [urllib.parse.urlsplit(url).netloc], "labels": {"service": name}}
               for name, url in services.items()]
    return json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "roost", "metrics_path": "/metrics", "static_configs": targets}],
    }, indent=2)


def wait_targets_up(prometheus: str, expected: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            seen = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        except httpx.HTTPError:
            seen = []
        if len(seen) == expected and all(t["health"] == "up" for t in seen):
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus's targets are not all up in {timeout}s: "
                         + json.dumps([(t["scrapeUrl"], t["health"], t.get("lastError")) for t in seen]))


@pytest.fixture(scope="module")
def site(prometheus_bin: Path) -> Iterator[Site]:
    # Not pytest's tmp_path: another pytest session resets /tmp/pytest-of-<user> to 0700, which locks out the
    # embedded PostgreSQL's unprivileged user (see tests/integration/test_roost_up.py).
    base = Path(tempfile.mkdtemp(prefix="roost-dashboards-test-"))
    data_dir = base / "data"
    demo = has_demo()
    up_out, up_err = base / "up-stdout.txt", base / "up-stderr.txt"
    up = subprocess.Popen([*ROOST, "--data-dir", str(data_dir), "up", *(["--demo"] if demo else [])],
                          env=clean_env(),
                          stdout=up_out.open("w"), stderr=up_err.open("w"), start_new_session=True)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    prometheus: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 150
        ready = "the site is ready" if demo else "Ctrl-C stops everything"
        while ready not in up_out.read_text():
            assert up.poll() is None, f"roost up exited {up.returncode}:\n{up_err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"roost up not ready:\n{up_out.read_text()[-2000:]}\n{up_err.read_text()[-3000:]}"
                + "".join(f"\n--- {log.name}:\n{log.read_text()[-1500:]}"
                          for log in sorted((data_dir / "demo" / "logs").glob("*.log"))))
            time.sleep(0.2)
        runtime = json.loads((data_dir / "run" / "roost.json").read_text())
        services = {name: str(s["http"]) for name, s in runtime["services"].items()}

        port = free_port()
        (base / "prometheus.yml").write_text(prometheus_config(services))
        prometheus = subprocess.Popen(
            [str(prometheus_bin / "prometheus"), f"--config.file={base / 'prometheus.yml'}",
             f"--storage.tsdb.path={base / 'prometheus'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=(base / "prometheus.log").open("w"), stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        drive_traffic(data_dir, f"http://127.0.0.1:{receiver.server_address[1]}/hook", demo)
        assert prometheus.poll() is None, (base / "prometheus.log").read_text()[-3000:]
        wait_targets_up(url, len(services))
        yield Site(data_dir, demo, services, url)
    finally:
        receiver.shutdown()
        if prometheus is not None:
            stop(prometheus, signal.SIGTERM, 30)
        stop(up, signal.SIGINT, 60)
        shutil.rmtree(base, ignore_errors=True)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        if p["type"] == "row":
            yield from p.get("panels", [])
        else:
            yield p


def substitute(expr: str) -> str:
    out = expr.replace("$__rate_interval", RATE_INTERVAL)
    assert "$" not in out, f"a template variable the test does not know: {expr}"
    return out


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", f"{expr}: {reply.status_code} {body}"
    result = body["data"]["result"]
    assert isinstance(result, list)
    return result


def test_every_panel_of_every_dashboard_returns_data(site: Site) -> None:
    generator = load_generator()
    queries: dict[tuple[str, str, str], str] = {}
    for name, make in generator.DASHBOARDS.items():
        for p in panels(make()):
            for t in p["targets"]:
                queries[(name, p["title"], t["refId"])] = substitute(t["expr"])
    assert len(queries) > 50
    known_titles = {title for (_, title, _) in queries}
    assert set(NEEDS_DEMO) <= known_titles, set(NEEDS_DEMO) - known_titles
    may_be_empty = set() if site.demo else set(NEEDS_DEMO)

    # Rates need two scrapes after a series appears, the refreshed gauges a few seconds: ask until all answer
    # or the deadline, then judge.
    empty = dict(queries)
    deadline = time.monotonic() + 45
    while True:
        for key, expr in list(empty.items()):
            if query(site.prometheus, expr):
                del empty[key]
        if all(title in may_be_empty for (_, title, _) in empty) or time.monotonic() > deadline:
            break
        time.sleep(1)
    lines = [f"{dash} / {title} / {ref}: {queries[(dash, title, ref)]}" for (dash, title, ref) in sorted(empty)
             if title not in may_be_empty]
    assert not lines, "panels whose query returns no data from Prometheus:\n" + "\n".join(lines)
    filled = may_be_empty - {title for (_, title, _) in empty}
    assert not filled, f"these panels have data without the demo now: take them out of NEEDS_DEMO: {filled}"
    assert Receiver.received >= 1, "the webhook receiver got the locked worker's alarm"


def test_promtool_check_metrics_is_clean_for_every_service(site: Site, prometheus_bin: Path) -> None:
    for name, url in site.services.items():
        exposition = httpx.get(f"{url}/metrics", timeout=10)
        assert exposition.status_code == 200, name
        check = subprocess.run([str(prometheus_bin / "promtool"), "check", "metrics"], input=exposition.text,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), (
            f"promtool check metrics on {name}'s /metrics:\n{check.stdout}{check.stderr}")
