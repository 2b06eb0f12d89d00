"""`roost up` as a newcomer runs it: a fresh data dir, nothing configured (embedded NATS and PostgreSQL),
then `roost status`, `roost ping` and `roost dlq list` against it, Ctrl-C, and a restart on the same data.
Bad configuration ends in one clear line and a non-zero exit, without a traceback or a password."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

ROOST = [sys.executable, "-m", "services.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_HTTP_BASE_PORT": "0", "ROOST_LOG_FORMAT": "json", **extra})
    return env


def roost(data_dir: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ROOST, "--data-dir", str(data_dir), *args], env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


class Up:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.stdout = data_dir.parent / f"{data_dir.name}-stdout.txt"
        self.stderr = data_dir.parent / f"{data_dir.name}-stderr.txt"
        self.process = subprocess.Popen([*ROOST, "--data-dir", str(data_dir), "up"], env=env,
                                        stdout=self.stdout.open("w"), stderr=self.stderr.open("w"))

    def wait_ready(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.stdout.read_text()
            if "Ctrl-C stops everything" in out:
                return out
            if self.process.poll() is not None:
                raise AssertionError(f"roost up exited {self.process.returncode}:\n{self.stderr.read_text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"roost up not ready in {timeout}s:\n{self.stderr.read_text()[-3000:]}")

    def interrupt(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)


ANONYMOUS_CONNECT = """
import asyncio, sys
from services.core.bus.abc import NotConnected
from services.core.bus.factory import transport_from_url
async def main():
    try:
        await transport_from_url(sys.argv[1]).connect()
    except NotConnected:
        sys.exit(3)
asyncio.run(main())
"""


INVALID_COMMAND = """
import asyncio, sys
from pathlib import Path
from schemas.envelope import Envelope
from services.cli.client import BusClient, resolve_bus_url, resolve_token
async def main():
    data = Path(sys.argv[1])
    async with BusClient(resolve_bus_url(None, data), resolve_token(None, data)) as client:
        reply = await client.command("roost.cmd.dlq.list", {"limit": 0})
        print(reply.status)
asyncio.run(main())
"""


def runtime_bus_url(data_dir: Path) -> str:
    return str(json.loads((data_dir / "run" / "roost.json").read_text())["bus_url"])


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: another pytest session resets /tmp/pytest-of-<user> to 0700, which locks out the
    # embedded PostgreSQL's unprivileged user half-way through a test.
    base = Path(tempfile.mkdtemp(prefix="roost-up-test-"))
    path = base / "data"
    yield path
    subprocess.run(["pkill", "-f", str(path)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_up_on_embedded_servers_then_status_ping_dlq_stop_and_restart(data_dir: Path) -> None:
    up = Up(data_dir, clean_env())
    first = up.wait_ready()
    assert "embedded NATS JetStream" in first and "embedded PostgreSQL" in first
    token = next(line.strip() for line in first.splitlines() if line.strip().startswith("roost_"))

    status = roost(data_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout and "core" in status.stdout
    ping = roost(data_dir, "ping")
    assert ping.returncode == 0 and "pong from core" in ping.stdout, ping.stderr
    assert roost(data_dir, "dlq", "list").stdout.strip() == "(none)"
    invalid = subprocess.run([sys.executable, "-c", INVALID_COMMAND, str(data_dir)], env=clean_env(),
                             capture_output=True, text=True, timeout=60)
    assert invalid.returncode == 0 and "rejected" in invalid.stdout, invalid.stdout + invalid.stderr
    deadline = time.monotonic() + 30
    while "roost.cmd.dlq.list" not in roost(data_dir, "dlq", "list").stdout:
        assert time.monotonic() < deadline, "the invalid command reaches the dead letters under the broker policy"
        time.sleep(0.2)
    core_url = json.loads((data_dir / "run" / "roost.json").read_text())["services"]["core"]["http"]
    scraped = httpx.get(f"{core_url}/metrics", timeout=5).text
    assert 'roost_broker_connected{broker="nats",service="core"} 1.0' in scraped
    assert "roost_outbox_pending_messages" in scraped
    anonymous = subprocess.run([sys.executable, "-c", ANONYMOUS_CONNECT, runtime_bus_url(data_dir)],
                               capture_output=True, text=True, timeout=60)
    assert anonymous.returncode == 3, "the embedded NATS refuses a client without a user: " + anonymous.stderr
    denied = roost(data_dir, "--token", "roost_not-a-real-token", "dlq", "purge", "--all")
    assert denied.returncode == 1 and "unauthenticated" in denied.stderr

    first_bus = runtime_bus_url(data_dir)
    assert up.interrupt() == 0, up.stderr.read_text()[-3000:]
    assert not (data_dir / "run" / "roost.json").exists()
    assert roost(data_dir, "status").returncode == 1

    again = Up(data_dir, clean_env())
    second = again.wait_ready()
    assert runtime_bus_url(data_dir) == first_bus, "the embedded NATS keeps its port: agents' bus URLs stay good"
    assert "roost_" not in second, "the first admin token is shown once, not on every start"
    ping = roost(data_dir, "--token", token, "ping")
    assert ping.returncode == 0, "the token of the first run still works: the data survived"
    assert again.interrupt() == 0, again.stderr.read_text()[-3000:]
    logs = up.stderr.read_text() + again.stderr.read_text()
    assert token not in logs, "the admin token never reaches the logs"
    broker_passwords = [p.read_text().strip() for p in (data_dir / "secrets").glob("broker-password-*")]
    assert len(broker_passwords) >= 7, "one broker user per service and one for the roost command"
    assert not [p for p in broker_passwords if p in logs], "broker passwords never reach the logs"
    assert "Traceback" not in logs


@pytest.mark.parametrize(("variable", "url", "expect"), [
    ("ROOST_BUS_URL", "amqp://guest:Pl4ntedBusPw@127.0.0.1:1/", "cannot use the bus"),
    ("ROOST_BUS_URL", "nats://127.0.0.1:1", "cannot use the bus"),
    ("ROOST_BUS_URL", "kafka://127.0.0.1:9092", "bus_url must start with"),
    ("ROOST_DATABASE_URL", "postgresql://postgres:Pl4ntedDbPw@127.0.0.1:1/roost", "127.0.0.1:1"),
])
def test_a_bad_url_is_one_clear_line_and_a_non_zero_exit(data_dir: Path, variable: str, url: str,
                                                          expect: str) -> None:
    env = clean_env(**{variable: url})
    if variable == "ROOST_DATABASE_URL":
        env["ROOST_BUS_URL"] = "amqp://guest:guest@127.0.0.1:5672/"
    result = roost(data_dir, "up", env=env, timeout=90)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("roost:")]
    assert len(errors) == 1, result.stderr
    assert expect in errors[0]
    assert "Traceback" not in result.stderr
    assert "Pl4nted" not in result.stderr + result.stdout
