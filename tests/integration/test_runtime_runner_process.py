"""The service runner as a real process: SIGTERM turns readiness false, lets the work in flight finish,
flushes, and the process exits 0; a stuck stop exits non-zero; a second signal forces the stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import asyncio, os, sys
    from pathlib import Path
    from services.core.http import HealthCheck
    from services.core.logging import configure_logging
    from services.core.runner import run_services

    RELEASE = Path(sys.argv[1])
    HANG = sys.argv[2] == "hang"

    def say(text):
        print(text, flush=True)

    class Worker:
        name = "worker"

        def __init__(self):
            self.stopping = asyncio.Event()
            self.job = None

        async def start(self):
            self.job = asyncio.create_task(self.work())

        async def work(self):
            say("job started")
            await self.stopping.wait()          # the job is in flight when the signal comes
            while not RELEASE.exists():          # and needs the test's go-ahead to finish
                await asyncio.sleep(0.02)
            say("job finished")

        async def stop(self, deadline):
            say("stop called")
            self.stopping.set()                  # stop consuming: no new jobs
            if HANG:
                await asyncio.Event().wait()
            await self.job                       # finish the work in flight
            say("outbox flushed")

        def health_checks(self):
            return [HealthCheck("always", lambda: True)]

        def routers(self):
            return []

    def started(runners):
        say(f"listening {runners[0].port}")

    configure_logging("json", "INFO", stream=sys.stderr)
    code = asyncio.run(run_services([Worker()], on_started=started, stop_timeout=float(sys.argv[3])))
    say(f"exit {code}")
    sys.exit(code)
''')


class Child:
    def __init__(self, proc: asyncio.subprocess.Process, release: Path) -> None:
        self.proc = proc
        self.release = release
        self.lines: list[str] = []

    async def expect(self, text: str, timeout: float = 30.0) -> str:
        """The first line of stdout starting with ``text`` (read so far, or read until it comes)."""
        assert self.proc.stdout is not None
        for line in self.lines:
            if line.startswith(text):
                return line
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    err = await self.proc.stderr.read() if self.proc.stderr else b""
                    raise AssertionError(f"child ended before {text!r}; stdout={self.lines} stderr={err.decode()}")
                line = raw.decode().strip()
                self.lines.append(line)
                if line.startswith(text):
                    return line

    async def wait(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            rest = await self.proc.stdout.read() if self.proc.stdout else b""
            self.lines += [line.strip() for line in rest.decode().splitlines()]
            return await self.proc.wait()


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    children: list[Child] = []

    async def start(mode: str = "ok", stop_timeout: float = 30.0) -> Child:
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        release = tmp_path / f"release-{len(children)}"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(release), mode, str(stop_timeout), cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        child = Child(proc, release)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.returncode is None:
            child.proc.kill()
            await child.proc.wait()


async def test_sigterm_finishes_work_in_flight_and_exits_0(spawn: Spawn) -> None:
    child = await spawn()
    port = int((await child.expect("listening")).split()[1])
    await child.expect("job started")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/readyz")).status_code == 200
        child.proc.send_signal(signal.SIGTERM)
        await child.expect("stop called")
        # stopping: not ready, while the work in flight is still running and the server still answers
        stopping = await http.get("/readyz")
        assert stopping.status_code == 503 and stopping.json()["state"] == "stopping"
        assert (await http.get("/healthz")).status_code == 200
    child.release.touch()
    assert await child.wait() == 0
    assert child.lines[-4:] == ["stop called", "job finished", "outbox flushed", "exit 0"]


async def test_a_stop_that_overruns_its_deadline_exits_non_zero(spawn: Spawn) -> None:
    child = await spawn("hang", stop_timeout=0.5)
    await child.expect("listening")
    await child.expect("job started")
    child.proc.send_signal(signal.SIGTERM)
    await child.expect("stop called")
    assert await child.wait() == 1


async def test_a_second_signal_forces_the_stop(spawn: Spawn) -> None:
    child = await spawn("hang", stop_timeout=600)
    await child.expect("listening")
    await child.expect("job started")
    child.proc.send_signal(signal.SIGINT)
    await child.expect("stop called")
    child.proc.send_signal(signal.SIGINT)
    assert await child.wait() == 1
