"""`roost heartbeat status` and `roost keys create|status`: the heartbeat monitor and its cluster keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from services.cli.client import CliError
from services.cli.main import Context, cli, run, show_reply, table
from services.core.secrets import SecretStore, SecretStoreError
from services.heartbeat.keystore import ClusterKeys, KeyStoreError, ensure_cluster_keys
from services.heartbeat.model import Path as HbPath
from services.heartbeat.transport import PathSpec

NETWORKS = ("mgmt", "cluster-host", "oam")


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
    run(_keys_create(obj.data_dir))


async def _keys_create(data_dir: Path) -> None:
    import asyncio

    try:
        cluster, created = await asyncio.to_thread(ensure_cluster_keys, SecretStore.in_data_dir(data_dir))
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


@heartbeat.command("witness")
@click.option("--credentials", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="A credentials file from `roost agent enroll` (for the cluster's heartbeat keys).")
@click.option("--node-id", type=click.IntRange(1, 0xEFFF_FFFF), required=True,
              help="The witness's node id: heartbeat.witness_node_id on both controllers.")
@click.option("--address", "addresses", multiple=True, required=True, metavar="NETWORK=IP",
              help="Where to answer, per heartbeat network (repeat): heartbeat.witness_addresses.")
@click.option("--port", type=click.IntRange(1, 65535), default=2223, show_default=True,
              help="The agents' heartbeat port (heartbeat.agent_port).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the boot counter is kept (default: DATA_DIR/witness).")
@click.pass_obj
def heartbeat_witness(obj: Context, credentials: Path, node_id: int, addresses: tuple[str, ...], port: int,
                      state_dir: Path | None) -> None:
    """Run a witness voter of the controller pair until SIGTERM / Ctrl-C: a third vote, so that two
    controllers without workers still have a majority on one side of a partition (no bus, no database)."""
    run(_witness(credentials, node_id, addresses, port, state_dir or obj.data_dir / "witness"))


def witness_paths(addresses: tuple[str, ...], port: int) -> list[PathSpec]:
    specs = []
    for item in addresses:
        network, _, ip = item.partition("=")
        if network not in NETWORKS or not ip:
            raise CliError(f"--address {item!r}: expected NETWORK=IP, NETWORK one of {', '.join(NETWORKS)}", code=2)
        specs.append(PathSpec(HbPath.of(network), ip, port))  # type: ignore[arg-type]
    return specs


async def _witness(credentials: Path, node_id: int, addresses: tuple[str, ...], port: int, state_dir: Path) -> None:
    import asyncio
    import signal

    from services.cli.agent import read_credentials
    from services.heartbeat.responder import HeartbeatResponder

    creds = read_credentials(credentials)
    if creds.heartbeat is None:
        raise CliError(f"{credentials} holds no heartbeat keys: enrol the witness again", code=2)
    keys: ClusterKeys = creds.heartbeat
    specs = witness_paths(addresses, port)

    await asyncio.to_thread(state_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
    responder = HeartbeatResponder(node_id=node_id, cluster_id=keys.cluster_id, master_key=keys.master,
                                   paths=specs, state_dir=state_dir, hostname="pair-witness")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await responder.start()
    except OSError as exc:
        raise CliError(f"cannot bind the witness's addresses: {exc.strerror or exc}", code=2) from None
    click.echo(f"witness {node_id} answering on " + ", ".join(f"{s.path.network} {s.address}:{s.port}" for s in specs))
    try:
        await stop.wait()
    finally:
        await responder.stop()
