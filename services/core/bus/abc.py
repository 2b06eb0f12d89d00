"""Every public interface of the bus, in one place.

Two layers:

* a ``Transport`` moves bytes: it publishes with broker confirmation, keeps durable consumer groups,
  redelivers, delays retries, dead-letters with a reason and does request/reply.  There is one per
  broker (``rabbitmq.py``, ``nats.py``) and an in-memory one (``memory.py``).  Transports know nothing
  of envelopes, models, metrics or logs.
* the ``Bus`` (``bus.py``) sits on a transport and speaks envelopes: it encodes and validates, applies
  the retry / dead-letter policy, checks command deadlines, authorisation and idempotency, binds the
  correlation id for logs and counts everything for Prometheus.

Subjects are dot-separated tokens; patterns use NATS wildcards on every broker: ``*`` matches one
token, ``>`` (last token only) matches one or more.  Dead letters go to ``roost.dlq.<group>``.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

# Transport headers roost itself sets and reads (all lower case).
H_MESSAGE_ID = "x-roost-id"              # the envelope id; the broker-side dedup key
H_TYPE = "x-roost-type"                  # the envelope type, for inspection without parsing
H_REPLY_TO = "x-roost-reply-to"          # where a command's reply goes (transport-specific address)
H_AUTHORIZATION = "authorization"        # "Bearer <token>" on commands; never logged, never dead-lettered
H_ATTEMPT = "x-roost-attempt"            # deliveries so far, carried across republished retries
H_DLQ_REASON = "x-roost-dlq-reason"      # why it was dead-lettered
H_DLQ_SUBJECT = "x-roost-dlq-subject"    # the subject it was published on
H_DLQ_GROUP = "x-roost-dlq-group"        # the consumer group that gave up
H_DLQ_ATTEMPTS = "x-roost-dlq-attempts"  # how many deliveries it had
H_DLQ_TIME = "x-roost-dlq-time"          # when (ISO 8601, UTC)

DLQ_PREFIX = "roost.dlq"
COMMAND_PREFIX = "roost.cmd"

# Headers that never travel into a dead-letter place (they carry secrets or are transport-internal).
STRIPPED_ON_DEAD_LETTER = frozenset({H_AUTHORIZATION, H_REPLY_TO})


class BusError(Exception):
    """Base of every bus error."""


class NotConnected(BusError):
    """The transport has no connection to its broker (yet, or any more)."""


class PublishFailed(BusError):
    """The broker did not confirm a publish (nack, timeout, connection lost): it may not be stored."""


class Unroutable(BusError):
    """A command whose subject no consumer group is bound to."""


class RequestTimeout(BusError):
    """No reply to a request within its timeout."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    subject: str
    body: bytes
    message_id: str
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A message as received outside a consumer group (a reply to a request)."""

    subject: str
    body: bytes
    headers: Mapping[str, str]


class RawDelivery(abc.ABC):
    """One delivery of one message to one consumer of a group.  Settle it exactly once."""

    subject: str
    body: bytes
    headers: Mapping[str, str]
    message_id: str
    group: str

    @property
    @abc.abstractmethod
    def attempt(self) -> int:
        """1 on the first delivery; grows with every redelivery and every retry."""

    @property
    def reply_to(self) -> str | None:
        return self.headers.get(H_REPLY_TO)

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: never deliver it to this group again."""

    @abc.abstractmethod
    async def retry(self, delay: float) -> None:
        """Deliver it again to this group, no sooner than ``delay`` seconds from now."""

    @abc.abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Move it to ``roost.dlq.<group>`` with the reason (confirmed), then settle the original."""


ConsumeCallback = Callable[[RawDelivery], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    prefetch: int = 100            # deliveries the broker hands out before acks come back
    concurrency: int = 1           # callbacks running at once; 1 keeps the order of a subject
    max_attempts: int = 5          # deliveries before the bus layer dead-letters
    ack_wait: float = 30.0         # seconds a delivery may stay unsettled before the broker
                                   # redelivers it (NATS AckWait; RabbitMQ redelivers on channel loss)
    idle_heartbeat: float = 2.0    # NATS: seconds between the server's signs of life on a waiting pull
                                   # request (one silent for twice this + 1 s is pulled again); every
                                   # idle consumer costs the server and the client one message this often
    confirm_acks: bool = True      # NATS: wait for the server to confirm each ack (a round trip per message);
                                   # unconfirmed, an ack lost on the way is a redelivery after ack_wait,
                                   # harmless to a consumer that drops duplicates (nak and term: confirmed)
    state_in_memory: bool = False  # NATS: the server keeps the group's consumer state (what is acked) in memory
                                   # instead of writing it to a file after acks; the consumer is gone when the
                                   # server restarts, and the member creates it again from when it last saw it
                                   # alive, so the messages since then come again.  For idempotent groups that
                                   # are many (one per subcloud agent): at 1,000 agents those state files were
                                   # half of nats-server's work.  RabbitMQ: no effect.


class Subscription(abc.ABC):
    pattern: str
    group: str

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop taking new deliveries, wait for the callbacks in flight, release the consumer.

        Unsettled deliveries go back to the broker; the group's durable queue/consumer stays.
        """


class Transport(abc.ABC):
    """Moves bytes between services through a broker, at least once."""

    name: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and declare what the transport needs.  Raises ``NotConnected`` with a clear reason."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every subscription (in-flight callbacks finish), then disconnect."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Drop the broker connection at once, settling nothing: what a crash does.

        Unsettled deliveries are redelivered by the broker to the group's other members (RabbitMQ: when
        the channel closes; NATS: after ``ack_wait``).  For emergency stops and for the crash tests.
        """

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the broker connection is up (readiness reports this)."""

    @abc.abstractmethod
    async def publish(self, message: OutgoingMessage, *, timeout: float = 10.0) -> None:
        """Publish and return once the broker has stored it.

        Commands (``roost.cmd.*``) whose subject no group is bound to raise ``Unroutable``; events
        nobody is bound to yet are kept by the broker and counted, never dropped.
        Raises ``PublishFailed`` when the broker did not confirm in time.
        """

    @abc.abstractmethod
    async def publish_many(self, messages: Sequence[OutgoingMessage], *,
                           timeout: float = 10.0) -> list[BaseException | None]:
        """Publish with a bounded number awaiting confirmation at once.

        Returns one entry per message, in order: ``None`` when confirmed, else the error.
        """

    @abc.abstractmethod
    async def subscribe(self, pattern: str, group: str, callback: ConsumeCallback,
                        options: ConsumerOptions = ConsumerOptions()) -> Subscription:
        """Join the durable consumer group ``group`` for ``pattern``.

        Members of one group compete for messages; each group gets every message.  The group's
        queue/consumer outlives the process: what arrives while no member runs waits for one.
        """

    @abc.abstractmethod
    async def delete_group(self, pattern: str, group: str) -> None:
        """Remove a group's durable queue/consumer for ``pattern`` and what waits in it (a retired consumer)."""

    @abc.abstractmethod
    async def request(self, message: OutgoingMessage, *, timeout: float) -> ReceivedMessage:
        """Publish a command with a reply address and wait for one reply.

        Raises ``Unroutable`` at once when nobody handles the subject, ``RequestTimeout`` after ``timeout``.
        """

    @abc.abstractmethod
    async def reply(self, reply_to: str, message: OutgoingMessage) -> None:
        """Send a reply to the address a request carried in ``H_REPLY_TO``."""
