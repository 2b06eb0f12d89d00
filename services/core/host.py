"""Hosting a roost service: everything around its domain logic, the same for every service.

A service's domain part is a ``Component``: a name (which is also its PostgreSQL schema), optional SQL
migrations, and ``start(ctx)`` / ``stop()``.  ``ServiceHost`` wraps it into the runner's ``Service``:

start: a pool on the database; core's migrations and the component's, into its own schema, with its
outbox and inbox; a bus on its own broker connection (authenticating commands against the API tokens,
running each idempotency key once, counting for Prometheus); the outbox relay and the retention job
(one instance at a time across replicas, through PostgreSQL); then the component.

stop (graceful, under the runner's deadline): stop consuming, let the component finish, flush the
outbox, close the bus and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import asyncpg
import structlog
from fastapi import APIRouter

from services.core import metrics
from services.core.auth import PgAuthenticator
from services.core.bus.bus import Bus
from services.core.bus.factory import broker_of, transport_from_url
from services.core.db.idempotency import PgIdempotencyStore
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.db.pool import create_pool
from services.core.db.relay import OutboxRelay
from services.core.db.retention import Retention, RetentionPolicy
from services.core.http import HealthCheck, broker_check, database_check
from services.core.settings import RoostSettings

log = structlog.get_logger("roost.host")


@dataclass(frozen=True)
class ServiceContext:
    """What a component gets to work with."""

    name: str
    settings: RoostSettings
    pool: asyncpg.Pool
    bus: Bus
    outbox: Outbox


class Component(Protocol):
    name: str
    migrations: Path | None

    async def start(self, ctx: ServiceContext) -> None: ...

    async def stop(self) -> None: ...

    def routers(self) -> Sequence[APIRouter]: ...


@dataclass(frozen=True)
class Connections:
    """Where this process's services connect (after embedded servers, if any, have started)."""

    bus_url: str
    database_url: str


class ServiceHost:
    def __init__(self, component: Component, settings: RoostSettings, connections: Connections,
                 token: str | None) -> None:
        self.component = component
        self.name = component.name
        self.settings = settings
        self.connections = connections
        self._token = token
        self._pool: asyncpg.Pool | None = None
        self._bus: Bus | None = None
        self._relay: OutboxRelay | None = None
        self._retention: Retention | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._unregister_lag: list[object] = []
        self._stopping: asyncio.Future[None] | None = None

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError(f"{self.name} has not started")
        return self._bus

    async def start(self) -> None:
        self._stopping = None
        # A service's own credentials and TLS files when configured; else the process-wide URLs.
        database_url = self.settings.database_connect_url(self.name) or self.connections.database_url
        pool = self._pool = await create_pool(database_url, min_size=1, max_size=8,
                                              ssl=self.settings.database_ssl_context(self.name))
        await migrate(pool, "core")
        schema = self.name
        if schema != "core":
            if self.component.migrations is not None:
                await migrate(pool, schema, self.component.migrations)
            await pool.execute("SELECT core.ensure_outbox_inbox($1)", schema)
        transport = transport_from_url(self.settings.broker_connect_url(self.name) or self.connections.bus_url,
                                       ssl_context=self.settings.broker_ssl_context(self.name))
        observer = metrics.BusMetrics()
        self._bus = Bus(transport, source=f"roost/{self.name}", authenticator=PgAuthenticator(pool),
                        idempotency=PgIdempotencyStore(pool), token=self._token, observer=observer)
        await self._bus.connect()
        broker = broker_of(self.connections.bus_url)
        metrics.watch_broker_connection(broker, self.name, lambda: transport.connected)
        relay = self._relay = OutboxRelay(pool, transport, schema, observer=observer)
        self._tasks.append(asyncio.create_task(relay.run(), name=f"{self.name}-relay"))
        self._unregister_lag.append(metrics.register_outbox_lag(schema, self._outbox_lag))
        policy = RetentionPolicy(outbox_sent=timedelta(days=self.settings.outbox_retention_days),
                                 inbox=timedelta(days=self.settings.inbox_retention_days))
        self._retention = Retention(pool, [schema], policy)
        self._tasks.append(asyncio.create_task(self._retention.run(), name=f"{self.name}-retention"))
        ctx = ServiceContext(self.name, self.settings, pool, self._bus, Outbox(schema))
        await self.component.start(ctx)
        log.info("service started", service=self.name, broker=broker)

    def _outbox_lag(self) -> metrics.OutboxLag | None:
        lag = self._relay.last_lag if self._relay is not None else None
        if lag is None:
            return None
        return metrics.OutboxLag(pending=lag.pending, oldest_created_at=lag.oldest_created_at)

    async def stop(self, deadline: float) -> None:
        """Stop the service and everything the host started for it, by ``deadline`` (``time.monotonic()``).  A
        second call waits for the first one's stop (it used to run every step again, its relay flushing into a
        closed pool until the deadline)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(deadline))
        await asyncio.shield(self._stopping)

    async def _stop(self, deadline: float) -> None:
        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        if self._bus is not None:
            await asyncio.wait_for(self._bus.stop_consuming(), left())
        await asyncio.wait_for(self.component.stop(), left())
        if self._relay is not None:
            await self._relay.stop(flush=True, timeout=left())
        if self._retention is not None:
            await self._retention.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for unregister in self._unregister_lag:
            if callable(unregister):
                unregister()
        if self._bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._bus.close(), left())
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), left())
            except TimeoutError:
                self._pool.terminate()

    def health_checks(self) -> Sequence[HealthCheck]:
        checks = []
        if self._bus is not None:
            checks.append(broker_check(self._bus.transport))
        if self._pool is not None:
            checks.append(database_check(self._pool))
        return checks

    def routers(self) -> Sequence[APIRouter]:
        return self.component.routers()
