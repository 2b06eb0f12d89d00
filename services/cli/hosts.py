"""`roost host …`: the inventory service's operator commands over the bus (``roost.cmd.host.*``).

``roost host list`` prints sysinv's host-list columns (id, hostname, personality, administrative, operational,
availability) plus task and which controller is active; ``show`` prints one host as property/value lines.
``lock``, ``unlock`` and ``swact`` wait for the answer up to ``--timeout`` seconds (300 by default: a lock
waits for the orchestrator to drain the host).  A BMC password is read from a file (``-`` for stdin) or
asked for without echo; it is never taken on the command line, and never shown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import click

from schemas.envelope import CommandReply
from services.cli.client import CliError
from services.cli.main import Context, cli, run, show_reply, table

LIST_COLUMNS = ["id", "hostname", "personality", "administrative", "operational", "availability", "task", "active"]
LONG_TIMEOUT = 300.0
SHORT_TIMEOUT = 60.0
PERSONALITIES = ["controller", "worker", "storage"]
SUBFUNCTIONS = ["controller", "worker", "storage", "lowlatency"]
NETWORKS = ["mgmt", "cluster-host", "oam"]

long_timeout = click.option("--timeout", type=click.FloatRange(min=1), default=LONG_TIMEOUT, show_default=True,
                            help="Seconds to wait for the answer (a lock waits for the host to be drained).")
short_timeout = click.option("--timeout", type=click.FloatRange(min=1), default=SHORT_TIMEOUT, show_default=True,
                             help="Seconds to wait for the answer.")
json_option = click.option("--json", "as_json", is_flag=True, help="The whole reply, as JSON.")


def answer(reply: CommandReply, render: Callable[[dict[str, Any]], str] | None = None, as_json: bool = False) -> None:
    """``show_reply``, and a rejection as one line on stderr with exit status 1 (not a traceback)."""
    try:
        show_reply(reply, render, as_json)
    except CliError as exc:
        click.echo(f"roost: {exc}", err=True)
        sys.exit(exc.code)


def _pairs(values: Sequence[str], what: str, choices: Sequence[str] | None = None) -> dict[str, str]:
    """``k=v`` options into a dict (the last one for a key wins)."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, not {value!r}", param_hint=what)
        if choices is not None and key not in choices:
            raise click.BadParameter(f"{key!r} is not one of {', '.join(choices)}", param_hint=what)
        out[key] = val
    return out


def _read_password(source: IO[str] | None, prompt: bool) -> str:
    """The BMC password from a file (first line) or a hidden prompt; never from the command line."""
    if source is not None:
        lines = source.read().splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise click.BadParameter("the file is empty", param_hint="--bmc-password-file")
        return password
    if prompt:
        return str(click.prompt("BMC password", hide_input=True, confirmation_prompt=True, err=True))
    return ""


def _row(host: dict[str, Any]) -> dict[str, Any]:
    return {**host, "id": host.get("node_id"), "active": "active" if host.get("active") else ""}


def _show(host: dict[str, Any]) -> str:
    """One host as sysinv's host-show does: a property per line."""
    bmc = host.get("bmc") or {}
    props: list[tuple[str, Any]] = [
        ("id", host.get("node_id")), ("uuid", host.get("uuid")), ("hostname", host.get("hostname")),
        ("personality", host.get("personality")), ("subfunctions", ",".join(host.get("subfunctions", []))),
        ("administrative", host.get("administrative")), ("operational", host.get("operational")),
        ("availability", host.get("availability")), ("task", host.get("task")), ("action", host.get("action")),
        ("provision", host.get("provision")), ("active", host.get("active")),
        ("power_state", host.get("power_state")), ("uptime", host.get("uptime_seconds")),
        ("mgmt_mac", host.get("mgmt_mac")), ("serial", host.get("serial")), ("location", host.get("location")),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted((host.get("labels") or {}).items()))),
        ("addresses", ", ".join(f"{k}={v}" for k, v in sorted((host.get("addresses") or {}).items()))),
        ("bm_type", bmc.get("type", "none")), ("bm_address", bmc.get("address", "")),
        ("bm_username", bmc.get("username", "")),
        ("bm_password", ("set" if bmc.get("password_set") else "not set") if bmc else ""),
        ("bm_reachable", bmc.get("reachable", "")), ("bm_last_error", bmc.get("last_error", "")),
        ("degrade_reasons", "; ".join(host.get("degrade_reasons", []))),
        ("agent", host.get("agent")), ("agent_seen_at", host.get("agent_seen_at")),
        ("inventoried", host.get("inventoried")), ("created_at", host.get("created_at")),
        ("updated_at", host.get("updated_at")), ("version", host.get("version"))]
    return table([{"property": k, "value": "" if v is None else v} for k, v in props], ["property", "value"])


