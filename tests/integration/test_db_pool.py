"""The pool on the real PostgreSQL: URLs (TCP, unix socket), bounded connect, clear errors, ping."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from services.core.db.pool import DatabaseUnavailable, create_pool, ping
from tests.support.postgres import fresh_database

pytestmark = pytest.mark.postgres

SOCKET_DIR = "/var/run/postgresql"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_pool_connects_and_pings(url: str) -> None:
    pool = await create_pool(url, min_size=1, max_size=2, application_name="roost-test")
    try:
        assert await ping(pool)
        assert await pool.fetchval("SELECT current_setting('application_name')") == "roost-test"
    finally:
        await pool.close()
    assert not await ping(pool)


async def test_unix_socket_url(url: str) -> None:
    assert await asyncio.to_thread(Path(SOCKET_DIR, ".s.PGSQL.5432").exists), "no PostgreSQL socket in /var/run"
    dbname = urlsplit(url).path.lstrip("/")
    pool = await create_pool(f"postgresql://postgres@/{dbname}?host={SOCKET_DIR}", min_size=1, max_size=1)
    try:
        assert await pool.fetchval("SELECT inet_server_addr() IS NULL")   # NULL: a unix-socket session
    finally:
        await pool.close()


async def test_sslmode_disable_is_understood(url: str) -> None:
    pool = await create_pool(f"{url}?sslmode=disable", min_size=1, max_size=1)
    try:
        assert await ping(pool)
    finally:
        await pool.close()


async def test_refused_port_is_one_clear_line_without_the_password() -> None:
    port = _free_port()
    with pytest.raises(DatabaseUnavailable) as caught:
        await create_pool(f"postgresql://roost:hunter2@127.0.0.1:{port}/roost", connect_timeout=3)
    text = str(caught.value)
    assert "hunter2" not in text and "\n" not in text
    assert text.startswith(f"database unavailable at postgresql://roost:***@127.0.0.1:{port}/roost: ")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


async def test_a_server_that_never_answers_is_bounded_by_the_connect_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)       # accept, then say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(DatabaseUnavailable, match="no answer"):
            await create_pool(f"postgresql://postgres:pw@127.0.0.1:{port}/x", connect_timeout=0.5)
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 5


async def test_unknown_database_names_it() -> None:
    with pytest.raises(DatabaseUnavailable, match="does not exist"):
        await create_pool("postgresql://postgres@127.0.0.1:5432/roost_no_such_db_x", connect_timeout=5)


async def test_wrong_scheme_is_refused_before_connecting() -> None:
    with pytest.raises(DatabaseUnavailable, match="bad database URL"):
        await create_pool("http://127.0.0.1:5432/x")


async def test_the_relay_process_reports_an_unreachable_database_in_one_line() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.core.db", "--database-url", f"postgresql://roost:hunter2@127.0.0.1:{port}/x",
        "relay", "--bus-url", "amqp://guest:guest@127.0.0.1:5672/",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: database unavailable at postgresql://roost:***@"), err
    assert b"hunter2" not in out + err and b"Traceback" not in err


async def test_tls_required_by_the_url_is_enforced(url: str) -> None:
    # The machine's PostgreSQL runs without TLS: a URL that requires it must not fall back to plain text.
    with pytest.raises(DatabaseUnavailable, match=r"(?i)ssl"):
        await create_pool(f"{url}?sslmode=require", connect_timeout=5)


async def test_an_ssl_context_is_used_when_given(url: str) -> None:
    with pytest.raises(DatabaseUnavailable, match=r"(?i)ssl"):
        await create_pool(url, ssl=ssl.create_default_context(), connect_timeout=5)
