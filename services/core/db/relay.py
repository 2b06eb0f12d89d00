"""The outbox relay: publishes committed outbox rows to the broker, at least once.

One cycle, in one database transaction:

1. lock up to ``batch_size`` pending rows (``sent_at IS NULL``, due) in ``id`` order with
   ``FOR UPDATE SKIP LOCKED``; rows another relay replica holds are skipped, so replicas side by side
   do not publish the same row (at least once overall: see the crash case below);
2. keep back any row of an ordering key that has an earlier pending row this relay does not hold
   (another replica has it, or it waits for a retry): a key's rows are never overtaken;
3. ``transport.publish_many`` the rest (the transport keeps a bounded number awaiting confirmation) and
   wait for every confirmation;
4. mark the confirmed rows sent (``sent_at``) and commit.

A relay killed between 3 and 4 leaves its rows pending: the next relay publishes them again with the
same message id (the broker may drop the duplicate by id; consumers drop it by their inbox).  Pending
rows are found by the ``sent_at IS NULL`` flag, never by an "id > last seen" watermark, so a row whose
transaction commits after a higher id was published is still found.

Order: for one ordering key (the entity, else the subject: see ``outbox.ordering_key``) the broker
receives the rows in ``id`` order, across replicas too.  If a publish fails, the rows of that key after
it in the batch are not marked sent even when confirmed: they are published again after the failed row
goes through, so the last copy of each arrives in order.  ``id`` order is the order the writers' inserts
allocated ids; writers that change one entity serialise on its row, so for one entity that is the
commit order.  Different keys have no relative order.

Waking: ``LISTEN roost_outbox_<schema>`` (the writers ``NOTIFY`` at commit), and a poll every
``poll_interval`` seconds, since a notification can be missed (listener reconnecting).

Failures: when the broker is down (transport disconnected, or nothing in a batch confirmed) the relay
backs off exponentially up to ``max_backoff`` and the rows stay pending.  A row that fails while others
in its batch are confirmed is retried on its own schedule (``available_at``, exponential up to
``max_row_delay``) with ``attempts`` and ``last_error`` recorded; only its own key waits for it.
When the database is unreachable the relay backs off the same way and takes new connections (and
LISTENs again) once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import structlog

from services.core.bus.abc import H_TYPE, OutgoingMessage, Transport
from services.core.db.migrations import check_schema
from services.core.db.outbox import OutboxRow, notify_channel
from services.core.failpoints import failpoint

log = structlog.get_logger("roost.db.relay")


class PublishObserver(Protocol):
    """Where the relay reports each publish (the ``BusObserver`` of ``bus.py`` fits)."""

    def published(self, type: str, outcome: str, seconds: float) -> None: ...


# -- pure logic ------------------------------------------------------------------------------------


def publishable(locked: Sequence[OutboxRow], earlier_elsewhere: Mapping[str, int]) -> list[OutboxRow]:
    """The rows this relay may publish now, in id order; pure.

    ``locked``: the rows this relay holds.  ``earlier_elsewhere``: per ordering key, the lowest id of a
    pending row of that key this relay does not hold.  A row may go only if no such row precedes it.
    """
    return [row for row in sorted(locked, key=lambda r: r.id)
            if row.ordering_key not in earlier_elsewhere or row.id < earlier_elsewhere[row.ordering_key]]


@dataclass(frozen=True, slots=True)
class Settlement:
    sent: list[int]                              # confirmed: mark sent
    failed: list[tuple[OutboxRow, str]]          # not confirmed: retry later, with the error
    held_back: list[int]                         # confirmed, but after a failed row of their key


def settle(rows: Sequence[OutboxRow], results: Sequence[BaseException | None]) -> Settlement:
    """What to record after ``publish_many(rows)`` returned ``results``; pure."""
    if len(rows) != len(results):
        raise ValueError(f"{len(results)} results for {len(rows)} published rows")
    broken: set[str] = set()
    sent: list[int] = []
    failed: list[tuple[OutboxRow, str]] = []
    held: list[int] = []
    for row, result in sorted(zip(rows, results, strict=True), key=lambda p: p[0].id):
        if result is not None:
            failed.append((row, describe(result)))
            broken.add(row.ordering_key)
        elif row.ordering_key in broken:
            held.append(row.id)
        else:
            sent.append(row.id)
    return Settlement(sent, failed, held)


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff(failures: int, *, base: float, cap: float) -> float:
    """Exponential delay after ``failures`` consecutive failures (1 -> base); pure."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * (2 ** min(failures - 1, 32))))


