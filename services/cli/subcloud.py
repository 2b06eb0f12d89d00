"""`roost subcloud …`: the subclouds of the distributed cloud, served by the dcsync service
(``roost.cmd.subcloud.*``), and the sync agent that runs at each subcloud.

* ``list`` / ``show NAME`` / ``sync-status [NAME]``: what the dcsync service knows (management, availability,
  join state, per endpoint the sync status and the cursors against the controller's heads);
* ``add NAME``: enrolls the subcloud's agent on this roost's bus (as `roost agent enroll` does for a host
  agent: its own broker user ``dcagent-NAME``, which may read only ``roost.cmd.sync.NAME.>``, its password
  ``broker-password-dcagent-NAME`` and its sync key ``dcsync-sync-key-NAME`` (32 random bytes that seal the
  Fernet keys sent to it) in the secret store, the broker told), writes the agent's credentials file (mode
  0600; its path is printed, never the password or the key), then asks the dcsync service to add it;
* ``delete NAME``: asks the dcsync service to delete it (refused while managed), then revokes the
  enrollment (broker user, password, sync key, default credentials file);
* ``manage`` / ``unmanage`` / ``audit NAME``;
* ``enroll`` / ``revoke`` / ``enrolled``: the enrollment alone (to rotate a password, or to clean up);
* ``agent run NAME``: the subcloud's agent (``services.dcsync.agent.ServedSubcloud``) on the bus until
  SIGTERM / Ctrl-C, on the subcloud's keystone (and glance) database.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import click
import structlog
from pydantic import SecretBytes, SecretStr

from schemas.envelope import CommandReply
from services.cli.agent import (
    SUBCLOUDS,
    Broker,
    Enrollment,
    echo_enrolled,
    enroll,
    local_login,
    login_body,
    read_login,
    revoke,
    secret_store,
    with_credentials,
)
from services.cli.client import CliError
from services.cli.main import Context, cli, pass_ctx, run, show_reply, table
from services.core.brokerauth import dcagent_user
from services.core.bus.abc import BusError, NotConnected
from services.core.bus.bus import Bus
from services.core.bus.factory import transport_from_url
from services.core.files import write_private
from services.core.logging import register_secret
from services.core.secrets import SecretStore, SecretStoreError, generate_key
from services.core.settings import mask_url
from services.dcsync.fernet import sync_key_secret

log = structlog.get_logger("roost.dcagent")

SYNC_KEY_BYTES = 32
LIST_COLUMNS = ["name", "management", "availability", "join_state", "identity_sync", "image_sync", "last_heard"]
STATUS_COLUMNS = ["subcloud", "endpoint", "status", "cursors", "heads", "behind", "out_of_sync_since", "detail"]
AUDIT_COLUMNS = ["endpoint", "clean", "tables", "differing", "buckets", "rows", "repaired", "seconds", "detail"]

json_option = click.option("--json", "as_json", is_flag=True, help="The whole reply, as JSON.")
timeout_option = click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
                              help="Seconds to wait for the answer.")
broker_option = click.option("--broker", type=click.Choice(["auto", "embedded", "rabbitmq", "none"]), default="auto",
                             show_default=True, help="Where the agent's broker user goes: auto = the broker the "
                                                     "local roost uses.")
output_option = click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the agent's credentials (default: <data-dir>/subclouds/NAME.credentials.json).")
agent_bus_url_option = click.option("--agent-bus-url", help="The bus URL as the subcloud's agent reaches it "
                                                            "(default: the local roost's).")
rabbitmqctl_option = click.option("--rabbitmqctl", default="rabbitmqctl", show_default=True,
                                  help="The rabbitmqctl to run.")


# -- credentials ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubcloudCredentials:
    name: str
    password: SecretStr
    bus_url: str | None                # without credentials
    sync_key: SecretBytes


def write_subcloud_credentials(path: Path, name: str, password: SecretStr, bus_url: str | None,
                               sync_key: SecretBytes) -> None:
    body = login_body("subcloud", name, dcagent_user(name), password, bus_url)
    body["sync_key"] = base64.b64encode(sync_key.get_secret_value()).decode()
    write_private(path, json.dumps(body, indent=2) + "\n")


def read_subcloud_credentials(path: Path) -> SubcloudCredentials:
    login = read_login(path, "subcloud")
    encoded = login.raw.get("sync_key")
    try:
        key = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else b""
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != SYNC_KEY_BYTES:
        raise CliError(f"{path} holds no sync key ({SYNC_KEY_BYTES} bytes, base64)", code=2)
    register_secret(key)
    return SubcloudCredentials(login.name, login.password, login.bus_url, SecretBytes(key))


def ensure_sync_key(secrets: SecretStore, name: str) -> SecretBytes:
    try:
        return secrets.ensure(sync_key_secret(name), lambda: generate_key(SYNC_KEY_BYTES))
    except SecretStoreError as exc:
        raise CliError(f"the sync key of subcloud {name}: {exc}") from None


async def enroll_subcloud(obj: Context, name: str, *, rotate: bool, output: Path | None, agent_bus_url: str | None,
                          broker: Broker, rabbitmqctl: str) -> tuple[Enrollment, Path]:
    """Enroll the subcloud's agent and write its credentials file; say so (on stderr: stdout may be JSON)."""
    data_dir = obj.data_dir
    secrets = secret_store(data_dir)
    done = await enroll(SUBCLOUDS, data_dir, secrets, name, rotate=rotate, broker=broker, bus_url=obj._bus_url,
                        rabbitmqctl=rabbitmqctl)
    key = ensure_sync_key(secrets, name)
    path = output or SUBCLOUDS.default_credentials_path(data_dir, name)
    if output is None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_subcloud_credentials(path, name, done.password, agent_bus_url or done.bus_url, key)
    state = "already enrolled" if done.again else "enrolled"
    if rotate:
        state += ", new password"
    click.echo(f"subcloud {name} {state} (broker user {done.user}); {done.applied}", err=True)
    click.echo(f"credentials written to {path} (mode 0600): copy it to the subcloud and run\n"
               f"  roost subcloud agent run {name} --credentials {path.name} --keystone-url postgresql://… "
               "[--glance-url postgresql://…] [--fernet-repo /etc/keystone/fernet-keys]", err=True)
    return done, path


