"""The bus on RabbitMQ (aio-pika 10, RabbitMQ 3.10+).

Topology (see ``rabbitmq_topology``): events on the durable topic exchange ``roost.events``, whose
alternate exchange ``roost.unrouted`` keeps every event no group is bound to in the quorum queue
``roost.unrouted`` (and tells the publisher, which counts it); commands on ``roost.commands``,
published mandatory so that a command nobody handles comes back as ``Unroutable``; one durable quorum
queue per (group, pattern); one classic TTL queue per (group queue, retry delay bucket) because 3.10
has no delayed-message plugin; an exclusive reply queue per transport.

Publishing is always confirmed: ``publish`` returns once the broker has the message (quorum queues:
a quorum of replicas fsynced it).  ``publish_many`` keeps at most ``confirm_window`` publishes awaiting
their confirm at once.

The connection is aio-pika's robust connection: after a loss it reconnects every
``reconnect_interval`` seconds and restores channels, exchanges, queues, bindings and consumers.  On
top of it this transport makes publishes wait for the restored channel (within their timeout) and
retry, never lets a settle on a dead channel raise into a callback (the broker redelivers), and drops
deliveries of a dead channel still waiting locally.  A publish retried after a lost confirm can be
stored twice: consumers drop duplicates by message id (inbox).  Every call that waits on a robust
channel is bounded by its timeout (aio-pika would otherwise wait for the reconnect inside it).
``connected`` is also false when the broker has not answered a round trip for ``liveness_timeout``
seconds, so a silent partition shows within ~5 s (the AMQP heartbeat takes 9-10 s to drop it).

Attempts: 1 + the deliveries before a republished retry (``x-roost-attempt``) + the quorum queue's
``x-delivery-count`` (nacks, and members that died holding it).  A retry delay is rounded up to a
TTL bucket; one longer than the longest bucket carries when it is due and goes round again unseen.
A group queue's broker ``x-delivery-limit`` (max_attempts + 5) dead-letters, at least once, into
``roost.dlq.<group>`` what its consumers never got to settle (the reason then comes from ``x-death``).

Limits on RabbitMQ 3.10: ``ConsumerOptions.ack_wait`` is not per consumer (the broker-wide
``consumer_timeout`` applies; unacked deliveries return when the channel or connection closes); a
group queue's arguments are fixed when it is first declared, so members that pass a different
``max_attempts`` later reuse the existing queue and its delivery limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)
from prometheus_client import Counter

from services.core.bus.abc import (
    H_ATTEMPT,
    H_REPLY_TO,
    BusError,
    ConsumeCallback,
    ConsumerOptions,
    NotConnected,
    OutgoingMessage,
    PublishFailed,
    ReceivedMessage,
    RequestTimeout,
    Subscription,
    Transport,
    Unroutable,
)
from services.core.bus.codec import dead_letter_copy
from services.core.bus.rabbitmq_connection import (
    CONNECTION_ERRORS,
    Liveness,
    RabbitSettings,
    describe,
    open_connection,
    redact,
    summary,
)
from services.core.bus.rabbitmq_consumer import RabbitDelivery, RabbitSubscription
from services.core.bus.rabbitmq_topology import (
    COMMANDS_EXCHANGE,
    EVENTS_EXCHANGE,
    H_NOT_BEFORE,
    H_PUBLISHER,
    H_SUBJECT,
    REPLY_QUEUE_PREFIX,
    UNROUTED_EXCHANGE,
    UNROUTED_NOTIFY_EXCHANGE,
    UNROUTED_QUEUE,
    exchange_for,
    group_queue_arguments,
    incoming_headers,
    parse_reply_address,
    reply_address,
    retry_queue_arguments,
    retry_queue_name,
    retry_queue_names,
    subject_of,
)
from services.core.bus.subjects import (
    RETRY_BUCKETS,
    check_group,
    check_pattern,
    check_subject,
    durable_name,
    to_amqp_binding,
)

__all__ = ["UNROUTED_TOTAL", "RabbitSettings", "RabbitTransport"]

log = structlog.get_logger("roost.bus.rabbitmq")

UNROUTED_TOTAL = Counter(
    "roost_bus_unrouted_total",
    "Events published while no consumer group was bound to their subject (kept by the broker)",
    ["broker"],
)

_DECLARE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *CONNECTION_ERRORS)
_RETRY_PAUSE = 0.05          # between publish attempts while the channel is being restored


class _Returned(Exception):
    """The broker returned a mandatory publish: nothing is bound to its routing key."""


class RabbitTransport(Transport):
    """``Transport`` on RabbitMQ.  ``url`` is ``amqp://user:password@host:port/vhost`` or ``amqps://…``
    (TLS: pass ``ssl_context``, or ``RabbitSettings.ca_file`` / ``cert_file`` / ``key_file``)."""

    name = "rabbitmq"

    def __init__(self, url: str, settings: RabbitSettings | None = None, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._url = url
        self.settings = settings or RabbitSettings()
        self._ssl_context = ssl_context
        self.id = uuid.uuid4().hex
        self.unrouted_count = 0               # this transport's events that no group was bound to
        self.reconnects = 0                   # connections restored after a loss
        self._connection: AbstractRobustConnection | None = None
        self._pub: AbstractRobustChannel | None = None      # confirms, returns raise
        self._ctl: AbstractRobustChannel | None = None      # reply and unrouted-notice consumers
        self._admin: AbstractRobustChannel | None = None    # lazy declarations and deletes
        self._exchanges: dict[str, AbstractExchange] = {}
        self._subscriptions: set[RabbitSubscription] = set()
        self._replies: dict[str, asyncio.Future[ReceivedMessage]] = {}
        self._reply_queue = REPLY_QUEUE_PREFIX + self.id
        self._retry_queues: set[str] = set()
        self._closing = False
        self._liveness = Liveness(self.settings.liveness_interval, self.settings.liveness_timeout)

    def __repr__(self) -> str:
        return f"<RabbitTransport {redact(self._url)}>"

    # -- connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connection is not None:
            return
        self._closing = False
        connection = await open_connection(self._url, self.settings, self._ssl_context)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await self._declare_topology(connection)
        except (Exception, asyncio.CancelledError) as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)
            self._reset()
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = "timed out" if isinstance(exc, TimeoutError) else describe(exc, self._url)
            raise NotConnected(f"connected to RabbitMQ at {redact(self._url)} but could not declare "
                               f"roost's exchanges and queues: {why}") from None
        self._connection = connection
        if self._ctl is not None:
            self._liveness.start(self._ctl)
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        log.info("connected to RabbitMQ", url=redact(self._url))

    def _on_connection_lost(self, _: object, exc: BaseException | None = None) -> None:
        if not self._closing:
            log.warning("lost the connection to RabbitMQ; reconnecting", url=redact(self._url),
                        every=self.settings.reconnect_interval, error=summary(exc, self._url) if exc else None)

    def _on_reconnected(self, _: object) -> None:
        self.reconnects += 1
        self._liveness.answered()
        log.info("reconnected to RabbitMQ", url=redact(self._url), reconnects=self.reconnects)

    async def _declare_topology(self, connection: AbstractRobustConnection) -> None:
        # Everything is declared on robust channels, so aio-pika declares it again after a reconnect.
        pub = connection.channel(publisher_confirms=True, on_return_raises=True)
        await pub.initialize()
        self._pub = pub
        if self.settings.declare_shared_topology:
            unrouted = await pub.declare_exchange(UNROUTED_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
            self._exchanges = {
                "": pub.default_exchange,
                EVENTS_EXCHANGE: await pub.declare_exchange(
                    EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True,
                    arguments={"alternate-exchange": UNROUTED_EXCHANGE}),
                COMMANDS_EXCHANGE: await pub.declare_exchange(
                    COMMANDS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True),
            }
            notify = await pub.declare_exchange(UNROUTED_NOTIFY_EXCHANGE, aio_pika.ExchangeType.HEADERS,
                                                durable=True)
            await notify.bind(unrouted)
            kept = await pub.declare_queue(UNROUTED_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            await kept.bind(unrouted)
        else:
            for name in (UNROUTED_EXCHANGE, UNROUTED_NOTIFY_EXCHANGE):
                await pub.declare_exchange(name, passive=True)
            self._exchanges = {
                "": pub.default_exchange,
                EVENTS_EXCHANGE: await pub.declare_exchange(EVENTS_EXCHANGE, passive=True),
                COMMANDS_EXCHANGE: await pub.declare_exchange(COMMANDS_EXCHANGE, passive=True),
            }

        ctl = connection.channel(publisher_confirms=False)
        await ctl.initialize()
        self._ctl = ctl
        notices = await ctl.declare_queue(f"{UNROUTED_NOTIFY_EXCHANGE}.{self.id}", exclusive=True,
                                          auto_delete=True)
        await notices.bind(UNROUTED_NOTIFY_EXCHANGE, arguments={"x-match": "all", H_PUBLISHER: self.id})
        await notices.consume(self._on_unrouted, no_ack=True)
        replies = await ctl.declare_queue(self._reply_queue, exclusive=True, auto_delete=True)
        await replies.consume(self._on_reply, no_ack=True)

        admin = connection.channel(publisher_confirms=False)
        await admin.initialize()
        self._admin = admin

    def _reset(self) -> None:
        self._connection = self._pub = self._ctl = self._admin = None
        self._exchanges = {}
        self._retry_queues.clear()

    async def close(self) -> None:
        await self._shut_down(kill=False)

    async def abort(self) -> None:
        await self._shut_down(kill=True)

    async def _shut_down(self, *, kill: bool) -> None:
        """close: subscriptions stop and finish in-flight callbacks; abort: they are dropped unsettled."""
        self._closing = True
        for sub in list(self._subscriptions):
            if kill:
                await sub.kill(close_channel=False)
            else:
                await sub.stop()
        self._fail_requests(NotConnected(f"the transport was {'aborted' if kill else 'closed'}"))
        await self._liveness.stop()
        connection = self._connection
        self._reset()
        if connection is not None:
            with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
                await asyncio.wait_for(connection.close(), 10)

    @property
    def connected(self) -> bool:
        """The connection is up, its publishing channel open (restored after a reconnect), and the broker
        answered a round trip within ``liveness_timeout`` (so a silent partition shows within ~5 s,
        long before the AMQP heartbeat gives up on the connection)."""
        connection, pub = self._connection, self._pub
        return (connection is not None and pub is not None and not self._closing and not connection.is_closed
                and connection.connected.is_set() and not pub.is_closed and self._liveness.alive)

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None or self._closing:
            raise NotConnected("the RabbitMQ transport is not connected (call connect() first)")
        return self._connection

    def forget(self, subscription: RabbitSubscription) -> None:
        self._subscriptions.discard(subscription)

    def _fail_requests(self, error: BusError) -> None:
        for future in self._replies.values():
            if not future.done():
                future.set_exception(error)

    # -- publishing -------------------------------------------------------------------------

    async def _ready(self, channel: AbstractRobustChannel, deadline: float, what: str) -> None:
        """Wait (until ``deadline``) for a channel the robust connection is restoring."""
        loop = asyncio.get_running_loop()
        while channel.is_closed or not self.connected:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                raise NotConnected(f"RabbitMQ at {redact(self._url)} unreachable; could not {what}")
            try:
                await asyncio.wait_for(channel.ready(), remaining)
            except TimeoutError:
                continue
            if channel.is_closed or not self.connected:
                await asyncio.sleep(_RETRY_PAUSE)   # ready() can run ahead of the close callbacks

    async def _send(self, exchange: str, routing_key: str, message: aio_pika.Message, *,
                    mandatory: bool, timeout: float) -> None:
        """Publish and wait for the broker's confirm, riding out reconnects until ``timeout``.

        Raises ``_Returned`` (mandatory and unroutable), ``PublishFailed`` or ``NotConnected``.
        """
        self._require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempts = 0
        while True:
            channel = self._pub
            if channel is None:
                raise NotConnected("the RabbitMQ transport is not connected")
            if channel.is_closed or not self.connected:
                await self._ready(channel, deadline, f"publish {routing_key!r}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PublishFailed(f"{routing_key!r} not confirmed by RabbitMQ within {timeout:g}s")
            attempts += 1
            try:
                # The outer bound also covers aio-pika's wait for the connection inside publish()
                # (aio-pika #556/#636: a robust channel's publish otherwise waits for a reconnect).
                async with asyncio.timeout(remaining):
                    await self._exchanges[exchange].publish(message, routing_key, mandatory=mandatory,
                                                            timeout=remaining)
                return
            except aiormq.exceptions.PublishError:
                raise _Returned(routing_key) from None
            except aiormq.exceptions.DeliveryError as exc:
                raise PublishFailed(f"RabbitMQ refused {routing_key!r}: {exc}") from None
            except aiormq.exceptions.ChannelAccessRefused:
                # The broker's permissions refuse this user the routing key: final, not an outage.
                raise PublishFailed(f"RabbitMQ refused {routing_key!r} to this user (ACCESS_REFUSED)") from None
            except TimeoutError:
                raise PublishFailed(f"{routing_key!r} not confirmed by RabbitMQ within {timeout:g}s") from None
            except CONNECTION_ERRORS as exc:
                # The channel or connection went away with the publish in flight: it may or may not
                # be stored.  Send it again once the channel is back (a duplicate at worst).
                log.debug("publish interrupted; retrying after the reconnect", routing_key=routing_key,
                          attempt=attempts, error=repr(exc))
                if loop.time() >= deadline:
                    raise PublishFailed(f"{routing_key!r} not confirmed: connection to RabbitMQ lost") from None
                await asyncio.sleep(_RETRY_PAUSE)

    @staticmethod
    def _amqp(message: OutgoingMessage, headers: dict[str, str], *, persistent: bool = True,
              correlation_id: str | None = None) -> aio_pika.Message:
        return aio_pika.Message(
            message.body, headers=dict(headers), message_id=message.message_id, correlation_id=correlation_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT)

    async def publish(self, message: OutgoingMessage, *, timeout: float = 10.0) -> None:
        self._require()
        check_subject(message.subject)
        exchange = exchange_for(message.subject)
        headers = dict(message.headers)
        if exchange == EVENTS_EXCHANGE:
            headers[H_PUBLISHER] = self.id          # so that this transport hears if it goes unrouted
        try:
            await self._send(exchange, message.subject, self._amqp(message, headers), mandatory=True,
                             timeout=timeout)
        except _Returned:
            if exchange == COMMANDS_EXCHANGE:
                raise Unroutable(f"no consumer group is bound to {message.subject}") from None
            raise PublishFailed(f"{message.subject} came back unrouted from {exchange}: is the "
                                f"{UNROUTED_QUEUE} queue missing?") from None

    async def publish_many(self, messages: Sequence[OutgoingMessage], *,
                           timeout: float = 10.0) -> list[BaseException | None]:
        self._require()
        results: list[BaseException | None] = [None] * len(messages)
        queue = iter(enumerate(messages))

        async def worker() -> None:
            # ``window`` workers each keep one publish awaiting its confirm; they take the messages
            # in order, and the channel lock sends them in that order.
            for index, message in queue:
                try:
                    await self.publish(message, timeout=timeout)
                except Exception as exc:
                    results[index] = exc

        await asyncio.gather(*(worker() for _ in range(min(self.settings.confirm_window, len(messages)))))
        return results

    # -- consuming --------------------------------------------------------------------------

    async def subscribe(self, pattern: str, group: str, callback: ConsumeCallback,
                        options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        self._require()
        check_pattern(pattern)
        check_group(group)
        sub = RabbitSubscription(self, pattern, group, callback, options)
        self._subscriptions.add(sub)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                if self._pub is not None:       # a reconnect under way: wait for it
                    await self._ready(self._pub, asyncio.get_running_loop().time() + self.settings.connect_timeout,
                                      f"subscribe to {pattern}")
                await sub.start()
        except TimeoutError:
            self._subscriptions.discard(sub)
            raise NotConnected(f"could not start consuming {pattern} as {group}: RabbitMQ unreachable or "
                               f"no answer within {self.settings.connect_timeout:g}s") from None
        except NotConnected:
            self._subscriptions.discard(sub)
            raise
        except CONNECTION_ERRORS as exc:
            self._subscriptions.discard(sub)
            raise NotConnected(f"could not start consuming {pattern} as {group}: "
                               f"{describe(exc, self._url)}") from None
        return sub

    async def open_group_queue(self, sub: RabbitSubscription) -> tuple[AbstractRobustChannel, AbstractRobustQueue]:
        """A channel of its own for ``sub`` with its prefetch, and the group's queue, bound."""
        connection = self._require()
        arguments = group_queue_arguments(sub.group, sub.options.max_attempts)
        # A queue's arguments are fixed when it is created.  Try them on a throwaway channel first: a
        # mismatch closes the channel it happens on, and a robust channel would then restore itself
        # concurrently with whatever we do next.
        matches = await self._declare_probe(connection, sub.queue_name, arguments)
        if not matches:
            log.warning("group queue exists with other arguments (another max_attempts?); using it as it is",
                        queue=sub.queue_name)
        channel = connection.channel(publisher_confirms=False)
        try:
            await channel.initialize()
            await channel.set_qos(prefetch_count=max(1, min(sub.options.prefetch, 65535)))
            if matches:
                queue = await channel.declare_queue(sub.queue_name, durable=True, arguments=arguments)
            else:
                queue = await channel.declare_queue(sub.queue_name, passive=True)
            await queue.bind(exchange_for(sub.pattern), to_amqp_binding(sub.pattern))
        except BaseException:
            with contextlib.suppress(*CONNECTION_ERRORS, TimeoutError):
                await asyncio.wait_for(channel.close(), 5)
            raise
        return channel, queue

    @staticmethod
    async def _declare_probe(connection: AbstractRobustConnection, queue: str, arguments: dict[str, Any]) -> bool:
        """Declare ``queue`` with ``arguments`` on a short-lived plain channel: False when it exists
        with other arguments."""
        transport = connection.transport
        if transport is None:
            raise NotConnected("the connection to RabbitMQ is down")
        probe = await transport.connection.channel(publisher_confirms=False)
        try:
            await probe.queue_declare(queue, durable=True, arguments=arguments)
            return True
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        finally:
            if not probe.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await probe.close()

    async def delete_group(self, pattern: str, group: str) -> None:
        self._require()
        check_pattern(pattern)
        check_group(group)
        name = durable_name(group, pattern)
        for sub in [s for s in self._subscriptions if s.queue_name == name]:
            await sub.stop()                 # or aio-pika would declare the queue again for it
        admin = self._admin
        if admin is None:
            raise NotConnected("the RabbitMQ transport is not connected")
        deadline = asyncio.get_running_loop().time() + self.settings.settle_timeout
        await self._ready(admin, deadline, f"delete queue {name}")
        try:
            async with asyncio.timeout(max(0.001, deadline - asyncio.get_running_loop().time())):
                for queue in [name, *retry_queue_names(name)]:
                    await admin.queue_delete(queue)
                    self._retry_queues.discard(queue)
        except TimeoutError:
            raise NotConnected(f"could not delete {name} and its retry queues: RabbitMQ did not answer "
                               f"within {self.settings.settle_timeout:g}s") from None

    # -- settling (called by RabbitDelivery) ------------------------------------------------

    async def _ensure_retry_queue(self, queue: str, delay: float) -> str:
        name = retry_queue_name(queue, delay)
        if name in self._retry_queues:
            return name
        admin = self._admin
        if admin is None:
            raise NotConnected("the RabbitMQ transport is not connected")
        deadline = asyncio.get_running_loop().time() + self.settings.settle_timeout
        await self._ready(admin, deadline, f"declare queue {name}")
        try:
            async with asyncio.timeout(max(0.001, deadline - asyncio.get_running_loop().time())):
                await admin.declare_queue(name, durable=True, arguments=retry_queue_arguments(queue, delay),
                                          robust=False)
        except _DECLARE_ERRORS as exc:
            raise PublishFailed(f"could not declare the retry queue {name}: {exc}") from None
        self._retry_queues.add(name)
        return name

    async def republish_for_retry(self, delivery: RabbitDelivery, delay: float, *, again: bool = False) -> None:
        """A copy into the queue's TTL queue for ``delay``; it comes back to this group's queue alone.

        A delay longer than the longest TTL queue also carries when it is due; the consumer sends a
        copy that comes back early round again (``again``: not a delivery of its own, so the attempt
        count stays).
        """
        delay = max(0.0, delay)
        headers = {**delivery.headers, H_SUBJECT: delivery.subject,
                   H_ATTEMPT: str(delivery.attempt - 1 if again else delivery.attempt)}
        if delay > RETRY_BUCKETS[-1]:
            headers[H_NOT_BEFORE] = f"{time.time() + delay:.3f}"
        copy = OutgoingMessage(delivery.subject, delivery.body, delivery.message_id, headers)
        for _ in range(2):
            name = await self._ensure_retry_queue(delivery.queue, delay)
            try:
                await self._send("", name, self._amqp(copy, headers), mandatory=True,
                                 timeout=self.settings.settle_timeout)
                return
            except _Returned:
                self._retry_queues.discard(name)       # deleted behind our back: declare it again
        raise PublishFailed(f"could not republish {delivery.message_id} for a retry: {name} keeps vanishing")

    async def republish_dead_letter(self, delivery: RabbitDelivery, reason: str) -> None:
        await self.publish(dead_letter_copy(delivery, reason), timeout=self.settings.settle_timeout)

    # -- request / reply --------------------------------------------------------------------

    async def request(self, message: OutgoingMessage, *, timeout: float) -> ReceivedMessage:
        self._require()
        check_subject(message.subject)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        token = uuid.uuid4().hex
        future: asyncio.Future[ReceivedMessage] = loop.create_future()
        self._replies[token] = future
        try:
            if self._ctl is not None:          # the reply queue must exist before anyone answers
                await self._ready(self._ctl, deadline, f"send the request {message.subject}")
            headers = {**message.headers, H_REPLY_TO: reply_address(self._reply_queue, token)}
            await self.publish(OutgoingMessage(message.subject, message.body, message.message_id, headers),
                               timeout=max(0.001, deadline - loop.time()))
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    return await future
            except TimeoutError:
                raise RequestTimeout(f"no reply to {message.subject} within {timeout:g}s") from None
        finally:
            self._replies.pop(token, None)

    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        self._require()
        try:
            queue, token = parse_reply_address(reply_to)
        except ValueError as exc:
            log.warning("cannot reply: bad reply address", error=str(exc))
            return
        headers = {**message.headers, H_SUBJECT: message.subject}
        # Not mandatory: a requester that gave up (its reply queue is gone) simply misses the reply.
        await self._send("", queue, self._amqp(message, headers, persistent=False, correlation_id=token),
                         mandatory=False, timeout=self.settings.settle_timeout)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._replies.get(message.correlation_id or "")
        if future is None or future.done():
            return                              # the requester gave up already
        raw = message.headers or {}
        subject = subject_of(raw, message.routing_key)
        future.set_result(ReceivedMessage(subject, message.body, incoming_headers(raw, subject)))

    async def _on_unrouted(self, message: AbstractIncomingMessage) -> None:
        self.unrouted_count += 1
        UNROUTED_TOTAL.labels(broker=self.name).inc()
        log.warning("event kept unrouted: no consumer group is bound to it", subject=message.routing_key,
                    queue=UNROUTED_QUEUE)
