"""The webhook dispatcher in a process of its own, supervised by the alarms service's process.

Why: the alarms service's process consumes, applies and relays every fault; sending webhooks in the same
process (one Python thread) made each delivery wait for the event loop behind batches of faults, and
each batch wait behind deliveries.  ``DispatcherProcess`` runs the same ``WebhookDispatcher`` (same
queue in PostgreSQL, same claims and leases: to the database it is one more replica) in a child process
(``python -m services.alarms.webhooks.worker``), so the two use two cores.

The parent (``DispatcherProcess``) passes the database URL and the ``DispatcherSettings`` in the child's
environment (never on its command line: the URL may hold a password), and reads JSON lines from the
child's stdout:

* ``{"ready": true}`` once the child's dispatcher runs;
* ``{"hook": "failing" | "recovered", "subscription": id, "reason": text}``: the parent calls its own
  ``on_subscription_failing`` / ``on_subscription_recovered`` (the alarms service raises or clears its
  "webhook subscriber failing" alarm on its bus);
* ``{"metrics": [[kind, *args], ...]}`` a few times a second: the child's metric observations
  (``metrics.forward_to``), applied to the parent's registry, which its ``/metrics`` serves.

Stopping: the parent closes the child's stdin; the child stops its dispatcher gracefully (requests in
flight get ``grace`` seconds, the rest are released) and exits.  A parent that dies closes that pipe
too, so a child never outlives it for long.  A child that exits on its own (a crash) is started again
after ``restart_delay``; meanwhile its leases expire and nothing is lost (the queue is in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from services.alarms.webhooks import metrics
from services.alarms.webhooks.dispatcher import DispatcherSettings, SubscriptionHook, WebhookDispatcher, describe
from services.core.db.pool import DatabaseUnavailable, create_pool
from services.core.logging import configure_logging
from services.core.loop import run_on_roost_loop

log = structlog.get_logger("roost.alarms.webhooks")

# (not ROOST_*: those are the settings' variables)
URL_ENV = "ROOSTWEBHOOKS_DATABASE_URL"
SETTINGS_ENV = "ROOSTWEBHOOKS_DISPATCHER_SETTINGS"
LOG_ENV = "ROOSTWEBHOOKS_LOG"
METRICS_EVERY = 0.25            # seconds between the child's metric reports
_ROOT = str(Path(__file__).resolve().parents[3])    # the directory holding the services package


def pool_url(pool: asyncpg.Pool) -> str | None:
    """The DSN a pool was created with (asyncpg keeps it), for a child to connect the same way."""
    args = getattr(pool, "_connect_args", ())
    return args[0] if args and isinstance(args[0], str) else None


class DispatcherProcess:
    """A ``WebhookDispatcher`` in a child process: ``await start()``, ``await stop()``."""

    def __init__(self, database_url: str, settings: DispatcherSettings | None = None, *,
                 on_subscription_failing: SubscriptionHook | None = None,
                 on_subscription_recovered: SubscriptionHook | None = None,
                 restart_delay: float = 1.0, start_timeout: float = 60.0, log_format: str = "json",
                 log_level: str = "INFO") -> None:
        self.database_url = database_url
        self.settings = (settings or DispatcherSettings()).check()
        self.on_subscription_failing = on_subscription_failing
        self.on_subscription_recovered = on_subscription_recovered
        self.restart_delay = restart_delay
        self.start_timeout = start_timeout
        self.log = f"{log_format} {log_level}"
        self.starts = 0                  # children started (more than one: it was restarted)
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._exited = asyncio.Event()           # a child exited (set once per exit)
        self._stopping = False
        self._hooks: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.returncode is None else None

    async def start(self) -> None:
        """Start the child and wait until its dispatcher runs (at most ``start_timeout``, and not after the
        child exited: should it not come up, this logs it and the supervisor keeps trying)."""
        if self._supervisor is None or self._supervisor.done():
            self._stopping = False
            self._exited.clear()
            self._supervisor = asyncio.create_task(self._supervise(), name="webhook-dispatcher-process")
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self._exited.wait())
        try:
            await asyncio.wait([ready, exited], timeout=self.start_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not self._ready.is_set():
            log.warning("webhook dispatcher process not ready yet; still trying", timeout=self.start_timeout)

    async def stop(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), self.settings.grace + 10.0)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._supervisor is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._supervisor, 5.0)
            self._supervisor = None
        if self._hooks:
            await asyncio.gather(*self._hooks, return_exceptions=True)

    async def _supervise(self) -> None:
        delay = self.restart_delay
        while not self._stopping:
            self._ready.clear()
            try:
                await self._run_child()
            except (OSError, ValueError) as exc:
                log.error("webhook dispatcher process could not run", error=describe(exc))
            if self._stopping:
                return
            # a child that never came up (the database down, say) is retried less and less often
            delay = self.restart_delay if self._ready.is_set() else min(30.0, delay * 2)
            log.warning("webhook dispatcher process exited; starting it again", delay=delay,
                        exit_code=self._process.returncode if self._process is not None else None)
            await asyncio.sleep(delay)

    async def _run_child(self) -> None:
        env = {**os.environ, URL_ENV: self.database_url, SETTINGS_ENV: json.dumps(dataclasses.asdict(self.settings)),
               LOG_ENV: self.log,
               "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
        self._process = process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.alarms.webhooks.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env, limit=16 * 1024 * 1024)
        self.starts += 1
        assert process.stdout is not None
        try:
            while line := await process.stdout.readline():
                self._handle(line)
        finally:
            if process.returncode is None and not self._stopping:
                process.kill()
            await process.wait()
            self._exited.set()

    def _handle(self, line: bytes) -> None:
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError:
            return
        if message.get("ready"):
            self._ready.set()
        for kind, *args in message.get("metrics", ()):
            metrics.apply(kind, args)
        hook = message.get("hook")
        if hook in ("failing", "recovered"):
            call = self.on_subscription_failing if hook == "failing" else self.on_subscription_recovered
            if call is not None:
                task = asyncio.create_task(self._call(call, str(message["subscription"]), str(message["reason"])))
                self._hooks.add(task)
                task.add_done_callback(self._hooks.discard)

    @staticmethod
    async def _call(hook: SubscriptionHook, subscription_id: str, reason: str) -> None:
        try:
            await hook(subscription_id, reason)
        except Exception as exc:
            log.error("webhook subscription hook failed", subscription=subscription_id, error=describe(exc))


# -- the child -------------------------------------------------------------------------------------


class _Parent:
    """The child's side of the pipe: JSON lines on stdout (blocking writes of a few hundred bytes)."""

    def __init__(self) -> None:
        self.observations: list[list[Any]] = []
        self.out = sys.stdout.buffer

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        self.out.flush()

    def observe(self, kind: str, args: tuple[Any, ...]) -> None:
        self.observations.append([kind, *args])

    def flush_metrics(self) -> None:
        if self.observations:
            batch, self.observations = self.observations, []
            self.send({"metrics": batch})

    def hook(self, kind: str) -> SubscriptionHook:
        async def call(subscription_id: str, reason: str) -> None:
            self.send({"hook": kind, "subscription": subscription_id, "reason": reason})
        return call


