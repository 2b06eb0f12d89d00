"""Resolving `roost` command lines against the real click group, as the deploy tests check what containers run."""

from __future__ import annotations

import importlib

import click


def roost_cli() -> click.Group:
    """The `roost` group with every command registered (the modules ``services.cli.main.main`` imports)."""
    from services.cli.main import cli

    for module in ("alarms", "agent", "heartbeat", "hosts", "serve", "strategy", "subcloud"):
        importlib.import_module(f"services.cli.{module}")
    return cli


def resolve_command(args: list[str]) -> tuple[click.Command, click.Context]:
    """The `roost` command ``args`` names, parsed as click would: an unknown command fails an assertion, an
    unknown option or a missing argument raises click's ``UsageError``.  Nothing is run."""
    command: click.Command = roost_cli()
    rest = list(args)
    path = ["roost"]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"`{' '.join(path)}` has no command {rest[0]!r} (from {args})"
        path.append(rest.pop(0))
        command = sub
    assert not isinstance(command, click.Group), f"{args} names the group `{' '.join(path)}`, not a command"
    ctx = command.make_context(" ".join(path), rest)
    return command, ctx


def service_order() -> list[str]:
    """The services `roost up` runs, in its order (their default HTTP ports follow it)."""
    from services.cli.serve import service_names

    return service_names()
