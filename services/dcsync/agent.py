"""The subcloud side of dcsync: answers the system controller's sync commands against the subcloud's
keystone and glance databases, and says it is alive.

``SubcloudSync`` is the protocol, one method per command of ``schemas.dcsync`` (``hello``, ``configure``,
``apply``, ``digests``, ``rows``, ``keys``, ``fernet``), working on one database per endpoint through a
``Tracker``; it holds no bus, so a simulation can drive many of them from one process.
``serve_subcloud`` puts one on a bus: it serves ``roost.cmd.sync.<subcloud>.>`` in the group
``dcagent-<subcloud>`` (the only subjects the agent's broker user may read) and publishes
``roost.dcagent.<subcloud>.heartbeat`` every ``heartbeat_interval`` seconds.

``apply`` is one transaction per batch with the agent's inbox and cursor, in one statement
(``Tracker.receive``): a batch delivered twice (its idempotency key is in the inbox) changes nothing and
answers where the cursor stands; a change older than the row's version is skipped (``stale``); a change
that fails (a constraint) is reported and does not hold up the cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from pydantic import BaseModel

from schemas import dcsync as msg
from services.core.bus.abc import ConsumerOptions
from services.core.bus.bus import Bus, Message, Reject
from services.dcsync import fernet
from services.dcsync.tables import ResolvedTable
from services.dcsync.tracking import Tracker
from services.dcsync.tracking_sql import Place, ident

log = structlog.get_logger("roost.dcsync.agent")

HEARTBEAT_INTERVAL = 10.0
# The agent's pull request on the controller's NATS waits idle most of the time: a sign of life every 10 s
# (not the bus's 2 s) is 100 messages a second fewer for the controller's server per 1,000 subclouds, and
# a pull request lost without a word is pulled again after 21 s, within the service's request timeout.
PULL_IDLE_HEARTBEAT = 10.0
DEFAULT_PLACE = Place()


def command_subject(subcloud: str, verb: str) -> str:
    return f"roost.cmd.sync.{subcloud}.{verb}"


def agent_group(subcloud: str) -> str:
    return f"dcagent-{subcloud}"


def heartbeat_subject(subcloud: str) -> str:
    return f"roost.dcagent.{subcloud}.heartbeat"


async def keep_session(conn: asyncpg.Connection) -> None:
    """The agent's pools hand a connection back as it is (asyncpg's own reset, one more round trip per
    command, undoes session state the agent never makes: it sets only transaction-local settings and
    transaction-level locks, and listens to nothing).  An open transaction is still rolled back."""


@dataclass(frozen=True, slots=True)
class EndpointDb:
    """One endpoint's database at the subcloud, and where its tables are in it."""

    pool: asyncpg.Pool
    place: Place = DEFAULT_PLACE


