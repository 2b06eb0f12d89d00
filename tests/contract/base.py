"""The bus contract: one suite, written once, run against every transport.

A transport's test module subclasses ``BusContract`` and provides two fixtures:

* ``transport_factory``: a callable returning a new, unconnected ``Transport`` (each one is like a
  separate process: its own connection);
* ``outage``: a callable returning an async context manager inside which the broker is unreachable
  from those transports (NATS: the server process is stopped; RabbitMQ: a TCP proxy cuts the
  connections; memory: the broker is marked down), restored on exit.

Every test works in its own namespace (subjects ``roost.test.<ns>.*``, groups ``*-<ns>``) and deletes
the groups it created, so a persistent broker stays clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from schemas.envelope import Envelope, Principal, ReplyStatus, Role, utcnow
from schemas.registry import Registry
from services.core.bus.abc import (
    H_AUTHORIZATION,
    H_DLQ_ATTEMPTS,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    PublishFailed,
    RawDelivery,
    RequestTimeout,
    Transport,
)
from services.core.bus.bus import Bus, Message, RetryLater
from services.core.bus.subjects import dlq_subject
from tests.support.waiting import wait_until

TransportFactory = Callable[[], Transport]
OutageFactory = Callable[[], AbstractAsyncContextManager[None]]

ADMIN_TOKEN = "contract-admin-token"
READER_TOKEN = "contract-reader-token"


class Ping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int
    text: str = ""


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


REGISTRY = Registry()
REGISTRY.event("roost.test.ping", "core", Ping, "a numbered test event")
REGISTRY.command("roost.cmd.test.echo", "core", Echo, "echo the text back", min_role=Role.READER)
REGISTRY.command("roost.cmd.test.lock", "core", Echo, "an admin-only test command", min_role=Role.ADMIN)


class TokenTable:
    async def authenticate(self, token: str) -> Principal | None:
        return {ADMIN_TOKEN: Principal(name="alice", role=Role.ADMIN),
                READER_TOKEN: Principal(name="bob", role=Role.READER)}.get(token)


class OnceStore:
    """The smallest correct idempotency store: concurrent repeats wait for the first run."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, str], asyncio.Task[dict[str, Any]]] = {}

    async def run_once(self, key: str, command_type: str,
                       fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        task = self._runs.get((key, command_type))
        if task is None or (task.done() and task.exception() is not None):
            task = asyncio.ensure_future(fn())
            self._runs[(key, command_type)] = task
        return await asyncio.shield(task)


class Harness:
    def __init__(self, factory: TransportFactory) -> None:
        self.factory = factory
        self.ns = uuid.uuid4().hex[:8]
        self.buses: list[Bus] = []
        self.groups: set[tuple[str, str]] = set()
        self.store = OnceStore()

    def subject(self, name: str) -> str:
        return f"roost.test.{self.ns}.{name}"

    def command_subject(self, name: str) -> str:
        return f"roost.cmd.test.{self.ns}.{name}"

    def group(self, name: str) -> str:
        return f"{name}-{self.ns}"

    async def bus(self, token: str | None = ADMIN_TOKEN) -> Bus:
        bus = Bus(self.factory(), source="roost/contract-test", registry=REGISTRY, authenticator=TokenTable(),
                  idempotency=self.store, token=token)
        await bus.connect()
        self.buses.append(bus)
        return bus

    def ping(self, n: int, text: str = "") -> Envelope:
        return REGISTRY.envelope("roost.test.ping", Ping(n=n, text=text), source="roost/contract-test")

    async def subscribe(self, bus: Bus, name: str, group: str, handler: Callable[[Message], Awaitable[None]],
                        **options: Any) -> None:
        pattern = self.subject(name)
        self.groups.add((pattern, group))
        await bus.subscribe(pattern, group, handler, options=ConsumerOptions(**options))

    async def serve(self, bus: Bus, name: str, group: str,
                    handler: Callable[[Message], Awaitable[Any]], **options: Any) -> None:
        pattern = self.command_subject(name)
        self.groups.add((pattern, group))
        await bus.serve(pattern, group, handler, options=ConsumerOptions(**options))

    async def dead_letters(self, bus: Bus, group: str) -> list[RawDelivery]:
        """Start collecting what ``group`` dead-letters (bind before anything is published)."""
        got: list[RawDelivery] = []

        async def collect(delivery: RawDelivery) -> None:
            got.append(delivery)
            await delivery.ack()

        pattern, watcher = dlq_subject(group), self.group("dlqwatch")
        self.groups.add((pattern, watcher))
        await bus.transport.subscribe(pattern, watcher, collect)
        return got

    async def publish_until_confirmed(self, bus: Bus, envelope: Envelope, subject: str) -> None:
        """What a relay does: publish again until the broker confirms (duplicates are the inbox's job)."""
        while True:
            try:
                await bus.publish(envelope, subject=subject)
                return
            except (PublishFailed, NotConnected):
                await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        for bus in self.buses:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.close(), 15)
        cleaner = self.factory()
        with contextlib.suppress(Exception):
            await cleaner.connect()
            for pattern, group in self.groups:
                await cleaner.delete_group(pattern, group)
            await cleaner.close()


