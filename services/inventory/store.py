"""Inventory's tables (``migrations/0001_hosts.sql``): host rows, hardware reports, the site row.

The store reads and writes rows; it decides nothing.  Rules live in ``machine`` (states) and
``service`` (what a command may change).  Every write bumps the host's ``version``.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import asyncpg

from schemas import inventory as msg
from services.core.db.pool import AnyConnection
from services.inventory.machine import HostState, Site

SCHEMA = "inventory"

_COLUMNS = """uuid, node_id, hostname, personality, subfunctions, administrative, operational, availability, task,
    action, power_state, uptime_seconds, mgmt_mac, serial, location, labels, addresses, degrade_reasons, agent,
    agent_alive, agent_seen_at, agent_interval, agent_boot_id, inventoried, bmc_type, bmc_address, bmc_username,
    bmc_password, bmc_key_id, bmc_system_id, bmc_verify_tls, bmc_reachable, bmc_outcome, bmc_last_error, created_at,
    updated_at,
    version"""


class DuplicateHost(ValueError):
    """Another host already has this hostname, MAC or agent."""


@dataclass(frozen=True, slots=True)
class HostRow:
    uuid: str
    node_id: int
    hostname: str | None
    personality: msg.Personality | None
    subfunctions: tuple[str, ...]
    administrative: msg.Administrative
    operational: msg.Operational
    availability: msg.Availability
    task: str
    action: msg.HostAction
    power_state: msg.PowerState
    uptime_seconds: int | None
    mgmt_mac: str | None
    serial: str
    location: str
    labels: Mapping[str, str]
    addresses: Mapping[str, str]
    degrade_reasons: Mapping[str, str]
    agent: str | None
    agent_alive: bool
    agent_seen_at: datetime | None
    agent_interval: float | None
    agent_boot_id: str | None
    inventoried: bool
    bmc_type: msg.BmcType
    bmc_address: str
    bmc_username: str
    bmc_password: bytes | None = field(repr=False)
    bmc_key_id: str | None
    bmc_system_id: str | None
    bmc_verify_tls: bool
    bmc_reachable: bool | None
    bmc_outcome: str | None
    bmc_last_error: str | None
    created_at: datetime
    updated_at: datetime
    version: int

    @classmethod
    def from_record(cls, r: Mapping[str, Any] | asyncpg.Record) -> HostRow:
        data = dict(r)
        data["uuid"] = str(data["uuid"])
        data["subfunctions"] = tuple(data["subfunctions"] or ())
        for key in ("labels", "addresses", "degrade_reasons"):
            value = data[key]
            data[key] = json.loads(value) if isinstance(value, str) else dict(value or {})
        return cls(**data)

    @property
    def bmc_provisioned(self) -> bool:
        return self.bmc_type != "none" and bool(self.bmc_address)

    def state(self) -> HostState:
        return HostState(uuid=self.uuid, hostname=self.hostname, personality=self.personality, mgmt_mac=self.mgmt_mac,
                         administrative=self.administrative, operational=self.operational,
                         availability=self.availability, task=self.task, action=self.action,
                         inventoried=self.inventoried, agent_alive=self.agent_alive, bmc=self.bmc_provisioned,
                         power=self.power_state, degrade_reasons=frozenset(self.degrade_reasons))

    def with_state(self, state: HostState, reason_texts: Mapping[str, str] | None = None) -> HostRow:
        texts = {**self.degrade_reasons, **(reason_texts or {})}
        return replace(self, administrative=state.administrative, operational=state.operational,
                       availability=state.availability, task=state.task, action=state.action,
                       agent_alive=state.agent_alive, power_state=state.power,
                       degrade_reasons={k: texts.get(k, "") for k in sorted(state.degrade_reasons)})

    def view(self, *, active: bool) -> msg.Host:
        """The host as every API shows it: never the BMC password."""
        bmc = None
        if self.bmc_type != "none":
            bmc = msg.BmcInfo(type=self.bmc_type, address=self.bmc_address, username=self.bmc_username,
                              system_id=self.bmc_system_id, verify_tls=self.bmc_verify_tls,
                              password_set=self.bmc_password is not None, reachable=self.bmc_reachable,
                              last_error=self.bmc_last_error)
        return msg.Host.model_validate({
            "uuid": self.uuid, "node_id": self.node_id, "hostname": self.hostname, "personality": self.personality,
            "subfunctions": list(self.subfunctions), "administrative": self.administrative,
            "operational": self.operational, "availability": self.availability, "task": self.task,
            "action": self.action, "provision": "provisioned" if self.state().provisioned else "unprovisioned",
            "power_state": self.power_state, "active": active, "uptime_seconds": self.uptime_seconds,
            "mgmt_mac": self.mgmt_mac, "serial": self.serial, "location": self.location, "labels": dict(self.labels),
            "bmc": bmc, "addresses": dict(self.addresses),
            "degrade_reasons": [f"{k}: {v}" if v else k for k, v in sorted(self.degrade_reasons.items())],
            "agent": self.agent, "agent_seen_at": self.agent_seen_at, "inventoried": self.inventoried,
            "created_at": self.created_at, "updated_at": self.updated_at, "version": self.version})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every host row and the site row, read under the site lock."""

    rows: Mapping[str, HostRow]
    active: str | None
    active_epoch: int

    @property
    def site(self) -> Site:
        return Site({u: r.state() for u, r in self.rows.items()}, self.active)

    def find(self, ref: str) -> HostRow | None:
        """A host by uuid or hostname."""
        if ref in self.rows:
            return self.rows[ref]
        try:
            as_uuid = str(uuidlib.UUID(ref))
        except ValueError:
            as_uuid = None
        if as_uuid is not None and as_uuid in self.rows:
            return self.rows[as_uuid]
        return next((r for r in self.rows.values() if r.hostname == ref), None)

    def find_agent(self, agent: str) -> HostRow | None:
        """The host an agent belongs to."""
        return next((r for r in self.rows.values() if r.agent == agent), None)


