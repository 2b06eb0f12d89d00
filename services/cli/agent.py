"""`roost agent …`: run a host agent, and enroll, list and revoke the agents of the local roost.

Enrolling is the operator's explicit step that lets a host agent onto the bus:

* the name joins the enrolled agents of this roost, ``<data-dir>/agents.json`` (written whole or not at
  all, under a lock so that two `roost agent enroll` at once lose nothing);
* its broker password ``broker-password-agent-<name>`` is created in the secret store (kept when it
  exists: enrolling again is idempotent; ``--rotate`` replaces it);
* the broker learns about it: for the embedded NATS of `roost up`, the broker policy with every enrolled
  agent (``local_policy``, which `roost up` renders at start too) is written to ``<data-dir>/nats/auth.conf``
  and the running nats-server reloads it (SIGHUP; the command waits until its log confirms the reload); for
  RabbitMQ, the agent's user and permissions are set with ``rabbitmqctl`` (``apply_rabbitmq``);
* a credentials file for the agent (its user, password and, when known, the bus URL with both in it) is
  written with mode 0600; its path is printed, the password never.

``roost agent revoke NAME`` undoes all of it: the agent leaves the list and the broker (a NATS reload
closes the connections of users no longer in the config), its password and default credentials file are
deleted.  ``roost agent list`` shows the enrolled agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import re
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import click
from pydantic import SecretStr

from services.cli.client import CliError, Runtime
from services.cli.main import Context, cli, pass_ctx, run, table
from services.core.brokerauth import (
    Policy,
    PolicyError,
    Principal,
    agent,
    agent_user,
    dcagent,
    dcagent_user,
    rabbitmq_operations,
    rabbitmq_permissions,
    roost_policy,
)
from services.core.brokerauth_apply import (
    BrokerAuthError,
    RabbitCtl,
    apply_nats,
    apply_rabbitmq,
    broker_password_secret,
    delete_rabbitmq_users,
    ensure_broker_passwords,
    reload_nats_server,
)
from services.core.files import write_private
from services.core.logging import register_secret
from services.core.secrets import SecretStore, SecretStoreError, generate_password
from services.heartbeat.keystore import ClusterKeys, KeyStoreError, ensure_cluster_keys, load_cluster_keys

AGENTS_FILE = "agents.json"
AGENTS_LOCK = ".agents.lock"
CREDENTIALS_DIR = "agents"
SUBCLOUDS_FILE = "subclouds.json"
SUBCLOUD_CREDENTIALS_DIR = "subclouds"
# Where `roost up` (services/cli/up.py, ``_bus``) keeps its embedded NATS: the store directory, the config
# file it renders from ``local_policy`` and the server name it runs with (a reload needs the same name).
NATS_DIR = "nats"
NATS_CONFIG = "auth.conf"
NATS_LOG = "nats-server.log"
NATS_SERVER_NAME = "roost"
RELOAD_TIMEOUT = 15.0

Broker = Literal["auto", "embedded", "rabbitmq", "none"]


# -- the enrolled agents ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrolledAgent:
    name: str
    enrolled_at: str

    @property
    def user(self) -> str:
        return agent_user(self.name)


@dataclass(frozen=True, slots=True)
class Roster:
    """One kind of enrolled principal, kept in ``<data-dir>/<file>`` as ``{"<key>": [{"name", "enrolled_at"}]}``:
    the host agents (``agents.json``) or the subclouds' sync agents (``subclouds.json``).  Both are enrolled
    under one lock, since both end up in the one NATS configuration."""

    file: str
    key: str
    what: str                                   # "agent", "subcloud": for messages
    user_of: Callable[[str], str]               # name -> broker user (PolicyError for a bad name)
    principal_of: Callable[[str], Principal]
    credentials_dir: str                        # default credentials files: <data-dir>/<credentials_dir>/
    list_verb: str                              # `roost <what> <list_verb>` lists the enrolled ones

    def path(self, data_dir: Path) -> Path:
        return data_dir / self.file

    def load(self, data_dir: Path) -> dict[str, EnrolledAgent]:
        """The enrolled names (none when the file does not exist).  ``CliError`` for a file that cannot be read
        or names an invalid one: a broken list must be fixed, not half-applied."""
        path = self.path(data_dir)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read the enrolled {self.what}s in {path}: {exc}") from None
        items = raw.get(self.key) if isinstance(raw, dict) else None
        if not isinstance(items, list):
            raise CliError(f"{path} is not a list of enrolled {self.what}s (expected {{\"{self.key}\": [...]}})")
        out: dict[str, EnrolledAgent] = {}
        for item in items:
            name = item.get("name") if isinstance(item, dict) else None
            try:
                self.user_of(str(name))
            except PolicyError as exc:
                raise CliError(f"{path}: {exc}") from None
            out[str(name)] = EnrolledAgent(str(name), str(item.get("enrolled_at", "")))
        return out

    def save(self, data_dir: Path, enrolled: Mapping[str, EnrolledAgent]) -> None:
        body = {self.key: [{"name": a.name, "enrolled_at": a.enrolled_at} for _, a in sorted(enrolled.items())]}
        write_private(self.path(data_dir), json.dumps(body, indent=2) + "\n")

    def check_name(self, name: str) -> str:
        """The broker user of ``name``; a bad name is a usage error (exit status 2)."""
        try:
            return self.user_of(name)
        except PolicyError as exc:
            raise CliError(str(exc), code=2) from None

    def default_credentials_path(self, data_dir: Path, name: str) -> Path:
        return data_dir / self.credentials_dir / f"{name}.credentials.json"


AGENTS = Roster(AGENTS_FILE, "agents", "agent", agent_user, agent, CREDENTIALS_DIR, "list")
SUBCLOUDS = Roster(SUBCLOUDS_FILE, "subclouds", "subcloud", dcagent_user, dcagent, SUBCLOUD_CREDENTIALS_DIR,
                   "enrolled")


def load_enrolled(data_dir: Path) -> dict[str, EnrolledAgent]:
    """The enrolled host agents by name."""
    return AGENTS.load(data_dir)


def enrolled_agents(data_dir: Path) -> list[str]:
    """The names of the enrolled agents, sorted."""
    return sorted(AGENTS.load(data_dir))


def local_policy(data_dir: Path) -> Policy:
    """The broker policy of the roost in ``data_dir``: every service, the operator's `roost` command, every
    enrolled host agent and every enrolled subcloud's sync agent.  `roost up` renders it for its embedded
    NATS; enrolling renders it again."""
    return roost_policy(enrolled_agents(data_dir), subclouds=sorted(SUBCLOUDS.load(data_dir)))


def save_enrolled(data_dir: Path, agents: Mapping[str, EnrolledAgent]) -> None:
    AGENTS.save(data_dir, agents)


@contextlib.contextmanager
def enrollment_lock(data_dir: Path) -> Iterator[None]:
    """One enroll or revoke at a time on this data dir (the lists, the config file and the reload)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / AGENTS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_name(name: str) -> str:
    return AGENTS.check_name(name)


