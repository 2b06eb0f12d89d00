"""PostgreSQL's cost of one synced change, at both ends, next to the same write without dcsync.

    .venv/bin/python bench/dcsync_apply.py            # ~1 minute
    .venv/bin/python bench/dcsync_apply.py --calls 5000

On a fresh database with the keystone-shaped test schema (``tests.support.dcsync_site``: project, user,
local_user, password, revocation_event), ``--rows`` users:

* **controller**: a single-row ``UPDATE`` of a user, with the capture trigger (row state, digest, change
  log, NOTIFY), next to the same ``UPDATE`` of a copy of the table that has no trigger;
* **subcloud**: ``receive`` of one change (a user's new row: inbox, version guard, upsert, row state,
  digest, cursor) in one statement, as the agent sends it, next to the bare upsert of the same row
  (``INSERT .. ON CONFLICT DO UPDATE``) in a table without trigger.

Each call is its own transaction on one connection, one after the other.  Printed per call: the wall time
and the CPU time of the PostgreSQL backend that ran it (``/proc/<pid>/stat`` of ``pg_backend_pid()``; the
server must be on this machine), and the ratios to the baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_model, load_average, proc_cpu  # noqa: E402
from services.dcsync.tables import resolve  # noqa: E402
from services.dcsync.tracking import Tracker  # noqa: E402
from tests.support.dcsync_site import MINI_SCHEMA, mini_spec  # noqa: E402
from tests.support.postgres import fresh_database  # noqa: E402


async def timed(conn: asyncpg.Connection, calls: int, one: object) -> tuple[float, float]:
    """(wall µs, backend CPU µs) per call of ``one(conn, i)``."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    for i in range(min(200, calls)):                                  # warm: plans, caches
        await one(conn, -1 - i)                                       # type: ignore[operator]
    cpu0, t0 = proc_cpu(pid), time.perf_counter()
    for i in range(calls):
        await one(conn, i)                                            # type: ignore[operator]
    wall, cpu = time.perf_counter() - t0, proc_cpu(pid) - cpu0
    return wall / calls * 1e6, cpu / calls * 1e6


async def prepare(conn: asyncpg.Connection, rows: int, *, capture: bool) -> Tracker:
    """The schema, ``rows`` users in ``user`` and in its untracked copy ``user_plain``, then dcsync's
    bookkeeping (capturing: the controller; a subcloud's otherwise)."""
    tracker = Tracker()
    await conn.execute(MINI_SCHEMA)
    await conn.execute('CREATE TABLE user_plain (LIKE "user" INCLUDING ALL)')
    await conn.execute('INSERT INTO "user" (id, enabled, extra) SELECT $1 || i, true, \'{}\' '
                       'FROM generate_series(1, $2) i', "u", rows)
    await conn.execute("INSERT INTO user_plain SELECT * FROM \"user\"")
    await tracker.install(conn, resolve(mini_spec(), await tracker.reflect(conn)), capture=capture)
    await conn.execute("ANALYZE")
    return tracker


async def controller(url: str, rows: int, calls: int) -> dict[str, tuple[float, float]]:
    conn = await asyncpg.connect(url)
    try:
        await prepare(conn, rows, capture=True)

        async def tracked(c: asyncpg.Connection, i: int) -> None:
            await c.execute('UPDATE "user" SET extra = $1 WHERE id = $2', json.dumps({"n": i}), f"u{i % rows + 1}")

        async def plain(c: asyncpg.Connection, i: int) -> None:
            await c.execute("UPDATE user_plain SET extra = $1 WHERE id = $2", json.dumps({"n": i}),
                            f"u{i % rows + 1}")

        return {"plain": await timed(conn, calls, plain), "dcsync": await timed(conn, calls, tracked)}
    finally:
        await conn.close()


async def subcloud(url: str, rows: int, calls: int) -> dict[str, tuple[float, float]]:
    conn = await asyncpg.connect(url)
    try:
        tracker = await prepare(conn, rows, capture=False)
        seq = 0

        async def received(c: asyncpg.Connection, i: int) -> None:
            nonlocal seq
            seq += 1
            row = {"id": f"u{i % rows + 1}", "enabled": True, "extra": json.dumps({"n": i})}
            change = {"seq": seq, "tbl": "user", "op": "U", "pk": {"id": row["id"]}, "row": row, "version": seq}
            await tracker.receive(c, f"identity:main:{seq - 1}-{seq}", "identity", "main", [change], upto=seq)

        async def plain(c: asyncpg.Connection, i: int) -> None:
            await c.execute("INSERT INTO user_plain AS t (id, enabled, extra) VALUES ($1, true, $2) "
                            "ON CONFLICT (id) DO UPDATE SET enabled = EXCLUDED.enabled, extra = EXCLUDED.extra",
                            f"u{i % rows + 1}", json.dumps({"n": i}))

        return {"plain": await timed(conn, calls, plain), "dcsync": await timed(conn, calls, received)}
    finally:
        await conn.close()


async def main(a: argparse.Namespace) -> None:
    print(f"dcsync apply micro-benchmark: {a.calls} calls, {a.rows} users; CPU {cpu_model()}, "
          f"load average {load_average()}")
    for side, run in (("controller: UPDATE of a user", controller), ("subcloud: receive of one change", subcloud)):
        async with fresh_database("roost_bench_apply") as url:
            got = await run(url, a.rows, a.calls)
            plain, ours = got["plain"], got["dcsync"]
            print(f"  {side}")
            print(f"    without dcsync : {plain[0]:7.0f} µs wall, {plain[1]:7.0f} µs PostgreSQL CPU per call")
            print(f"    with dcsync    : {ours[0]:7.0f} µs wall, {ours[1]:7.0f} µs PostgreSQL CPU per call "
                  f"({ours[1] / max(plain[1], 1e-9):.1f}x the CPU)")
    print(f"load average at the end: {load_average()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rows", type=int, default=1000)
    asyncio.run(main(p.parse_args()))
