"""What the RabbitMQ transport does on the real broker beyond the shared contract: the topology it
relies on (alternate exchange, mandatory commands, TTL retry queues, quorum delivery limit), the
confirm window, dead-letter headers, reconnects through a TCP proxy, and connect errors.

Every test works under its own subjects and groups (a uuid) and deletes its groups at teardown.
A broker that is down makes these tests fail, never skip.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractExchange
from prometheus_client import REGISTRY
from yarl import URL

from services.core.bus.abc import (
    H_ATTEMPT,
    H_AUTHORIZATION,
    H_DLQ_ATTEMPTS,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    H_DLQ_TIME,
    H_REPLY_TO,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    PublishFailed,
    RawDelivery,
    ReceivedMessage,
    RequestTimeout,
    Unroutable,
)
from services.core.bus.rabbitmq import RabbitSettings, RabbitTransport
from services.core.bus.rabbitmq_topology import (
    H_NOT_BEFORE,
    H_PUBLISHER,
    UNROUTED_QUEUE,
    retry_queue_name,
    retry_queue_names,
)
from services.core.bus.subjects import dlq_subject, durable_name
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

BROKER_URL = os.environ.get("ROOST_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
BROKER = URL(BROKER_URL)
FAST = RabbitSettings(connect_timeout=5.0, reconnect_interval=0.3)


class Scope:
    """One test's namespace on the shared broker: subjects, groups, transports, cleanup."""

    def __init__(self) -> None:
        self.ns = uuid.uuid4().hex[:10]
        self.transports: list[RabbitTransport] = []
        self.groups: set[tuple[str, str]] = set()

    def subject(self, name: str) -> str:
        return f"roost.test.{self.ns}.{name}"

    def command(self, name: str) -> str:
        return f"roost.cmd.test.{self.ns}.{name}"

    def group(self, name: str) -> str:
        return f"{name}-{self.ns}"

    async def transport(self, url: str = BROKER_URL, settings: RabbitSettings = FAST) -> RabbitTransport:
        transport = RabbitTransport(url, settings)
        await transport.connect()
        self.transports.append(transport)
        return transport

    async def subscribe(self, transport: RabbitTransport, pattern: str, group: str,
                        callback: Callable[[RawDelivery], Awaitable[None]], **options: Any) -> None:
        self.groups.add((pattern, group))
        await transport.subscribe(pattern, group, callback, ConsumerOptions(**options))

    async def collect(self, transport: RabbitTransport, pattern: str, group: str,
                      **options: Any) -> list[RawDelivery]:
        got: list[RawDelivery] = []

        async def keep(delivery: RawDelivery) -> None:
            got.append(delivery)
            await delivery.ack()

        await self.subscribe(transport, pattern, group, keep, **options)
        return got

    async def aclose(self) -> None:
        for transport in self.transports:
            await asyncio.wait_for(transport.close(), 15)
        cleaner = RabbitTransport(BROKER_URL, FAST)
        await cleaner.connect()
        for pattern, group in self.groups:
            await cleaner.delete_group(pattern, group)
        await cleaner.close()


@pytest.fixture
async def scope() -> AsyncIterator[Scope]:
    s = Scope()
    yield s
    await s.aclose()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(BROKER.host or "127.0.0.1", BROKER.port or 5672) as p:
        yield p