# -- applying to the broker -------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def find_nats_server(config: Path) -> int | None:
    """The pid of the nats-server running with ``config`` (``-c <config>``), if one does."""
    wanted = os.path.realpath(config)
    try:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        argv = _cmdline(pid)
        if not argv or not os.path.basename(argv[0]).startswith("nats-server"):
            continue
        for flag, value in itertools.pairwise(argv):
            if flag in ("-c", "--config") and os.path.realpath(value) == wanted:
                return pid
    return None


async def _wait_reloaded(log_file: Path, offset: int, timeout: float) -> None:
    """Until nats-server's log, past ``offset`` (where it stood before the SIGHUP), says it reloaded its
    config, or why it did not.  (The file was written before the signal, under the enrollment lock, so
    the reload read it; the digest the server prints is of the parsed config, not of the file.)"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with log_file.open("rb") as fh:
                fh.seek(offset)
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        if "Reloaded server configuration" in text:
            return
        failed = re.search(r"Failed to reload server configuration: (.*)", text)
        if failed:
            raise CliError(f"nats-server refused the new configuration: {failed.group(1).strip()}")
        if time.monotonic() > deadline:
            raise CliError(f"nats-server did not confirm the reload within {timeout:g}s (see {log_file})")
        await asyncio.sleep(0.02)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the broker policy goes: the embedded NATS (running or not), RabbitMQ, or nowhere."""

    kind: Literal["embedded", "rabbitmq", "none"]
    runtime: Runtime | None
    bus_url: str | None          # the broker the local roost uses (may hold the operator's credentials)
    why: str = ""


