"""The inventory REST API, in the shape of StarlingX sysinv v1 (same paths, list keys and, where they map,
field names).

* ``GET /v1/ihosts``: ``{"ihosts": [...], "next": "<url>"}`` ordered by ``id``; ``personality``, ``limit``
  (≤ 10,000), ``marker`` (the uuid of the previous page's last host);
* ``POST /v1/ihosts`` (admin): add a host; the body is roost's ``HostAdd`` (``hostname``, ``personality``,
  ``subfunctions``, ``mgmt_mac``, ``serial``, ``location``, ``labels``, ``bmc``, ``addresses``); 201 with the
  host; 409 when another host has the hostname or the MAC;
* ``GET /v1/ihosts/{id}``: one host, by uuid or hostname;
* ``PATCH /v1/ihosts/{id}`` (admin): sysinv's JSON patch, ``[{"op": "replace", "path": "/action", "value":
  "lock"}]``, or the plain object ``{"action": "lock"}``.  Actions: ``lock, force-lock, unlock, force-unlock,
  reboot, reset, power-on, power-off, reinstall, swact, force-swact`` (and ``none``); an action is alone in
  its patch.  Updates: ``/hostname``, ``/personality``, ``/subfunctions`` (while unprovisioned),
  ``/location`` (text, or sysinv's ``{"locn": text}``), ``/serial`` (or ``/serialid``), ``/labels`` (replaces
  them), ``/bmc`` (an object with the password, which is stored sealed and never shown), or sysinv's
  ``/bm_type`` (none, redfish, dynamic), ``/bm_ip`` (``https://`` is assumed), ``/bm_username``,
  ``/bm_password`` applied to the BMC the host has, ``/addresses`` (replaces them).  The answer is the host
  with ``detail``: what the action did, in words (for example that no orchestrator is running, so a lock
  did not wait for services to be disabled);
* ``DELETE /v1/ihosts/{id}`` (admin): delete a locked host, 204;
* ``GET /v1/ihosts/{id}/icpus``, ``/imemorys``, ``/idisks``, ``/ports``: the hardware its agent (or BMC)
  reported, ``{"icpus": [...]}`` and so on.  Each item has a ``uuid`` stable for the host and the item
  (derived from the host's uuid and the CPU number, the disk's device node, the port's name) and
  ``ihost_uuid``.  CPUs: ``cpu`` (logical), ``core`` (physical, in its socket), ``thread``, ``socket`` (roost;
  sysinv's processor), ``cpu_model``.  Memory, one item for the host: ``memtotal_mib``, ``memavail_mib``.
  Disks: ``device_node``, ``device_type`` (HDD, SSD, NVME, unknown), ``size_mib``, ``serial_id``,
  ``device_model``.  Ports: ``name``, ``mac``, ``speed`` (Mb/s), ``mtu``, ``driver``, ``pciaddr``, ``link``
  (roost: up, down, unknown).

A host is shown with sysinv's names: ``id`` (roost's node id, stable, never reused), ``uuid``, ``hostname``,
``personality``, ``subfunctions`` (comma-separated), ``administrative``, ``operational``, ``availability``,
``task``, ``action``, ``invprovision`` (provisioned / unprovisioned), ``inv_state`` (``inventoried`` once its
agent reported its hardware), ``mgmt_mac``, ``mgmt_ip``, ``serialid``, ``location`` (``{"locn": text}``),
``uptime``, ``bm_type``, ``bm_ip``, ``bm_username``, ``created_at``, ``updated_at``; and roost's own:
``active`` (the active controller), ``power_state``, ``labels``, ``addresses`` (one per heartbeat network),
``bmc`` (never the password: ``password_set`` says whether one is stored), ``degrade_reasons``, ``agent``,
``agent_seen_at``, ``version``.

Authentication: a bearer token or the same token in ``X-Auth-Token`` (what StarlingX clients send); readers
may read, admins may change.  Errors: 422 when a request does not fit its schema (an invalid personality,
MAC, hostname, an unknown field or action; ``detail`` lists where and what, never the value sent); 400
with the reason when the host's state or the request does not allow it (sysinv's semantic checks: lock the
active controller, unlock an offline host without force, a worker without a hostname...); 404 for an
unknown host; 409 for a duplicate hostname or MAC; 503 until the service has started.  A refused
request changes nothing.  Error bodies never repeat what the client sent.
"""

