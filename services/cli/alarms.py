"""`roost alarm …` and `roost event list`: the alarms service's operator commands over the bus."""

from __future__ import annotations

from typing import Any

import click

from services.cli.main import Context, cli, run, show_reply, table

ALARM_COLUMNS = ["uuid", "alarm_id", "severity", "entity_instance_id", "reason_text", "timestamp",
                 "suppression_status", "masked"]


@cli.group()
def alarm() -> None:
    """Active alarms: list, show, summary, clear, suppress, unsuppress."""


@alarm.command("list")
@click.option("--alarm-id", help="Only this alarm id (GGG.EEE).")
@click.option("--severity", type=click.Choice(["critical", "major", "minor", "warning"]))
@click.option("--entity", "entity_prefix", help="This entity and its children, e.g. host=controller-0.")
@click.option("--include-suppress", is_flag=True, help="Also the alarms of suppressed ids.")
@click.option("--include-masked", is_flag=True, help="Also alarms masked by an inhibiting alarm (host locked).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def alarm_list(obj: Context, alarm_id: str | None, severity: str | None, entity_prefix: str | None,
               include_suppress: bool, include_masked: bool, limit: int, as_json: bool) -> None:
    """The active alarms, most severe first."""
    data: dict[str, Any] = {"alarm_id": alarm_id, "severity": severity, "entity_prefix": entity_prefix,
                            "include_suppress": include_suppress, "include_masked": include_masked, "limit": limit}
    reply = run(obj.command("roost.cmd.alarm.list", data))
    show_reply(reply, lambda r: table(r.get("items", []), ALARM_COLUMNS), as_json)


@alarm.command("show")
@click.argument("uuid")
@click.pass_obj
def alarm_show(obj: Context, uuid: str) -> None:
    """One active alarm in full."""
    show_reply(run(obj.command("roost.cmd.alarm.show", {"uuid": uuid})))


@alarm.command("summary")
@click.option("--include-suppress", is_flag=True)
@click.pass_obj
def alarm_summary(obj: Context, include_suppress: bool) -> None:
    """Active alarms by severity, and the system's status."""
    reply = run(obj.command("roost.cmd.alarm.summary", {"include_suppress": include_suppress}))
    show_reply(reply, lambda r: table([r], ["critical", "major", "minor", "warnings", "status"]))


@alarm.command("clear")
@click.argument("uuid")
@click.pass_obj
def alarm_clear(obj: Context, uuid: str) -> None:
    """Clear one active alarm (recorded as an operator action)."""
    reply = run(obj.command("roost.cmd.alarm.clear", {"uuid": uuid}))
    show_reply(reply, lambda r: "cleared" if r.get("cleared") else f"no active alarm {uuid}")


@alarm.command("suppress")
@click.argument("alarm_id")
@click.pass_obj
def alarm_suppress(obj: Context, alarm_id: str) -> None:
    """Hide an alarm id's alarms from lists (they stay active and recorded)."""
    reply = run(obj.command("roost.cmd.alarm.suppress", {"alarm_id": alarm_id}))
    show_reply(reply, lambda r: f"{r['alarm_id']} {r['suppression_status']}")


@alarm.command("unsuppress")
@click.argument("alarm_id")
@click.pass_obj
def alarm_unsuppress(obj: Context, alarm_id: str) -> None:
    """Show an alarm id's alarms in lists again."""
    reply = run(obj.command("roost.cmd.alarm.unsuppress", {"alarm_id": alarm_id}))
    show_reply(reply, lambda r: f"{r['alarm_id']} {r['suppression_status']}")


@cli.group()
def event() -> None:
    """The event log: alarm history and customer logs."""


@event.command("list")
@click.option("--alarms/--no-alarms", default=True, show_default=True, help="Alarm set/clear records.")
@click.option("--logs/--no-logs", default=True, show_default=True, help="Customer logs.")
@click.option("--id", "event_log_id", help="Only this alarm or log id.")
@click.option("--entity", "entity_prefix", help="This entity and its children.")
@click.option("--include-suppress", is_flag=True)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--marker", type=click.IntRange(min=1), help="The next_marker the previous page printed.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def event_list(obj: Context, alarms: bool, logs: bool, event_log_id: str | None, entity_prefix: str | None,
               include_suppress: bool, limit: int, marker: int | None, as_json: bool) -> None:
    """The event log, newest first."""
    data: dict[str, Any] = {"alarms": alarms, "logs": logs, "event_log_id": event_log_id,
                            "entity_prefix": entity_prefix, "include_suppress": include_suppress,
                            "limit": limit, "marker": marker}
    reply = run(obj.command("roost.cmd.alarm.history", data))

    def render(result: dict[str, Any]) -> str:
        text = table(result.get("items", []), ["timestamp", "state", "event_log_id", "severity",
                                               "entity_instance_id", "reason_text"])
        if result.get("next_marker"):
            text += f"\n(more: --marker {result['next_marker']})"
        return text

    show_reply(reply, render, as_json)


@cli.group()
def webhook() -> None:
    """Webhook subscribers of the alarms (admin only)."""


@webhook.command("add")
@click.argument("url")
@click.option("--name")
@click.option("--severity", "severities", multiple=True, type=click.Choice(["critical", "major", "minor", "warning"]),
              help="Only these severities (repeat); default: all.")
@click.option("--alarm-id", "alarm_ids", multiple=True, help="Only these alarm ids (repeat); default: all.")
@click.option("--entity", "entity_prefix", help="Only this entity and its children.")
@click.option("--format", "format_", type=click.Choice(["roost", "alertmanager"]), default="roost", show_default=True)
@click.option("--max-age", "max_age_seconds", type=click.FloatRange(min=1), default=86_400.0, show_default=True,
              help="Seconds a notification is retried before it is dead-lettered.")
@click.pass_obj
def webhook_add(obj: Context, url: str, name: str | None, severities: tuple[str, ...], alarm_ids: tuple[str, ...],
                entity_prefix: str | None, format_: str, max_age_seconds: float) -> None:
    """Register URL; prints the subscriber's signing secret once."""
    data: dict[str, Any] = {"url": url, "name": name, "severities": list(severities), "alarm_ids": list(alarm_ids),
                            "entity_prefix": entity_prefix, "format": format_, "max_age_seconds": max_age_seconds}
    reply = run(obj.command("roost.cmd.alarm.webhook.add", data))
    show_reply(reply, lambda r: f"{r['subscriber']['id']}\n{r['secret']}\n(the signing secret: shown this once)")


@webhook.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def webhook_list(obj: Context, as_json: bool) -> None:
    """Subscribers, their filters, whether they are failing and how much waits for them."""
    reply = run(obj.command("roost.cmd.alarm.webhook.list", {}))
    show_reply(reply, lambda r: table(r.get("items", []), ["id", "name", "url", "format", "failing", "pending",
                                                           "severities", "entity_prefix"]), as_json)


@webhook.command("remove")
@click.argument("id")
@click.pass_obj
def webhook_remove(obj: Context, id: str) -> None:
    """Remove a subscriber and what waits for it."""
    reply = run(obj.command("roost.cmd.alarm.webhook.remove", {"id": id}))
    show_reply(reply, lambda r: "removed" if r.get("removed") else f"no subscriber {id}")


@webhook.command("replay")
@click.argument("id")
@click.pass_obj
def webhook_replay(obj: Context, id: str) -> None:
    """Send a subscriber's dead-lettered notifications again (same webhook-id)."""
    reply = run(obj.command("roost.cmd.alarm.webhook.replay", {"id": id}))
    show_reply(reply, lambda r: f"replayed {r.get('replayed', 0)}")
