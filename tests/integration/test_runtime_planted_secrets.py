"""Plant known secrets (an API token, a password inside broker and database URLs, an HMAC key),
use them the way roost does and the way a careless developer might, then look for them in the logs,
in every HTTP answer and in a dump of the database: they appear nowhere in clear."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import structlog
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from schemas.envelope import Envelope, Principal, ReplyStatus, Role
from schemas.registry import Registry
from services.core import auth
from services.core.bus.bus import Bus, Message
from services.core.bus.memory import InMemoryBroker, InMemoryTransport
from services.core.http import AdminPrincipal, HealthCheck
from services.core.logging import configure_logging, reset_logging
from services.core.runner import ServiceRunner
from services.core.secrets import SecretStore
from services.core.settings import load_settings
from tests.support.postgres import fresh_database, pool_on

pytestmark = pytest.mark.postgres

PASSWORD = "Planted-Pw-7c1e9a55"
HMAC_KEY = bytes.fromhex("6b2d1f00c0ffee" * 9 + "aa")


class Webhook(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    secret: str


class Fence(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str


COMMANDS = Registry()
COMMANDS.command("roost.cmd.planted.fence", "core", Fence, "admin only", min_role=Role.ADMIN)


class Careless:
    """A service that handles secrets the way code does, mistakes included."""

    name = "careless"

    def __init__(self, settings_url: str, failing_dsn: str) -> None:
        self.settings_url = settings_url
        self.failing_dsn = failing_dsn
        self.log = structlog.get_logger("careless")

    async def start(self) -> None:
        self.log.info("connecting", url=self.settings_url)

    async def stop(self, deadline: float) -> None:
        pass

    def health_checks(self) -> Sequence[HealthCheck]:
        async def database() -> bool:
            raise ConnectionError(f"could not connect to {self.failing_dsn}")
        return [HealthCheck("database", database)]

    def routers(self) -> Sequence[APIRouter]:
        router = APIRouter(prefix="/v1")

        @router.post("/webhooks")
        async def add(body: Webhook, who: AdminPrincipal) -> dict[str, str]:
            self.log.info("webhook added", by=who.name, body=body.model_dump())
            return {"url": body.url}

        @router.get("/whoami")
        async def whoami(who: AdminPrincipal) -> Principal:
            return who

        return [router]


def forms(token: str) -> list[str]:
    return [token, token.removeprefix("roost_"), PASSWORD, HMAC_KEY.hex(), base64.b64encode(HMAC_KEY).decode()]


async def test_planted_secrets_appear_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = io.StringIO()
    configure_logging("json", "DEBUG", stream=logs)
    outputs: list[str] = []
    try:
        async with fresh_database() as pg_url, pool_on(pg_url) as pool:
            # settings carrying the password in both URLs and as a per-service credential
            db_with_password = pg_url.replace("postgres@", f"postgres:{PASSWORD}@")
            monkeypatch.setenv("ROOST_BUS_URL", f"amqp://roost:{PASSWORD}@127.0.0.1:5672/")
            monkeypatch.setenv("ROOST_DATABASE_URL", db_with_password)
            monkeypatch.setenv("ROOST_SERVICES__CARELESS__BROKER_PASSWORD", PASSWORD)
            monkeypatch.setenv("ROOST_DATA_DIR", str(tmp_path))
            settings = load_settings()
            log = structlog.get_logger("planted")
            log.info("settings", settings=settings.describe(), raw=repr(settings))
            log.info("careless broker url", url=settings.broker_connect_url("careless"))

            # a key in the secret store, then logged by mistake
            store = SecretStore.in_data_dir(settings.data_dir)
            store.put("hmac-master", HMAC_KEY)
            key = store.get("hmac-master")
            log.info("key loaded", key=key, hex=key.get_secret_value().hex(),
                     note=f"b64 {base64.b64encode(key.get_secret_value()).decode()}")

            # an API token in PostgreSQL, used over REST and on the bus
            token = await auth.create_token(pool, "operator", Role.ADMIN)
            authenticator = auth.PgAuthenticator(pool)
            log.info("about to call", headers={"Authorization": f"Bearer {token}"})
            logging.getLogger("httpx").warning("request with Authorization: Bearer %s", token)

            runner = ServiceRunner(Careless(settings.broker_connect_url("careless") or "", db_with_password),
                                   authenticator=authenticator)
            await runner.start()
            try:
                async with httpx.AsyncClient(base_url=runner.url,
                                             headers={"Authorization": f"Bearer {token}"}) as http:
                    for response in (
                        await http.get("/readyz"),
                        await http.get("/healthz"),
                        await http.get("/metrics"),
                        await http.get("/openapi.json"),
                        await http.get("/v1/whoami"),
                        await http.post("/v1/webhooks", json={"url": "http://hook", "secret": PASSWORD}),
                        await http.post("/v1/webhooks", json={"url": 5, "secret": PASSWORD, "x": token}),
                        await http.post("/v1/webhooks", json={"url": "u"}, headers={"Authorization": "Bearer x"}),
                    ):
                        outputs.append(f"{response.status_code} {dict(response.headers)} {response.text}")
                    assert "503" in outputs[0] and "ConnectionError" in outputs[0]
                    assert outputs[4].startswith("200") and "operator" in outputs[4]
            finally:
                await runner.stop()

            broker = InMemoryBroker()
            server = Bus(InMemoryTransport(broker), source="roost/planted", registry=COMMANDS,
                         authenticator=authenticator)
            client = Bus(InMemoryTransport(broker), source="roost/cli", registry=COMMANDS, token=token)
            await server.connect()
            await client.connect()
            attempts = 0

            async def fence(message: Message) -> dict[str, str]:
                nonlocal attempts
                attempts += 1
                if attempts == 1:
                    raise RuntimeError(f"BMC login failed: https://admin:{PASSWORD}@bmc/redfish token={token}")
                return {"fenced": "yes"}

            try:
                await server.serve("roost.cmd.planted.>", "planted", fence)
                reply = await client.request(Envelope.command("roost.cmd.planted.fence", Fence(host="c-0"),
                                                              source="roost/cli"), timeout=30)
                assert reply.status is ReplyStatus.COMPLETED, reply.reason
                outputs.append(reply.model_dump_json())
            finally:
                await client.close()
                await server.close()

            # a dump of the whole database
            dump = await asyncio.to_thread(
                subprocess.run, ["pg_dump", "--data-only", pg_url], capture_output=True, text=True, check=True,
                env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
            outputs.append(dump.stdout)
            assert "api_tokens" in dump.stdout
    finally:
        reset_logging()

    text = logs.getvalue()
    assert "careless broker url" in text and "webhook added" in text and "handler failed" in text
    for secret in forms(token):
        assert secret not in text, f"a planted secret is in the logs: {secret[:6]}…"
        for output in outputs:
            assert secret not in output, f"a planted secret is in an API answer or the dump: {secret[:6]}…"
