"""The webhook dispatcher: sends queued deliveries, in order per (subscription, alarm instance), at least once.

The fan-out (``store.fan_out``) runs in a task of its own, on a connection of its own (its short wait for
the writers' lock never holds up the sending), when a notification was announced, when deliveries made
room, or at the poll: it turns notifications into delivery rows, only ``ahead`` (128) pending rows per
subscription ahead of the sending (the notifications beyond stay durably queued behind the
subscription's cursor; a dead subscriber costs no rows per alarm).  Each cycle of the sending loop:
(a) the outcomes of the requests that succeeded since the last cycle, written in one statement; (b) one
claim, in one statement (no lock is held while a request is in flight), for as many requests as there
are free slots:

1. per subscription not paused, only its ``window`` oldest pending rows are looked at (the queue index
   ``(subscription_id, id + 0)`` of pending rows, read in an order no other index gives, so that no statistics
   can make the planner walk the delivered rows instead: the cost grows with neither the backlog nor the
   history); among them, the deliveries that may go now: due (``available_at``), not claimed by a live lease,
   and the *head* of their (subscription, alarm instance): no earlier pending row of the same pair (one that
   is in flight elsewhere or waiting for a retry keeps the later ones back: a later notification of an alarm
   never overtakes an earlier one at a subscriber);
2. at most ``per_subscription`` in flight per subscription (counted across replicas by live leases),
   so one slow or dead subscriber occupies a few slots and the others keep flowing;
3. lock those rows ``FOR UPDATE SKIP LOCKED`` (replicas never take the same row) and stamp them with a
   claim token and a lease (``claimed_until``, longer than the request timeout).

The body: a row made by the fan-out points at its notification, whose roost-format body is sent as is,
or rendered in Alertmanager's format for such a subscriber (the same bytes at every attempt); a row
queued before the fan-out existed carries its own body.

Each claimed row is then sent by its own task: ``POST`` with the Standard Webhooks headers (signed at
this attempt with every current secret of the subscription, ``webhook-id`` = the notification id,
unchanged across retries and replays), bounded by ``timeout`` end to end.  The outcome is written only
if the claim still holds:

* 2xx: delivered (latency from enqueue observed);
* network error, timeout, 408, 429, 3xx, 5xx: retried after ``Retry-After`` when the answer carries one
  (seconds or an HTTP date, capped by ``max_retry_after``), else exponential backoff with full jitter
  (``uniform(0, min(max_backoff, min_backoff * 2**(attempt-1)))``), the last attempt at the max age;
* any other 4xx: dead-lettered at once (the receiver refuses this request; a retry would not help);
* circuit breaker: a retryable failure also pauses the whole subscription for that delay
  (``paused_until``) and counts a failure in a row for the endpoint; the backoff of its next failure
  grows with that count, so a dead endpoint is probed ``per_subscription`` requests at a time at a
  falling rate instead of once per queued alarm; a 2xx resets the count;
* a retryable failure once the delivery is older than the subscription's ``max_age``: dead-lettered.

A dead letter marks the subscription failing and calls ``on_subscription_failing(subscription_id,
reason)`` once, when it turns failing (the alarms service raises its "webhook subscriber failing"
alarm); a later 2xx with no dead letter left turns it back and calls ``on_subscription_recovered``.
``store.replay`` re-queues dead letters.

A dispatcher that dies mid-request records nothing: its leases expire and another (or the restarted)
dispatcher sends those rows again with the same ``webhook-id``: receivers drop the duplicate by id.
``stop()`` is the graceful path: it lets requests in flight finish for ``grace`` seconds, then cancels
the rest and releases their claims so they go again at once.

Waking: ``LISTEN roost_webhooks_alarms`` (``enqueue`` and ``replay`` notify at commit, and so does a
delivery that has a later row of its alarm waiting, so every replica looks), the end of any of our
requests, and the next due retry or lease expiry, with ``poll_interval`` as the longest sleep (a
notification can be missed).  Requests that end while the loop is busy are handled together in its next
cycle: the cost in the database is per cycle, not per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import asyncpg.pool
import structlog

from services.alarms.webhooks import metrics
from services.alarms.webhooks.formats import AlarmFields, EventKind, Format, Notification, render
from services.alarms.webhooks.http import HttpClient, HttpProtocolError
from services.alarms.webhooks.signing import sign_headers
from services.alarms.webhooks.store import (
    DELIVERIES,
    NOTIFICATIONS,
    NOTIFY_CHANNEL,
    SUBSCRIPTIONS,
    fan_out_once,
    queue_depth,
)
from services.core.db.pool import plan_per_call
from services.core.logging import register_secret

log = structlog.get_logger("roost.alarms.webhooks")

SubscriptionHook = Callable[[str, str], Awaitable[None]]
State = Literal["delivered", "retry", "dead"]
USER_AGENT = "roost-webhooks/1"
DELIVERED_PAYLOAD = "delivered"          # the NOTIFY payload of deliveries that left more rows waiting
MAX_ANSWER_BYTES = 64 * 1024


# -- pure policy ----------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or an HTTP date); None if absent/bad; pure."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff after the ``attempt``-th failed attempt (1-based); pure given ``rng``."""
    ceiling = min(cap, base * (2 ** min(max(attempt, 1) - 1, 40)))
    return rng.uniform(0.0, ceiling)


