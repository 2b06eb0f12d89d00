"""Messages of the heartbeat service (owner ``heartbeat``) that other services rely on.

The heartbeat service publishes only state changes (ARCHITECTURE.md): a host's health, as its monitors
see it over the heartbeat networks, and which controller is active (it owns that fact and carries out
swact).  Inventory consumes both to own availability.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import EntityEvent, Role
from schemas.inventory import Hostname, IpAddress, Network
from schemas.registry import REGISTRY, Registry

OWNER = "heartbeat"

HealthState = Literal["healthy", "degraded", "failed"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostHealth(EntityEvent):
    """A host's heartbeat health changed.  ``entity_id``: the host's uuid; ``version`` grows per host.

    ``healthy``: every monitored network answers; ``degraded``: some do not (``networks_down`` names
    them); ``failed``: none has for the failure threshold, confirmed by the other monitors."""

    hostname: Hostname
    state: HealthState
    networks_down: list[Network] = Field(default_factory=list)
    reason: str = Field(default="", max_length=255)


class ActiveController(EntityEvent):
    """Which controller is active.  ``entity_id``: ``controller-pair``; ``version`` grows with every change
    (``services.heartbeat.pair``: 2*epoch when a controller becomes active, 2*epoch + 1 when it steps
    down with nobody after it), so an old announcement never overrides a newer one."""

    active: Hostname | None = None
    standby: Hostname | None = None


class Swact(_Model):
    """Move the active role from ``from_host`` to the other controller."""

    from_host: Hostname
    to_host: Hostname
    force: bool = False


class SwactResult(_Model):
    active: Hostname
    detail: str = Field(default="", max_length=1024)


class NextKey(_Model):
    """A key rotation under way: the next master key, sealed for this host with the current one
    (``services.heartbeat.keystore.seal_next``)."""

    generation: int = Field(ge=1, le=0xFFFF_FFFF)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{8}$")
    sealed: str = Field(min_length=1, max_length=512, repr=False)


class AgentHeartbeatConfig(_Model):
    """What a host's agent needs to answer heartbeats: sent by the heartbeat service to the agent's own
    subject (``roost.cmd.agent.<agent>.heartbeat``) when the host starts being monitored, when any of this
    changes, and again while the monitors hear nothing from it.  No key material: the agent has the master
    key from its enrolment; ``key_fingerprint`` is the key the monitors sign with, so an agent holding
    another one refuses, saying so, instead of answering with datagrams every monitor drops."""

    hostname: Hostname
    node_id: int = Field(ge=1, le=0xFFFF_FFFF, description="the host's heartbeat node id (inventory's node_id)")
    cluster_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    key_fingerprint: str = Field(pattern=r"^[0-9a-f]{8}$")
    addresses: dict[Network, IpAddress] = Field(min_length=1, description="bind here, one socket per network")
    port: int = Field(default=2223, ge=1, le=65535)
    period_seconds: float = Field(default=0.1, gt=0, le=10)
    require_auth: dict[Network, bool] = Field(default_factory=dict, description="missing: required")
    next_key: NextKey | None = Field(default=None, description="a key rotation under way")


class HeartbeatStatusQuery(_Model):
    """``roost heartbeat status`` / ``roost keys status``: the monitor, its keys and every monitored host's paths
    (the reply's result is the status document of ``services.heartbeat.service.HeartbeatService.status``)."""


class AgentHeartbeatAlarm(_Model):
    """A host agent's heartbeat responder saw a burst of forged or replayed datagrams on one of its networks
    (950.006), or the burst ended (``severity`` none).  Published by the agent on its own subject
    ``roost.agent.<agent>.heartbeat_alarm``; the heartbeat service raises or clears the alarm on the agent's
    own host only (the entity comes from the subject and inventory's record, never from the message)."""

    network: Network
    severity: Literal["critical", "major", "minor", "warning"] | None = None
    reason: str = Field(default="", max_length=255)


class KeysRotate(_Model):
    """``roost keys rotate``: start a rotation of the heartbeat master key (or show the one under way)."""


class AgentHeartbeatApplied(_Model):
    paths: list[Network]
    key_fingerprint: str


def register(registry: Registry) -> None:
    registry.event("roost.heartbeat.host_health", OWNER, HostHealth, "A host's heartbeat health changed")
    registry.event("roost.heartbeat.active_controller", OWNER, ActiveController, "Which controller is active")
    registry.command("roost.cmd.heartbeat.swact", OWNER, Swact, "Move the active controller role",
                     min_role=Role.ADMIN, result_model=SwactResult)
    registry.command("roost.cmd.heartbeat.status", OWNER, HeartbeatStatusQuery,
                     "The heartbeat monitor, its keys and every monitored host's paths", min_role=Role.READER)
    registry.event("roost.agent.heartbeat_alarm", "agent", AgentHeartbeatAlarm,
                   "A host agent's heartbeat saw a burst of forged datagrams on a network, or it ended")
    registry.command("roost.cmd.heartbeat.keys_rotate", OWNER, KeysRotate,
                     "Rotate the heartbeat master key without downtime", min_role=Role.ADMIN)
    registry.command("roost.cmd.agent.heartbeat", "agent", AgentHeartbeatConfig,
                     "Answer heartbeats on these addresses as this node (sent to roost.cmd.agent.<agent>.heartbeat)",
                     min_role=Role.ADMIN, result_model=AgentHeartbeatApplied)


register(REGISTRY)
