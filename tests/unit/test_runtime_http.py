"""The service HTTP app: health, readiness that follows its checks, metrics, bearer-token roles,
error bodies that never echo input, and uvicorn inside the running loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends
from pydantic import BaseModel

from schemas.envelope import Principal, Role
from services.core.auth import AuthUnavailable, InMemoryAuthenticator
from services.core.http import (
    AdminPrincipal,
    HealthCheck,
    HttpServer,
    Readiness,
    broker_check,
    create_app,
    database_check,
    require_role,
)

PLANTED = "planted-webhook-secret-9f8e7d"


class Subscription(BaseModel):
    url: str
    secret: str
    retries: int


def routes() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/hosts")
    async def hosts(who: Annotated[Principal, Depends(require_role(Role.READER))]) -> dict[str, str]:
        return {"who": who.name}

    @router.post("/hosts/{name}/lock")
    async def lock(name: str, who: AdminPrincipal) -> dict[str, str]:
        return {"locked": name, "by": who.name}

    @router.post("/subscriptions")
    async def subscribe(body: Subscription, who: AdminPrincipal) -> dict[str, str]:
        return {"url": body.url}

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError(f"exploded with {PLANTED}")

    return router


@pytest.fixture
def authenticator() -> InMemoryAuthenticator:
    return InMemoryAuthenticator()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness(cache_seconds=0.2)


@pytest.fixture
async def client(readiness: Readiness, authenticator: InMemoryAuthenticator) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("testsvc", readiness=readiness, authenticator=authenticator, routers=[routes()])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testsvc") as c:
        yield c


async def wait_for_status(client: httpx.AsyncClient, path: str, code: int, within: float = 10.0) -> httpx.Response:
    """Poll until ``path`` answers ``code`` (readiness is cached, so the change shows after the cache)."""
    deadline = time.monotonic() + within
    while True:
        response = await client.get(path)
        if response.status_code == code or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.05)


async def test_healthz_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "service": "testsvc"}
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and "roost_bus_messages_consumed_total" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")


async def test_readiness_follows_lifecycle_and_checks(client: httpx.AsyncClient, readiness: Readiness) -> None:
    broker_up = True
    readiness.add("broker", lambda: broker_up)
    starting = await client.get("/readyz")
    assert starting.status_code == 503 and starting.json()["state"] == "starting"
    readiness.set_running()
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["broker"]["ok"] is True
    broker_up = False
    started = time.monotonic()
    lost = await wait_for_status(client, "/readyz", 503)
    assert lost.status_code == 503 and time.monotonic() - started < 10
    assert lost.json()["checks"]["broker"] == {**lost.json()["checks"]["broker"], "ok": False}
    broker_up = True
    assert (await wait_for_status(client, "/readyz", 200)).status_code == 200
    readiness.set_stopping()
    stopping = await client.get("/readyz")
    assert stopping.status_code == 503 and stopping.json()["state"] == "stopping"


async def test_a_hanging_or_raising_check_is_not_ready(client: httpx.AsyncClient, readiness: Readiness) -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    async def raises() -> bool:
        raise ConnectionError(f"cannot reach postgresql://roost:{PLANTED}@db/roost")

    readiness.extend([HealthCheck("hangs", hangs, timeout=0.1), HealthCheck("database", raises)])
    readiness.set_running()
    response = await client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["hangs"]["detail"] == "no answer within 0.1s"
    assert "ConnectionError" in checks["database"]["detail"] and PLANTED not in response.text


async def test_concurrent_probes_share_one_evaluation(readiness: Readiness) -> None:
    calls = 0
    release = asyncio.Event()

    async def slow() -> bool:
        nonlocal calls
        calls += 1
        await release.wait()
        return True

    readiness.add("slow", slow)
    readiness.set_running()
    probes = [asyncio.create_task(readiness.evaluate()) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    reports = await asyncio.gather(*probes)
    assert calls == 1 and all(r.ready for r in reports)


async def test_broker_and_database_checks() -> None:
    class Transport:
        connected = True

    class Pool:
        def __init__(self) -> None:
            self.fail = False

        async def fetchval(self, query: str, *args: object, timeout: float | None = None) -> int:
            if self.fail:
                raise OSError("connection refused")
            return 1

    transport, pool = Transport(), Pool()
    readiness = Readiness([broker_check(transport), database_check(pool)], cache_seconds=0)
    readiness.set_running()
    assert (await readiness.evaluate()).ready
    pool.fail = True
    report = await readiness.evaluate()
    assert not report.ready and [c.name for c in report.checks if not c.ok] == ["database"]
    pool.fail, transport.connected = False, False
    assert [c.name for c in (await readiness.evaluate()).checks if not c.ok] == ["broker"]


async def test_roles(client: httpx.AsyncClient, authenticator: InMemoryAuthenticator) -> None:
    admin = authenticator.issue("alice", Role.ADMIN)
    reader = authenticator.issue("bob", Role.READER)
    missing = await client.post("/v1/hosts/compute-0/lock")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = await client.post("/v1/hosts/compute-0/lock", headers={"Authorization": "Bearer roost_" + "A" * 43})
    assert wrong.status_code == 401
    basic = await client.post("/v1/hosts/compute-0/lock", headers={"Authorization": "Basic YTpi"})
    assert basic.status_code == 401
    denied = await client.post("/v1/hosts/compute-0/lock", headers={"Authorization": f"Bearer {reader}"})
    assert denied.status_code == 403 and "needs admin" in denied.json()["detail"]
    ok = await client.post("/v1/hosts/compute-0/lock", headers={"Authorization": f"Bearer {admin}"})
    assert ok.json() == {"locked": "compute-0", "by": "alice"}
    assert (await client.get("/v1/hosts", headers={"Authorization": f"Bearer {reader}"})).json() == {"who": "bob"}
    assert (await client.get("/v1/hosts", headers={"Authorization": f"Bearer {admin}"})).status_code == 200
    authenticator.revoke("alice")
    assert (await client.post("/v1/hosts/x/lock", headers={"Authorization": f"Bearer {admin}"})).status_code == 401


async def test_token_store_down_is_503_not_401() -> None:
    class Down:
        async def authenticate(self, token: str) -> Principal | None:
            raise AuthUnavailable("database unreachable")

    app = create_app("testsvc", authenticator=Down(), routers=[routes()])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/v1/hosts", headers={"Authorization": "Bearer roost_" + "A" * 43})
    assert response.status_code == 503


async def test_error_bodies_never_echo_input(client: httpx.AsyncClient, authenticator: InMemoryAuthenticator) -> None:
    admin = authenticator.issue("alice", Role.ADMIN)
    invalid = await client.post("/v1/subscriptions", headers={"Authorization": f"Bearer {admin}"},
                                json={"url": "http://hook", "secret": PLANTED, "retries": "many"})
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "retries"]
    assert PLANTED not in invalid.text and admin not in invalid.text
    crashed = await client.get("/v1/boom")
    assert crashed.status_code == 500 and PLANTED not in crashed.text


async def test_openapi_lists_routes_and_the_bearer_scheme(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {"/healthz", "/readyz", "/v1/hosts/{name}/lock"} <= spec["paths"].keys()
    assert spec["components"]["securitySchemes"]["roostToken"]["scheme"] == "bearer"
    assert (await client.get("/docs")).status_code == 200


async def test_http_server_on_a_free_port_finishes_requests_in_flight_when_stopped() -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    router = APIRouter()

    @router.get("/slow")
    async def slow() -> dict[str, str]:
        entered.set()
        await release.wait()
        return {"done": "yes"}

    server = HttpServer(create_app("srv", routers=[router]), "127.0.0.1", 0)
    port = await server.start()
    assert port > 0 and server.url == f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=server.url) as c:
        assert (await c.get("/healthz")).status_code == 200
        in_flight = asyncio.create_task(c.get("/slow"))
        await entered.wait()
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0)
        release.set()
        response = await in_flight
        await stopping
    assert response.json() == {"done": "yes"}
    async with httpx.AsyncClient() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(f"http://127.0.0.1:{port}/healthz")


async def test_http_server_reports_a_taken_port() -> None:
    first = HttpServer(create_app("a"), "127.0.0.1", 0)
    port = await first.start()
    try:
        with pytest.raises(OSError):
            await HttpServer(create_app("b"), "127.0.0.1", port).start()
    finally:
        await first.stop()
