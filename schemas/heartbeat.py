"""Messages of the heartbeat service (owner ``heartbeat``) that other services rely on.

The heartbeat service publishes only state changes (ARCHITECTURE.md): a host's health, as its monitors
see it over the heartbeat networks, and which controller is active (it owns that fact and carries out
swact).  Inventory consumes both to own availability.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import EntityEvent, Role
from schemas.inventory import Hostname, Network
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


def register(registry: Registry) -> None:
    registry.event("roost.heartbeat.host_health", OWNER, HostHealth, "A host's heartbeat health changed")
    registry.event("roost.heartbeat.active_controller", OWNER, ActiveController, "Which controller is active")
    registry.command("roost.cmd.heartbeat.swact", OWNER, Swact, "Move the active controller role",
                     min_role=Role.ADMIN, result_model=SwactResult)


register(REGISTRY)
