"""One member of a consumer group on NATS JetStream: a pull loop, a pool of workers, settlement.

The member speaks the pull protocol itself rather than through nats-py's ``fetch()``: ``fetch(n)`` holds
the first message of an idle consumer until the whole batch arrived or the request expired, which makes
the latency of a quiet consumer equal to the fetch timeout.  Here each pull request asks for as many
messages as the member has room for (``prefetch`` minus what it holds), every message goes to the workers
the moment it arrives, and the request carries an idle heartbeat so that a request the server forgot
(a restart: nats-py issue #504) is noticed and replaced.  After a reconnect the member pulls again at
once; a consumer that disappeared (503, "Consumer Deleted") is created again.

Settlement is confirmed by the server (a request on the ack subject: "double ack"); an ack that cannot be
confirmed is logged and the server redelivers after ``ack_wait``, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as CoreSubscription

from services.core.bus.abc import (
    H_DLQ_ATTEMPTS,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    H_DLQ_TIME,
    H_MESSAGE_ID,
    STRIPPED_ON_DEAD_LETTER,
    BusError,
    ConsumeCallback,
    ConsumerOptions,
    OutgoingMessage,
    RawDelivery,
    Subscription,
)
from services.core.bus.subjects import backoff, dlq_subject

if TYPE_CHECKING:
    from services.core.bus.nats import NatsTransport

log = structlog.get_logger("roost.bus.nats")

PULL_EXPIRES = 10.0          # seconds a pull request waits for messages on the server, at least
PULL_EXPIRES_HEARTBEATS = 5  # ... and at least this many idle heartbeats (ConsumerOptions.idle_heartbeat)
SETTLE_LOG_INTERVAL = 5.0   # seconds between two reports of unconfirmed settlements
ACK_PREFIX = "$JS.ACK."
JS_API = "$JS.API"
INTERNAL_HEADER_PREFIX = "Nats-"


def stall_after(idle_heartbeat: float) -> float:
    """Silence after which a pull request is considered lost."""
    return 2 * idle_heartbeat + 1.0


def _one_line(text: str, limit: int = 1000) -> str:
    """Header values cannot hold line breaks."""
    return " ".join(text.split())[:limit]


@dataclass(slots=True)
class _Held:
    msg: Msg
    since: float             # when the server's ack_wait timer last started for it


def delivery_fields(msg: Msg) -> tuple[str, int, int]:
    """(stream, stream sequence, times delivered) of a JetStream message, read off its ack subject; pure.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``, or since
    nats-server 2.9 ``$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream seq>...`` (12
    tokens or more).  nats-py's ``Msg.metadata`` reads the same and more (two objects and a datetime per
    message, a twentieth of a consuming service's time); any other form is left to it, and refused there."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) >= 4 and tokens[0] == "$JS" and tokens[1] == "ACK":
        if len(tokens) == 9:
            return tokens[2], int(tokens[5]), int(tokens[4])
        if len(tokens) >= 11:
            return tokens[4], int(tokens[7]), int(tokens[6])
    meta = msg.metadata
    return meta.stream, meta.sequence.stream, meta.num_delivered


