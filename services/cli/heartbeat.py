"""`roost heartbeat status` and `roost keys create|status`: the heartbeat monitor and its cluster keys."""

from __future__ import annotations

from typing import Any

import click

from services.cli.client import CliError
from services.cli.main import Context, cli, run, show_reply, table
from services.core.secrets import SecretStore, SecretStoreError
from services.heartbeat.keystore import KeyStoreError, ensure_cluster_keys


@cli.group()
def heartbeat() -> None:
    """The heartbeat monitor: every monitored host's paths."""


def render_status(status: dict[str, Any]) -> str:
    nets = ", ".join(f"{n} {a}" for n, a in status.get("networks", {}).items()) or "none configured"
    lines = [f"monitor on {status.get('controller')} (node {status.get('node_id')}), networks: {nets}, "
             f"period {status.get('period_seconds')} s, key {status.get('key_fingerprint')}"]
    rows = []
    for host in status.get("hosts", []):
        paths = host.get("paths", {})
        row: dict[str, Any] = {"hostname": host["hostname"], "state": host["state"],
                               "agent": "configured" if host.get("agent_configured")
                               else (f"refused: {host['agent_refused']}" if host.get("agent_refused") else "waiting")}
        for net in ("mgmt", "cluster-host", "oam"):
            p = paths.get(net)
            rtt = f" {p['rtt_ms']:.1f}ms" if p is not None and p.get("rtt_ms") is not None else ""
            row[net] = "-" if p is None else p["state"] + rtt
        rows.append(row)
    lines.append(table(rows, ["hostname", "state", "mgmt", "cluster-host", "oam", "agent"]))
    rejected = {k: v for k, v in status.get("rejected", {}).items() if v}
    if rejected:
        lines.append("rejected datagrams: " + ", ".join(f"{k} {v}" for k, v in rejected.items()))
    return "\n".join(lines)


@heartbeat.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def heartbeat_status(obj: Context, as_json: bool) -> None:
    """Each monitored host's verdict and the state of each of its paths."""
    show_reply(run(obj.command("roost.cmd.heartbeat.status", {})), render_status, as_json)


@cli.group()
def keys() -> None:
    """The heartbeat's cluster keys (HMAC-SHA512 master key and cluster id)."""


@keys.command("create")
@click.pass_obj
def keys_create(obj: Context) -> None:
    """Create the cluster keys in this machine's secret store, unless they exist (never replaced)."""
    try:
        cluster, created = ensure_cluster_keys(SecretStore.in_data_dir(obj.data_dir))
    except (SecretStoreError, KeyStoreError) as exc:
        raise CliError(str(exc)) from None
    verb = "created" if created else "already exist"
    click.echo(f"heartbeat keys {verb}: key {cluster.fingerprint} (generation {cluster.master.generation}), "
               f"cluster {cluster.cluster_id.hex()}")


def render_keys(status: dict[str, Any]) -> str:
    rows = [{"fingerprint": k["fingerprint"], "generation": k["generation"], "state": k["state"],
             "held_by": ", ".join(k["held_by"]) or "-", "missing_at": ", ".join(k["missing_at"]) or "-"}
            for k in status.get("keys", [])]
    return table(rows, ["fingerprint", "generation", "state", "held_by", "missing_at"])


@keys.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def keys_status(obj: Context, as_json: bool) -> None:
    """Which keys the monitor knows, and which monitored hosts report holding each."""
    show_reply(run(obj.command("roost.cmd.heartbeat.status", {})), render_keys, as_json)


@keys.command("rotate")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def keys_rotate(obj: Context, as_json: bool) -> None:
    """Rotate the master key without downtime: the new key is accepted everywhere first, signs once every
    monitored host holds it, and the old one retires once nobody signs with it.  Follow it with `roost keys
    status`; a host that does not get the new key holds the rotation (it is listed as missing)."""

    def render(result: dict[str, Any]) -> str:
        return (f"rotating from key {result['current']} to {result['fingerprint']} (generation "
                f"{result['generation']})\n" + render_keys(result))

    show_reply(run(obj.command("roost.cmd.heartbeat.keys_rotate", {})), render, as_json)
