"""Messages owned by ``core``, the runtime every service shares.

* ``roost.cmd.system.ping``: is a service there and which version is it?
* ``roost.cmd.dlq.*``: the operator's dead-letter tooling (``roost dlq list|show|replay|purge``),
  answered by the dead-letter keeper (``services.core.deadletters``).
* ``roost.cmd.token.*``: API tokens for operators and tools (``roost token create|list|revoke``).
* ``roost.system.dead_letters_high`` / ``..._normal``: the dead-letter depth passed its threshold, or
  fell back below it.
* ``roost.system.service_started`` / ``..._stopping``: a service instance came up or is going away
  (what ``roost status`` listens for).

Every model forbids unknown fields, every timestamp must carry a timezone, and every string and number
has explicit bounds, so a malformed message is refused where it is parsed, with the field named.
Importing this module registers the messages in ``schemas.registry.REGISTRY``; import
``schemas.catalog`` rather than this module to get every domain's messages at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.envelope import Role
from schemas.registry import REGISTRY, Registry

OWNER = "core"

SERVICE_NAME_PATTERN = r"^[a-z][a-z0-9_-]*$"
REASON_MAX = 4096
"""Longest dead-letter reason a summary carries; longer ones are cut (the stored row keeps all of it)."""

GroupName = Annotated[str, Field(min_length=1, max_length=128, description="a consumer group")]
DeadLetterId = Annotated[str, Field(min_length=1, max_length=64, description="a dead letter's id, as listed")]
Count = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- system ----------------------------------------------------------------------------------------


class Ping(_Model):
    """Ask a service to answer: it is up and consuming commands.  Carries nothing."""


class Pong(_Model):
    """A service's answer to ``roost.cmd.system.ping``."""

    service: str = Field(min_length=1, max_length=64, pattern=SERVICE_NAME_PATTERN,
                         description="the answering service, e.g. inventory")
    version: str = Field(min_length=1, max_length=64, description="its software version")
    time: AwareDatetime = Field(description="its clock when it answered")


class _ServiceLifecycle(_Model):
    service: str = Field(min_length=1, max_length=64, pattern=SERVICE_NAME_PATTERN,
                         description="the service, e.g. inventory")
    version: str = Field(min_length=1, max_length=64, description="its software version")
    instance: str = Field(min_length=1, max_length=128,
                          description="this replica, unique among the service's replicas (e.g. host:pid)")


class ServiceStarted(_ServiceLifecycle):
    """A service instance is up: connected to the bus and its database, consuming."""


class ServiceStopping(_ServiceLifecycle):
    """A service instance is stopping gracefully: it no longer takes new work."""


# -- dead letters ----------------------------------------------------------------------------------


class DeadLetterSummary(_Model):
    """One dead letter as ``roost dlq list`` shows it."""

    id: DeadLetterId
    group: GroupName = Field(description="the consumer group that gave up on it")
    subject: str = Field(min_length=1, max_length=256, description="the subject it was published on")
    type: str | None = Field(default=None, max_length=128,
                             description="the envelope type, when the message said (absent if unparseable)")
    reason: str = Field(min_length=1, max_length=REASON_MAX,
                        description=f"why it was dead-lettered (cut to {REASON_MAX} characters)")
    attempts: int = Field(ge=0, description="deliveries before it was dead-lettered")
    dead_lettered_at: AwareDatetime

    @field_validator("reason", mode="before")
    @classmethod
    def _cut(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) > REASON_MAX:
            return value[:REASON_MAX - 1] + "…"
        return value


class DeadLetter(DeadLetterSummary):
    """One dead letter in full, as ``roost dlq show`` prints it.

    ``envelope`` is the message as it was published, when its body was JSON; otherwise ``body`` holds
    the raw body as text.  The transport headers never include credentials (they are stripped before
    a message is dead-lettered).
    """

    headers: dict[str, str] = Field(default_factory=dict, description="the transport headers it carried")
    envelope: dict[str, Any] | None = Field(default=None, description="the message, when its body was JSON")
    body: str | None = Field(default=None, max_length=1_048_576,
                             description="the raw body as text, when it was not JSON")
    replayed_at: AwareDatetime | None = Field(default=None, description="when it was last replayed")
    replay_count: int = Field(default=0, ge=0)


class DlqList(_Model):
    """List the dead letters waiting (not yet replayed), oldest first."""

    group: GroupName | None = Field(default=None, description="only this consumer group's")
    limit: int = Field(default=50, ge=1, le=1000, description="at most this many")


class DlqListResult(_Model):
    """The result of ``roost.cmd.dlq.list``."""

    items: list[DeadLetterSummary] = Field(default_factory=list, max_length=1000)


class DlqShow(_Model):
    """Show one dead letter in full."""

    id: DeadLetterId