def _target(data_dir: Path, broker: Broker, bus_url: str | None) -> Target:
    """``auto``: the embedded NATS when `roost up` runs it (or when roost is not running and no broker URL is
    given: `roost up` renders the enrolled agents into its config at start), RabbitMQ when the bus is
    ``amqp(s)://``, else nowhere (an external NATS: its operator applies the policy)."""
    runtime = Runtime.load(data_dir)
    running = runtime if runtime is not None and runtime.running else None
    url = bus_url or (running.bus_url if running is not None else None)
    if broker == "none":
        return Target("none", running, url, "--broker none")
    if broker == "rabbitmq":
        return Target("rabbitmq", running, url)
    if broker == "embedded":
        return Target("embedded", running, url)
    if url is not None and urlsplit(url).scheme in ("amqp", "amqps"):
        return Target("rabbitmq", running, url)
    if running is not None and running.bus_user is not None and not bus_url:
        return Target("embedded", running, url)
    if running is None and not bus_url:
        return Target("embedded", None, None)
    return Target("none", running, url, "the bus is a NATS server that `roost up` does not run")


def _vhost(url: str | None) -> str:
    if not url:
        return "/"
    path = unquote(urlsplit(url).path)
    return path[1:] if len(path) > 1 else "/"


async def apply_embedded(data_dir: Path, secrets: SecretStore, target: Target) -> str:
    """Render the local policy for the embedded NATS and make the running server use it."""
    if target.runtime is None:
        return "roost is not running: `roost up` lets the agent in at its next start"
    policy = local_policy(data_dir)
    passwords = ensure_broker_passwords(secrets, policy)
    config = data_dir / NATS_DIR / NATS_CONFIG
    log_file = data_dir / NATS_DIR / NATS_LOG
    offset = log_file.stat().st_size if log_file.exists() else 0
    try:
        apply_nats(policy, passwords, config, server_name=NATS_SERVER_NAME)
    except (BrokerAuthError, PolicyError) as exc:
        raise CliError(f"cannot write the NATS configuration: {exc}") from None
    pid = find_nats_server(config)
    if pid is None:
        raise CliError(f"roost (pid {target.runtime.pid}) runs, but no nats-server with {config} was found; "
                       "the change applies at the next `roost up`")
    try:
        reload_nats_server(pid)
    except BrokerAuthError as exc:
        raise CliError(str(exc)) from None
    await _wait_reloaded(log_file, offset, RELOAD_TIMEOUT)
    return f"the embedded NATS (pid {pid}) reloaded its users"


async def apply_rabbitmq_principal(principal: Principal, password: SecretStr, target: Target, rabbitmqctl: str) -> str:
    policy = Policy((principal,))
    ops = rabbitmq_operations(rabbitmq_permissions(policy, vhost=_vhost(target.bus_url)), {principal.name: password})
    try:
        report = await apply_rabbitmq(ops, RabbitCtl(executable=rabbitmqctl))
    except BrokerAuthError as exc:
        raise CliError(f"RabbitMQ: {exc}") from None
    what = "created" if report.created else "password and permissions set"
    return f"RabbitMQ user {principal.name} {what}"


