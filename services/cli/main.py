"""The `roost` command: runs the system (`roost up`) and speaks to it over the bus and HTTP."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx

from schemas.envelope import CommandReply
from services.cli.client import BusClient, CliError, Runtime, resolve_bus_url, resolve_token
from services.core.loop import EventLoopUnavailable, run_on_roost_loop

T = TypeVar("T")


def default_data_dir() -> Path:
    from services.core.settings import RoostSettings

    return Path(RoostSettings().data_dir)


def run(coro: Awaitable[T]) -> T:
    """Run a CLI coroutine on roost's event loop (uvloop: ``services.core.loop``); a ``CliError`` becomes one line on
    stderr and its exit status."""
    try:
        return run_on_roost_loop(_wrap(coro))
    except EventLoopUnavailable as exc:
        click.echo(f"roost: {exc}", err=True)
        sys.exit(2)
    except CliError as exc:
        click.echo(f"roost: {exc}", err=True)
        sys.exit(exc.code)
    except KeyboardInterrupt:
        sys.exit(130)


async def _wrap(coro: Awaitable[T]) -> T:
    return await coro


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def show_reply(reply: CommandReply, render: Callable[[dict[str, Any]], str] | None = None,
               as_json: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(reply.model_dump(mode="json"), indent=2))
    elif reply.ok:
        click.echo(render(reply.result) if render else json.dumps(reply.result, indent=2))
    if not reply.ok:        # outside run(): one line on stderr, not a traceback
        click.echo(f"roost: {reply.command_type} {reply.status}: {reply.reason}", err=True)
        sys.exit(1)


class Context:
    def __init__(self, data_dir: Path | None, bus_url: str | None, token: str | None) -> None:
        self._data_dir = data_dir
        self._bus_url = bus_url
        self._token = token

    @property
    def data_dir(self) -> Path:
        return self._data_dir or default_data_dir()

    def client(self) -> BusClient:
        return BusClient(resolve_bus_url(self._bus_url, self.data_dir), resolve_token(self._token, self.data_dir))

    async def command(self, type: str, data: dict[str, Any], timeout: float = 15.0) -> CommandReply:
        async with self.client() as client:
            return await client.command(type, data, timeout=timeout)


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option("--data-dir", type=click.Path(path_type=Path), envvar="ROOST_DATA_DIR",
              help="Where roost keeps its data (default: the user's data dir).")
@click.option("--bus-url", envvar="ROOST_BUS_URL", help="nats://… or amqp://… (default: what `roost up` runs).")
@click.option("--token", envvar="ROOST_TOKEN", help="API token (default: the local operator token).")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, bus_url: str | None, token: str | None) -> None:
    """roost: the management layer of a distributed edge cloud."""
    from services.core.logging import configure_logging

    configure_logging("console", "WARNING")      # `roost up` reconfigures from its settings
    ctx.obj = Context(data_dir, bus_url, token)


@cli.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="ROOST_CONFIG",
              help="A config file (YAML or TOML) with ROOST_* settings.")
@click.option("--demo", is_flag=True, help="Also run a simulated site: 2 controllers and 4 workers (real agents, "
              "heartbeats on loopback, Redfish BMCs), 2 subclouds, a webhook receiver (see the README).")
@click.pass_obj
def up(obj: Context, config: Path | None, demo: bool) -> None:
    """Run roost: every service, on embedded NATS and PostgreSQL unless ROOST_BUS_URL / ROOST_DATABASE_URL say
    otherwise.  Ctrl-C stops it cleanly."""
    from services.cli.up import run_up

    run(run_up(obj._data_dir, config, demo))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """What runs, and whether it is healthy (exit status 1 when not)."""
    run(_status(obj, as_json))


async def _status(obj: Context, as_json: bool) -> None:
    runtime = Runtime.load(obj.data_dir)
    if runtime is None or not runtime.running:
        raise CliError(f"roost is not running (no live `roost up` recorded under {obj.data_dir})", code=1)
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=3.0) as http:
        for name, info in sorted(runtime.services.items()):
            url = info.get("http")
            state, detail = "unknown", ""
            try:
                response = await http.get(f"{url}/readyz")
                body = response.json()
                state = "ready" if response.status_code == 200 else "not ready"
                failing = [k for k, v in body.get("checks", {}).items() if not _passed(v)]
                detail = ", ".join(failing)
            except (httpx.HTTPError, ValueError) as exc:
                state, detail = "unreachable", type(exc).__name__
            rows.append({"service": name, "state": state, "http": url, "failing": detail})
    healthy = bool(rows) and all(r["state"] == "ready" for r in rows)
    if as_json:
        click.echo(json.dumps({"healthy": healthy, "pid": runtime.pid, "bus_url": _masked(runtime.bus_url),
                               "started_at": runtime.started_at, "services": rows}, indent=2))
    else:
        click.echo(f"roost pid {runtime.pid}, up since {runtime.started_at}, bus {_masked(runtime.bus_url)}")
        click.echo(table(rows, ["service", "state", "http", "failing"]))
        click.echo("healthy" if healthy else "NOT healthy")
    if not healthy:
        sys.exit(1)


def _passed(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value.get("ok", value.get("healthy", False)))
    return bool(value)


def _masked(url: str | None) -> str:
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return "-"
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@cli.command()
@click.pass_obj
def ping(obj: Context) -> None:
    """Ask the core service for a pong over the bus."""
    reply = run(obj.command("roost.cmd.system.ping", {}))
    show_reply(reply, lambda r: f"pong from {r.get('service')} {r.get('version')} at {r.get('time')}")


@cli.group()
def dlq() -> None:
    """Dead letters: what no consumer could handle, with the reason."""


def _selection(ids: tuple[str, ...], group: str | None, all_: bool) -> dict[str, Any]:
    chosen = sum([bool(ids), group is not None, all_])
    if chosen != 1:
        raise click.UsageError("choose exactly one of: IDs, --group GROUP, --all")
    return {"ids": list(ids), "group": group, "all": all_}


@dlq.command("list")
@click.option("--group", help="Only what this consumer group dead-lettered.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def dlq_list(obj: Context, group: str | None, limit: int, as_json: bool) -> None:
    """List dead letters waiting for an operator."""
    reply = run(obj.command("roost.cmd.dlq.list", {"group": group, "limit": limit}))
    show_reply(reply, lambda r: table(r.get("items", []),
                                      ["id", "group", "type", "attempts", "dead_lettered_at", "reason"]), as_json)


@dlq.command("show")
@click.argument("id")
@click.pass_obj
def dlq_show(obj: Context, id: str) -> None:
    """One dead letter in full: reason, headers, the message."""
    show_reply(run(obj.command("roost.cmd.dlq.show", {"id": id})))


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--group")
@click.option("--all", "all_", is_flag=True)
@click.pass_obj
def dlq_replay(obj: Context, ids: tuple[str, ...], group: str | None, all_: bool) -> None:
    """Publish dead letters again on their original subjects."""
    reply = run(obj.command("roost.cmd.dlq.replay", _selection(ids, group, all_)))
    show_reply(reply, lambda r: f"replayed {r.get('replayed', 0)}")


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--group")
@click.option("--all", "all_", is_flag=True)
@click.pass_obj
def dlq_purge(obj: Context, ids: tuple[str, ...], group: str | None, all_: bool) -> None:
    """Delete dead letters for good."""
    reply = run(obj.command("roost.cmd.dlq.purge", _selection(ids, group, all_)))
    show_reply(reply, lambda r: f"purged {r.get('purged', 0)}")


@cli.group()
def token() -> None:
    """API tokens for operators and tools (admin only)."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["reader", "admin"]), default="reader", show_default=True)
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True), help="Default: never.")
@click.pass_obj
def token_create(obj: Context, name: str, role: str, expires_in_days: float | None) -> None:
    """Create a token for NAME; it is printed this once."""
    reply = run(obj.command("roost.cmd.token.create",
                            {"name": name, "role": role, "expires_in_days": expires_in_days}))
    show_reply(reply, lambda r: f"{r['token']}\n(the token for {r['name']}, role {r['role']}: "
                                "it is shown this once and stored nowhere in clear)")