async def _child() -> None:
    url = os.environ.pop(URL_ENV)
    settings = DispatcherSettings(**json.loads(os.environ.pop(SETTINGS_ENV, "{}")))
    parent = _Parent()
    metrics.forward_to(parent.observe)
    pool = await create_pool(url, min_size=1, max_size=4, application_name="roost-webhooks")
    dispatcher = WebhookDispatcher(pool, settings, on_subscription_failing=parent.hook("failing"),
                                   on_subscription_recovered=parent.hook("recovered"))
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    gone = asyncio.create_task(_until_eof(stdin))
    dispatcher.start()
    parent.send({"ready": True})
    try:
        while not gone.done():
            await asyncio.wait([gone], timeout=METRICS_EVERY)
            parent.flush_metrics()
    finally:
        await dispatcher.stop()
        parent.flush_metrics()
        await pool.close()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(4096):
        pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent stops us (closing stdin), not a Ctrl-C
    log_format, _, level = os.environ.pop(LOG_ENV, "json INFO").partition(" ")
    configure_logging("console" if log_format == "console" else "auto" if log_format == "auto" else "json",
                      level or "INFO")
    try:
        with contextlib.suppress(BrokenPipeError):
            run_on_roost_loop(_child())
    except DatabaseUnavailable as exc:
        log.error("webhook dispatcher process: no database", error=str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
