"""API tokens managed over the bus (roost token create|list|revoke) on the real PostgreSQL: a created
reader token works and can only read, repeats are refused, listing never shows a token, revocation takes
effect, and the created token is stored nowhere in clear (not even for idempotency)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from schemas.envelope import CommandReply, Envelope, ReplyStatus, Role
from services.core.auth import PgAuthenticator, create_token
from services.core.bus.bus import Bus
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.idempotency import PgIdempotencyStore
from services.core.db.outbox import Outbox
from services.core.host import ServiceContext
from services.core.settings import load_settings
from services.core.system import CoreService
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:
        yield pool


@pytest.fixture
async def system(pool: asyncpg.Pool) -> AsyncIterator[tuple[InMemoryBroker, str]]:
    broker = InMemoryBroker()
    bus = Bus(InMemoryTransport(broker), source="roost/core", authenticator=PgAuthenticator(pool, ttl=0.0),
              idempotency=PgIdempotencyStore(pool))
    await bus.connect()
    await CoreService().start(ServiceContext("core", load_settings(), pool, bus, Outbox("core")))
    async with pool.acquire() as conn:
        admin = await create_token(conn, "operator", Role.ADMIN)
    yield broker, admin
    await bus.close()


async def send(broker: InMemoryBroker, token: str, type: str, data: dict[str, Any]) -> CommandReply:
    client = Bus(InMemoryTransport(broker), source="roost/cli", token=token)
    await client.connect()
    try:
        return await client.request(Envelope.command(type, data, source="roost/cli"), timeout=10)
    finally:
        await client.close()


async def test_tokens_are_created_used_listed_and_revoked(pool: asyncpg.Pool,
                                                          system: tuple[InMemoryBroker, str]) -> None:
    broker, admin = system
    created = await send(broker, admin, "roost.cmd.token.create", {"name": "grafana", "role": "reader"})
    assert created.status is ReplyStatus.COMPLETED, created
    reader = created.result["token"]
    assert reader.startswith("roost_")

    assert (await send(broker, reader, "roost.cmd.system.ping", {})).ok
    refused = await send(broker, reader, "roost.cmd.token.create", {"name": "mallory", "role": "admin"})
    assert refused.status is ReplyStatus.REJECTED and "needs admin" in (refused.reason or "")
    again = await send(broker, admin, "roost.cmd.token.create", {"name": "grafana"})
    assert again.status is ReplyStatus.REJECTED and "already has an active token" in (again.reason or "")

    listed = await send(broker, admin, "roost.cmd.token.list", {})
    names = {item["name"]: item["role"] for item in listed.result["items"]}
    assert names == {"operator": "admin", "grafana": "reader"}
    assert reader not in listed.model_dump_json() and admin not in listed.model_dump_json()

    stored = await pool.fetch("SELECT * FROM core.idempotency")
    assert stored, "the other commands' replies were kept for idempotency"
    assert reader not in "".join(str(dict(r)) for r in stored), "a created token is never stored in clear"

    assert (await send(broker, admin, "roost.cmd.token.revoke", {"name": "grafana"})).result == {"revoked": True}
    after = await send(broker, reader, "roost.cmd.system.ping", {})
    assert after.status is ReplyStatus.REJECTED and "unauthenticated" in (after.reason or "")
