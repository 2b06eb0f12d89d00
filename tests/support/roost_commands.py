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


def _click_envvars(command: click.Command) -> set[str]:
    found = {p.envvar for p in command.params if isinstance(p.envvar, str)}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found |= _click_envvars(sub)
    return found


def check_environment(env: dict[str, str]) -> None:
    """Assert that every ``ROOST_*`` variable of ``env`` is one roost reads (a setting of RoostSettings, the
    orchestrator's or dcsync's, or a `roost` option's envvar) and that the settings load from it."""
    import os

    from services.core.settings import ConfigError, RoostSettings, load_settings
    from services.dcsync.settings import DcsyncSettings, load_dcsync_settings
    from services.orchestrator.settings import OrchestratorSettings, load_orchestrator_settings

    options = _click_envvars(roost_cli())
    prefixed = [("ROOST_ORCHESTRATOR_", OrchestratorSettings), ("ROOST_DCSYNC_", DcsyncSettings)]
    for key in env:
        if not key.startswith("ROOST_") or key in options:
            continue
        sub = next(((p, model) for p, model in prefixed if key.startswith(p)), None)
        if sub is not None:
            assert key[len(sub[0]):].lower() in sub[1].model_fields, f"{key}: no such setting"
        else:
            assert key[len("ROOST_"):].lower().split("__")[0] in RoostSettings.model_fields, f"{key}: no such setting"
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("ROOST_")]:
            del os.environ[key]
        os.environ.update(env)
        try:
            load_settings()
            load_orchestrator_settings()
            load_dcsync_settings()
        except ConfigError as exc:
            raise AssertionError(f"the settings do not load from {sorted(env)}: {exc}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
