"""The HTTP side of every roost service: health, readiness, metrics, authentication, the server.

``create_app(name, readiness=…, authenticator=…, routers=[…])`` builds a FastAPI app with

* ``GET /healthz``: liveness.  200 while the process runs and its event loop answers;
* ``GET /readyz``: readiness.  200 when the service has started, is not stopping, and every registered
  check passes; otherwise 503 with the failing checks.  Checks are async (or plain) callables with a
  timeout, run concurrently; their result is cached for ``cache_seconds`` (1 s) so a burst of probes
  costs one evaluation, and a lost broker or database shows within cache + timeout (≤ 3 s by
  default), well inside the 10 s the runtime promises;
* ``GET /metrics``: the Prometheus exposition of the process (text or OpenMetrics, as asked);
* the service's own routers, with OpenAPI at ``/openapi.json`` and ``/docs``.

REST routes declare who may call them with ``require_role``::

    @router.post("/v1/hosts/{name}/lock")
    async def lock(name: str, who: Annotated[Principal, Depends(require_role(Role.ADMIN))]) -> …

A missing or unknown token gets 401 (with ``WWW-Authenticate: Bearer``), a reader on an admin route
403, and 503 when the token store cannot be reached.  Error bodies never echo what the client sent
(a rejected body may hold a secret): validation errors list where and what, not the input.

``HttpServer(app, host, port)`` runs uvicorn inside the current event loop: ``port=0`` picks a free
port and ``start()`` returns the real one; ``stop()`` stops accepting, lets requests in flight finish
(bounded) and returns.  It never installs signal handlers: the service runner owns the signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Annotated, Any, Protocol

import structlog
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from schemas.envelope import Principal, Role
from services.core import metrics as _roost_metrics  # noqa: F401  (importing it registers roost's metrics)
from services.core.auth import Authenticator, AuthUnavailable
from services.core.logging import redact_text

log = structlog.get_logger("roost.http")

CheckResultValue = bool | None
CheckFn = Callable[[], Awaitable[CheckResultValue] | CheckResultValue]


# -- readiness ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One readiness condition: ``fn()`` returns (or awaits) ``True``/``None`` when fine; ``False`` or
    an exception or taking longer than ``timeout`` seconds means not ready."""

    name: str
    fn: CheckFn
    timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    ready: bool
    state: str                                    # starting | running | stopping
    checks: tuple[CheckResult, ...] = ()
    evaluated_at: float = field(default_factory=time.monotonic)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not ready",
            "state": self.state,
            "checks": {c.name: {"ok": c.ok, **({"detail": c.detail} if c.detail else {}),
                                "seconds": round(c.seconds, 4)} for c in self.checks},
        }


class Readiness:
    """The readiness of one service: its lifecycle state and its checks."""

    def __init__(self, checks: Sequence[HealthCheck] = (), *, cache_seconds: float = 1.0) -> None:
        if cache_seconds > 2.0:
            raise ValueError("readiness must not be cached for more than 2 seconds")
        self._checks: list[HealthCheck] = list(checks)
        self.cache_seconds = cache_seconds
        self._state = "starting"
        self._cached: ReadinessReport | None = None
        self._running: asyncio.Task[ReadinessReport] | None = None

    @property
    def state(self) -> str:
        return self._state

    def add(self, name: str, fn: CheckFn, *, timeout: float = 2.0) -> None:
        self._checks.append(HealthCheck(name, fn, timeout))
        self._cached = None

    def extend(self, checks: Sequence[HealthCheck]) -> None:
        self._checks.extend(checks)
        self._cached = None

    def set_running(self) -> None:
        self._state = "running"
        self._cached = None

    def set_stopping(self) -> None:
        """Not ready from now on, whatever the checks say (the runner calls it first on SIGTERM)."""
        self._state = "stopping"
        self._cached = None

    async def evaluate(self) -> ReadinessReport:
        """The current report: cached for ``cache_seconds``; concurrent callers share one evaluation."""
        if self._state != "running":
            return ReadinessReport(ready=False, state=self._state)
        cached = self._cached
        if cached is not None and time.monotonic() - cached.evaluated_at < self.cache_seconds:
            return cached
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._evaluate())
        report = await asyncio.shield(self._running)
        if self._state != "running":          # stopped while the checks ran
            return ReadinessReport(ready=False, state=self._state, checks=report.checks)
        return report

    async def _evaluate(self) -> ReadinessReport:
        results = await asyncio.gather(*(_run_check(c) for c in self._checks))
        report = ReadinessReport(ready=all(r.ok for r in results), state=self._state, checks=tuple(results))
        self._cached = report
        return report


async def _run_check(check: HealthCheck) -> CheckResult:
    started = time.monotonic()
    try:
        async with asyncio.timeout(check.timeout):
            outcome = check.fn()
            if inspect.isawaitable(outcome):
                outcome = await outcome
    except TimeoutError:
        return CheckResult(check.name, False, f"no answer within {check.timeout:g}s", time.monotonic() - started)
    except Exception as exc:
        return CheckResult(check.name, False, redact_text(f"{type(exc).__name__}: {exc}")[:300],
                           time.monotonic() - started)
    ok = outcome is None or outcome is True
    return CheckResult(check.name, ok, None if ok else "check failed", time.monotonic() - started)