import uuid as uuidlib
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError

from schemas import inventory as msg
from schemas.envelope import Envelope, Principal
from services.core.http import AdminPrincipal, ReaderPrincipal
from services.inventory.service import HostCommandRefused, HostNotFound
from services.inventory.store import DuplicateHost

if TYPE_CHECKING:
    from services.inventory.service import InventoryService

log = structlog.get_logger("roost.inventory.api")

API_SOURCE = "roost/inventory-api"
LIMIT_MAX = 10_000
REF_MAX = 64
"""A host reference (uuid or hostname) is at most this long (``schemas.inventory.HostRef``)."""
_NO_HOST = "no host with this uuid or hostname"
_ITEM_NS = uuidlib.UUID("5d1f3c9e-2b7a-5e4c-8a61-726f6f737401")

Reader = ReaderPrincipal        # services.core.http: bearer or X-Auth-Token
Admin = AdminPrincipal

PatchAction = Literal["none", "lock", "force-lock", "unlock", "force-unlock", "reboot", "reset", "power-on",
                      "power-off", "reinstall", "swact", "force-swact"]
ACTIONS: dict[str, tuple[str, bool]] = {
    "lock": ("roost.cmd.host.lock", False), "force-lock": ("roost.cmd.host.lock", True),
    "unlock": ("roost.cmd.host.unlock", False), "force-unlock": ("roost.cmd.host.unlock", True),
    "swact": ("roost.cmd.host.swact", False), "force-swact": ("roost.cmd.host.swact", True),
    "reboot": ("roost.cmd.host.reboot", False), "reset": ("roost.cmd.host.reset", False),
    "power-on": ("roost.cmd.host.power_on", False), "power-off": ("roost.cmd.host.power_off", False),
    "reinstall": ("roost.cmd.host.reinstall", False)}
"""A PATCH ``/action`` value: the bus command it runs and whether it is forced."""


# -- response models ------------------------------------------------------------------------------------


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Location(_Out):
    locn: str = Field(description="free text")


class HostOut(_Out):
    """A host, sysinv's field names where they exist, then roost's."""

    id: int = Field(description="the node id: a stable small integer, never reused")
    uuid: str
    hostname: str | None
    personality: msg.Personality | None
    subfunctions: str = Field(description="comma-separated, e.g. controller,worker")
    administrative: msg.Administrative
    operational: msg.Operational
    availability: msg.Availability
    task: str
    action: msg.HostAction
    invprovision: msg.Provision
    inv_state: Literal["inventoried", ""] = Field(description="inventoried once its agent reported its hardware")
    mgmt_mac: str | None
    mgmt_ip: str | None
    serialid: str
    location: Location
    uptime: int | None = Field(description="seconds, as its agent last said")
    bm_type: msg.BmcType
    bm_ip: str = Field(description="the BMC's Redfish address (a URL)")
    bm_username: str
    active: bool = Field(description="the active controller (roost)")
    power_state: msg.PowerState = Field(description="roost")
    labels: dict[str, str] = Field(description="roost")
    addresses: dict[msg.Network, str] = Field(description="the host's address on each heartbeat network (roost)")
    bmc: msg.BmcInfo | None = Field(description="the BMC, never its password (roost)")
    degrade_reasons: list[str] = Field(description="why it is degraded (roost)")
    agent: str | None = Field(description="its host agent (roost)")
    agent_seen_at: datetime | None = Field(description="roost")
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="grows by one per change of the host (roost)")


class HostPatched(HostOut):
    detail: str = Field(default="", description="what the action did, in words (roost)")