def _acted(result: dict[str, Any]) -> str:
    host = result.get("host", {})
    text = table([_row(host)], LIST_COLUMNS)
    return f"{text}\n{result['detail']}" if result.get("detail") else text


@cli.group()
def host() -> None:
    """Hosts: list, show, add, update, delete, lock, unlock, swact, power actions, hardware."""


@host.command("list")
@click.option("--personality", type=click.Choice(PERSONALITIES))
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@click.pass_obj
def host_list(obj: Context, personality: str | None, limit: int, as_json: bool) -> None:
    """The hosts and their states."""
    reply = run(obj.command("roost.cmd.host.list", {"personality": personality, "limit": limit}))
    answer(reply, lambda r: table([_row(h) for h in r.get("items", [])], LIST_COLUMNS), as_json)


@host.command("show")
@click.argument("host_ref", metavar="HOST")
@json_option
@click.pass_obj
def host_show(obj: Context, host_ref: str, as_json: bool) -> None:
    """One host (by hostname or uuid) in full; never its BMC password."""
    answer(run(obj.command("roost.cmd.host.show", {"host": host_ref})), _show, as_json)


@host.command("add")
@click.option("--hostname", help="Required for a worker; controller-N / storage-N are assigned when omitted.")
@click.option("--personality", required=True, type=click.Choice(PERSONALITIES))
@click.option("--mgmt-mac", required=True, help="The management NIC's MAC (aa:bb:cc:dd:ee:ff).")
@click.option("--subfunction", "subfunctions", multiple=True, type=click.Choice(SUBFUNCTIONS),
              help="Repeat for each; default: the personality.")
@click.option("--serial", default="")
@click.option("--location", default="")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Repeat for more.")
@click.option("--address", "addresses", multiple=True, metavar="NETWORK=IP",
              help=f"The host's address on a heartbeat network ({', '.join(NETWORKS)}); repeat for more.")
@click.option("--bmc-address", help="The Redfish service, e.g. https://10.10.10.3.")
@click.option("--bmc-username")
@click.option("--bmc-password-file", type=click.File("r"), help="A file whose first line is the BMC password "
              "('-': stdin).  Without it, the password is asked for (not echoed).")
@click.option("--bmc-system-id", help="The Redfish system to drive (default: the BMC's only one).")
@click.option("--bmc-insecure", is_flag=True, help="Do not verify the BMC's TLS certificate.")
@json_option
@click.pass_obj
def host_add(obj: Context, hostname: str | None, personality: str, mgmt_mac: str, subfunctions: tuple[str, ...],
             serial: str, location: str, labels: tuple[str, ...], addresses: tuple[str, ...],
             bmc_address: str | None, bmc_username: str | None, bmc_password_file: IO[str] | None,
             bmc_system_id: str | None, bmc_insecure: bool, as_json: bool) -> None:
    """Add a host (or give a discovered, unprovisioned one with this MAC its identity)."""
    data: dict[str, Any] = {"hostname": hostname, "personality": personality, "mgmt_mac": mgmt_mac,
                            "subfunctions": list(subfunctions) or None, "serial": serial, "location": location,
                            "labels": _pairs(labels, "--label"),
                            "addresses": _pairs(addresses, "--address", NETWORKS)}
    if bmc_address or bmc_username or bmc_password_file is not None:
        if not (bmc_address and bmc_username):
            raise click.UsageError("a BMC needs --bmc-address and --bmc-username")
        data["bmc"] = {"type": "redfish", "address": bmc_address, "username": bmc_username,
                       "password": _read_password(bmc_password_file, prompt=True), "system_id": bmc_system_id,
                       "verify_tls": not bmc_insecure}
    answer(run(obj.command("roost.cmd.host.add", data)), _show, as_json)


