"""The dcsync service at the system controller: subclouds, their availability and sync, audits, alarms.

Sources (``source``): keystone's and glance's databases at the controller, with dcsync's capture triggers
(checked at start and at every maintenance round; missing ones raise 950.104 and are re-created, and what
they missed is logged as changes).

Subclouds (``store``, ``roost.cmd.subcloud.*``, REST in ``api``): one worker task per subcloud, woken by a
new change, a heartbeat after silence, an operator's command or its audit timer.  While the subcloud is
managed and online the worker:

1. connects (``hello``, the columns both sides have, ``configure``);
2. joins (the first time) or resyncs (it fell behind the change log's retention): natural-key conflicts
   by the join policy, then an audit that repairs everything and sets the cursors to its snapshot;
3. streams each lane from its cursor to the head (revocation events in their own lane, not queued
   behind a backlog of other changes);
4. audits every ``audit_interval`` (and on demand, and when managed again): the digests of an in-sync
   subcloud are compared without reading a synced table;
5. hands keystone's Fernet keys over when the subcloud's differ from the controller's.

Availability comes from the agents' heartbeats on the bus (``availability``): offline raises 950.101, many
going silent at once raises 950.103 instead.  Sync status per endpoint: ``unknown`` while unmanaged or not
online; ``out-of-sync`` while joining, after failed changes, or when a change has waited for it, and it has
been behind the head, for longer than ``lag_grace``; ``in-sync`` otherwise.  Out of sync for
``out_of_sync_alarm_after`` raises 950.102; an audit that had to repair rows raises 950.105 (how many, which
tables) until an audit is clean.

State changes are announced with ``roost.subcloud.state_changed`` and alarms raised, both through the
outbox in the transaction that stores the change; the service re-asserts its alarms at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from fastapi import APIRouter
from pydantic import BaseModel

from schemas import dcsync as msg
from schemas.envelope import Principal
from services.core.bus.abc import ConsumerOptions
from services.core.bus.bus import Message, Reject
from services.core.db.pool import AnyConnection
from services.core.host import ServiceContext
from services.core.secrets import SecretNotFound, SecretStore
from services.dcsync import fernet, metrics, store
from services.dcsync.availability import Availability, AvailabilityRules, HeartbeatClocks
from services.dcsync.errors import Conflict, NotFound, Unavailable
from services.dcsync.fernet import sync_key_secret
from services.dcsync.settings import DcsyncSettings
from services.dcsync.source import Source
from services.dcsync.syncer import AgentError, AgentLink, Connected, Syncer, skew_wire
from services.dcsync.tables import (
    DEFAULT_ENDPOINTS,
    LANES,
    MAIN_LANE,
    REVOCATION_LANE,
    Agreement,
    Endpoint,
    load_tables_file,
)
from services.dcsync.tracking_sql import Place

log = structlog.get_logger("roost.dcsync")

NAME = "dcsync"
GROUP = "dcsync"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
TICK = 1.0
HEAD_POLL = 1.0
MAINTENANCE_INTERVAL = 60.0
SYSTEM = "system=roost"
OFFLINE = "950.101"
OUT_OF_SYNC = "950.102"
MASS_SILENCE = "950.103"
TRIGGERS_MISSING = "950.104"
AUDIT_REPAIRED = "950.105"
COMMAND_LOG = "950.501"


@dataclass(slots=True)
class Runtime:
    """What the service knows of one subcloud beyond its stored row."""

    row: store.SubcloudRow
    link: AgentLink
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    connected: Connected | None = None
    cursors: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[str, list[msg.FailedChange]] = field(default_factory=dict)
    behind_since: dict[str, float] = field(default_factory=dict)
    next_audit: float = 0.0
    audit_waiters: list[asyncio.Future[list[msg.AuditReport]]] = field(default_factory=list)
    reports: list[msg.AuditReport] = field(default_factory=list)
    remote_fernet: str | None = None
    backoff: float = 0.0
    last_error: str = ""
    # held while the stored row is read, written and replaced: the ticker, the worker and commands all change it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    deleted: bool = False
    redigest_due: bool = False


class DcsyncService:
    """The ``dcsync`` component.  ``sources``: ready (not started) sources instead of the settings' URLs."""

    name = NAME
    migrations: Path | None = MIGRATIONS

    def __init__(self, settings: DcsyncSettings | None = None, *, sources: Sequence[Source] | None = None,
                 secrets: SecretStore | None = None) -> None:
        self.settings = settings if settings is not None else DcsyncSettings()
        s = self.settings
        if sources is None:
            specs = load_tables_file(s.tables_file) if s.tables_file is not None else DEFAULT_ENDPOINTS
            built = []
            if s.keystone_url:
                built.append(Source(specs[Endpoint.IDENTITY], s.keystone_url, Place(s.keystone_schema),
                                    repair_triggers=s.repair_triggers))
            if s.glance_url:
                built.append(Source(specs[Endpoint.IMAGE], s.glance_url, Place(s.glance_schema),
                                    repair_triggers=s.repair_triggers))
            sources = built
        self.sources = {src.endpoint: src for src in sources}
        self.syncer = Syncer(self.sources, batch_size=s.batch_size, local_only=s.local_only)
        self.availability = Availability(AvailabilityRules(s.offline_after, s.mass_fraction, s.mass_minimum,
                                                           s.mass_hold))
        self.clocks = HeartbeatClocks()
        self._secrets = secrets
        self._ctx: ServiceContext | None = None
        self._limit = asyncio.Semaphore(s.concurrency)
        self._runtimes: dict[str, Runtime] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty_cursors: dict[tuple[str, str, str], int] = {}
        self._heard: dict[str, datetime] = {}
        self._central_fernet: dict[str, str] | None = None
        self._central_fingerprint: str | None = None
        self._stopping = False
        self.trigger_alarms: set[str] = set()
        self._raised_out_of_sync: dict[tuple[str, str], str] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._refresh_again = False

    @property
    def ctx(self) -> ServiceContext:
        if self._ctx is None:
            raise Unavailable("the dcsync service has not started")
        return self._ctx

    @property
    def consumer_options(self) -> ConsumerOptions:
        return ConsumerOptions(concurrency=16, ack_wait=max(60.0, self.settings.request_timeout * 4))

    # -- life cycle --------------------------------------------------------------------------------------

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        if not self.sources:
            log.warning("no keystone or glance database configured (ROOST_DCSYNC_KEYSTONE_URL, "
                        "ROOST_DCSYNC_GLANCE_URL): subclouds are tracked, nothing is synced")
        for source in self.sources.values():
            missing = await source.start()
            source.on_change = self._on_change
            await self._trigger_alarms(source.endpoint, missing)
        self._read_fernet()
        if self._secrets is None:
            self._secrets = SecretStore.in_data_dir(ctx.settings.data_dir)
        now = time.monotonic()
        wall = datetime.now(UTC)
        for row in await store.load_all(ctx.pool):
            heard = None if row.last_heard_at is None else now - (wall - row.last_heard_at).total_seconds()
            self.availability.track(row.name, row.availability, heard, since=now)
            self._add_runtime(row)
        await self._reassert()
        # a heartbeat heard twice changes nothing: its ack need not wait for the server's confirmation
        await ctx.bus.subscribe("roost.dcagent.*.heartbeat", GROUP, self._heartbeat,
                                options=ConsumerOptions(confirm_acks=False))
        await ctx.bus.serve("roost.cmd.subcloud.>", GROUP, self.command, options=self.consumer_options)
        self._tasks += [asyncio.create_task(self._ticker(), name="dcsync-ticker"),
                        asyncio.create_task(self._heads(), name="dcsync-heads"),
                        asyncio.create_task(self._maintenance(), name="dcsync-maintenance")]
        log.info("dcsync started", endpoints=sorted(self.sources), subclouds=len(self._runtimes))

    async def stop(self) -> None:
        self._stopping = True
        tasks = self._tasks + [rt.task for rt in self._runtimes.values() if rt.task is not None]
        if self._refresher is not None:
            tasks.append(self._refresher)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                await self._flush_cursors()
        for source in self.sources.values():
            await source.stop()

    def routers(self) -> Sequence[APIRouter]:
        import importlib
        try:
            api = importlib.import_module("services.dcsync.api")
        except ImportError:
            return []
        router: APIRouter = api.build_router(self)
        return [router]

    def _add_runtime(self, row: store.SubcloudRow) -> Runtime:
        rt = Runtime(row, AgentLink(self.ctx.bus, row.name, timeout=self.settings.request_timeout, limit=self._limit))
        rt.next_audit = time.monotonic() + random.uniform(0, self.settings.audit_interval)
        self._runtimes[row.name] = rt
        rt.task = asyncio.create_task(self._work(rt), name=f"dcsync-{row.name}")
        return rt

    # -- events in ---------------------------------------------------------------------------------------

    def _on_change(self) -> None:
        """A NOTIFY from a source: one refresh at a time, and one more after it when others came meanwhile
        (a thousand single-row transactions make one or two refreshes, not a thousand)."""
        self._refresh_again = True
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_while_notified())

    async def _refresh_while_notified(self) -> None:
        while self._refresh_again:
            self._refresh_again = False
            await self._refresh_heads()

    async def _refresh_heads(self) -> None:
        moved = False
        for source in self.sources.values():
            with contextlib.suppress(Exception):
                moved = await source.refresh() or moved
        if moved:
            # only the workers that can stream now: waking the others (unmanaged, offline) for nothing, a
            # thousand task switches, kept the few that can waiting behind them (one managed subcloud among
            # 1,000: 118 ms from commit to applied); they are woken when managed or back online
            for rt in self._runtimes.values():
                if self._syncable(rt):
                    rt.wake.set()

    async def _heads(self) -> None:
        while True:
            await asyncio.sleep(HEAD_POLL)
            await self._refresh_heads()
            for endpoint, source in self.sources.items():
                for lane, head in source.heads.items():
                    metrics.HEAD.labels(endpoint, lane).set(head)

    async def _heartbeat(self, message: Message) -> None:
        data = message.data
        assert isinstance(data, msg.DcAgentHeartbeat)
        name = message.subject.split(".")[2] if message.subject.count(".") >= 3 else data.subcloud
        if name != data.subcloud:
            log.warning("a subcloud heartbeat names another subcloud than its subject", subject=message.subject)
            return
        rt = self._runtimes.get(name)
        if rt is None:
            return
        received = datetime.now(UTC)
        age = self.clocks.age(name, (received - message.envelope.time).total_seconds())
        self.availability.heard(name, time.monotonic() - age)
        heard_at = received - timedelta(seconds=age)     # on our clock, not the subcloud's
        self._heard[name] = max(heard_at, self._heard.get(name, heard_at))
        if data.fernet_fingerprint != rt.remote_fernet:
            rt.remote_fernet = data.fernet_fingerprint
            if self._central_fingerprint and data.fernet_fingerprint != self._central_fingerprint:
                rt.wake.set()

    # -- the periodic evaluation ---------------------------------------------------------------------------

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self._tick()
            except Exception as exc:
                log.exception("dcsync evaluation failed", error=f"{type(exc).__name__}: {exc}")

    async def _tick(self) -> None:
        now = time.monotonic()
        if self.ctx.bus.transport.connected:   # cut off from the broker ourselves: hear nothing, judge nobody
            evaluation = self.availability.evaluate(now)
            for t in evaluation.transitions:
                rt = self._runtimes.get(t.subcloud)
                if rt is not None:
                    await self._set_availability(rt, t.availability)
            if evaluation.mass_silence_changed:
                await self._mass_silence(evaluation.mass_silence, evaluation.held)
        heard, self._heard = self._heard, {}
        await store.touch(self.ctx.pool, list(heard.items()))
        for name, at in heard.items():
            rt = self._runtimes.get(name)
            if rt is not None and (rt.row.last_heard_at is None or at > rt.row.last_heard_at):
                rt.row = replace(rt.row, last_heard_at=at)
        await self._flush_cursors()
        for rt in list(self._runtimes.values()):
            await self._evaluate(rt, now)
        self._export()

    def _export(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        statuses: dict[tuple[str, str], int] = {}
        lag: dict[str, int] = dict.fromkeys(self.sources, 0)
        for rt in self._runtimes.values():
            key = (rt.row.availability, rt.row.management)
            counts[key] = counts.get(key, 0) + 1
            for e, ep in rt.row.endpoints.items():
                statuses[(e, ep.sync_status)] = statuses.get((e, ep.sync_status), 0) + 1
            if rt.row.management == "managed" and rt.row.availability == "online":
                for e, source in self.sources.items():
                    cur = rt.cursors.get(e)
                    if cur is not None:
                        lag[e] = max(lag[e], sum(max(0, source.heads[lane] - cur.get(lane, 0)) for lane in LANES))
        for a in ("online", "offline", "unknown"):
            for m in ("managed", "unmanaged"):
                metrics.SUBCLOUDS.labels(a, m).set(counts.get((a, m), 0))
        for e in ("identity", "image"):
            for st in ("in-sync", "out-of-sync", "unknown"):
                metrics.SYNC_STATUS.labels(e, st).set(statuses.get((e, st), 0))
        for e, v in lag.items():
            metrics.LAG.labels(e).set(v)

    async def _flush_cursors(self) -> None:
        dirty, self._dirty_cursors = self._dirty_cursors, {}
        if dirty:
            try:
                await store.save_cursors(self.ctx.pool, [(s, e, lane, v) for (s, e, lane), v in dirty.items()])
            except Exception:
                for k, v in dirty.items():
                    self._dirty_cursors.setdefault(k, v)
                raise

    def _status(self, rt: Runtime, endpoint: str, now: float) -> tuple[str, str]:
        row = rt.row
        if row.management != "managed":
            return "unknown", "unmanaged"
        if row.availability != "online":
            return "unknown", f"the subcloud is {row.availability}"
        if endpoint not in self.sources:
            return "unknown", "the controller does not sync this endpoint"
        ep = row.endpoints[endpoint]
        if row.join_state == "join-failed":
            return "out-of-sync", ep.detail or "the join failed"
        if row.join_state != "joined" or ep.needs_resync:
            return "out-of-sync", "joining" if row.join_state != "joined" else "being brought back by an audit"
        if rt.failures.get(endpoint):
            f = rt.failures[endpoint]
            return "out-of-sync", f"{len(f)} change(s) could not be applied, e.g. {f[0].tbl} {f[0].pk}: {f[0].error}"
        source = self.sources[endpoint]
        waiting = source.waiting_since(rt.cursors.get(endpoint, {}))   # None: at the head
        if waiting is None:
            rt.behind_since.pop(endpoint, None)
            return "in-sync", ""
        since = rt.behind_since.setdefault(endpoint, now)
        # late: behind for the whole grace AND a change has waited longer than it.  Behind alone is not late: under
        # a steady flow of commits a subcloud that applies each within seconds may never be at the head at a tick
        # (1,000 subclouds flapped to out-of-sync and back, every write stored, 950.102 raised).  Waited alone is
        # not late either: a subcloud back from offline starts with old changes to catch up on.
        if now - max(since, waiting) > self.settings.lag_grace:
            # a detail that stays the same while the lag lasts: one that counted changes or seconds was stored
            # again (and the alarm re-raised) at every tick, for every lagging subcloud, when the service was
            # busiest; how far behind is in the cursors (show) and roost_dcsync_lag_changes
            return "out-of-sync", f"behind the controller's changes for more than {self.settings.lag_grace:g} s"
        return ep.sync_status if ep.sync_status != "unknown" else "in-sync", ""

    async def _evaluate(self, rt: Runtime, now: float) -> None:
        """Sync status per endpoint; stored and announced when it changes; 950.102 past the threshold."""
        async with rt.lock:
            await self._evaluate_locked(rt, now)

    async def _evaluate_locked(self, rt: Runtime, now: float) -> None:
        if rt.deleted:
            return
        changes: dict[str, dict[str, Any]] = {}
        faults: list[tuple[str, dict[str, Any]]] = []
        wall = datetime.now(UTC)
        after: dict[str, store.EndpointRow] = dict(rt.row.endpoints)
        for endpoint, ep in rt.row.endpoints.items():
            status, detail = self._status(rt, endpoint, now)
            entity = f"subcloud={rt.row.name}.endpoint={endpoint}"
            since = ep.out_of_sync_since
            if status == "out-of-sync" and since is None:
                since = wall
            elif status != "out-of-sync":
                since = None
            if status != ep.sync_status or since != ep.out_of_sync_since or (detail and detail != ep.detail):
                changes[endpoint] = {"sync_status": status, "out_of_sync_since": since, "detail": detail[:2048]}
                after[endpoint] = replace(ep, **changes[endpoint])
                if status != "out-of-sync" and ep.sync_status == "out-of-sync":
                    faults.append(("roost.fault.clear", {"alarm_id": OUT_OF_SYNC, "entity_instance_id": entity}))
        # 950.102: raised once past the threshold (re-raised at most when the reason changes)
        for endpoint, ep in after.items():
            entity = f"subcloud={rt.row.name}.endpoint={endpoint}"
            if ep.sync_status == "out-of-sync" and ep.out_of_sync_since is not None:
                late = (wall - ep.out_of_sync_since).total_seconds() >= self.settings.out_of_sync_alarm_after
                key = (rt.row.name, endpoint)
                if late and self._raised_out_of_sync.get(key) != ep.detail:
                    self._raised_out_of_sync[key] = ep.detail
                    faults.append(("roost.fault.set", {
                        "alarm_id": OUT_OF_SYNC, "entity_instance_id": entity, "severity": "major",
                        "reason_text": _cut(f"{rt.row.name} {endpoint} out of sync since "
                                            f"{ep.out_of_sync_since:%Y-%m-%d %H:%M:%S}Z: {ep.detail}")}))
            else:
                self._raised_out_of_sync.pop((rt.row.name, endpoint), None)
        if changes:
            reasons = [f"{e} {c['sync_status']}" for e, c in changes.items()]
            moved = any(c["sync_status"] != rt.row.endpoints[e].sync_status for e, c in changes.items())
            await self._save_locked(rt, "; ".join(reasons), endpoints=changes, faults=faults, announce=moved)
        elif faults:
            await self._save_locked(rt, "", faults=faults, announce=False)

    # -- storing and announcing ---------------------------------------------------------------------------

    async def _save(self, rt: Runtime, reason: str, *, endpoints: dict[str, dict[str, Any]] | None = None,
                    faults: Sequence[tuple[str, dict[str, Any]]] = (), announce: bool = True,
                    **changes: Any) -> None:
        """Store changes of the subcloud's columns and of endpoint fields (``endpoints``: endpoint -> fields),
        with the state event (``announce``) and ``faults``, in one transaction."""
        async with rt.lock:
            await self._save_locked(rt, reason, endpoints=endpoints, faults=faults, announce=announce, **changes)

    async def _save_locked(self, rt: Runtime, reason: str, *, endpoints: dict[str, dict[str, Any]] | None = None,
                           faults: Sequence[tuple[str, dict[str, Any]]] = (), announce: bool = True,
                           **changes: Any) -> None:
        ctx = self.ctx
        row = rt.row
        if rt.deleted:
            return
        async with ctx.pool.acquire() as conn, conn.transaction():
            new_endpoints = dict(row.endpoints)
            for e, fields in (endpoints or {}).items():
                old = row.endpoints[e]
                diff = {k: v for k, v in fields.items() if getattr(old, k) != v}
                new_endpoints[e] = await store.update_endpoint(conn, row.name, old, **diff)
            row = replace(row, endpoints=new_endpoints)
            if announce or changes:
                row = await store.update(conn, row, **changes)
                await ctx.outbox.add(conn, ctx.bus.envelope("roost.subcloud.state_changed", row.event(reason)))
            await self._faults(faults, conn)
        rt.row = row

    async def _faults(self, faults: Sequence[tuple[str, dict[str, Any]]],
                      conn: AnyConnection | None = None) -> None:
        """Fault messages into the outbox: in ``conn``'s transaction, or in one of their own."""
        ctx = self.ctx
        if conn is None:
            async with ctx.pool.acquire() as own, own.transaction():
                await self._faults(faults, own)
            return
        for type_, data in faults:
            await ctx.outbox.add(conn, ctx.bus.envelope(type_, data))

    async def _reassert(self) -> None:
        alarms = []
        for rt in self._runtimes.values():
            if rt.row.management == "managed" and rt.row.availability == "offline":
                alarms.append(_offline_alarm(rt.row.name))
        for table in sorted(self.trigger_alarms):
            alarms.append(_trigger_alarm(table))
        await self._faults([("roost.fault.reassert", {"alarms": alarms})])

    async def _trigger_alarms(self, endpoint: str, missing: list[str]) -> None:
        if not missing:
            return
        faults: list[tuple[str, dict[str, Any]]] = [("roost.fault.set", _trigger_alarm(t)) for t in missing]
        log.error("capture triggers were missing", endpoint=endpoint, tables=missing,
                  repaired=self.settings.repair_triggers)
        if self.settings.repair_triggers:
            faults += [("roost.fault.clear", {"alarm_id": TRIGGERS_MISSING,
                                              "entity_instance_id": f"{SYSTEM}.table={t}"}) for t in missing]
            faults.append(("roost.fault.log", {
                "log_id": COMMAND_LOG, "entity_instance_id": SYSTEM, "severity": "major",
                "reason_text": _cut(f"dcsync re-created its capture triggers on {', '.join(missing)} "
                                    "(what they missed is logged as changes)")}))
        else:
            self.trigger_alarms.update(missing)
        await self._faults(faults)

    async def _set_availability(self, rt: Runtime, availability: str) -> None:
        if rt.row.availability == availability:
            return
        managed = rt.row.management == "managed"
        faults = []
        if availability == "offline" and managed:
            faults.append(("roost.fault.set", _offline_alarm(rt.row.name)))
        elif availability == "online":
            faults.append(("roost.fault.clear", {"alarm_id": OFFLINE, "entity_instance_id": f"subcloud={rt.row.name}"}))
        log.info("subcloud availability", subcloud=rt.row.name, availability=availability)
        await self._save(rt, f"availability {availability}", faults=faults, availability=availability)
        if availability != "online":
            rt.connected = None
        else:
            rt.next_audit = min(rt.next_audit, time.monotonic())   # back from offline: audit now
        rt.wake.set()

    async def _mass_silence(self, standing: bool, held: Sequence[str]) -> None:
        metrics.MASS_SILENCE.set(1 if standing else 0)
        if standing:
            log.error("many subclouds went silent at once; none is marked offline", subclouds=len(held))
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            await self._faults([("roost.fault.set", {
                "alarm_id": MASS_SILENCE, "entity_instance_id": SYSTEM, "severity": "critical",
                "reason_text": _cut(f"{len(held)} subclouds went silent at once ({shown}); the controller's broker "
                                    "or network is the likely cause")})])
        else:
            await self._faults([("roost.fault.clear", {"alarm_id": MASS_SILENCE, "entity_instance_id": SYSTEM})])

    # -- one subcloud's worker ---------------------------------------------------------------------------

    def _syncable(self, rt: Runtime) -> bool:
        return rt.row.management == "managed" and rt.row.availability == "online" and bool(self.sources)

    async def _work(self, rt: Runtime) -> None:
        while not self._stopping:
            # one that cannot be synced now waits to be woken (heard, managed), not for its audit time: once that
            # time has passed, a timeout of 0 would spin (1,000 subclouds not yet heard starved the heartbeats)
            timeout = max(0.0, min(rt.next_audit - time.monotonic(), 5.0)) if self._syncable(rt) else 5.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.wake.wait(), timeout=timeout if not rt.audit_waiters else 0)
            rt.wake.clear()
            if not self._syncable(rt):
                rt.connected = None
                self._answer_waiters(rt, error=f"subcloud {rt.row.name} is {rt.row.management} and "
                                               f"{rt.row.availability}: it cannot be audited now")
                continue
            try:
                await self._step(rt)
                rt.backoff = 0.0
                rt.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = exc.reason if isinstance(exc, AgentError) else f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, AgentError):
                    log.exception("subcloud sync failed", subcloud=rt.row.name, error=reason)
                elif reason != rt.last_error:
                    log.warning("subcloud sync interrupted", subcloud=rt.row.name, error=reason)
                rt.last_error = reason
                rt.connected = None
                self._answer_waiters(rt, error=reason)
                rt.backoff = min(60.0, max(1.0, rt.backoff * 3))
                with contextlib.suppress(TimeoutError):   # an operator's command cuts the back-off short
                    await asyncio.wait_for(rt.wake.wait(), timeout=rt.backoff)

    async def _step(self, rt: Runtime) -> None:
        # what this step works with: the ticker drops rt.connected when the subcloud goes offline meanwhile
        connected = rt.connected
        if connected is None:
            connected = rt.connected = await self.syncer.connect(rt.link)
            rt.cursors = {e: dict(c) for e, c in connected.cursors.items()}
            rt.remote_fernet = connected.hello.fernet_fingerprint
            updates: dict[str, dict[str, Any]] = {}
            for e, agreement in connected.agreements.items():
                skew = skew_wire(agreement)
                ep = rt.row.endpoints[e]
                if skew != ep.skew:
                    updates[e] = {"skew": skew}
                    if skew:
                        log.warning("subcloud schema differs from the controller's", subcloud=rt.row.name,
                                    endpoint=e, skew=skew)
            if updates:
                await self._save(rt, "", endpoints=updates, announce=False)
        if rt.redigest_due:       # the backstop at the subcloud too: digests recomputed from its rows
            for endpoint, agreement in connected.agreements.items():
                wrong = await self.syncer.redigest(rt.link, endpoint, agreement)
                if wrong:
                    log.warning("subcloud digests were wrong (writes its triggers missed); the audit repairs them",
                                subcloud=rt.row.name, endpoint=endpoint, tables=wrong)
                    rt.next_audit = 0.0
            rt.redigest_due = False
        joining = rt.row.join_state != "joined"
        refused: list[str] = []
        for endpoint, agreement in connected.agreements.items():
            source = self.sources[endpoint]
            ep = rt.row.endpoints[endpoint]
            cursors = rt.cursors.setdefault(endpoint, dict.fromkeys(LANES, 0))
            # behind the change log: some lane's cursor is below its last purged change (a lane at its head lacks
            # nothing, however old its cursor: the revocation lane is often empty)
            fell_behind = source.missed(cursors, await source.purged_through())
            if joining or ep.needs_resync or fell_behind:
                conflicts: list[str] = []
                if joining:
                    conflicts = await self.syncer.conflicts(rt.link, endpoint, agreement, rt.row.join_policy)
                    if conflicts:
                        log.warning("joining subcloud has rows clashing with central ones", subcloud=rt.row.name,
                                    endpoint=endpoint, policy=rt.row.join_policy, conflicts=conflicts[:10])
                    if conflicts and rt.row.join_policy == "refuse":
                        refused.append(f"{endpoint}: {len(conflicts)} row(s) clash: " + "; ".join(conflicts[:3]))
                        continue
                done = await self.syncer.audit(rt.link, endpoint, agreement, cursors, resync=True)
                assert done is not None
                report, rt.cursors[endpoint] = done
                what = "joined" if joining else "fell behind the change log" if fell_behind else "resynced"
                report.detail = _cut(f"{what}; " + (f"{len(conflicts)} row(s) with a central row's natural key "
                                                     f"adopted: " + "; ".join(conflicts[:5]) if conflicts else
                                                     "no rows clashed"), 2048)
                self._mark_cursors(rt, endpoint)
                self._count_audit(report)
                await self._save(rt, "", endpoints={endpoint: {"needs_resync": False,
                                                              "last_audit": report.model_dump(mode="json")}},
                                 announce=False)
                log.info("subcloud endpoint brought in line", subcloud=rt.row.name, endpoint=endpoint,
                         joining=joining, fell_behind=fell_behind,
                         rows=sum(r.upserted + r.deleted for r in report.repairs))
            await self._stream(rt, endpoint, agreement)
        if joining:
            if refused:
                if rt.row.join_state != "join-failed":
                    detail = "; ".join(refused)
                    eps = {e: {"detail": _cut(detail, 2048)} for e in rt.row.endpoints}
                    await self._save(rt, _cut(f"join refused: {detail}"), endpoints=eps, join_state="join-failed")
            else:
                await self._save(rt, "joined", join_state="joined")
        if rt.audit_waiters or time.monotonic() >= rt.next_audit:
            await self._audit(rt, connected)
        await self._hand_fernet(rt)
        await self._evaluate(rt, time.monotonic())

    async def _stream(self, rt: Runtime, endpoint: str, agreement: Agreement) -> None:
        """Both lanes to the head: the revocation lane whole before every batch of the main lane, so a revoked
        token is revoked at the subcloud without waiting behind a backlog (a subcloud catching up)."""
        source = self.sources[endpoint]
        cursors = rt.cursors[endpoint]
        while True:
            moved = False
            for lane, batches in ((REVOCATION_LANE, None), (MAIN_LANE, 1)):
                before = cursors.get(lane, 0)
                if before >= source.heads[lane]:
                    continue
                streamed = await self.syncer.stream(rt.link, endpoint, lane, before, agreement, batches=batches)
                cursors[lane] = streamed.cursor
                moved = moved or streamed.cursor != before
                self._mark_cursors(rt, endpoint)
                metrics.APPLIED.labels(endpoint, lane).inc(streamed.applied)
                if streamed.failed:
                    metrics.FAILED.labels(endpoint).inc(len(streamed.failed))
                    rt.failures.setdefault(endpoint, []).extend(streamed.failed)
                    del rt.failures[endpoint][:-100]
            if not moved:
                return

    def _mark_cursors(self, rt: Runtime, endpoint: str) -> None:
        for lane, seq in rt.cursors[endpoint].items():
            self._dirty_cursors[(rt.row.name, endpoint, lane)] = seq

    async def _audit(self, rt: Runtime, connected: Connected) -> None:
        """``connected``: what the step connected with (the ticker may drop ``rt.connected`` meanwhile, when the
        subcloud goes offline; the requests then fail and the step ends as any failed step)."""
        reports = []
        put_off = False
        for endpoint, agreement in connected.agreements.items():
            done = await self.syncer.audit(rt.link, endpoint, agreement, rt.cursors.get(endpoint, {}), resync=False)
            if done is None:
                put_off = True
                continue
            report, _ = done
            reports.append(report)
            self._count_audit(report)
            if not any(r.failed for r in report.repairs):
                rt.failures.pop(endpoint, None)
        if put_off and rt.audit_waiters:
            rt.wake.set()   # the stream first, then the audit
        if put_off and not reports:
            rt.next_audit = time.monotonic() + 2.0
            return
        rt.next_audit = time.monotonic() + self.settings.audit_interval * random.uniform(0.9, 1.1)
        await self._record_audit(rt, reports)
        self._answer_waiters(rt, reports=reports)

    def _count_audit(self, report: msg.AuditReport) -> None:
        failed = any(r.failed for r in report.repairs)
        outcome = "failed" if failed else "clean" if report.clean else "repaired"
        metrics.AUDITS.labels(report.endpoint, outcome).inc()
        metrics.AUDIT_SECONDS.labels(report.endpoint).observe(report.seconds)
        metrics.REPAIRED.labels(report.endpoint).inc(sum(r.upserted + r.deleted for r in report.repairs))

    async def _record_audit(self, rt: Runtime, reports: list[msg.AuditReport]) -> None:
        rt.reports = reports
        ctx = self.ctx
        entity = f"subcloud={rt.row.name}"
        repaired = [r for rep in reports for r in rep.repairs if r.upserted or r.deleted]
        faults: list[tuple[str, dict[str, Any]]] = []
        if repaired:
            rows = sum(r.upserted + r.deleted for r in repaired)
            tables = ", ".join(sorted({f"{r.table} ({r.upserted + r.deleted})" for r in repaired}))
            log.warning("audit repaired rows sync had missed", subcloud=rt.row.name, rows=rows, tables=tables)
            faults.append(("roost.fault.set", {"alarm_id": AUDIT_REPAIRED, "entity_instance_id": entity,
                                               "severity": "minor",
                                               "reason_text": _cut(f"the audit of {rt.row.name} repaired {rows} "
                                                                   f"row(s): {tables}")}))
        elif all(rep.clean for rep in reports):
            faults.append(("roost.fault.clear", {"alarm_id": AUDIT_REPAIRED, "entity_instance_id": entity}))
        local = [r for rep in reports for r in rep.repairs if r.local_only]
        if local:
            log.info("subcloud has rows of its own", subcloud=rt.row.name,
                     tables={r.table: r.local_only for r in local}, policy=self.settings.local_only)
        wall = datetime.now(UTC)
        async with rt.lock, ctx.pool.acquire() as conn, conn.transaction():
            for rep in reports:
                await store.update_endpoint(conn, rt.row.name, rt.row.endpoints[rep.endpoint],
                                            last_audit=rep.model_dump(mode="json"))
                await ctx.outbox.add(conn, ctx.bus.envelope("roost.sync.audited", rep))
            await conn.execute("UPDATE dcsync.subclouds SET last_audit_at = $2 WHERE name = $1", rt.row.name, wall)
            await self._faults(faults, conn)
            eps: dict[str, store.EndpointRow] = {
                rep.endpoint: replace(rt.row.endpoints[rep.endpoint], last_audit=rep.model_dump(mode="json"))
                for rep in reports}
            rt.row = replace(rt.row, last_audit_at=wall, endpoints={**rt.row.endpoints, **eps})

    def _answer_waiters(self, rt: Runtime, *, reports: list[msg.AuditReport] | None = None,
                        error: str | None = None) -> None:
        waiters, rt.audit_waiters = rt.audit_waiters, []
        for w in waiters:
            if w.done():
                continue
            if error is not None:
                w.set_exception(Unavailable(error))
            else:
                w.set_result(reports or [])

    # -- Fernet keys ---------------------------------------------------------------------------------------

    def _read_fernet(self) -> None:
        repo = self.settings.fernet_repo
        if repo is None:
            return
        try:
            keys = fernet.read_repository(repo)
        except (fernet.FernetError, OSError) as exc:
            log.error("cannot read keystone's Fernet keys", repo=str(repo), error=str(exc))
            return
        fp = fernet.fingerprint(keys)
        if fp != self._central_fingerprint:
            log.info("keystone's Fernet keys", fingerprint=fp, keys=len(keys))
            self._central_fernet, self._central_fingerprint = keys, fp
            for rt in self._runtimes.values():
                rt.wake.set()

    async def _hand_fernet(self, rt: Runtime) -> None:
        if self._central_fernet is None or rt.remote_fernet == self._central_fingerprint:
            return
        assert self._secrets is not None and self._central_fingerprint is not None
        try:
            key = self._secrets.get(sync_key_secret(rt.row.name)).get_secret_value()
        except SecretNotFound:
            log.warning("no sync key for the subcloud: its Fernet keys cannot be handed over",
                        subcloud=rt.row.name, secret=sync_key_secret(rt.row.name))
            return
        sealed = fernet.seal(key, rt.row.name, self._central_fernet)
        done = await rt.link.ask("fernet", msg.FernetKeys(sealed=sealed, fingerprint=self._central_fingerprint),
                                 msg.FernetApplied)
        rt.remote_fernet = done.fingerprint
        async with rt.lock, self.ctx.pool.acquire() as conn:
            await conn.execute("UPDATE dcsync.subclouds SET fernet_fingerprint = $2 WHERE name = $1", rt.row.name,
                               done.fingerprint)
            rt.row = replace(rt.row, fernet_fingerprint=done.fingerprint)
        log.info("fernet keys handed over", subcloud=rt.row.name, fingerprint=done.fingerprint)

    # -- maintenance ---------------------------------------------------------------------------------------

    async def _maintenance(self) -> None:
        last_redigest = time.monotonic()
        last_fernet = 0.0
        last_round = time.monotonic()
        while True:
            await asyncio.sleep(min(self.settings.fernet_check_interval, MAINTENANCE_INTERVAL))
            now = time.monotonic()
            try:
                if now - last_fernet >= self.settings.fernet_check_interval:
                    last_fernet = now
                    await asyncio.to_thread(self._read_fernet)
                if now - last_round < MAINTENANCE_INTERVAL:
                    continue
                last_round = now
                for source in self.sources.values():
                    await self._trigger_alarms(source.endpoint, await source.check_triggers())
                    await self._purge(source)
                if now - last_redigest >= self.settings.redigest_interval:
                    last_redigest = now
                    for rt in self._runtimes.values():
                        rt.redigest_due = True
                        rt.wake.set()
                    for source in self.sources.values():
                        for r in await source.redigest_all():
                            if r.differences:
                                log.warning("the full re-digest found writes the triggers missed",
                                            endpoint=source.endpoint, table=r.table, added=r.added,
                                            changed=r.changed, removed=r.removed)
            except Exception as exc:
                log.exception("dcsync maintenance failed", error=f"{type(exc).__name__}: {exc}")

    async def _purge(self, source: Source) -> None:
        """Per lane: changes every managed subcloud has, or older than the retention, leave the log (each lane's
        newest stays: it tells the head after a restart)."""
        before = datetime.now(UTC) - timedelta(days=self.settings.change_retention_days)
        joined = [rt for rt in self._runtimes.values()
                  if rt.row.management == "managed" and rt.row.join_state == "joined"]
        count = 0
        async with source.pool.acquire() as conn:
            for lane in LANES:
                below = min([rt.cursors.get(source.endpoint, {}).get(lane, 0) for rt in joined],
                            default=source.heads[lane]) + 1
                count += await source.tracker.purge(conn, lane, below=below, before=before)
        source.purged()
        if count:
            log.info("change log purged", endpoint=source.endpoint, changes=count)

    # -- commands ------------------------------------------------------------------------------------------

    async def command(self, message: Message) -> BaseModel:
        data = message.data
        principal = message.principal
        if isinstance(data, msg.SubcloudAdd):
            return await self.add(data, principal)
        if isinstance(data, msg.SubcloudListQuery):
            return await self.list()
        if isinstance(data, msg.AuditRequest):
            return await self.audit(data.name)
        if isinstance(data, msg.SubcloudRef):
            verb = message.envelope.type.rsplit(".", 1)[-1]
            if verb == "delete":
                return await self.delete(data.name, principal)
            if verb == "manage":
                return await self.manage(data.name, principal)
            if verb == "unmanage":
                return await self.unmanage(data.name, principal)
            if verb == "show":
                return await self.show(data.name)
        raise Reject(f"dcsync does not handle {message.envelope.type}")

    def _runtime(self, name: str) -> Runtime:
        rt = self._runtimes.get(name)
        if rt is None:
            raise NotFound(f"no subcloud named {name}")
        return rt

    async def _command_log(self, conn: AnyConnection, principal: Principal | None, what: str) -> None:
        who = principal.name if principal is not None else "unknown"
        await self.ctx.outbox.add(conn, self.ctx.bus.envelope("roost.fault.log", {
            "log_id": COMMAND_LOG, "entity_instance_id": SYSTEM, "severity": "warning",
            "reason_text": _cut(f"{who}: {what}")}))

    async def add(self, data: msg.SubcloudAdd, principal: Principal | None) -> msg.SubcloudView:
        ctx = self.ctx
        policy = data.join_policy or self.settings.join_policy
        async with ctx.pool.acquire() as conn, conn.transaction():
            row = await store.insert(conn, data.name, description=data.description,
                                     management="managed" if data.managed else "unmanaged", join_policy=policy,
                                     endpoints=("identity", "image"))
            if row is None:
                raise Conflict(f"subcloud {data.name} exists already")
            await ctx.outbox.add(conn, ctx.bus.envelope("roost.subcloud.state_changed", row.event("added")))
            await self._command_log(conn, principal, f"subcloud add {data.name}: added ({policy} on join)")
        self.availability.track(row.name, "unknown", since=time.monotonic())
        rt = self._add_runtime(row)
        rt.next_audit = time.monotonic()
        log.info("subcloud added", subcloud=row.name, managed=data.managed, join_policy=policy)
        return row.view()

    async def delete(self, name: str, principal: Principal | None) -> msg.SubcloudDeleted:
        rt = self._runtime(name)
        if rt.row.management == "managed":
            raise Conflict(f"subcloud {name} is managed: unmanage it before deleting it")
        if rt.task is not None:
            rt.task.cancel()
            await asyncio.gather(rt.task, return_exceptions=True)
        ctx = self.ctx
        async with rt.lock, ctx.pool.acquire() as conn, conn.transaction():
            await store.delete(conn, name)
            event = rt.row.event("deleted")
            event.version += 1
            await ctx.outbox.add(conn, ctx.bus.envelope("roost.subcloud.deleted", event))
            await ctx.outbox.add(conn, ctx.bus.envelope("roost.fault.clear", {
                "entity_instance_id": f"subcloud={name}", "prefix": True}))
            await self._command_log(conn, principal, f"subcloud delete {name}: deleted")
        rt.deleted = True           # before anything else runs: the lock was just released
        del self._runtimes[name]
        self.availability.forget(name)
        self.clocks.forget(name)
        for key in [k for k in self._dirty_cursors if k[0] == name]:
            del self._dirty_cursors[key]
        self._raised_out_of_sync = {k: v for k, v in self._raised_out_of_sync.items() if k[0] != name}
        return msg.SubcloudDeleted(name=name)

    async def manage(self, name: str, principal: Principal | None) -> msg.SubcloudView:
        rt = self._runtime(name)
        if rt.row.management != "managed":
            faults = []
            if rt.row.availability == "offline":
                faults.append(("roost.fault.set", _offline_alarm(name)))
            await self._save(rt, "managed", faults=faults, management="managed")
            async with self.ctx.pool.acquire() as conn, conn.transaction():
                await self._command_log(conn, principal, f"subcloud manage {name}: managed")
            rt.next_audit = time.monotonic()   # audited when managed again
            rt.wake.set()
        return rt.row.view()

    async def unmanage(self, name: str, principal: Principal | None) -> msg.SubcloudView:
        rt = self._runtime(name)
        if rt.row.management != "unmanaged":
            faults = [("roost.fault.clear", {"alarm_id": a, "entity_instance_id": f"subcloud={name}", "prefix": True})
                      for a in (OFFLINE, OUT_OF_SYNC)]
            await self._save(rt, "unmanaged", faults=faults, management="unmanaged")
            async with self.ctx.pool.acquire() as conn, conn.transaction():
                await self._command_log(conn, principal, f"subcloud unmanage {name}: unmanaged")
            rt.connected = None
            rt.wake.set()
            await self._evaluate(rt, time.monotonic())
        return rt.row.view()

    async def list(self) -> msg.SubcloudList:
        return msg.SubcloudList(subclouds=[rt.row.view() for _, rt in sorted(self._runtimes.items())])

    async def show(self, name: str) -> msg.SubcloudDetail:
        rt = self._runtime(name)
        row = rt.row
        endpoints = []
        for e, ep in sorted(row.endpoints.items()):
            source = self.sources.get(e)
            endpoints.append(msg.EndpointView(
                endpoint=e, sync_status=ep.sync_status,
                cursors=dict(rt.cursors.get(e, row.cursors.get(e, {}))),
                head=dict(source.heads) if source is not None else {}, out_of_sync_since=ep.out_of_sync_since,
                detail=ep.detail))
        skew = [{"endpoint": e, **s} for e, ep in sorted(row.endpoints.items()) for s in ep.skew]
        last = {e: ep.last_audit for e, ep in row.endpoints.items() if ep.last_audit is not None}
        return msg.SubcloudDetail(**row.view().model_dump(), endpoints=endpoints, skew=skew, last_audit=last or None,
                                  fernet_fingerprint=rt.remote_fernet or row.fernet_fingerprint)

    async def audit(self, name: str) -> msg.AuditResult:
        rt = self._runtime(name)
        if not self._syncable(rt):
            raise Unavailable(f"subcloud {name} is {rt.row.management} and {rt.row.availability}: "
                              "it cannot be audited now")
        waiter: asyncio.Future[list[msg.AuditReport]] = asyncio.get_running_loop().create_future()
        rt.audit_waiters.append(waiter)
        rt.wake.set()
        try:
            reports = await asyncio.wait_for(waiter, timeout=self.settings.request_timeout * 4)
        except TimeoutError:
            raise Unavailable(f"the audit of {name} did not finish in time") from None
        return msg.AuditResult(reports=reports)


def _cut(text: str, limit: int = 255) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _offline_alarm(name: str) -> dict[str, Any]:
    return {"alarm_id": OFFLINE, "entity_instance_id": f"subcloud={name}", "severity": "critical",
            "reason_text": f"subcloud {name} is offline: its agent's heartbeat is no longer heard"}


def _trigger_alarm(table: str) -> dict[str, Any]:
    return {"alarm_id": TRIGGERS_MISSING, "entity_instance_id": f"{SYSTEM}.table={table}", "severity": "critical",
            "reason_text": f"the change-capture trigger on {table} is missing; its changes are not synced"}


def build_dcsync() -> DcsyncService:
    from services.dcsync.settings import load_dcsync_settings
    return DcsyncService(load_dcsync_settings())