class HostCollection(_Out):
    ihosts: list[HostOut]
    next: str | None = Field(default=None, exclude_if=lambda value: value is None,
                             description="the URL of the next page; absent on the last")


class CpuOut(_Out):
    uuid: str
    ihost_uuid: str
    cpu: int = Field(description="logical CPU number")
    core: int = Field(description="physical core within its socket")
    thread: int
    socket: int = Field(description="physical package (sysinv's processor)")
    cpu_model: str


class CpuCollection(_Out):
    icpus: list[CpuOut]


class MemoryOut(_Out):
    uuid: str
    ihost_uuid: str
    memtotal_mib: int
    memavail_mib: int | None


class MemoryCollection(_Out):
    imemorys: list[MemoryOut]


class DiskOut(_Out):
    uuid: str
    ihost_uuid: str
    device_node: str
    device_type: Literal["HDD", "SSD", "NVME", "unknown"]
    size_mib: int
    serial_id: str
    device_model: str


class DiskCollection(_Out):
    idisks: list[DiskOut]


class PortOut(_Out):
    uuid: str
    ihost_uuid: str
    name: str
    mac: str | None
    speed: int | None = Field(description="Mb/s")
    mtu: int | None
    driver: str | None
    pciaddr: str | None
    link: Literal["up", "down", "unknown"]


class PortCollection(_Out):
    ports: list[PortOut]


# -- request models -------------------------------------------------------------------------------------


def _location_text(value: Any) -> Any:
    """sysinv sends ``{"locn": text}``; roost takes the text itself."""
    if isinstance(value, dict) and set(value) == {"locn"}:
        return value["locn"]
    return value