async def revoke_rabbitmq_user(user: str, rabbitmqctl: str) -> str:
    try:
        deleted = await delete_rabbitmq_users([user], RabbitCtl(executable=rabbitmqctl))
    except BrokerAuthError as exc:
        raise CliError(f"RabbitMQ: {exc}") from None
    return f"RabbitMQ user {user} " + ("deleted" if deleted else "did not exist")


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What enrolling did: the broker user and its password, and what the broker was told."""

    name: str
    user: str
    password: SecretStr = field(repr=False)
    again: bool                   # it was enrolled already
    applied: str                  # one phrase for the operator
    bus_url: str | None           # the bus of the local roost, as far as known


async def enroll(roster: Roster, data_dir: Path, secrets: SecretStore, name: str, *, rotate: bool, broker: Broker,
                 bus_url: str | None, rabbitmqctl: str) -> Enrollment:
    """Let ``name`` of ``roster`` onto the bus: on the list, its broker password in the secret store (kept when
    it exists, unless ``rotate``), the broker told (the embedded NATS reloaded, or its RabbitMQ user set)."""
    user = roster.check_name(name)
    principal = roster.principal_of(name)
    with enrollment_lock(data_dir):
        enrolled = roster.load(data_dir)
        again = name in enrolled
        try:
            if rotate:
                secrets.put(broker_password_secret(user), generate_password())
            password = ensure_broker_passwords(secrets, Policy((principal,)))[user]
        except SecretStoreError as exc:
            raise CliError(str(exc)) from None
        if not again:
            enrolled[name] = EnrolledAgent(name, datetime.now(UTC).isoformat(timespec="seconds"))
            roster.save(data_dir, enrolled)
        target = _target(data_dir, broker, bus_url)
        if target.kind == "embedded":
            applied = await apply_embedded(data_dir, secrets, target)
        elif target.kind == "rabbitmq":
            applied = await apply_rabbitmq_principal(principal, password, target, rabbitmqctl)
        else:
            applied = (f"not applied to a broker ({target.why}): give the broker user {user} the permissions of "
                       f"services.core.brokerauth.{principal.kind.value}() and the password in the credentials file")
    return Enrollment(name, user, password, again, applied, target.bus_url)


async def revoke(roster: Roster, data_dir: Path, secrets: SecretStore, name: str, *, broker: Broker,
                 bus_url: str | None, rabbitmqctl: str, secret_names: tuple[str, ...] = ()) -> str:
    """Take ``name`` of ``roster`` off the bus: off the list and the broker (a NATS reload closes its
    connections), its broker password, ``secret_names`` and its default credentials file deleted.  What the
    broker did, in one phrase."""
    user = roster.check_name(name)
    with enrollment_lock(data_dir):
        enrolled = roster.load(data_dir)
        if name not in enrolled:
            raise CliError(f"{roster.what} {name} is not enrolled (see `roost {roster.what} {roster.list_verb}`)")
        del enrolled[name]
        roster.save(data_dir, enrolled)
        target = _target(data_dir, broker, bus_url)
        if target.kind == "embedded":
            applied = await apply_embedded(data_dir, secrets, target)
        elif target.kind == "rabbitmq":
            applied = await revoke_rabbitmq_user(user, rabbitmqctl)
        else:
            applied = f"not removed from a broker ({target.why}): delete the broker user {user} yourself"
        for secret in (broker_password_secret(user), *secret_names):
            with contextlib.suppress(SecretStoreError):
                secrets.delete(secret)
        roster.default_credentials_path(data_dir, name).unlink(missing_ok=True)
    return applied


def echo_enrolled(roster: Roster, data_dir: Path, as_json: bool) -> None:
    """`list`: name, broker user, when, and the default credentials file when it is there."""
    try:
        enrolled = roster.load(data_dir)
    except CliError as exc:
        click.echo(f"roost: {exc}", err=True)
        sys.exit(exc.code)
    rows = [{"name": a.name, "user": roster.user_of(a.name), "enrolled_at": a.enrolled_at,
             "credentials": str(p) if (p := roster.default_credentials_path(data_dir, a.name)).exists() else ""}
            for _, a in sorted(enrolled.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(rows, ["name", "user", "enrolled_at", "credentials"]))


# -- credentials ------------------------------------------------------------------------------------


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    from services.core.settings import url_with_credentials

    return url_with_credentials(_without_credentials(url), user, password)


def default_credentials_path(data_dir: Path, name: str) -> Path:
    return AGENTS.default_credentials_path(data_dir, name)


def login_body(key: str, name: str, user: str, password: SecretStr, bus_url: str | None) -> dict[str, Any]:
    """The login part of a credentials file: ``{key: name, "user", "password", "bus_url"}`` (the bus URL with the
    user and password in it, when known)."""
    secret = password.get_secret_value()
    return {key: name, "user": user, "password": secret,
            "bus_url": with_credentials(bus_url, user, secret) if bus_url else None}


def write_credentials(path: Path, name: str, password: SecretStr, bus_url: str | None,
                      heartbeat: ClusterKeys | None = None) -> None:
    body = login_body("agent", name, agent_user(name), password, bus_url)
    if heartbeat is not None:
        body["heartbeat"] = heartbeat.credentials()
    write_private(path, json.dumps(body, indent=2) + "\n")


@dataclass(frozen=True, slots=True)
class Login:
    """The login part of a credentials file, and the whole file (``raw``) for what else it holds."""

    name: str
    password: SecretStr
    bus_url: str | None              # without credentials
    raw: dict[str, Any] = field(repr=False)


def read_login(path: Path, key: str) -> Login:
    """A credentials file written by ``login_body(key, ...)``, readable by its owner only; its password is
    registered as a secret (masked in every log line)."""
    try:
        info = path.stat()
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the credentials file {path}: {exc}", code=2) from None
    if info.st_mode & 0o077:
        raise CliError(f"the credentials file {path} can be read by others (mode {oct(info.st_mode & 0o777)}); "
                       f"chmod 600 {path}", code=2)
    if not isinstance(raw, dict) or not isinstance(raw.get(key), str):
        raise CliError(f"{path} is not {'an' if key[0] in 'aeiou' else 'a'} {key} credentials file (no \"{key}\")",
                       code=2)
    url = raw.get("bus_url")
    password = raw.get("password")
    if not isinstance(password, str) and isinstance(url, str):
        password = unquote(urlsplit(url).password or "") or None
    if not isinstance(password, str) or not password:
        raise CliError(f"{path} holds no password", code=2)
    register_secret(password)
    return Login(raw[key], SecretStr(password), _without_credentials(url) if isinstance(url, str) and url else None,
                 raw)


@dataclass(frozen=True, slots=True)
class AgentCredentials:
    name: str
    password: SecretStr
    bus_url: str | None              # without credentials
    heartbeat: ClusterKeys | None = None


def read_credentials(path: Path) -> AgentCredentials:
    login = read_login(path, "agent")
    keys = None
    if isinstance(login.raw.get("heartbeat"), dict):
        try:
            keys = ClusterKeys.from_credentials(login.raw["heartbeat"], where=str(path))
        except KeyStoreError as exc:
            raise CliError(str(exc), code=2) from None
    return AgentCredentials(login.name, login.password, login.bus_url, keys)


# -- commands ---------------------------------------------------------------------------------------


@cli.group("agent")
def agent_group() -> None:
    """Host agents: run one, and enroll, list or revoke the agents allowed on this roost's bus."""