def via(proxy: TcpProxy) -> str:
    return str(BROKER.with_host(proxy.host).with_port(proxy.port))


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel on the broker, to look at what the transport left there."""
    connection = await aio_pika.connect(BROKER_URL, timeout=5)
    channel = await connection.channel()
    yield channel
    await connection.close()


async def queue_exists(name: str) -> bool:
    connection = await aio_pika.connect(BROKER_URL, timeout=5)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
            return True
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
    finally:
        await connection.close()


def msg(subject: str, body: bytes = b"{}", headers: dict[str, str] | None = None) -> OutgoingMessage:
    return OutgoingMessage(subject, body, uuid.uuid4().hex, headers or {})


# -- unrouted events and unroutable commands ---------------------------------------------------

async def take_from_unrouted(message_id: str) -> aio_pika.abc.AbstractIncomingMessage | None:
    """Find one message in roost.unrouted and remove it; leave every other message where it was."""
    connection = await aio_pika.connect(BROKER_URL, timeout=5)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(UNROUTED_QUEUE, passive=True)
        found = None
        for _ in range(100_000):
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            if message.message_id == message_id:
                await message.ack()
                found = message
                break
        return found                        # the rest go back when the channel closes unacked
    finally:
        await connection.close()


def unrouted_total() -> float:
    return REGISTRY.get_sample_value("roost_bus_unrouted_total", {"broker": "rabbitmq"}) or 0.0


async def test_an_event_nobody_is_bound_to_is_kept_and_counted(scope: Scope) -> None:
    transport = await scope.transport()
    before = unrouted_total()
    event = msg(scope.subject("nobody"), b'{"kept": true}', {"x-roost-type": "roost.test.nobody"})
    await transport.publish(event)             # confirmed: the broker stored it (in roost.unrouted)
    await wait_until(lambda: transport.unrouted_count == 1, what="the unrouted notice")
    assert unrouted_total() == before + 1
    kept = await take_from_unrouted(event.message_id)
    assert kept is not None, "the event is kept in roost.unrouted"
    assert kept.body == event.body and kept.routing_key == event.subject
    assert kept.headers["x-roost-type"] == "roost.test.nobody"
    assert kept.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_only_the_publisher_counts_its_unrouted_event(scope: Scope) -> None:
    first, second = await scope.transport(), await scope.transport()
    event = msg(scope.subject("nobody"))
    await first.publish(event)
    await wait_until(lambda: first.unrouted_count == 1, what="the unrouted notice")
    routed = msg(scope.subject("bound"))
    got = await scope.collect(second, routed.subject, scope.group("bound"))
    await second.publish(routed)
    await wait_until(lambda: len(got) == 1, what="the routed event")
    assert second.unrouted_count == 0 and first.unrouted_count == 1
    assert H_PUBLISHER not in got[0].headers, "the transport's own bookkeeping stays out of the headers"
    await take_from_unrouted(event.message_id)


async def test_a_command_nobody_is_bound_to_is_unroutable(scope: Scope) -> None:
    transport = await scope.transport()
    with pytest.raises(Unroutable):
        await transport.publish(msg(scope.command("nobody")))
    started = time.monotonic()
    with pytest.raises(Unroutable):
        await transport.request(msg(scope.command("nobody")), timeout=10)
    assert time.monotonic() - started < 2, "request() fails at once, it does not wait for its timeout"
    assert transport.unrouted_count == 0, "commands never go to the unrouted keep"
    assert transport.connected, "a returned command does not break the channel"
    got = await scope.collect(transport, scope.command("bound"), scope.group("cmd"))
    await transport.publish(msg(scope.command("bound")))
    await wait_until(lambda: len(got) == 1, what="the bound command")


async def test_a_transport_that_may_not_declare_the_shared_topology_checks_it(scope: Scope) -> None:
    await scope.transport()                                  # the shared exchanges exist
    restricted = await scope.transport(settings=RabbitSettings(declare_shared_topology=False))
    event = msg(scope.subject("nobody"))
    await restricted.publish(event)
    await wait_until(lambda: restricted.unrouted_count == 1, what="the unrouted notice")
    await take_from_unrouted(event.message_id)
    with pytest.raises(Unroutable):
        await restricted.publish(msg(scope.command("nobody")))


# -- publishing --------------------------------------------------------------------------------

class InFlight:
    """Counts publishes awaiting their confirm on a transport's exchanges (a wrapper, not a mock:
    every publish still goes to the broker)."""

    def __init__(self, transport: RabbitTransport) -> None:
        self.now = 0
        self.most = 0
        exchanges: dict[str, AbstractExchange] = transport._exchanges
        for exchange in exchanges.values():
            self._wrap(exchange)

    def _wrap(self, exchange: AbstractExchange) -> None:
        original = exchange.publish

        async def publish(*args: Any, **kwargs: Any) -> Any:
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                return await original(*args, **kwargs)
            finally:
                self.now -= 1

        exchange.publish = publish  # type: ignore[method-assign]


async def test_publish_many_keeps_a_bounded_window_and_reports_each_message(scope: Scope) -> None:
    transport = await scope.transport(settings=RabbitSettings(confirm_window=8))
    got = await scope.collect(transport, scope.subject("many"), scope.group("many"), prefetch=200)
    counter = InFlight(transport)
    messages = [msg(scope.subject("many"), str(n).encode()) for n in range(300)]
    messages.insert(150, msg(scope.command("nobody")))
    results = await transport.publish_many(messages)
    assert counter.most == 8, "at most the window awaits confirms, and the window is used"
    assert counter.now == 0
    assert isinstance(results[150], Unroutable)
    assert results[:150] + results[151:] == [None] * 300
    await wait_until(lambda: len(got) == 300, what="300 events")
    assert sorted(int(d.body) for d in got) == list(range(300))


async def test_messages_are_persistent_with_the_message_id_and_headers(scope: Scope, raw: Any) -> None:
    transport = await scope.transport()
    group = scope.group("props")
    got = await scope.collect(transport, scope.subject("props"), group)
    sent = msg(scope.subject("props"), b"payload", {"x-roost-type": "roost.test.props", "x-custom": "v"})
    await transport.publish(sent)
    await wait_until(lambda: len(got) == 1, what="the event")
    delivery = got[0]
    assert delivery.message_id == sent.message_id and delivery.body == b"payload"
    assert delivery.headers == {"x-roost-type": "roost.test.props", "x-custom": "v"}
    assert delivery.attempt == 1 and delivery.subject == sent.subject and delivery.group == group
    queue = await raw.declare_queue(durable_name(group, scope.subject("props")), passive=True)
    assert queue.declaration_result.consumer_count == 1


async def test_a_member_with_another_max_attempts_joins_the_existing_queue(scope: Scope, raw: Any) -> None:
    first, second = await scope.transport(), await scope.transport()
    subject, group = scope.subject("args"), scope.group("args")
    got_first = await scope.collect(first, subject, group, max_attempts=5, prefetch=1)
    got_second = await scope.collect(second, subject, group, max_attempts=2, prefetch=1)
    for n in range(20):
        await first.publish(msg(subject, str(n).encode()))
    await wait_until(lambda: len(got_first) + len(got_second) == 20, what="20 events across both members")
    assert got_first and got_second, "both members consume"
    queue = await raw.declare_queue(durable_name(group, subject), passive=True)
    assert queue.declaration_result.consumer_count == 2


# -- retry and dead letters --------------------------------------------------------------------

async def test_retry_waits_in_a_ttl_queue_and_returns_to_its_own_group_only(scope: Scope, raw: Any) -> None:
    transport = await scope.transport()
    subject = scope.subject("retry")
    a_times: list[tuple[float, int, dict[str, str]]] = []

    async def a(delivery: RawDelivery) -> None:
        a_times.append((time.monotonic(), delivery.attempt, dict(delivery.headers)))
        if delivery.body == b"first" and delivery.attempt == 1:
            await delivery.retry(0.5)
        else:
            await delivery.ack()

    group_a = scope.group("retry-a")
    await scope.subscribe(transport, subject, group_a, a)
    got_b = await scope.collect(transport, subject, scope.group("retry-b"))
    first = msg(subject, b"first")
    await transport.publish(first)
    await wait_until(lambda: len(a_times) == 2, what="the delayed redelivery to group a")
    assert a_times[1][0] - a_times[0][0] >= 0.45, "not before the delay"
    assert [attempt for _, attempt, _ in a_times] == [1, 2]
    assert a_times[1][2][H_ATTEMPT] == "1"
    # Anything the retry had sent to group b would be there before a later message.
    await transport.publish(msg(subject, b"barrier"))
    await wait_until(lambda: len(got_b) == 2 and len(a_times) == 3, what="the barrier in both groups")
    assert [d.body for d in got_b] == [b"first", b"barrier"], "the retry went to group a alone"
    ttl_queue = retry_queue_name(durable_name(group_a, subject), 0.5)
    declared = await raw.declare_queue(ttl_queue, passive=True)
    assert declared.declaration_result.message_count == 0


async def test_a_retry_longer_than_the_longest_ttl_queue_is_not_early(scope: Scope, raw: Any) -> None:
    transport = await scope.transport()
    subject, group = scope.subject("long"), scope.group("long")
    seen: list[tuple[float, int]] = []
    parked_once: list[bool] = []

    async def later(delivery: RawDelivery) -> None:
        seen.append((time.time(), delivery.attempt))
        if delivery.body == b"an hour":
            await delivery.retry(3600)
            parked_once.append(True)           # its TTL queue exists and holds the copy now
        else:
            await delivery.ack()

    await scope.subscribe(transport, subject, group, later)
    await transport.publish(msg(subject, b"an hour"))
    await wait_until(lambda: bool(parked_once), what="the first delivery parked for an hour")
    parked = await raw.declare_queue(retry_queue_name(durable_name(group, subject), 3600), passive=True)
    copy = await parked.get(no_ack=True, timeout=5)
    due = float(copy.headers[H_NOT_BEFORE])
    assert abs(due - (seen[0][0] + 3600)) < 5, "the copy says when it is due"

    # A copy that comes back from its TTL queue before it is due goes round again, unseen.
    headers: dict[str, Any] = {k: v for k, v in copy.headers.items() if isinstance(v, str)}
    headers[H_NOT_BEFORE] = f"{time.time() + 0.4:.3f}"
    sent_at = time.time()
    await raw.default_exchange.publish(aio_pika.Message(b"soon", headers=headers, message_id="soon"),
                                       routing_key=durable_name(group, subject))
    await wait_until(lambda: len(seen) == 2, what="the copy once due")
    assert seen[1][0] - sent_at >= 0.4
    assert seen[1][1] == 2, "the extra rounds are not attempts"


async def test_dead_letter_carries_the_reason_and_drops_secrets(scope: Scope) -> None:
    transport = await scope.transport()
    group = scope.group("poison")
    dead = await scope.collect(transport, dlq_subject(group), scope.group("dlqwatch"))

    async def give_up(delivery: RawDelivery) -> None:
        if delivery.attempt < 2:
            await delivery.retry(0.1)
        else:
            await delivery.dead_letter("ValueError: cannot parse the frobnicator")

    subject = scope.subject("poison")
    await scope.subscribe(transport, subject, group, give_up)
    sent = msg(subject, b'{"secret": false}', {H_AUTHORIZATION: "Bearer s3cret-token", H_REPLY_TO: "somewhere",
                                               "x-roost-type": "roost.test.poison"})
    await transport.publish(sent)
    await wait_until(lambda: len(dead) == 1, what="the dead letter")
    letter = dead[0]
    assert letter.subject == dlq_subject(group)
    assert letter.body == sent.body and letter.message_id == sent.message_id
    assert letter.headers[H_DLQ_REASON] == "ValueError: cannot parse the frobnicator"
    assert letter.headers[H_DLQ_SUBJECT] == subject
    assert letter.headers[H_DLQ_GROUP] == group
    assert letter.headers[H_DLQ_ATTEMPTS] == "2"
    assert letter.headers[H_DLQ_TIME].endswith("+00:00")
    assert letter.headers["x-roost-type"] == "roost.test.poison"
    for secret in (H_AUTHORIZATION, H_REPLY_TO, H_ATTEMPT):
        assert secret not in letter.headers
    assert letter.attempt == 1, "a dead letter starts its own count"


async def test_an_unsettled_delivery_comes_back_and_the_consumer_goes_on(scope: Scope) -> None:
    transport = await scope.transport()
    subject = scope.subject("unsettled")
    seen: list[tuple[bytes, int]] = []

    async def sloppy(delivery: RawDelivery) -> None:
        seen.append((delivery.body, delivery.attempt))
        if delivery.attempt == 1 and delivery.body == b"cancelled":
            raise asyncio.CancelledError()          # not the worker being stopped: just a failure
        if delivery.attempt == 1 and delivery.body == b"forgotten":
            return                                  # returns without settling
        await delivery.ack()

    await scope.subscribe(transport, subject, scope.group("unsettled"), sloppy)
    for body in (b"cancelled", b"forgotten", b"fine"):
        await transport.publish(msg(subject, body))
    await wait_until(lambda: len(seen) == 5, what="two redeliveries and the good one")
    assert sorted(seen) == [(b"cancelled", 1), (b"cancelled", 2), (b"fine", 1), (b"forgotten", 1), (b"forgotten", 2)]


async def test_the_broker_dead_letters_what_is_never_settled(scope: Scope) -> None:
    """The quorum queue's delivery limit is the backstop for consumers that never get to settle."""
    transport = await scope.transport()
    group = scope.group("hot")
    dead = await scope.collect(transport, dlq_subject(group), scope.group("dlqwatch"))
    attempts: list[int] = []

    async def never_settle(delivery: RawDelivery) -> None:
        attempts.append(delivery.attempt)
        raise RuntimeError("crash before settling")

    subject = scope.subject("hot")
    await scope.subscribe(transport, subject, group, never_settle, max_attempts=1)
    await transport.publish(msg(subject))
    await wait_until(lambda: len(dead) == 1, what="the broker's dead letter")
    assert attempts == list(range(1, 8)), "redelivered until the delivery limit (1 + 5), then dead-lettered"
    assert "delivery_limit" in dead[0].headers[H_DLQ_REASON]
    assert dead[0].headers[H_DLQ_SUBJECT] == subject
    assert dead[0].headers[H_DLQ_GROUP] == group
    assert dead[0].attempt == 1, dead[0].headers