def retryable(status: int) -> bool:
    """Whether an HTTP answer (not 2xx) is worth another attempt; pure."""
    return status in (408, 429) or status >= 500 or 300 <= status < 400


@dataclass(frozen=True, slots=True)
class Outcome:
    state: State
    reason: str = ""
    delay: float = 0.0                   # for a retry: seconds from now
    max_age_reached: bool = False


def decide(status: int | None, retry_after: str | None, error: str | None, *, attempts: int, age: float,
           max_age: float, min_backoff: float, max_backoff: float, max_retry_after: float, now: float,
           rng: random.Random) -> Outcome:
    """What to do after an attempt: ``status`` (None when ``error`` says why there is no answer),
    ``attempts``: failures so far, this one included (of the row, or of its endpoint in a row, whichever
    is more), ``age`` of the delivery in seconds; pure given ``rng``."""
    if status is not None and 200 <= status < 300:
        return Outcome("delivered")
    if status is not None and not retryable(status):
        return Outcome("dead", f"HTTP {status}: refused by the receiver, not retried")
    reason = error if status is None else f"HTTP {status}"
    remaining = max_age - age
    if remaining <= 0:
        return Outcome("dead", f"max age {max_age:g}s reached after {attempts} attempt(s), last: {reason}",
                       max_age_reached=True)
    wait = parse_retry_after(retry_after, now) if status is not None else None
    if wait is not None:
        return Outcome("retry", f"{reason} (Retry-After {wait:g}s)", delay=min(wait, max_retry_after))
    delay = backoff_delay(attempts, base=min_backoff, cap=max_backoff, rng=rng)
    return Outcome("retry", reason or "failed", delay=min(delay, remaining))


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


# -- the dispatcher -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DispatcherSettings:
    timeout: float = 10.0                # one request, end to end
    lease: float | None = None           # claim lifetime; default timeout + 30 s; must exceed timeout
    per_subscription: int = 32           # requests in flight per subscription (all replicas)
    max_in_flight: int = 128             # requests in flight in this dispatcher
    min_backoff: float = 1.0
    max_backoff: float = 3600.0
    max_retry_after: float = 6 * 3600.0
    poll_interval: float = 5.0
    depth_interval: float = 15.0
    grace: float = 5.0                   # stop(): how long requests in flight may finish
    db_backoff: float = 1.0              # wait after a database error in the claim loop
    window: int = 256                    # oldest pending rows per subscription a claim looks at
    ahead: int | None = 128              # fan-out: pending delivery rows made ahead per subscription (None: all)
    linger: float = 0.01                 # at least this long between the starts of two cycles (0: none)

    @property
    def effective_lease(self) -> float:
        return self.lease if self.lease is not None else self.timeout + 30.0

    def check(self) -> DispatcherSettings:
        if self.timeout <= 0 or self.effective_lease <= self.timeout:
            raise ValueError("webhook dispatcher: need timeout > 0 and lease > timeout")
        if self.per_subscription < 1 or self.max_in_flight < 1:
            raise ValueError("webhook dispatcher: per_subscription and max_in_flight must be at least 1")
        if self.linger < 0 or self.linger >= self.poll_interval:
            raise ValueError("webhook dispatcher: need 0 <= linger < poll_interval")
        if self.window < self.per_subscription:
            raise ValueError("webhook dispatcher: window must be at least per_subscription")
        if self.ahead is not None and self.ahead < self.per_subscription:
            raise ValueError("webhook dispatcher: ahead must be at least per_subscription (or None)")
        return self


