"""The alarms service: applies the faults every service publishes, durably and exactly once.

It consumes ``roost.fault.>`` as consumer group ``alarms``.  Each message is applied in one transaction
with its effects: the inbox row (a redelivery of the same envelope id is dropped), the active alarm row,
the history record, the ``roost.alarm.*`` event in the outbox and the webhook deliveries
(:class:`services.alarms.store.AlarmStore`).  The raising service, the owner of what it sets, is the
envelope's ``source`` (which broker permissions restrict).

Group commit: the consumer runs ``batch_size * pipeline`` handlers at once (``ConsumerOptions.concurrency``);
each queues its message in the order the consumer handed them over and waits; the committer takes up to
``batch_size`` queued messages and applies them in order in ONE transaction (sets and exact clears through
:meth:`~services.alarms.store.AlarmStore.apply_many`, a few statements for the whole run; the other
kinds one by one inside it); after the commit every handler returns and its message is acked.  While
one batch commits the next one gathers, so a quiet service commits each message at once and a busy one
commits many per transaction.  Pipelining: up to ``pipeline`` (3) batches commit at once, on their own
connections, when a backlog has a whole batch queued for each and they touch no alarm instance in common
and hold only sets and exact clears (a batch sharing an instance with one in flight, or holding another
kind, waits until the batches before it are done): the Python work of one overlaps the database work of
the other, and the order per alarm instance is the order of the messages, as without it.  Should the
batch fail for any reason (an input the catalogue refuses, a concurrent raise of the same instance, the
database), it is rolled back and each of its messages is applied alone, in order, in its own
transaction, exactly as without batching: a bad message is dead-lettered alone and the others commit.
``batch_size=1`` applies every message alone.

Input the catalogue refuses (an unknown alarm id, a severity the id does not allow, a malformed entity
id, a log id used as an alarm, an alarm outside a re-assertion's scope) raises ``Reject`` with the reason:
the bus dead-letters the message with it, so nothing is lost and an operator can replay it once fixed.
(A reason over 255 characters, or a severity that is no severity at all, is already refused by the
message's schema, and dead-lettered the same way.)

Operator commands (``roost.cmd.alarm.>``, group ``alarms``): ``list`` / ``show`` / ``summary`` / ``history`` (the
event log) for readers
(operator-suppressed alarms only with ``include_suppress``, alarms masked by an inhibiting alarm such as
host locked only with ``include_masked``), ``clear`` (by uuid) / ``suppress`` / ``unsuppress`` for admins,
each recorded as a customer log (950.501 / 950.502) in the same transaction.

The catalogue is roost's own plus the files named in ``ROOST_ALARM_CATALOGUES`` (``os.pathsep``-separated,
e.g. StarlingX's ``events.yaml``), merged at start; or exactly the paths given to the constructor.

Webhooks: the ``WebhookDispatcher`` runs in this process (``dispatcher="inline"``, the default), or with
``dispatcher="process"`` (or ``ROOST_ALARMS_DISPATCHER=process``) in a child process this one supervises
(``services.alarms.webhooks.worker``: same queue, the hooks and metrics relayed back here), so that
sending and applying faults use two cores.  The child connects with ``database_url`` (default: the URL
the pool was made with).

Metrics (``services.alarms.metrics``): sets and clears counted after their commit, active alarms by
severity refreshed every ``metrics_interval`` seconds.

The history is kept for ``history_retention`` (30 days by default): one replica at a time (a PostgreSQL
advisory lock) deletes older records every ``retention_interval`` seconds.  In the same pass, delivered
webhook deliveries older than ``webhook_retention`` (7 days) are deleted, and the webhook notifications no
subscription needs any more (fanned out to all, no delivery pending, no dead letter pointing at them).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import uuid as uuidlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import asyncpg
import asyncpg.pool
import structlog
from fastapi import APIRouter
from pydantic import BaseModel, ValidationError

from schemas import alarms as msg
from schemas.catalog import load as load_registry
from schemas.envelope import Envelope
from schemas.inventory import HostDeleted
from services.alarms import metrics, webhooks
from services.alarms.api import build_router
from services.alarms.catalogue import (
    ROOST_CATALOGUE,
    AlarmError,
    AlarmType,
    Catalogue,
    Severity,
    load_catalogues,
)
from services.alarms.model import AlarmKey, ClearRequest, EntityInstanceId, LogRequest, SetRequest, masked_keys
from services.alarms.store import (
    AlarmStore,
    Applied,
    BatchOp,
    Cleared,
    ClearOp,
    InboxClaim,
    Origin,
    Reasserted,
    SetOp,
    StoredAlarm,
)
from services.alarms.webhooks import WebhookDispatcher
from services.alarms.webhooks.worker import DispatcherProcess, pool_url
from services.core.bus.abc import ConsumerOptions
from services.core.bus.bus import Message, Reject
from services.core.db.inbox import Inbox
from services.core.db.pool import AnyConnection, plan_per_call
from services.core.host import ServiceContext
from services.core.logging import message_context

log = structlog.get_logger("roost.alarms")

NAME = "alarms"
GROUP = "alarms"
FAULTS = "roost.fault.>"
COMMANDS = "roost.cmd.alarm.>"
SYSTEM_ENTITY = "system=roost"
OPERATOR_LOG = "950.501"
SUPPRESSION_LOG = "950.502"
INBOX_CONSUMER = "alarms-faults"
INBOX_HOSTS = "alarms-hosts"
HOST_DELETED = "roost.host.deleted"
CATALOGUES_ENV = "ROOST_ALARM_CATALOGUES"
DISPATCHER_ENV = "ROOST_ALARMS_DISPATCHER"     # "inline" (the default) or "process"
DispatcherMode = Literal["inline", "process"]
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_RETENTION_LOCK = 0x616C61726D73   # "alarms": one purge at a time across replicas


def default_catalogue_paths(environ: dict[str, str] | None = None) -> list[Path]:
    """roost's own catalogue, then every existing file named in ``ROOST_ALARM_CATALOGUES``."""
    env = os.environ if environ is None else environ
    paths = [ROOST_CATALOGUE]
    for part in env.get(CATALOGUES_ENV, "").split(os.pathsep):
        if not part.strip():
            continue
        path = Path(part.strip())
        if path.is_file():
            paths.append(path)
        else:
            log.warning("alarm catalogue not found; skipped", path=str(path), variable=CATALOGUES_ENV)
    return paths


