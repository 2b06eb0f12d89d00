"""`roost webhook listen` as a real process, fed by the alarms' real webhook sender (the dispatcher on the
real PostgreSQL): a signed delivery is verified, answered 2xx (the delivery is marked delivered) and printed;
the same request again is printed as a retry; a forged one (signed with another secret) and an unsigned one
are answered 401 and printed as REJECTED; a secret file others can read is refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.alarms.webhooks import store
from services.alarms.webhooks.dispatcher import DispatcherSettings, WebhookDispatcher
from services.alarms.webhooks.formats import Format
from services.alarms.webhooks.signing import generate_secret, sign_headers
from services.core.db.migrations import migrate
from tests.integration.test_webhook_delivery import MIGRATIONS, notification
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres

ROOST = [sys.executable, "-m", "services.cli"]
FAST = DispatcherSettings(timeout=2.0, lease=3.0, min_backoff=0.05, max_backoff=0.2, poll_interval=0.2,
                          depth_interval=0.05, grace=1.0)


@pytest.fixture
async def pool() -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database() as url, pool_on(url, migrate_core=False) as pool:
        await migrate(pool, "alarms", MIGRATIONS)
        yield pool


class Listener:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.url = ""

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def secret_file(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    secret = generate_secret()
    path = tmp_path / "hook.secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    yield path, secret


def start_listener(tmp_path: Path, *args: str) -> Listener:
    log = tmp_path / "listen.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    with log.open("w") as out:
        proc = subprocess.Popen([*ROOST, "webhook", "listen", "--port", "0", *args], stdout=out,
                                stderr=subprocess.STDOUT, text=True, env=env)
    listener = Listener(proc, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        first = listener.output().split("\n", 1)[0]
        if first.startswith("listening on "):
            listener.url = first.split()[2]
            return listener
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"roost webhook listen did not start: {listener.output()}")


async def test_listen_verifies_a_real_delivery_and_rejects_forged_ones(
        pool: asyncpg.Pool, tmp_path: Path, secret_file: tuple[Path, str]) -> None:
    path, secret = secret_file
    listener = start_listener(tmp_path, "--secret-file", str(path))
    try:
        sub, _ = await store.create_subscription(pool, listener.url + "hook", secret=secret, name="listen")
        note = notification("950.002", "host=worker-1")
        async with pool.acquire() as conn, conn.transaction():
            assert await store.enqueue(conn, note) == 1
        async with WebhookDispatcher(pool, FAST) as dispatcher:
            await wait_until(lambda: dispatcher.stats.delivered == 1, 30, "the delivery accepted by the listener")
        delivered = await pool.fetchval("SELECT count(*) FROM alarms.webhook_deliveries WHERE state = 'delivered' "
                                        "AND subscription_id = $1::uuid", sub.id)
        assert delivered == 1
        await wait_until(lambda: f"verified id={note.id}" in listener.output(), 10, "the verified line")
        line = next(x for x in listener.output().splitlines() if f"id={note.id}" in x)
        assert "alarm.raised 950.002 critical host=worker-1 v1" in line, line

        body = b'{"type":"alarm.raised","data":{}}'
        ts = int(time.time())
        async with httpx.AsyncClient(timeout=5) as http:
            good = sign_headers([secret], "msg_again", ts, body)
            assert (await http.post(listener.url, content=body, headers=good)).status_code == 204
            assert (await http.post(listener.url, content=body, headers=good)).status_code == 204
            forged = sign_headers([generate_secret()], "msg_forged", ts, body)
            assert (await http.post(listener.url, content=body, headers=forged)).status_code == 401
            tampered = dict(good)
            assert (await http.post(listener.url, content=body + b" ", headers=tampered)).status_code == 401
            assert (await http.post(listener.url, content=body)).status_code == 401
            old = sign_headers([secret], "msg_old", ts - 3600, body)
            assert (await http.post(listener.url, content=body, headers=old)).status_code == 401
        await wait_until(lambda: listener.output().count("REJECTED") == 4, 10, "four rejections printed")
        out = listener.output()
        assert "verified id=msg_again (again)" in out
        assert "REJECTED (no signature matches) id=msg_forged" in out
        assert "REJECTED (missing header webhook-id)" in out
        assert "REJECTED (webhook-timestamp is too old) id=msg_old" in out
        assert secret not in out
    finally:
        listener.proc.terminate()
        listener.proc.wait(10)
    assert listener.proc.returncode == 0
    assert "stopped: 3 verified, 4 rejected" in listener.output()


async def test_listen_alertmanager_format_and_refusals(pool: asyncpg.Pool, tmp_path: Path,
                                                       secret_file: tuple[Path, str]) -> None:
    path, secret = secret_file
    path.chmod(0o644)
    refused = await asyncio.to_thread(subprocess.run, [*ROOST, "webhook", "listen", "--port", "0", "--secret-file",
                                                       str(path)], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "can be read by others" in refused.stderr
    assert secret not in refused.stderr
    path.chmod(0o600)
    none = await asyncio.to_thread(subprocess.run, [*ROOST, "webhook", "listen", "--port", "0"],
                                   capture_output=True, text=True, timeout=30,
                                   env={k: v for k, v in os.environ.items() if not k.startswith("ROOST_")})
    assert none.returncode == 2 and "no secret to verify with" in none.stderr

    listener = start_listener(tmp_path, "--secret-file", str(path))
    try:
        await store.create_subscription(pool, listener.url, secret=secret, format=Format.ALERTMANAGER)
        async with pool.acquire() as conn, conn.transaction():
            await store.enqueue(conn, notification("950.003", "host=worker-2.network=mgmt", severity="major"))
        async with WebhookDispatcher(pool, FAST) as dispatcher:
            await wait_until(lambda: dispatcher.stats.delivered == 1, 30, "the delivery accepted by the listener")
        await wait_until(lambda: "alertmanager firing 950.003 major host=worker-2.network=mgmt" in listener.output(),
                         10, "the Alertmanager delivery printed")
    finally:
        listener.proc.terminate()
        listener.proc.wait(10)