async def revoke_subcloud(obj: Context, name: str, broker: Broker, rabbitmqctl: str) -> str:
    applied = await revoke(SUBCLOUDS, obj.data_dir, secret_store(obj.data_dir), name, broker=broker,
                           bus_url=obj._bus_url, rabbitmqctl=rabbitmqctl, secret_names=(sync_key_secret(name),))
    return f"subcloud {name}'s agent revoked (broker user {dcagent_user(name)}); {applied}"


# -- rendering ---------------------------------------------------------------------------------------


def _lanes(values: dict[str, Any] | None) -> str:
    return " ".join(f"{lane}={n}" for lane, n in sorted((values or {}).items())) or "-"


def _behind(endpoint: dict[str, Any]) -> int:
    cursors = endpoint.get("cursors") or {}
    return sum(max(0, int(head) - int(cursors.get(lane, 0))) for lane, head in (endpoint.get("head") or {}).items())


def list_row(s: dict[str, Any]) -> dict[str, Any]:
    sync = s.get("sync") or {}
    return {"name": s.get("name"), "management": s.get("management"), "availability": s.get("availability"),
            "join_state": s.get("join_state"), "identity_sync": sync.get("identity", "-"),
            "image_sync": sync.get("image", "-"), "last_heard": s.get("last_heard_at") or "never"}


def render_list(result: dict[str, Any]) -> str:
    return table([list_row(s) for s in result.get("subclouds", [])], LIST_COLUMNS)


def status_rows(detail: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"subcloud": detail.get("name"), "endpoint": e.get("endpoint"), "status": e.get("sync_status"),
             "cursors": _lanes(e.get("cursors")), "heads": _lanes(e.get("head")), "behind": _behind(e),
             "out_of_sync_since": e.get("out_of_sync_since") or "", "detail": e.get("detail") or ""}
            for e in detail.get("endpoints", [])]


def render_view(s: dict[str, Any]) -> str:
    return table([list_row(s)], LIST_COLUMNS)