class BusContract:
    @pytest.fixture
    def transport_factory(self) -> TransportFactory:
        raise NotImplementedError("a transport's contract module provides transport_factory")

    @pytest.fixture
    def outage(self) -> OutageFactory:
        raise NotImplementedError("a transport's contract module provides outage")

    @pytest.fixture
    async def h(self, transport_factory: TransportFactory) -> AsyncIterator[Harness]:
        harness = Harness(transport_factory)
        yield harness
        await harness.aclose()

    # -- delivery ---------------------------------------------------------------------------

    async def test_order_per_subject_for_a_single_consumer(self, h: Harness) -> None:
        bus = await h.bus()
        got: list[int] = []

        async def handle(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got.append(m.data.n)

        await h.subscribe(bus, "ordered", h.group("ordered"), handle, prefetch=20)
        for n in range(60):
            await bus.publish(h.ping(n), subject=h.subject("ordered"))
        await wait_until(lambda: len(got) >= 60, what="60 events")
        assert got == list(range(60))

    async def test_publish_many_delivers_everything(self, h: Harness) -> None:
        bus = await h.bus()
        got: set[int] = set()

        async def handle(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got.add(m.data.n)

        await h.subscribe(bus, "many", h.group("many"), handle, prefetch=100, concurrency=4)
        from services.core.bus import codec
        results = await bus.publish_raw([codec.encode(h.ping(n), subject=h.subject("many")) for n in range(300)])
        assert results == [None] * 300
        await wait_until(lambda: len(got) == 300, what="300 events")

    async def test_competing_consumers_share_a_group(self, h: Harness) -> None:
        first, second = await h.bus(), await h.bus()
        got_first: list[int] = []
        got_second: list[int] = []
        second_started = asyncio.Event()

        async def handle_first(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got_first.append(m.data.n)
            if len(got_first) == 1:       # hold the first message until the other member works too
                await asyncio.wait_for(second_started.wait(), 20)

        async def handle_second(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got_second.append(m.data.n)
            second_started.set()

        group = h.group("compete")
        await h.subscribe(first, "compete", group, handle_first, prefetch=1)
        await h.subscribe(second, "compete", group, handle_second, prefetch=1)
        for n in range(30):
            await first.publish(h.ping(n), subject=h.subject("compete"))
        await wait_until(lambda: len(got_first) + len(got_second) >= 30, what="30 events across the group")
        assert got_first and got_second, "both members of the group took work"
        assert sorted(got_first + got_second) == list(range(30)), "each event went to exactly one member"

    async def test_fan_out_across_groups(self, h: Harness) -> None:
        bus = await h.bus()
        got: dict[str, list[int]] = {"a": [], "b": []}

        def handler(name: str) -> Callable[[Message], Awaitable[None]]:
            async def handle(m: Message) -> None:
                assert isinstance(m.data, Ping)
                got[name].append(m.data.n)
            return handle

        await h.subscribe(bus, "fan", h.group("fan-a"), handler("a"))
        await h.subscribe(bus, "fan", h.group("fan-b"), handler("b"))
        for n in range(10):
            await bus.publish(h.ping(n), subject=h.subject("fan"))
        await wait_until(lambda: len(got["a"]) >= 10 and len(got["b"]) >= 10, what="both groups")
        assert got["a"] == got["b"] == list(range(10))

    async def test_a_group_keeps_messages_while_no_member_runs(self, h: Harness) -> None:
        bus = await h.bus()
        group = h.group("durable")
        got: list[int] = []

        async def handle(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got.append(m.data.n)

        await h.subscribe(bus, "durable", group, handle)
        await bus.stop_consuming()
        for n in range(5):
            await bus.publish(h.ping(n), subject=h.subject("durable"))
        later = await h.bus()
        await h.subscribe(later, "durable", group, handle)
        await wait_until(lambda: len(got) >= 5, what="events kept for the group")
        assert got == list(range(5))

    # -- failure ----------------------------------------------------------------------------

    async def test_redelivery_after_a_handler_exception(self, h: Harness) -> None:
        bus = await h.bus()
        attempts: list[int] = []

        async def handle(m: Message) -> None:
            attempts.append(m.attempt)
            if m.attempt == 1:
                raise RuntimeError("transient failure")

        dead = await h.dead_letters(bus, h.group("redeliver"))
        await h.subscribe(bus, "redeliver", h.group("redeliver"), handle)
        await bus.publish(h.ping(1), subject=h.subject("redeliver"))
        await wait_until(lambda: len(attempts) >= 2, what="a second delivery")
        assert attempts == [1, 2]
        assert dead == []

    async def test_retry_later_delays_redelivery(self, h: Harness) -> None:
        bus = await h.bus()
        seen: list[float] = []

        async def handle(m: Message) -> None:
            seen.append(time.monotonic())
            if m.attempt == 1:
                raise RetryLater(0.5)

        await h.subscribe(bus, "later", h.group("later"), handle)
        await bus.publish(h.ping(1), subject=h.subject("later"))
        await wait_until(lambda: len(seen) >= 2, what="the delayed redelivery")
        assert seen[1] - seen[0] >= 0.45

    async def test_redelivery_after_a_consumer_dies_without_acking(self, h: Harness) -> None:
        doomed, survivor = await h.bus(), await h.bus()
        group = h.group("crash")
        taken = asyncio.Event()
        never = asyncio.Event()
        survivor_got: list[tuple[str, int]] = []

        async def hang(m: Message) -> None:
            taken.set()
            await never.wait()               # the process "dies" holding it

        async def handle(m: Message) -> None:
            survivor_got.append((m.envelope.id, m.attempt))

        await h.subscribe(doomed, "crash", group, hang, ack_wait=2.0)
        event = h.ping(7)
        await doomed.publish(event, subject=h.subject("crash"))
        await asyncio.wait_for(taken.wait(), 20)
        await doomed.transport.abort()
        await h.subscribe(survivor, "crash", group, handle, ack_wait=2.0)
        await wait_until(lambda: len(survivor_got) >= 1, what="the redelivery to the survivor")
        assert survivor_got[0][0] == event.id
        assert survivor_got[0][1] >= 2, "the broker counts the lost delivery"

    async def test_dead_letter_after_max_attempts_with_the_reason(self, h: Harness) -> None:
        bus = await h.bus()
        group = h.group("poison")
        attempts: list[int] = []

        async def handle(m: Message) -> None:
            attempts.append(m.attempt)
            raise ValueError("the disk is on fire")

        dead = await h.dead_letters(bus, group)
        await h.subscribe(bus, "poison", group, handle, max_attempts=3)
        event = h.ping(13)
        await bus.publish(event, subject=h.subject("poison"))
        await wait_until(lambda: len(dead) >= 1, what="the dead letter")
        assert attempts == [1, 2, 3]
        letter = dead[0]
        assert "ValueError: the disk is on fire" in letter.headers[H_DLQ_REASON]
        assert letter.headers[H_DLQ_ATTEMPTS] == "3"
        assert letter.headers[H_DLQ_GROUP] == group
        assert letter.headers[H_DLQ_SUBJECT] == h.subject("poison")
        assert Envelope.model_validate_json(letter.body) == event, "the dead letter is the message itself"

    async def test_a_malformed_message_is_dead_lettered_and_the_consumer_goes_on(self, h: Harness) -> None:
        bus = await h.bus()
        group = h.group("malformed")
        got: list[int] = []

        async def handle(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got.append(m.data.n)

        dead = await h.dead_letters(bus, group)
        await h.subscribe(bus, "malformed", group, handle)
        subject = h.subject("malformed")
        await bus.transport.publish(OutgoingMessage(subject, b"{not json", "garbage-" + h.ns))
        bad_data = Envelope(type="roost.test.ping", source="roost/contract-test", data={"n": "eleven"})
        await bus.publish(bad_data, subject=subject)
        await bus.publish(h.ping(12), subject=subject)
        await wait_until(lambda: len(dead) >= 2 and got == [12], what="two dead letters and the good event")
        reasons = sorted(d.headers[H_DLQ_REASON] for d in dead)
        assert any("not a valid envelope" in r for r in reasons), reasons
        assert any("roost.test.ping" in r and "n:" in r for r in reasons), reasons

    async def test_no_message_is_lost_while_the_broker_restarts(self, h: Harness, outage: OutageFactory) -> None:
        publisher, consumer = await h.bus(), await h.bus()
        got: set[int] = set()

        async def handle(m: Message) -> None:
            assert isinstance(m.data, Ping)
            got.add(m.data.n)

        await h.subscribe(consumer, "restart", h.group("restart"), handle, prefetch=50)
        subject = h.subject("restart")
        total = 200
        confirmed = 0

        async def produce() -> None:
            nonlocal confirmed
            for n in range(total):
                await h.publish_until_confirmed(publisher, h.ping(n), subject)
                confirmed += 1

        producer = asyncio.create_task(produce())
        await wait_until(lambda: confirmed >= 50, what="50 confirmed before the outage")
        async with outage():
            await asyncio.sleep(1.0)        # the broker stays away for a second: the scenario, not a guess
        await asyncio.wait_for(producer, 60)
        await wait_until(lambda: len(got) == total, timeout=60, what="every event after the restart")

    # -- commands ---------------------------------------------------------------------------

    async def test_request_and_reply(self, h: Harness) -> None:
        server, client = await h.bus(), await h.bus(token=READER_TOKEN)
        seen: list[Principal | None] = []

        async def echo(m: Message) -> dict[str, Any]:
            assert isinstance(m.data, Echo)
            seen.append(m.principal)
            return {"text": m.data.text.upper()}

        await h.serve(server, "echo", h.group("echo"), echo)
        command = Envelope.command("roost.cmd.test.echo", Echo(text="hello"), source="roost/cli")
        reply = await client.request(command, subject=h.command_subject("echo"), timeout=10)
        assert reply.status is ReplyStatus.COMPLETED, reply
        assert reply.result == {"text": "HELLO"}
        assert reply.command_id == command.id
        assert seen == [Principal(name="bob", role=Role.READER)], "the handler sees the authenticated principal"

    async def test_request_times_out_without_a_reply(self, h: Harness) -> None:
        server, client = await h.bus(), await h.bus()
        release = asyncio.Event()

        async def stuck(m: Message) -> None:
            await release.wait()

        await h.serve(server, "stuck", h.group("stuck"), stuck)
        command = Envelope.command("roost.cmd.test.echo", Echo(text="x"), source="roost/cli")
        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request(command, subject=h.command_subject("stuck"), timeout=0.5)
        assert time.monotonic() - started < 5
        release.set()

    async def test_a_command_nobody_handles_is_rejected_at_once(self, h: Harness) -> None:
        client = await h.bus()
        command = Envelope.command("roost.cmd.test.echo", Echo(text="x"), source="roost/cli")
        reply = await client.request(command, subject=h.command_subject("nobody"), timeout=10)
        assert reply.status is ReplyStatus.REJECTED
        assert reply.reason is not None and "no service handles" in reply.reason

    async def test_an_unknown_command_type_is_rejected_saying_so(self, h: Harness) -> None:
        server, client = await h.bus(), await h.bus()
        await h.serve(server, "any", h.group("unknown"), lambda m: asyncio.sleep(0))
        command = Envelope.command("roost.cmd.test.frobnicate", {"x": 1}, source="roost/cli")
        reply = await client.request(command, subject=h.command_subject("any"), timeout=10)
        assert reply.status is ReplyStatus.REJECTED
        assert reply.reason is not None and "unknown command type" in reply.reason

    async def test_commands_past_their_deadline_or_unauthorised_do_not_run(self, h: Harness) -> None:
        server, reader = await h.bus(), await h.bus(token=READER_TOKEN)
        ran: list[str] = []

        async def lock(m: Message) -> None:
            ran.append(m.envelope.id)

        await h.serve(server, "lock", h.group("lock"), lock)
        subject = h.command_subject("lock")
        late = Envelope(type="roost.cmd.test.lock", source="roost/cli", data={"text": "x"},
                        deadline=utcnow() - timedelta(seconds=1), idempotencykey="late")
        reply = await server.request(late, subject=subject, timeout=10)
        assert reply.status is ReplyStatus.REJECTED and "deadline" in (reply.reason or "")
        denied = Envelope.command("roost.cmd.test.lock", Echo(text="x"), source="roost/cli")
        reply = await reader.request(denied, subject=subject, timeout=10)
        assert reply.status is ReplyStatus.REJECTED and "may not send" in (reply.reason or "")
        anonymous = Envelope.command("roost.cmd.test.lock", Echo(text="x"), source="roost/cli")
        reply = await (await h.bus(token=None)).request(anonymous, subject=subject, timeout=10)
        assert reply.status is ReplyStatus.REJECTED and "unauthenticated" in (reply.reason or "")
        forged = Envelope.command("roost.cmd.test.lock", Echo(text="x"), source="roost/cli",
                                  principal=Principal(name="mallory", role=Role.ADMIN))
        reply = await reader.request(forged, subject=subject, timeout=10)
        assert reply.status is ReplyStatus.REJECTED, "a principal written into the envelope is not trusted"
        assert ran == []

    async def test_the_same_idempotency_key_executes_once(self, h: Harness) -> None:
        server, client = await h.bus(), await h.bus()
        ran: list[str] = []

        async def lock(m: Message) -> dict[str, Any]:
            ran.append(m.envelope.id)
            return {"run": len(ran)}

        await h.serve(server, "once", h.group("once"), lock)
        first = Envelope.command("roost.cmd.test.lock", Echo(text="x"), source="roost/cli", idempotencykey="k1")
        again = Envelope.command("roost.cmd.test.lock", Echo(text="x"), source="roost/cli", idempotencykey="k1")
        r1 = await client.request(first, subject=h.command_subject("once"), timeout=10)
        r2 = await client.request(again, subject=h.command_subject("once"), timeout=10)
        assert r1.status is ReplyStatus.COMPLETED and r1.result == {"run": 1}
        assert r2.result == {"run": 1}, "the repeat gets the first reply"
        assert ran == [first.id]

    async def test_secrets_do_not_reach_the_dead_letter_place(self, h: Harness) -> None:
        server, client = await h.bus(), await h.bus()
        group = h.group("badcmd")
        dead = await h.dead_letters(server, group)
        await h.serve(server, "bad", group, lambda m: asyncio.sleep(0))
        command = Envelope.command("roost.cmd.test.echo", {"text": 42}, source="roost/cli")
        reply = await client.request(command, subject=h.command_subject("bad"), timeout=10)
        assert reply.status is ReplyStatus.REJECTED and "text" in (reply.reason or "")
        await wait_until(lambda: len(dead) >= 1, what="the invalid command dead-lettered")
        assert H_AUTHORIZATION not in dead[0].headers
        assert ADMIN_TOKEN.encode() not in dead[0].body
