"""The embedded PostgreSQL of ``roost up``: a real server from the binaries bundled in the pgserver wheel.

Runs as root too (the server then runs as the ``roost-pg`` system user).  Needs no PostgreSQL of the
machine.  Every wait below waits for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from services.core.embedded.postgres import EmbeddedPostgres, EmbeddedPostgresError

pytestmark = pytest.mark.slow  # each test starts real servers: 1-3 s apiece


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _process_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("Uid:")).split()[1])


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: as root the server's user must traverse every ancestor, and a pytest
    # session starting meanwhile resets /tmp/pytest-of-<user> to 0700.
    path = Path(tempfile.mkdtemp(prefix="roost-pgtest-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def data_dir(base_dir: Path) -> AsyncIterator[Path]:
    path = base_dir / "pg"
    yield path
    await EmbeddedPostgres(path).stop()  # whatever the test left running


async def _write(url: str, value: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS notes (value text NOT NULL)")
        await conn.execute("INSERT INTO notes VALUES ($1)", value)
    finally:
        await conn.close()


async def _read(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [row["value"] for row in await conn.fetch("SELECT value FROM notes ORDER BY value")]
    finally:
        await conn.close()


async def test_data_survives_a_restart(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    url = await pg.start()
    assert url.startswith("postgresql://postgres@/roost?host=")
    assert pg.pid is not None and not pg.reused
    pid = pg.pid
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT current_database()") == "roost"
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW listen_addresses") == ""
    finally:
        await conn.close()
    if os.geteuid() == 0:
        assert _process_uid(pid) != 0, "PostgreSQL must not run as root"
    await _write(url, "kept")

    await pg.stop()
    assert not _alive(pid)
    assert pg.url is None
    assert not (data_dir / "pgdata" / "postmaster.pid").exists()
    await pg.stop()  # stopping a stopped server is a no-op

    again = EmbeddedPostgres(data_dir)
    assert await again.start() == url
    assert not again.reused and again.pid != pid
    assert await _read(url) == ["kept"]
    assert "database system is ready to accept connections" in (data_dir / "postgresql.log").read_text()


async def test_a_second_start_reuses_the_running_server(data_dir: Path) -> None:
    first = EmbeddedPostgres(data_dir)
    url = await first.start()
    second = EmbeddedPostgres(data_dir)
    assert await second.start() == url
    assert second.reused and second.pid == first.pid
    assert await first.start() == url  # the same instance again
    # and several at once, each waiting for the data directory's lock in turn
    others = [EmbeddedPostgres(data_dir) for _ in range(3)]
    assert await asyncio.gather(*(o.start() for o in others)) == [url] * 3
    assert {o.pid for o in others} == {first.pid}
    await _write(url, "one server")
    assert await _read(url) == ["one server"]

    await second.stop()  # stops the data directory's server, whoever started it
    assert first.pid is not None and not _alive(first.pid)


async def test_start_recovers_after_the_postmaster_was_killed(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    url = await pg.start()
    await _write(url, "committed before the crash")
    held = await asyncpg.connect(url)  # a backend that outlives its postmaster for a moment
    assert pg.pid is not None
    killed = pg.pid
    os.kill(killed, signal.SIGKILL)
    assert (data_dir / "pgdata" / "postmaster.pid").exists()  # stale from now on

    # start straight away: start() itself must wait for the killed server's leftovers
    after = EmbeddedPostgres(data_dir)
    assert await after.start() == url
    assert not after.reused and after.pid != killed
    assert not _alive(killed)
    assert await _read(url) == ["committed before the crash"]
    with contextlib.suppress(Exception):
        await held.close(timeout=1)
    assert "database system was interrupted" in (data_dir / "postgresql.log").read_text()


async def test_a_stale_pid_file_naming_an_unrelated_live_process_is_ignored(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir)
    url = await pg.start()
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    lines = pidfile.read_text().splitlines()
    await _write(url, "before")
    await pg.stop()

    # Typical after a container restart: the old postmaster's pid now belongs to another process of
    # the server's user, and PostgreSQL alone refuses to start ("Is another postmaster running?").
    owner = (data_dir / "pgdata").stat()
    root = os.geteuid() == 0
    other = subprocess.Popen(  # noqa: ASYNC220 (starts, does not wait; uvloop takes no user / group)
        ["sleep", "60"],
        cwd="/",
        user=owner.st_uid if root else None,
        group=owner.st_gid if root else None,
        extra_groups=[] if root else None,
    )
    try:
        pidfile.write_text("\n".join([str(other.pid), *lines[1:]]) + "\n")
        again = EmbeddedPostgres(data_dir)
        assert await again.start() == url
        assert again.pid not in (None, other.pid) and not again.reused
        assert await _read(url) == ["before"]
        assert other.poll() is None  # left alone
    finally:
        other.kill()
        other.wait()


async def test_a_server_that_cannot_start_is_one_clear_line(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir, start_timeout=20)
    await pg.start()
    await pg.stop()
    with (data_dir / "pgdata" / "postgresql.conf").open("a") as conf:
        conf.write("this is not a setting\n")

    with pytest.raises(EmbeddedPostgresError) as caught:
        await EmbeddedPostgres(data_dir, start_timeout=20).start()
    message = str(caught.value)
    assert "\n" not in message
    assert "did not start" in message
    assert "postgresql.conf" in message and "contains errors" in message
    assert str(data_dir / "postgresql.log") in message


async def test_an_unusable_data_dir_is_one_clear_line(base_dir: Path) -> None:
    blocker = base_dir / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(EmbeddedPostgresError) as caught:
        await EmbeddedPostgres(blocker / "pg").start()
    assert "\n" not in str(caught.value) and str(blocker) in str(caught.value)

    with pytest.raises(EmbeddedPostgresError, match="cannot use"):
        await EmbeddedPostgres(base_dir / "it's").start()


async def test_a_long_data_dir_puts_the_socket_in_a_short_private_directory(base_dir: Path) -> None:
    deep = base_dir.joinpath(*["a-rather-long-directory-name"] * 4, "pg")
    assert len(str(deep / ".s.PGSQL.5432")) > 107
    pg = EmbeddedPostgres(deep)
    try:
        url = await pg.start()
        host = url.split("host=", 1)[1].split("&", 1)[0]
        assert host.startswith("/tmp/roost-pg-") and len(host) < 40
        assert stat.S_IMODE(os.stat(host).st_mode) == 0o700
        await _write(url, "via a short socket path")
        assert await _read(url) == ["via a short socket path"]
    finally:
        await pg.stop()
    assert not await asyncio.to_thread(os.path.exists, host)  # the socket's directory goes with the server
