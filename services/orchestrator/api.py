"""The orchestrator's REST API for update strategies, in the shape of the StarlingX VIM's
(``/api/orchestration/<type>/strategy``; roost has one type, ``sw-deploy``):

* ``GET /api/orchestration/sw-deploy/strategy`` and ``GET /api/orchestration/current-strategy/strategy``:
  ``{"strategy": {...}}`` (``null`` when there is none), the same body as ``roost.cmd.strategy.show``;
* ``POST /api/orchestration/sw-deploy/strategy`` (admin): build one; the body is ``StrategyCreate``
  (``release`` and the options); 201 with the strategy; 409 when one exists; 400 when the site cannot be
  updated safely (the reason); 503 when inventory does not answer;
* ``POST /api/orchestration/sw-deploy/strategy/actions`` (admin): ``{"action": "apply-all"}``,
  ``{"action": "apply-stage", "stage-id": "N"}`` (only the next stage) or ``{"action": "abort"}``; 202 with
  the strategy; 404 when there is none; 409 when its state does not allow it (or N is not the next
  stage); 400 for apply-stage without a stage-id (``abort-stage`` is not supported);
* ``DELETE /api/orchestration/sw-deploy/strategy`` (admin, ``?force=true`` while it applies): 204; 409
  while it applies or aborts without force; 404 when there is none.

Authentication as every roost API: a bearer token (or ``X-Auth-Token``); readers read, admins act.
"""

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from schemas import orchestrator as msg
from services.core.http import AdminPrincipal, ReaderPrincipal
from services.orchestrator import apply, store
from services.orchestrator.strategy import BuildError

if TYPE_CHECKING:
    from services.orchestrator.service import OrchestratorService


class StrategyAction(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    action: Literal["apply-all", "apply-stage", "abort", "abort-stage"]
    stage_id: str | None = Field(default=None, alias="stage-id")


def build_router(service: "OrchestratorService") -> APIRouter:
    from services.orchestrator.service import NoStrategy, Unavailable

    router = APIRouter(prefix="/api/orchestration", tags=["orchestrator"])

    def started() -> "OrchestratorService":
        if service._ctx is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the orchestrator has not started")
        return service

    Service = Annotated[Any, Depends(started)]

    async def call(work: Any) -> Any:
        try:
            return await work
        except NoStrategy as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        except Unavailable as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        except (store.StrategyExists, apply.NotAllowed) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except BuildError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None

    @router.get("/sw-deploy/strategy", response_model=msg.StrategyShowResult, summary="Show the update strategy")
    async def show(_: ReaderPrincipal, svc: Service) -> msg.StrategyShowResult:
        return await call(svc.show())  # type: ignore[no-any-return]

    @router.get("/current-strategy/strategy", response_model=msg.StrategyShowResult,
                summary="Show whichever strategy there is")
    async def current(_: ReaderPrincipal, svc: Service) -> msg.StrategyShowResult:
        return await call(svc.show())  # type: ignore[no-any-return]

    @router.post("/sw-deploy/strategy", response_model=msg.StrategyView, status_code=status.HTTP_201_CREATED,
                 summary="Build an update strategy")
    async def create(body: msg.StrategyCreate, _: AdminPrincipal, svc: Service) -> msg.StrategyView:
        return await call(svc.create(body))  # type: ignore[no-any-return]

    @router.post("/sw-deploy/strategy/actions", response_model=msg.StrategyView,
                 status_code=status.HTTP_202_ACCEPTED, summary="Apply or abort the update strategy")
    async def act(body: StrategyAction, _: AdminPrincipal, svc: Service) -> msg.StrategyView:
        if body.action == "abort-stage":
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "abort-stage is not supported: use abort")
        if body.action == "apply-stage":
            if body.stage_id is None or not body.stage_id.isdigit():
                raise HTTPException(status.HTTP_400_BAD_REQUEST, "apply-stage needs a stage-id (a number)")
            return await call(svc.apply(int(body.stage_id)))  # type: ignore[no-any-return]
        return await call(svc.apply() if body.action == "apply-all" else svc.abort())  # type: ignore[no-any-return]

    @router.delete("/sw-deploy/strategy", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
                   summary="Delete the update strategy")
    async def delete(_: AdminPrincipal, svc: Service, force: Annotated[bool, Query()] = False) -> Response:
        await call(svc.delete(force))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