async def test_delete_group_removes_its_queue_and_retry_queues(scope: Scope) -> None:
    transport = await scope.transport()
    subject, group = scope.subject("gone"), scope.group("gone")
    seen: list[int] = []

    async def retry_once(delivery: RawDelivery) -> None:
        seen.append(delivery.attempt)
        if delivery.attempt == 1:
            await delivery.retry(0.1)
        else:
            await delivery.ack()

    await scope.subscribe(transport, subject, group, retry_once)
    await transport.publish(msg(subject))
    await wait_until(lambda: seen == [1, 2], what="a retried delivery")
    queue = durable_name(group, subject)
    assert await queue_exists(queue) and await queue_exists(retry_queue_name(queue, 0.1))
    await transport.delete_group(subject, group)
    for name in [queue, *retry_queue_names(queue)]:
        assert not await queue_exists(name), name


# -- request / reply ---------------------------------------------------------------------------

async def test_request_reply_and_timeout(scope: Scope) -> None:
    server, client = await scope.transport(), await scope.transport()

    async def answer(delivery: RawDelivery) -> None:
        assert delivery.reply_to is not None
        if delivery.body != b"silence":
            await server.reply(delivery.reply_to, msg("roost.reply", delivery.body.upper(), {"x-k": "v"}))
        await delivery.ack()

    await scope.subscribe(server, scope.command("echo"), scope.group("echo"), answer)
    reply: ReceivedMessage = await client.request(msg(scope.command("echo"), b"hello"), timeout=10)
    assert reply.body == b"HELLO" and reply.subject == "roost.reply" and reply.headers == {"x-k": "v"}
    with pytest.raises(RequestTimeout):
        await client.request(msg(scope.command("echo"), b"silence"), timeout=0.3)
    await server.reply("roost.reply.gone#abc", msg("roost.reply"))      # a requester that left: no error