def render_show(d: dict[str, Any]) -> str:
    props: list[tuple[str, Any]] = [
        ("name", d.get("name")), ("description", d.get("description")), ("management", d.get("management")),
        ("availability", d.get("availability")), ("join_state", d.get("join_state")),
        ("join_policy", d.get("join_policy")),
        ("sync", ", ".join(f"{k}={v}" for k, v in sorted((d.get("sync") or {}).items()))),
        ("last_heard_at", d.get("last_heard_at")), ("last_audit_at", d.get("last_audit_at")),
        ("fernet_fingerprint", d.get("fernet_fingerprint")), ("created_at", d.get("created_at")),
        ("version", d.get("version"))]
    lines = [table([{"property": k, "value": "" if v is None else v} for k, v in props], ["property", "value"])]
    lines += ["", "endpoints:"]
    lines += ["  " + line for line in table(status_rows(d), STATUS_COLUMNS[1:]).splitlines()]
    skew = d.get("skew") or []
    if skew:
        lines += ["", "schema skew (columns only one side has):"]
        lines += [f"  {json.dumps(item, sort_keys=True)}" for item in skew]
    audit = d.get("last_audit")
    if audit:
        lines += ["", f"last audit: {json.dumps(audit, sort_keys=True, default=str)}"]
    return "\n".join(lines)


def audit_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in result.get("reports", []):
        repairs = r.get("repairs") or []
        rows.append({"endpoint": r.get("endpoint"), "clean": "yes" if r.get("clean") else "no",
                     "tables": r.get("tables_compared"), "differing": ", ".join(r.get("tables_differing") or []),
                     "buckets": r.get("buckets_compared"), "rows": r.get("rows_compared"),
                     "repaired": sum(int(x.get("upserted", 0)) + int(x.get("deleted", 0)) for x in repairs),
                     "seconds": f"{float(r.get('seconds', 0.0)):.2f}", "detail": r.get("detail") or ""})
    return rows


def render_audit(result: dict[str, Any]) -> str:
    return table(audit_rows(result), AUDIT_COLUMNS)


def _ok(reply: CommandReply) -> dict[str, Any]:
    if not reply.ok:
        raise CliError(f"{reply.command_type} {reply.status}: {reply.reason}")
    return dict(reply.result)


# -- commands ---------------------------------------------------------------------------------------


@cli.group("subcloud")
def subcloud_group() -> None:
    """Subclouds: add, delete, manage, unmanage, list, show, sync status, audit; and their sync agents."""


@subcloud_group.command("list")
@json_option
@pass_ctx
def subcloud_list(obj: Context, as_json: bool) -> None:
    """Every subcloud: management, availability, join state, per endpoint the sync status, last heard."""
    show_reply(run(obj.command("roost.cmd.subcloud.list", {})), render_list, as_json)


@subcloud_group.command("show")
@click.argument("name")
@json_option
@pass_ctx
def subcloud_show(obj: Context, name: str, as_json: bool) -> None:
    """One subcloud in detail: per endpoint its cursors against the controller's heads, schema skew, last audit."""
    show_reply(run(obj.command("roost.cmd.subcloud.show", {"name": name})), render_show, as_json)


@subcloud_group.command("sync-status")
@click.argument("name", required=False)
@json_option
@pass_ctx
def subcloud_sync_status(obj: Context, name: str | None, as_json: bool) -> None:
    """Per subcloud (or only NAME) and endpoint: sync status, cursors against heads, out of sync since, why."""
    details = run(_details(obj, name))
    if as_json:
        click.echo(json.dumps(details, indent=2))
    else:
        click.echo(table([row for d in details for row in status_rows(d)], STATUS_COLUMNS))


async def _details(obj: Context, name: str | None) -> list[dict[str, Any]]:
    async with obj.client() as client:
        if name is not None:
            names = [name]
        else:
            listed = _ok(await client.command("roost.cmd.subcloud.list", {}))
            names = [str(s["name"]) for s in listed.get("subclouds", [])]
        return [_ok(await client.command("roost.cmd.subcloud.show", {"name": n})) for n in names]


