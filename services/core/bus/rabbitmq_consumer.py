"""Consuming on RabbitMQ: one channel per subscription, deliveries handed to a bounded set of workers.

The broker pushes up to ``prefetch`` unacknowledged deliveries to the subscription's channel.  aio-pika
runs its consumer callback in a task owned by the channel (and cancels it when the channel dies), so
that callback only puts the delivery into a local queue; ``concurrency`` worker tasks of our own run
the roost callbacks.  With one worker the deliveries are handled in the order the broker sent them.

Settling:

* ``ack`` after the callback has done its work; ``retry(delay)`` republishes a copy (confirmed) to the
  queue's TTL retry queue for that delay, then acks; ``dead_letter(reason)`` publishes a copy
  (confirmed) to ``roost.dlq.<group>``, then acks.
* a callback that returns or raises without settling: the delivery is nacked with requeue, so the
  broker delivers it again at once (and counts it in ``x-delivery-count``).
* when the connection or channel is gone, settling is a no-op (it never raises into the callback): the
  broker has already taken the delivery back and redelivers it.  A delivery from a dead channel still
  waiting in the local queue is dropped unhandled for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue

from services.core.bus.abc import (
    H_MESSAGE_ID,
    ConsumeCallback,
    ConsumerOptions,
    RawDelivery,
    Subscription,
)
from services.core.bus.rabbitmq_connection import CONNECTION_ERRORS
from services.core.bus.rabbitmq_topology import attempt_of, incoming_headers, not_before_of, subject_of
from services.core.bus.subjects import durable_name

if TYPE_CHECKING:
    from services.core.bus.rabbitmq import RabbitTransport

log = structlog.get_logger("roost.bus.rabbitmq")


def channel_gone(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a delivery arrived on has closed (aio-pika raises on reading it then)."""
    try:
        return bool(message.channel.is_closed)
    except aiormq.exceptions.ChannelInvalidStateError:
        return True


class RabbitDelivery(RawDelivery):
    def __init__(self, subscription: RabbitSubscription, message: AbstractIncomingMessage) -> None:
        raw = message.headers or {}
        self._subscription = subscription
        self._message = message
        self.subject = subject_of(raw, message.routing_key)
        self.headers = incoming_headers(raw, self.subject)
        self.body = message.body
        self.message_id = message.message_id or self.headers.get(H_MESSAGE_ID, "")
        self.group = subscription.group
        self.queue = subscription.queue_name
        self._attempt = attempt_of(raw)
        self.not_before = not_before_of(raw)
        self.settled = False

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def stale(self) -> bool:
        """The channel it arrived on is gone: the broker has taken it back and will deliver it again."""
        return channel_gone(self._message)

    def _claim(self) -> None:
        if self.settled:
            raise RuntimeError("delivery settled twice")

    async def ack(self) -> None:
        self._claim()
        self.settled = True
        await self._quietly(self._message.ack)

    async def retry(self, delay: float) -> None:
        self._claim()
        if not self.stale:                      # a stale one comes back anyway: no second copy
            await self._subscription.transport.republish_for_retry(self, delay)
        self.settled = True
        await self._quietly(self._message.ack)

    async def dead_letter(self, reason: str) -> None:
        self._claim()
        if not self.stale:
            await self._subscription.transport.republish_dead_letter(self, reason)
        self.settled = True
        await self._quietly(self._message.ack)

    async def wait_longer(self, delay: float) -> None:
        """Came back from a TTL queue before its long retry delay ran out: another round, unseen."""
        self._claim()
        if not self.stale:
            await self._subscription.transport.republish_for_retry(self, delay, again=True)
        self.settled = True
        await self._quietly(self._message.ack)

    async def release(self) -> None:
        """Give it back to the broker for an immediate redelivery (not settled by its callback)."""
        self.settled = True
        await self._quietly(lambda: self._message.nack(requeue=True))

    async def _quietly(self, settle: Callable[[], Awaitable[None]]) -> None:
        if self.stale:
            log.debug("delivery's channel is gone; the broker redelivers it", queue=self.queue,
                      message_id=self.message_id)
            return
        try:
            await settle()
        except CONNECTION_ERRORS as exc:
            log.debug("could not settle a delivery; the broker redelivers it", queue=self.queue,
                      message_id=self.message_id, error=repr(exc))


class RabbitSubscription(Subscription):
    def __init__(self, transport: RabbitTransport, pattern: str, group: str, callback: ConsumeCallback,
                 options: ConsumerOptions) -> None:
        self.transport = transport
        self.pattern = pattern
        self.group = group
        self.queue_name = durable_name(group, pattern)
        self.options = options
        self._callback = callback
        self._buffer: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._consumer_tag: str | None = None
        self._stopped = False
        self.in_flight = 0

    async def start(self) -> None:
        """Declare and bind the group's queue on a channel of its own, then start consuming."""
        try:
            self._channel, self._queue = await self.transport.open_group_queue(self)
            self._workers = [asyncio.create_task(self._work(), name=f"roost-rabbitmq-{self.queue_name}-{i}")
                             for i in range(max(1, self.options.concurrency))]
            self._consumer_tag = await self._queue.consume(self._on_message, no_ack=False)
        except BaseException:
            await self.kill()
            raise

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopped:
            return                              # left unacknowledged: the channel's close returns it
        self._buffer.put_nowait(message)

    async def _work(self) -> None:
        while True:
            message = await self._buffer.get()
            if message is None:
                return
            if self._stopped or channel_gone(message):
                continue                        # the broker gets it back when the channel closes
                                                # (or has it back already) and delivers it again
            delivery = RabbitDelivery(self, message)
            if delivery.not_before is not None and delivery.not_before > time.time():
                try:
                    await delivery.wait_longer(delivery.not_before - time.time())
                except Exception as exc:
                    log.warning("could not send a delayed retry round again; it goes back to the queue",
                                queue=self.queue_name, error=f"{type(exc).__name__}: {exc}")
                    await delivery.release()
                continue
            self.in_flight += 1
            try:
                await self._callback(delivery)
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise                       # this worker is being stopped (kill/abort)
                self._failed(delivery, exc)     # the callback's own affair: the worker goes on
            except Exception as exc:
                self._failed(delivery, exc)
            finally:
                self.in_flight -= 1
            if not delivery.settled:
                await delivery.release()

    def _failed(self, delivery: RabbitDelivery, exc: BaseException) -> None:
        if not delivery.settled:
            log.warning("consumer callback failed without settling; the delivery goes back to the queue",
                        queue=self.queue_name, error=f"{type(exc).__name__}: {exc}")

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        queue, tag = self._queue, self._consumer_tag
        if queue is not None and tag is not None and self.transport.connected:
            # (While disconnected there is no consumer to cancel; closing the channel below keeps
            # the robust connection from restoring it.)
            with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
                await asyncio.wait_for(queue.cancel(tag), 5)
        while not self._buffer.empty():         # not started: the channel's close returns them
            self._buffer.get_nowait()
        for _ in self._workers:
            self._buffer.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._close_channel()
        self.transport.forget(self)

    async def kill(self, *, close_channel: bool = True) -> None:
        """Stop at once, settling nothing (a crash): callbacks in flight are cancelled."""
        self._stopped = True
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if close_channel:
            await self._close_channel()
        self.transport.forget(self)

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:                 # closed for good: the robust connection won't restore it
            with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
                await asyncio.wait_for(channel.close(), 5)