# -- reconnects --------------------------------------------------------------------------------

async def test_consumers_resume_after_the_connection_is_cut(scope: Scope, proxy: TcpProxy) -> None:
    consumer = await scope.transport(via(proxy))
    publisher = await scope.transport()
    subject, group = scope.subject("cut"), scope.group("cut")
    got: list[tuple[bytes, int]] = []
    held = asyncio.Event()
    release = asyncio.Event()
    settle_errors: list[BaseException] = []

    async def handle(delivery: RawDelivery) -> None:
        got.append((delivery.body, delivery.attempt))
        if delivery.body == b"held" and delivery.attempt == 1:
            held.set()
            await release.wait()                   # the connection dies while we hold it
        try:
            await delivery.ack()
        except BaseException as exc:               # must not happen: acking a dead delivery is a no-op
            settle_errors.append(exc)
            raise

    await scope.subscribe(consumer, subject, group, handle)
    await publisher.publish(msg(subject, b"before"))
    await wait_until(lambda: (b"before", 1) in got, what="a delivery before the cut")
    await publisher.publish(msg(subject, b"held"))
    await asyncio.wait_for(held.wait(), 10)

    await proxy.disconnect()
    await wait_until(lambda: not consumer.connected, timeout=2, what="connected to turn false")
    release.set()                                  # its ack goes nowhere; the broker has it back
    await publisher.publish(msg(subject, b"during"))
    await proxy.restore()
    await wait_until(lambda: consumer.connected, what="the reconnect")
    await wait_until(lambda: consumer.reconnects == 1, what="the reconnect callbacks")
    await wait_until(lambda: (b"held", 2) in got and any(body == b"during" for body, _ in got),
                     what="the held delivery again and the one sent during the cut")
    await publisher.publish(msg(subject, b"after"))
    await wait_until(lambda: any(body == b"after" for body, _ in got), what="a delivery after the reconnect")
    assert settle_errors == []


