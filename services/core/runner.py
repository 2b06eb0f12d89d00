"""Running roost services: start, serve HTTP, stop gracefully on SIGTERM / SIGINT.

A service is any object with this shape (``Service``)::

    class Inventory:
        name = "inventory"
        async def start(self) -> None: ...              # connect, migrate, subscribe, start the relay
        async def stop(self, deadline: float) -> None: ...
        def health_checks(self) -> Sequence[HealthCheck]: ...   # e.g. broker_check(bus.transport), database_check(pool)
        def routers(self) -> Sequence[APIRouter]: ...           # its REST API

``stop(deadline)`` is the whole graceful stop, in this order, finished before ``deadline`` (a
``time.monotonic()`` value): stop consuming (no new deliveries: ``bus.stop_consuming()``), let the
handlers in flight finish and settle their messages, flush the outbox (the relay publishes what was
committed, with confirms), then close the bus and the pool.  What is not finished by the deadline is
left to at-least-once delivery: unsettled messages are redelivered, unsent outbox rows are sent by the
next relay.  The runner cancels ``stop`` one second after the deadline.

``ServiceRunner`` runs one service with its HTTP server:

1. the app is built (``/healthz``, ``/readyz``, ``/metrics``, the service's routers) and listens:
   liveness answers from here on, readiness says ``starting``;
2. ``service.start()``; then its health checks join the readiness, which turns ``running``;
3. on stop: readiness turns false at once, ``service.stop(deadline)`` runs, then the HTTP server stops.

``run_services([...])`` runs several services in one process (``roost up`` runs them all): it starts
them in order (stopping the started ones if one fails), installs the SIGTERM / SIGINT handlers, and on
the first signal turns every service's readiness false and stops them in reverse order under one
deadline.  It returns the exit code: 0 when every service stopped cleanly, 1 otherwise (a start
failed, a stop raised or overran the deadline, or a second signal forced the stop).

Log lines of a service carry ``service=<name>``: it is bound while the service starts, so every task
the service creates inherits it.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from importlib import metadata
from typing import Protocol, runtime_checkable

import structlog
from fastapi import APIRouter, FastAPI

from services.core import metrics
from services.core.auth import Authenticator
from services.core.http import HealthCheck, HttpServer, Readiness, create_app

log = structlog.get_logger("roost.runner")

STOP_GRACE = 1.0       # seconds past the deadline before a stop is cancelled


@runtime_checkable
class Service(Protocol):
    """What the runner runs.  See the module docstring for the contract of each method."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self, deadline: float) -> None: ...

    def health_checks(self) -> Sequence[HealthCheck]: ...

    def routers(self) -> Sequence[APIRouter]: ...


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), never negative."""
    return max(0.0, deadline - time.monotonic())


def roost_version() -> str:
    try:
        return metadata.version("roost")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class ServiceRunner:
    """One service and its HTTP server."""

    def __init__(self, service: Service, *, host: str = "127.0.0.1", port: int = 0,
                 authenticator: Authenticator | None = None, stop_timeout: float = 30.0,
                 start_timeout: float | None = 120.0, readiness_cache: float = 1.0) -> None:
        self.service = service
        self.name = service.name
        self.host = host
        self.requested_port = port
        self.authenticator = authenticator
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.readiness = Readiness(cache_seconds=readiness_cache)
        self.app: FastAPI | None = None
        self.http: HttpServer | None = None
        self.started = False

    @property
    def port(self) -> int:
        if self.http is None or self.http.port is None:
            raise RuntimeError(f"{self.name} is not serving HTTP")
        return self.http.port

    @property
    def url(self) -> str:
        if self.http is None:
            raise RuntimeError(f"{self.name} is not serving HTTP")
        return self.http.url

    async def start(self) -> None:
        """Serve HTTP, start the service, then report ready.  On failure nothing is left running."""
        with structlog.contextvars.bound_contextvars(service=self.name):
            self.app = create_app(self.name, readiness=self.readiness, authenticator=self.authenticator,
                                  routers=self.service.routers(), version=roost_version())
            self.http = HttpServer(self.app, self.host, self.requested_port)
            await self.http.start()
            try:
                async with asyncio.timeout(self.start_timeout):
                    await self.service.start()
            except BaseException as exc:
                log.error("service failed to start", error=_describe(exc))
                await self._stop_after_failed_start()
                await self.http.stop()
                raise
            self.readiness.extend(self.service.health_checks())
            self.readiness.set_running()
            self.started = True
            log.info("service started", url=self.url)

    async def _stop_after_failed_start(self) -> None:
        """Give a half-started service its stop, so what it opened gets closed."""
        try:
            async with asyncio.timeout(self.stop_timeout + STOP_GRACE):
                await self.service.stop(time.monotonic() + self.stop_timeout)
        except Exception as exc:
            log.warning("stop after a failed start failed too", error=_describe(exc))

    def begin_stop(self) -> None:
        """Readiness false at once (load balancers stop sending work)."""
        self.readiness.set_stopping()

    async def stop(self, deadline: float | None = None) -> bool:
        """Stop gracefully by ``deadline`` (monotonic; default now + ``stop_timeout``).  True when clean."""
        if deadline is None:
            deadline = time.monotonic() + self.stop_timeout
        self.begin_stop()
        clean = True
        with structlog.contextvars.bound_contextvars(service=self.name):
            if self.started:
                started = time.monotonic()
                try:
                    async with asyncio.timeout(remaining(deadline) + STOP_GRACE):
                        await self.service.stop(deadline)
                except TimeoutError:
                    log.error("service did not stop in time; what it had not finished will be redelivered",
                              timeout=round(deadline - started, 3))
                    clean = False
                except Exception as exc:
                    log.error("service stop failed", error=_describe(exc), exc_info=exc)
                    clean = False
                else:
                    log.info("service stopped", seconds=round(time.monotonic() - started, 3))
                self.started = False
            if self.http is not None:
                await self.http.stop()
        return clean


OnStarted = Callable[[Sequence[ServiceRunner]], Awaitable[None] | None]


async def run_services(services: Sequence[Service], *, host: str = "127.0.0.1", base_port: int = 0,
                       ports: Mapping[str, int] | None = None, authenticator: Authenticator | None = None,
                       stop_timeout: float = 30.0, start_timeout: float | None = 120.0,
                       on_started: OnStarted | None = None, stop_event: asyncio.Event | None = None,
                       handle_signals: bool = True) -> int:
    """Run ``services`` until SIGTERM / SIGINT (or ``stop_event``), then stop them; return the exit code.

    Service ``i`` listens on ``ports[name]`` if given, else ``base_port + i`` (every one on a free port
    when ``base_port`` is 0).  ``on_started(runners)`` is called once all are up (print the URLs,
    show the bootstrap token).  A second signal while stopping gives up waiting (exit code 1).
    """
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise ValueError(f"two services with the same name: {names}")
    metrics.set_build_info(roost_version())
    stop = stop_event if stop_event is not None else asyncio.Event()
    force = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum.name)
        if stop.is_set():
            log.warning("second signal: not waiting any longer", signal=signum.name)
            force.set()
        else:
            log.info("stopping", signal=signum.name)
            stop.set()

    installed: list[signal.Signals] = []
    if handle_signals and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)

    runners: list[ServiceRunner] = []
    try:
        for index, service in enumerate(services):
            port = (ports or {}).get(service.name, base_port + index if base_port else 0)
            runner = ServiceRunner(service, host=host, port=port, authenticator=authenticator,
                                   stop_timeout=stop_timeout, start_timeout=start_timeout)
            start = asyncio.create_task(runner.start())
            interrupted = asyncio.create_task(stop.wait())
            await asyncio.wait({start, interrupted}, return_when=asyncio.FIRST_COMPLETED)
            interrupted.cancel()
            if not start.done():          # a signal while starting: abandon the start, stop what runs
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
                return await _stop_all(runners, stop_timeout, force, 1)
            if start.exception() is not None:
                log.error("cannot start; stopping the services already started", failed=service.name)
                await _stop_all(runners, stop_timeout, force, 1)
                return 1
            runners.append(runner)
        if on_started is not None:
            outcome = on_started(runners)
            if inspect.isawaitable(outcome):
                await outcome
        await stop.wait()
        return await _stop_all(runners, stop_timeout, force, 0)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


async def _stop_all(runners: Sequence[ServiceRunner], stop_timeout: float, force: asyncio.Event,
                    code: int) -> int:
    for runner in runners:          # nobody is ready any more before anything stops
        runner.begin_stop()
    deadline = time.monotonic() + stop_timeout

    async def stop_in_reverse() -> bool:
        clean = True
        for runner in reversed(runners):
            clean = await runner.stop(deadline) and clean
        return clean

    stopping = asyncio.create_task(stop_in_reverse())
    forced = asyncio.create_task(force.wait())
    await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if not stopping.done():
        stopping.cancel()
        await asyncio.gather(stopping, return_exceptions=True)
        log.error("stop forced; work in flight will be redelivered")
        return 1
    clean = stopping.result()
    if clean and code == 0:
        log.info("all services stopped cleanly")
        return 0
    return 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
