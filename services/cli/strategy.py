"""`roost strategy create|show|apply|abort|delete`: the update strategy (one at a time), served by the orchestrator.

``show`` prints the strategy, then its apply (and abort) phase stage by stage with each step's result;
``--details`` adds every step's hosts, timeout and reason; ``--active`` shows only the steps under way or
that did not succeed (as ``sw-manager ... show --active``).  ``apply --watch`` and ``abort --watch`` poll
the strategy and print each step as it changes until the strategy is in a final state (exit status 0 when
applied or aborted cleanly as asked, 1 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from schemas.envelope import CommandReply
from services.cli.client import CliError
from services.cli.main import Context, cli, run, show_reply, table

FINAL = ("build-failed", "applied", "apply-failed", "aborted", "abort-failed")


@cli.group()
def strategy() -> None:
    """The update strategy: build one, show it, apply it, abort it, delete it."""


def _steps(stage: dict[str, Any], details: bool, active: bool = False) -> list[dict[str, Any]]:
    rows = []
    for step in stage.get("steps", []):
        if active and step["result"] in ("initial", "success"):
            continue
        row = {"step": step["step_id"], "name": step["name"], "result": step["result"],
               "hosts": ", ".join(step.get("entity_names", []))}
        if details:
            row["timeout"] = f"{step['timeout']:g} s"
            row["reason"] = step.get("reason", "")
        rows.append(row)
    return rows


def render(s: dict[str, Any], details: bool = False, active: bool = False) -> str:
    release = s["release"]
    options = s["options"]
    lines = [f"strategy {s['uuid']}: {s['state']}" + (f" ({s['reason']})" if s.get("reason") else "")
             + (f", stage by stage (pauses before stage {s['stop_at_stage']})" if s.get("stop_at_stage") is not None
                else ""),
             f"release {release['name']} {release['version']}" + (" (reboot)" if release["reboot_required"] else ""),
             f"controllers {options['controller_apply_type']}, storage {options['storage_apply_type']}, workers "
             f"{options['worker_apply_type']} (max {options['max_parallel_worker_hosts']} in parallel), alarm "
             f"restrictions {options['alarm_restrictions']}, stop on failure "
             f"{'yes' if options['stop_on_failure'] else 'no'}"]
    for host, why in sorted(s.get("skipped", {}).items()):
        lines.append(f"  skipped {host}: {why}")
    columns = ["step", "name", "result", "hosts"] + (["timeout", "reason"] if details else [])
    for key in ("apply_phase", "abort_phase"):
        phase = s.get(key)
        if not phase:
            continue
        total = phase["total_stages"]
        at = min(phase["current_stage"] + 1, max(total, 1))
        lines.append(f"{phase['name']} phase: {phase['result']}, stage {at} of {total}")
        for stage in phase["stages"]:
            reason = f": {stage['reason']}" if stage.get("reason") else ""
            lines.append(f"  stage {stage['stage_id']} {stage['name']}: {stage['result']}{reason}")
            if active and stage["result"] in ("initial", "success"):
                continue
            if details or active or stage["result"] not in ("initial", "success"):
                lines += ["    " + line for line in table(_steps(stage, details, active), columns).splitlines()]
    return "\n".join(lines)


def _ok(reply: CommandReply) -> dict[str, Any]:
    if not reply.ok:
        raise CliError(f"{reply.command_type} {reply.status}: {reply.reason}")
    return dict(reply.result)


@strategy.command("create")
@click.argument("release")
@click.option("--version", "version", required=True, help="The release's version.")
@click.option("--no-reboot", is_flag=True, help="The release installs without a lock and reboot.")
@click.option("--controller-apply-type", type=click.Choice(["serial", "ignore"]), default="serial",
              show_default=True)
@click.option("--storage-apply-type", type=click.Choice(["serial", "parallel", "ignore"]), default="serial",
              show_default=True)
@click.option("--worker-apply-type", type=click.Choice(["serial", "parallel", "ignore"]), default="serial",
              show_default=True)
@click.option("--max-parallel-worker-hosts", type=click.IntRange(2, 10), default=2, show_default=True)
@click.option("--alarm-restrictions", type=click.Choice(["strict", "relaxed", "permissive"]), default="strict",
              show_default=True, help="strict: every alarm but host locked blocks; relaxed: management-affecting "
                                      "or critical ones; permissive: none.")
@click.option("--continue-on-failure", is_flag=True, help="A failed stage is undone and the next one runs "
                                                           "(default: the strategy stops and aborts).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def strategy_create(obj: Context, release: str, version: str, no_reboot: bool, controller_apply_type: str,
                    storage_apply_type: str, worker_apply_type: str, max_parallel_worker_hosts: int,
                    alarm_restrictions: str, continue_on_failure: bool, as_json: bool) -> None:
    """Build an update strategy to RELEASE for the site as it is now (hosts on it already are skipped)."""
    data = {"release": {"name": release, "version": version, "reboot_required": not no_reboot},
            "controller_apply_type": controller_apply_type, "storage_apply_type": storage_apply_type,
            "worker_apply_type": worker_apply_type, "max_parallel_worker_hosts": max_parallel_worker_hosts,
            "alarm_restrictions": alarm_restrictions, "stop_on_failure": not continue_on_failure}
    show_reply(run(obj.command("roost.cmd.strategy.create", data, timeout=60.0)), render, as_json)


@strategy.command("show")
@click.option("--details", is_flag=True, help="Every step, with its hosts, timeout and reason.")
@click.option("--active", is_flag=True, help="Only the steps under way or that did not succeed.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def strategy_show(obj: Context, details: bool, active: bool, as_json: bool) -> None:
    """The update strategy and where it is."""
    def shown(result: dict[str, Any]) -> str:
        s = result.get("strategy")
        return render(s, details, active) if s else "no strategy"

    show_reply(run(obj.command("roost.cmd.strategy.show", {})), shown, as_json)


def _progress_lines(before: dict[tuple[str, int, int], str], s: dict[str, Any]) -> list[str]:
    """A line per step whose result changed since ``before`` (updated in place)."""
    lines = []
    for key in ("apply_phase", "abort_phase"):
        phase = s.get(key)
        if not phase:
            continue
        for stage in phase["stages"]:
            for step in stage["steps"]:
                ref = (phase["name"], stage["stage_id"], step["step_id"])
                if before.get(ref, "initial") != step["result"]:
                    before[ref] = step["result"]
                    hosts = f" {', '.join(step['entity_names'])}" if step.get("entity_names") else ""
                    reason = f": {step['reason']}" if step.get("reason") and step["result"] != "inprogress" else ""
                    lines.append(f"[{phase['name']} {stage['stage_id']}.{step['step_id']}] {step['name']}{hosts}"
                                 f" {step['result']}{reason}")
    return lines


async def watch(obj: Context, interval: float) -> dict[str, Any]:
    """Print each step as it changes until the strategy is final; the strategy then."""
    seen: dict[tuple[str, int, int], str] = {}
    state = ""
    async with obj.client() as client:
        while True:
            reply = await client.command("roost.cmd.strategy.show", {}, timeout=30.0)
            s = _ok(reply).get("strategy")
            if s is None:
                raise CliError("the strategy was deleted")
            for line in _progress_lines(seen, s):
                click.echo(line)
            if s["state"] != state:
                state = s["state"]
                click.echo(f"strategy {state}" + (f": {s['reason']}" if s.get("reason") else ""))
            if state in FINAL or paused(s):
                return dict(s)
            await asyncio.sleep(interval)


def paused(s: dict[str, Any]) -> bool:
    """Applied stage by stage, between two stages."""
    stop = s.get("stop_at_stage")
    return s["state"] == "applying" and stop is not None and s["apply_phase"]["current_stage"] >= stop


def _act(obj: Context, type: str, data: dict[str, Any], wanted: str, watching: bool, interval: float,
         as_json: bool) -> None:
    reply = run(obj.command(type, data, timeout=30.0))
    if not watching or not reply.ok:
        show_reply(reply, render, as_json)
        return
    final = run(watch(obj, interval))
    if as_json:
        click.echo(json.dumps(final, indent=2))
    if final["state"] != wanted and not (paused(final) and data.get("stage_id") is not None):
        sys.exit(1)


@strategy.command("apply")
@click.option("--stage-id", type=click.IntRange(min=0), help="Apply only this stage (the next one), then pause.")
@click.option("--watch", "watching", is_flag=True, help="Follow the strategy until it ends (or the stage is done).")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Seconds between looks with --watch.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def strategy_apply(obj: Context, stage_id: int | None, watching: bool, interval: float, as_json: bool) -> None:
    """Apply the strategy, or only its next stage (with --watch: exit status 0 once applied, or the stage
    done; 1 if it failed or was aborted)."""
    _act(obj, "roost.cmd.strategy.apply", {"stage_id": stage_id}, "applied", watching, interval, as_json)


@strategy.command("abort")
@click.option("--watch", "watching", is_flag=True, help="Follow the abort until it ends.")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def strategy_abort(obj: Context, watching: bool, interval: float, as_json: bool) -> None:
    """Abort the strategy being applied: the step in flight finishes, then the hosts it locked are unlocked."""
    _act(obj, "roost.cmd.strategy.abort", {}, "aborted", watching, interval, as_json)


@strategy.command("delete")
@click.option("--force", is_flag=True, help="Delete it even while it is applying or aborting.")
@click.pass_obj
def strategy_delete(obj: Context, force: bool) -> None:
    """Delete the strategy (refused while it applies or aborts, unless --force)."""
    show_reply(run(obj.command("roost.cmd.strategy.delete", {"force": force})),
               lambda r: f"strategy {r['uuid']} deleted (it was {r['state']})")
