"""A Transport that records what is published, for tests of publishers (the outbox relay).

It publishes nowhere: ``published`` lists every confirmed message in confirmation order.  Tests make
the "broker" misbehave:

* ``disconnected = True``: ``connected`` is False and publishing raises ``NotConnected``;
* ``nacking = True``: connected, but nothing is confirmed (``PublishFailed`` for every message);
* ``fail_ids``: these message ids are never confirmed (a poison message);
* ``hold()``: publishes block before confirming until ``release()`` (to catch a relay mid-batch).

Consuming is not modelled (``subscribe`` and friends raise ``NotImplementedError``); use the in-memory
transport for that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from services.core.bus.abc import (
    ConsumeCallback,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    PublishFailed,
    ReceivedMessage,
    Subscription,
    Transport,
)


class RecordingTransport(Transport):
    name = "recording"

    def __init__(self) -> None:
        self.published: list[OutgoingMessage] = []
        self.attempts: list[str] = []            # message ids of every publish attempt, in order
        self.disconnected = False
        self.nacking = False
        self.fail_ids: set[str] = set()
        self.batches: list[int] = []             # size of each publish_many call
        self._open = asyncio.Event()
        self._open.set()
        self.holding = asyncio.Event()           # set while a publish waits at hold()
        self._changed = asyncio.Condition()

    # -- test controls -----------------------------------------------------------------------------

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def ids(self) -> list[str]:
        return [m.message_id for m in self.published]

    async def wait_until(self, condition: Callable[[RecordingTransport], bool], timeout: float = 10.0) -> None:
        """Wait until ``condition(self)`` holds after some publish; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not condition(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"condition not reached in {timeout}s; published {len(self.published)}")
                try:
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    continue

    # -- Transport ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        self.disconnected = False

    async def close(self) -> None:
        self.disconnected = True

    async def abort(self) -> None:
        self.disconnected = True

    @property
    def connected(self) -> bool:
        return not self.disconnected

    async def publish(self, message: OutgoingMessage, *, timeout: float = 10.0) -> None:
        [result] = await self.publish_many([message], timeout=timeout)
        if result is not None:
            raise result

    async def publish_many(self, messages: Sequence[OutgoingMessage], *,
                           timeout: float = 10.0) -> list[BaseException | None]:
        self.batches.append(len(messages))
        if not self._open.is_set():
            self.holding.set()
            await self._open.wait()
            self.holding.clear()
        results: list[BaseException | None] = []
        for message in messages:
            self.attempts.append(message.message_id)
            if self.disconnected:
                results.append(NotConnected("recording transport: disconnected"))
            elif self.nacking or message.message_id in self.fail_ids:
                results.append(PublishFailed(f"recording transport: {message.message_id} not confirmed"))
            else:
                self.published.append(message)
                results.append(None)
        async with self._changed:
            self._changed.notify_all()
        return results

    async def subscribe(self, pattern: str, group: str, callback: ConsumeCallback,
                        options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        raise NotImplementedError("RecordingTransport does not deliver; use InMemoryTransport")

    async def delete_group(self, pattern: str, group: str) -> None:
        raise NotImplementedError

    async def request(self, message: OutgoingMessage, *, timeout: float) -> ReceivedMessage:
        raise NotImplementedError

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        raise NotImplementedError
