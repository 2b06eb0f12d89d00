"""Readiness turns false within 10 s of losing the database or the broker, and true again after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from fastapi import APIRouter

from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.db.pool import create_pool
from services.core.http import HealthCheck, broker_check, database_check
from services.core.runner import ServiceRunner
from tests.support.postgres import fresh_database
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgres

PROMISE = 10.0   # seconds


class Probe:
    name = "probe"

    def __init__(self, checks: Sequence[HealthCheck]) -> None:
        self.checks = checks

    async def start(self) -> None:
        pass

    async def stop(self, deadline: float) -> None:
        pass

    def health_checks(self) -> Sequence[HealthCheck]:
        return self.checks

    def routers(self) -> Sequence[APIRouter]:
        return []


async def until(http: httpx.AsyncClient, code: int, within: float) -> float:
    """Poll /readyz until it answers ``code``; return how long it took (fails past ``within``)."""
    started = time.monotonic()
    while True:
        if (await http.get("/readyz")).status_code == code:
            return time.monotonic() - started
        assert time.monotonic() - started < within, f"/readyz did not answer {code} within {within}s"
        await asyncio.sleep(0.1)


@pytest.fixture
async def proxied_pool() -> AsyncIterator[tuple[asyncpg.Pool, TcpProxy]]:
    async with fresh_database() as url, TcpProxy(target_port=5432) as proxy:
        parts = urlsplit(url)
        via_proxy = urlunsplit((parts.scheme, f"postgres@127.0.0.1:{proxy.port}", parts.path, "", ""))
        pool = await create_pool(via_proxy, min_size=1, max_size=2, connect_timeout=2)
        try:
            yield pool, proxy
        finally:
            pool.terminate()


@pytest.mark.parametrize("failure", ["disconnect", "blackhole"])
async def test_losing_the_database(proxied_pool: tuple[asyncpg.Pool, TcpProxy], failure: str) -> None:
    pool, proxy = proxied_pool
    runner = ServiceRunner(Probe([database_check(pool)]))
    await runner.start()
    try:
        async with httpx.AsyncClient(base_url=runner.url, timeout=30) as http:
            await until(http, 200, PROMISE)
            await (proxy.disconnect() if failure == "disconnect" else proxy.blackhole())
            took = await until(http, 503, PROMISE)
            assert took < PROMISE
            body = (await http.get("/readyz")).json()
            assert body["checks"]["database"]["ok"] is False
            await proxy.restore()
            await until(http, 200, 30)
    finally:
        await runner.stop()


async def test_losing_the_broker() -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker)
    await transport.connect()
    runner = ServiceRunner(Probe([broker_check(transport)]))
    await runner.start()
    try:
        async with httpx.AsyncClient(base_url=runner.url) as http:
            await until(http, 200, PROMISE)
            broker.up = False
            assert await until(http, 503, PROMISE) < PROMISE
            assert (await http.get("/readyz")).json()["checks"]["broker"]["ok"] is False
            broker.up = True
            await until(http, 200, PROMISE)
    finally:
        await runner.stop()
        await transport.close()
