"""Messages of the distributed-cloud sync (owner ``dcsync``) and of the subcloud agents.

Operators and the REST API speak to the dcsync service at the system controller:
``roost.cmd.subcloud.add|delete|manage|unmanage|list|show|audit``.  It announces every change of a
subcloud's state (``roost.subcloud.state_changed``, ``entity_id`` the subcloud's name, ``version`` growing
by one per change) and every audit (``roost.sync.audited``).

The dcsync service speaks to each subcloud's agent on that subcloud's own subjects
(``roost.cmd.sync.<subcloud>.<verb>``; the agent's broker user may read only those):

* ``hello``: the columns the subcloud's databases have, and where its cursors stand;
* ``configure``: the tables and columns that sync to it (the agent installs its digest triggers);
* ``apply``: a batch of changes of one lane, in commit order (or a repair), applied in one transaction
  with the agent's inbox and cursor;
* ``digests`` / ``rows``: the audit's questions (table roots, bucket digests, the rows of some buckets);
* ``keys``: natural keys of a table (a joining subcloud's rows that clash with central ones);
* ``fernet``: keystone's Fernet key repository, sealed for this subcloud.

Each agent publishes ``roost.dcagent.heartbeat`` on ``roost.dcagent.<subcloud>.heartbeat``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import EntityEvent, Role
from schemas.registry import REGISTRY, Registry

OWNER = "dcsync"

SubcloudName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$",
                                    description="one lower-case DNS label, at most 48 characters")]
EndpointName = Literal["identity", "image"]
LaneName = Literal["main", "revocation"]
SyncStatus = Literal["in-sync", "out-of-sync", "unknown"]
Availability = Literal["online", "offline", "unknown"]
Management = Literal["managed", "unmanaged"]
JoinPolicy = Literal["adopt", "refuse"]
JoinState = Literal["joining", "joined", "join-failed"]
TableName = Annotated[str, Field(min_length=1, max_length=63)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- operator commands ------------------------------------------------------------------------------------


class SubcloudAdd(_Model):
    name: SubcloudName
    description: str = Field(default="", max_length=255)
    join_policy: JoinPolicy | None = Field(default=None, description="a subcloud's own row with the same natural "
                                           "key as a central row of another id: adopt (replace it) or refuse "
                                           "(the join fails, saying which); default: the service's setting")
    managed: bool = True


class SubcloudRef(_Model):
    name: SubcloudName


class SubcloudListQuery(_Model):
    pass


class EndpointView(_Model):
    endpoint: EndpointName
    sync_status: SyncStatus
    cursors: dict[str, int] = Field(default_factory=dict, description="per lane, the last change applied there")
    head: dict[str, int] = Field(default_factory=dict, description="per lane, the last change at the controller")
    out_of_sync_since: datetime | None = None
    detail: str = Field(default="", max_length=2048)


class SubcloudView(_Model):
    name: SubcloudName
    description: str = ""
    management: Management
    availability: Availability
    join_state: JoinState
    join_policy: JoinPolicy
    sync: dict[str, SyncStatus] = Field(default_factory=dict, description="per endpoint")
    last_heard_at: datetime | None = None
    last_audit_at: datetime | None = None
    created_at: datetime
    version: int = Field(ge=1)


class SubcloudDetail(SubcloudView):
    endpoints: list[EndpointView] = Field(default_factory=list)
    skew: list[dict[str, Any]] = Field(default_factory=list, description="columns only one side has, per table")
    last_audit: dict[str, Any] | None = None
    fernet_fingerprint: str | None = None


class SubcloudList(_Model):
    subclouds: list[SubcloudView]


class SubcloudDeleted(_Model):
    name: SubcloudName


class SubcloudState(EntityEvent):
    """A subcloud changed: its management, availability, join state or the sync status of an endpoint."""

    management: Management
    availability: Availability
    join_state: JoinState
    sync: dict[str, SyncStatus] = Field(default_factory=dict)
    reason: str = Field(default="", max_length=255)


class TableRepair(_Model):
    table: TableName
    upserted: int = 0
    deleted: int = 0
    local_only: int = 0
    failed: int = 0


class AuditReport(_Model):
    subcloud: SubcloudName
    endpoint: EndpointName
    clean: bool
    tables_compared: int
    tables_differing: list[str] = Field(default_factory=list)
    buckets_compared: int = 0
    rows_compared: int = 0
    repairs: list[TableRepair] = Field(default_factory=list)
    started_at: datetime
    seconds: float
    detail: str = Field(default="", max_length=2048)


class AuditRequest(_Model):
    name: SubcloudName


class AuditResult(_Model):
    reports: list[AuditReport]


# -- the agent's commands -------------------------------------------------------------------------------------


class SyncHello(_Model):
    pass


class EndpointSchema(_Model):
    tables: dict[str, list[str]] = Field(description="table -> its columns, as the subcloud's database has them")
    cursors: dict[str, int] = Field(default_factory=dict)
    schema_version: str = Field(default="", max_length=128, description="the migration version, when known")


class SyncHelloResult(_Model):
    subcloud: SubcloudName
    endpoints: dict[str, EndpointSchema]
    fernet_fingerprint: str | None = None


class SyncedTable(_Model):
    name: TableName
    pk: list[str] = Field(min_length=1)
    columns: list[str] = Field(min_length=1)
    lane: LaneName = "main"


class SyncConfigure(_Model):
    endpoint: EndpointName
    tables: list[SyncedTable]
    redigest: bool = Field(default=False, description="recompute every table's digests from its rows (the backstop "
                                                      "for writes the triggers missed)")


class SyncConfigured(_Model):
    retracked: list[str] = Field(default_factory=list)
    redigested: dict[str, int] = Field(default_factory=dict, description="table -> rows whose digest was wrong")


class ChangeWire(_Model):
    """One change: ``U`` an upsert (``row``: the synced columns), ``D`` a delete."""

    seq: int = Field(ge=0)
    tbl: TableName
    op: Literal["U", "D"]
    pk: dict[str, Any]
    row: dict[str, Any] | None = None
    version: int = Field(ge=0)


class SyncApply(_Model):
    endpoint: EndpointName
    lane: LaneName
    changes: list[ChangeWire] = Field(max_length=5000)
    upto: int = Field(ge=0, description="the cursor once this batch is applied")
    repair: bool = Field(default=False, description="a repair: overwrites a local edit of equal version")
    set_cursor: bool = Field(default=False, description="move the cursor to upto even backwards (a resync)")
    adopt_version: int | None = Field(
        default=None, ge=1,
        description="the end of a resync (with set_cursor): the rows that never came from the controller "
                    "(version 0) were found equal to its rows, and take this version, but for keep_local")
    keep_local: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict,
        description="with adopt_version: per table, the keys of the rows only the subcloud has (they stay version 0)")


class FailedChange(_Model):
    seq: int
    tbl: str
    pk: dict[str, Any]
    error: str = Field(max_length=1024)


class SyncApplied(_Model):
    applied: int
    stale: int
    duplicate: bool = False
    failed: list[FailedChange] = Field(default_factory=list)
    cursor: int


class DigestRoot(_Model):
    digest: int
    rows: int


class SyncDigestQuery(_Model):
    endpoint: EndpointName
    tables: list[TableName]
    buckets_of: list[TableName] = Field(default_factory=list)


class SyncDigests(_Model):
    roots: dict[str, DigestRoot]
    buckets: dict[str, dict[int, DigestRoot]] = Field(default_factory=dict)
    cursors: dict[str, int] = Field(default_factory=dict)


class SyncRowsQuery(_Model):
    endpoint: EndpointName
    table: TableName
    buckets: list[int] = Field(max_length=1024)


class RowMarkWire(_Model):
    pk: dict[str, Any]
    hash: int
    version: int


class SyncRows(_Model):
    rows: list[RowMarkWire]


class SyncKeysQuery(_Model):
    endpoint: EndpointName
    table: TableName
    columns: list[str] = Field(min_length=1)


class NaturalKey(_Model):
    key: dict[str, Any]
    pk: dict[str, Any]


class SyncKeys(_Model):
    keys: list[NaturalKey]


class FernetKeys(_Model):
    """keystone's key repository (file name -> key), sealed with the subcloud's sync key (AES-GCM)."""

    sealed: str = Field(min_length=1, max_length=65536, repr=False)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")


class FernetApplied(_Model):
    fingerprint: str


class DcAgentHeartbeat(_Model):
    subcloud: SubcloudName
    cursors: dict[str, dict[str, int]] = Field(default_factory=dict, description="endpoint -> lane -> cursor")
    fernet_fingerprint: str | None = None


def register(registry: Registry) -> None:
    registry.command("roost.cmd.subcloud.add", OWNER, SubcloudAdd, "Add a subcloud (it joins with a full sync)",
                     min_role=Role.ADMIN, result_model=SubcloudView)
    registry.command("roost.cmd.subcloud.delete", OWNER, SubcloudRef, "Delete a subcloud", min_role=Role.ADMIN,
                     result_model=SubcloudDeleted)
    registry.command("roost.cmd.subcloud.manage", OWNER, SubcloudRef, "Manage a subcloud: sync it again",
                     min_role=Role.ADMIN, result_model=SubcloudView)
    registry.command("roost.cmd.subcloud.unmanage", OWNER, SubcloudRef, "Unmanage a subcloud: stop syncing it",
                     min_role=Role.ADMIN, result_model=SubcloudView)
    registry.command("roost.cmd.subcloud.list", OWNER, SubcloudListQuery, "Every subcloud with its state",
                     min_role=Role.READER, result_model=SubcloudList)
    registry.command("roost.cmd.subcloud.show", OWNER, SubcloudRef, "One subcloud, per endpoint",
                     min_role=Role.READER, result_model=SubcloudDetail)
    registry.command("roost.cmd.subcloud.audit", OWNER, AuditRequest, "Audit a subcloud now",
                     min_role=Role.ADMIN, result_model=AuditResult)
    registry.event("roost.subcloud.state_changed", OWNER, SubcloudState, "A subcloud's state changed")
    registry.event("roost.subcloud.deleted", OWNER, SubcloudState, "A subcloud was deleted")
    registry.event("roost.sync.audited", OWNER, AuditReport, "An audit of a subcloud's endpoint ended")
    agent = "sent to roost.cmd.sync.<subcloud>."
    registry.command("roost.cmd.sync.hello", OWNER, SyncHello, f"The subcloud's schema and cursors ({agent}hello)",
                     min_role=Role.ADMIN, result_model=SyncHelloResult)
    registry.command("roost.cmd.sync.configure", OWNER, SyncConfigure,
                     f"The tables and columns that sync to the subcloud ({agent}configure)", min_role=Role.ADMIN,
                     result_model=SyncConfigured)
    registry.command("roost.cmd.sync.apply", OWNER, SyncApply, f"Apply a batch of changes ({agent}apply)",
                     min_role=Role.ADMIN, result_model=SyncApplied)
    registry.command("roost.cmd.sync.digests", OWNER, SyncDigestQuery, f"Table and bucket digests ({agent}digests)",
                     min_role=Role.ADMIN, result_model=SyncDigests)
    registry.command("roost.cmd.sync.rows", OWNER, SyncRowsQuery, f"The rows of some buckets ({agent}rows)",
                     min_role=Role.ADMIN, result_model=SyncRows)
    registry.command("roost.cmd.sync.keys", OWNER, SyncKeysQuery, f"A table's natural keys ({agent}keys)",
                     min_role=Role.ADMIN, result_model=SyncKeys)
    registry.command("roost.cmd.sync.fernet", OWNER, FernetKeys, f"keystone's Fernet keys ({agent}fernet)",
                     min_role=Role.ADMIN, result_model=FernetApplied)
    registry.event("roost.dcagent.heartbeat", OWNER, DcAgentHeartbeat,
                   "A subcloud agent is alive (published on roost.dcagent.<subcloud>.heartbeat)")


register(REGISTRY)
