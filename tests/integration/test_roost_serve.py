"""`roost serve` as a container runs it: one service in its own process, on an external NATS (from the wheel)
and the machine's PostgreSQL, no embedded server.  It answers /readyz and `roost ping`, takes the operator's
first admin token from ROOST_BOOTSTRAP_ADMIN_TOKEN, and stops cleanly on SIGTERM, revoking its own service
token.  Without the URLs, or with an unknown service, it says so in one line and exits 2."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.core.auth import hash_token
from services.core.embedded.nats_server import NatsServer
from tests.support.nats import nats_server  # noqa: F401 - fixture
from tests.support.postgres import fresh_database

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]

ROOST = [sys.executable, "-m", "services.cli"]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({"ROOST_DATA_DIR": str(tmp_path / "data"), "ROOST_LOG_FORMAT": "json", **extra})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text()[-chars:]


async def wait_ready(process: asyncio.subprocess.Process, http: httpx.AsyncClient, stderr: Path,
                     timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise AssertionError(f"roost serve exited {process.returncode}:\n{tail(stderr)}")
        try:
            if (await http.get("/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"roost serve not ready in {timeout}s:\n{tail(stderr)}")


async def test_serve_core_answers_readyz_and_ping_and_stops_on_sigterm(
        tmp_path: Path, nats_server: NatsServer) -> None:  # noqa: F811
    admin = "roost_" + secrets.token_urlsafe(32)
    port = free_port()
    async with fresh_database() as database_url:
        env = clean_env(tmp_path, ROOST_BUS_URL=nats_server.url, ROOST_DATABASE_URL=database_url,
                        ROOST_HTTP_HOST="127.0.0.1", ROOST_HTTP_PORT=str(port), ROOST_INSTANCE="core-test-1",
                        ROOST_BOOTSTRAP_ADMIN_TOKEN=admin)
        stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with stdout.open("w") as out, stderr.open("w") as err:
            process = await asyncio.create_subprocess_exec(*ROOST, "serve", "core", env=env, stdout=out, stderr=err)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                await wait_ready(process, http, stderr)
                assert (await http.get("/readyz")).json()["service"] == "core"
                assert (await http.get("/healthz")).status_code == 200
                assert "roost_build_info" in (await http.get("/metrics")).text

            ping = await asyncio.create_subprocess_exec(
                *ROOST, "--bus-url", nats_server.url, "--token", admin, "ping", env=clean_env(tmp_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            ping_out, ping_err = await asyncio.wait_for(ping.communicate(), 60)
            assert ping.returncode == 0, ping_err.decode()
            assert ping_out.decode().startswith("pong from core"), ping_out.decode()

            conn = await asyncpg.connect(database_url)
            try:
                rows = await conn.fetch("SELECT name, kind, revoked_at, token_hash FROM core.api_tokens ORDER BY id")
                by_name = {r["name"]: r for r in rows}
                assert by_name["admin"]["token_hash"] == hash_token(admin)      # the operator's, not a new one
                assert by_name["service:core@core-test-1"]["kind"] == "service"
                assert by_name["service:core@core-test-1"]["revoked_at"] is None

                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 60) == 0, tail(stderr)
                revoked = await conn.fetchval("SELECT revoked_at FROM core.api_tokens WHERE name = $1",
                                              "service:core@core-test-1")
                assert revoked is not None
            finally:
                await conn.close()
            assert admin not in tail(stdout, 10**9) + tail(stderr, 10**9)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def test_serve_without_urls_or_with_an_unknown_service_says_so(tmp_path: Path) -> None:
    bare = subprocess.run([*ROOST, "serve", "core"], env=clean_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert bare.returncode == 2
    assert "ROOST_BUS_URL and ROOST_DATABASE_URL" in bare.stderr
    assert "Traceback" not in bare.stderr

    unknown = subprocess.run([*ROOST, "serve", "nosuch"], capture_output=True, text=True, timeout=60,
                             env=clean_env(tmp_path, ROOST_BUS_URL="nats://127.0.0.1:1",
                                           ROOST_DATABASE_URL="postgresql://127.0.0.1:1/x"))
    assert unknown.returncode == 2
    assert "no service named nosuch" in unknown.stderr
    assert "core, alarms, inventory, heartbeat, orchestrator" in unknown.stderr


async def test_two_replicas_of_core_start_together_on_one_database(
        tmp_path: Path, nats_server: NatsServer) -> None:  # noqa: F811
    """Replicas starting at once: the migrations run once, one first admin token is made between them and shown
    once, each replica has its own service token, and either answers `roost ping`."""
    ports = [free_port(), free_port()]
    async with fresh_database() as database_url:
        processes, outputs = [], []
        try:
            for index, port in enumerate(ports):
                env = clean_env(tmp_path, ROOST_BUS_URL=nats_server.url, ROOST_DATABASE_URL=database_url,
                                ROOST_HTTP_HOST="127.0.0.1", ROOST_HTTP_PORT=str(port),
                                ROOST_INSTANCE=f"core-{index}", ROOST_DATA_DIR=str(tmp_path / f"data-{index}"))
                out, err = tmp_path / f"stdout-{index}.txt", tmp_path / f"stderr-{index}.txt"
                outputs.append((out, err))
                with out.open("w") as o, err.open("w") as e:
                    processes.append(await asyncio.create_subprocess_exec(*ROOST, "serve", "core", env=env,
                                                                          stdout=o, stderr=e))
            for process, port, (_, err) in zip(processes, ports, outputs, strict=True):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                    await wait_ready(process, http, err)
            shown = [re.findall(r"roost_[A-Za-z0-9_-]{43}", tail(out, 10**9)) for out, _ in outputs]
            assert sorted(len(s) for s in shown) == [0, 1], shown
            admin = next(s[0] for s in shown if s)

            conn = await asyncpg.connect(database_url)
            try:
                rows = await conn.fetch("SELECT name, role, kind FROM core.api_tokens WHERE revoked_at IS NULL")
                assert sorted((r["name"], r["kind"]) for r in rows) == [
                    ("admin", "user"), ("service:core@core-0", "service"), ("service:core@core-1", "service")]
                assert await conn.fetchval("SELECT count(*) FROM core.api_tokens WHERE token_hash = $1",
                                           hash_token(admin)) == 1
            finally:
                await conn.close()

            ping = await asyncio.create_subprocess_exec(
                *ROOST, "--bus-url", nats_server.url, "--token", admin, "ping", env=clean_env(tmp_path),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            ping_out, ping_err = await asyncio.wait_for(ping.communicate(), 60)
            assert ping.returncode == 0 and ping_out.decode().startswith("pong from core"), ping_err.decode()

            for process in processes:
                process.send_signal(signal.SIGTERM)
            for process, (_, err) in zip(processes, outputs, strict=True):
                assert await asyncio.wait_for(process.wait(), 60) == 0, tail(err)
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()


def test_a_bootstrap_token_that_is_no_token_is_refused_before_connecting(tmp_path: Path) -> None:
    bad = subprocess.run([*ROOST, "serve", "core"], capture_output=True, text=True, timeout=60,
                         env=clean_env(tmp_path, ROOST_BUS_URL="nats://127.0.0.1:1",
                                       ROOST_DATABASE_URL="postgresql://127.0.0.1:1/x",
                                       ROOST_BOOTSTRAP_ADMIN_TOKEN="hunter2"))
    assert bad.returncode == 2
    assert "ROOST_BOOTSTRAP_ADMIN_TOKEN is not a roost token" in bad.stderr
    assert "hunter2" not in bad.stderr + bad.stdout


def free_port_run(count: int) -> int:
    """A base port with ``count`` free ports from it (the services take base, base + 1, ...)."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError(f"no {count} free consecutive ports")


async def test_every_service_starts_on_external_servers_at_roost_ups_ports(
        tmp_path: Path, nats_server: NatsServer) -> None:  # noqa: F811
    """What the compose file and the manifests run, each service in its own container, in one process here (two
    cores): every service of `roost up` starts on the external NATS and PostgreSQL with nothing else configured,
    at ROOST_HTTP_BASE_PORT + its place, and is ready."""
    from services.cli.serve import default_port, service_names

    names = service_names()
    base = free_port_run(len(names))
    async with fresh_database() as database_url:
        env = clean_env(tmp_path, ROOST_BUS_URL=nats_server.url, ROOST_DATABASE_URL=database_url,
                        ROOST_HTTP_HOST="127.0.0.1", ROOST_HTTP_BASE_PORT=str(base))
        stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with stdout.open("w") as out, stderr.open("w") as err:
            process = await asyncio.create_subprocess_exec(*ROOST, "serve", *names, env=env, stdout=out, stderr=err)
        try:
            for name in names:
                port = default_port(name, base, names)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
                    await wait_ready(process, http, stderr, timeout=120)
                    assert (await http.get("/readyz")).json()["service"] == name
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0, tail(stderr)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