class SubcloudSync:
    def __init__(self, name: str, databases: Mapping[str, EndpointDb], *, fernet_repo: Path | None = None,
                 sync_key: bytes | None = None) -> None:
        self.name = name
        self.databases = dict(databases)
        self.trackers = {e: Tracker(db.place) for e, db in self.databases.items()}
        self.fernet_repo = fernet_repo
        self.sync_key = sync_key
        self.fernet_fingerprint: str | None = fernet.fingerprint_of(fernet_repo) if fernet_repo else None
        # the cursors as the last apply left them (only this agent moves them): a heartbeat reads them here,
        # not in the database (at 1,000 subclouds, 100 queries a second at the subclouds for nothing new)
        self._cursors: dict[str, dict[str, int]] = {}
        self._cursors_read: set[str] = set()

    def _db(self, endpoint: str) -> tuple[EndpointDb, Tracker]:
        try:
            return self.databases[endpoint], self.trackers[endpoint]
        except KeyError:
            raise Reject(f"subcloud {self.name} has no {endpoint} database") from None

    async def prepare(self) -> None:
        """The bookkeeping schema in every database (the triggers come with ``configure``)."""
        from services.dcsync.tracking_sql import install_sql
        for endpoint, db in self.databases.items():
            async with db.pool.acquire() as conn, conn.transaction():
                await self.trackers[endpoint].lock_install(conn)
                await conn.execute(install_sql(db.place))

    async def hello(self, _: msg.SyncHello) -> msg.SyncHelloResult:
        endpoints = {}
        for endpoint, (db, tracker) in ((e, self._db(e)) for e in self.databases):
            tables = await tracker.reflect(db.pool)
            version = ""
            if "alembic_version" in tables:
                with contextlib.suppress(asyncpg.PostgresError):
                    version = str(await db.pool.fetchval(
                        f"SELECT string_agg(version_num, ',') FROM {ident(db.place.data)}.alembic_version") or "")
            endpoints[endpoint] = msg.EndpointSchema(tables=tables, cursors=await tracker.cursors(db.pool, endpoint),
                                                     schema_version=version[:128])
        return msg.SyncHelloResult(subcloud=self.name, endpoints=endpoints, fernet_fingerprint=self.fernet_fingerprint)

    async def configure(self, data: msg.SyncConfigure) -> msg.SyncConfigured:
        db, tracker = self._db(data.endpoint)
        tables = [ResolvedTable(t.name, tuple(t.pk), tuple(t.columns), t.lane) for t in data.tables]
        redigested: dict[str, int] = {}
        async with db.pool.acquire() as conn:
            report = await tracker.install(conn, tables, capture=False)
            redigested.update({r.table: r.differences for r in report.redigested if r.differences})
            if data.redigest:
                done = {r.table for r in report.redigested}
                for t in tables:
                    if t.name not in done:
                        r = await tracker.redigest(conn, t.name)
                        if r.differences:
                            redigested[t.name] = r.differences
        if report.retracked:
            log.info("sync tables configured", subcloud=self.name, endpoint=data.endpoint, tables=report.retracked)
        if redigested:
            log.warning("digests were wrong: writes the triggers missed", subcloud=self.name,
                        endpoint=data.endpoint, tables=redigested)
        return msg.SyncConfigured(retracked=report.retracked, redigested=redigested)

    async def apply(self, data: msg.SyncApply, key: str) -> msg.SyncApplied:
        db, tracker = self._db(data.endpoint)
        received = await tracker.receive(db.pool, key, data.endpoint, data.lane,
                                         [c.model_dump() for c in data.changes], upto=data.upto,
                                         repair=data.repair, set_cursor=data.set_cursor,
                                         adopt=data.adopt_version, keep_local=data.keep_local)
        if received.adopted:
            log.info("rows equal to the controller's adopted as its own", subcloud=self.name,
                     endpoint=data.endpoint, rows=received.adopted, version=data.adopt_version)
        result = received.result
        self._cursors.setdefault(data.endpoint, {})[data.lane] = received.cursor
        failed = [msg.FailedChange(seq=f.seq, tbl=f.table, pk=f.pk, error=f.error[:1024]) for f in result.failed]
        if failed:
            log.warning("sync changes failed", subcloud=self.name, endpoint=data.endpoint, failed=len(failed),
                        first=failed[0].error)
        return msg.SyncApplied(applied=result.applied, stale=result.stale, failed=failed, cursor=received.cursor,
                               duplicate=received.duplicate)

    async def digests(self, data: msg.SyncDigestQuery) -> msg.SyncDigests:
        db, tracker = self._db(data.endpoint)
        roots = await tracker.roots(db.pool, data.tables)
        buckets = {t: {b: msg.DigestRoot(digest=r.digest, rows=r.rows) for b, r in
                       (await tracker.buckets(db.pool, t)).items()} for t in data.buckets_of}
        return msg.SyncDigests(roots={t: msg.DigestRoot(digest=r.digest, rows=r.rows) for t, r in roots.items()},
                               buckets=buckets, cursors=await tracker.cursors(db.pool, data.endpoint))

    async def rows(self, data: msg.SyncRowsQuery) -> msg.SyncRows:
        db, tracker = self._db(data.endpoint)
        marks = await tracker.bucket_rows(db.pool, data.table, data.buckets)
        return msg.SyncRows(rows=[msg.RowMarkWire(pk=m.pk, hash=m.hash, version=m.version) for m in marks])

    async def keys(self, data: msg.SyncKeysQuery) -> msg.SyncKeys:
        db, tracker = self._db(data.endpoint)
        pk = await db.pool.fetchval(
            f"SELECT pk FROM {ident(db.place.bookkeeping)}.synced_table WHERE tbl = $1", data.table)
        if pk is None:
            raise Reject(f"table {data.table} is not synced to subcloud {self.name}")
        keys = await tracker.natural_keys(db.pool, data.table, data.columns, pk)
        return msg.SyncKeys(keys=[msg.NaturalKey(key=k, pk=p) for k, p in keys])

    async def fernet(self, data: msg.FernetKeys) -> msg.FernetApplied:
        if self.fernet_repo is None or self.sync_key is None:
            raise Reject(f"subcloud {self.name} keeps no Fernet key repository")
        try:
            keys = fernet.unseal(self.sync_key, self.name, data.sealed)
        except fernet.FernetError as exc:
            raise Reject(str(exc)) from None
        if fernet.fingerprint(keys) != data.fingerprint:
            raise Reject("the Fernet keys do not match their fingerprint")
        await asyncio.to_thread(fernet.write_repository, self.fernet_repo, keys)
        self.fernet_fingerprint = data.fingerprint
        log.info("fernet keys installed", subcloud=self.name, fingerprint=data.fingerprint, keys=len(keys))
        return msg.FernetApplied(fingerprint=data.fingerprint)

    async def cursors(self) -> dict[str, dict[str, int]]:
        """Per endpoint and lane, the last change applied (read once, then kept by ``apply``)."""
        for e, t in self.trackers.items():
            if e not in self._cursors_read:
                stored = await t.cursors(self.databases[e].pool, e)
                # an apply that ended meanwhile knows better than what was read
                self._cursors[e] = {**stored, **self._cursors.get(e, {})}
                self._cursors_read.add(e)
        return {e: dict(self._cursors[e]) for e in self.trackers}

    async def handle(self, message: Message) -> BaseModel:
        """One command (the bus has validated ``message.data`` against its model)."""
        data = message.data
        if isinstance(data, msg.SyncApply):
            return await self.apply(data, message.envelope.idempotencykey or message.envelope.id)
        handler = self._handlers().get(type(data))
        if handler is None:
            raise Reject(f"subcloud agent {self.name} does not handle {message.envelope.type}")
        return await handler(data)

    def _handlers(self) -> dict[type[BaseModel], Callable[[Any], Awaitable[BaseModel]]]:
        return {msg.SyncHello: self.hello, msg.SyncConfigure: self.configure, msg.SyncDigestQuery: self.digests,
                msg.SyncRowsQuery: self.rows, msg.SyncKeysQuery: self.keys, msg.FernetKeys: self.fernet}


