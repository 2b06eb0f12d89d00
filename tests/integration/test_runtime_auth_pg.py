"""API tokens on the real PostgreSQL: hashed at rest, verified, revoked, cached; commands on the bus
authorised by the principal a token belongs to."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from pydantic import BaseModel, ConfigDict

from schemas.envelope import Envelope, Principal, ReplyStatus, Role, utcnow
from schemas.registry import Registry
from services.core import auth
from services.core.bus.bus import Bus, Message
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url) as pool:   # core's migrations, 0002_auth included
        yield pool


async def test_create_verify_and_the_table_holds_only_the_hash(pool: asyncpg.Pool) -> None:
    token = await auth.create_token(pool, "alice", Role.ADMIN)
    assert token.startswith("roost_") and len(token) == 49 and auth.looks_like_token(token)
    assert await auth.verify(pool, token) == Principal(name="alice", role=Role.ADMIN, kind="user")
    rows = await pool.fetch("SELECT * FROM core.api_tokens")
    assert len(rows) == 1 and rows[0]["token_hash"] == hashlib.sha256(token.encode()).digest()
    dump = repr([dict(r) for r in rows])
    assert token not in dump and token.removeprefix("roost_") not in dump
    assert await auth.verify(pool, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await auth.verify(pool, "roost_short") is None
    assert await auth.verify(pool, "") is None


async def test_tokens_are_random_and_long() -> None:
    tokens = {auth.generate_token() for _ in range(1000)}
    assert len(tokens) == 1000
    # 43 base64url characters carry 258 bits; the first 32 bytes come from secrets.token_urlsafe(32)
    assert all(len(t) - len(auth.TOKEN_PREFIX) == 43 for t in tokens)


async def test_revoke_expiry_and_names(pool: asyncpg.Pool) -> None:
    token = await auth.create_token(pool, "bob", "reader")
    with pytest.raises(auth.TokenExists):
        await auth.create_token(pool, "bob", "admin")
    assert await auth.revoke(pool, "bob") is True
    assert await auth.revoke(pool, "bob") is False
    assert await auth.verify(pool, token) is None
    again = await auth.create_token(pool, "bob", "admin")             # the name is free again
    assert (await auth.verify(pool, again)) == Principal(name="bob", role=Role.ADMIN)
    expired = await auth.create_token(pool, "old", "reader", expires_at=utcnow() - timedelta(seconds=1))
    assert await auth.verify(pool, expired) is None
    infos = await auth.list_tokens(pool, include_revoked=True)
    assert [(i.name, i.active) for i in infos] == [("bob", False), ("bob", True), ("old", True)]
    assert "token" not in repr(infos).replace("TokenInfo", "")


async def test_last_used_is_recorded_at_most_once_per_interval(pool: asyncpg.Pool) -> None:
    token = await auth.create_token(pool, "svc", "admin", kind="service")
    assert await pool.fetchval("SELECT last_used_at FROM core.api_tokens") is None
    assert (await auth.verify(pool, token)) == Principal(name="svc", role=Role.ADMIN, kind="service")
    first = await pool.fetchval("SELECT last_used_at FROM core.api_tokens")
    assert first is not None
    await auth.verify(pool, token)
    assert await pool.fetchval("SELECT last_used_at FROM core.api_tokens") == first
    await auth.verify(pool, token, touch_interval=0)
    assert await pool.fetchval("SELECT last_used_at FROM core.api_tokens") > first


async def test_pg_authenticator_caches_and_revoking_through_it_is_immediate(pool: asyncpg.Pool) -> None:
    authenticator = auth.PgAuthenticator(pool, ttl=3600)
    token = await auth.create_token(pool, "carol", "reader")
    assert await authenticator.authenticate(token) == Principal(name="carol", role=Role.READER)
    await auth.revoke(pool, "carol")                      # revoked elsewhere: cached until the ttl
    assert await authenticator.authenticate(token) is not None
    authenticator.invalidate()
    assert await authenticator.authenticate(token) is None
    other = await auth.create_token(pool, "dave", "admin")
    assert await authenticator.authenticate(other) is not None
    assert await authenticator.revoke("dave") is True     # revoked through it: at once
    assert await authenticator.authenticate(other) is None
    assert await authenticator.authenticate("not a token") is None


async def test_pg_authenticator_says_unavailable_when_the_database_is_gone() -> None:
    async with fresh_database() as url, pool_on(url) as pool:
        authenticator = auth.PgAuthenticator(pool, ttl=0)
        token = await auth.create_token(pool, "erin", "admin")
        assert await authenticator.authenticate(token) is not None
        await pool.close()
        with pytest.raises(auth.AuthUnavailable):
            await authenticator.authenticate(token)


async def test_bootstrap_admin_is_created_once_even_by_concurrent_replicas(pool: asyncpg.Pool) -> None:
    async def bootstrap() -> str | None:
        async with pool.acquire() as conn:
            return await auth.ensure_bootstrap_admin(conn)

    results = await asyncio.gather(*(bootstrap() for _ in range(5)))
    tokens = [r for r in results if r is not None]
    assert len(tokens) == 1
    assert await auth.verify(pool, tokens[0]) == Principal(name="admin", role=Role.ADMIN)
    assert await bootstrap() is None


class LockHost(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str


COMMANDS = Registry()
COMMANDS.command("roost.cmd.authtest.lock", "core", LockHost, "admin only", min_role=Role.ADMIN)


async def test_a_reader_cannot_lock_a_host_on_the_bus(pool: asyncpg.Pool) -> None:
    admin_token = await auth.create_token(pool, "operator", "admin")
    reader_token = await auth.create_token(pool, "viewer", "reader")
    broker = InMemoryBroker()
    server = Bus(InMemoryTransport(broker), source="roost/authtest", registry=COMMANDS,
                 authenticator=auth.PgAuthenticator(pool))
    locked: list[tuple[str, str]] = []

    async def lock(message: Message) -> dict[str, str]:
        assert message.principal is not None
        locked.append((message.principal.name, message.data.model_dump()["host"]))
        return {"locked": "yes"}

    await server.connect()
    client = Bus(InMemoryTransport(broker), source="roost/cli", registry=COMMANDS)
    await client.connect()
    try:
        await server.serve("roost.cmd.authtest.>", "authtest", lock)
        as_reader = await client.request(
            Envelope.command("roost.cmd.authtest.lock", LockHost(host="compute-0"), source="roost/cli"),
            token=reader_token, timeout=10)
        assert as_reader.status is ReplyStatus.REJECTED and "needs admin" in (as_reader.reason or "")
        revoked = await client.request(
            Envelope.command("roost.cmd.authtest.lock", LockHost(host="compute-0"), source="roost/cli"),
            token="roost_" + "x" * 43, timeout=10)
        assert revoked.status is ReplyStatus.REJECTED and "unauthenticated" in (revoked.reason or "")
        as_admin = await client.request(
            Envelope.command("roost.cmd.authtest.lock", LockHost(host="compute-0"), source="roost/cli"),
            token=admin_token, timeout=10)
        assert as_admin.status is ReplyStatus.COMPLETED, as_admin.reason
        assert locked == [("operator", "compute-0")]
    finally:
        await client.close()
        await server.close()
