"""The heartbeat service's HTTP API: ``GET /v1/heartbeat/status`` (reader), what ``roost heartbeat
status`` shows: this monitor's networks and key fingerprint, and every monitored host's paths."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from services.core.http import ReaderPrincipal

if TYPE_CHECKING:
    from services.heartbeat.service import HeartbeatService


def build_router(service: HeartbeatService) -> APIRouter:
    router = APIRouter(prefix="/v1/heartbeat", tags=["heartbeat"])

    @router.get("/status", summary="This monitor and every monitored host's heartbeat paths")
    async def status(principal: ReaderPrincipal) -> dict[str, Any]:
        return service.status()

    return router