async def test_a_publish_during_an_outage_waits_for_the_reconnect(scope: Scope, proxy: TcpProxy) -> None:
    publisher = await scope.transport(via(proxy))
    subject = scope.subject("wait")
    got = await scope.collect(await scope.transport(), subject, scope.group("wait"))
    await proxy.disconnect()
    with pytest.raises((PublishFailed, NotConnected)):
        await publisher.publish(msg(subject, b"too-short"), timeout=0.3)
    pending = asyncio.create_task(publisher.publish(msg(subject, b"waits"), timeout=20))
    await wait_until(lambda: not publisher.connected, what="the outage")
    assert not pending.done()
    await proxy.restore()
    await asyncio.wait_for(pending, 20)
    await wait_until(lambda: any(d.body == b"waits" for d in got), what="the event published during the outage")


async def test_subscribe_and_stop_across_an_outage(scope: Scope, proxy: TcpProxy, raw: Any) -> None:
    transport = await scope.transport(via(proxy))
    first, second = scope.subject("kept"), scope.subject("late")
    group = scope.group("across")
    kept = await scope.collect(transport, first, group)
    sub_gone = await transport.subscribe(scope.subject("gone"), group, lambda d: d.ack())
    scope.groups.add((scope.subject("gone"), group))
    await proxy.disconnect()
    await wait_until(lambda: not transport.connected, what="the outage")
    await asyncio.wait_for(sub_gone.stop(), 2)         # no broker to talk to: it must not hang
    late = asyncio.create_task(scope.collect(transport, second, group))
    await proxy.restore()
    got_late = await asyncio.wait_for(late, 10)        # waited for the reconnect
    publisher = await scope.transport()
    for subject in (first, second, scope.subject("gone")):
        await publisher.publish(msg(subject))
    await wait_until(lambda: len(kept) == 1 and len(got_late) == 1, what="both live subscriptions")
    gone = await raw.declare_queue(durable_name(group, scope.subject("gone")), passive=True)
    assert gone.declaration_result.consumer_count == 0, "a stopped subscription is not restored"
    assert gone.declaration_result.message_count == 1


