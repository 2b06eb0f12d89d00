"""The one table of every event and command name on the bus, with its owner and its model.

Services add their messages here (in ``schemas/<domain>.py`` modules imported by ``schemas.catalog``)
rather than inventing names.  A message type is identified by ``(type, version)``; a newer version of
a model is registered beside the old one, and consumers validate against the version the envelope says.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.envelope import REPLY_TYPE, TYPE_PATTERN, EntityEvent, Envelope, Role

OWNERS = ("core", "inventory", "heartbeat", "alarms", "orchestrator", "dcsync", "agent", "cli")


class MessageKind(StrEnum):
    EVENT = "event"
    COMMAND = "command"


class UnknownMessageType(LookupError):
    """No model is registered for a type (and version)."""


class InvalidMessage(ValueError):
    """An envelope whose ``data`` does not match its registered model."""


@dataclass(frozen=True)
class MessageSpec:
    type: str
    kind: MessageKind
    owner: str
    model: builtins.type[BaseModel]   # builtins.: the field ``type`` above shadows the builtin here
    summary: str
    version: int = 1
    min_role: Role = Role.ADMIN          # commands: the least role allowed to send it
    result_model: builtins.type[BaseModel] | None = None   # commands: the shape of CommandReply.result
    # commands: the reply carries a secret (a new token): the bus never stores it for idempotency, so
    # the handler must be idempotent by itself (e.g. one active token per name).
    reply_has_secrets: bool = False

    @property
    def entity_event(self) -> bool:
        return issubclass(self.model, EntityEvent)


class Registry:
    def __init__(self) -> None:
        self._specs: dict[tuple[str, int], MessageSpec] = {}

    def register(self, spec: MessageSpec) -> MessageSpec:
        if not re.match(TYPE_PATTERN, spec.type):
            raise ValueError(f"bad message type name {spec.type!r}: must match {TYPE_PATTERN}")
        if spec.owner not in OWNERS:
            raise ValueError(f"unknown owner {spec.owner!r} for {spec.type}: one of {OWNERS}")
        if spec.type == REPLY_TYPE:
            raise ValueError(f"{REPLY_TYPE} is the reply to every command, not a message of its own")
        is_cmd = spec.type.startswith("roost.cmd.")
        if is_cmd != (spec.kind is MessageKind.COMMAND):
            raise ValueError(f"{spec.type}: commands and only commands are named roost.cmd.*")
        key = (spec.type, spec.version)
        if key in self._specs:
            raise ValueError(f"{spec.type} v{spec.version} is already registered by {self._specs[key].owner}")
        for other in self._specs.values():
            if other.type == spec.type and other.owner != spec.owner:
                raise ValueError(f"{spec.type} is owned by {other.owner}, not {spec.owner}")
        self._specs[key] = spec
        return spec

    def event(self, type: str, owner: str, model: type[BaseModel], summary: str, *,
              version: int = 1) -> MessageSpec:
        return self.register(MessageSpec(type, MessageKind.EVENT, owner, model, summary, version))

    def command(self, type: str, owner: str, model: type[BaseModel], summary: str, *,
                version: int = 1, min_role: Role = Role.ADMIN,
                result_model: type[BaseModel] | None = None, reply_has_secrets: bool = False) -> MessageSpec:
        return self.register(MessageSpec(type, MessageKind.COMMAND, owner, model, summary, version,
                                         min_role, result_model, reply_has_secrets))

    def get(self, type: str, version: int = 1) -> MessageSpec:
        try:
            return self._specs[(type, version)]
        except KeyError:
            known = sorted(v for t, v in self._specs if t == type)
            if known:
                raise UnknownMessageType(
                    f"{type} has no version {version} (known: {', '.join(map(str, known))})") from None
            raise UnknownMessageType(f"unknown message type {type!r}") from None

    def __contains__(self, type: object) -> bool:
        return any(t == type for t, _ in self._specs)

    def __iter__(self) -> Iterator[MessageSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: (s.type, s.version)))

    def __len__(self) -> int:
        return len(self._specs)

    def validate(self, envelope: Envelope) -> BaseModel:
        """The envelope's data as its registered model, or ``InvalidMessage`` saying what is wrong."""
        spec = self.get(envelope.type, envelope.dataversion)
        try:
            return spec.model.model_validate(envelope.data)
        except ValidationError as exc:
            raise InvalidMessage(f"{envelope.type} v{envelope.dataversion}: {_short(exc)}") from exc

    def envelope(self, type: str, data: BaseModel | dict[str, Any], *, source: str, **attrs: Any) -> Envelope:
        """A new envelope whose data is checked against the registered model now, not at the consumer."""
        spec = self.get(type, attrs.get("dataversion", 1))
        model = data if isinstance(data, spec.model) else spec.model.model_validate(
            data.model_dump() if isinstance(data, BaseModel) else data)
        return Envelope(type=type, source=source, data=model.model_dump(mode="json"), **attrs)


def _short(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "data"
        parts.append(f"{loc}: {err['msg']}")
    more = exc.error_count() - 5
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


REGISTRY = Registry()