def set_request(fault: msg.FaultSet) -> SetRequest:
    """The model's request for a ``roost.fault.set``; ``AlarmError`` saying what is wrong."""
    EntityInstanceId.parse(fault.entity_instance_id)
    try:
        return SetRequest(alarm_id=fault.alarm_id, entity_instance_id=fault.entity_instance_id,
                          severity=fault.severity, reason_text=fault.reason_text, entity_type_id=fault.entity_type_id,
                          alarm_type=AlarmType(fault.alarm_type) if fault.alarm_type is not None else None,
                          probable_cause=fault.probable_cause, timestamp=fault.timestamp)
    except ValueError as exc:
        raise AlarmError(_first_error(exc)) from None


def _uuid(text: str) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(text)
    except ValueError:
        raise AlarmError(f"{text!r} is not an alarm uuid") from None


def _active(stored: StoredAlarm, suppressed: frozenset[str], masked: frozenset[AlarmKey]) -> msg.ActiveAlarm:
    data = stored.alarm.model_dump(mode="json")
    data.update(uuid=str(stored.alarm.uuid), owner=stored.owner, version=stored.version,
                masked=stored.alarm.key in masked,
                suppression_status="suppressed" if stored.alarm.alarm_id in suppressed else "unsuppressed")
    return msg.ActiveAlarm.model_validate(data)


_Done = Applied | tuple[Cleared, ...] | Reasserted | msg.EventLogRecord


def _count(done: _Done) -> None:
    """Count what a committed transaction did."""
    if isinstance(done, Applied):
        if done.outcome.writes:
            metrics.record_set(done.outcome.change.value)
    elif isinstance(done, Reasserted):
        for applied in done.set:
            _count(applied)
        _count(done.cleared)
    elif isinstance(done, msg.EventLogRecord):
        metrics.record_log()
    else:
        for cleared in done:
            metrics.record_clears(cleared.cause)


@dataclass(frozen=True, slots=True)
class _Queued:
    """A fault message waiting for its batch, and its handler waiting for the outcome."""

    message: Message
    outcome: asyncio.Future[None]
    op: BatchOp | None            # its batchable form (``_batch_op``), None for another kind
    refused: bool = False         # ``_batch_op`` refused it (the batch holding it fails as a whole)