@subcloud_group.command("add")
@click.argument("name")
@click.option("--description", default="", help="Free text (at most 255 characters).")
@click.option("--join-policy", type=click.Choice(["adopt", "refuse"]),
              help="A subcloud row with a central row's natural key but another id: adopt (replace it) or refuse "
                   "(the join fails, saying which).  Default: the dcsync service's setting.")
@click.option("--unmanaged", is_flag=True, help="Add it unmanaged: nothing syncs until `roost subcloud manage`.")
@output_option
@agent_bus_url_option
@broker_option
@rabbitmqctl_option
@timeout_option
@json_option
@pass_ctx
def subcloud_add(obj: Context, name: str, description: str, join_policy: str | None, unmanaged: bool,
                 output: Path | None, agent_bus_url: str | None, broker: Broker, rabbitmqctl: str, timeout: float,
                 as_json: bool) -> None:
    """Add the subcloud NAME: enroll its agent on the bus (a credentials file for it), then the dcsync service
    adds it (managed, it joins with a full sync once its agent is heard)."""
    run(enroll_subcloud(obj, name, rotate=False, output=output, agent_bus_url=agent_bus_url, broker=broker,
                        rabbitmqctl=rabbitmqctl))
    data = {"name": name, "description": description, "join_policy": join_policy, "managed": not unmanaged}
    reply = run(obj.command("roost.cmd.subcloud.add", data, timeout=timeout))
    if not reply.ok:
        click.echo(f"roost: the agent of subcloud {name} stays enrolled: `roost subcloud add {name}` again, or "
                   f"`roost subcloud revoke {name}`", err=True)
    show_reply(reply, render_view, as_json)


@subcloud_group.command("delete")
@click.argument("name")
@broker_option
@rabbitmqctl_option
@timeout_option
@json_option
@pass_ctx
def subcloud_delete(obj: Context, name: str, broker: Broker, rabbitmqctl: str, timeout: float, as_json: bool) -> None:
    """Delete the subcloud NAME (unmanage it first), then take its agent off the bus."""
    reply = run(obj.command("roost.cmd.subcloud.delete", {"name": name}, timeout=timeout))
    show_reply(reply, lambda r: f"subcloud {r.get('name', name)} deleted", as_json)
    if name in run(_enrolled(obj)):
        click.echo(run(revoke_subcloud(obj, name, broker, rabbitmqctl)), err=as_json)
    else:
        click.echo(f"subcloud {name}'s agent was not enrolled on this roost ({obj.data_dir}): nothing to revoke",
                   err=as_json)


async def _enrolled(obj: Context) -> set[str]:
    return set(SUBCLOUDS.load(obj.data_dir))


def _state_command(verb: str, doc: str) -> None:
    @subcloud_group.command(verb, help=doc)
    @click.argument("name")
    @timeout_option
    @json_option
    @pass_ctx
    def command(obj: Context, name: str, timeout: float, as_json: bool) -> None:
        show_reply(run(obj.command(f"roost.cmd.subcloud.{verb}", {"name": name}, timeout=timeout)), render_view,
                   as_json)


_state_command("manage", "Manage the subcloud NAME: sync it again (it catches up, or joins).")
_state_command("unmanage", "Unmanage the subcloud NAME: stop syncing it (its agent stays on the bus).")


@subcloud_group.command("audit")
@click.argument("name")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for the audit.")
@json_option
@pass_ctx
def subcloud_audit(obj: Context, name: str, timeout: float, as_json: bool) -> None:
    """Audit the subcloud NAME now: compare (and repair) every endpoint; print the reports."""
    show_reply(run(obj.command("roost.cmd.subcloud.audit", {"name": name}, timeout=timeout)), render_audit, as_json)


@subcloud_group.command("enroll")
@click.argument("name")
@click.option("--rotate", is_flag=True, help="Give the agent a new broker password (the old one stops working).")
@output_option
@agent_bus_url_option
@broker_option
@rabbitmqctl_option
@pass_ctx
def subcloud_enroll(obj: Context, name: str, rotate: bool, output: Path | None, agent_bus_url: str | None,
                    broker: Broker, rabbitmqctl: str) -> None:
    """Only enroll the agent of subcloud NAME (`add` does it too): broker user, password, sync key, credentials."""
    run(enroll_subcloud(obj, name, rotate=rotate, output=output, agent_bus_url=agent_bus_url, broker=broker,
                        rabbitmqctl=rabbitmqctl))


