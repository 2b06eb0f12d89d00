"""`roost subcloud …` end to end on a nats-server that enforces the broker policy of the data dir (as `roost up`
runs it, ``tests.support.nats.PolicyNats``), with a fake of the dcsync service logged in as the ``dcsync`` user
(``tests.support.dcsync_fake``; its audit asks the subcloud's agent for its ``hello``):

* `roost subcloud add` enrolls the subcloud's agent (the running server reloads its users), writes its
  credentials file (0600, with the sync key) and has the service add it; nothing secret is printed;
* `roost subcloud agent run` (a subprocess, on two fresh PostgreSQL databases) logs in as ``dcagent-<name>``,
  publishes heartbeats, answers ``roost.cmd.sync.<name>.hello`` sent by the service, and stops cleanly on
  SIGTERM;
* another subcloud's agent user cannot consume (nor subscribe to) those sync commands, nor publish the first
  one's heartbeats;
* list / show / sync-status / audit / manage / unmanage / delete through the fake; delete revokes the
  enrollment (a new login is refused, the password, sync key and credentials file are gone).

And once with the real dcsync service (``ServiceHost``, logged in as ``dcsync`` under the same policy, a small
keystone-shaped source database): a subcloud added with the CLI and its agent run with the CLI comes online
and in sync, its rows arrive, and an audit finds it clean: the policy lets the service do all it does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
from pydantic import BaseModel

from schemas import dcsync as msg
from schemas.envelope import Envelope, Role
from services.cli.client import OPERATOR_TOKEN_SECRET, Runtime
from services.cli.subcloud import read_subcloud_credentials, sync_key_secret
from services.core.auth import InMemoryAuthenticator, create_token
from services.core.brokerauth import OPERATOR_NAME, nats_inbox_prefix
from services.core.brokerauth_apply import broker_password_secret
from services.core.bus.abc import BusError, ConsumerOptions, NotConnected, PublishFailed, RequestTimeout
from services.core.bus.bus import Bus, Message
from services.core.bus.factory import transport_from_url
from services.core.bus.nats import NatsTransport
from services.core.host import Connections, ServiceHost
from services.core.settings import load_settings, url_with_credentials
from services.dcsync.agent import command_subject, heartbeat_subject
from services.dcsync.errors import Unavailable
from services.dcsync.service import DcsyncService
from services.dcsync.settings import DcsyncSettings
from services.dcsync.source import Source
from tests.support.dcsync_fake import FakeDcsync
from tests.support.dcsync_site import FAST, mini_db, mini_spec
from tests.support.nats import PolicyNats
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

ROOST = [sys.executable, "-m", "services.cli"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_LOG_FORMAT": "json"})
    return env


class AgentAuditing(FakeDcsync):
    """The fake, whose audit asks the subcloud's agent for its hello over the bus (as the dcsync user)."""

    def __init__(self) -> None:
        super().__init__()
        self.bus: Bus | None = None

    async def hello(self, name: str) -> msg.SyncHelloResult:
        assert self.bus is not None
        command = Envelope.command("roost.cmd.sync.hello", msg.SyncHello(), source="roost/dcsync", timeout=10)
        try:
            reply = await self.bus.request(command, subject=command_subject(name, "hello"), timeout=10)
        except RequestTimeout:
            raise Unavailable(f"subcloud {name}'s agent did not answer") from None
        if not reply.ok:
            raise Unavailable(f"subcloud {name}'s agent did not answer: {reply.status}: {reply.reason}")
        return msg.SyncHelloResult.model_validate(reply.result)

    async def audit(self, name: str) -> msg.AuditResult:
        self._get(name)
        hello = await self.hello(name)
        now = datetime.now(UTC)
        return msg.AuditResult(reports=[
            msg.AuditReport(subcloud=name, endpoint=e, clean=True, tables_compared=len(s.tables), started_at=now,
                            seconds=0.0, detail=f"agent {hello.subcloud}")  # type: ignore[arg-type]
            for e, s in sorted(hello.endpoints.items())])