class _Connected(Protocol):
    @property
    def connected(self) -> bool: ...


class _Pingable(Protocol):
    async def fetchval(self, query: str, *args: object, timeout: float | None = ...) -> Any: ...


def broker_check(transport: _Connected, *, name: str = "broker") -> HealthCheck:
    """Ready while the transport says its broker connection is up (no I/O: the flag is kept by the
    transport's own connection handling)."""
    return HealthCheck(name, lambda: transport.connected, timeout=1.0)


def database_check(pool: _Pingable, *, name: str = "database", timeout: float = 2.0) -> HealthCheck:
    """Ready while ``SELECT 1`` on the pool answers within ``timeout`` seconds."""

    async def ping() -> bool:
        return bool(await pool.fetchval("SELECT 1", timeout=timeout) == 1)

    return HealthCheck(name, ping, timeout=timeout)


# -- authentication -----------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, scheme_name="roostToken",
                     description="an API token (`roost token create`): `Authorization: Bearer roost_…`")
_x_auth_token = APIKeyHeader(name="X-Auth-Token", auto_error=False, scheme_name="xAuthToken",
                             description="the same API token in the header StarlingX clients send")


@cache
def require_role(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the caller's ``Principal`` when its token's role allows ``role``.

    The token comes as ``Authorization: Bearer …`` or in ``X-Auth-Token`` (what StarlingX clients send).
    """

    async def authenticated(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        x_auth_token: Annotated[str | None, Depends(_x_auth_token)],
    ) -> Principal:
        authenticator: Authenticator | None = getattr(request.app.state, "authenticator", None)
        if authenticator is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "authentication is not configured")
        token = credentials.credentials if credentials is not None else x_auth_token
        if not token:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a token is required (bearer or X-Auth-Token)",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            principal = await authenticator.authenticate(token)
        except AuthUnavailable:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "cannot check tokens right now") from None
        if principal is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if not principal.role.allows(role):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"{principal.name} ({principal.role.value}) may not do this: needs {role.value}")
        structlog.contextvars.bind_contextvars(principal=principal.name)
        return principal

    return authenticated


AdminPrincipal = Annotated[Principal, Depends(require_role(Role.ADMIN))]
ReaderPrincipal = Annotated[Principal, Depends(require_role(Role.READER))]


# -- the app ------------------------------------------------------------------------------------

def create_app(name: str, *, readiness: Readiness | None = None, authenticator: Authenticator | None = None,
               routers: Sequence[APIRouter] = (), version: str = "0.1.0",
               description: str | None = None) -> FastAPI:
    """The FastAPI app of service ``name`` with health, readiness, metrics and its own routers."""
    app = FastAPI(title=f"roost {name}", version=version, description=description or f"roost {name} service API")
    app.state.service_name = name
    app.state.readiness = readiness if readiness is not None else Readiness()
    app.state.authenticator = authenticator

    @app.get("/healthz", tags=["health"], summary="Liveness: the process runs")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": name}

    @app.get("/readyz", tags=["health"], summary="Readiness: started, not stopping, every check passes",
             responses={503: {"description": "not ready; the failing checks are listed"}})
    async def readyz(request: Request) -> JSONResponse:
        report = await request.app.state.readiness.evaluate()
        body = {"service": name, **report.as_json()}
        return JSONResponse(body, status_code=200 if report.ready else 503)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of the process", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(REGISTRY), media_type=content_type)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(AuthUnavailable)
    async def auth_unavailable(request: Request, exc: AuthUnavailable) -> JSONResponse:
        return JSONResponse({"detail": "cannot check tokens right now"}, status_code=503)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the server logs the exception (redacted) after this response went out
        return JSONResponse({"detail": "internal error (see the service's log)"}, status_code=500)

    for router in routers:
        app.include_router(router)
    return app


# -- the server ---------------------------------------------------------------------------------

class _Server(uvicorn.Server):
    """uvicorn's server, told when it is listening and kept away from the process's signals."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.listening.set()


class HttpServer:
    """uvicorn serving ``app`` as a task of the running event loop."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False,
                 graceful_timeout: int = 5) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.access_log = access_log
        self.graceful_timeout = graceful_timeout
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server has not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> int:
        """Bind, start serving, and return the port it listens on.  Raises ``OSError`` if the port is taken."""
        sock = _bind(self.host, self.requested_port)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=self.access_log, lifespan="off",
                                timeout_graceful_shutdown=self.graceful_timeout, server_header=False)
        server = _Server(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http:{self.port}")
        listening = asyncio.create_task(server.listening.wait())
        try:
            await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:           # cancelled while starting: leave nothing behind
            await self._abandon()
            raise
        finally:
            listening.cancel()
        if not server.listening.is_set():
            exc = self._task.exception() if self._task.done() and not self._task.cancelled() else None
            await self._abandon()
            raise RuntimeError(f"the HTTP server on {self.host}:{self.port} did not start") from exc
        log.debug("http server listening", url=self.url)
        return self.port

    async def _abandon(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = None

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (at most ``graceful_timeout`` s), return."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        finally:
            if self._socket is not None:
                self._socket.close()
            self._server = self._task = None


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