class DlqSelection(_Model):
    """Which dead letters an operation applies to: exactly one of ``ids``, ``group`` or ``all``."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["ids"], "properties": {"ids": {"minItems": 1}}},
        {"required": ["group"], "properties": {"group": {"type": "string"}}},
        {"required": ["all"], "properties": {"all": {"const": True}}},
    ]})

    ids: list[DeadLetterId] = Field(default_factory=list, max_length=1000, description="these dead letters")
    group: GroupName | None = Field(default=None, description="every dead letter of this consumer group")
    all: bool = Field(default=False, description="every dead letter waiting")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        chosen = [name for name, given in (("ids", bool(self.ids)), ("group", self.group is not None),
                                           ("all", self.all)) if given]
        if len(chosen) != 1:
            detail = "none was given" if not chosen else f"got {' and '.join(chosen)}"
            raise ValueError(f"select dead letters by exactly one of ids, group or all ({detail})")
        return self


class DlqReplay(DlqSelection):
    """Publish the selected dead letters again on their original subjects."""


class DlqReplayResult(_Model):
    """The result of ``roost.cmd.dlq.replay``."""

    replayed: Count


class DlqPurge(DlqSelection):
    """Delete the selected dead letters for good."""


class DlqPurgeResult(_Model):
    """The result of ``roost.cmd.dlq.purge``."""

    purged: Count


class DeadLettersHigh(_Model):
    """More dead letters wait than the threshold allows (announced once until the depth falls back)."""

    depth: Count = Field(description="dead letters waiting, all groups")
    threshold: Count
    groups: dict[GroupName, Count] = Field(default_factory=dict, description="dead letters waiting per group")


class DeadLettersNormal(_Model):
    """The dead-letter depth fell back below the threshold."""

    depth: Count = Field(description="dead letters waiting, all groups")
    threshold: Count


# -- registration ----------------------------------------------------------------------------------


# -- API tokens ------------------------------------------------------------------------------------

TokenName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$",
                                 description="who or what the token is for, e.g. alice or grafana")]


class TokenCreate(_Model):
    """Create an API token.  One active token per name: a repeat of the same name is refused."""

    name: TokenName
    role: Role = Role.READER
    expires_in_days: float | None = Field(default=None, gt=0, le=3650, description="none: it never expires")


class TokenCreated(_Model):
    """The new token: shown in this reply only, stored nowhere in clear."""

    name: TokenName
    role: Role
    token: str = Field(min_length=1, max_length=256)
    expires_at: AwareDatetime | None = None


class TokenList(_Model):
    """List the API tokens (names, roles, dates; never a token)."""

    include_revoked: bool = False


class TokenSummary(_Model):
    name: TokenName
    role: Role
    kind: str = Field(max_length=16)
    created_at: AwareDatetime
    last_used_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    revoked_at: AwareDatetime | None = None


class TokenListResult(_Model):
    items: list[TokenSummary]


class TokenRevoke(_Model):
    """Revoke a name's active token (it stops working within the services' few-second cache)."""

    name: TokenName


class TokenRevoked(_Model):
    revoked: bool


def register(registry: Registry) -> None:
    """Register core's messages in ``registry`` (done for ``REGISTRY`` when this module is imported)."""
    registry.command("roost.cmd.system.ping", OWNER, Ping, "Check that a service answers, and its version",
                     min_role=Role.READER, result_model=Pong)
    registry.command("roost.cmd.dlq.list", OWNER, DlqList, "List the dead letters waiting",
                     min_role=Role.READER, result_model=DlqListResult)
    registry.command("roost.cmd.dlq.show", OWNER, DlqShow, "Show one dead letter in full",
                     min_role=Role.READER, result_model=DeadLetter)
    registry.command("roost.cmd.dlq.replay", OWNER, DlqReplay, "Publish dead letters again on their subjects",
                     min_role=Role.ADMIN, result_model=DlqReplayResult)
    registry.command("roost.cmd.dlq.purge", OWNER, DlqPurge, "Delete dead letters for good",
                     min_role=Role.ADMIN, result_model=DlqPurgeResult)
    registry.command("roost.cmd.token.create", OWNER, TokenCreate, "Create an API token, shown once",
                     min_role=Role.ADMIN, result_model=TokenCreated, reply_has_secrets=True)
    registry.command("roost.cmd.token.list", OWNER, TokenList, "List API tokens (never the tokens themselves)",
                     min_role=Role.ADMIN, result_model=TokenListResult)
    registry.command("roost.cmd.token.revoke", OWNER, TokenRevoke, "Revoke a name's active API token",
                     min_role=Role.ADMIN, result_model=TokenRevoked)
    registry.event("roost.system.dead_letters_high", OWNER, DeadLettersHigh,
                   "The dead-letter depth passed its threshold")
    registry.event("roost.system.dead_letters_normal", OWNER, DeadLettersNormal,
                   "The dead-letter depth fell back below its threshold")
    registry.event("roost.system.service_started", OWNER, ServiceStarted, "A service instance started")
    registry.event("roost.system.service_stopping", OWNER, ServiceStopping, "A service instance is stopping")


register(REGISTRY)