@dataclass
class Site:
    data: Path
    nats: PolicyNats
    service: AgentAuditing
    bus: Bus
    heartbeats: list[Message] = field(default_factory=list)

    async def roost(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(subprocess.run, [*ROOST, "--data-dir", str(self.data), *args],
                                         env=clean_env(), capture_output=True, text=True, timeout=timeout)
        assert "Traceback" not in result.stderr, result.stderr
        for secret in self.secrets():
            assert secret not in result.stdout + result.stderr, "a secret was printed"
        return result

    def secrets(self) -> list[str]:
        out = []
        for path in (self.data / "secrets").glob("broker-password-dcagent-*"):
            out.append(path.read_text().strip())
        for path in (self.data / "secrets").glob("dcsync-sync-key-*"):
            key = path.read_bytes()
            out += [base64.b64encode(key).decode(), key.hex()]
        return out


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    async with PolicyNats(data) as policy_nats:
        Runtime(bus_url=policy_nats.url, bus_user=OPERATOR_NAME, pid=os.getpid(), started_at="now").save(data)
        auth = InMemoryAuthenticator()
        policy_nats.secrets.put(OPERATOR_TOKEN_SECRET, auth.issue("operator", "admin"))
        service = AgentAuditing()
        bus = Bus(transport_from_url(policy_nats.url_for("dcsync")), source="roost/dcsync", authenticator=auth,
                  token=auth.issue("service:dcsync", "admin", kind="service"))
        service.bus = bus
        here = Site(data, policy_nats, service, bus)

        async def heard(message: Message) -> None:
            here.heartbeats.append(message)

        await bus.connect()
        try:
            await bus.serve("roost.cmd.subcloud.>", "dcsync", service.command)
            await bus.subscribe("roost.dcagent.*.heartbeat", "dcsync", heard, options=ConsumerOptions())
            yield here
        finally:
            await bus.close()


class AgentProcess:
    """`roost subcloud agent run` writing to files (never an unread pipe)."""

    def __init__(self, data: Path, *args: str) -> None:
        self.out = data.parent / "agent-out.txt"
        self.err = data.parent / "agent-err.txt"
        self.process = subprocess.Popen([*ROOST, "--data-dir", str(data), "subcloud", "agent", "run", *args],
                                        env=clean_env(), stdout=self.out.open("w"), stderr=self.err.open("w"))

    def logs(self) -> str:
        return self.out.read_text() + self.err.read_text()

    async def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


async def test_add_run_the_agent_audit_and_delete(site: Site) -> None:
    added = await site.roost("subcloud", "add", "edge-1", "--description", "rack 4")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "subcloud edge-1 enrolled (broker user dcagent-edge-1)" in added.stderr
    assert "reloaded its users" in added.stderr
    path = site.data / "subclouds" / "edge-1.credentials.json"
    assert f"credentials written to {path}" in added.stderr
    assert rows(added.stdout)[1][:5] == ["edge-1", "managed", "unknown", "joining", "unknown"]
    assert path.stat().st_mode & 0o777 == 0o600
    creds = read_subcloud_credentials(path)
    assert creds.bus_url == site.nats.url
    assert json.loads(path.read_text())["bus_url"].startswith("nats://dcagent-edge-1:")
    assert creds.sync_key.get_secret_value() == site.nats.secrets.get(sync_key_secret("edge-1")).get_secret_value()
    assert len(creds.sync_key.get_secret_value()) == 32

    again = await site.roost("subcloud", "add", "edge-1")
    assert again.returncode == 1 and "already enrolled" in again.stderr and "exists" in again.stderr
    assert read_subcloud_credentials(path).password == creds.password, "adding again keeps the password"
    other = await site.roost("subcloud", "add", "edge-2", "--unmanaged", "--join-policy", "adopt")
    assert other.returncode == 0, other.stderr
    bad = await site.roost("subcloud", "add", "Edge_3")
    assert bad.returncode == 2 and "bad subcloud name" in bad.stderr
    enrolled = json.loads((await site.roost("subcloud", "enrolled", "--json")).stdout)
    assert [(e["name"], e["user"]) for e in enrolled] == [("edge-1", "dcagent-edge-1"), ("edge-2", "dcagent-edge-2")]

    async with fresh_database() as keystone, fresh_database() as glance:
        agent = AgentProcess(site.data, "edge-1", "--credentials", str(path), "--keystone-url", keystone,
                             "--glance-url", glance, "--heartbeat-interval", "0.2")
        try:
            await wait_until(lambda: any(m.subject == heartbeat_subject("edge-1") for m in site.heartbeats)
                             or agent.process.poll() is not None, 60, "edge-1's heartbeat")
            assert agent.process.poll() is None, agent.logs()[-3000:]
            beat = next(m for m in site.heartbeats if m.subject == heartbeat_subject("edge-1"))
            assert isinstance(beat.data, msg.DcAgentHeartbeat) and beat.data.subcloud == "edge-1"

            hello = await site.service.hello("edge-1")
            assert hello.subcloud == "edge-1" and set(hello.endpoints) == {"identity", "image"}
            audited = await site.roost("subcloud", "audit", "edge-1")
            assert audited.returncode == 0, audited.stderr
            assert [r[:3] for r in rows(audited.stdout)[1:]] == [["identity", "yes", "0"], ["image", "yes", "0"]]
            silent = await site.roost("subcloud", "audit", "edge-2")          # no agent runs for edge-2
            assert silent.returncode == 1 and "did not answer" in silent.stderr

            await refused_to_another_subcloud(site, "edge-2", "edge-1")

            assert await agent.stop() == 0, agent.logs()[-3000:]
        finally:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(10)
        logs = agent.logs()
        assert '"event": "subcloud agent stopped"' in logs
        assert not [s for s in site.secrets() if s in logs], "a secret reached the agent's log"
        assert "authorization violation" not in logs and "Traceback" not in logs

    listed = await site.roost("subcloud", "list")
    assert listed.returncode == 0, listed.stderr
    assert rows(listed.stdout)[0] == ["NAME", "MANAGEMENT", "AVAILABILITY", "JOIN_STATE", "IDENTITY_SYNC",
                                      "IMAGE_SYNC", "LAST_HEARD"]
    assert [r[:2] for r in rows(listed.stdout)[1:]] == [["edge-1", "managed"], ["edge-2", "unmanaged"]]
    as_json = json.loads((await site.roost("subcloud", "list", "--json")).stdout)
    assert as_json["status"] == "completed"
    assert [s["join_policy"] for s in as_json["result"]["subclouds"]] == ["refuse", "adopt"]
    shown = await site.roost("subcloud", "show", "edge-1")
    assert shown.returncode == 0 and "rack 4" in shown.stdout and "main=7" in shown.stdout, shown.stdout
    status = await site.roost("subcloud", "sync-status")
    assert [r[:4] for r in rows(status.stdout)[1:]] == [
        ["edge-1", "identity", "out-of-sync", "main=7"], ["edge-1", "image", "in-sync", "main=3"],
        ["edge-2", "identity", "out-of-sync", "main=7"], ["edge-2", "image", "in-sync", "main=3"]]
    one = json.loads((await site.roost("subcloud", "sync-status", "edge-2", "--json")).stdout)
    assert [d["name"] for d in one] == ["edge-2"]
    missing = await site.roost("subcloud", "show", "nowhere")
    assert missing.returncode == 1 and "no subcloud nowhere" in missing.stderr

    managed = await site.roost("subcloud", "delete", "edge-1")
    assert managed.returncode == 1 and "unmanage it first" in managed.stderr
    assert path.exists(), "a refused delete keeps the enrollment"
    unmanaged = await site.roost("subcloud", "unmanage", "edge-1")
    assert unmanaged.returncode == 0 and rows(unmanaged.stdout)[1][1] == "unmanaged", unmanaged.stderr
    deleted = await site.roost("subcloud", "delete", "edge-1")
    assert deleted.returncode == 0, deleted.stderr
    assert "subcloud edge-1 deleted" in deleted.stdout and "revoked" in deleted.stdout and "reloaded" in deleted.stdout
    assert not path.exists()
    assert not site.nats.secrets.exists(broker_password_secret("dcagent-edge-1"))
    assert not site.nats.secrets.exists(sync_key_secret("edge-1"))
    late = Bus(transport_from_url(url_with_credentials(site.nats.url, "dcagent-edge-1",
                                                       creds.password.get_secret_value())), source="test")
    with pytest.raises(NotConnected, match="authorization violation"):
        await late.connect()
    remaining = json.loads((await site.roost("subcloud", "enrolled", "--json")).stdout)
    assert [e["name"] for e in remaining] == ["edge-2"]


async def refused_to_another_subcloud(site: Site, me: str, victim: str) -> None:
    """``me``'s agent user may not take ``victim``'s sync commands, in any group, nor speak for it."""
    password = site.nats.secrets.get_text(broker_password_secret(f"dcagent-{me}")).get_secret_value()
    transport = transport_from_url(url_with_credentials(site.nats.url, f"dcagent-{me}", password))
    # A JetStream API call or a publish that the server refuses is never answered: it fails when its timeout runs
    # out (5 s and 10 s by default).  The loopback server answers what it allows within milliseconds.
    assert isinstance(transport, NatsTransport)
    transport.api_timeout = 1.5
    bus = Bus(transport, source="test", authenticator=InMemoryAuthenticator(), publish_timeout=1.5)

    async def steal(_: Message) -> BaseModel:
        raise AssertionError("a command reached another subcloud's agent")

    await bus.connect()
    try:
        for group in (f"dcagent-{victim}", f"dcagent-{me}"):
            with pytest.raises(BusError):
                await asyncio.wait_for(bus.serve(f"roost.cmd.sync.{victim}.>", group, steal), 20)
        with pytest.raises(PublishFailed):
            await bus.publish(bus.envelope("roost.dcagent.heartbeat", msg.DcAgentHeartbeat(subcloud=victim)),
                              subject=heartbeat_subject(victim))
        # its own commands it may serve (nobody else consumes them: edge-2 has no agent running)
        await bus.serve(f"roost.cmd.sync.{me}.>", f"dcagent-{me}", steal)
    finally:
        await bus.close()

    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    raw = await nats.connect(site.nats.url, user=f"dcagent-{me}", password=password, error_cb=on_error,
                             inbox_prefix=nats_inbox_prefix(f"dcagent-{me}"), allow_reconnect=False)
    try:
        await raw.subscribe(f"roost.cmd.sync.{victim}.hello")
        await raw.flush()
        await wait_until(lambda: any("permissions violation" in v and f"roost.cmd.sync.{victim}" in v
                                     for v in violations), 10, f"the server refusing {victim}'s subjects to {me}")
    finally:
        await raw.close()


async def test_the_real_service_under_the_policy_syncs_a_subcloud_the_cli_added(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    async with contextlib.AsyncExitStack() as stack:
        policy_nats = await stack.enter_async_context(PolicyNats(data))
        roost_url = await stack.enter_async_context(fresh_database("roost_dc"))
        central_url = await stack.enter_async_context(mini_db("roost_central"))
        subcloud_url = await stack.enter_async_context(mini_db("roost_sc"))
        async with pool_on(roost_url) as pool, pool.acquire() as conn:
            admin = await create_token(conn, "operator", Role.ADMIN)
            token = await create_token(conn, "service:dcsync", Role.ADMIN, kind="service")
        central = await stack.enter_async_context(pool_on(central_url, migrate_core=False))
        await central.execute("INSERT INTO project VALUES ('p1', 'admin', 'default', true), "
                              "('p2', 'services', 'default', true)")
        Runtime(bus_url=policy_nats.url, bus_user=OPERATOR_NAME, pid=os.getpid(), started_at="now").save(data)
        policy_nats.secrets.put(OPERATOR_TOKEN_SECRET, admin)
        service = DcsyncService(DcsyncSettings(**FAST), sources=[Source(mini_spec(), central_url)],
                                secrets=policy_nats.secrets)
        host = ServiceHost(service, load_settings(), Connections(policy_nats.url_for("dcsync"), roost_url), token)
        await host.start()
        stack.push_async_callback(host.stop, asyncio.get_running_loop().time() + 30)
        site = Site(data, policy_nats, AgentAuditing(), host.bus)

        added = await site.roost("subcloud", "add", "edge-1")
        assert added.returncode == 0, added.stdout + added.stderr
        path = data / "subclouds" / "edge-1.credentials.json"
        agent = AgentProcess(data, "edge-1", "--credentials", str(path), "--keystone-url", subcloud_url,
                             "--heartbeat-interval", "0.2")
        try:
            listed: dict[str, Any] = {}

            async def online_and_in_sync() -> bool:
                nonlocal listed
                assert agent.process.poll() is None, agent.logs()[-3000:]
                reply = json.loads((await site.roost("subcloud", "list", "--json")).stdout)
                listed = reply["result"]["subclouds"][0]
                return listed["availability"] == "online" and listed["sync"].get("identity") == "in-sync"

            try:
                await wait_until(online_and_in_sync, 90, "edge-1 online and in sync")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {listed}\n{agent.logs()[-3000:]}") from None
            assert listed["management"] == "managed" and listed["join_state"] == "joined"
            async with pool_on(subcloud_url, migrate_core=False) as sc:
                assert sorted(r["id"] for r in await sc.fetch("SELECT id FROM project")) == ["p1", "p2"]
            status = await site.roost("subcloud", "sync-status", "edge-1")
            assert rows(status.stdout)[1][:3] == ["edge-1", "identity", "in-sync"], status.stdout
            audited = await site.roost("subcloud", "audit", "edge-1")
            assert audited.returncode == 0 and rows(audited.stdout)[1][:2] == ["identity", "yes"], audited.stdout
            assert await agent.stop() == 0, agent.logs()[-3000:]
        finally:
            if agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait(10)
        assert "permissions violation" not in agent.logs() and "Traceback" not in agent.logs()
        assert (await site.roost("subcloud", "unmanage", "edge-1")).returncode == 0
        deleted = await site.roost("subcloud", "delete", "edge-1")
        assert deleted.returncode == 0 and "revoked" in deleted.stdout, deleted.stdout + deleted.stderr
        assert json.loads((await site.roost("subcloud", "list", "--json")).stdout)["result"]["subclouds"] == []