def _split_commas(value: Any) -> Any:
    """sysinv writes subfunctions as ``controller,worker``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


LocationIn = Annotated[str, BeforeValidator(_location_text), Field(max_length=255,
                                                                   description='text, or {"locn": text}')]
SubfunctionsIn = Annotated[list[msg.Subfunction], BeforeValidator(_split_commas),
                           Field(description="a list, or comma-separated")]
Labels = dict[msg.Label, msg.LabelValue]
Addresses = dict[msg.Network, msg.IpAddress]


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")

    op: Literal["replace", "add"] = Field(description="both set the value")


class ActionOp(_Op):
    path: Literal["/action"]
    value: PatchAction


class HostnameOp(_Op):
    path: Literal["/hostname"]
    value: msg.Hostname


class PersonalityOp(_Op):
    path: Literal["/personality"]
    value: msg.Personality


class SubfunctionsOp(_Op):
    path: Literal["/subfunctions"]
    value: SubfunctionsIn


class LocationOp(_Op):
    path: Literal["/location"]
    value: LocationIn


class SerialOp(_Op):
    path: Literal["/serial", "/serialid"]
    value: str = Field(max_length=255)


class LabelsOp(_Op):
    path: Literal["/labels"]
    value: Labels


class BmcOp(_Op):
    path: Literal["/bmc"]
    value: msg.BmcSettings


class AddressesOp(_Op):
    path: Literal["/addresses"]
    value: Addresses


BmType = Literal["none", "redfish", "dynamic"]
"""sysinv's ``bm_type`` values roost drives (``dynamic``: redfish here; sysinv's ``ipmi`` is not supported)."""


class BmTypeOp(_Op):
    path: Literal["/bm_type"]
    value: BmType


class BmIpOp(_Op):
    path: Literal["/bm_ip"]
    value: str = Field(max_length=255, description="an IP address or host (https:// is assumed), or a URL")


class BmUsernameOp(_Op):
    path: Literal["/bm_username"]
    value: str = Field(max_length=64)


class BmPasswordOp(_Op):
    path: Literal["/bm_password"]
    value: str = Field(max_length=255, repr=False)


AnyOp = (ActionOp | HostnameOp | PersonalityOp | SubfunctionsOp | LocationOp | SerialOp | LabelsOp | BmcOp | AddressesOp
         | BmTypeOp | BmIpOp | BmUsernameOp | BmPasswordOp)
PATHS = ("/action", "/hostname", "/personality", "/subfunctions", "/location", "/serial", "/serialid", "/labels",
         "/bmc", "/addresses", "/bm_type", "/bm_ip", "/bm_username", "/bm_password")
BM_FIELDS = {"bm_type": "type", "bm_ip": "address", "bm_username": "username", "bm_password": "password"}
"""sysinv's BMC fields (``system host-update HOST bm_ip=… bm_username=… bm_password=…``) and roost's names."""


def _op_path(value: Any) -> str | None:
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", None)
    if path not in PATHS:
        return None             # the error says which paths there are, never the one sent
    return "/serial" if path == "/serialid" else str(path)


PatchOp = Annotated[
    Annotated[ActionOp, Tag("/action")] | Annotated[HostnameOp, Tag("/hostname")]
    | Annotated[PersonalityOp, Tag("/personality")] | Annotated[SubfunctionsOp, Tag("/subfunctions")]
    | Annotated[LocationOp, Tag("/location")] | Annotated[SerialOp, Tag("/serial")]
    | Annotated[LabelsOp, Tag("/labels")] | Annotated[BmcOp, Tag("/bmc")] | Annotated[AddressesOp, Tag("/addresses")]
    | Annotated[BmTypeOp, Tag("/bm_type")] | Annotated[BmIpOp, Tag("/bm_ip")]
    | Annotated[BmUsernameOp, Tag("/bm_username")] | Annotated[BmPasswordOp, Tag("/bm_password")],
    Discriminator(_op_path, custom_error_type="patch_path",
                  custom_error_message=f"path must be one of {', '.join(PATHS)}")]


class HostPatch(BaseModel):
    """The plain-object form of a PATCH: the fields to change, or one action."""

    model_config = ConfigDict(extra="forbid")

    action: PatchAction | None = None
    hostname: msg.Hostname | None = None
    personality: msg.Personality | None = None
    subfunctions: SubfunctionsIn | None = None
    location: LocationIn | None = None
    serial: str | None = Field(default=None, max_length=255)
    labels: Labels | None = None
    bmc: msg.BmcSettings | None = None
    addresses: Addresses | None = None
    bm_type: BmType | None = None
    bm_ip: str | None = Field(default=None, max_length=255)
    bm_username: str | None = Field(default=None, max_length=64)
    bm_password: str | None = Field(default=None, max_length=255, repr=False)


def _patch_form(value: Any) -> str:
    return "json-patch" if isinstance(value, list) else "object"


PatchBody = Annotated[Annotated[list[PatchOp], Tag("json-patch")] | Annotated[HostPatch, Tag("object")],
                      Discriminator(_patch_form)]
"""sysinv's JSON patch or the plain object; a validation error names the form, then where in it."""


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "the host's state or the request does not allow it; the reason is in `detail`"},
    401: {"description": "no token, or an invalid one"},
    403: {"description": "the token's role does not allow this"},
    404: {"description": "no host with this uuid or hostname"},
    422: {"description": "the request does not fit its schema; `detail` lists where and what"},
    503: {"description": "the service has not started or cannot check tokens"},
}


# -- conversions ----------------------------------------------------------------------------------------


def host_out(host: msg.Host) -> HostOut:
    return HostOut(
        id=host.node_id, uuid=host.uuid, hostname=host.hostname, personality=host.personality,
        subfunctions=",".join(host.subfunctions), administrative=host.administrative,
        operational=host.operational, availability=host.availability, task=host.task, action=host.action,
        invprovision=host.provision, inv_state="inventoried" if host.inventoried else "", mgmt_mac=host.mgmt_mac,
        mgmt_ip=str(host.addresses["mgmt"]) if "mgmt" in host.addresses else None, serialid=host.serial,
        location=Location(locn=host.location), uptime=host.uptime_seconds,
        bm_type=host.bmc.type if host.bmc is not None else "none",
        bm_ip=host.bmc.address if host.bmc is not None else "",
        bm_username=host.bmc.username if host.bmc is not None else "", active=host.active,
        power_state=host.power_state, labels=dict(host.labels),
        addresses={k: str(v) for k, v in host.addresses.items()}, bmc=host.bmc,
        degrade_reasons=list(host.degrade_reasons), agent=host.agent, agent_seen_at=host.agent_seen_at,
        created_at=host.created_at, updated_at=host.updated_at, version=host.version)