@subcloud_group.command("revoke")
@click.argument("name")
@broker_option
@rabbitmqctl_option
@pass_ctx
def subcloud_revoke(obj: Context, name: str, broker: Broker, rabbitmqctl: str) -> None:
    """Only take the agent of subcloud NAME off the bus (`delete` does it too)."""
    click.echo(run(revoke_subcloud(obj, name, broker, rabbitmqctl)))


@subcloud_group.command("enrolled")
@json_option
@pass_ctx
def subcloud_enrolled(obj: Context, as_json: bool) -> None:
    """The subcloud agents enrolled on this roost's bus."""
    echo_enrolled(SUBCLOUDS, obj.data_dir, as_json)


# -- the agent ---------------------------------------------------------------------------------------


@subcloud_group.group("agent")
def subcloud_agent() -> None:
    """The sync agent of a subcloud (runs at the subcloud)."""


@subcloud_agent.command("run")
@click.argument("name")
@click.option("--credentials", type=click.Path(dir_okay=False, path_type=Path), envvar="ROOST_DCAGENT_CREDENTIALS",
              help="The file `roost subcloud add` wrote (default: this roost's secret store, if enrolled here).")
@click.option("--keystone-url", required=True, envvar="ROOST_DCAGENT_KEYSTONE_URL",
              help="postgresql://… of the subcloud's keystone database (the identity endpoint).")
@click.option("--glance-url", envvar="ROOST_DCAGENT_GLANCE_URL",
              help="postgresql://… of the subcloud's glance database (the image endpoint).")
@click.option("--fernet-repo", type=click.Path(file_okay=False, path_type=Path),
              help="keystone's Fernet key repository at the subcloud (the controller's keys are written there).")
@click.option("--heartbeat-interval", type=click.FloatRange(0, 3600, min_open=True), default=10.0, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--bus-url", "run_bus_url", help="The bus (default: the credentials file's, else the local roost's).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate to verify a TLS broker with.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@pass_ctx
def subcloud_agent_run(obj: Context, name: str, credentials: Path | None, keystone_url: str, glance_url: str | None,
                       fernet_repo: Path | None, heartbeat_interval: float, run_bus_url: str | None,
                       ca_file: Path | None, log_level: str) -> None:
    """Run the sync agent of subcloud NAME until SIGTERM / Ctrl-C: it logs in as dcagent-NAME, answers the
    controller's sync commands against the subcloud's databases and publishes its heartbeats."""
    from services.core.logging import configure_logging

    fmt = os.environ.get("ROOST_LOG_FORMAT", "auto")
    configure_logging(fmt if fmt in ("json", "console") else "auto", log_level)  # type: ignore[arg-type]
    for dsn in (keystone_url, glance_url):
        if dsn and urlsplit(dsn).password:
            register_secret(unquote(urlsplit(dsn).password or ""))
    run(_agent_run(obj, name, credentials, {"identity": keystone_url, "image": glance_url}, fernet_repo,
                   heartbeat_interval, run_bus_url, ca_file))


def _local_sync_key(data_dir: Path, name: str) -> SecretBytes:
    try:
        return SecretStore.in_data_dir(data_dir).get(sync_key_secret(name))
    except SecretStoreError as exc:
        raise CliError(f"cannot read the sync key of subcloud {name}: {exc}", code=2) from None


async def _agent_run(obj: Context, name: str, credentials: Path | None, databases: dict[str, str | None],
                     fernet_repo: Path | None, heartbeat_interval: float, run_bus_url: str | None,
                     ca_file: Path | None) -> None:
    user = SUBCLOUDS.check_name(name)
    if credentials is not None:
        creds = read_subcloud_credentials(credentials)
        if creds.name != name:
            raise CliError(f"{credentials} holds the credentials of subcloud {creds.name}, not {name}", code=2)
        password, url, key = creds.password, creds.bus_url, creds.sync_key
    else:
        password, url = local_login(SUBCLOUDS, obj.data_dir, name)
        key = _local_sync_key(obj.data_dir, name)
    url = run_bus_url or url or obj._bus_url
    if not url:
        raise CliError("no bus URL: pass --bus-url, or add the subcloud with --agent-bus-url", code=2)
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    agent = SubcloudAgent(name, with_credentials(url, user, password.get_secret_value()),
                          {e: dsn for e, dsn in databases.items() if dsn}, fernet_repo=fernet_repo,
                          sync_key=key.get_secret_value(), heartbeat_interval=heartbeat_interval, ssl_context=context)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.stop_on, signum)
    await agent.run()


