"""The bus every service talks to: envelopes and policy on top of any ``Transport``.

What happens to a delivery, in order (the same on every broker):

1. delivered more than ``max_attempts`` times (its consumers crashed or hung): dead-lettered, saying so;
2. not a valid envelope, an unknown type, or ``data`` that fails its model: dead-lettered at once with
   the validation error (for a command, the sender also gets a ``rejected`` reply saying why);
3. commands only: past the deadline, unauthenticated, or sent by a principal whose role is too low:
   ``rejected`` reply, not executed; the same idempotency key runs once and every repeat gets the
   first reply;
4. the handler runs with the message's correlation id bound for the logs.  It returns: ack.  It raises
   ``RetryLater``: redelivered after the delay.  ``Reject``: dead-lettered (events) or a ``rejected``
   reply (commands), no retries.  Anything else: retried with exponential backoff, dead-lettered with
   the exception once ``max_attempts`` is reached.

Dead letters themselves (``roost.dlq.*``) are never dead-lettered again, only retried.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from pydantic import BaseModel

from schemas import catalog
from schemas.envelope import REPLY_TYPE, CommandReply, Envelope, Principal, ReplyStatus
from schemas.registry import InvalidMessage, MessageKind, Registry, UnknownMessageType
from services.core.bus import codec
from services.core.bus.abc import (
    H_AUTHORIZATION,
    H_TYPE,
    ConsumerOptions,
    OutgoingMessage,
    PublishFailed,
    RawDelivery,
    Subscription,
    Transport,
    Unroutable,
)
from services.core.bus.subjects import backoff, is_dead_letter
from services.core.logging import message_context

log = structlog.get_logger("roost.bus")


def is_unhandled(reply: CommandReply) -> bool:
    """Whether no service handles the command (rather than a service refusing it)."""
    return reply.unhandled


class RetryLater(Exception):
    """Raised by a handler: not now, deliver it again after ``delay`` seconds."""

    def __init__(self, delay: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay}s")
        self.delay = delay


class Reject(Exception):
    """Raised by a handler: this message can never succeed; do not retry."""


@dataclass(frozen=True, slots=True)
class Message:
    """What a handler receives: the envelope, its validated data, and where it is in its deliveries."""

    envelope: Envelope
    data: BaseModel
    subject: str
    group: str
    attempt: int

    @property
    def principal(self) -> Principal | None:
        return self.envelope.principal


EventHandler = Callable[[Message], Awaitable[None]]
CommandResult = CommandReply | BaseModel | dict[str, Any] | None
CommandHandler = Callable[[Message], Awaitable[CommandResult]]


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Principal | None: ...


class IdempotencyStore(Protocol):
    async def run_once(self, key: str, command_type: str,
                       fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]: ...


class BusObserver(Protocol):
    """Where the bus reports what it did (metrics); the default does nothing."""

    def published(self, type: str, outcome: str, seconds: float) -> None: ...

    def consumed(self, type: str, group: str, outcome: str, seconds: float) -> None: ...


class _NullObserver:
    def published(self, type: str, outcome: str, seconds: float) -> None:
        pass

    def consumed(self, type: str, group: str, outcome: str, seconds: float) -> None:
        pass


class Bus:
    def __init__(self, transport: Transport, *, source: str, registry: Registry | None = None,
                 authenticator: Authenticator | None = None, idempotency: IdempotencyStore | None = None,
                 token: str | None = None, observer: BusObserver | None = None,
                 publish_timeout: float = 10.0) -> None:
        self.transport = transport
        self.source = source
        self.registry = registry if registry is not None else catalog.load()
        self.authenticator = authenticator
        self.idempotency = idempotency
        self._token = token
        self.observer: BusObserver = observer or _NullObserver()
        self.publish_timeout = publish_timeout
        self._subscriptions: list[Subscription] = []

    async def connect(self) -> None:
        await self.transport.connect()

    async def close(self) -> None:
        await self.stop_consuming()
        await self.transport.close()

    async def stop_consuming(self) -> None:
        """Stop every subscription of this bus; callbacks in flight finish first."""
        subs, self._subscriptions = self._subscriptions, []
        for sub in subs:
            await sub.stop()

    # -- publishing -------------------------------------------------------------------------

    def envelope(self, type: str, data: BaseModel | dict[str, Any], **attrs: Any) -> Envelope:
        """A new envelope from this service, its data checked against the registry now."""
        return self.registry.envelope(type, data, source=self.source, **attrs)

    async def publish(self, envelope: Envelope, *, subject: str | None = None) -> None:
        """Publish and return once the broker stored it (``PublishFailed`` otherwise)."""
        message = codec.encode(envelope, subject=subject)
        started = time.perf_counter()
        try:
            await self.transport.publish(message, timeout=self.publish_timeout)
        except Exception:
            self.observer.published(envelope.type, "failed", time.perf_counter() - started)
            raise
        self.observer.published(envelope.type, "confirmed", time.perf_counter() - started)

    async def publish_many(self, envelopes: Sequence[Envelope]) -> None:
        """Publish with bounded confirmations in flight; raises the first failure after trying all."""
        messages = [codec.encode(e) for e in envelopes]
        await self.publish_raw(messages)

    async def publish_raw(self, messages: Sequence[OutgoingMessage]) -> list[BaseException | None]:
        started = time.perf_counter()
        results = await self.transport.publish_many(messages, timeout=self.publish_timeout)
        elapsed = (time.perf_counter() - started) / max(1, len(messages))
        failures = [r for r in results if r is not None]
        for message, result in zip(messages, results, strict=True):
            self.observer.published(message.headers.get(H_TYPE, "unknown"),
                                    "confirmed" if result is None else "failed", elapsed)
        if failures:
            raise PublishFailed(f"{len(failures)} of {len(messages)} not confirmed: {failures[0]}")
        return results

    # -- consuming events -------------------------------------------------------------------

    async def subscribe(self, pattern: str, group: str, handler: EventHandler, *,
                        options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        async def on_delivery(delivery: RawDelivery) -> None:
            await self._handle_event(delivery, handler, options)

        sub = await self.transport.subscribe(pattern, group, on_delivery, options)
        self._subscriptions.append(sub)
        return sub

    async def _handle_event(self, delivery: RawDelivery, handler: EventHandler, options: ConsumerOptions) -> None:
        started = time.perf_counter()
        type_ = delivery.headers.get(H_TYPE, "unknown")
        outcome = await self._run_event(delivery, handler, options)
        self.observer.consumed(type_, delivery.group, outcome, time.perf_counter() - started)

    async def _run_event(self, delivery: RawDelivery, handler: EventHandler, options: ConsumerOptions) -> str:
        if delivery.attempt > options.max_attempts and not is_dead_letter(delivery.subject):
            return await self._dead_letter(
                delivery, f"delivered {delivery.attempt} times without being settled "
                          f"(max {options.max_attempts}); its consumers crashed or hung")
        try:
            message = self._parse(delivery)
        except (codec.MalformedMessage, UnknownMessageType, InvalidMessage) as exc:
            return await self._dead_letter(delivery, str(exc))
        with message_context(message.envelope, group=delivery.group, attempt=delivery.attempt):
            try:
                await handler(message)
            except RetryLater as exc:
                if delivery.attempt >= options.max_attempts and not is_dead_letter(delivery.subject):
                    return await self._dead_letter(delivery, f"still not possible after "
                                                             f"{delivery.attempt} attempts: {exc}")
                await delivery.retry(exc.delay)
                return "retry"
            except Reject as exc:
                return await self._dead_letter(delivery, f"rejected by handler: {exc}")
            except Exception as exc:
                return await self._failed(delivery, exc, options)
            await delivery.ack()
            return "ack"

    async def _failed(self, delivery: RawDelivery, exc: Exception, options: ConsumerOptions) -> str:
        reason = f"{type(exc).__name__}: {exc}"
        if delivery.attempt >= options.max_attempts and not is_dead_letter(delivery.subject):
            log.error("handler failed, giving up", error=reason)
            return await self._dead_letter(delivery, f"handler failed {delivery.attempt} times; last: {reason}")
        log.warning("handler failed, will retry", error=reason, exc_info=exc)
        await delivery.retry(backoff(delivery.attempt))
        return "retry"

    async def _dead_letter(self, delivery: RawDelivery, reason: str) -> str:
        if is_dead_letter(delivery.subject):
            log.error("cannot handle a dead letter; retrying later", reason=reason)
            await delivery.retry(backoff(delivery.attempt, cap=300.0))
            return "retry"
        log.error("dead-lettered", subject=delivery.subject, group=delivery.group, reason=reason,
                  message_id=delivery.message_id)
        await delivery.dead_letter(reason)
        return "dead_letter"

    def _parse(self, delivery: RawDelivery) -> Message:
        envelope = codec.decode(delivery.body)
        data = self.registry.validate(envelope)
        return Message(envelope, data, delivery.subject, delivery.group, delivery.attempt)

    # -- commands ---------------------------------------------------------------------------

    async def request(self, command: Envelope, *, timeout: float | None = None, token: str | None = None,
                      subject: str | None = None) -> CommandReply:
        """Send a command and wait for its reply.

        Nobody handles it: a ``rejected`` reply saying so.  No reply in time: ``RequestTimeout``.
        ``token`` (else this bus's own) authenticates the sender to the handling service.
        """
        if not command.is_command:
            raise ValueError(f"{command.type} is not a command (roost.cmd.*)")
        if timeout is None:
            timeout = 30.0
            if command.deadline is not None:
                timeout = max(0.1, (command.deadline.timestamp() - time.time()))
        bearer = token or self._token
        headers = {H_AUTHORIZATION: f"Bearer {bearer}"} if bearer else {}
        try:
            raw = await self.transport.request(codec.encode(command, subject=subject, headers=headers),
                                               timeout=timeout)
        except Unroutable:
            return CommandReply.no_handler(command.id, command.type)
        return CommandReply.model_validate(codec.decode(raw.body).data)

    async def serve(self, pattern: str, group: str, handler: CommandHandler, *,
                    options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        """Handle the commands matching ``pattern`` as consumer group ``group``, replying to each."""
        if self.authenticator is None:
            raise ValueError("a bus that serves commands needs an authenticator")

        async def on_delivery(delivery: RawDelivery) -> None:
            started = time.perf_counter()
            outcome = await self._run_command(delivery, handler, options)
            self.observer.consumed(delivery.headers.get(H_TYPE, "unknown"), delivery.group, outcome,
                                   time.perf_counter() - started)

        sub = await self.transport.subscribe(pattern, group, on_delivery, options)
        self._subscriptions.append(sub)
        return sub

    async def _run_command(self, delivery: RawDelivery, handler: CommandHandler,
                           options: ConsumerOptions) -> str:
        command_type = delivery.headers.get(H_TYPE, "unknown")
        if delivery.attempt > options.max_attempts:
            reason = f"delivered {delivery.attempt} times without an answer; its handlers crashed or hung"
            await self._reply(delivery, None, ReplyStatus.FAILED, reason, command_type=command_type)
            return await self._dead_letter(delivery, reason)
        try:
            envelope = codec.decode(delivery.body)
        except codec.MalformedMessage as exc:
            await self._reply(delivery, None, ReplyStatus.REJECTED, str(exc), command_type=command_type)
            return await self._dead_letter(delivery, str(exc))
        try:
            spec = self.registry.get(envelope.type, envelope.dataversion)
        except UnknownMessageType as exc:
            await self._reply(delivery, envelope, ReplyStatus.REJECTED, f"unknown command type: {exc}")
            await delivery.ack()
            return "rejected"
        if spec.kind is not MessageKind.COMMAND:
            await self._reply(delivery, envelope, ReplyStatus.REJECTED, f"{envelope.type} is not a command")
            await delivery.ack()
            return "rejected"
        if envelope.expired():
            await self._reply(delivery, envelope, ReplyStatus.REJECTED,
                              f"deadline {envelope.deadline.isoformat() if envelope.deadline else ''} "
                              "passed before it could run; not executed")
            await delivery.ack()
            return "rejected"
        principal = await self._authenticate(delivery)
        if principal is None:
            await self._reply(delivery, envelope, ReplyStatus.REJECTED, "unauthenticated: no valid token")
            await delivery.ack()
            return "rejected"
        if not principal.role.allows(spec.min_role):
            await self._reply(delivery, envelope, ReplyStatus.REJECTED,
                              f"{principal.name} ({principal.role}) may not send {envelope.type}: "
                              f"needs {spec.min_role}")
            await delivery.ack()
            return "rejected"
        envelope = envelope.model_copy(update={"principal": principal})
        try:
            data = self.registry.validate(envelope)
        except InvalidMessage as exc:
            await self._reply(delivery, envelope, ReplyStatus.REJECTED, str(exc))
            return await self._dead_letter(delivery, str(exc))
        message = Message(envelope, data, delivery.subject, delivery.group, delivery.attempt)

        async def execute() -> dict[str, Any]:
            return (await self._execute(handler, message)).model_dump(mode="json")

        with message_context(envelope, principal=principal.name, group=delivery.group, attempt=delivery.attempt):
            try:
                if self.idempotency is not None and envelope.idempotencykey and not spec.reply_has_secrets:
                    # the store keeps the reply as JSON data: a repeat gets what the first run answered
                    reply = CommandReply.model_validate(
                        await self.idempotency.run_once(envelope.idempotencykey, envelope.type, execute))
                else:
                    reply = await self._execute(handler, message)
            except RetryLater as exc:
                if delivery.attempt >= options.max_attempts:
                    reason = f"still not possible after {delivery.attempt} attempts: {exc}"
                    await self._reply(delivery, envelope, ReplyStatus.FAILED, reason)
                    return await self._dead_letter(delivery, reason)
                await delivery.retry(exc.delay)
                return "retry"
            except Exception as exc:
                if delivery.attempt >= options.max_attempts:
                    await self._reply(delivery, envelope, ReplyStatus.FAILED, f"{type(exc).__name__}: {exc}")
                return await self._failed(delivery, exc, options)
            await self._send_reply(delivery, envelope, reply)
            await delivery.ack()
            return "ack" if reply.ok else "rejected"

    async def _execute(self, handler: CommandHandler, message: Message) -> CommandReply:
        env = message.envelope
        try:
            result = await handler(message)
        except Reject as exc:
            return CommandReply(status=ReplyStatus.REJECTED, reason=str(exc), command_id=env.id,
                                command_type=env.type)
        if isinstance(result, CommandReply):
            return result
        payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else (result or {})
        return CommandReply(status=ReplyStatus.COMPLETED, result=payload, command_id=env.id, command_type=env.type)

    async def _authenticate(self, delivery: RawDelivery) -> Principal | None:
        header = delivery.headers.get(H_AUTHORIZATION, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token or self.authenticator is None:
            return None
        return await self.authenticator.authenticate(token.strip())

    async def _reply(self, delivery: RawDelivery, envelope: Envelope | None, status: ReplyStatus, reason: str,
                     *, command_type: str = "unknown") -> None:
        reply = CommandReply(status=status, reason=reason,
                             command_id=envelope.id if envelope else delivery.message_id,
                             command_type=envelope.type if envelope else command_type)
        await self._send_reply(delivery, envelope, reply)

    async def _send_reply(self, delivery: RawDelivery, envelope: Envelope | None, reply: CommandReply) -> None:
        if delivery.reply_to is None:
            return
        data = reply.model_dump(mode="json")
        if envelope is not None:
            out = envelope.caused(REPLY_TYPE, data, source=self.source)
        else:
            out = Envelope(type=REPLY_TYPE, source=self.source, data=data, causationid=delivery.message_id)
        await self.transport.reply(delivery.reply_to, codec.encode(out, subject=REPLY_TYPE))