def item_uuid(host_uuid: str, kind: str, key: str | int) -> str:
    """The stable uuid of one hardware item of a host (a CPU, a disk, a port, its memory)."""
    return str(uuidlib.uuid5(_ITEM_NS, f"{host_uuid}/{kind}/{key}"))


def _bad(reason: str) -> HTTPException:
    return HTTPException(status.HTTP_400_BAD_REQUEST, reason)


def _ref(host_id: Annotated[str, Path(description="the host's uuid or hostname")]) -> str:
    if len(host_id) > REF_MAX:
        raise _bad(f"the host id is longer than {REF_MAX} characters (a uuid or a hostname)")
    return host_id


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _check_text(model: BaseModel) -> None:
    """PostgreSQL text cannot hold NUL: refuse it here rather than fail in the database."""
    if _has_nul(model.model_dump(mode="json")):
        raise _bad("text fields must not contain NUL characters")


def _envelope(type: str, principal: Principal, data: dict[str, Any]) -> Envelope:
    return Envelope(source=API_SOURCE, type=type, principal=principal, data=data)


def _invalid(exc: ValidationError, prefix: Sequence[str | int] = ("body",)) -> RequestValidationError:
    """A validation error raised after FastAPI's own checks, answered like them (422, where and what)."""
    return RequestValidationError([{"loc": (*prefix, *e["loc"]), "msg": e["msg"], "type": e["type"]}
                                   for e in exc.errors(include_url=False, include_input=False)])


# -- the router -----------------------------------------------------------------------------------------


