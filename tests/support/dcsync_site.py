"""A distributed-cloud test site: the dcsync service on a fresh roost database and the in-memory bus, a
controller source database, and subclouds, each with its own database and its agent on its own bus.

The source and subcloud databases are created by ``make_db(prefix)`` (a keystone-shaped test schema, or
the real keystone schema from ``tests.support.openstack``); the site drops them at the end.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from schemas.envelope import CommandReply, Role
from services.core.auth import InMemoryAuthenticator
from services.core.bus.bus import Bus
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.secrets import SecretStore
from services.core.settings import load_settings
from services.dcsync.agent import EndpointDb, ServedSubcloud, SubcloudSync
from services.dcsync.service import MIGRATIONS, DcsyncService, sync_key_secret
from services.dcsync.settings import DcsyncSettings
from services.dcsync.source import Source
from services.dcsync.tables import EndpointSpec
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

MakeDb = Callable[[str], contextlib.AbstractAsyncContextManager[str]]

FAST = {"offline_after": 1.5, "audit_interval": 3600.0, "lag_grace": 0.0, "out_of_sync_alarm_after": 0.0,
        "request_timeout": 10.0, "mass_minimum": 3, "mass_fraction": 0.5}


@dataclass
class SubcloudUnderTest:
    name: str
    url: str
    pool: asyncpg.Pool
    bus: Bus
    served: ServedSubcloud
    fernet_repo: Path | None = None


@dataclass
class DcSite:
    broker: InMemoryBroker
    pool: asyncpg.Pool
    central_url: str
    central: asyncpg.Pool
    service: DcsyncService
    operator: Bus
    auth: InMemoryAuthenticator
    secrets: SecretStore
    spec: EndpointSpec
    make_db: MakeDb
    stack: contextlib.AsyncExitStack
    subclouds: dict[str, SubcloudUnderTest] = field(default_factory=dict)

    async def bus(self, source: str, token: str | None = None) -> Bus:
        bus = Bus(InMemoryTransport(self.broker), source=source, authenticator=self.auth, token=token)
        await bus.connect()
        self.stack.push_async_callback(bus.close)
        return bus

    async def command(self, type: str, data: dict[str, Any], timeout: float = 60.0) -> CommandReply:
        return await self.operator.request(self.operator.envelope(type, data), timeout=timeout)

    async def ok(self, type: str, data: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        reply = await self.command(type, data, timeout)
        assert reply.ok, reply.reason
        return reply.result

    async def start_subcloud(self, name: str, *, heartbeat_interval: float = 0.2, url: str | None = None,
                             fernet_repo: Path | None = None,
                             prepare: Callable[[asyncpg.Pool], Awaitable[None]] | None = None) -> SubcloudUnderTest:
        """The subcloud's database (made unless ``url`` is given) and its agent, serving."""
        if url is None:
            url = await self.stack.enter_async_context(self.make_db(f"roost_sc_{name.replace('-', '_')}"))
        pool = await self.stack.enter_async_context(pool_on(url))
        if prepare is not None:
            await prepare(pool)
        key = self.secrets.ensure(sync_key_secret(name), lambda: b"k" * 32).get_secret_value()
        sync = SubcloudSync(name, {str(self.spec.endpoint): EndpointDb(pool)}, fernet_repo=fernet_repo, sync_key=key)
        bus = await self.bus(f"roost/dcagent/{name}")
        served = ServedSubcloud(sync, bus, heartbeat_interval=heartbeat_interval)
        await served.start()
        self.stack.push_async_callback(served.stop)
        sc = SubcloudUnderTest(name, url, pool, bus, served, fernet_repo)
        self.subclouds[name] = sc
        return sc

    async def add(self, name: str, **options: Any) -> SubcloudUnderTest:
        sc = self.subclouds.get(name) or await self.start_subcloud(name)
        await self.ok("roost.cmd.subcloud.add", {"name": name, **options})
        return sc

    async def show(self, name: str) -> dict[str, Any]:
        return await self.ok("roost.cmd.subcloud.show", {"name": name})

    async def wait_status(self, name: str, status: str = "in-sync", endpoint: str = "identity",
                          timeout: float = 60.0) -> dict[str, Any]:
        shown: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal shown
            shown = await self.show(name)
            return bool(shown["sync"].get(endpoint) == status)

        await wait_until(reached, timeout=timeout, what=f"{name} {endpoint} {status}")
        return shown

    async def wait_cursor_at_head(self, name: str, endpoint: str = "identity", timeout: float = 60.0) -> None:
        async def at_head() -> bool:
            shown = await self.show(name)
            ep = next(e for e in shown["endpoints"] if e["endpoint"] == endpoint)
            return all(ep["cursors"].get(lane, 0) >= head for lane, head in ep["head"].items())
        await wait_until(at_head, timeout=timeout, what=f"{name} at the head")

    async def outbox(self, type: str | None = None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch("SELECT body FROM dcsync.outbox ORDER BY id")
        bodies = [json.loads(bytes(r["body"])) for r in rows]
        return [b for b in bodies if type is None or b["type"] == type]

    async def alarms(self, alarm_id: str) -> list[dict[str, Any]]:
        """The fault messages about ``alarm_id`` the service published, in order."""
        out = []
        for b in await self.outbox():
            if b["type"].startswith("roost.fault.") and b["data"].get("alarm_id") == alarm_id:
                out.append({"type": b["type"], **b["data"]})
        return out


@contextlib.asynccontextmanager
async def dc_site(spec: EndpointSpec, make_db: MakeDb, *, central_url: str | None = None,
                  prepare_central: Callable[[asyncpg.Pool], Awaitable[None]] | None = None,
                  **settings: Any) -> AsyncIterator[DcSite]:
    async with contextlib.AsyncExitStack() as stack:
        roost_url = await stack.enter_async_context(fresh_database("roost_dc"))
        pool = await stack.enter_async_context(pool_on(roost_url))
        await migrate(pool, "dcsync", MIGRATIONS)
        await pool.execute("SELECT core.ensure_outbox_inbox('dcsync')")
        if central_url is None:
            central_url = await stack.enter_async_context(make_db("roost_central"))
        central = await stack.enter_async_context(pool_on(central_url))
        if prepare_central is not None:
            await prepare_central(central)
        secrets = SecretStore(Path(tempfile.mkdtemp(prefix="roost-dcsync-test-")) / "secrets")
        broker = InMemoryBroker()
        auth = InMemoryAuthenticator()
        source = Source(spec, central_url)
        service = DcsyncService(DcsyncSettings(**{**FAST, **settings}), sources=[source], secrets=secrets)
        service_bus = Bus(InMemoryTransport(broker), source="roost/dcsync", authenticator=auth,
                          token=auth.issue("dcsync", Role.ADMIN, kind="service"))
        await service_bus.connect()
        stack.push_async_callback(service_bus.close)
        operator = Bus(InMemoryTransport(broker), source="roost/cli", authenticator=auth,
                       token=auth.issue("ops-admin", Role.ADMIN))
        await operator.connect()
        stack.push_async_callback(operator.close)
        site = DcSite(broker, pool, central_url, central, service, operator, auth, secrets, spec, make_db, stack)
        await service.start(ServiceContext("dcsync", load_settings(), pool, service_bus, Outbox("dcsync")))
        stack.push_async_callback(service.stop)
        yield site


# -- a keystone-shaped schema, small and quick (the real keystone schema: tests.support.openstack) ----------

MINI_SCHEMA = """
CREATE TABLE project (id varchar(64) PRIMARY KEY, name varchar(64) NOT NULL, domain_id varchar(64) NOT NULL,
                      enabled boolean, UNIQUE (domain_id, name));
CREATE TABLE "user" (id varchar(64) PRIMARY KEY, enabled boolean, extra text, last_active_at date);
CREATE TABLE local_user (id serial PRIMARY KEY, user_id varchar(64) NOT NULL REFERENCES "user"(id) ON DELETE CASCADE,
                         domain_id varchar(64) NOT NULL DEFAULT 'default', name varchar(255) NOT NULL,
                         failed_auth_count int, UNIQUE (domain_id, name));
CREATE TABLE password (id serial PRIMARY KEY, local_user_id int NOT NULL REFERENCES local_user(id) ON DELETE CASCADE,
                       password_hash varchar(255), created_at timestamp NOT NULL DEFAULT now());
CREATE TABLE revocation_event (id serial PRIMARY KEY, user_id varchar(64), issued_before timestamp NOT NULL);
CREATE TABLE unsynced (id int PRIMARY KEY, note text);
"""


def mini_spec() -> EndpointSpec:
    from services.dcsync.tables import Endpoint, TableSpec
    return EndpointSpec(Endpoint.IDENTITY, (
        TableSpec("project", ("id",), natural_key=("domain_id", "name")),
        TableSpec("user", ("id",), frozenset({"last_active_at"})),
        TableSpec("local_user", ("id",), frozenset({"failed_auth_count"}), natural_key=("domain_id", "name")),
        TableSpec("password", ("id",)),
        TableSpec("revocation_event", ("id",), lane="revocation"),
    ))


@contextlib.asynccontextmanager
async def mini_db(prefix: str) -> AsyncIterator[str]:
    async with fresh_database(prefix) as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(MINI_SCHEMA)
        finally:
            await conn.close()
        yield url
