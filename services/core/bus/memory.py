"""An in-memory broker and transport for pure unit tests.

It models what the real brokers guarantee, so the same contract suite passes on it: durable groups
that keep messages while no member runs, competing members, fan-out across groups, ack, delayed retry,
redelivery of what a crashed member left unsettled (after ``ack_wait``), dead-lettering with a reason,
events kept and counted when no group is bound, unroutable commands, request/reply, and outages
(``InMemoryBroker.outage()``).  Several ``InMemoryTransport`` objects on one broker behave like
several processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from services.core.bus.abc import (
    H_REPLY_TO,
    ConsumeCallback,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    PublishFailed,
    RawDelivery,
    ReceivedMessage,
    RequestTimeout,
    Subscription,
    Transport,
    Unroutable,
)
from services.core.bus.codec import dead_letter_copy
from services.core.bus.subjects import (
    check_group,
    check_pattern,
    check_subject,
    is_command,
    matches,
)


@dataclass
class _Stored:
    message: OutgoingMessage
    deliveries: int = 0
    not_before: float = 0.0
    owner: object | None = None          # the transport holding it unsettled
    settle_by: float = 0.0


@dataclass
class _Group:
    pattern: str
    name: str
    pending: list[_Stored] = field(default_factory=list)   # in arrival order: only appended to, or removed from
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def poke(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class InMemoryBroker:
    """Shared state of one in-memory 'broker'; transports connect to it."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str], _Group] = {}
        self.unrouted: list[OutgoingMessage] = []
        self.reply_boxes: dict[str, asyncio.Queue[ReceivedMessage]] = {}
        self.up = True
        self._transports: set[InMemoryTransport] = set()

    @property
    def unrouted_count(self) -> int:
        return len(self.unrouted)

    def route(self, message: OutgoingMessage) -> None:
        if not self.up:
            raise PublishFailed("in-memory broker is down")
        targets = [g for g in self.groups.values() if matches(g.pattern, message.subject)]
        if not targets:
            if is_command(message.subject):
                raise Unroutable(f"no consumer group is bound to {message.subject}")
            self.unrouted.append(message)
            return
        for group in targets:
            group.pending.append(_Stored(message))
            asyncio.get_running_loop().create_task(group.poke())

    def group(self, pattern: str, name: str) -> _Group:
        key = (name, pattern)
        if key not in self.groups:
            self.groups[key] = _Group(pattern, name)
        return self.groups[key]

    def release(self, owner: object) -> None:
        """What a broker does when a connection dies: its unsettled deliveries become available again."""
        for group in self.groups.values():
            for stored in group.pending:
                if stored.owner is owner:
                    stored.owner = None
            asyncio.get_running_loop().create_task(group.poke())

    @contextlib.asynccontextmanager
    async def outage(self) -> AsyncIterator[None]:
        """The broker is unreachable inside the block: connections drop, publishes fail."""
        self.up = False
        for transport in list(self._transports):
            self.release(transport)
        try:
            yield
        finally:
            self.up = True
            for group in self.groups.values():
                await group.poke()


class _MemoryDelivery(RawDelivery):
    def __init__(self, transport: InMemoryTransport, group: _Group, stored: _Stored) -> None:
        self._transport = transport
        self._group = group
        self._stored = stored
        self.subject = stored.message.subject
        self.body = stored.message.body
        self.headers = stored.message.headers
        self.message_id = stored.message.message_id
        self.group = group.name
        self._attempt = stored.deliveries
        self.settled = False

    @property
    def attempt(self) -> int:
        return self._attempt

    def _still_mine(self) -> bool:
        return self._stored.owner is self._transport and self._stored in self._group.pending

    def _settle(self) -> bool:
        if self.settled:
            raise RuntimeError("delivery settled twice")
        self.settled = True
        # A delivery whose connection dropped can no longer be settled; the broker redelivers it.
        return self._transport.connected and self._still_mine()

    async def ack(self) -> None:
        if self._settle():
            self._group.pending.remove(self._stored)

    async def retry(self, delay: float) -> None:
        if self._settle():
            self._stored.owner = None
            self._stored.not_before = time.monotonic() + max(0.0, delay)
            self._transport._schedule_poke(self._group, delay)

    async def dead_letter(self, reason: str) -> None:
        if self.settled:
            raise RuntimeError("delivery settled twice")
        copy = dead_letter_copy(self, reason)
        if not self._transport.connected:
            self.settled = True
            return
        await self._transport.publish(copy)
        if self._settle():
            self._group.pending.remove(self._stored)