def secret_store(data_dir: Path) -> SecretStore:
    try:
        return SecretStore.in_data_dir(data_dir)
    except SecretStoreError as exc:
        raise CliError(str(exc)) from None


@agent_group.command("enroll")
@click.argument("name")
@click.option("--rotate", is_flag=True, help="Give the agent a new password (the old one stops working).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the agent's credentials (default: <data-dir>/agents/NAME.credentials.json).")
@click.option("--agent-bus-url", help="The bus URL as the agent reaches it (default: the local roost's).")
@click.option("--broker", type=click.Choice(["auto", "embedded", "rabbitmq", "none"]), default="auto",
              show_default=True, help="Where to apply the agent's user: auto = the broker the local roost uses.")
@click.option("--rabbitmqctl", default="rabbitmqctl", show_default=True, help="The rabbitmqctl to run.")
@pass_ctx
def agent_enroll(obj: Context, name: str, rotate: bool, output: Path | None, agent_bus_url: str | None,
                 broker: Broker, rabbitmqctl: str) -> None:
    """Let the agent NAME onto the bus: its own broker user and password, a credentials file for it."""
    run(_enroll(obj, name, rotate, output, agent_bus_url, broker, rabbitmqctl))


async def _enroll(obj: Context, name: str, rotate: bool, output: Path | None, agent_bus_url: str | None,
                  broker: Broker, rabbitmqctl: str) -> None:
    data_dir = obj.data_dir
    secrets = secret_store(data_dir)
    done = await enroll(AGENTS, data_dir, secrets, name, rotate=rotate, broker=broker, bus_url=obj._bus_url,
                        rabbitmqctl=rabbitmqctl)
    path = output or default_credentials_path(data_dir, name)
    if output is None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        keys, _ = ensure_cluster_keys(secrets)
    except (SecretStoreError, KeyStoreError) as exc:
        raise CliError(f"the heartbeat keys: {exc}") from None
    write_credentials(path, name, done.password, agent_bus_url or done.bus_url, keys)
    state = "already enrolled" if done.again else "enrolled"
    if rotate:
        state += ", new password"
    click.echo(f"agent {name} {state} (broker user {done.user}); {done.applied}")
    click.echo(f"credentials written to {path} (mode 0600): copy it to the host and run\n"
               f"  roost agent run --name {name} --credentials {path.name}")


