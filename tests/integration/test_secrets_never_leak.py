"""Planted secrets (the admin token, the services' tokens, a database password) appear nowhere in clear:
not in the logs at DEBUG, not in API output, not in a dead letter, not in a dump of the database."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from schemas.envelope import Envelope, ReplyStatus
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from tests.integration.test_roost_up import Up, clean_env, data_dir, roost
from tests.support.postgres import ADMIN_URL, fresh_database
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.rabbitmq]
__all__ = ["data_dir"]            # the fixture, shared with the roost up tests

DB_PASSWORD = "Pl4nted-Db-Passw0rd"
BUS_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def planted_database() -> AsyncIterator[str]:
    role = f"planted_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{DB_PASSWORD}'")
    try:
        async with fresh_database() as url:
            parts = urlsplit(url)
            yield parts._replace(netloc=f"{role}:{DB_PASSWORD}@{parts.hostname}:{parts.port}").geturl()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_planted_secrets_appear_nowhere(data_dir: Path, planted_database: str) -> None:
    up = Up(data_dir, clean_env(ROOST_BUS_URL=BUS_URL, ROOST_DATABASE_URL=planted_database,
                                ROOST_LOG_LEVEL="DEBUG"))
    try:
        announced = up.wait_ready()
        admin_token = next(line.strip() for line in announced.splitlines() if line.strip().startswith("roost_"))
        service_token = (data_dir / "secrets" / "service-core-token").read_text().strip()
        secrets = {"admin token": admin_token, "service token": service_token, "db password": DB_PASSWORD}

        outputs: list[str] = []
        runtime = json.loads((data_dir / "run" / "roost.json").read_text())
        base = runtime["services"]["core"]["http"]
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
                response = await http.get(path, headers={"Authorization": f"Bearer {admin_token}"})
                outputs.append(response.text)
            outputs.append((await http.get("/readyz", headers={"Authorization": "Bearer roost_bogus"})).text)

        client = Bus(transport_from_url(BUS_URL), source="roost/test", token=admin_token)
        await client.connect()
        try:
            invalid = Envelope.command("roost.cmd.dlq.list", {"limit": 0}, source="roost/test")
            reply = await client.request(invalid, timeout=10)
            assert reply.status is ReplyStatus.REJECTED
            outputs.append(reply.model_dump_json())
        finally:
            await client.close()

        def listed() -> bool:
            result = roost(data_dir, "dlq", "list", "--json")
            outputs.append(result.stdout + result.stderr)
            return '"roost.cmd.dlq.list"' in result.stdout
        await wait_until(listed, timeout=30, what="the invalid command in the dead letters")
        letter_id = json.loads(outputs[-1])["result"]["items"][0]["id"]
        shown = roost(data_dir, "dlq", "show", letter_id)
        assert shown.returncode == 0, shown.stderr
        outputs.append(shown.stdout + shown.stderr)
        outputs += [roost(data_dir, "status", "--json").stdout, roost(data_dir, "ping").stdout]
        assert up.interrupt() == 0
    finally:
        if up.process.poll() is None:
            up.process.kill()

    dump = subprocess.run(["pg_dump", "--data-only", planted_database.replace(DB_PASSWORD + "@", "@")],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "api_tokens" in dump.stdout and "dead_letters" in dump.stdout, "the dump covers the tables"
    logs = up.stderr.read_text()
    assert "api token created" in logs, "DEBUG logs were captured"
    places = {"logs": logs, "stdout after the token": announced.split(admin_token)[-1],
              "API and CLI output": "\n".join(outputs), "database dump": dump.stdout}
    for where, text in places.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} appears in the {where}"
