"""The service runner in-process: order of start and stop, readiness, several services, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
from fastapi import APIRouter

from services.core.http import HealthCheck
from services.core.runner import Service, ServiceRunner, run_services


class Recorder:
    """A service that records what the runner asks of it."""

    def __init__(self, name: str, events: list[str], *, fail_start: bool = False,
                 hang_stop: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail_start = fail_start
        self.hang_stop = hang_stop
        self.healthy = True

    async def start(self) -> None:
        self.events.append(f"{self.name}:start")
        if self.fail_start:
            raise ConnectionError("broker refused the credentials")

    async def stop(self, deadline: float) -> None:
        self.events.append(f"{self.name}:stop")
        if self.hang_stop:
            await asyncio.Event().wait()

    def health_checks(self) -> Sequence[HealthCheck]:
        return [HealthCheck("own", lambda: self.healthy)]

    def routers(self) -> Sequence[APIRouter]:
        router = APIRouter()

        @router.get(f"/v1/{self.name}")
        async def hello() -> dict[str, str]:
            return {"service": self.name}

        return [router]


def test_recorder_is_a_service() -> None:
    assert isinstance(Recorder("x", []), Service)


async def test_runner_serves_and_reports_readiness() -> None:
    events: list[str] = []
    service = Recorder("alpha", events)
    runner = ServiceRunner(service, readiness_cache=0.0)
    await runner.start()
    try:
        async with httpx.AsyncClient(base_url=runner.url) as c:
            assert (await c.get("/v1/alpha")).json() == {"service": "alpha"}
            assert (await c.get("/readyz")).status_code == 200
            service.healthy = False
            assert (await c.get("/readyz")).status_code == 503
            service.healthy = True
            assert (await c.get("/readyz")).status_code == 200
            runner.begin_stop()
            assert (await c.get("/readyz")).json()["state"] == "stopping"
            assert (await c.get("/healthz")).status_code == 200
    finally:
        assert await runner.stop() is True
    assert events == ["alpha:start", "alpha:stop"]


async def test_run_services_starts_in_order_and_stops_in_reverse() -> None:
    events: list[str] = []
    stop = asyncio.Event()
    seen: list[tuple[str, int]] = []

    async def started(runners: Sequence[ServiceRunner]) -> None:
        seen.extend((r.name, r.port) for r in runners)
        async with httpx.AsyncClient() as c:
            for r in runners:
                assert (await c.get(f"{r.url}/readyz")).status_code == 200
        stop.set()

    code = await run_services([Recorder("a", events), Recorder("b", events), Recorder("c", events)],
                              on_started=started, stop_event=stop, handle_signals=False)
    assert code == 0
    assert events == ["a:start", "b:start", "c:start", "c:stop", "b:stop", "a:stop"]
    assert [n for n, _ in seen] == ["a", "b", "c"] and len({p for _, p in seen}) == 3


async def test_a_failed_start_stops_the_started_ones_and_exits_1() -> None:
    events: list[str] = []
    code = await run_services([Recorder("a", events), Recorder("b", events, fail_start=True),
                               Recorder("c", events)], handle_signals=False)
    assert code == 1
    assert events == ["a:start", "b:start", "b:stop", "a:stop"]


async def test_a_stop_past_its_deadline_exits_1() -> None:
    events: list[str] = []
    stop = asyncio.Event()
    code = await run_services([Recorder("a", events), Recorder("slow", events, hang_stop=True)],
                              on_started=lambda runners: stop.set(), stop_event=stop, stop_timeout=0.2,
                              handle_signals=False)
    assert code == 1
    assert events == ["a:start", "slow:start", "slow:stop", "a:stop"]


async def test_a_stop_requested_while_starting_abandons_the_rest() -> None:
    events: list[str] = []
    stop = asyncio.Event()
    stop.set()
    code = await run_services([Recorder("a", events)], stop_event=stop, handle_signals=False)
    assert code == 1
    assert events in ([], ["a:start", "a:stop"]), "a service that started is stopped again"


async def test_duplicate_names_are_refused() -> None:
    try:
        await run_services([Recorder("a", []), Recorder("a", [])], handle_signals=False)
    except ValueError as exc:
        assert "same name" in str(exc)
    else:
        raise AssertionError("expected ValueError")
