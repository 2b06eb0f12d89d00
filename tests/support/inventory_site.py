"""A small inventory site for tests: the inventory service on a fresh PostgreSQL database and the in-memory
bus, an operator sending commands, agents and other services played by the test."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel

from schemas.envelope import CommandReply, Envelope, Role
from services.core.auth import InMemoryAuthenticator
from services.core.bus.bus import Bus, Message
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.secrets import SecretStore
from services.core.settings import load_settings
from services.inventory.service import GROUP, MIGRATIONS, InventoryService
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until


@contextlib.asynccontextmanager
async def inventory_database() -> AsyncIterator[asyncpg.Pool]:
    """A fresh database with inventory's tables."""
    async with fresh_database() as url, pool_on(url) as pool:
        await migrate(pool, "inventory", MIGRATIONS)
        await pool.execute("SELECT core.ensure_outbox_inbox('inventory')")
        yield pool


class Site:
    """An in-memory broker, the inventory service on it, an operator, and whatever test servers a test adds."""

    def __init__(self, pool: asyncpg.Pool, **service: Any) -> None:
        self.pool = pool
        self.broker = InMemoryBroker()
        self.auth = InMemoryAuthenticator()
        self.admin = self.auth.issue("ops-admin", Role.ADMIN)
        self.reader = self.auth.issue("ops-reader", Role.READER)
        self.buses: list[Bus] = []
        self.secrets = SecretStore(Path(tempfile.mkdtemp(prefix="roost-inventory-test-")) / "secrets")
        options: dict[str, Any] = {"lock_timeout": 5.0, "go_enabled_timeout": 2.0, "agent_check_interval": 0.2,
                                   "secrets": self.secrets, **service}
        self.service = InventoryService(**options)
        self.operator: Bus | None = None

    async def bus(self, source: str, token: str | None = None) -> Bus:
        bus = Bus(InMemoryTransport(self.broker), source=source, authenticator=self.auth, token=token)
        await bus.connect()
        self.buses.append(bus)
        return bus

    async def start(self) -> None:
        bus = await self.bus("roost/inventory", self.auth.issue("inventory", Role.ADMIN, kind="service"))
        await self.service.start(ServiceContext("inventory", load_settings(), self.pool, bus, Outbox("inventory")))
        self.operator = await self.bus("roost/cli", self.admin)

    async def command(self, type: str, data: dict[str, Any], *, token: str | None = None,
                      unchecked: bool = False) -> CommandReply:
        """Send a command; ``unchecked``: as a client that does not validate what it sends."""
        assert self.operator is not None
        envelope = (Envelope(type=type, source="roost/cli", data=data) if unchecked
                    else self.operator.envelope(type, data))
        return await self.operator.request(envelope, timeout=20.0, token=token)

    async def ok(self, type: str, data: dict[str, Any]) -> dict[str, Any]:
        reply = await self.command(type, data)
        assert reply.ok, reply.reason
        return reply.result

    async def host(self, ref: str) -> dict[str, Any]:
        return await self.ok("roost.cmd.host.show", {"host": ref})

    async def agent_says(self, type: str, agent: str, data: dict[str, Any], *,
                         subject_agent: str | None = None) -> None:
        bus = await self.bus(f"roost/agent-{agent}")
        verb = type.rsplit(".", 1)[1]
        await bus.publish(bus.envelope(type, data), subject=f"roost.agent.{subject_agent or agent}.{verb}")
        await self.settle("roost.agent.>")

    async def settle(self, pattern: str) -> None:
        await wait_until(lambda: not self.broker.groups[(GROUP, pattern)].pending, what=f"{pattern} settled")

    async def publish(self, source: str, type: str, data: dict[str, Any], pattern: str) -> None:
        bus = await self.bus(source)
        await bus.publish(bus.envelope(type, data))
        await self.settle(pattern)

    async def outbox(self, type: str | None = None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT body FROM inventory.outbox ORDER BY id")
        bodies = [json.loads(bytes(r["body"])) for r in rows]
        return [b for b in bodies if type is None or b["type"] == type]

    async def serve(self, pattern: str, group: str, handler: Callable[[Message], Awaitable[BaseModel]]) -> None:
        bus = await self.bus(f"roost/{group}")
        await bus.serve(pattern, group, handler)


@contextlib.asynccontextmanager
async def running_site(pool: asyncpg.Pool, **service: Any) -> AsyncIterator[Site]:
    s = Site(pool, **service)
    await s.start()
    try:
        yield s
    finally:
        await s.service.stop()
        for bus in s.buses:
            await bus.close()


def hello(agent: str, *macs: str, interval: float = 30.0) -> dict[str, Any]:
    return {"agent": agent, "macs": list(macs), "boot_id": "b1", "uptime_seconds": 42, "interval_seconds": interval}


def inventory(agent: str, mac: str) -> dict[str, Any]:
    return {"agent": agent, "hardware": {
        "cpus": [{"cpu": 0, "socket": 0, "core": 0, "thread": 0, "model": "Xeon"},
                 {"cpu": 1, "socket": 0, "core": 0, "thread": 1, "model": "Xeon"}],
        "memory": {"total_mib": 16384, "available_mib": 8000},
        "disks": [{"device_node": "/dev/sda", "size_mib": 512000, "type": "SSD"}],
        "ports": [{"name": "eth0", "mac": mac, "speed_mbps": 10000, "link": "up", "mtu": 1500}]}}


async def provisioned(site: Site, hostname: str, personality: str, mac: str) -> dict[str, Any]:
    """Add a host, let its agent announce itself and report its hardware: locked, online, inventoried."""
    data: dict[str, Any] = {"personality": personality, "mgmt_mac": mac, "hostname": hostname}
    await site.ok("roost.cmd.host.add", data)
    await site.agent_says("roost.agent.hello", hostname, hello(hostname, mac))
    await site.agent_says("roost.agent.inventory", hostname, inventory(hostname, mac))
    host = await site.host(hostname)
    assert (host["administrative"], host["operational"], host["availability"], host["inventoried"]) == (
        "locked", "disabled", "online", True)
    return host


async def unlocked(site: Site, hostname: str) -> dict[str, Any]:
    reply = await site.ok("roost.cmd.host.unlock", {"host": hostname})
    assert reply["host"]["availability"] in ("intest", "available")
    await wait_until(lambda: is_available(site, hostname), what=f"{hostname} available")
    return await site.host(hostname)


async def is_available(site: Site, hostname: str) -> bool:
    return (await site.host(hostname))["availability"] == "available"


