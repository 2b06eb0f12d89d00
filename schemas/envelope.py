"""The envelope every message on the roost bus travels in.

CloudEvents 1.0 attributes (``id``, ``source``, ``type``, ``specversion``, ``time``, ``subject``,
``datacontenttype``) plus roost's extension attributes.  CloudEvents extension names are lower-case
alphanumerics, so the roost extensions are spelled ``correlationid``, ``causationid``, ``principal``,
``deadline``, ``idempotencykey`` and ``dataversion``.

The envelope is pure data: no I/O, no broker specifics.  Encoding to bytes lives in
``services.core.bus.codec``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

TYPE_PATTERN = r"^roost(\.[a-z][a-z0-9_]*)+$"


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class Role(StrEnum):
    """What a principal may do.  ``admin`` changes the system, ``reader`` only looks."""

    READER = "reader"
    ADMIN = "admin"

    def allows(self, required: Role) -> bool:
        order = [Role.READER, Role.ADMIN]
        return order.index(self) >= order.index(required)


class Principal(BaseModel):
    """Who caused a message: an operator's API token, a service or a host agent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: Role
    kind: Literal["user", "service", "agent"] = "user"


class Envelope(BaseModel):
    """One message on the bus.  ``data`` is validated against the registry's model for ``type``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=256, description="the producing service, e.g. roost/inventory")
    type: str = Field(pattern=TYPE_PATTERN, max_length=128)
    time: datetime = Field(default_factory=utcnow)
    subject: str | None = Field(default=None, max_length=256, description="the entity, e.g. host/controller-0")
    datacontenttype: Literal["application/json"] = "application/json"
    dataversion: int = Field(default=1, ge=1, description="version of the data model for this type")
    correlationid: str = Field(default_factory=new_id, min_length=1, max_length=128)
    causationid: str | None = Field(default=None, max_length=128)
    principal: Principal | None = None
    deadline: datetime | None = Field(default=None, description="commands: refuse to execute after this")
    idempotencykey: str | None = Field(default=None, max_length=256, description="commands: run once per key")
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("time", "deadline")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("timestamps must carry a timezone")
        return value

    @property
    def is_command(self) -> bool:
        return self.type.startswith("roost.cmd.")

    def expired(self, now: datetime | None = None) -> bool:
        return self.deadline is not None and (now or utcnow()) > self.deadline

    def caused(self, type: str, data: BaseModel | dict[str, Any], *, source: str,
               subject: str | None = None, **extra: Any) -> Envelope:
        """A message caused by this one: same correlation id, causation id = this id."""
        payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
        return Envelope(type=type, source=source, subject=subject, data=payload,
                        correlationid=self.correlationid, causationid=self.id,
                        principal=self.principal, **extra)

    @classmethod
    def command(cls, type: str, data: BaseModel | dict[str, Any], *, source: str,
                timeout: float = 30.0, idempotencykey: str | None = None,
                subject: str | None = None, principal: Principal | None = None) -> Self:
        """A command with a deadline ``timeout`` seconds from now and an idempotency key."""
        payload = data.model_dump(mode="json") if isinstance(data, BaseModel) else data
        return cls(type=type, source=source, subject=subject, data=payload, principal=principal,
                   deadline=utcnow() + timedelta(seconds=timeout),
                   idempotencykey=idempotencykey or new_id())


class ReplyStatus(StrEnum):
    ACCEPTED = "accepted"      # the command was taken and will complete later (progress follows as events)
    COMPLETED = "completed"    # the command ran; ``result`` holds what it produced
    REJECTED = "rejected"      # refused: ``reason`` says why (unauthorised, expired, invalid, not allowed)
    FAILED = "failed"          # tried and failed: ``reason`` says why


class CommandReply(BaseModel):
    """The ``data`` of every reply to a command (type ``roost.reply``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: ReplyStatus
    reason: str | None = None
    result: dict[str, Any] = Field(default_factory=dict)
    command_id: str
    command_type: str
    _unhandled: bool = PrivateAttr(default=False)

    @property
    def ok(self) -> bool:
        return self.status in (ReplyStatus.ACCEPTED, ReplyStatus.COMPLETED)

    @classmethod
    def no_handler(cls, command_id: str, command_type: str) -> CommandReply:
        """The rejected reply a sender's bus makes up when no service consumes the command.  It never travels
        on the wire, and ``unhandled`` tells it from a service's own refusal, whatever that refusal says."""
        reply = cls(status=ReplyStatus.REJECTED, reason=f"no service handles {command_type}",
                    command_id=command_id, command_type=command_type)
        reply._unhandled = True
        return reply

    @property
    def unhandled(self) -> bool:
        """No service consumes the command (rather than a service refusing it)."""
        return self._unhandled


REPLY_TYPE = "roost.reply"


class EntityEvent(BaseModel):
    """Base of every event about one entity (a host, an alarm instance, a subcloud).

    ``version`` only grows for one entity; a consumer never lets an older version overwrite a
    newer one (see ``services.core.versions``).
    """

    model_config = ConfigDict(extra="forbid")

    entity_id: str = Field(min_length=1, max_length=256)
    version: int = Field(ge=1)