class NatsDelivery(RawDelivery):
    def __init__(self, member: NatsSubscription, msg: Msg) -> None:
        self._member = member
        self._msg = msg
        raw = msg.headers or {}
        stream, sequence, delivered = delivery_fields(msg)
        self.subject = msg.subject
        self.body = msg.data
        self.headers = {k: v for k, v in raw.items() if not k.startswith(INTERNAL_HEADER_PREFIX)}
        self._origin = f"{stream}:{sequence}"
        self.message_id = self.headers.get(H_MESSAGE_ID) or raw.get("Nats-Msg-Id") or self._origin
        self.group = member.group
        self._attempt = delivered
        self.settled = False

    @property
    def attempt(self) -> int:
        return self._attempt

    async def ack(self) -> None:
        await self._settle(b"+ACK", "ack", confirm=self._member.options.confirm_acks)

    async def retry(self, delay: float) -> None:
        payload = b"-NAK"
        if delay > 0:
            payload += b" " + json.dumps({"delay": int(delay * 1_000_000_000)}).encode()
        await self._settle(payload, "nak")

    async def dead_letter(self, reason: str) -> None:
        if self.settled:
            raise RuntimeError("delivery settled twice")
        headers = {k: v for k, v in self.headers.items() if k not in STRIPPED_ON_DEAD_LETTER}
        headers.setdefault(H_MESSAGE_ID, self.message_id)
        headers.update({
            H_DLQ_REASON: _one_line(reason), H_DLQ_SUBJECT: self.subject, H_DLQ_GROUP: self.group,
            H_DLQ_ATTEMPTS: str(self.attempt), H_DLQ_TIME: datetime.now(UTC).isoformat(),
        })
        copy = OutgoingMessage(dlq_subject(self.group), self.body, self.message_id, headers)
        # Unique per stored original and group: a retried dead-lettering of this delivery is deduplicated,
        # the same message id dead-lettered by another group or after a replay is not.
        dedup_id = f"{self.message_id}|dlq|{self.group}|{self._origin}"
        await self._member.transport.publish_dead_letter(copy, dedup_id, timeout=self._member.settle_timeout)
        await self._settle(b"+TERM " + _one_line(reason, 200).encode(), "term")

    async def _settle(self, payload: bytes, what: str, *, confirm: bool = True) -> None:
        if self.settled:
            raise RuntimeError("delivery settled twice")
        self.settled = True
        transport = self._member.transport
        if transport.closing and not transport.connected:    # shutting down during an outage: do not wait
            self._member.settle_failed(what, self.message_id, BusError("not connected"))
            return
        try:
            nc = transport.client()
            if confirm:
                await nc.request(self._msg.reply, payload, timeout=self._member.settle_timeout)
            else:
                await nc.publish(self._msg.reply, payload)
        except (BusError, nats.errors.Error, TimeoutError, OSError) as exc:
            self._member.settle_failed(what, self.message_id, exc)