@agent_group.command("revoke")
@click.argument("name")
@click.option("--broker", type=click.Choice(["auto", "embedded", "rabbitmq", "none"]), default="auto",
              show_default=True)
@click.option("--rabbitmqctl", default="rabbitmqctl", show_default=True)
@pass_ctx
def agent_revoke(obj: Context, name: str, broker: Broker, rabbitmqctl: str) -> None:
    """Take the agent NAME off the bus: out of the list and the broker, its password deleted."""
    run(_revoke(obj, name, broker, rabbitmqctl))


async def _revoke(obj: Context, name: str, broker: Broker, rabbitmqctl: str) -> None:
    applied = await revoke(AGENTS, obj.data_dir, secret_store(obj.data_dir), name, broker=broker, bus_url=obj._bus_url,
                           rabbitmqctl=rabbitmqctl)
    click.echo(f"agent {name} revoked (broker user {agent_user(name)}); {applied}")


@agent_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def agent_list(obj: Context, as_json: bool) -> None:
    """The agents enrolled on this roost."""
    echo_enrolled(AGENTS, obj.data_dir, as_json)


@agent_group.command("run")
@click.option("--name", required=True, help="The agent's name (it logs in as broker user agent-NAME).")
@click.option("--credentials", type=click.Path(dir_okay=False, path_type=Path), envvar="ROOST_AGENT_CREDENTIALS",
              help="The file `roost agent enroll` wrote (default: the local roost's secret store).")
@click.option("--bus-url", "run_bus_url", help="The bus (default: the credentials file's, else the local roost's).")
@click.option("--interval", type=click.FloatRange(0, 3600, min_open=True), default=30.0, show_default=True,
              help="Seconds between hellos.")
@click.option("--inventory-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Report the hardware at least every N hellos (and whenever it changes).")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=Path("/"),
              show_default=True, help="Where /proc and /sys are read (a simulated host's tree).")
@click.option("--include-virtual-ports", is_flag=True, help="Also report virtual network interfaces.")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CA certificate to verify a TLS broker with.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the agent keeps its state: the heartbeat boot counter and config, the release it "
                   "runs (default: DATA_DIR/agents/NAME).")
@click.option("--no-heartbeat", is_flag=True, help="Do not answer heartbeats (hello and hardware only).")
@click.option("--simulate-update-failure", "fail_releases", multiple=True, metavar="RELEASE",
              help="Fail the (simulated) install of RELEASE (tests and the demo; may be repeated).")
