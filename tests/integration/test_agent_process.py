"""The host agent against a real nats-server that enforces the broker policy, enrolled with the real
`roost agent enroll` command.

* the NATS of `roost up` (the same config, ``local_policy``, server name and store directory as
  ``services/cli/up.py``, with a ``run/roost.json`` naming this process): enrolling reloads the running
  server, the agent logs in with the credentials file, the inventory service's user receives its hello and
  hardware on ``roost.agent.<name>.*``; the broker refuses the agent's publishes on another agent's subject
  and on ``roost.host.>``; revoking closes its connection and shuts it out;
* the real `roost up` (embedded NATS and PostgreSQL): an agent enrolled before the start and one enrolled
  while it runs both log in with `roost agent run`, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
from pydantic import SecretStr

from schemas.inventory import AgentHello, AgentInventory
from services.cli.agent import local_policy, read_credentials
from services.cli.client import Runtime
from services.core.brokerauth import OPERATOR_NAME, nats_inbox_prefix
from services.core.brokerauth_apply import apply_nats, broker_password_secret, ensure_broker_passwords
from services.core.bus.abc import ConsumerOptions, NotConnected, PublishFailed
from services.core.bus.bus import Bus, Message
from services.core.bus.factory import transport_from_url
from services.core.embedded.nats_server import NatsServer
from services.core.secrets import SecretStore
from services.core.settings import url_with_credentials
from services.inventory.agent.agent import HostAgent
from tests.support.waiting import wait_until

ROOST = [sys.executable, "-m", "services.cli"]
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_HTTP_BASE_PORT": "0", "ROOST_LOG_FORMAT": "json", **extra})
    return env


async def roost(data_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The `roost` command in a subprocess, off the event loop (the broker and the agent keep running)."""
    return await asyncio.to_thread(subprocess.run, [*ROOST, "--data-dir", str(data_dir), *args], env=clean_env(),
                                   capture_output=True, text=True, timeout=timeout)


# == the NATS of `roost up` ====================================================================