async def lock_site(conn: AnyConnection) -> Snapshot:
    """Take the site lock (until the transaction ends) and read every host."""
    site = await conn.fetchrow(f"SELECT active, active_epoch FROM {SCHEMA}.site WHERE id = 1 FOR UPDATE")
    records = await conn.fetch(f"SELECT {_COLUMNS} FROM {SCHEMA}.hosts")
    rows = {str(r["uuid"]): HostRow.from_record(r) for r in records}
    active = str(site["active"]) if site is not None and site["active"] is not None else None
    return Snapshot(rows, active, int(site["active_epoch"]) if site is not None else 0)


async def read_snapshot(conn: AnyConnection | asyncpg.Pool) -> Snapshot:
    """Every host and the active controller, without locking (for reads)."""
    site = await conn.fetchrow(f"SELECT active, active_epoch FROM {SCHEMA}.site WHERE id = 1")
    records = await conn.fetch(f"SELECT {_COLUMNS} FROM {SCHEMA}.hosts ORDER BY node_id")
    rows = {str(r["uuid"]): HostRow.from_record(r) for r in records}
    active = str(site["active"]) if site is not None and site["active"] is not None else None
    return Snapshot(rows, active, int(site["active_epoch"]) if site is not None else 0)


async def set_active(conn: AnyConnection, active: str | None, epoch: int) -> None:
    await conn.execute(f"UPDATE {SCHEMA}.site SET active = $1, active_epoch = $2 WHERE id = 1", active, epoch)


async def insert(conn: AnyConnection, *, hostname: str | None, personality: str | None, subfunctions: Sequence[str],
                 mgmt_mac: str | None, serial: str = "", location: str = "", labels: Mapping[str, str] | None = None,
                 addresses: Mapping[str, str] | None = None, agent: str | None = None) -> HostRow:
    try:
        record = await conn.fetchrow(
            f"""INSERT INTO {SCHEMA}.hosts (uuid, hostname, personality, subfunctions, mgmt_mac, serial, location,
                                            labels, addresses, agent)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10) RETURNING {_COLUMNS}""",
            uuidlib.uuid4(), hostname, personality, list(subfunctions), mgmt_mac, serial, location,
            json.dumps(dict(labels or {})), json.dumps(dict(addresses or {})), agent)
    except asyncpg.UniqueViolationError as exc:
        raise DuplicateHost(_duplicate(exc)) from None
    assert record is not None
    return HostRow.from_record(record)


def _duplicate(exc: asyncpg.UniqueViolationError) -> str:
    constraint = getattr(exc, "constraint_name", "") or ""
    if "hostname" in constraint:
        return "a host with this hostname already exists"
    if "mgmt_mac" in constraint:
        return "a host with this management MAC already exists"
    if "agent" in constraint:
        return "another host already belongs to this agent"
    return "a host with these identifiers already exists"