class ServedSubcloud:
    """A ``SubcloudSync`` on a bus: its commands served, its heartbeat published."""

    def __init__(self, sync: SubcloudSync, bus: Bus, *, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 pull_idle_heartbeat: float = PULL_IDLE_HEARTBEAT) -> None:
        self.sync = sync
        self.bus = bus
        self.heartbeat_interval = heartbeat_interval
        # its commands are idempotent (apply has its inbox; the others read, or set what is already set): an
        # ack need not wait for the server's confirmation, a lost one is a redelivery answered again; and the
        # server need not write what is acked to a file at every ack (after a restart of the server, the
        # commands since the agent last saw its consumer come again)
        self.options = ConsumerOptions(idle_heartbeat=pull_idle_heartbeat, confirm_acks=False, state_in_memory=True)
        self._task: asyncio.Task[None] | None = None
        self.beating = True

    async def start(self) -> None:
        await self.sync.prepare()
        await self.bus.serve(f"roost.cmd.sync.{self.sync.name}.>", agent_group(self.sync.name), self._command,
                             options=self.options)
        self._task = asyncio.create_task(self._heartbeats(), name=f"dcagent-{self.sync.name}-heartbeat")

    async def _command(self, message: Message) -> BaseModel:
        return await self.sync.handle(message)

    async def beat(self) -> None:
        envelope = self.bus.envelope("roost.dcagent.heartbeat", msg.DcAgentHeartbeat(
            subcloud=self.sync.name, cursors=await self.sync.cursors(),
            fernet_fingerprint=self.sync.fernet_fingerprint))
        await self.bus.publish(envelope, subject=heartbeat_subject(self.sync.name))

    async def _heartbeats(self) -> None:
        while True:
            if self.beating:
                try:
                    await self.beat()
                except Exception as exc:
                    log.warning("subcloud heartbeat not published", subcloud=self.sync.name,
                                error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.heartbeat_interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