@token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@click.pass_obj
def token_list(obj: Context, include_revoked: bool) -> None:
    """List tokens: names, roles, dates (never the tokens)."""
    reply = run(obj.command("roost.cmd.token.list", {"include_revoked": include_revoked}))
    show_reply(reply, lambda r: table(r.get("items", []), ["name", "role", "kind", "created_at", "last_used_at",
                                                           "expires_at", "revoked_at"]))


@token.command("revoke")
@click.argument("name")
@click.pass_obj
def token_revoke(obj: Context, name: str) -> None:
    """Revoke NAME's active token."""
    reply = run(obj.command("roost.cmd.token.revoke", {"name": name}))
    show_reply(reply, lambda r: "revoked" if r.get("revoked") else f"{name} had no active token")


def main() -> None:
    import services.cli.alarms  # noqa: F401 - registers `roost alarm` and `roost event`
    from services.cli import agent as _agent  # noqa: F401 - registers `roost agent`
    from services.cli import demo as _demo  # noqa: F401 - registers `roost demo`
    from services.cli import heartbeat as _heartbeat  # noqa: F401 - registers `roost heartbeat` and `roost keys`
    from services.cli import hosts as _hosts  # noqa: F401 - registers `roost host`
    from services.cli import serve as _serve  # noqa: F401 - registers `roost serve`
    from services.cli import strategy as _strategy  # noqa: F401 - registers `roost strategy`
    from services.cli import subcloud as _subcloud  # noqa: F401 - registers `roost subcloud`
    from services.cli import webhook_listen as _listen  # noqa: F401 - registers `roost webhook listen`

    cli(prog_name="roost")