@host.command("update")
@click.argument("host_ref", metavar="HOST")
@click.option("--hostname", help="Only while the host is unprovisioned.")
@click.option("--personality", type=click.Choice(PERSONALITIES), help="Only while the host is unprovisioned.")
@click.option("--subfunction", "subfunctions", multiple=True, type=click.Choice(SUBFUNCTIONS),
              help="Only while the host is unprovisioned; repeat for each.")
@click.option("--serial")
@click.option("--location")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Add or change a label; repeat.")
@click.option("--remove-label", "remove_labels", multiple=True, metavar="KEY", help="Remove a label; repeat.")
@click.option("--address", "addresses", multiple=True, metavar="NETWORK=IP", help="Set an address; repeat.")
@click.option("--remove-address", "remove_addresses", multiple=True, type=click.Choice(NETWORKS))
@click.option("--bmc-address")
@click.option("--bmc-username", help="A new username needs its password too.")
@click.option("--bmc-password-file", type=click.File("r"), help="A file whose first line is the BMC password "
              "('-': stdin).")
@click.option("--bmc-password-prompt", is_flag=True, help="Ask for a new BMC password (not echoed).")
@click.option("--bmc-system-id")
@click.option("--bmc-insecure/--bmc-verify-tls", default=None, help="Whether to verify the BMC's TLS certificate.")
@click.option("--no-bmc", is_flag=True, help="Remove the host's BMC.")
@json_option
@click.pass_obj
def host_update(obj: Context, host_ref: str, hostname: str | None, personality: str | None,
                subfunctions: tuple[str, ...], serial: str | None, location: str | None, labels: tuple[str, ...],
                remove_labels: tuple[str, ...], addresses: tuple[str, ...], remove_addresses: tuple[str, ...],
                bmc_address: str | None, bmc_username: str | None, bmc_password_file: IO[str] | None,
                bmc_password_prompt: bool, bmc_system_id: str | None, bmc_insecure: bool | None, no_bmc: bool,
                as_json: bool) -> None:
    """Change a host's labels, addresses, BMC, location, serial (and, while unprovisioned, its identity)."""
    set_labels, set_addresses = _pairs(labels, "--label"), _pairs(addresses, "--address", NETWORKS)
    bmc_given = any(v is not None for v in (bmc_address, bmc_username, bmc_password_file, bmc_system_id,
                                             bmc_insecure)) or bmc_password_prompt
    if no_bmc and bmc_given:
        raise click.UsageError("--no-bmc cannot be combined with other BMC options")
    password = _read_password(bmc_password_file, prompt=bmc_password_prompt) if bmc_given else ""
    data: dict[str, Any] = {"host": host_ref, "hostname": hostname, "personality": personality,
                            "subfunctions": list(subfunctions) or None, "serial": serial, "location": location}
    current: dict[str, Any] = {}
    if set_labels or remove_labels or set_addresses or remove_addresses or bmc_given:
        # labels and addresses are replaced as a whole, and a BMC change keeps what is not given
        shown = run(obj.command("roost.cmd.host.show", {"host": host_ref}))
        if not shown.ok:
            answer(shown)
        current = shown.result
    if set_labels or remove_labels:
        data["labels"] = {k: v for k, v in {**current.get("labels", {}), **set_labels}.items()
                          if k not in remove_labels}
    if set_addresses or remove_addresses:
        data["addresses"] = {k: v for k, v in {**current.get("addresses", {}), **set_addresses}.items()
                             if k not in remove_addresses}
    if no_bmc:
        data["bmc"] = {"type": "none"}
    elif bmc_given:
        bmc = current.get("bmc") or {}
        data["bmc"] = {"type": "redfish", "address": bmc_address or bmc.get("address", ""),
                       "username": bmc_username or bmc.get("username", ""), "password": password,
                       "system_id": bmc_system_id or bmc.get("system_id"),
                       "verify_tls": (not bmc_insecure) if bmc_insecure is not None else bmc.get("verify_tls", True)}
    answer(run(obj.command("roost.cmd.host.update", data)), _show, as_json)