# -- the relay -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayLag:
    """How far behind publication is, measured at ``measured_at`` (UNIX time)."""

    pending: int                       # rows written, not yet confirmed and marked sent
    oldest_created_at: float | None    # UNIX time the oldest of them was written; None when none
    measured_at: float

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds since the oldest pending row was written (0 when none); pure given ``now``."""
        if self.oldest_created_at is None or not self.pending:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.oldest_created_at)


@dataclass
class RelayStats:
    """Counters for metrics; plain attributes, updated as the relay works."""

    published: int = 0                     # rows confirmed and marked sent
    failed: int = 0                        # publish attempts the broker did not confirm
    batches: int = 0                       # cycles that published something
    consecutive_failures: int = 0          # cycles in a row that hit broker or database trouble
    last_success: float | None = None      # time.time() of the last cycle that marked rows sent
    last_error: str | None = None


class OutboxRelay:
    """Publishes ``<schema>.outbox``.  ``await run()`` in a task; ``await stop()`` to end it."""

    def __init__(self, pool: asyncpg.Pool, transport: Transport, schema: str = "core", *,
                 batch_size: int = 200, poll_interval: float = 1.0, publish_timeout: float = 10.0,
                 min_backoff: float = 0.2, max_backoff: float = 10.0, min_row_delay: float = 1.0,
                 max_row_delay: float = 60.0, lag_interval: float = 5.0,
                 observer: PublishObserver | None = None) -> None:
        self.pool = pool
        self.transport = transport
        self.schema = check_schema(schema)
        self.channel = notify_channel(schema)
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.publish_timeout = publish_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.min_row_delay = min_row_delay
        self.max_row_delay = max_row_delay
        self.observer = observer
        self.lag_interval = lag_interval
        self.stats = RelayStats()
        self.last_lag: RelayLag | None = None        # refreshed every ``lag_interval`` s while running
        self._lag_measured = -float("inf")
        self.started = asyncio.Event()               # set once run() has tried to LISTEN and relayed once
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._flush_deadline: float | None = None
        self._listener: asyncpg.pool.PoolConnectionProxy | None = None
        t = f"{self.schema}.outbox"
        self._select = f"""
            SELECT id, message_id, subject, ordering_key, headers::text AS headers, body, attempts
            FROM {t} AS o
            WHERE o.sent_at IS NULL AND o.available_at <= now()
              AND NOT EXISTS (SELECT 1 FROM {t} AS w
                              WHERE w.ordering_key = o.ordering_key AND w.sent_at IS NULL
                                AND w.id < o.id AND w.available_at > now())
            ORDER BY o.id
            LIMIT $1
            FOR UPDATE SKIP LOCKED"""
        self._earlier = f"""
            SELECT ordering_key, min(id) AS id FROM {t}
            WHERE sent_at IS NULL AND ordering_key = ANY($1::text[]) AND NOT (id = ANY($2::bigint[]))
            GROUP BY ordering_key"""
        self._mark_sent = f"""
            UPDATE {t} SET sent_at = clock_timestamp(), attempts = attempts + 1, last_error = NULL
            WHERE id = ANY($1::bigint[])"""
        self._mark_failed = f"""
            UPDATE {t} AS o SET attempts = o.attempts + 1, last_error = f.error,
                                available_at = clock_timestamp() + make_interval(secs => f.delay)
            FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, error, delay)
            WHERE o.id = f.id"""
        self._lag = f"""
            SELECT count(*) AS pending, extract(epoch FROM min(created_at))::float8 AS oldest,
                   extract(epoch FROM clock_timestamp())::float8 AS now
            FROM {t} WHERE sent_at IS NULL"""

    # -- metrics -----------------------------------------------------------------------------------

    async def lag(self) -> RelayLag:
        """Measure the lag now (one query) and keep it as ``last_lag``."""
        row = await self.pool.fetchrow(self._lag)
        assert row is not None
        self.last_lag = RelayLag(pending=int(row["pending"]), oldest_created_at=row["oldest"],
                                 measured_at=float(row["now"]))
        self._lag_measured = time.monotonic()
        return self.last_lag

    async def _refresh_lag(self) -> None:
        if time.monotonic() - self._lag_measured < self.lag_interval:
            return
        try:
            async with asyncio.timeout(self.poll_interval + 1.0):
                await self.lag()
        except Exception as exc:
            self._lag_measured = time.monotonic()
            log.debug("outbox lag not measured", schema=self.schema, error=describe(exc))

    # -- one cycle ---------------------------------------------------------------------------------

    async def relay_once(self) -> int:
        """Publish one batch; returns how many rows it marked sent.

        Raises when the broker or the database is in trouble (nothing is lost: rows stay pending).
        Returns -1 when rows were selected but none could go (their key waits elsewhere).
        """
        async with self.pool.acquire(timeout=self.publish_timeout) as conn, conn.transaction():
            records = await conn.fetch(self._select, self.batch_size)
            if not records:
                return 0
            locked = [OutboxRow.from_record(r) for r in records]
            keys = sorted({r.ordering_key for r in locked})
            earlier = {r["ordering_key"]: r["id"]
                       for r in await conn.fetch(self._earlier, keys, [r.id for r in locked])}
            rows = publishable(locked, earlier)
            if not rows:
                return -1
            messages = [row.to_message() for row in rows]
            started = time.perf_counter()
            results = await self.transport.publish_many(messages, timeout=self.publish_timeout)
            self._observe(messages, results, time.perf_counter() - started)
            outcome = settle(rows, results)
            if not outcome.sent and not outcome.held_back:
                # Nothing confirmed at all: the broker is in trouble, not these rows.
                raise BrokerTrouble(outcome.failed[0][1] if outcome.failed else "no confirmation")
            failpoint("relay.after_confirm")
            if outcome.sent:
                await conn.execute(self._mark_sent, outcome.sent)
            if outcome.failed:
                await conn.execute(
                    self._mark_failed, [row.id for row, _ in outcome.failed], [err for _, err in outcome.failed],
                    [backoff(row.attempts + 1, base=self.min_row_delay, cap=self.max_row_delay)
                     for row, _ in outcome.failed])
                for row, err in outcome.failed:
                    log.warning("outbox row not confirmed; will retry", schema=self.schema, row=row.id,
                                message_id=row.message_id, subject=row.subject, attempts=row.attempts + 1,
                                error=err)
        self.stats.published += len(outcome.sent)
        self.stats.failed += len(outcome.failed)
        self.stats.batches += 1
        self.stats.last_success = time.time()
        return len(outcome.sent)

    def _observe(self, messages: Sequence[OutgoingMessage], results: Sequence[BaseException | None],
                 seconds: float) -> None:
        if self.observer is None:
            return
        each = seconds / max(1, len(messages))
        for message, result in zip(messages, results, strict=False):
            self.observer.published(message.headers.get(H_TYPE, "unknown"),
                                    "confirmed" if result is None else "failed", each)

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until ``stop()``; survives broker and database outages (backing off)."""
        if self._running:
            raise RuntimeError("this relay is already running")
        self._running = True
        self._task = asyncio.current_task()
        self._stopped.clear()
        try:
            await self._loop()
        finally:
            await self._unlisten()
            self._running = False
            self._task = None
            self._stopped.set()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._listen()
            except Exception as exc:          # never let the relay die of a listener problem
                log.warning("outbox relay cannot listen; polling", schema=self.schema, error=describe(exc))
            self._wake.clear()
            published = await self._cycle()
            await self._refresh_lag()
            self.started.set()
            if published is None:
                delay = backoff(self.stats.consecutive_failures, base=self.min_backoff, cap=self.max_backoff)
                await self._pause(delay, wake_on_notify=False)
            elif published < self.batch_size:
                # Without a listener, poll (and try to listen again) at least every second.
                interval = self.poll_interval if self.listening else min(self.poll_interval, 1.0)
                await self._pause(interval, wake_on_notify=True)
        if self._flush_deadline is not None and self._flush_deadline > asyncio.get_running_loop().time():
            await self._flush_until(self._flush_deadline)

    async def _cycle(self) -> int | None:
        """One batch; None when it hit trouble (counted, logged)."""
        error: str | None = None
        if not self.transport.connected:
            error = f"transport {self.transport.name} not connected"
        else:
            try:
                published = await self.relay_once()
            except TimeoutError:
                error = "timed out"
            except _DATABASE_ERRORS as exc:
                error = f"database: {describe(exc)}"
            except Exception as exc:
                error = f"publish: {describe(exc)}"
        if error is not None:
            self._trouble(error)
            return None
        if self.stats.consecutive_failures:
            log.info("outbox relay recovered", schema=self.schema, after_failures=self.stats.consecutive_failures)
        self.stats.consecutive_failures = 0
        self.stats.last_error = None
        return max(published, 0)

    def _trouble(self, error: str) -> None:
        self.stats.consecutive_failures += 1
        self.stats.last_error = error
        if self.stats.consecutive_failures in (1, 10) or self.stats.consecutive_failures % 100 == 0:
            log.warning("outbox relay cannot publish; rows stay pending", schema=self.schema, error=error,
                        consecutive_failures=self.stats.consecutive_failures)

    async def _pause(self, seconds: float, *, wake_on_notify: bool) -> None:
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake_on_notify:
            waits.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    @property
    def listening(self) -> bool:
        """Whether a connection LISTENs for the writers' notifications (else the relay only polls)."""
        return self._listener is not None and _alive(self._listener)

    async def _listen(self) -> None:
        """Hold a connection that LISTENs on the outbox channel (again, if it was lost)."""
        if self.listening:
            return
        await self._unlisten()
        try:
            conn = await self.pool.acquire(timeout=self.poll_interval)
        except Exception as exc:
            log.debug("outbox relay cannot listen; polling", schema=self.schema, error=describe(exc))
            return
        try:
            await conn.add_listener(self.channel, self._notified)
            conn.add_termination_listener(self._lost)
        except Exception as exc:
            log.debug("outbox relay cannot listen; polling", schema=self.schema, error=describe(exc))
            await self._release(conn)
            return
        self._listener = conn

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None or not _alive(conn):
            return          # a lost connection: asyncpg's pool has taken it back already
        with contextlib.suppress(Exception):
            conn.remove_termination_listener(self._lost)
            await conn.remove_listener(self.channel, self._notified)
        await self._release(conn)

    async def _release(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        with contextlib.suppress(Exception):
            await self.pool.release(conn, timeout=self.poll_interval)

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._wake.set()

    def _lost(self, conn: Any) -> None:
        """The listening connection died: wake the loop to listen again (and poll meanwhile)."""
        self._wake.set()

    # -- stopping ----------------------------------------------------------------------------------

    async def flush(self, timeout: float = 10.0) -> int:
        """Publish what is pending (and this relay can take) within ``timeout``; returns how many."""
        return await self._flush_until(asyncio.get_running_loop().time() + timeout)

    async def _flush_until(self, deadline: float) -> int:
        total = 0
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    published = await self._cycle()
                    if published is None:
                        delay = backoff(self.stats.consecutive_failures, base=self.min_backoff,
                                        cap=self.max_backoff)
                        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                        continue
                    total += published
                    if published == 0:
                        return total
        except TimeoutError:
            lag = await self._lag_or_none()
            log.warning("outbox flush ran out of time; rows stay pending for the next relay", schema=self.schema,
                        published=total, pending=lag.pending if lag else None)
        return total

    async def _lag_or_none(self) -> RelayLag | None:
        try:
            async with asyncio.timeout(2.0):
                return await self.lag()
        except Exception:
            return None

    async def stop(self, flush: bool = True, timeout: float = 10.0) -> None:
        """Stop relaying.  With ``flush``, first publish what is pending, for at most ``timeout`` seconds.

        Rows left pending are published by the next relay; nothing is lost either way.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._flush_deadline = deadline if flush else None
        self._stopping.set()
        if not self._running:
            if flush:
                await self._flush_until(deadline)
            return
        try:
            async with asyncio.timeout_at(deadline + 2.0):
                await self._stopped.wait()
        except TimeoutError:
            log.warning("outbox relay did not stop in time; cancelling it", schema=self.schema)
            task = self._task
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class BrokerTrouble(Exception):
    """No row of a batch was confirmed."""


_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)


def _alive(conn: asyncpg.pool.PoolConnectionProxy) -> bool:
    """Whether a pooled connection is still usable (asyncpg detaches the proxy of a lost one)."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