def build_router(service: "InventoryService") -> APIRouter:
    """The sysinv-shaped REST API of ``service`` (answers 503 until the service has started)."""
    router = APIRouter(prefix="/v1", tags=["inventory"], responses=_ERRORS)

    def started() -> "InventoryService":
        if getattr(service, "_ctx", None) is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the inventory service has not started")
        return service

    Service = Annotated[Any, Depends(started)]
    Ref = Annotated[str, Depends(_ref)]

    async def execute(svc: "InventoryService", data: BaseModel, envelope: Envelope) -> BaseModel:
        try:
            return await svc.execute(data, envelope)
        except HostNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, _NO_HOST) from None
        except DuplicateHost as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except HostCommandRefused as exc:
            raise _bad(str(exc)) from None

    async def shown(svc: "InventoryService", ref: str) -> msg.Host:
        try:
            return await svc.show(ref)
        except HostNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, _NO_HOST) from None

    async def hardware(svc: "InventoryService", ref: str) -> msg.HostHardware:
        try:
            return await svc.hardware(ref)
        except HostNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, _NO_HOST) from None

    @router.get("/ihosts", response_model=HostCollection,
                summary="List the hosts")
    async def list_hosts(request: Request, _: Reader, svc: Service,
                         personality: Annotated[msg.Personality | None, Query()] = None,
                         limit: Annotated[int, Query(ge=1, le=LIMIT_MAX)] = LIMIT_MAX,
                         marker: Annotated[str | None, Query(max_length=REF_MAX,
                                                             description="the uuid of the previous page's "
                                                                         "last host")] = None) -> HostCollection:
        hosts = await svc.list_hosts(personality, LIMIT_MAX)
        if marker is not None:
            try:
                wanted = str(uuidlib.UUID(marker))
            except ValueError:
                raise _bad("marker is not a uuid") from None
            at = next((i for i, h in enumerate(hosts) if h.uuid == wanted), None)
            if at is None:
                raise _bad("marker is not a host of this list (gone, or filtered out)")
            hosts = hosts[at + 1:]
        page = hosts[:limit]
        more = len(hosts) > limit
        return HostCollection(ihosts=[host_out(h) for h in page],
                              next=str(request.url.include_query_params(marker=page[-1].uuid)) if more else None)

    @router.post("/ihosts", response_model=HostOut, status_code=status.HTTP_201_CREATED,
                 responses={409: {"description": "another host has this hostname or management MAC"}},
                 summary="Add a host (or give a discovered, unprovisioned one with this MAC its identity)")
    async def add_host(body: Annotated[msg.HostAdd, Body()], who: Admin, svc: Service) -> HostOut:
        _check_text(body)
        envelope = _envelope("roost.cmd.host.add", who, body.model_dump(mode="json", exclude={"bmc"}))
        host = await execute(svc, body, envelope)
        assert isinstance(host, msg.Host)
        log.info("host added", uuid=host.uuid, hostname=host.hostname, by=who.name)
        return host_out(host)

    @router.get("/ihosts/{host_id}", response_model=HostOut, summary="Show one host (by uuid or hostname)")
    async def show_host(host_id: Ref, _: Reader, svc: Service) -> HostOut:
        return host_out(await shown(svc, host_id))

    @router.patch("/ihosts/{host_id}", response_model=HostPatched,
                  responses={409: {"description": "another host has this hostname"}},
                  summary="Run an action on a host, or change it (sysinv's JSON patch, or a plain object)")
    async def patch_host(host_id: Ref, who: Admin, svc: Service,
                         patch: Annotated[PatchBody, Body()]) -> HostPatched:
        fields = _patch_fields(patch)
        action = fields.pop("action", None)
        if action is not None and fields:
            raise _bad("an action cannot be combined with other changes in one patch")
        if action is not None and action != "none":
            return await _act(svc, host_id, action, who)
        if not fields:
            return HostPatched(**host_out(await shown(svc, host_id)).model_dump())
        sysinv_bmc = {k: fields.pop(k) for k in BM_FIELDS if k in fields}
        if sysinv_bmc:
            if "bmc" in fields:
                raise _bad("give the BMC as /bmc or as sysinv's bm_* fields, not both")
            fields["bmc"] = _merged_bmc((await shown(svc, host_id)).bmc, sysinv_bmc)
        try:
            update = msg.HostUpdate.model_validate({"host": host_id, **fields})
        except ValidationError as exc:
            raise _invalid(exc) from None
        _check_text(update)
        envelope = _envelope("roost.cmd.host.update", who, {"host": host_id, "fields": sorted(fields)})
        host = await execute(svc, update, envelope)
        assert isinstance(host, msg.Host)
        return HostPatched(**host_out(host).model_dump())

    async def _act(svc: "InventoryService", ref: str, action: str, who: Principal) -> HostPatched:
        type, force = ACTIONS[action]
        data: BaseModel
        if type == "roost.cmd.host.lock":
            data = msg.HostLock(host=ref, force=force)
        elif type == "roost.cmd.host.unlock":
            data = msg.HostUnlock(host=ref, force=force)
        elif type == "roost.cmd.host.swact":
            data = msg.HostSwact(host=ref, force=force)
        else:
            data = msg.HostCommand(host=ref)
        result = await execute(svc, data, _envelope(type, who, data.model_dump(mode="json")))
        assert isinstance(result, msg.HostActionResult)
        log.info("host action", action=action, host=result.host.hostname or result.host.uuid, by=who.name)
        return HostPatched(**host_out(result.host).model_dump(), detail=result.detail)

    @router.delete("/ihosts/{host_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
                   summary="Delete a locked host")
    async def delete_host(host_id: Ref, who: Admin, svc: Service) -> Response:
        data = msg.HostCommand(host=host_id)
        await execute(svc, data, _envelope("roost.cmd.host.delete", who, data.model_dump(mode="json")))
        log.info("host deleted", host=host_id, by=who.name)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get("/ihosts/{host_id}/icpus", response_model=CpuCollection, summary="A host's logical CPUs")
    async def cpus(host_id: Ref, _: Reader, svc: Service) -> CpuCollection:
        hw = await hardware(svc, host_id)
        return CpuCollection(icpus=[CpuOut(uuid=item_uuid(hw.uuid, "cpu", c.cpu), ihost_uuid=hw.uuid, cpu=c.cpu,
                                           core=c.core, thread=c.thread, socket=c.socket, cpu_model=c.model)
                                    for c in hw.hardware.cpus])

    @router.get("/ihosts/{host_id}/imemorys", response_model=MemoryCollection, summary="A host's memory")
    async def memory(host_id: Ref, _: Reader, svc: Service) -> MemoryCollection:
        hw = await hardware(svc, host_id)
        mem = hw.hardware.memory
        items = [] if mem is None else [MemoryOut(uuid=item_uuid(hw.uuid, "memory", 0), ihost_uuid=hw.uuid,
                                                  memtotal_mib=mem.total_mib, memavail_mib=mem.available_mib)]
        return MemoryCollection(imemorys=items)

    @router.get("/ihosts/{host_id}/idisks", response_model=DiskCollection, summary="A host's disks")
    async def disks(host_id: Ref, _: Reader, svc: Service) -> DiskCollection:
        hw = await hardware(svc, host_id)
        return DiskCollection(idisks=[
            DiskOut(uuid=item_uuid(hw.uuid, "disk", d.device_node), ihost_uuid=hw.uuid, device_node=d.device_node,
                    device_type=d.type, size_mib=d.size_mib, serial_id=d.serial, device_model=d.model)
            for d in hw.hardware.disks])

    @router.get("/ihosts/{host_id}/ports", response_model=PortCollection, summary="A host's network ports")
    async def ports(host_id: Ref, _: Reader, svc: Service) -> PortCollection:
        hw = await hardware(svc, host_id)
        return PortCollection(ports=[
            PortOut(uuid=item_uuid(hw.uuid, "port", p.name), ihost_uuid=hw.uuid, name=p.name, mac=p.mac,
                    speed=p.speed_mbps, mtu=p.mtu, driver=p.driver, pciaddr=p.pci_address, link=p.link)
            for p in hw.hardware.ports])

    return router