@dataclass
class Site:
    data: Path
    server: NatsServer
    secrets: SecretStore
    received: list[Message] = field(default_factory=list)

    def url_for(self, user: str) -> str:
        password = self.secrets.get_text(broker_password_secret(user)).get_secret_value()
        return url_with_credentials(self.server.url, user, password)

    def from_agent(self, name: str, kind: str) -> list[Message]:
        return [m for m in self.received if m.subject == f"roost.agent.{name}.{kind}"]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """What `roost up` does for its bus (services/cli/up.py ``_bus``), and the inventory service's view of it."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    secrets = SecretStore.in_data_dir(data)
    policy = local_policy(data)
    config = apply_nats(policy, ensure_broker_passwords(secrets, policy), data / "nats" / "auth.conf",
                        server_name="roost")
    server = NatsServer(data / "nats", server_name="roost", config_file=config, ready_timeout=20.0)
    await server.start()
    Runtime(bus_url=server.url, bus_user=OPERATOR_NAME, pid=os.getpid(), started_at="now").save(data)
    here = Site(data, server, secrets)

    async def record(message: Message) -> None:
        here.received.append(message)

    inventory = Bus(transport_from_url(here.url_for("inventory")), source="roost/inventory")
    try:
        await inventory.connect()
        # the inventory service's own subscription (group inventory): it creates ROOST_AGENT
        await inventory.subscribe("roost.agent.>", "inventory", record, options=ConsumerOptions())
        yield here
    finally:
        await inventory.close()
        await server.stop()


async def test_an_enrolled_agent_reports_on_its_own_subjects_and_nowhere_else(site: Site) -> None:
    enrolled = await roost(site.data, "agent", "enroll", "worker-1")
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert "reloaded its users" in enrolled.stdout
    path = site.data / "agents" / "worker-1.credentials.json"
    assert f"credentials written to {path}" in enrolled.stdout
    assert path.stat().st_mode & 0o777 == 0o600
    creds = read_credentials(path)
    password = creds.password.get_secret_value()
    assert password not in enrolled.stdout + enrolled.stderr
    assert creds.bus_url == site.server.url
    assert json.loads(path.read_text())["bus_url"].startswith("nats://agent-worker-1:")

    again, listed, bad = await asyncio.gather(roost(site.data, "agent", "enroll", "worker-1"),
                                              roost(site.data, "agent", "list", "--json"),
                                              roost(site.data, "agent", "enroll", "Worker_1"))
    assert again.returncode == 0 and "already enrolled" in again.stdout, again.stderr
    assert read_credentials(path).password.get_secret_value() == password, "enrolling again keeps the password"
    assert [a["user"] for a in json.loads(listed.stdout)] == ["agent-worker-1"]
    assert bad.returncode == 2 and "bad agent host name" in bad.stderr

    agent = HostAgent("worker-1", creds.bus_url or "", password=creds.password, interval=3600, publish_timeout=0.5)
    runner = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: site.from_agent("worker-1", "hello") and site.from_agent("worker-1", "inventory"),
                         20, "worker-1's hello and inventory")
        [hello] = site.from_agent("worker-1", "hello")
        [inventory] = site.from_agent("worker-1", "inventory")
        assert isinstance(hello.data, AgentHello) and isinstance(inventory.data, AgentInventory)
        assert hello.data.agent == "worker-1" and hello.data.interval_seconds == 3600
        assert hello.data.boot_id == BOOT_ID
        assert set(hello.data.macs) == {p.mac for p in inventory.data.hardware.ports if p.mac}
        assert inventory.data.agent == "worker-1" and inventory.data.hardware.memory is not None
        assert len(inventory.data.hardware.cpus) >= 1

        # The broker refuses what the agent may not publish: nothing is stored, so no PubAck, and the
        # server says why on the connection (seen with a raw client logging in with the same credentials).
        violations: list[str] = []

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc).lower())

        raw = await nats.connect(site.server.url, user="agent-worker-1", password=password, error_cb=on_error,
                                 inbox_prefix=nats_inbox_prefix("agent-worker-1"), allow_reconnect=False)
        try:
            for subject in ("roost.agent.other.hello", "roost.host.state_changed"):
                forged = agent.bus.envelope("roost.agent.hello", AgentHello(agent="other"))
                with pytest.raises(PublishFailed):
                    await agent.bus.publish(forged, subject=subject)
                await raw.publish(subject, b"{}")
                await raw.flush()
                await wait_until(lambda s=subject: any("permissions violation" in v and s in v for v in violations),
                                 5, f"the server refusing {subject} to agent-worker-1")
        finally:
            await raw.close()
        # One more report that is allowed, and everything received came from worker-1's own subjects.
        assert (await agent.tick()).hello
        await wait_until(lambda: len(site.from_agent("worker-1", "hello")) == 2, 10, "the second hello")
        assert {m.subject for m in site.received} == {"roost.agent.worker-1.hello", "roost.agent.worker-1.inventory"}

        # Not enrolled: no login.  Revoked: no login any more.
        stranger = Bus(transport_from_url(url_with_credentials(site.server.url, "agent-worker-2", password)),
                       source="test")
        with pytest.raises(NotConnected, match="authorization violation"):
            await stranger.connect()
        revoked = await roost(site.data, "agent", "revoke", "worker-1")
        assert revoked.returncode == 0 and "reloaded" in revoked.stdout, revoked.stdout + revoked.stderr
        assert not path.exists()
        await wait_until(lambda: not agent.bus.transport.connected, 10, "the server closing the revoked connection")
        late = HostAgent("worker-1", site.server.url, password=SecretStr(password))
        with pytest.raises(NotConnected, match="authorization violation"):
            await late.bus.connect()
        assert (await roost(site.data, "agent", "list")).stdout.strip() == "(none)"
    finally:
        agent.stop()
        await asyncio.wait_for(runner, 15)


# == the real `roost up` ======================================================================


@pytest.fixture
def up_data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: the embedded PostgreSQL's unprivileged user must reach it (test_roost_up.py).
    base = Path(tempfile.mkdtemp(prefix="roost-agent-test-"))
    yield base / "data"
    shutil.rmtree(base, ignore_errors=True)


class Process:
    """A `roost` subprocess writing to files (never an unread pipe)."""

    def __init__(self, data_dir: Path, label: str, *args: str) -> None:
        self.stdout = data_dir.parent / f"{label}-stdout.txt"
        self.stderr = data_dir.parent / f"{label}-stderr.txt"
        self.process = subprocess.Popen([*ROOST, "--data-dir", str(data_dir), *args], env=clean_env(),
                                        stdout=self.stdout.open("w"), stderr=self.stderr.open("w"))
        self.signalled = False

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stdout.read_text() + self.stderr.read_text():
            if self.process.poll() is not None:
                raise AssertionError(f"exited {self.process.returncode} before {text!r}:\n"
                                     f"{self.stderr.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.stderr.read_text()[-3000:]}")
            time.sleep(0.05)

    def send(self, signum: signal.Signals) -> None:
        if self.process.poll() is None and not self.signalled:
            self.signalled = True
            self.process.send_signal(signum)

    def stop(self, signum: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        self.send(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def logs(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()


@pytest.mark.slow
def test_roost_up_lets_enrolled_agents_in_before_and_after_it_starts(up_data_dir: Path) -> None:
    data = up_data_dir
    before = subprocess.run([*ROOST, "--data-dir", str(data), "agent", "enroll", "worker-1"], env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert before.returncode == 0 and "at its next start" in before.stdout, before.stdout + before.stderr
    up = Process(data, "up", "up")
    agents: list[Process] = []
    try:
        up.wait_for("Ctrl-C stops everything", 120)
        during = subprocess.run([*ROOST, "--data-dir", str(data), "agent", "enroll", "worker-2"], env=clean_env(),
                                capture_output=True, text=True, timeout=60)
        assert during.returncode == 0 and "reloaded its users" in during.stdout, during.stdout + during.stderr
        agents += [Process(data, name, "agent", "run", "--name", name, "--interval", "1")
                   for name in ("worker-1", "worker-2")]
        for agent in agents:
            agent.wait_for('"event": "agent connected"', 30)
        deadline = time.monotonic() + 60
        hosts: list[dict[str, object]] = []
        while {h["agent"] for h in hosts} != {"worker-1", "worker-2"}:      # inventory recorded both
            assert time.monotonic() < deadline, f"agents not in roost host list: {hosts}"
            listed = subprocess.run([*ROOST, "--data-dir", str(data), "host", "list", "--json"], env=clean_env(),
                                    capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0, listed.stderr
            hosts = json.loads(listed.stdout)["result"]["items"]
        assert {(h["provision"], h["availability"], h["inventoried"]) for h in hosts} <= {
            ("unprovisioned", "online", True), ("unprovisioned", "online", False)}
        # the operator gives the discovered host its identity; inventory raises "host locked" through the
        # alarms service, both under the broker policy
        # (both agents run on this machine and report the same MACs: the first to announce itself has one)
        discovered = next(h for h in hosts if h["mgmt_mac"])
        name = str(discovered["agent"])
        added = subprocess.run([*ROOST, "--data-dir", str(data), "host", "add", "--personality", "worker",
                                "--hostname", name, "--mgmt-mac", str(discovered["mgmt_mac"]), "--json"],
                               env=clean_env(), capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stdout + added.stderr
        assert json.loads(added.stdout)["result"]["uuid"] == discovered["uuid"]
        alarms: list[dict[str, object]] = []
        while not any(a["alarm_id"] == "950.001" and a["entity_instance_id"] == f"host={name}" for a in alarms):
            assert time.monotonic() < deadline + 60, f"no host-locked alarm for {name}: {alarms}"
            listed = subprocess.run([*ROOST, "--data-dir", str(data), "alarm", "list", "--json"], env=clean_env(),
                                    capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0, listed.stderr
            alarms = json.loads(listed.stdout)["result"]["items"]
        for agent in agents:
            agent.send(signal.SIGTERM)
        for agent in agents:
            assert agent.stop() == 0, agent.logs()[-3000:]
            assert '"event": "agent stopped"' in agent.logs()
    finally:
        for agent in agents:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(10)
        code = up.stop(signal.SIGINT)
    assert code == 0, up.logs()[-3000:]
    logs = up.logs() + "".join(a.logs() for a in agents)
    passwords = [p.read_text().strip() for p in (data / "secrets").glob("broker-password-agent-*")]
    assert len(passwords) == 2 and not [p for p in passwords if p in logs], "agent passwords never reach a log"
    assert "authorization violation" not in logs and "Traceback" not in logs