async def test_abort_returns_what_it_held_to_the_group(scope: Scope) -> None:
    doomed, survivor = await scope.transport(), await scope.transport()
    subject, group = scope.subject("abort"), scope.group("abort")
    taken = asyncio.Event()

    async def hang(delivery: RawDelivery) -> None:
        taken.set()
        await asyncio.Event().wait()

    await scope.subscribe(doomed, subject, group, hang)
    await doomed.publish(msg(subject, b"x"))
    await asyncio.wait_for(taken.wait(), 10)
    await asyncio.wait_for(doomed.abort(), 5)
    assert not doomed.connected
    got = await scope.collect(survivor, subject, group)
    await wait_until(lambda: len(got) == 1, what="the redelivery")
    assert got[0].attempt == 2, "x-delivery-count counts the delivery the crashed member held"


async def test_stop_waits_for_callbacks_and_returns_unsettled_deliveries(scope: Scope) -> None:
    transport = await scope.transport()
    subject, group = scope.subject("stop"), scope.group("stop")
    started = asyncio.Event()
    finish = asyncio.Event()
    done: list[bytes] = []

    async def slow(delivery: RawDelivery) -> None:
        started.set()
        await finish.wait()
        done.append(delivery.body)
        await delivery.ack()

    scope.groups.add((subject, group))
    sub = await transport.subscribe(subject, group, slow, ConsumerOptions(prefetch=10))
    for n in range(3):
        await transport.publish(msg(subject, str(n).encode()))
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(sub.stop())
    await asyncio.sleep(0)
    assert not stopping.done(), "stop() waits for the callback in flight"
    finish.set()
    await asyncio.wait_for(stopping, 10)
    assert done == [b"0"]
    got = await scope.collect(transport, subject, group)
    await wait_until(lambda: len(got) == 2, what="the two deliveries that were never started")
    assert [d.body for d in got] == [b"1", b"2"]


