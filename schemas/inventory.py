"""Messages of the host inventory (owner ``inventory``), of the host agents (owner ``agent``) and the few
commands inventory sends to the services that act on a host for it.

Inventory owns the host records and their availability (ARCHITECTURE.md: one owner per fact).

Commands served by inventory (``roost.cmd.host.*``; readers may list, show and read hardware, admins do
the rest).  Every command that changes a host answers ``accepted`` with the host as it is now, or
``rejected`` with the reason (a state that does not allow it, an unknown host, a duplicate hostname or
MAC); a rejected command changes nothing.

Events published by inventory (entity events: ``entity_id`` is the host's uuid, ``version`` grows by
one per change of that host): ``roost.host.added``, ``roost.host.discovered`` (an unknown agent
announced itself: an unprovisioned host), ``roost.host.updated`` (configuration), ``roost.host.state_changed``
(administrative / operational / availability / task), ``roost.host.inventory_updated`` (hardware),
``roost.host.deleted``, and ``roost.host.bmc_access`` (a controller's BMC access, sealed for the
heartbeat service, which must fence a controller even while inventory is down).

Inputs from other services:

* ``roost.degrade.set`` / ``roost.degrade.clear``: any service reports (or withdraws) a reason why a host
  is degraded; the host is degraded while any reason stands;
* ``roost.heartbeat.host_health`` / ``roost.heartbeat.active_controller`` (owner ``heartbeat``): a host
  failed, recovered or lost a network; which controller is active;
* ``roost.agent.hello`` / ``roost.agent.inventory`` (owner ``agent``), published by each host agent on
  its own subjects ``roost.agent.<agent>.hello|inventory`` (the broker lets an agent publish only there,
  so the subject names the agent).

Commands inventory sends: ``roost.cmd.hostservices.disable|enable`` (served by the orchestrator: cordon
and drain, uncordon) and ``roost.cmd.heartbeat.swact`` (served by the heartbeat service, which owns which
controller is active).
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from schemas.envelope import EntityEvent, Role
from schemas.registry import REGISTRY, Registry
from schemas.text import Clean

OWNER = "inventory"
AGENT_OWNER = "agent"

HOSTNAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,55}[a-z0-9])?$"
"""One lower-case DNS label of at most 57 characters (the agent's broker user is ``agent-<hostname>``)."""
MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"


def _lower(value: str) -> str:
    return value.lower()


Hostname = Annotated[str, Field(pattern=HOSTNAME_PATTERN, description="e.g. controller-0, worker-3")]
AgentName = Annotated[str, Field(pattern=HOSTNAME_PATTERN, description="the enrolled agent's name")]
Mac = Annotated[str, AfterValidator(_lower), Field(pattern=r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$",
                                                   description="aa:bb:cc:dd:ee:ff")]
HostRef = Annotated[str, Field(min_length=1, max_length=64, description="a host's uuid or hostname")]
Label = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")]
LabelValue = Annotated[Clean, Field(max_length=63)]
Text = Annotated[Clean, Field(max_length=255)]
FreeText = Annotated[Clean, Field(max_length=255)]
IpAddress = IPv4Address | IPv6Address

Personality = Literal["controller", "worker", "storage"]
Subfunction = Literal["controller", "worker", "storage", "lowlatency"]
Administrative = Literal["locked", "unlocked"]
Operational = Literal["enabled", "disabled"]
Availability = Literal["available", "degraded", "failed", "offline", "online", "intest", "power-off"]
Provision = Literal["unprovisioned", "provisioned"]
PowerState = Literal["on", "off", "powering-on", "powering-off", "unknown"]
Network = Literal["mgmt", "cluster-host", "oam"]
HostAction = Literal["none", "lock", "force-lock", "unlock", "reboot", "reset", "power-on", "power-off",
                     "reinstall", "swact"]
BmcType = Literal["none", "redfish"]

NETWORKS: tuple[Network, ...] = ("mgmt", "cluster-host", "oam")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- hardware ----------------------------------------------------------------------------------------


class Cpu(_Model):
    """One logical CPU."""

    cpu: int = Field(ge=0, le=65535, description="logical CPU number")
    socket: int = Field(ge=0, le=1023, description="physical package (processor)")
    core: int = Field(ge=0, le=65535, description="physical core within the socket")
    thread: int = Field(ge=0, le=255, description="hyper-thread of the core, 0 for the first")
    model: str = Field(default="", max_length=255)


class Memory(_Model):
    total_mib: int = Field(ge=0)
    available_mib: int | None = Field(default=None, ge=0)


class Disk(_Model):
    device_node: str = Field(min_length=1, max_length=255, description="e.g. /dev/sda")
    size_mib: int = Field(ge=0)
    type: Literal["HDD", "SSD", "NVME", "unknown"] = "unknown"
    model: str = Field(default="", max_length=255)
    serial: str = Field(default="", max_length=255)


class Port(_Model):
    name: str = Field(min_length=1, max_length=64, description="e.g. eth0")
    mac: Mac | None = None
    speed_mbps: int | None = Field(default=None, ge=0)
    link: Literal["up", "down", "unknown"] = "unknown"
    mtu: int | None = Field(default=None, ge=0)
    driver: str | None = Field(default=None, max_length=64)
    pci_address: str | None = Field(default=None, max_length=64)


class Hardware(_Model):
    """What a host is made of, as its agent (or its BMC) reports it."""

    cpus: list[Cpu] = Field(default_factory=list, max_length=65536)
    memory: Memory | None = None
    disks: list[Disk] = Field(default_factory=list, max_length=4096)
    ports: list[Port] = Field(default_factory=list, max_length=4096)
    source: Literal["agent", "redfish"] = "agent"
    reported_at: AwareDatetime | None = None


# -- the host ----------------------------------------------------------------------------------------


class BmcSettings(_Model):
    """The BMC an operator gives a host.  The password goes in and never comes out: it is stored
    encrypted and no API, event or log returns it."""

    type: BmcType = "redfish"
    address: Clean = Field(default="", max_length=255, pattern=r"^(https?://[^\s/]+(/[^\s]*)?)?$",
                         description="the Redfish service, e.g. https://10.10.10.3 (empty when type is none)")
    username: Clean = Field(default="", max_length=64, pattern=r"^\S*$")
    password: Clean = Field(default="", max_length=255, repr=False)
    system_id: Clean | None = Field(default=None, max_length=255,
                                  description="the Redfish system to drive; default: the BMC's only system")
    verify_tls: bool = True


class BmcInfo(_Model):
    """A host's BMC as it is shown: never the password, only whether one is set."""

    type: BmcType
    address: str
    username: str
    system_id: str | None = None
    verify_tls: bool = True
    password_set: bool = False
    reachable: bool | None = Field(default=None, description="the last audit's verdict; none: not audited yet")
    last_error: str | None = None


class Host(_Model):
    """A host as inventory knows it (sysinv's field names where they exist)."""

    uuid: str
    node_id: int = Field(ge=1, description="stable small integer, never reused")
    hostname: Hostname | None = None
    personality: Personality | None = None
    subfunctions: list[Subfunction] = Field(default_factory=list)
    administrative: Administrative
    operational: Operational
    availability: Availability
    task: str = Field(default="", max_length=64)
    action: HostAction = "none"
    provision: Provision
    power_state: PowerState = "unknown"
    active: bool = Field(default=False, description="the active controller")
    uptime_seconds: int | None = Field(default=None, ge=0)
    mgmt_mac: Mac | None = None
    serial: str = Field(default="", max_length=255)
    location: str = Field(default="", max_length=255)
    labels: dict[Label, LabelValue] = Field(default_factory=dict)
    bmc: BmcInfo | None = None
    addresses: dict[Network, IpAddress] = Field(default_factory=dict,
                                                description="the host's address on each heartbeat network")
    degrade_reasons: list[str] = Field(default_factory=list)
    agent: AgentName | None = None
    agent_seen_at: AwareDatetime | None = None
    inventoried: bool = Field(default=False, description="its agent has reported its hardware")
    created_at: AwareDatetime
    updated_at: AwareDatetime
    version: int = Field(ge=1)


# -- commands ----------------------------------------------------------------------------------------


class HostAdd(_Model):
    """Add a host (or give an unprovisioned, discovered one with this MAC its identity)."""

    hostname: Hostname | None = Field(default=None, description="required for workers; controller-N and "
                                      "storage-N are assigned when omitted")
    personality: Personality
    subfunctions: list[Subfunction] | None = Field(default=None, description="default: the personality")
    mgmt_mac: Mac
    serial: FreeText = ""
    location: FreeText = ""
    labels: dict[Label, LabelValue] = Field(default_factory=dict)
    bmc: BmcSettings | None = None
    addresses: dict[Network, IpAddress] = Field(default_factory=dict)


class HostUpdate(_Model):
    """Change what an operator may change: labels, BMC, location, serial, addresses; hostname, personality
    and subfunctions only while the host is unprovisioned.  Omitted fields stay as they are."""

    host: HostRef
    hostname: Hostname | None = None
    personality: Personality | None = None
    subfunctions: list[Subfunction] | None = None
    serial: FreeText | None = None
    location: FreeText | None = None
    labels: dict[Label, LabelValue] | None = Field(default=None, description="replaces the labels")
    bmc: BmcSettings | None = None
    addresses: dict[Network, IpAddress] | None = Field(default=None, description="replaces the addresses")


class HostCommand(_Model):
    """A command on one host: delete, reboot, reset, power-on, power-off, reinstall, show, hardware."""

    host: HostRef


class HostLock(_Model):
    host: HostRef
    force: bool = Field(default=False, description="do not wait for services to be disabled")


class HostUnlock(_Model):
    host: HostRef
    force: bool = Field(default=False, description="waive the 'online' requirement (never power-off)")


class HostSwact(_Model):
    host: HostRef = Field(description="the active controller to move the role away from")
    force: bool = False


class HostList(_Model):
    personality: Personality | None = None
    limit: int = Field(default=1000, ge=1, le=10_000)


class HostListResult(_Model):
    items: list[Host] = Field(default_factory=list, max_length=10_000)


class HostActionResult(_Model):
    """What a host command did: the host as it is now, and what happened on the way, in words."""

    host: Host
    detail: str = Field(default="", max_length=1024)


class HostDeletedResult(_Model):
    uuid: str
    hostname: Hostname | None = None


class HostHardware(_Model):
    uuid: str
    hostname: Hostname | None = None
    hardware: Hardware


# -- events ------------------------------------------------------------------------------------------


class HostEvent(EntityEvent):
    """``entity_id``: the host's uuid."""

    host: Host


class StateChange(_Model):
    administrative: Administrative
    operational: Operational
    availability: Availability
    task: str = Field(default="", max_length=64)


class HostStateChanged(HostEvent):
    previous: StateChange
    cause: str = Field(default="", max_length=255, description="the command or event that changed it")


class HostDeleted(EntityEvent):
    hostname: Hostname | None = None
    personality: Personality | None = None


class HostInventoryUpdated(EntityEvent):
    hostname: Hostname | None = None
    hardware: Hardware


class BmcAccess(EntityEvent):
    """A controller's BMC access for the heartbeat service, sealed with the fencing key both services hold
    (AES-GCM; the host's uuid is the associated data).  ``sealed`` is empty when the BMC was removed."""

    hostname: Hostname
    key_id: str = Field(min_length=1, max_length=64)
    sealed: str = Field(max_length=8192, description="base64 of nonce + ciphertext")


# -- inputs from other services ------------------------------------------------------------------------


class DegradeSet(_Model):
    """A reason why a host is degraded (``key`` is the reporter's own name for it, e.g. ``heartbeat.oam``)."""

    host: HostRef
    key: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    text: Text = ""


class DegradeClear(_Model):
    host: HostRef
    key: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")


# -- host agents ---------------------------------------------------------------------------------------


class AgentHello(_Model):
    """An agent announces itself (at start, and every ``interval`` seconds while it runs)."""

    agent: AgentName
    os_hostname: str = Field(default="", max_length=255)
    macs: list[Mac] = Field(default_factory=list, max_length=256, description="every NIC's MAC address")
    boot_id: str = Field(default="", max_length=64, description="changes at every boot")
    uptime_seconds: int = Field(default=0, ge=0)
    agent_version: str = Field(default="", max_length=64)
    interval_seconds: float = Field(default=30.0, gt=0, le=3600)


class AgentInventory(_Model):
    """An agent's report of its machine."""

    agent: AgentName
    hardware: Hardware


def register(registry: Registry) -> None:
    """Register inventory's and the agents' messages (done for ``REGISTRY`` when this module is imported)."""
    reader, admin = Role.READER, Role.ADMIN
    cmd = registry.command
    cmd("roost.cmd.host.add", OWNER, HostAdd, "Add a host", min_role=admin, result_model=Host)
    cmd("roost.cmd.host.update", OWNER, HostUpdate, "Change a host's labels, BMC, location, addresses",
        min_role=admin, result_model=Host)
    cmd("roost.cmd.host.delete", OWNER, HostCommand, "Delete a locked host", min_role=admin,
        result_model=HostDeletedResult)
    cmd("roost.cmd.host.lock", OWNER, HostLock, "Lock a host (disable its services first unless forced)",
        min_role=admin, result_model=HostActionResult)
    cmd("roost.cmd.host.unlock", OWNER, HostUnlock, "Unlock a host", min_role=admin, result_model=HostActionResult)
    for verb, summary in (("reboot", "Reboot a locked host"), ("reset", "Reset a locked host through its BMC"),
                          ("power_on", "Power a host on through its BMC"),
                          ("power_off", "Power a locked host off through its BMC"),
                          ("reinstall", "Network-boot a locked host once, to reinstall it")):
        cmd(f"roost.cmd.host.{verb}", OWNER, HostCommand, summary, min_role=admin, result_model=HostActionResult)
    cmd("roost.cmd.host.swact", OWNER, HostSwact, "Move the active controller role to the other controller",
        min_role=admin, result_model=HostActionResult)
    cmd("roost.cmd.host.list", OWNER, HostList, "List hosts", min_role=reader, result_model=HostListResult)
    cmd("roost.cmd.host.show", OWNER, HostCommand, "Show one host", min_role=reader, result_model=Host)
    cmd("roost.cmd.host.hardware", OWNER, HostCommand, "Show a host's hardware", min_role=reader,
        result_model=HostHardware)
    ev = registry.event
    ev("roost.host.added", OWNER, HostEvent, "A host was added")
    ev("roost.host.discovered", OWNER, HostEvent, "An unknown agent announced itself: an unprovisioned host")
    ev("roost.host.updated", OWNER, HostEvent, "A host's configuration changed")
    ev("roost.host.state_changed", OWNER, HostStateChanged, "A host's administrative, operational or "
       "availability state, or its task, changed")
    ev("roost.host.inventory_updated", OWNER, HostInventoryUpdated, "A host's hardware was reported")
    ev("roost.host.deleted", OWNER, HostDeleted, "A host was deleted")
    ev("roost.host.bmc_access", OWNER, BmcAccess, "A controller's BMC access, sealed for the heartbeat service")
    ev("roost.degrade.set", OWNER, DegradeSet, "A reason why a host is degraded (any service)")
    ev("roost.degrade.clear", OWNER, DegradeClear, "A degrade reason no longer stands (any service)")
    ev("roost.agent.hello", AGENT_OWNER, AgentHello, "A host agent announces itself")
    ev("roost.agent.inventory", AGENT_OWNER, AgentInventory, "A host agent reports its hardware")


register(REGISTRY)