@click.option("--simulate-install-seconds", type=click.FloatRange(0, 3600), default=0.0, show_default=True,
              help="How long a simulated install takes.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@pass_ctx
def agent_run(obj: Context, name: str, credentials: Path | None, run_bus_url: str | None, interval: float,
              inventory_every: int, root: Path, include_virtual_ports: bool, ca_file: Path | None,
              state_dir: Path | None, no_heartbeat: bool, fail_releases: tuple[str, ...],
              simulate_install_seconds: float, log_level: str) -> None:
    """Run the host agent NAME until SIGTERM / Ctrl-C: hello every --interval, hardware when it changes,
    answer heartbeats as the heartbeat service tells it, and report and install (simulated) releases."""
    from services.core.logging import configure_logging

    fmt = os.environ.get("ROOST_LOG_FORMAT", "auto")
    configure_logging(fmt if fmt in ("json", "console") else "auto", log_level)  # type: ignore[arg-type]
    run(_run(obj, name, credentials, run_bus_url, interval, inventory_every, root, include_virtual_ports,
             ca_file, state_dir or obj.data_dir / "agents" / name, not no_heartbeat, fail_releases,
             simulate_install_seconds))


def local_login(roster: Roster, data_dir: Path, name: str) -> tuple[SecretStr, str | None]:
    """``name``'s broker password from the local secret store, and the local roost's bus URL while it runs."""
    user = roster.check_name(name)
    if name not in roster.load(data_dir):
        raise CliError(f"{roster.what} {name} is not enrolled here ({data_dir}): run `roost {roster.what} "
                       f"enroll {name}` or pass --credentials", code=2)
    try:
        password = SecretStore.in_data_dir(data_dir).get_text(broker_password_secret(user))
    except SecretStoreError as exc:
        raise CliError(f"cannot read the broker password of {user}: {exc}", code=2) from None
    runtime = Runtime.load(data_dir)
    url = runtime.bus_url if runtime is not None and runtime.running else None
    return password, url


def _local_keys(data_dir: Path) -> ClusterKeys | None:
    try:
        return load_cluster_keys(SecretStore.in_data_dir(data_dir))
    except KeyStoreError:
        return None
    except SecretStoreError as exc:
        raise CliError(f"cannot read the heartbeat keys: {exc}", code=2) from None


async def _run(obj: Context, name: str, credentials: Path | None, run_bus_url: str | None, interval: float,
               inventory_every: int, root: Path, include_virtual_ports: bool, ca_file: Path | None,
               state_dir: Path, heartbeat: bool, fail_releases: tuple[str, ...] = (),
               install_seconds: float = 0.0) -> None:
    from services.heartbeat.agent import HeartbeatAgentComponent
    from services.inventory.agent.agent import AgentComponent, HostAgent
    from services.orchestrator.agent import UpdateAgentComponent

    check_name(name)
    if credentials is not None:
        creds = read_credentials(credentials)
        if creds.name != name:
            raise CliError(f"{credentials} holds the credentials of agent {creds.name}, not {name}", code=2)
        password, url, keys = creds.password, creds.bus_url, creds.heartbeat
    else:
        password, url = local_login(AGENTS, obj.data_dir, name)
        keys = _local_keys(obj.data_dir)
    components: list[AgentComponent] = []
    if heartbeat and keys is None:
        click.echo(f"roost: no heartbeat keys for agent {name} (enrolled before the heartbeat existed?): "
                   "running without heartbeats; re-enrol it to answer them", err=True)
    elif heartbeat and keys is not None:
        await asyncio.to_thread(state_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        components.append(HeartbeatAgentComponent(keys, state_dir))
    await asyncio.to_thread(state_dir.mkdir, mode=0o700, parents=True, exist_ok=True)
    components.append(UpdateAgentComponent(state_dir, fail_releases=fail_releases, install_seconds=install_seconds))
    url = run_bus_url or url or obj._bus_url
    if not url:
        raise CliError("no bus URL: pass --bus-url, or enroll with --agent-bus-url, or start `roost up`", code=2)
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    try:
        host_agent = HostAgent(name, _without_credentials(url), password=password, interval=interval, root=root,
                               inventory_every=inventory_every, include_virtual_ports=include_virtual_ports,
                               ssl_context=context, components=components)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    await host_agent.run_until_signalled()