@dataclass(slots=True)
class Job:
    id: int
    subscription_id: str
    webhook_id: str
    body: bytes
    attempts: int
    age: float
    url: str
    secrets: list[str] = field(repr=False)
    max_age: float
    failing: bool
    token: uuid.UUID
    endpoint_failures: int = 0           # the subscription's consecutive retryable failures at claim time


@dataclass(slots=True)
class Done:
    """A request that got a 2xx, its outcome not written yet (the loop writes many at once)."""

    job: Job
    status: int


def alertmanager_body(roost_body: bytes, receiver: str) -> bytes:
    """The Alertmanager rendering of a notification from its roost-format body; pure (same bytes each time)."""
    payload = json.loads(roost_body)
    data = payload["data"]
    notification = Notification(id=data["id"], event=EventKind(data["event"]), version=data["version"],
                                occurred_at=payload["timestamp"], alarm=AlarmFields.model_validate(data["alarm"]))
    return render(notification, Format.ALERTMANAGER, receiver=receiver)


@dataclass
class DispatcherStats:
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    lost_claims: int = 0                 # outcomes not written: the lease had expired and was taken
    cycles: int = 0                      # claim cycles run (the loop wakes on work, not on a timer)
    fanned_out: int = 0                  # delivery rows this dispatcher's fan-outs made
    fan_outs: int = 0                    # fan-outs run (each one or more statements)


# One claim, one statement: the window of each subscription not paused (its oldest pending rows, by the queue
# index: ordered by ``id + 0``, which only that index gives, so that stale statistics never make it walk the
# primary key through the delivered rows; migration 0103), the heads of their alarm instances that are due and
# free, at most per_subscription in flight (live leases in the window), locked SKIP LOCKED and stamped; then one
# row saying when to look again without being woken: the next retry that comes due or lease that runs out in a
# window, or pause that ends. Rows due but not claimed wait behind an earlier row of their alarm or a full
# subscription: the end of that request wakes us (another replica's: the poll).  Counting them would make the
# loop spin.
_CLAIM = f"""
    WITH win AS (
        SELECT w.id, w.subscription_id, w.available_at, w.claimed_until,
               row_number() OVER (PARTITION BY w.subscription_id, w.ordering_key ORDER BY w.id) AS key_rank
        FROM {SUBSCRIPTIONS} s
        CROSS JOIN LATERAL (
            SELECT d.id, d.subscription_id, d.ordering_key, d.available_at, d.claimed_until FROM {DELIVERIES} d
            WHERE d.subscription_id = s.id AND d.state = 'pending' ORDER BY d.id + 0 LIMIT $4) w
        WHERE s.paused_until IS NULL OR s.paused_until <= now()),
    busy AS (
        SELECT subscription_id, count(*) FILTER (WHERE claimed_until > now()) AS n FROM win GROUP BY subscription_id),
    ready AS (
        SELECT w.id, row_number() OVER (PARTITION BY w.subscription_id ORDER BY w.id) + b.n AS slot
        FROM win w JOIN busy b USING (subscription_id)
        WHERE w.key_rank = 1 AND w.available_at <= now() AND (w.claimed_until IS NULL OR w.claimed_until <= now())),
    pick AS (
        SELECT d.id FROM {DELIVERIES} d
        WHERE d.id IN (SELECT id FROM ready WHERE slot <= $1 ORDER BY id LIMIT $2) AND d.state = 'pending'
          AND (d.claimed_until IS NULL OR d.claimed_until <= now())
        FOR UPDATE SKIP LOCKED),
    claimed AS (
        UPDATE {DELIVERIES} AS d
        SET claim_token = $3, claimed_until = clock_timestamp() + make_interval(secs => $5)
        FROM {SUBSCRIPTIONS} AS s
        WHERE d.id IN (SELECT id FROM pick) AND s.id = d.subscription_id
        RETURNING d.id, d.subscription_id, d.webhook_id, d.body, d.notification_seq, d.attempts,
                  extract(epoch FROM clock_timestamp() - d.created_at)::float8 AS age,
                  s.url, s.secrets, s.max_age_seconds, s.failing, s.consecutive_failures, s.format, s.name)
    SELECT c.id, c.subscription_id, c.webhook_id, coalesce(c.body, n.body) AS body, c.body IS NULL AS rendered,
           c.attempts, c.age, c.url, c.secrets, c.max_age_seconds, c.failing, c.consecutive_failures, c.format,
           c.name, NULL::float8 AS due
    FROM claimed c LEFT JOIN {NOTIFICATIONS} n ON n.seq = c.notification_seq
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           extract(epoch FROM least(
               (SELECT min(available_at) FROM win WHERE claimed_until IS NULL AND available_at > now()),
               (SELECT min(claimed_until) FROM win WHERE claimed_until IS NOT NULL),
               (SELECT min(paused_until) FROM {SUBSCRIPTIONS} WHERE paused_until > now())
           ) - clock_timestamp())::float8"""

