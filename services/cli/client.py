"""How the `roost` command reaches a running system: the bus (commands with replies) and the
services' HTTP endpoints.  It never imports service internals.

Where things are: ``--bus-url``/``ROOST_BUS_URL`` and ``--token``/``ROOST_TOKEN`` when given, else what
``roost up`` recorded in ``<data-dir>/run/roost.json`` and the local operator token it kept in
``<data-dir>/secrets/`` (readable by its owner only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.envelope import CommandReply, Envelope
from services.core.brokerauth_apply import broker_password_secret
from services.core.bus.abc import BusError, NotConnected
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from services.core.secrets import SecretStore, SecretStoreError
from services.core.settings import url_with_credentials

RUNTIME_FILE = Path("run") / "roost.json"
OPERATOR_TOKEN_SECRET = "operator-token"


class CliError(Exception):
    """A problem to tell the operator in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Runtime:
    """What `roost up` recorded about the system it runs."""

    bus_url: str | None = None
    bus_user: str | None = None          # the broker user the `roost` command logs in as (embedded NATS)
    pid: int | None = None
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    started_at: str | None = None

    @classmethod
    def load(cls, data_dir: Path) -> Runtime | None:
        path = data_dir / RUNTIME_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {path}: {exc}") from exc
        return cls(bus_url=raw.get("bus_url"), bus_user=raw.get("bus_user"), pid=raw.get("pid"),
                   services=raw.get("services", {}), started_at=raw.get("started_at"))

    def save(self, data_dir: Path) -> None:
        path = data_dir / RUNTIME_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bus_url": self.bus_url, "bus_user": self.bus_user, "pid": self.pid,
                                   "services": self.services, "started_at": self.started_at}, indent=2))
        tmp.replace(path)

    @staticmethod
    def remove(data_dir: Path) -> None:
        (data_dir / RUNTIME_FILE).unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def resolve_bus_url(explicit: str | None, data_dir: Path) -> str:
    if explicit:
        return explicit
    runtime = Runtime.load(data_dir)
    if runtime is None or not runtime.bus_url:
        raise CliError(f"no bus URL: set ROOST_BUS_URL or --bus-url, or start roost with `roost up` "
                       f"(nothing is recorded in {data_dir / RUNTIME_FILE})", code=3)
    if not runtime.running:
        raise CliError(f"roost (pid {runtime.pid}) recorded in {data_dir / RUNTIME_FILE} is not running; "
                       "start it with `roost up`", code=3)
    if runtime.bus_user is None:
        return runtime.bus_url
    try:
        password = SecretStore.in_data_dir(data_dir).get_text(broker_password_secret(runtime.bus_user))
    except SecretStoreError as exc:
        raise CliError(f"cannot read the broker password of {runtime.bus_user}: {exc}", code=3) from None
    return url_with_credentials(runtime.bus_url, runtime.bus_user, password.get_secret_value())


def resolve_token(explicit: str | None, data_dir: Path) -> str | None:
    if explicit:
        return explicit
    path = data_dir / "secrets" / OPERATOR_TOKEN_SECRET
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise CliError(f"cannot read the operator token at {path}: {exc.strerror}") from exc


class BusClient:
    """A short-lived bus connection for one CLI invocation."""

    def __init__(self, bus_url: str, token: str | None) -> None:
        self._bus = Bus(transport_from_url(bus_url), source="roost/cli", token=token)
        self._url = bus_url

    async def __aenter__(self) -> BusClient:
        try:
            await self._bus.connect()
        except NotConnected as exc:
            raise CliError(f"cannot reach the bus: {exc}", code=3) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._bus.close()

    async def command(self, type: str, data: BaseModel | dict[str, Any], *, timeout: float = 15.0) -> CommandReply:
        command = Envelope.command(type, data, source="roost/cli", timeout=timeout)
        try:
            return await self._bus.request(command, timeout=timeout)
        except BusError as exc:
            raise CliError(f"{type}: {exc}", code=3) from None