# -- connecting --------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("http://guest:pw-hidden@127.0.0.1:5672/", "amqp:// or amqps://"),
    ("amqp://guest:pw-hidden@127.0.0.1:1/", "connection refused"),
    (str(BROKER.with_password("pw-hidden")), "refused the login"),
    ("amqp://guest:pw-hidden@no-such-host.invalid:5672/", "unknown host"),
])
async def test_connect_errors_are_one_clear_line_without_the_password(
        url: str, expected: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    transport = RabbitTransport(url, RabbitSettings(connect_timeout=5.0))
    started = time.monotonic()
    with pytest.raises(NotConnected) as caught:
        await transport.connect()
    assert time.monotonic() - started < 6
    text = str(caught.value)
    assert expected in text and "\n" not in text
    assert "pw-hidden" not in text and "pw-hidden" not in repr(transport)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__, "no chained traceback"
    assert not transport.connected
    assert [r.getMessage() for r in caplog.records if r.name.startswith(("aiormq", "aio_pika"))] == [], \
        "the library does not log the same failure again"
    with pytest.raises(NotConnected):
        await transport.publish(msg("roost.test.x"))


async def test_connect_times_out_against_a_silent_peer() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()                        # accepts, never speaks AMQP

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        transport = RabbitTransport(f"amqp://guest:guest@127.0.0.1:{port}/", RabbitSettings(connect_timeout=1.0))
        started = time.monotonic()
        with pytest.raises(NotConnected, match="no answer within 1s"):
            await transport.connect()
        assert time.monotonic() - started < 3
    finally:
        server.close()


@pytest.mark.slow
async def test_connected_turns_false_within_10s_of_a_silent_partition(scope: Scope, proxy: TcpProxy) -> None:
    """No RST, no FIN: only unanswered round trips tell.  Readiness relies on ``connected``."""
    transport = await scope.transport(via(proxy))
    subject = scope.subject("silent")
    got = await scope.collect(transport, subject, scope.group("silent"))
    await proxy.blackhole()
    lost = time.monotonic()
    await wait_until(lambda: not transport.connected, timeout=15, what="connected to turn false")
    assert time.monotonic() - lost <= 10.0
    await proxy.restore()
    await wait_until(lambda: transport.connected, what="the reconnect")
    await transport.publish(msg(subject))
    await wait_until(lambda: len(got) == 1, what="a delivery after the partition healed")


# -- TLS ---------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=roost-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=roost-test-{name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", *extra, cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.pem",
             "-days", "1", "-subj", "/CN=some-other-ca", cwd=d)
    return d