class SubcloudAgent:
    """The sync agent process: its databases, its bus connection (as ``dcagent-<name>``; on NATS with the
    private inbox prefix the broker policy gives that user), ``ServedSubcloud`` on it until ``stop()``."""

    def __init__(self, name: str, bus_url: str, databases: dict[str, str], *, fernet_repo: Path | None,
                 sync_key: bytes | None, heartbeat_interval: float, ssl_context: ssl.SSLContext | None = None,
                 connect_backoff: tuple[float, float] = (1.0, 30.0)) -> None:
        self.name = name
        self.bus_url = bus_url
        self.databases = databases
        self.fernet_repo = fernet_repo
        self.sync_key = sync_key
        self.heartbeat_interval = heartbeat_interval
        self.ssl_context = ssl_context
        self.connect_backoff = connect_backoff
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def stop_on(self, signum: signal.Signals) -> None:
        log.info("subcloud agent stopping", subcloud=self.name, signal=signum.name)
        self.stop()

    async def run(self) -> None:
        from services.dcsync.agent import EndpointDb, ServedSubcloud, SubcloudSync
        from services.inventory.agent.agent import BrokerPolicyAuthenticator

        log.info("subcloud agent starting", subcloud=self.name, bus=mask_url(self.bus_url),
                 endpoints=sorted(self.databases))
        async with contextlib.AsyncExitStack() as stack:
            pools = {}
            for endpoint, dsn in self.databases.items():
                pools[endpoint] = EndpointDb(await self._pool(endpoint, dsn))
                stack.push_async_callback(pools[endpoint].pool.close)
            bus = Bus(transport_from_url(self.bus_url, ssl_context=self.ssl_context),
                      source=f"roost/dcagent/{self.name}", authenticator=BrokerPolicyAuthenticator())
            stack.push_async_callback(bus.close)
            if not await self._connect(bus):
                return
            served = ServedSubcloud(SubcloudSync(self.name, pools, fernet_repo=self.fernet_repo,
                                                 sync_key=self.sync_key),
                                    bus, heartbeat_interval=self.heartbeat_interval)
            stack.push_async_callback(served.stop)
            try:
                await served.start()
            except BusError as exc:
                raise CliError(f"subcloud agent {self.name} cannot serve its sync commands: {exc}") from None
            log.info("subcloud agent serving", subcloud=self.name, subjects=f"roost.cmd.sync.{self.name}.>")
            await self._stop.wait()
        log.info("subcloud agent stopped", subcloud=self.name)

    async def _pool(self, endpoint: str, dsn: str) -> asyncpg.Pool:
        from services.core.db.pool import DatabaseUnavailable, create_pool
        from services.dcsync.agent import keep_session

        try:
            return await create_pool(dsn, min_size=1, max_size=4, application_name=f"roost-dcagent-{self.name}",
                                     reset=keep_session)
        except (DatabaseUnavailable, ValueError) as exc:
            raise CliError(f"the {endpoint} database of subcloud {self.name}: {exc}", code=2) from None

    async def _connect(self, bus: Bus) -> bool:
        pause, cap = self.connect_backoff
        while not self._stop.is_set():
            try:
                await bus.connect()
                log.info("subcloud agent connected", subcloud=self.name, bus=mask_url(self.bus_url))
                return True
            except NotConnected as exc:
                log.warning("subcloud agent cannot reach the bus; trying again", subcloud=self.name, error=str(exc),
                            retry_in=pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause)
            pause = min(cap, pause * 2)
        return False