# Many 2xx at once: delivered; the latency of each; NOTIFY when one of those subscriptions has more rows
# waiting (a later row of the same alarm may be among them), so that every replica looks, not only us.  (A
# scalar subquery, not EXISTS: PostgreSQL drops an EXISTS subquery's ORDER BY, and with it the queue index.)
_DELIVERED_MANY = f"""
    WITH upd AS (
        UPDATE {DELIVERIES} AS d
        SET state = 'delivered', delivered_at = clock_timestamp(), attempts = d.attempts + 1, last_status = v.status,
            last_error = NULL, claim_token = NULL, claimed_until = NULL
        FROM unnest($1::bigint[], $2::uuid[], $3::int[]) AS v(id, token, status)
        WHERE d.id = v.id AND d.claim_token = v.token AND d.state = 'pending'
        RETURNING d.id, d.subscription_id, extract(epoch FROM d.delivered_at - d.created_at)::float8 AS latency),
    waiting AS (
        SELECT pg_notify($4, $5) FROM (SELECT DISTINCT subscription_id FROM upd) u
        WHERE (SELECT d.id FROM {DELIVERIES} d
               WHERE d.subscription_id = u.subscription_id AND d.state = 'pending' AND d.id <> ALL($1::bigint[])
               ORDER BY d.id + 0 LIMIT 1) IS NOT NULL
        LIMIT 1)
    SELECT u.id, u.latency, (SELECT count(*) FROM waiting) AS notified FROM upd u"""

# Retry: the row waits ``delay``, and so does its whole subscription (circuit breaker: an endpoint that
# fails is not tried with every other alarm's delivery meanwhile).
_RETRY = f"""
    WITH d AS (
        UPDATE {DELIVERIES} SET attempts = attempts + 1, last_status = $3, last_error = $4,
                                available_at = clock_timestamp() + make_interval(secs => $5),
                                claim_token = NULL, claimed_until = NULL
        WHERE id = $1 AND claim_token = $2 AND state = 'pending' RETURNING id, subscription_id),
    s AS (
        UPDATE {SUBSCRIPTIONS} AS s
        SET consecutive_failures = s.consecutive_failures + 1,
            paused_until = greatest(s.paused_until, clock_timestamp() + make_interval(secs => $5))
        FROM d WHERE s.id = d.subscription_id RETURNING s.id)
    SELECT id FROM d"""

_RESET_BREAKER = f"""
    UPDATE {SUBSCRIPTIONS} SET consecutive_failures = 0, paused_until = NULL
    WHERE id = $1 AND (consecutive_failures > 0 OR paused_until IS NOT NULL)"""