@pytest.fixture
async def tls_proxy(pki: Path) -> AsyncIterator[TcpProxy]:
    """TLS in front of the plain broker, requiring a client certificate signed by the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    context.verify_mode = ssl.CERT_REQUIRED
    async with TcpProxy(BROKER.host or "127.0.0.1", BROKER.port or 5672, ssl=context) as p:
        yield p


async def test_amqps_with_a_ca_file_and_a_client_certificate(scope: Scope, pki: Path, tls_proxy: TcpProxy) -> None:
    url = str(BROKER.with_scheme("amqps").with_host(tls_proxy.host).with_port(tls_proxy.port))
    settings = RabbitSettings(connect_timeout=5.0, ca_file=str(pki / "ca.pem"), cert_file=str(pki / "client.pem"),
                              key_file=str(pki / "client.key"))
    transport = await scope.transport(url, settings)
    subject = scope.subject("tls")
    got = await scope.collect(transport, subject, scope.group("tls"))
    await transport.publish(msg(subject, b"over tls"))
    await wait_until(lambda: len(got) == 1, what="a delivery over TLS")
    assert got[0].body == b"over tls"

    untrusted = RabbitTransport(url, RabbitSettings(connect_timeout=5.0, ca_file=str(pki / "other-ca.pem"),
                                                    cert_file=str(pki / "client.pem"),
                                                    key_file=str(pki / "client.key")))
    with pytest.raises(NotConnected, match="TLS handshake failed"):
        await untrusted.connect()
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))      # trusts the broker, no client cert
    anonymous = RabbitTransport(url, RabbitSettings(connect_timeout=5.0), ssl_context=context)
    with pytest.raises(NotConnected):
        await anonymous.connect()
    with pytest.raises(NotConnected, match="not amqps"):
        await RabbitTransport(BROKER_URL, settings).connect()


async def test_no_password_in_any_log_line(scope: Scope, proxy: TcpProxy, caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Connect, fail a login, lose and regain the connection: no log line holds ``user:password@``."""
    caplog.set_level("DEBUG")
    transport = await scope.transport(via(proxy))
    with pytest.raises(NotConnected):
        await RabbitTransport(str(BROKER.with_password("pw-hidden")), FAST).connect()
    await proxy.disconnect()
    await proxy.restore()
    await wait_until(lambda: transport.connected and transport.reconnects == 1, what="the reconnect")
    logged = caplog.text + capsys.readouterr().out
    assert "lost the connection" in logged and "reconnected" in logged, "the logs were captured"
    assert "pw-hidden" not in logged
    assert f"{BROKER.user}:{BROKER.password}@" not in logged