class NatsSubscription(Subscription):
    """One member of group ``group`` on the durable consumer ``consumer`` of ``stream``."""

    def __init__(self, transport: NatsTransport, stream: str, consumer: str, pattern: str, group: str,
                 callback: ConsumeCallback, options: ConsumerOptions) -> None:
        self.transport = transport
        self.stream = stream
        self.consumer = consumer
        self.pattern = pattern
        self.group = group
        self._callback = callback
        self._options = options
        self._prefetch = max(1, options.prefetch)
        self._refill = max(1, self._prefetch // 2)
        self.settle_timeout = transport.settle_timeout
        self._next_subject = f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._sub: CoreSubscription | None = None
        self._held: deque[_Held] = deque()
        self._in_hand = 0                     # received and not yet settled (queued + running)
        self._running = 0
        self._last_start = time.monotonic()
        self._room = asyncio.Event()
        # the workers waiting for a message, each on its own future: a message wakes one of them (an Event
        # shared by all woke every idle worker for every message: 384 wake-ups per message at the alarms
        # service's concurrency)
        self._idle: deque[asyncio.Future[None]] = deque()
        self._stop = asyncio.Event()
        self._req_id = 0
        self._req_batch = 0
        self._req_received = 0
        self._req_status: str | None = None
        self._req_detail = ""
        self._req_end = asyncio.Event()
        self._activity = time.monotonic()
        self._alive_at = time.monotonic()      # the last time the server showed us this consumer exists
        self._reconnected = False
        self._stopped = False
        self._settle_failures = 0
        self._settle_logged_at = -SETTLE_LOG_INTERVAL
        self._pull_task: asyncio.Task[None] | None = None
        self._keeper_task: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._subscribe_inbox()
        self._update_room()
        self._pull_task = asyncio.create_task(self._pull_loop(), name=f"nats-pull-{self.consumer}")
        self._keeper_task = asyncio.create_task(self._keeper(), name=f"nats-keeper-{self.consumer}")
        self._workers = [asyncio.create_task(self._worker(), name=f"nats-worker-{self.consumer}-{i}")
                         for i in range(max(1, self._options.concurrency))]

    async def _subscribe_inbox(self) -> None:
        nc = self.transport.client()
        self._inbox = self.transport.new_inbox()
        self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def _resubscribe_inbox(self) -> None:
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        await self._subscribe_inbox()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake_all()
        if self._pull_task is not None:
            await asyncio.gather(self._pull_task, return_exceptions=True)
        if self._keeper_task is not None:
            self._keeper_task.cancel()
            await asyncio.gather(self._keeper_task, return_exceptions=True)
        # Unsubscribe and make a round trip: the server delivers nothing more to our pull requests (it
        # checks the reply subject's interest) and whatever it sent before is in self._held.
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                if self.transport.connected:
                    await asyncio.wait_for(sub.drain(), self.settle_timeout)  # type: ignore[no-untyped-call]
                else:
                    await sub.unsubscribe()
            except (nats.errors.Error, TimeoutError, OSError):
                pass
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._give_back()
        self.transport.forget(self)

    def kill(self) -> None:
        """What a crash does: everything stops at once, nothing is settled."""
        self._stopped = True
        self._wake_all()
        for task in [self._pull_task, self._keeper_task, *self._workers]:
            if task is not None:
                task.cancel()
        self._held.clear()

    def _wake_all(self) -> None:
        self._stop.set()
        self._req_end.set()
        self._room.set()
        self._wake(everyone=True)

    async def _give_back(self) -> None:
        """Hand what was received but never started back to the group's other members at once."""
        if not self._held:
            return
        if not self.transport.connected:
            log.info("not connected: unstarted messages return to the group after ack_wait", group=self.group,
                     count=len(self._held))
            while self._held:
                self._held.popleft()
                self._release()
            return
        try:
            nc = self.transport.client()
            while self._held:
                held = self._held.popleft()
                await nc.publish(held.msg.reply, b"-NAK")
                self._release()
            await nc.flush(timeout=int(max(1, self.settle_timeout)))
        except (BusError, nats.errors.Error, TimeoutError, OSError) as exc:
            log.warning("could not hand unstarted messages back; JetStream redelivers them after ack_wait",
                        group=self.group, error=type(exc).__name__)
            self._held.clear()

    def settle_failed(self, what: str, message_id: str, exc: BaseException) -> None:
        """Log unconfirmed settlements, at most once per interval (an outage fails them all at once)."""
        self._settle_failures += 1
        now = time.monotonic()
        if now - self._settle_logged_at < SETTLE_LOG_INTERVAL:
            return
        log.warning("settlement not confirmed by JetStream; it redelivers after ack_wait", what=what,
                    group=self.group, message_id=message_id, error=type(exc).__name__,
                    unconfirmed_since_last_report=self._settle_failures)
        self._settle_logged_at = now
        self._settle_failures = 0

    def on_reconnected(self) -> None:
        """The server may have forgotten our pull request (a restart): pull again now."""
        self._reconnected = True
        self._req_end.set()

    # -- receiving ----------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:                         # a status from the server about one pull request
            token = msg.subject.rsplit(".", 1)[-1]   # statuses come on the request's own reply subject
            req = int(token) if token.isdigit() else -1
            status = msg.headers.get("Status") if msg.headers else None
            if status is not None and req == self._req_id:
                self._activity = time.monotonic()
                if status in ("100", "404", "408"):
                    self._alive_at = self._activity
                if status != "100":               # 100: idle heartbeat
                    self._req_status = status
                    self._req_detail = (msg.headers or {}).get("Description", "")
                    self._req_end.set()
            return
        if not msg.reply.startswith(ACK_PREFIX):
            return
        now = time.monotonic()
        self._activity = now
        self._alive_at = now
        self._held.append(_Held(msg, now))
        self._in_hand += 1
        self._update_room()
        self._wake()
        # Messages keep their own subject, so they cannot be told apart by request; they count against
        # the current one (one request is outstanding at a time, except right after a reconnect).
        self._req_received += 1
        if self._req_received >= self._req_batch:
            self._req_status = "done"
            self._req_end.set()

    def _update_room(self) -> None:
        # Pull again once half the prefetch is free, not for every message settled: one pull request per
        # message would double the traffic and the work of a busy consumer.
        if self._in_hand <= self._prefetch - self._refill:
            self._room.set()
        elif not self._stop.is_set():
            self._room.clear()

    def _release(self) -> None:
        self._in_hand = max(0, self._in_hand - 1)
        self._update_room()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _pull_loop(self) -> None:
        failures = 0
        need_consumer = False
        while not self._stop.is_set():
            await self._room.wait()
            if self._stop.is_set():
                return
            if not self.transport.connected:
                up = asyncio.ensure_future(self.transport.wait_up())
                stop = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({up, stop}, return_when=asyncio.FIRST_COMPLETED)
                up.cancel()
                stop.cancel()
                continue
            try:
                if need_consumer:
                    # Margin for clock differences with the server; duplicates are harmless, gaps are not.
                    since = datetime.now(UTC) - timedelta(seconds=time.monotonic() - self._alive_at + 5.0)
                    await self.transport.recover_consumer(self.pattern, self.group, self._options, since)
                    need_consumer = False
                if failures >= 2:
                    await self._resubscribe_inbox()
                await self._request()
            except (BusError, nats.errors.Error, TimeoutError, OSError) as exc:
                failures += 1
                log.warning("cannot pull from JetStream; trying again", group=self.group,
                            consumer=self.consumer, error=str(exc) or type(exc).__name__)
                await self._pause(backoff(failures, base=0.1, cap=5.0))
                continue
            outcome = await self._await_end()
            if outcome in ("done", "404", "408", "reconnected", "stopping"):
                failures = 0
                continue
            failures += 1
            if outcome == "503" or "Consumer Deleted" in self._req_detail:
                need_consumer = True               # the server lost the consumer (wiped store, deleted)
            if outcome == "stalled":
                log.warning("pull request went silent; pulling again", group=self.group, consumer=self.consumer)
                if failures >= 2:
                    need_consumer = True
            elif outcome != "503":
                log.info("pull request ended", group=self.group, consumer=self.consumer, status=outcome,
                         detail=self._req_detail)
            await self._pause(backoff(failures, base=0.05, cap=5.0))

    async def _request(self) -> None:
        nc = self.transport.client()
        self._req_id += 1
        self._req_batch = max(1, self._prefetch - self._in_hand)
        self._req_received = 0
        self._req_status = None
        self._req_detail = ""
        self._reconnected = False
        self._req_end.clear()
        self._activity = time.monotonic()
        heartbeat = self._options.idle_heartbeat
        expires = max(PULL_EXPIRES, PULL_EXPIRES_HEARTBEATS * heartbeat)
        body = json.dumps({"batch": self._req_batch, "expires": int(expires * 1_000_000_000),
                           "idle_heartbeat": int(heartbeat * 1_000_000_000)}).encode()
        await nc.publish(self._next_subject, body, reply=f"{self._inbox}.{self._req_id}")

    async def _await_end(self) -> str:
        while True:
            if self._stop.is_set():
                return "stopping"
            if self._reconnected:
                return "reconnected"
            if self._req_status is not None:
                return self._req_status
            remaining = self._activity + stall_after(self._options.idle_heartbeat) - time.monotonic()
            if remaining <= 0:
                return "stalled"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._req_end.wait(), remaining)

    # -- handling -----------------------------------------------------------------------------

    @property
    def options(self) -> ConsumerOptions:
        return self._options

    def _wake(self, *, everyone: bool = False) -> None:
        """A message is held: one waiting worker takes it (a busy one looks at the held messages before it
        waits, so none is left behind when no worker waits).  ``everyone``: stopping."""
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._held and not self._stop.is_set():
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                await waiter
            if self._stop.is_set():
                return
            held = self._held.popleft()
            self._last_start = time.monotonic()
            self._running += 1
            try:
                delivery = NatsDelivery(self, held.msg)
            except Exception as exc:                   # not a JetStream message after all
                self._running -= 1
                self._release()
                log.error("cannot read a JetStream delivery", group=self.group, error=str(exc))
                continue
            try:
                await self._callback(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("consumer callback raised; the message will be delivered again", group=self.group,
                          subject=delivery.subject, message_id=delivery.message_id,
                          error=f"{type(exc).__name__}: {exc}")
                if not delivery.settled:
                    await delivery.retry(backoff(delivery.attempt, cap=30.0))
            else:
                if not delivery.settled:               # returned without settling: deliver it again
                    await delivery.retry(0)
            finally:
                self._running -= 1
                self._release()

    async def _keeper(self) -> None:
        """Tell the server that messages waiting here for a free worker are not abandoned.

        Only while the workers make progress: a member whose callbacks hang lets the server hand its
        queued messages to the other members after ``ack_wait``.
        """
        ack_wait = self._options.ack_wait
        interval = max(0.2, ack_wait / 3)
        while not self._stop.is_set():
            await self._pause(interval)
            now = time.monotonic()
            if not self._held or now - self._last_start > ack_wait:
                continue
            try:
                nc = self.transport.client()
                for held in list(self._held):
                    if now - held.since >= interval:
                        held.since = now
                        await nc.publish(held.msg.reply, b"+WPI")
            except (BusError, nats.errors.Error, OSError):
                continue

    def __repr__(self) -> str:
        return f"NatsSubscription({self.group!r}, {self.pattern!r}, consumer={self.consumer})"
