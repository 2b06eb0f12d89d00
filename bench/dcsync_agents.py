"""The simulated subcloud agents of ``bench/dcsync_bench.py``: one process serving many subclouds.

    .venv/bin/python bench/dcsync_agents.py < config.json      # started by dcsync_bench.py, not by hand

Every subcloud is a real ``SubcloudSync`` served by a real ``ServedSubcloud`` (its own durable consumer
``dcagent-<name>`` on ``roost.cmd.sync.<name>.>`` and its own heartbeat), on the tables of its schema
``scNNNN`` of one shared database (``Place.simulated``).  What the simulated agents share: this process
(one asyncio loop, one core at most), ONE asyncpg pool on the subclouds' database and ONE NATS connection.

The bench talks to this process with one JSON object per line: the configuration first (``nats_url``,
``db_url``, ``names``, ``heartbeat_interval``, ``pool_size``, ``start_concurrency``, optionally
``pull_idle_heartbeat``), answered by
``{"ready": ...}``; then commands (``op``), each answered by one line.  Every ``SubcloudSync.apply`` of
streamed changes is timed here, on the machine's monotonic clock (the same clock as the bench's): for each
change, the subcloud, its seq and when its transaction had committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas import dcsync as msg  # noqa: E402
from services.core.bus.bus import Bus  # noqa: E402
from services.core.bus.factory import transport_from_url  # noqa: E402
from services.core.db.pool import create_pool  # noqa: E402
from services.core.logging import configure_logging  # noqa: E402
from services.dcsync.agent import EndpointDb, ServedSubcloud, SubcloudSync, keep_session  # noqa: E402
from services.dcsync.tracking_sql import Place, ident  # noqa: E402
from services.inventory.agent.agent import BrokerPolicyAuthenticator  # noqa: E402


class Agents:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.served: dict[str, ServedSubcloud] = {}
        self.records: list[tuple[str, int, float]] = []     # (subcloud, seq, monotonic time committed)
        self.applies = 0
        self.lockless = 0
        self.pools: list[Any] = []
        self.bus: Bus | None = None

    def lockless_configure(self, sync: SubcloudSync) -> None:
        """``configure`` without ``Tracker.install`` when the schema's bookkeeping already tracks exactly the
        tables asked for (what install would find, retracking nothing).  Install takes an advisory lock that
        is one per database: here the 1,000 subclouds share one database, and their configures queued on it
        (about 10 joins a minute), where each real subcloud has a database and a lock of its own."""
        original = sync.configure
        db = sync.databases["identity"]
        bk = ident(db.place.bookkeeping)

        async def configure(data: msg.SyncConfigure) -> msg.SyncConfigured:
            rows = await db.pool.fetch(f"SELECT tbl, pk, columns, lane, capture FROM {bk}.synced_table")
            have = {r["tbl"]: (list(r["pk"]), list(r["columns"]), r["lane"], r["capture"]) for r in rows}
            want = {t.name: (list(t.pk), list(t.columns), t.lane, False) for t in data.tables}
            if have == want:
                self.lockless += 1
                return msg.SyncConfigured(retracked=[])
            return await original(data)

        sync.configure = configure  # type: ignore[method-assign]

    def instrument(self, sync: SubcloudSync) -> None:
        original = sync.apply
        name = sync.name
        records = self.records

        async def apply(data: msg.SyncApply, key: str) -> msg.SyncApplied:
            result = await original(data, key)
            at = time.monotonic()
            self.applies += 1
            if not data.repair and not result.duplicate:
                for change in data.changes:
                    records.append((name, change.seq, at))
            return result

        sync.apply = apply  # type: ignore[method-assign]

    async def start(self) -> dict[str, Any]:
        c = self.config
        started = time.monotonic()
        size = int(c["pool_size"])
        if c.get("affinity", True):
            self.pools = list(await asyncio.gather(*(
                create_pool(c["db_url"], min_size=1, max_size=1, connect_timeout=30, statement_cache_size=4096,
                            reset=keep_session, application_name="roost-bench-dcagents") for _ in range(size))))
        else:
            self.pools = [await create_pool(c["db_url"], min_size=1, max_size=size, connect_timeout=30,
                                            reset=keep_session, application_name="roost-bench-dcagents")]
        self.bus = Bus(transport_from_url(c["nats_url"]), source="roost/dcagent/bench",
                       authenticator=BrokerPolicyAuthenticator())
        await self.bus.connect()
        limit = asyncio.Semaphore(int(c.get("start_concurrency", 8)))

        async def one(i: int, name: str) -> None:
            async with limit:
                pool = self.pools[i % len(self.pools)]
                sync = SubcloudSync(name, {"identity": EndpointDb(pool, Place.simulated(name))})
                self.instrument(sync)
                if c.get("lockless_configure", True):
                    self.lockless_configure(sync)
                assert self.bus is not None
                served = ServedSubcloud(sync, self.bus, heartbeat_interval=float(c["heartbeat_interval"]),
                                        **({"pull_idle_heartbeat": float(c["pull_idle_heartbeat"])}
                                           if c.get("pull_idle_heartbeat") else {}))
                await served.start()
                self.served[name] = served

        await asyncio.gather(*(one(i, n) for i, n in enumerate(c["names"])))
        return {"ready": True, "subclouds": len(self.served), "seconds": time.monotonic() - started}

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "records":            # the apply records so far (and forget them when asked)
            out = [list(r) for r in self.records if r[2] >= float(cmd.get("since", 0.0))]
            if cmd.get("clear"):
                self.records.clear()
            return {"records": out, "applies": self.applies, "lockless_configures": self.lockless}
        if op == "beating":            # a subcloud's heartbeat stopped or (at once) started again
            served = self.served[cmd["name"]]
            served.beating = bool(cmd["on"])
            at = time.monotonic()
            if served.beating:
                await served.beat()
            return {"at": at}
        if op == "expire":             # new database sessions from now on (after the bench ended them)
            for pool in self.pools:
                await pool.expire_connections()
            return {"ok": True}
        if op == "cpu":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            return {"cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}
        if op == "quit":
            return {"ok": True}
        return {"error": f"unknown op {op}"}

    async def stop(self) -> None:
        for served in self.served.values():
            with contextlib.suppress(Exception):
                await served.stop()
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.bus.close(), 60)
        for pool in self.pools:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), 10)


async def main() -> None:
    configure_logging("console", os.environ.get("ROOST_BENCH_AGENT_LOG", "WARNING"))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    line = await reader.readline()
    agents = Agents(json.loads(line))
    try:
        try:
            say(await agents.start())
        except Exception as exc:
            say({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
            return
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            try:
                say(await agents.command(cmd))
            except Exception as exc:
                say({"error": f"{type(exc).__name__}: {exc}"})
            if cmd.get("op") == "quit":
                break
    finally:
        await agents.stop()


if __name__ == "__main__":
    asyncio.run(main())
