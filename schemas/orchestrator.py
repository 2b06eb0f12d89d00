"""Messages of the orchestrator (owner ``orchestrator``) that other services rely on.

``roost.cmd.hostservices.disable|enable``: inventory's lock asks the orchestrator to disable the
services on a host (cordon, drain, taint) and waits for the answer; unlock asks it to enable them again
(in the spirit of sysinv's calls to the VIM).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.envelope import Role
from schemas.inventory import Hostname
from schemas.registry import REGISTRY, Registry

OWNER = "orchestrator"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostServices(_Model):
    uuid: str = Field(min_length=1, max_length=64)
    hostname: Hostname
    action: Literal["lock", "force-lock", "unlock"]


class HostServicesResult(_Model):
    """``done``: the services are disabled (enabled); otherwise ``detail`` says why not."""

    done: bool
    detail: str = Field(default="", max_length=1024)


def register(registry: Registry) -> None:
    registry.command("roost.cmd.hostservices.disable", OWNER, HostServices,
                     "Disable the services on a host before it is locked (cordon, drain, taint)",
                     min_role=Role.ADMIN, result_model=HostServicesResult)
    registry.command("roost.cmd.hostservices.enable", OWNER, HostServices,
                     "Enable the services on a host again after unlock (uncordon, untaint)",
                     min_role=Role.ADMIN, result_model=HostServicesResult)


register(REGISTRY)