@host.command("delete")
@click.argument("host_ref", metavar="HOST")
@json_option
@click.pass_obj
def host_delete(obj: Context, host_ref: str, as_json: bool) -> None:
    """Delete a locked host."""
    reply = run(obj.command("roost.cmd.host.delete", {"host": host_ref}))
    answer(reply, lambda r: f"deleted {r.get('hostname') or r.get('uuid')}", as_json)


def _action(obj: Context, type: str, data: dict[str, Any], timeout: float, as_json: bool) -> None:
    if not as_json:
        verb = type.rsplit(".", 1)[-1].replace("_", "-")
        click.echo(f"{verb} {data['host']}{' (force)' if data.get('force') else ''}: waiting for the answer "
                   f"(at most {timeout:g} s)...", err=True)
    answer(run(obj.command(type, data, timeout=timeout)), _acted, as_json)


def _forced_command(verb: str, summary: str, force_help: str) -> None:
    @host.command(verb, help=summary)
    @click.argument("host_ref", metavar="HOST")
    @click.option("--force", is_flag=True, help=force_help)
    @long_timeout
    @json_option
    @click.pass_obj
    def command(obj: Context, host_ref: str, force: bool, timeout: float, as_json: bool) -> None:
        _action(obj, f"roost.cmd.host.{verb}", {"host": host_ref, "force": force}, timeout, as_json)


for _verb, _summary, _force_help in (
        ("lock", "Lock a host: its services are disabled first (the orchestrator drains it) unless forced.",
         "Do not wait for its services to be disabled (drained)."),
        ("unlock", "Unlock a host: it goes through its in-test checks to enabled.",
         "Even when it is not online or not yet inventoried."),
        ("swact", "Move the active controller role from HOST to the other controller.",
         "Even when the other controller is degraded.")):
    _forced_command(_verb, _summary, _force_help)


def _power_command(verb: str, summary: str) -> None:
    @host.command(verb, help=summary)
    @click.argument("host_ref", metavar="HOST")
    @short_timeout
    @json_option
    @click.pass_obj
    def command(obj: Context, host_ref: str, timeout: float, as_json: bool) -> None:
        _action(obj, f"roost.cmd.host.{verb.replace('-', '_')}", {"host": host_ref}, timeout,
                as_json)


for _verb, _summary in (("reboot", "Reboot a locked host."), ("reset", "Reset a locked host through its BMC."),
                        ("power-on", "Power a host on through its BMC."),
                        ("power-off", "Power a locked host off through its BMC."),
                        ("reinstall", "Network-boot a locked host once, to reinstall it.")):
    _power_command(_verb, _summary)


def _hardware(result: dict[str, Any]) -> str:
    hw = result.get("hardware", {})
    name = result.get("hostname") or result.get("uuid")
    memory = hw.get("memory") or {}
    parts = [f"{name}: hardware reported by {hw.get('source', 'agent')}"
             + (f" at {hw['reported_at']}" if hw.get("reported_at") else " (nothing reported yet)"),
             "\nCPUs", table(hw.get("cpus", []), ["cpu", "socket", "core", "thread", "model"]),
             "\nMemory", table([memory] if memory else [], ["total_mib", "available_mib"]),
             "\nDisks", table(hw.get("disks", []), ["device_node", "type", "size_mib", "model", "serial"]),
             "\nPorts", table(hw.get("ports", []), ["name", "mac", "link", "speed_mbps", "mtu", "driver",
                                                    "pci_address"])]
    return "\n".join(parts)


@host.command("hardware")
@click.argument("host_ref", metavar="HOST")
@json_option
@click.pass_obj
def host_hardware(obj: Context, host_ref: str, as_json: bool) -> None:
    """A host's CPUs, memory, disks and ports, as its agent (or its BMC) reported them."""
    answer(run(obj.command("roost.cmd.host.hardware", {"host": host_ref})), _hardware, as_json)