class _MemorySubscription(Subscription):
    def __init__(self, transport: InMemoryTransport, group: _Group, callback: ConsumeCallback,
                 options: ConsumerOptions) -> None:
        self._transport = transport
        self._group = group
        self._callback = callback
        self._options = options
        self.pattern = group.pattern
        self.group = group.name
        self._stopping = False
        self._workers = [asyncio.create_task(self._work()) for _ in range(max(1, options.concurrency))]

    def _next(self) -> _Stored | None:
        now = time.monotonic()
        if not (self._transport.connected and self._transport.broker.up):
            return None
        for stored in self._group.pending:     # oldest first (see _Group.pending)
            if stored.owner is not None and stored.settle_by <= now:
                stored.owner = None            # ack_wait expired: the broker takes it back
            if stored.owner is None and stored.not_before <= now:
                return stored
        return None

    def _wake_in(self) -> float | None:
        now = time.monotonic()
        times = [s.not_before for s in self._group.pending if s.owner is None and s.not_before > now]
        times += [s.settle_by for s in self._group.pending if s.owner is not None]
        return max(0.0, min(times) - now) if times else None

    async def _work(self) -> None:
        while not self._stopping:
            async with self._group.changed:
                stored = self._next()
                if stored is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._group.changed.wait(), self._wake_in())
                    continue
                stored.owner = self._transport
                stored.deliveries += 1
                stored.settle_by = time.monotonic() + self._options.ack_wait
            delivery = _MemoryDelivery(self._transport, self._group, stored)
            try:
                await self._callback(delivery)
            finally:
                if not delivery.settled and delivery._still_mine() and self._transport.connected:
                    stored.owner = None        # not settled: like a nak, deliver again
                    await self._group.poke()

    async def stop(self) -> None:
        self._stopping = True
        await self._group.poke()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._transport._subscriptions.discard(self)

    def kill(self) -> None:
        self._stopping = True
        for worker in self._workers:
            worker.cancel()


class InMemoryTransport(Transport):
    name = "memory"

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self.broker = broker or InMemoryBroker()
        self._connected = False
        self._subscriptions: set[_MemorySubscription] = set()
        self._reply_box = f"memory-reply-{uuid.uuid4().hex}"

    async def connect(self) -> None:
        if not self.broker.up:
            raise NotConnected("in-memory broker is down")
        self._connected = True
        self.broker._transports.add(self)
        self.broker.reply_boxes[self._reply_box] = asyncio.Queue()

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.stop()
        self._connected = False
        self.broker._transports.discard(self)

    async def abort(self) -> None:
        self._connected = False
        for sub in list(self._subscriptions):
            sub.kill()
        self._subscriptions.clear()
        self.broker._transports.discard(self)
        self.broker.release(self)

    @property
    def connected(self) -> bool:
        return self._connected and self.broker.up

    def _require(self) -> None:
        if not self._connected:
            raise NotConnected("transport is not connected")

    def _schedule_poke(self, group: _Group, delay: float) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, delay), lambda: loop.create_task(group.poke()))

    async def publish(self, message: OutgoingMessage, *, timeout: float = 10.0) -> None:
        self._require()
        check_subject(message.subject)
        deadline = time.monotonic() + timeout
        while not self.broker.up:                       # a client waits for its broker, within timeout
            if time.monotonic() >= deadline:
                raise PublishFailed(f"broker down, {message.subject} not confirmed within {timeout}s")
            await asyncio.sleep(0.01)
        self.broker.route(message)

    async def publish_many(self, messages: Sequence[OutgoingMessage], *,
                           timeout: float = 10.0) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        for message in messages:
            try:
                await self.publish(message, timeout=timeout)
                results.append(None)
            except (PublishFailed, Unroutable, NotConnected) as exc:
                results.append(exc)
        return results

    async def subscribe(self, pattern: str, group: str, callback: ConsumeCallback,
                        options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        self._require()
        check_pattern(pattern)
        check_group(group)
        sub = _MemorySubscription(self, self.broker.group(pattern, group), callback, options)
        self._subscriptions.add(sub)
        return sub

    async def delete_group(self, pattern: str, group: str) -> None:
        self.broker.groups.pop((group, pattern), None)

    async def request(self, message: OutgoingMessage, *, timeout: float) -> ReceivedMessage:
        self._require()
        token = uuid.uuid4().hex
        box: asyncio.Queue[ReceivedMessage] = asyncio.Queue()
        self.broker.reply_boxes[token] = box
        try:
            headers = {**message.headers, H_REPLY_TO: token}
            await self.publish(OutgoingMessage(message.subject, message.body, message.message_id, headers))
            try:
                return await asyncio.wait_for(box.get(), timeout)
            except TimeoutError:
                raise RequestTimeout(f"no reply to {message.subject} within {timeout}s") from None
        finally:
            self.broker.reply_boxes.pop(token, None)

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        self._require()
        box = self.broker.reply_boxes.get(reply_to)
        if box is not None:                              # a requester that gave up is simply gone
            box.put_nowait(ReceivedMessage(message.subject, message.body, dict(message.headers)))