def _bm_address(value: str) -> str:
    """sysinv's ``bm_ip`` is an address; roost's BMC address is the Redfish service's URL."""
    if not value or "://" in value:
        return value
    return f"https://[{value}]" if ":" in value else f"https://{value}"


def _merged_bmc(current: msg.BmcInfo | None, given: dict[str, Any]) -> msg.BmcSettings:
    """The host's BMC with sysinv's ``bm_*`` fields applied (the stored password stays unless one is given)."""
    if given.get("bm_type") == "none":
        return msg.BmcSettings(type="none")
    settings: dict[str, Any] = {"type": "redfish"}
    if current is not None:
        settings.update(address=current.address, username=current.username, system_id=current.system_id,
                        verify_tls=current.verify_tls)
    for name, value in given.items():
        if name != "bm_type":
            settings[BM_FIELDS[name]] = _bm_address(value) if name == "bm_ip" else value
    try:
        return msg.BmcSettings.model_validate(settings)
    except ValidationError as exc:
        roost_to_sysinv = {v: k for k, v in BM_FIELDS.items()}
        raise RequestValidationError([
            {"loc": ("body", *(roost_to_sysinv.get(str(p), p) for p in e["loc"])), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)]) from None


def _patch_fields(patch: list[AnyOp] | HostPatch) -> dict[str, Any]:
    """What a patch asks for, by HostUpdate's field names (and ``action``); the last op on a path wins."""
    if isinstance(patch, HostPatch):
        return {name: getattr(patch, name) for name in patch.model_fields_set if getattr(patch, name) is not None}
    if not patch:
        raise _bad("the patch is empty")
    fields: dict[str, Any] = {}
    for op in patch:
        name = "serial" if op.path == "/serialid" else op.path.removeprefix("/")
        fields[name] = op.value
    return fields
