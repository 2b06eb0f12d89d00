"""Database tools as a process: ``python -m services.core.db <command>``.

* ``relay``: run an outbox relay on its own (one per schema; several replicas may run side by side).
  Stops gracefully on SIGTERM / SIGINT: publishes what is pending within ``--flush-timeout``.
  Prints ``outbox relay ready`` once it relays, and ``outbox relay stopped: published N`` at the end.
* ``migrate``: apply a schema's migrations and exit.

URLs come from the options or ``ROOST_DATABASE_URL`` / ``ROOST_BUS_URL``.  An unreachable database or
broker is one line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from services.core.bus.abc import BusError
from services.core.bus.factory import UnsupportedBusUrl, transport_from_url
from services.core.db.migrations import MigrationError, migrate
from services.core.db.pool import DatabaseUnavailable, create_pool
from services.core.db.relay import OutboxRelay
from services.core.loop import run_on_roost_loop


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.core.db")
    parser.add_argument("--database-url", default=os.environ.get("ROOST_DATABASE_URL"))
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("relay", help="publish a schema's outbox")
    relay.add_argument("--bus-url", default=os.environ.get("ROOST_BUS_URL"))
    relay.add_argument("--schema", default="core")
    relay.add_argument("--batch-size", type=int, default=200)
    relay.add_argument("--poll-interval", type=float, default=1.0)
    relay.add_argument("--flush-timeout", type=float, default=10.0)
    mig = commands.add_parser("migrate", help="apply a schema's migrations")
    mig.add_argument("--schema", default="core")
    mig.add_argument("--directory", type=Path, default=None)
    return parser


async def _relay(args: argparse.Namespace) -> int:
    if not args.bus_url:
        print("no bus URL: pass --bus-url or set ROOST_BUS_URL", file=sys.stderr)
        return 2
    pool = await create_pool(args.database_url, min_size=1, max_size=3, application_name=f"roost-relay-{args.schema}")
    try:
        transport = transport_from_url(args.bus_url)
        await transport.connect()
        try:
            relay = OutboxRelay(pool, transport, args.schema, batch_size=args.batch_size,
                                poll_interval=args.poll_interval)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            task = asyncio.create_task(relay.run())
            await relay.started.wait()
            print("outbox relay ready", flush=True)
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            await relay.stop(flush=True, timeout=args.flush_timeout)
            stopping.cancel()
            await task
            print(f"outbox relay stopped: published {relay.stats.published}", flush=True)
        finally:
            await transport.close()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), 10)
    return 0


async def _migrate(args: argparse.Namespace) -> int:
    pool = await create_pool(args.database_url, min_size=1, max_size=1)
    try:
        applied = await migrate(pool, args.schema, args.directory)
        print(f"{args.schema}: applied {len(applied)} migration(s)", flush=True)
    finally:
        await pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.database_url:
        print("no database URL: pass --database-url or set ROOST_DATABASE_URL", file=sys.stderr)
        return 2
    try:
        return run_on_roost_loop(_relay(args) if args.command == "relay" else _migrate(args))
    except (DatabaseUnavailable, BusError, UnsupportedBusUrl, MigrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