_DEAD = f"""
    UPDATE {DELIVERIES} SET state = 'dead', dead_at = clock_timestamp(), attempts = attempts + 1,
                            last_status = $3, last_error = $4, claim_token = NULL, claimed_until = NULL
    WHERE id = $1 AND claim_token = $2 AND state = 'pending' RETURNING id"""

_MARK_FAILING = f"""
    UPDATE {SUBSCRIPTIONS} SET failing = true, failing_reason = $2, failing_since = clock_timestamp()
    WHERE id = $1 AND NOT failing RETURNING id"""

_MARK_RECOVERED = f"""
    UPDATE {SUBSCRIPTIONS} AS s SET failing = false, failing_reason = NULL, failing_since = NULL
    WHERE s.id = $1 AND s.failing
      AND NOT EXISTS (SELECT 1 FROM {DELIVERIES} d WHERE d.subscription_id = s.id AND d.state = 'dead')
    RETURNING s.id"""

_RELEASE = f"""
    UPDATE {DELIVERIES} SET claim_token = NULL, claimed_until = NULL
    WHERE id = ANY($1::bigint[]) AND claim_token = $2 AND state = 'pending'"""


class WebhookDispatcher:
    """Sends ``alarms.webhook_deliveries``.  ``start()`` (or ``await run()`` in a task); ``await stop()``.

    Several dispatchers (replicas) may run on one database.  ``client`` is an ``HttpClient``
    (``services.alarms.webhooks.http``) to use for every subscription (otherwise one is created per
    subscription, and closed at the end).
    """

    def __init__(self, pool: asyncpg.Pool, settings: DispatcherSettings | None = None, *,
                 on_subscription_failing: SubscriptionHook | None = None,
                 on_subscription_recovered: SubscriptionHook | None = None,
                 client: HttpClient | None = None, rng: random.Random | None = None) -> None:
        self.pool = pool
        self.settings = (settings or DispatcherSettings()).check()
        self.on_subscription_failing = on_subscription_failing
        self.on_subscription_recovered = on_subscription_recovered
        self.stats = DispatcherStats()
        self._client = client
        self._clients: dict[str, HttpClient] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], Job] = {}
        self._listener: asyncpg.pool.PoolConnectionProxy | None = None
        self._depth_at = -float("inf")
        self._task: asyncio.Task[None] | None = None
        self._announced = True           # a notification may wait for the fan-out (at start: look)
        self._windows_full = True        # the last fan-out left a cursor behind for want of room (at start: may)
        self._fan_wake = asyncio.Event()
        self._fanning: asyncio.Task[None] | None = None
        self._delivered: list[Done] = []
        self._rendered: dict[tuple[str, int], bytes] = {}

    # -- lifecycle --

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="webhook-dispatcher")
        return self._task

    async def stop(self) -> None:
        """Graceful: no new claims; requests in flight get ``grace`` seconds; the rest are released."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> WebhookDispatcher:
        """``async with WebhookDispatcher(...) as d``: started for the block, stopped (gracefully) after it."""
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._fanning = asyncio.create_task(self._fan_out_loop(), name="webhook-fan-out")
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                self.stats.cycles += 1
                cycle_started = loop.time()
                await self._ensure_listening()
                sleep = self.settings.poll_interval
                try:
                    if await self._record_delivered() and self.settings.ahead is not None and self._windows_full:
                        self._fan_out_soon()         # room in a full window again: make the next rows
                    free = self.settings.max_in_flight - len(self._inflight)
                    if free > 0:
                        jobs, due = await self._claim(free)
                        for job in jobs:
                            task = asyncio.create_task(self._deliver(job), name=f"webhook-{job.id}")
                            self._inflight[task] = job
                            task.add_done_callback(self._done)
                        if due is not None:
                            sleep = min(sleep, max(0.0, due) + 0.005)
                    if loop.time() - self._depth_at >= self.settings.depth_interval:
                        self._depth_at = loop.time()
                        depth = await queue_depth(self._db())
                        metrics.set_queue_depth(depth)
                        for gone in set(self._clients) - set(depth):     # subscriptions removed since
                            self._closing.add(asyncio.create_task(self._clients.pop(gone).aclose()))
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    log.warning("webhook dispatcher: database trouble, retrying", error=describe(exc))
                    sleep = self.settings.db_backoff
                    self._fan_out_soon()
                if self._delivered:
                    sleep = 0.0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._wake.wait()
                # Woken again right after a cycle (a request ended, rows were fanned out): let what follows
                # gather for the rest of ``linger``, so that one claim and one outcome statement serve them
                # all.  Each claim costs the database about the same however few rows it takes (its window
                # of every subscription, sorted): woken per request at 1,000 deliveries/s, the claims alone
                # kept a fifth of a core of PostgreSQL busy.
                rest = cycle_started + self.settings.linger - loop.time()
                if rest > 0 and not self._stopping.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(rest):
                            await self._stopping.wait()
            await self._finish_gracefully()
        finally:
            # Reached by stop() after the graceful part, or when this task is cancelled (a crash, as far as
            # the queue is concerned: claims are left to expire, nothing is written).
            if self._fanning is not None:
                self._fanning.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._fanning
            for task in list(self._inflight):
                task.cancel()
            if self._inflight:
                await asyncio.gather(*self._inflight, return_exceptions=True)
            await self._unlisten()
            clients, self._clients = list(self._clients.values()), {}
            for client in clients:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _finish_gracefully(self) -> None:
        if self._inflight:
            await asyncio.wait(list(self._inflight), timeout=self.settings.grace)
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            await self._record_delivered()
        left = [(task, job) for task, job in self._inflight.items() if not task.done()]
        for task, _ in left:
            task.cancel()
        if left:
            await asyncio.gather(*(t for t, _ in left), return_exceptions=True)
            by_token: dict[uuid.UUID, list[int]] = {}
            for _, job in left:
                by_token.setdefault(job.token, []).append(job.id)
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                for token, ids in by_token.items():
                    await self.pool.execute(_RELEASE, ids, token)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook delivery task failed", error=describe(task.exception()))  # type: ignore[arg-type]
        self._wake.set()

    def _db(self) -> asyncpg.Pool | asyncpg.pool.PoolConnectionProxy:
        """Where the loop runs its statements: the connection it listens on (held: no round trip to take a
        connection from the pool and reset it after each statement), else the pool."""
        return self._listener if self._listening() and self._listener is not None else self.pool

    def _listening(self) -> bool:
        if self._listener is None:
            return False
        try:
            return not self._listener.is_closed()
        except asyncpg.InterfaceError:  # the pool took the broken connection back
            return False

    async def _ensure_listening(self) -> None:
        if self._listening():
            return
        await self._unlisten()
        try:
            conn = await self.pool.acquire()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            return
        try:
            # the connections the dispatcher holds (this one, where claims and outcomes run, and the fan-out's)
            # plan for the queue as it is: a generic plan made on a nearly empty queue read the whole table at
            # every claim as a storm's rows piled up (the bench: p99 1.5-2.7 s at 1,000 alarms/s, 0.1 s with this)
            await plan_per_call(conn)
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            await self.pool.release(conn)
            return
        self._listener = conn

    def _notified(self, connection: Any, pid: int, channel: str, payload: object) -> None:
        # A delivery's NOTIFY (its subscription has more rows waiting) calls for a fan-out only when a window
        # was full; a notification's (or a replay's) always.
        if payload != DELIVERED_PAYLOAD or self._windows_full:
            self._fan_out_soon()
        self._wake.set()

    def _fan_out_soon(self) -> None:
        self._announced = True
        self._fan_wake.set()

    async def _fan_out_loop(self) -> None:
        """The fan-out, in a task of its own on a connection of its own, so that its wait for the writers'
        lock never holds up the claims and outcomes of the sending loop: run when a notification is
        announced (and at the poll), when deliveries made room in a window (``ahead``), and again soon when a
        writer held its seq or a subscription was busy; it wakes the sending loop when it made rows."""
        loop = asyncio.get_running_loop()
        poll_at = -float("inf")
        conn: asyncpg.pool.PoolConnectionProxy | None = None
        try:
            while not self._stopping.is_set():
                self._fan_wake.clear()
                sleep = self.settings.poll_interval
                if self._announced or loop.time() >= poll_at:
                    self._announced = False
                    poll_at = loop.time() + self.settings.poll_interval
                    try:
                        if conn is None or conn.is_closed():
                            conn = await self.pool.acquire()
                            await plan_per_call(conn)
                        self.stats.fan_outs += 1
                        made, again, self._windows_full = await fan_out_once(conn, ahead=self.settings.ahead)
                        if made:
                            self.stats.fanned_out += made
                            self._wake.set()
                        if again:           # a writer held its seq too long, or a subscription was busy
                            self._announced = True
                            sleep = 0.05
                    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                        log.warning("webhook fan-out: database trouble, retrying", error=describe(exc))
                        if conn is not None:
                            with contextlib.suppress(Exception):
                                await self.pool.release(conn)
                            conn = None
                        self._announced = True
                        sleep = self.settings.db_backoff
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._fan_wake.wait()
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await self.pool.release(conn)

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await conn.remove_listener(NOTIFY_CHANNEL, self._notified)
        with contextlib.suppress(Exception):
            await self.pool.release(conn)

    # -- claim, send, record --

    async def _claim(self, limit: int) -> tuple[list[Job], float | None]:
        """Claim up to ``limit`` deliveries; also when to look again unwoken (seconds, or None)."""
        token = uuid.uuid4()
        rows = await self._db().fetch(_CLAIM, self.settings.per_subscription, limit, token, self.settings.window,
                                      self.settings.effective_lease)
        due: float | None = None
        jobs: list[Job] = []
        for r in rows:
            if r["id"] is None:
                due = r["due"]
                continue
            for secret in r["secrets"]:
                register_secret(secret)  # this process may not have seen it yet: mask it in any log line
            jobs.append(Job(id=r["id"], subscription_id=str(r["subscription_id"]), webhook_id=r["webhook_id"],
                            body=self._body(r), attempts=r["attempts"], age=float(r["age"]), url=r["url"],
                            secrets=list(r["secrets"]), max_age=float(r["max_age_seconds"]), failing=r["failing"],
                            token=token, endpoint_failures=r["consecutive_failures"]))
        return sorted(jobs, key=lambda j: j.id), due

    def _body(self, row: asyncpg.Record) -> bytes:
        """The bytes to send: the row's own (queued before the fan-out), or its notification's roost body, or
        that rendered for an Alertmanager subscriber (kept for the retries of this process)."""
        body = bytes(row["body"]) if row["body"] is not None else b""
        if not row["rendered"] or row["format"] != Format.ALERTMANAGER.value:
            return body
        key = (str(row["name"]), int(row["id"]))
        cached = self._rendered.get(key)
        if cached is None:
            if len(self._rendered) >= 4096:
                self._rendered.clear()
            cached = self._rendered[key] = alertmanager_body(body, row["name"])
        return cached

    def _client_for(self, subscription_id: str) -> HttpClient:
        """The HTTP client of a subscription: one each, keeping at most ``per_subscription`` idle
        connections (as many as its requests in flight)."""
        if self._client is not None:
            return self._client
        client = self._clients.get(subscription_id)
        if client is None:
            size = min(self.settings.per_subscription, self.settings.max_in_flight)
            client = self._clients[subscription_id] = HttpClient(max_connections=size, max_body=MAX_ANSWER_BYTES)
        return client

    async def _deliver(self, job: Job) -> None:
        client = self._client_for(job.subscription_id)
        loop = asyncio.get_running_loop()
        started = loop.time()
        headers = {"content-type": "application/json", "user-agent": USER_AGENT,
                   **sign_headers(job.secrets, job.webhook_id, int(time.time()), job.body)}
        status: int | None = None
        retry_after: str | None = None
        error: str | None = None
        try:
            # The answer's body means nothing to us: the client reads a little of it (so a small one keeps
            # the connection reusable), never all of it (endless garbage costs no memory).
            async with asyncio.timeout(self.settings.timeout):
                answer = await client.post(job.url, job.body, headers)
            status = answer.status
            retry_after = answer.headers.get("retry-after")
        except (HttpProtocolError, OSError, TimeoutError, ValueError) as exc:
            error = describe(exc)
        elapsed = loop.time() - started
        # the backoff grows with this row's attempts or the endpoint's failures in a row, whichever is more
        attempts = max(job.attempts, job.endpoint_failures) + 1
        outcome = decide(status, retry_after, error, attempts=attempts, age=job.age + elapsed,
                         max_age=job.max_age, min_backoff=self.settings.min_backoff,
                         max_backoff=self.settings.max_backoff, max_retry_after=self.settings.max_retry_after,
                         now=time.time(), rng=self._rng)
        metrics.record_attempt("dead_letter" if outcome.state == "dead" else outcome.state, elapsed)
        try:
            await self._record(job, outcome, status)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            log.warning("webhook delivery outcome not recorded (database trouble): it is sent again when its "
                        "lease runs out", subscription=job.subscription_id, webhook_id=job.webhook_id,
                        outcome=outcome.state, error=describe(exc))

    async def _record_delivered(self) -> bool:
        """Write the 2xx outcomes gathered since the last cycle, in one statement; whether there were any."""
        if not self._delivered:
            return False
        done, self._delivered = self._delivered, []
        try:
            db = self._db()
            rows = await db.fetch(_DELIVERED_MANY, [d.job.id for d in done], [d.job.token for d in done],
                                  [d.status for d in done], NOTIFY_CHANNEL, DELIVERED_PAYLOAD)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
            # kept for the next cycle: written then if the claim still holds (else the row goes again, same id)
            self._delivered[:0] = done
            raise
        written = {r["id"]: float(r["latency"]) for r in rows}
        reset: set[str] = set()
        recovered: set[str] = set()
        for d in done:
            latency = written.get(d.job.id)
            if latency is None:
                self._lost(d.job)
                continue
            self.stats.delivered += 1
            metrics.record_latency(latency)
            if d.job.endpoint_failures:
                reset.add(d.job.subscription_id)
            if d.job.failing:
                recovered.add(d.job.subscription_id)
        for sub in sorted(reset):
            await db.execute(_RESET_BREAKER, uuid.UUID(sub))
        for sub in sorted(recovered):
            if await db.fetchval(_MARK_RECOVERED, uuid.UUID(sub)) is not None:
                log.info("webhook subscription recovered", subscription=sub)
                await self._call(self.on_subscription_recovered, sub, "delivering again")
        return True

    async def _record(self, job: Job, outcome: Outcome, status: int | None) -> None:
        sub = uuid.UUID(job.subscription_id)
        if outcome.state == "delivered":
            assert status is not None
            self._delivered.append(Done(job, status))
            self._wake.set()
            return
        if outcome.state == "retry":
            if await self.pool.fetchval(_RETRY, job.id, job.token, status, outcome.reason, outcome.delay) is None:
                self._lost(job)
                return
            self.stats.retried += 1
            log.info("webhook delivery will be retried", subscription=job.subscription_id,
                     webhook_id=job.webhook_id, attempt=job.attempts + 1, reason=outcome.reason,
                     delay=round(outcome.delay, 3))
            return
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(_DEAD, job.id, job.token, status, outcome.reason) is None:
                self._lost(job)
                return
            turned_failing = await conn.fetchval(_MARK_FAILING, sub, outcome.reason) is not None
        self.stats.dead_lettered += 1
        self._fan_out_soon()                 # room in its window
        log.warning("webhook delivery dead-lettered", subscription=job.subscription_id, webhook_id=job.webhook_id,
                    attempts=job.attempts + 1, reason=outcome.reason)
        if turned_failing:
            await self._call(self.on_subscription_failing, job.subscription_id, outcome.reason)

    def _lost(self, job: Job) -> None:
        self.stats.lost_claims += 1
        log.warning("webhook delivery outcome not recorded: the claim expired and was taken again",
                    subscription=job.subscription_id, webhook_id=job.webhook_id)

    @staticmethod
    async def _call(hook: SubscriptionHook | None, subscription_id: str, reason: str) -> None:
        if hook is None:
            return
        try:
            await hook(subscription_id, reason)
        except Exception as exc:
            log.error("webhook subscription hook failed", subscription=subscription_id, error=describe(exc))