async def save(conn: AnyConnection, row: HostRow) -> HostRow:
    """Write every mutable column of ``row`` and bump its version; the row as stored."""
    try:
        record = await conn.fetchrow(
            f"""UPDATE {SCHEMA}.hosts SET hostname = $2, personality = $3, subfunctions = $4, administrative = $5,
                   operational = $6, availability = $7, task = $8, action = $9, power_state = $10,
                   uptime_seconds = $11, mgmt_mac = $12, serial = $13, location = $14, labels = $15::jsonb,
                   addresses = $16::jsonb, degrade_reasons = $17::jsonb, agent = $18, agent_alive = $19,
                   agent_seen_at = $20, agent_interval = $21, agent_boot_id = $22, inventoried = $23, bmc_type = $24,
                   bmc_address = $25, bmc_username = $26, bmc_password = $27, bmc_key_id = $28, bmc_system_id = $29,
                   bmc_verify_tls = $30, bmc_reachable = $31, bmc_last_error = $32, bmc_outcome = $33,
                   updated_at = now(),
                   version = version + 1
                WHERE uuid = $1 RETURNING {_COLUMNS}""",
            uuidlib.UUID(row.uuid), row.hostname, row.personality, list(row.subfunctions), row.administrative,
            row.operational, row.availability, row.task, row.action, row.power_state, row.uptime_seconds,
            row.mgmt_mac, row.serial, row.location, json.dumps(dict(row.labels)), json.dumps(dict(row.addresses)),
            json.dumps(dict(row.degrade_reasons)), row.agent, row.agent_alive, row.agent_seen_at, row.agent_interval,
            row.agent_boot_id, row.inventoried, row.bmc_type, row.bmc_address, row.bmc_username, row.bmc_password,
            row.bmc_key_id, row.bmc_system_id, row.bmc_verify_tls, row.bmc_reachable, row.bmc_last_error,
            row.bmc_outcome)
    except asyncpg.UniqueViolationError as exc:
        raise DuplicateHost(_duplicate(exc)) from None
    if record is None:
        raise LookupError(f"no host {row.uuid}")
    return HostRow.from_record(record)


async def touch_agent(conn: AnyConnection, uuid: str, seen_at: datetime, interval: float, boot_id: str,
                      uptime: int) -> None:
    """Record an agent's hello without a new version (liveness is not a change of the host)."""
    await conn.execute(f"""UPDATE {SCHEMA}.hosts SET agent_seen_at = $2, agent_interval = $3, agent_boot_id = $4,
                              uptime_seconds = $5 WHERE uuid = $1""",
                       uuidlib.UUID(uuid), seen_at, interval, boot_id, uptime)


async def bump(conn: AnyConnection, uuid: str) -> int | None:
    """A new version for a change that lives outside the host row (its hardware); None: no such host."""
    version = await conn.fetchval(f"""UPDATE {SCHEMA}.hosts SET version = version + 1, updated_at = now()
                                      WHERE uuid = $1 RETURNING version""", uuidlib.UUID(uuid))
    return int(version) if version is not None else None


async def delete(conn: AnyConnection, uuid: str) -> None:
    await conn.execute(f"DELETE FROM {SCHEMA}.hosts WHERE uuid = $1", uuidlib.UUID(uuid))


async def put_hardware(conn: AnyConnection, uuid: str, hardware: msg.Hardware) -> bool:
    """Store a hardware report; False when it says the same as the last one from that source."""
    report = hardware.model_dump(mode="json", exclude={"reported_at"})
    previous = await conn.fetchval(f"SELECT report FROM {SCHEMA}.hardware WHERE host_uuid = $1 AND source = $2",
                                   uuidlib.UUID(uuid), hardware.source)
    if previous is not None and (json.loads(previous) if isinstance(previous, str) else previous) == report:
        await conn.execute(f"UPDATE {SCHEMA}.hardware SET reported_at = now() WHERE host_uuid = $1 AND source = $2",
                           uuidlib.UUID(uuid), hardware.source)
        return False
    await conn.execute(
        f"""INSERT INTO {SCHEMA}.hardware (host_uuid, source, report, reported_at) VALUES ($1, $2, $3::jsonb, now())
            ON CONFLICT (host_uuid, source) DO UPDATE SET report = excluded.report, reported_at = now()""",
        uuidlib.UUID(uuid), hardware.source, json.dumps(report))
    return True


async def hardware(conn: AnyConnection | asyncpg.Pool, uuid: str) -> msg.Hardware:
    """The host's hardware: the agent's report, completed by the BMC's where the agent said nothing."""
    records = await conn.fetch(f"SELECT source, report, reported_at FROM {SCHEMA}.hardware WHERE host_uuid = $1",
                               uuidlib.UUID(uuid))
    by_source = {r["source"]: msg.Hardware.model_validate(
        {**(json.loads(r["report"]) if isinstance(r["report"], str) else r["report"]),
         "reported_at": r["reported_at"]}) for r in records}
    agent, bmc = by_source.get("agent"), by_source.get("redfish")
    if agent is None:
        return bmc or msg.Hardware(source="agent")
    if bmc is None:
        return agent
    return agent.model_copy(update={
        "cpus": agent.cpus or bmc.cpus, "memory": agent.memory or bmc.memory,
        "disks": agent.disks or bmc.disks, "ports": agent.ports or bmc.ports})