def _first_error(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
    return str(exc)


def _batch_op(message: Message) -> BatchOp | None:
    """The batchable form of a set or an exact clear of one alarm; None for the other kinds."""
    data = message.data
    if isinstance(data, msg.FaultSet):
        return SetOp(set_request(data), Origin.of(message.envelope), data.proposed_repair_action)
    if isinstance(data, msg.FaultClear) and data.alarm_id is not None and not data.prefix:
        EntityInstanceId.parse(data.entity_instance_id)
        return ClearOp(ClearRequest(alarm_id=data.alarm_id, entity_instance_id=data.entity_instance_id),
                       Origin.of(message.envelope))
    return None


def _batch_ops(batch: Sequence[_Queued]) -> list[BatchOp | None]:
    """The batchable forms of a batch's messages (``_batch_op``); all None when one was refused (the batch
    then fails as a whole and its messages are applied alone, each with its own outcome)."""
    if any(q.refused for q in batch):
        return [None] * len(batch)
    return [q.op for q in batch]


def _context(message: Message) -> contextlib.AbstractContextManager[None]:
    """The message's ids bound for the logs (the committer's own context names no message)."""
    return message_context(message.envelope, group=message.group, attempt=message.attempt)


def _settle(outcome: asyncio.Future[None], error: BaseException | None) -> None:
    if outcome.done():
        return
    if error is None:
        outcome.set_result(None)
    else:
        outcome.set_exception(error)


WEBHOOK_FAILING = "950.201"          # roost's catalogue: a webhook subscriber is failing

class AlarmsService:
    """The ``alarms`` component: fault inputs in, active alarms, history, events and webhooks out."""

    name = NAME
    migrations: Path | None = MIGRATIONS
    hold_idle = 0.5         # seconds the committer keeps its connections once no message is queued

    def __init__(self, catalogue_paths: Sequence[str | Path] | None = None, *,
                 history_retention: timedelta = timedelta(days=30), retention_interval: float = 3600.0,
                 webhook_retention: timedelta = timedelta(days=7),
                 metrics_interval: float = 10.0, webhooks: bool = True, batch_size: int = 128, pipeline: int = 3,
                 dispatcher: DispatcherMode | None = None, database_url: str | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if pipeline < 1:
            raise ValueError("pipeline must be at least 1")
        self.pipeline = pipeline
        mode = dispatcher if dispatcher is not None else os.environ.get(DISPATCHER_ENV, "inline") or "inline"
        if mode not in ("inline", "process"):
            raise ValueError(f"{DISPATCHER_ENV} must be inline or process, not {mode!r}")
        self.dispatcher_mode: DispatcherMode = "process" if mode == "process" else "inline"
        self.database_url = database_url
        self.catalogue_paths = list(catalogue_paths) if catalogue_paths is not None else None
        self.batch_size = batch_size
        self._queued: list[_Queued] = []
        self._committer: asyncio.Task[None] | None = None
        self._arrival: asyncio.Future[None] | None = None      # the committer waits for a message to come
        self._held: list[asyncpg.pool.PoolConnectionProxy] = []   # the committer's connections between batches
        self._stopping = False
        self.history_retention = history_retention
        self.retention_interval = retention_interval
        self.webhook_retention = webhook_retention
        self.webhooks = webhooks
        self._ctx: ServiceContext | None = None
        self._store: AlarmStore | None = None
        self._inbox = Inbox(NAME)
        self.metrics_interval = metrics_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._router: APIRouter | None = None
        self._dispatcher: WebhookDispatcher | DispatcherProcess | None = None

    @property
    def store(self) -> AlarmStore:
        if self._store is None:
            raise RuntimeError("the alarms service has not started")
        return self._store

    @property
    def consumer_options(self) -> ConsumerOptions:
        """How the fault consumer runs: ``batch_size * pipeline`` handlers at once, so that batches can gather
        while others commit; acks not confirmed (NATS): every fault message is applied once through the inbox,
        so an ack lost on the way costs a redelivery the inbox drops, and a confirmed one cost a round trip to
        nats-server per message, with the handler's slot held meanwhile (9% of the service's time at 1,000
        faults/s)."""
        concurrency = self.batch_size * (self.pipeline if self.batch_size > 1 else 1)
        return ConsumerOptions(concurrency=concurrency, prefetch=max(ConsumerOptions().prefetch, 2 * concurrency),
                               confirm_acks=False)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._ctx is None:
            raise RuntimeError("the alarms service has not started")
        return self._ctx.pool

    async def start(self, ctx: ServiceContext) -> None:
        paths = self.catalogue_paths if self.catalogue_paths is not None else default_catalogue_paths()
        catalogue: Catalogue = await asyncio.to_thread(load_catalogues, *paths)
        self._ctx = ctx
        self._stopping = False
        if ctx.settings.alarm_history_retention_days is not None:
            self.history_retention = timedelta(days=ctx.settings.alarm_history_retention_days)
        self._store = AlarmStore(catalogue, ctx.outbox, load_registry(), webhooks=self.webhooks)
        log.info("alarm catalogue loaded", ids=len(catalogue), files=[str(p) for p in paths])
        self._tasks = [asyncio.create_task(self._retain(), name="alarms-history-retention"),
                       asyncio.create_task(self._gauge(), name="alarms-active-gauge")]
        await ctx.bus.subscribe(FAULTS, GROUP, self.handle, options=self.consumer_options)
        await ctx.bus.subscribe(HOST_DELETED, GROUP, self.on_host_deleted)
        await ctx.bus.serve(COMMANDS, GROUP, self.command)
        if self.webhooks:
            url = self.database_url or pool_url(ctx.pool)
            if self.dispatcher_mode == "process" and url is not None:
                process = DispatcherProcess(url, on_subscription_failing=self._webhook_failing,
                                            on_subscription_recovered=self._webhook_recovered,
                                            log_format=ctx.settings.log_format, log_level=ctx.settings.log_level)
                self._dispatcher = process
                await process.start()
            else:
                if self.dispatcher_mode == "process":
                    log.warning("webhook dispatcher runs in this process: the database URL is unknown")
                inline = WebhookDispatcher(ctx.pool, on_subscription_failing=self._webhook_failing,
                                           on_subscription_recovered=self._webhook_recovered)
                self._dispatcher = inline
                inline.start()

    async def _webhook_failing(self, subscription_id: str, reason: str) -> None:
        """A subscriber turned failing: raise 950.201 on it (through the bus, like any service's fault)."""
        assert self._ctx is not None
        await self._ctx.bus.publish(self._ctx.bus.envelope("roost.fault.set", {
            "alarm_id": WEBHOOK_FAILING, "entity_instance_id": f"webhook={subscription_id}",
            "severity": "major", "reason_text": f"webhook subscriber {subscription_id}: {reason}"[:255]}))

    async def _webhook_recovered(self, subscription_id: str, reason: str) -> None:
        assert self._ctx is not None
        await self._ctx.bus.publish(self._ctx.bus.envelope("roost.fault.clear", {
            "alarm_id": WEBHOOK_FAILING, "entity_instance_id": f"webhook={subscription_id}"}))

    async def stop(self) -> None:
        self._stopping = True
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)      # a committer holding its connections for the next message: end
        if self._dispatcher is not None:
            await self._dispatcher.stop()
            self._dispatcher = None
        if self._committer is not None:    # batches in hand commit (their handlers wait for them)
            with contextlib.suppress(Exception):
                await self._committer
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def routers(self) -> Sequence[APIRouter]:
        """The FM-shaped REST API (``services.alarms.api``); it answers 503 until ``start``."""
        if self._router is None:
            self._router = build_router(self)
        return [self._router]

    # -- the consumer ---------------------------------------------------------------------------------

    async def handle(self, message: Message) -> None:
        """Apply one ``roost.fault.*`` message, once; return after its commit.  ``Reject`` what can never apply.

        The message joins the next batch (in the order handlers were called) and this waits for it.
        """
        if self.batch_size == 1:
            await self.handle_alone(message)
            return
        try:
            op, refused = _batch_op(message), False
        except (AlarmError, ValueError):
            op, refused = None, True
        queued = _Queued(message, asyncio.get_running_loop().create_future(), op, refused)
        self._queued.append(queued)
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)
        if self._committer is None or self._committer.done():
            # a context of its own: the committer's logs are about no message in particular
            self._committer = asyncio.create_task(self._commit_queued(), name="alarms-faults-committer",
                                                  context=contextvars.Context())
        await queued.outcome

    async def handle_alone(self, message: Message) -> None:
        """Apply one ``roost.fault.*`` message in a transaction of its own."""
        envelope = message.envelope
        origin = Origin.of(envelope)
        data = message.data
        try:
            async with self.pool.acquire() as conn:
                await plan_per_call(conn)     # its statements find the alarm by index, as a batch's do
                async with conn.transaction():
                    if not await self._inbox.first_time(conn, INBOX_CONSUMER, envelope.id):
                        log.info("duplicate fault message dropped", message_id=envelope.id)
                        return
                    done = await self._apply(conn, data, origin, envelope.type)
        except AlarmError as exc:
            raise Reject(str(exc)) from None
        _count(done)        # committed

    async def _commit_queued(self) -> None:
        """Commit the queued messages until none is left and none came for ``hold_idle`` seconds, then give the
        held connections back.  (Nothing is awaited between the last look at the queue and the end: a handler
        that queues a message while this task is still running relies on it to take it.)

        Under a steady trickle (100 faults/s: one message a batch) giving the connection back after each batch
        cost a reset statement in PostgreSQL per batch, as many as the batches' own commits: holding it a
        moment longer serves the next message on the same connection."""
        try:
            while True:
                await self._commit_until_idle()
                if not self._queued and self._held and not self._stopping:
                    self._arrival = asyncio.get_running_loop().create_future()
                    await asyncio.wait({self._arrival}, timeout=self.hold_idle)
                    self._arrival = None
                    if self._queued:
                        continue
                await self._release_held()
                if not self._queued:
                    return
        finally:
            self._arrival = None
            if self._held:              # cancelled
                await self._release_held()

    async def _commit_until_idle(self) -> None:
        """Commit the queued messages, ``batch_size`` at a time, up to ``pipeline`` batches at once when
        they touch disjoint alarm instances, in order, until none is left."""
        running: dict[asyncio.Task[None], tuple[list[_Queued], frozenset[AlarmKey] | None]] = {}
        try:
            while self._queued or running:
                # Another batch alongside those committing only when a whole one is queued: the pipeline is
                # for a backlog.  Under a steady flow the messages gather while a batch commits and go in
                # the next one together (a partial batch started at once made more, smaller commits).
                if self._queued and len(running) < self.pipeline and (
                        not running or len(self._queued) >= self.batch_size):
                    batch = self._queued[:self.batch_size]
                    ops = _batch_ops(batch)
                    keys = frozenset(op.key for op in ops if op is not None) if None not in ops else None
                    if not running or (keys is not None and all(
                            other is not None and keys.isdisjoint(other) for _, other in running.values())):
                        del self._queued[:len(batch)]
                        task = asyncio.create_task(self._apply_batch(batch, ops), name="alarms-faults-batch")
                        running[task] = (batch, keys)
                        continue
                # wait for a batch to end, or (with room for one more and less than a batch queued) for a message
                waits: set[asyncio.Future[Any]] = set(running)
                if len(self._queued) < self.batch_size and len(running) < self.pipeline:
                    self._arrival = asyncio.get_running_loop().create_future()
                    waits.add(self._arrival)
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                self._arrival = None
                for ended in [t for t in running if t in done]:
                    running.pop(ended)
                    ended.result()
        finally:
            # cancelled (stop) or broken: the handlers of the batches in hand and the queued ones fail; the bus
            # delivers them again
            for task in running:
                task.cancel()
            left = [q for task, (batch, _) in running.items() for q in batch]
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            left, self._queued = [*left, *self._queued], []
            for queued in left:
                _settle(queued.outcome, RuntimeError("the alarms service stopped before applying it"))

    @contextlib.asynccontextmanager
    async def _batch_connection(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """A connection for a batch: one the committer holds from an earlier batch, or one from the pool.  The
        committer keeps them while it has work (``_release_held`` at its end): giving one back to the pool
        costs a round trip (its reset) that every handler of the batch would wait for."""
        reusable = False
        if self._held:
            conn = self._held.pop()
        else:
            conn = await self.pool.acquire()
            try:
                # the batches' statements (the locks, the active rows) planned for active_alarms as it is now: a
                # generic plan made while it was nearly empty compared every locked key with every row
                await plan_per_call(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.pool.release(conn)
                raise
        try:
            yield conn
            reusable = not conn.is_closed() and not conn.is_in_transaction()
        finally:
            if reusable:
                self._held.append(conn)
            else:
                with contextlib.suppress(Exception):
                    await self.pool.release(conn)

    async def _release_held(self) -> None:
        held, self._held = self._held, []
        for conn in held:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)

    async def _apply_batch(self, batch: Sequence[_Queued], ops: Sequence[BatchOp | None] | None = None) -> None:
        """Apply ``batch`` in one transaction and settle each handler's outcome; should that fail, apply
        each message alone, in order (its own outcome: applied, ``Reject``, or an error to retry).  ``ops``:
        its messages' batchable forms (``_batch_ops``), when known."""
        try:
            done = await self._apply_together([q.message for q in batch], ops)
        except Exception as exc:
            if len(batch) > 1:
                log.info("fault batch not applied as one; applying its messages one by one",
                         messages=len(batch), error=f"{type(exc).__name__}: {exc}"[:300])
            for queued in batch:
                try:
                    with _context(queued.message):
                        await self.handle_alone(queued.message)
                except Exception as one:
                    _settle(queued.outcome, one)
                else:
                    _settle(queued.outcome, None)
            return
        for queued, result in zip(batch, done, strict=True):
            if result is not None:
                _count(result)          # committed
            _settle(queued.outcome, None)

    async def _apply_together(self, messages: Sequence[Message], ops: Sequence[BatchOp | None] | None = None,
                              ) -> list[_Done | None]:
        """Every message in one transaction, in order; None for a duplicate."""
        if ops is None:
            ops = [_batch_op(m) for m in messages]
        if all(op is not None for op in ops):
            # The usual batch, sets and exact clears only: the inbox claimed with the locks, the whole batch
            # in a fixed number of statements (``AlarmStore.apply_many``).
            claim = InboxClaim(self._inbox.schema, INBOX_CONSUMER, [m.envelope.id for m in messages])
            async with self._batch_connection() as conn, conn.transaction():
                done = await self.store.apply_many(conn, [op for op in ops if op is not None], inbox=claim)
            for message, result in zip(messages, done, strict=True):
                if result is None:
                    with _context(message):
                        log.info("duplicate fault message dropped", message_id=message.envelope.id)
            return list(done)
        return await self._apply_mixed(messages)

    async def _apply_mixed(self, messages: Sequence[Message]) -> list[_Done | None]:
        """Every message in one transaction, in order, the other kinds among them; None for a duplicate."""
        results: list[_Done | None] = [None] * len(messages)
        run: list[tuple[int, BatchOp]] = []

        async def flush(conn: AnyConnection) -> None:
            if run:
                for (i, _), result in zip(run, await self.store.apply_many(conn, [op for _, op in run]), strict=True):
                    results[i] = result         # (no inbox claim here: never None)
                run.clear()

        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await self._first_times(conn, [m.envelope.id for m in messages])
            for i, message in enumerate(messages):
                envelope = message.envelope
                if envelope.id not in fresh:
                    with _context(message):
                        log.info("duplicate fault message dropped", message_id=envelope.id)
                    continue
                fresh.discard(envelope.id)      # a second copy in this batch is a duplicate too
                op = _batch_op(message)
                if op is not None:
                    run.append((i, op))
                    continue
                await flush(conn)
                results[i] = await self._apply(conn, message.data, Origin.of(envelope), envelope.type)
            await flush(conn)
        return results

    async def _first_times(self, conn: AnyConnection, message_ids: Sequence[str]) -> set[str]:
        """The inbox (``Inbox.first_time``) for many messages in one statement: the ids new to it."""
        rows = await conn.fetch(
            f"""INSERT INTO {self._inbox.schema}.inbox (consumer, message_id)
                SELECT $1, m FROM unnest($2::text[]) AS m ON CONFLICT DO NOTHING RETURNING message_id""",
            INBOX_CONSUMER, list(dict.fromkeys(message_ids)))
        return {r["message_id"] for r in rows}

    async def _apply(self, conn: AnyConnection, data: BaseModel, origin: Origin, type: str) -> _Done:
        if isinstance(data, msg.FaultSet):
            return await self.store.set(conn, set_request(data), origin, repair_action=data.proposed_repair_action)
        if isinstance(data, msg.FaultClear):
            EntityInstanceId.parse(data.entity_instance_id)
            return await self.store.clear(conn, ClearRequest(alarm_id=data.alarm_id,
                                                             entity_instance_id=data.entity_instance_id,
                                                             prefix=data.prefix), origin)
        if isinstance(data, msg.FaultLog):
            EntityInstanceId.parse(data.entity_instance_id)
            return await self.store.log(conn, LogRequest(log_id=data.log_id, entity_instance_id=data.entity_instance_id,
                                                         severity=data.severity, reason_text=data.reason_text,
                                                         entity_type_id=data.entity_type_id,
                                                         timestamp=data.timestamp), origin)
        if isinstance(data, msg.FaultReassert):
            return await self.store.reassert(conn, data.scope, [set_request(f) for f in data.alarms], origin)
        raise Reject(f"{type} is not a fault message the alarms service applies")

    # -- operator commands ----------------------------------------------------------------------------

    async def command(self, message: Message) -> BaseModel:
        """``roost.cmd.alarm.*``: list, show and summary for readers; clear, suppress, unsuppress for admins
        (each recorded as a customer log in the same transaction)."""
        data = message.data
        try:
            if isinstance(data, msg.AlarmList):
                return msg.AlarmListResult(items=await self.list_alarms(data))
            if isinstance(data, msg.AlarmShow):
                return await self.show(data.uuid)
            if isinstance(data, msg.AlarmHistory):
                return await self.history(data)
            if isinstance(data, msg.AlarmSummary):
                return await self.summary(include_suppress=data.include_suppress)
            if isinstance(data, msg.AlarmClear):
                return msg.AlarmClearResult(cleared=await self.operator_clear(data.uuid, message.envelope))
            if isinstance(data, msg.AlarmSuppress):
                suppress = message.envelope.type == "roost.cmd.alarm.suppress"
                return await self.suppress(data.alarm_id, suppress, message.envelope)
            if isinstance(data, msg.WebhookAdd | msg.WebhookList | msg.WebhookRemove | msg.WebhookReplay):
                return await self.webhook_command(data)
        except (AlarmError, webhooks.SubscriptionError) as exc:
            raise Reject(str(exc)) from None
        raise Reject(f"{message.envelope.type} is not an alarm command")

    async def webhook_command(self, data: msg.WebhookAdd | msg.WebhookList | msg.WebhookRemove | msg.WebhookReplay,
                              ) -> BaseModel:
        """``roost.cmd.alarm.webhook.*``: register, list, remove subscribers and replay their dead letters."""
        if isinstance(data, msg.WebhookAdd):
            subscription, secret = await webhooks.create_subscription(
                self.pool, data.url, name=data.name, severities=data.severities, alarm_ids=data.alarm_ids,
                entity_prefix=data.entity_prefix, format=data.format, max_age=data.max_age_seconds)
            return msg.WebhookAdded(subscriber=await self._subscriber(subscription), secret=secret)
        if isinstance(data, msg.WebhookList):
            subscriptions = await webhooks.list_subscriptions(self.pool)
            depth = await webhooks.queue_depth(self.pool)
            return msg.WebhookListResult(items=[await self._subscriber(s, depth) for s in subscriptions])
        if isinstance(data, msg.WebhookRemove):
            return msg.WebhookRemoved(removed=await webhooks.delete_subscription(self.pool, data.id))
        return msg.WebhookReplayed(replayed=await webhooks.replay(self.pool, data.id))

    async def _subscriber(self, s: webhooks.Subscription, depth: dict[str, int] | None = None) -> msg.WebhookSubscriber:
        pending = (depth if depth is not None else await webhooks.queue_depth(self.pool)).get(s.id, 0)
        return msg.WebhookSubscriber(
            id=s.id, name=s.name, url=s.url, format=s.format.value, severities=sorted(s.filters.severities),
            alarm_ids=sorted(s.filters.alarm_ids), entity_prefix=s.filters.entity_prefix, max_age_seconds=s.max_age,
            failing=s.failing, failing_reason=s.failing_reason, pending=pending, created_at=s.created_at)

    async def list_alarms(self, query: msg.AlarmList) -> list[msg.ActiveAlarm]:
        """The active alarms a list shows, most severe first, then newest first."""
        active = await self.store.active(self.pool)
        suppressed = await self.store.suppressed_ids(self.pool)
        masked = masked_keys((s.alarm for s in active), self.store.catalogue)
        prefix = EntityInstanceId.parse(query.entity_prefix) if query.entity_prefix is not None else None
        shown = [s for s in active
                 if (query.include_suppress or s.alarm.alarm_id not in suppressed)
                 and (query.include_masked or s.alarm.key not in masked)
                 and (query.alarm_id is None or s.alarm.alarm_id == query.alarm_id)
                 and (query.severity is None or s.alarm.severity.value == query.severity)
                 and (prefix is None or prefix.matches(s.alarm.entity, prefix=True))]
        shown.sort(key=lambda s: (-s.alarm.severity.rank, -s.alarm.timestamp.timestamp(), s.alarm.key))
        return [_active(s, suppressed, masked) for s in shown[:query.limit]]

    async def show(self, alarm_uuid: str) -> msg.ActiveAlarm:
        wanted = _uuid(alarm_uuid)
        active = await self.store.active(self.pool)       # the masks need them all; the one shown is among them
        stored = next((s for s in active if s.alarm.uuid == wanted), None)
        if stored is None:
            raise AlarmError(f"no active alarm {alarm_uuid}")
        masked = masked_keys((s.alarm for s in active), self.store.catalogue)
        return _active(stored, await self.store.suppressed_ids(self.pool), masked)

    async def summary(self, *, include_suppress: bool = False) -> msg.AlarmSummaryResult:
        """FM's summary: the active alarms a list shows, counted by severity."""
        items = await self.list_alarms(msg.AlarmList(include_suppress=include_suppress, limit=10_000))
        counts = {sev: sum(1 for a in items if a.severity == sev) for sev in ("critical", "major", "minor", "warning")}
        status: Literal["OK", "degraded", "critical"] = (
            "critical" if counts["critical"] else "degraded" if counts["major"] or counts["minor"] else "OK")
        return msg.AlarmSummaryResult(critical=counts["critical"], major=counts["major"], minor=counts["minor"],
                                      warnings=counts["warning"], status=status)

    async def history(self, query: msg.AlarmHistory) -> msg.AlarmHistoryResult:
        """A page of the event log, newest first."""
        records = await self.store.history(
            self.pool, event_log_id=query.event_log_id, alarms=query.alarms, logs=query.logs,
            entity_prefix=query.entity_prefix, include_suppress=query.include_suppress, before=query.marker,
            limit=query.limit + 1)
        page = records[:query.limit]
        items = [msg.EventLogEntry.model_validate({
            **{f: getattr(r, f) for f in msg.EventLogEntry.model_fields if f not in ("uuid", "alarm_uuid")},
            "uuid": str(r.uuid), "alarm_uuid": str(r.alarm_uuid) if r.alarm_uuid else None}) for r in page]
        return msg.AlarmHistoryResult(items=items, next_marker=page[-1].seq if len(records) > query.limit else None)

    async def operator_clear(self, alarm_uuid: str, envelope: Envelope) -> bool:
        """An operator deletes an active alarm; False when there was none with that uuid."""
        origin = Origin.of(envelope)
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await self.store.get(conn, _uuid(alarm_uuid))
            if stored is None:
                return False
            alarm = stored.alarm
            cleared = await self.store.clear(conn, ClearRequest(alarm_id=alarm.alarm_id,
                                                                entity_instance_id=alarm.entity_instance_id),
                                             origin, cause="operator")
            if cleared:
                await self._operator_log(conn, OPERATOR_LOG, SYSTEM_ENTITY, envelope,
                                         f"cleared alarm {alarm.alarm_id} on {alarm.entity_instance_id}")
        _count(cleared)
        if cleared:
            metrics.record_log()
        return bool(cleared)

    async def suppress(self, alarm_id: str, suppressed: bool, envelope: Envelope) -> msg.AlarmSuppressResult:
        """Operator suppression of an alarm id, recorded as a customer log."""
        by = envelope.principal.name if envelope.principal is not None else envelope.source
        async with self.pool.acquire() as conn, conn.transaction():
            await self.store.set_suppressed(conn, alarm_id, suppressed, by=by)
            definition = self.store.catalogue.alarm(alarm_id)
            await self._operator_log(conn, SUPPRESSION_LOG, f"{SYSTEM_ENTITY}.alarm={definition.id}", envelope,
                                     f"{'suppressed' if suppressed else 'unsuppressed'} alarm {definition.id}")
        metrics.record_log()
        return msg.AlarmSuppressResult(alarm_id=definition.id,
                                       suppression_status="suppressed" if suppressed else "unsuppressed")

    async def _operator_log(self, conn: AnyConnection, log_id: str, entity: str, envelope: Envelope,
                            what: str) -> None:
        who = envelope.principal.name if envelope.principal is not None else envelope.source
        text = f"{who}: {what}: ok"
        await self.store.log(conn, LogRequest(log_id=log_id, entity_instance_id=entity, severity=Severity.WARNING,
                                              reason_text=text if len(text) <= 255 else text[:254] + "…"),
                             Origin.of(envelope))

    # -- other inputs ---------------------------------------------------------------------------------

    async def on_host_deleted(self, message: Message) -> None:
        """``roost.host.deleted``: clear the host's alarms and its children's, once per event."""
        data = message.data
        if not isinstance(data, HostDeleted):
            raise Reject(f"{message.envelope.type} is not a host deletion")
        name = data.hostname or data.entity_id
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._inbox.first_time(conn, INBOX_HOSTS, message.envelope.id):
                return
            cleared = await self._clear_host(conn, name, Origin.of(message.envelope))
        _count(cleared)
        log.info("alarms of a deleted host cleared", host=name, cleared=len(cleared))

    async def host_deleted(self, hostname: str, *, owner: str = "roost/inventory") -> tuple[Cleared, ...]:
        """Clear every alarm of a deleted host and of its children (``host=<hostname>`` and below)."""
        async with self.pool.acquire() as conn, conn.transaction():
            cleared = await self._clear_host(conn, hostname, Origin(owner))
        _count(cleared)
        return cleared

    async def _clear_host(self, conn: AnyConnection, hostname: str, origin: Origin) -> tuple[Cleared, ...]:
        try:
            entity = str(EntityInstanceId.parse(f"host={hostname}"))
        except AlarmError as exc:
            raise Reject(str(exc)) from None
        return await self.store.clear_entity(conn, entity, origin)

    async def purge_history(self) -> int:
        """Delete the history records older than the retention, unless another replica is at it."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RETENTION_LOCK):
                return 0
            return await self.store.purge_history(conn, self.history_retention)

    async def purge_webhooks(self) -> tuple[int, int]:
        """Delete delivered webhook deliveries older than the retention, then the notifications nothing needs
        any more, unless another replica is at it.  Returns (deliveries, notifications) deleted."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RETENTION_LOCK + 1):
                return 0, 0
            delivered = await webhooks.purge_delivered(conn, self.webhook_retention.total_seconds())
            notifications = await webhooks.purge_notifications(conn)
        return delivered, notifications

    async def refresh_metrics(self) -> None:
        """Set ``roost_alarms_active{severity}`` from the database."""
        metrics.set_active(await self.store.active_counts(self.pool))

    async def _gauge(self) -> None:
        while True:
            try:
                await self.refresh_metrics()
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("active alarm gauge not refreshed", error=str(exc))
            await asyncio.sleep(self.metrics_interval)

    async def _retain(self) -> None:
        while True:
            try:
                purged = await self.purge_history()
                if purged:
                    log.info("alarm history purged", records=purged)
                deliveries, notifications = await self.purge_webhooks()
                if deliveries or notifications:
                    log.info("webhook queue purged", deliveries=deliveries, notifications=notifications)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("alarm history purge failed; will retry", error=str(exc))
            await asyncio.sleep(self.retention_interval)
