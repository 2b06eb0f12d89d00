"""The dcsync service's REST API, in the shape of StarlingX's dcmanager (``/v1.0/subclouds``):

* ``GET /v1.0/subclouds``: ``{"subclouds": [...]}``, every subcloud with its state (reader);
* ``POST /v1.0/subclouds`` (admin): add one; the body is ``SubcloudAdd``; 201 with the subcloud; 409 when one
  of that name exists.  (Its agent must be enrolled on the bus too: `roost subcloud add` does both.);
* ``GET /v1.0/subclouds/{name}`` and ``GET /v1.0/subclouds/{name}/detail``: the subcloud with its endpoints
  (sync status, cursors against heads), schema skew and last audit; 404;
* ``GET /v1.0/subclouds/{name}/sync-status``: ``{"name", "sync", "endpoints": [...]}`` only; 404;
* ``PATCH /v1.0/subclouds/{name}`` (admin): ``{"management-state": "managed" | "unmanaged"}`` as dcmanager;
  the subcloud; 404; 409 when its state does not allow it;
* ``DELETE /v1.0/subclouds/{name}`` (admin): 204; 404; 409 while it is managed;
* ``POST /v1.0/subclouds/{name}/audit`` (admin): audit it now; ``{"reports": [...]}``; 404; 503 when its agent
  does not answer.

Authentication as every roost API: a bearer token (or ``X-Auth-Token``); readers read, admins act.  The
service's refusals (``services.dcsync.errors``) map to 404 / 409 / 503; any other refusal is a 400.
"""

from collections.abc import Awaitable
from typing import Literal, Protocol, TypeVar

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field

from schemas import dcsync as msg
from schemas.envelope import Principal
from services.core.bus.bus import Reject
from services.core.http import AdminPrincipal, ReaderPrincipal
from services.dcsync.errors import Conflict, NotFound, Unavailable

T = TypeVar("T")


class SubcloudApi(Protocol):
    """What the router asks of the dcsync service (``services.dcsync.service.DcsyncService``)."""

    async def add(self, data: msg.SubcloudAdd, principal: Principal | None) -> msg.SubcloudView: ...

    async def delete(self, name: str, principal: Principal | None) -> msg.SubcloudDeleted: ...

    async def manage(self, name: str, principal: Principal | None) -> msg.SubcloudView: ...

    async def unmanage(self, name: str, principal: Principal | None) -> msg.SubcloudView: ...

    async def list(self) -> msg.SubcloudList: ...

    async def show(self, name: str) -> msg.SubcloudDetail: ...

    async def audit(self, name: str) -> msg.AuditResult: ...


class SubcloudPatch(BaseModel):
    """dcmanager's ``subcloud update``: the management state."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    management_state: msg.Management = Field(alias="management-state")


class SyncStatusView(BaseModel):
    name: str
    sync: dict[str, msg.SyncStatus]
    endpoints: list[msg.EndpointView]


_STATUS: tuple[tuple[type[Reject], int], ...] = (
    (NotFound, status.HTTP_404_NOT_FOUND),
    (Conflict, status.HTTP_409_CONFLICT),
    (Unavailable, status.HTTP_503_SERVICE_UNAVAILABLE),
)


async def _call(work: Awaitable[T]) -> T:
    try:
        return await work
    except Reject as exc:
        code = next((c for kind, c in _STATUS if isinstance(exc, kind)), status.HTTP_400_BAD_REQUEST)
        raise HTTPException(code, str(exc)) from None


def build_router(service: SubcloudApi) -> APIRouter:
    router = APIRouter(prefix="/v1.0/subclouds", tags=["dcsync"])

    @router.get("", response_model=msg.SubcloudList, summary="List the subclouds")
    async def list_subclouds(_: ReaderPrincipal) -> msg.SubcloudList:
        return await _call(service.list())

    @router.post("", response_model=msg.SubcloudView, status_code=status.HTTP_201_CREATED, summary="Add a subcloud")
    async def add(body: msg.SubcloudAdd, who: AdminPrincipal) -> msg.SubcloudView:
        return await _call(service.add(body, who))

    @router.get("/{name}", response_model=msg.SubcloudDetail, summary="Show a subcloud")
    async def show(name: str, _: ReaderPrincipal) -> msg.SubcloudDetail:
        return await _call(service.show(name))

    @router.get("/{name}/detail", response_model=msg.SubcloudDetail, summary="Show a subcloud in detail")
    async def detail(name: str, _: ReaderPrincipal) -> msg.SubcloudDetail:
        return await _call(service.show(name))

    @router.get("/{name}/sync-status", response_model=SyncStatusView, summary="A subcloud's sync status")
    async def sync_status(name: str, _: ReaderPrincipal) -> SyncStatusView:
        d = await _call(service.show(name))
        return SyncStatusView(name=d.name, sync=d.sync, endpoints=d.endpoints)

    @router.patch("/{name}", response_model=msg.SubcloudView, summary="Manage or unmanage a subcloud")
    async def update(name: str, body: SubcloudPatch, who: AdminPrincipal) -> msg.SubcloudView:
        verb: Literal["managed", "unmanaged"] = body.management_state
        return await _call(service.manage(name, who) if verb == "managed" else service.unmanage(name, who))

    @router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
                   summary="Delete a subcloud (unmanaged)")
    async def delete(name: str, who: AdminPrincipal) -> Response:
        await _call(service.delete(name, who))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/{name}/audit", response_model=msg.AuditResult, summary="Audit a subcloud now")
    async def audit(name: str, _: AdminPrincipal) -> msg.AuditResult:
        return await _call(service.audit(name))

    return router
