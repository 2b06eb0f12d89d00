"""`roost up --demo`: an all-in-one evaluation site, in the spirit of OpenNebula's miniONE, and `roost demo`.

On top of what `roost up` runs (the six services on the embedded NATS and PostgreSQL), the demo runs a
simulated site whose parts are the real programs:

* six hosts, ``controller-0``, ``controller-1`` and ``worker-1`` … ``worker-4``: each a real `roost agent
  run` process (enrolled like any agent, its own broker user and credentials file) on a simulated
  ``/proc`` and ``/sys`` tree, answering UDP heartbeats on loopback paths (``mgmt`` 127.0.1.N,
  ``cluster-host`` 127.0.2.N; the heartbeat monitor runs on controller-0, at 127.0.1.1 and 127.0.2.1);
* their BMCs: one sushy-tools Redfish emulator (``sushy-emulator --fake``, basic auth) serving six systems,
  one per host (each host's BMC names its system with ``system_id``).  The demo plays the power: a host's
  agent runs while its system's power is On, is killed when it goes Off and starts again (a new boot id)
  when it comes back On; so a BMC reset, `roost host power-off` / `power-on`, and the inventory's
  reset of a failed worker (``ROOST_FAILED_HOST_RECOVERY=reset``, on for the demo) do what they would do;
* the hosts added (with their addresses and BMCs), and unlocked once their agents are heard, through the
  ordinary ``roost.cmd.host.*`` commands, so inventory, heartbeat and the orchestrator see a real site;
* the distributed cloud: a keystone-shaped database at the controller (``services.dcsync.minikeystone``;
  a real keystone database works the same way) that dcsync captures, and two subclouds, ``subcloud-1`` and
  ``subcloud-2``, each with its own database and a real `roost subcloud agent run` process, added with the
  ordinary ``roost.cmd.subcloud.add``;
* a webhook subscriber (``roost.cmd.alarm.webhook.add``) pointing at a `roost webhook listen` process that
  verifies and prints every delivery (``<data-dir>/demo/logs/webhook.log``).

Everything lives under ``<data-dir>/demo/`` and a second `roost up --demo` on the same data dir reuses it:
the enrolled agents, the databases, the hosts, the subclouds, the subscriber and its secret.  What a
previous run left running (it was killed) is stopped first, by the pid files in ``demo/run/``.  On Ctrl-C
or SIGTERM the services stop first, then every process the demo started (SIGTERM, then SIGKILL).

`roost demo user add NAME` / `roost demo user list [--subcloud NAME]` create a user in the controller's
keystone-shaped database and show the users of either side, to watch dcsync carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import click
import httpx
import structlog
from pydantic import SecretStr

from services.cli.agent import AGENTS, SUBCLOUDS, enroll, write_credentials
from services.cli.client import OPERATOR_TOKEN_SECRET, BusClient, CliError
from services.cli.main import Context, cli, pass_ctx, run, table
from services.core.files import write_private
from services.core.secrets import SecretStore
from services.core.settings import ConfigError, RoostSettings

if TYPE_CHECKING:           # the services' host (FastAPI and all) is for `roost up`, not every `roost` call
    from services.core.host import Component

log = structlog.get_logger("roost.demo")

DEMO_DIR = "demo"
SITE_FILE = "site.json"
KEYSTONE_DB = "roost_demo_keystone"
BMC_USER = "admin"
BMC_PASSWORD_SECRET = "demo-bmc-password"
WEBHOOK_NAME = "demo"
AGENT_INTERVAL = 5.0            # seconds between an agent's hellos
SUBCLOUD_HEARTBEAT = 5.0        # seconds between a subcloud agent's heartbeats
POWER_POLL = 0.5                # seconds between looks at the BMCs' power states
STOP_GRACE = 10.0               # seconds a child has to stop after SIGTERM
RESTART_AFTER = 5.0             # seconds before a subcloud's agent that exited is started again


@dataclass(frozen=True)
class DemoHost:
    name: str
    personality: str
    n: int                      # its loopback addresses 127.0.1.n, 127.0.2.n

    @property
    def mac(self) -> str:
        return f"52:54:00:de:00:{self.n:02x}"

    @property
    def system_id(self) -> str:
        """Its system at the Redfish emulator."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"roost-demo/system/{self.name}"))

    @property
    def addresses(self) -> dict[str, str]:
        return {"mgmt": f"127.0.1.{self.n}", "cluster-host": f"127.0.2.{self.n}"}


HOSTS = (DemoHost("controller-0", "controller", 1), DemoHost("controller-1", "controller", 2),
         *(DemoHost(f"worker-{i}", "worker", 2 + i) for i in range(1, 5)))
SUBCLOUD_NAMES = ("subcloud-1", "subcloud-2")


def subcloud_db(name: str) -> str:
    return "roost_demo_" + name.replace("-", "_")


def with_database(url: str, database: str) -> str:
    """``url`` pointed at another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def demo_dir(data_dir: Path) -> Path:
    return data_dir / DEMO_DIR


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)        # as the servers bind (TIME_WAIT is fine)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _say(text: str) -> None:
    click.echo(f"demo: {text}")
    sys.stdout.flush()


class Child:
    """One process the demo runs: its log file and its pid file under ``demo/``."""

    def __init__(self, name: str, argv: Sequence[str], directory: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = directory / "logs" / f"{name}.log"
        self.pid_path = directory / "run" / f"{name}.pid"
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.reported = False          # its unexpected exit was said
        self.log_offset = 0            # where its log stood when it last started
        self.exited_at = 0.0           # (monotonic) when its exit was noticed

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            # a session of its own: a Ctrl-C at the terminal reaches roost up, which stops the children in order
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        self.pid_path.write_text(f"{self.proc.pid}\n")
        self.reported = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as when the power goes."""
        self.reported = True
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        self.pid_path.unlink(missing_ok=True)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        self.pid_path.unlink(missing_ok=True)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env["ROOST_LOG_FORMAT"] = "console"
    return env


def _roost(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", "--data-dir", str(data_dir), *args]


def sushy_command() -> str:
    beside = Path(sys.executable).parent / "sushy-emulator"
    if beside.exists():
        return str(beside)
    found = shutil.which("sushy-emulator")
    if found is None:
        raise CliError("the demo's BMCs are served by the sushy-tools Redfish emulator, which is not installed: "
                       "`./roost up --demo` installs it, or pip install 'roost[demo]'", code=2)
    return found


class DemoSite:
    """The simulated site of `roost up --demo` (see the module's docstring).  `roost up` calls, in order:
    ``configure`` (settings), ``enroll`` (before the bus starts), ``prepare`` (once the database runs),
    ``launch`` (once the services run) and ``stop`` (once they stopped)."""

    def __init__(self, data_dir: Path) -> None:
        self.data = data_dir
        self.dir = demo_dir(data_dir)
        self.children: dict[str, Child] = {}
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.keystone_url = ""
        self.subcloud_urls: dict[str, str] = {}
        self.bmc_url = ""
        self.webhook_url = ""
        self._power: dict[str, str] = {}
        self._reset_seen: set[str] = set()
        self._bmc_log_offset = 0
        self.bmc_password = SecretStr("")

    # -- before the servers start ----------------------------------------------------------------------

    def configure(self, settings: RoostSettings) -> RoostSettings:
        """The demo's settings: the heartbeat monitor on controller-0's loopback addresses (ports and period as
        configured), failed workers reset through their BMCs."""
        if settings.bus_url is not None:
            raise CliError("`roost up --demo` runs on the embedded NATS: unset ROOST_BUS_URL", code=2)
        heartbeat = settings.heartbeat.model_copy(update={"controller": HOSTS[0].name,
                                                          "addresses": HOSTS[0].addresses})
        update: dict[str, Any] = {"heartbeat": heartbeat, "failed_host_recovery": "reset"}
        if "ROOST_LOG_LEVEL" not in os.environ and settings.log_level == "INFO":
            # the terminal shows what the demo says; the services' info lines would bury it
            from services.core.logging import configure_logging

            update["log_level"] = "WARNING"
            configure_logging(settings.log_format, "WARNING")
        return settings.model_copy(update=update)

    async def enroll(self, secrets: SecretStore) -> None:
        """Stop what an earlier run left behind; enroll every host agent and subcloud agent (`roost up` then
        renders them into the embedded NATS's users)."""
        sushy_command()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._stop_leftovers()
        for host in HOSTS:
            await enroll(AGENTS, self.data, secrets, host.name, rotate=False, broker="embedded", bus_url=None,
                         rabbitmqctl="rabbitmqctl")
        for name in SUBCLOUD_NAMES:
            await enroll(SUBCLOUDS, self.data, secrets, name, rotate=False, broker="embedded", bus_url=None,
                         rabbitmqctl="rabbitmqctl")

    def _stop_leftovers(self) -> None:
        run_dir = self.dir / "run"
        if not run_dir.is_dir():
            return
        for pid_file in run_dir.glob("*.pid"):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid > 0 and str(self.data) in _cmdline(pid):
                log.warning("demo: stopping a process an earlier run left", pid=pid, name=pid_file.stem)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pid_file.unlink(missing_ok=True)

    async def prepare(self, bus_url: str, database_url: str, services: Sequence[Component]) -> list[Component]:
        """Once the bus and the database run, before the services start: the controller's keystone-shaped
        database (seeded) and the subclouds' (empty), created when missing; the agents' credentials files; the
        BMCs; the hosts' agents (those whose power is on) and the subclouds' agents, so that the services find
        the site running, as they would after a restart of the controller.  Returns the services, dcsync
        pointed at the controller's keystone database on the demo's tables."""
        from services.dcsync.minikeystone import SPEC, ensure_schema
        from services.dcsync.service import DcsyncService
        from services.dcsync.settings import load_dcsync_settings
        from services.dcsync.source import Source

        self.keystone_url = with_database(database_url, KEYSTONE_DB)
        self.subcloud_urls = {n: with_database(database_url, subcloud_db(n)) for n in SUBCLOUD_NAMES}
        conn = await asyncpg.connect(database_url)
        try:
            for db in (KEYSTONE_DB, *map(subcloud_db, SUBCLOUD_NAMES)):
                if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db):
                    await conn.execute(f'CREATE DATABASE "{db}"')
        finally:
            await conn.close()
        for url in (self.keystone_url, *self.subcloud_urls.values()):
            conn = await asyncpg.connect(url)
            try:
                await ensure_schema(conn, seed=False)       # seeded once dcsync captures (``_seed``)
            finally:
                await conn.close()
        self._save_site()
        secrets = SecretStore.in_data_dir(self.data)
        self._write_credentials(secrets, bus_url)
        self.bmc_password = secrets.ensure_text(BMC_PASSWORD_SECRET)
        await self._start_bmcs(self.bmc_password)
        for host in HOSTS:
            self._power[host.name] = await self._power_state(host, self.bmc_password)
            if self._power[host.name] == "On" and self.provisioned:
                self._boot(host)            # (the first time, once inventory has the hosts: ``_start``)
        for name in SUBCLOUD_NAMES:
            if self.provisioned:            # (the first time, once dcsync made the sync streams: ``_start``)
                self._start_subcloud_agent(name)
        await self._early_listener()
        logging.getLogger("httpx").setLevel(logging.WARNING)        # not a line per look at a BMC
        self._tasks.append(asyncio.create_task(self._watch(self.bmc_password), name="demo-power"))
        await self._settle()
        try:
            settings = load_dcsync_settings()
        except ConfigError as exc:
            raise CliError(str(exc), code=2) from None
        dcsync = DcsyncService(settings, sources=[Source(SPEC, self.keystone_url)])
        return [dcsync if s.name == dcsync.name else s for s in services]

    def _save_site(self) -> None:
        write_private(self.dir / SITE_FILE, json.dumps({
            "keystone_url": self.keystone_url, "subclouds": self.subcloud_urls,
            "hosts": [h.name for h in HOSTS]}, indent=2) + "\n")

    # -- once the services run -------------------------------------------------------------------------

    def launch(self, operator_url: str, http_base_port: int) -> None:
        """Once the services run: the webhook subscriber and its receiver, the hosts added and unlocked, the
        subclouds added; in the background (`roost up` goes on waiting for a signal)."""
        self._tasks.append(asyncio.create_task(self._run(operator_url, http_base_port), name="demo"))

    async def _run(self, operator_url: str, http_base_port: int) -> None:
        try:
            await self._start(operator_url, http_base_port)
        except asyncio.CancelledError:
            raise
        except CliError as exc:
            _say(f"the site could not start: {exc}")
        except Exception as exc:
            log.exception("demo: the site could not start")
            _say(f"the site could not start: {type(exc).__name__}: {exc}")

    async def _start(self, operator_url: str, http_base_port: int) -> None:
        began = time.monotonic()
        secrets = SecretStore.in_data_dir(self.data)
        token = secrets.get_text(OPERATOR_TOKEN_SECRET).get_secret_value()
        async with BusClient(operator_url, token) as client:
            await self._webhook(client, http_base_port)
            await self._seed()
            await self._add_hosts(client, self.bmc_password)
            for host in HOSTS:
                if self._power.get(host.name) == "On":
                    self._boot(host)
            await self._unlock_hosts(client)
            for name in SUBCLOUD_NAMES:
                if name not in self.children:
                    self._start_subcloud_agent(name)
            await self._add_subclouds(client)
            await self._wait_in_sync(client)
        self.ready.set()
        _say(f"the site is ready ({time.monotonic() - began:.0f} s)")
        click.echo(try_next(self.data))
        sys.stdout.flush()

    async def _settle(self, timeout: float = 60.0) -> None:
        """Until the agents just started are connected (their logs say so), so that the services do not start
        while eight Python processes start on the same cores (a busy machine then times out JetStream calls)."""
        markers = {**{h.name: "agent connected" for h in HOSTS}, **dict.fromkeys(SUBCLOUD_NAMES, "agent serving")}
        waiting = {n: c for n, c in self.children.items() if n in markers and c.alive()}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for name, child in list(waiting.items()):
                try:
                    text = child.log_path.read_text(errors="replace")
                except OSError:
                    text = ""
                if markers[name] in text[child.log_offset:] or not child.alive():
                    del waiting[name]
            await asyncio.sleep(0.2)
        if waiting:
            log.warning("demo: agents not connected yet; starting the services anyway", agents=sorted(waiting))

    async def _seed(self) -> None:
        """What a keystone bootstrap leaves at the controller (domain, projects, roles), written once dcsync's
        capture triggers are in place, like any later change."""
        from services.dcsync.minikeystone import ensure_schema

        conn = await asyncpg.connect(self.keystone_url)
        try:
            await ensure_schema(conn, seed=True)
        finally:
            await conn.close()

    @property
    def provisioned(self) -> bool:
        """The demo's hosts were added and unlocked once (by an earlier run)."""
        return (self.dir / "run-provisioned").exists()

    def _write_credentials(self, secrets: SecretStore, bus_url: str) -> None:
        from services.cli.subcloud import ensure_sync_key, write_subcloud_credentials
        from services.core.brokerauth import agent_user, dcagent_user
        from services.core.brokerauth_apply import broker_password_secret
        from services.heartbeat.keystore import ensure_cluster_keys

        keys, _ = ensure_cluster_keys(secrets)
        for host in HOSTS:
            path = AGENTS.default_credentials_path(self.data, host.name)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_credentials(path, host.name, secrets.get_text(broker_password_secret(agent_user(host.name))),
                              bus_url, keys)
        for name in SUBCLOUD_NAMES:
            path = SUBCLOUDS.default_credentials_path(self.data, name)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_subcloud_credentials(path, name, secrets.get_text(broker_password_secret(dcagent_user(name))),
                                       bus_url, ensure_sync_key(secrets, name))

    # -- the BMCs --------------------------------------------------------------------------------------

    async def _start_bmcs(self, password: SecretStr) -> None:
        import bcrypt

        bmc = self.dir / "bmc"
        (bmc / "state").mkdir(parents=True, exist_ok=True)
        digest = bcrypt.hashpw(password.get_secret_value().encode(), bcrypt.gensalt(rounds=4)).decode()
        write_private(bmc / "htpasswd", f"{BMC_USER}:{digest}\n")
        systems = [{"uuid": h.system_id, "name": h.name, "power_state": "On", "external_notifier": False,
                    "nics": [{"mac": h.mac, "ip": h.addresses["mgmt"]}]} for h in HOSTS]
        (bmc / "emulator.conf").write_text("\n".join([
            "SUSHY_EMULATOR_FAKE_DRIVER = True",
            f"SUSHY_EMULATOR_STATE_DIR = {str(bmc / 'state')!r}",     # power states survive a restart
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}",
            f"SUSHY_EMULATOR_AUTH_FILE = {str(bmc / 'htpasswd')!r}",
        ]) + "\n")
        port_file = bmc / "port"
        saved = int(port_file.read_text()) if port_file.is_file() and port_file.read_text().strip().isdigit() else 0
        port = saved if saved and _port_free(saved) else _free_port()
        port_file.write_text(f"{port}\n")
        self.bmc_url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "SUSHY_EMULATOR_CONFIG"}
        child = Child("bmc", [sushy_command(), "--config", str(bmc / "emulator.conf"), "--fake", "-i", "127.0.0.1",
                              "-p", str(port)], self.dir, env)
        child.start()
        self.children["bmc"] = child
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(self.bmc_url + "/redfish/v1/")).status_code == 200:
                        break
                if not child.alive() or time.monotonic() > deadline:
                    raise CliError(f"the Redfish emulator did not answer at {self.bmc_url} (see {child.log_path})")
                await asyncio.sleep(0.2)
        _say(f"BMCs: the Redfish emulator at {self.bmc_url} serves {len(HOSTS)} systems (user {BMC_USER})")

    def _resets_posted(self) -> set[str]:
        """The systems a Reset action was posted to since the last look (the emulator's access log)."""
        child = self.children.get("bmc")
        if child is None or not child.log_path.exists():
            return set()
        with child.log_path.open("rb") as f:
            f.seek(self._bmc_log_offset)
            text = f.read().decode(errors="replace")
            self._bmc_log_offset = f.tell()
        marker = "/Actions/ComputerSystem.Reset"
        return {line.split("/redfish/v1/Systems/", 1)[1].split(marker, 1)[0]
                for line in text.splitlines() if "POST /redfish/v1/Systems/" in line and marker in line}

    async def _power_state(self, host: DemoHost, password: SecretStr) -> str:
        async with httpx.AsyncClient(timeout=3, auth=(BMC_USER, password.get_secret_value())) as http:
            response = await http.get(f"{self.bmc_url}/redfish/v1/Systems/{host.system_id}")
            response.raise_for_status()
            return str(response.json().get("PowerState", "Unknown"))

    async def _watch(self, password: SecretStr) -> None:
        """Play the power: a host's agent runs while its system is On, dies when it goes Off and starts again
        (a new boot) when it is back On; say when an agent died on its own (killed by someone)."""
        async with httpx.AsyncClient(timeout=3, auth=(BMC_USER, password.get_secret_value())) as http:
            while not self._stopping:
                restarted = self._resets_posted()
                for host in HOSTS:
                    try:
                        response = await http.get(f"{self.bmc_url}/redfish/v1/Systems/{host.system_id}")
                        state = str(response.json().get("PowerState", "Unknown"))
                    except (httpx.HTTPError, ValueError):
                        continue
                    before = self._power.get(host.name)
                    self._power[host.name] = state
                    child = self.children.get(host.name)
                    if host.system_id in restarted:
                        self._reset_seen.add(host.system_id)
                    if (state == "On" and before == "On" and host.system_id in self._reset_seen
                            and (child is None or not child.alive())):
                        # the emulator's restart is Off for 1 to 11 s, which a look can miss: the reset the BMC
                        # took (its log) and a dead agent with the power on again are a boot all the same
                        self._reset_seen.discard(host.system_id)
                        _say(f"{host.name} was reset by its BMC")
                        _say(f"{host.name} is powered on: it boots, its agent starts")
                        self._boot(host)
                        continue
                    if state == "Off":
                        self._reset_seen.discard(host.system_id)
                    if state == "Off" and before != "Off":
                        _say(f"{host.name} is powered off (by its BMC): its agent stops")
                        if child is not None:
                            child.kill()
                    elif state == "On" and before == "Off":
                        _say(f"{host.name} is powered on: it boots, its agent starts")
                        self._boot(host)
                    elif (state == "On" and child is not None and child.proc is not None and not child.alive()
                          and not child.reported):
                        child.reported = True
                        code = child.proc.returncode
                        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                        _say(f"{host.name}'s agent (pid {child.pid}) is gone ({how}); the power is still on")
                for name in SUBCLOUD_NAMES:
                    sc = self.children.get(name)
                    if sc is None or sc.proc is None or sc.alive():
                        continue
                    if not sc.reported:
                        sc.reported, sc.exited_at = True, time.monotonic()
                        _say(f"{name}'s sync agent (pid {sc.pid}) is gone (exit status {sc.proc.returncode}, see "
                             f"{sc.log_path}); it starts again in {RESTART_AFTER:g} s")
                    elif time.monotonic() - sc.exited_at > RESTART_AFTER:
                        self._start_subcloud_agent(name)
                await asyncio.sleep(POWER_POLL)

    # -- the hosts -------------------------------------------------------------------------------------

    def _boot(self, host: DemoHost) -> None:
        from services.inventory.agent.simhost import make_simulated_host

        old = self.children.get(host.name)
        if old is not None and old.alive():
            return
        root = make_simulated_host(self.dir / "hosts" / host.name / "root", host.name, host.mac)   # a new boot id
        child = Child(host.name, _roost(self.data, "agent", "run", "--name", host.name, "--credentials",
                                        str(AGENTS.default_credentials_path(self.data, host.name)),
                                        "--root", str(root), "--interval", str(AGENT_INTERVAL),
                                        "--state-dir", str(self.dir / "hosts" / host.name / "state")),
                      self.dir, _child_env())
        child.start()
        self.children[host.name] = child

    async def _add_hosts(self, client: BusClient, password: SecretStr) -> None:
        for host in HOSTS:
            bmc = {"type": "redfish", "address": self.bmc_url, "username": BMC_USER,
                   "password": password.get_secret_value(), "system_id": host.system_id, "verify_tls": False}
            shown = await client.command("roost.cmd.host.show", {"host": host.name})
            if not shown.ok or shown.result.get("provision") != "provisioned":
                # new, or discovered from its agent's hello (unprovisioned): `host add` with its MAC adopts it
                added = await client.command("roost.cmd.host.add", {
                    "hostname": host.name, "personality": host.personality, "mgmt_mac": host.mac,
                    "addresses": host.addresses, "bmc": bmc})
                if not added.ok:
                    raise CliError(f"adding {host.name}: {added.reason}")
            elif (shown.result.get("bmc") or {}).get("address") != self.bmc_url:
                # the emulator could not take its previous port: point the BMC at the new one
                updated = await client.command("roost.cmd.host.update", {"host": host.name, "bmc": bmc})
                if not updated.ok:
                    raise CliError(f"updating the BMC of {host.name}: {updated.reason}")

    async def _unlock_hosts(self, client: BusClient) -> None:
        """Unlock each host once its agent is heard (the first time only: a host the operator locked stays
        locked across restarts), then wait until all are in service."""
        if not self.provisioned:
            for host in HOSTS:
                shown = await self._wait_host(client, host.name, lambda h: h["availability"] == "online"
                                              and bool(h["inventoried"]), f"{host.name}'s agent heard")
                if shown["administrative"] == "locked":
                    reply = await client.command("roost.cmd.host.unlock", {"host": host.name}, timeout=60)
                    if not reply.ok:
                        raise CliError(f"unlocking {host.name}: {reply.reason}")
            (self.dir / "run-provisioned").write_text("the demo's hosts were added and unlocked once\n")
        for host in HOSTS:
            await self._wait_host(client, host.name, lambda h: h["administrative"] == "locked"
                                  or h["availability"] in ("available", "degraded"), f"{host.name} in service")
        _say("hosts: " + ", ".join(h.name for h in HOSTS) + " (`roost host list`)")

    async def _wait_host(self, client: BusClient, name: str, condition: Any, what: str,
                         timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            reply = await client.command("roost.cmd.host.show", {"host": name})
            if reply.ok and condition(reply.result):
                return dict(reply.result)
            if time.monotonic() > deadline:
                raise CliError(f"timed out waiting for {what}")
            await asyncio.sleep(0.5)

    # -- the subclouds ---------------------------------------------------------------------------------

    def _start_subcloud_agent(self, name: str) -> None:
        child = Child(name, _roost(self.data, "subcloud", "agent", "run", name, "--credentials",
                                   str(SUBCLOUDS.default_credentials_path(self.data, name)),
                                   "--keystone-url", self.subcloud_urls[name],
                                   "--heartbeat-interval", str(SUBCLOUD_HEARTBEAT)), self.dir, _child_env())
        child.start()
        self.children[name] = child

    async def _add_subclouds(self, client: BusClient) -> None:
        for name in SUBCLOUD_NAMES:
            shown = await client.command("roost.cmd.subcloud.show", {"name": name})
            if shown.ok:
                continue
            added = await client.command("roost.cmd.subcloud.add", {
                "name": name, "description": "a subcloud of the demo", "join_policy": None, "managed": True},
                timeout=60)
            if not added.ok:
                raise CliError(f"adding subcloud {name}: {added.reason}")

    async def _wait_in_sync(self, client: BusClient, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for name in SUBCLOUD_NAMES:
            while True:
                shown = await client.command("roost.cmd.subcloud.show", {"name": name})
                if shown.ok and shown.result.get("sync", {}).get("identity") == "in-sync":
                    break
                if time.monotonic() > deadline:
                    raise CliError(f"timed out waiting for {name} in sync")
                await asyncio.sleep(0.5)
        _say("subclouds: " + ", ".join(SUBCLOUD_NAMES) + " in sync (`roost subcloud list`)")

    # -- the webhook -----------------------------------------------------------------------------------

    def _hook_files(self) -> tuple[Path, Path, int]:
        hook = self.dir / "webhook"
        hook.mkdir(mode=0o700, parents=True, exist_ok=True)
        port_file = hook / "port"
        saved = int(port_file.read_text()) if port_file.is_file() and port_file.read_text().strip().isdigit() else 0
        return port_file, hook / "secret", saved

    async def _start_listener(self, port: int, secret_file: Path, timeout: float = 60.0) -> Child:
        """`roost webhook listen`, once it listens (a delivery refused meanwhile would wait out a backoff)."""
        child = Child("webhook", _roost(self.data, "webhook", "listen", "--port", str(port), "--secret-file",
                                        str(secret_file)), self.dir, _child_env())
        child.start()
        self.children["webhook"] = child
        self.webhook_url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout
        while child.alive() and time.monotonic() < deadline:
            if "listening on" in child.log_path.read_text(errors="replace")[child.log_offset:]:
                return child
            await asyncio.sleep(0.1)
        raise CliError(f"`roost webhook listen` did not start listening on port {port} (see {child.log_path})")

    async def _early_listener(self) -> None:
        """The receiver of an earlier run, started again before the services: what the alarms service retries
        at start finds it listening."""
        _, secret_file, saved = self._hook_files()
        if secret_file.exists() and saved and _port_free(saved):
            try:
                await self._start_listener(saved, secret_file)
            except CliError as exc:
                log.warning("demo: the webhook receiver did not start early; trying again later", error=str(exc))

    async def _webhook(self, client: BusClient, http_base_port: int) -> None:
        """A subscriber for every alarm, at a `roost webhook listen` on loopback (the same port and secret as
        last time when it can)."""
        port_file, secret_file, saved = self._hook_files()
        listener = self.children.get("webhook")
        if listener is None or not listener.alive():
            wanted = saved or (http_base_port + 20 if http_base_port else 0)
            port = wanted if wanted and _port_free(wanted) else _free_port()
            port_file.write_text(f"{port}\n")
            self.webhook_url = f"http://127.0.0.1:{port}/"
            listener = None
        listed = await client.command("roost.cmd.alarm.webhook.list", {})
        if not listed.ok:
            raise CliError(f"listing the webhook subscribers: {listed.reason}")
        ours = [s for s in listed.result.get("items", []) if s.get("name") == WEBHOOK_NAME]
        if not (secret_file.exists() and len(ours) == 1 and ours[0].get("url") == self.webhook_url):
            for sub in ours:
                await client.command("roost.cmd.alarm.webhook.remove", {"id": sub["id"]})
            added = await client.command("roost.cmd.alarm.webhook.add", {
                "url": self.webhook_url, "name": WEBHOOK_NAME, "severities": [], "alarm_ids": [],
                "entity_prefix": None, "format": "roost", "max_age_seconds": 3600.0})
            if not added.ok:
                raise CliError(f"adding the webhook subscriber: {added.reason}")
            write_private(secret_file, str(added.result["secret"]) + "\n")
            if listener is not None:            # it verifies with the old secret
                await listener.stop()
                listener = None
        if listener is None:
            listener = await self._start_listener(int(urlsplit(self.webhook_url).port or 0), secret_file)
        _say(f"webhook: every alarm is delivered to {self.webhook_url}, where `roost webhook listen` verifies and "
             f"prints it: {listener.log_path}")

    # -- stopping --------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Every process the demo started, stopped (SIGTERM, then SIGKILL); after the services."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(child.stop() for child in self.children.values()))


def try_next(data_dir: Path) -> str:
    demo = demo_dir(data_dir)
    roost = "roost" if data_dir == _default_data_dir() else f"roost --data-dir {data_dir}"
    steps = [
        (f"{roost} host list", "2 controllers, 4 workers: unlocked, enabled, available"),
        (f"{roost} host lock worker-1", f"alarm 950.001; then `{roost} host unlock worker-1`"),
        (f"kill -9 $(cat {demo}/run/worker-2.pid)", "worker-2's agent dies: the host fails within seconds,"),
        ("", "inventory resets it through its BMC, it boots, its agent starts, it recovers"),
        (f"{roost} event list --entity host=worker-2", "950.002 raised, then cleared"),
        (f"tail {demo}/logs/webhook.log", "both, delivered to a webhook receiver and verified"),
        (f"{roost} demo user add alice", "a user at the system controller's keystone"),
        (f"{roost} demo user list --subcloud subcloud-1", "... and at a subcloud"),
        (f"{roost} subcloud list", "2 subclouds, in sync"),
    ]
    width = max(len(command) for command, _ in steps)
    lines = [f"  {command.ljust(width)}  # {comment}" for command, comment in steps]
    return "\nWhat to try next (in another terminal):\n" + "\n".join(lines) + "\nCtrl-C stops everything.\n"


def _default_data_dir() -> Path:
    from services.core.settings import default_data_dir

    return default_data_dir()


# -- `roost demo` -----------------------------------------------------------------------------------


@cli.group("demo")
def demo_group() -> None:
    """The demo site of `roost up --demo`: its keystone users, at the controller and at the subclouds."""


@demo_group.group("user")
def demo_user() -> None:
    """Users of the demo's keystone-shaped databases (dcsync carries them to the subclouds)."""


def _site(data_dir: Path) -> dict[str, Any]:
    path = demo_dir(data_dir) / SITE_FILE
    try:
        site: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"no demo site under {data_dir} (start one with `roost up --demo`)", code=3) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}") from None
    return site


def _database(data_dir: Path, subcloud: str | None) -> str:
    site = _site(data_dir)
    if subcloud is None:
        return str(site["keystone_url"])
    urls = site.get("subclouds", {})
    if subcloud not in urls:
        raise CliError(f"the demo has no subcloud {subcloud!r} (it has {', '.join(sorted(urls))})", code=2)
    return str(urls[subcloud])


async def _connect(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise CliError(f"cannot reach the demo's database (is `roost up --demo` running?): {exc}", code=3) from None


@demo_user.command("add")
@click.argument("name")
@click.option("--project", default="demo", show_default=True, help="The project it gets a role on.")
@click.option("--role", default="member", show_default=True, type=click.Choice(["admin", "member", "reader"]))
@click.option("--password-file", type=click.File("r"), help="A file whose first line is the password ('-': stdin); "
              "default: asked for on a terminal, else a random one (printed).")
@pass_ctx
def demo_user_add(obj: Context, name: str, project: str, role: str, password_file: IO[str] | None) -> None:
    """Create the user NAME at the system controller's keystone (as keystone does: user, local_user, password,
    a role assignment); dcsync carries it to every subcloud."""
    printed = False
    if password_file is not None:
        password = password_file.readline().rstrip("\n")
    elif sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
    else:
        from services.core.secrets import generate_password

        password, printed = generate_password(12), True
    if not password:
        raise click.UsageError("the password is empty")
    user = run(_user_add(obj.data_dir, name, password, project, role))
    click.echo(table([user], ["name", "id", "enabled", "roles", "password"]))
    if printed:
        click.echo(f"its password: {password}")


async def _user_add(data_dir: Path, name: str, password: str, project: str, role: str) -> dict[str, Any]:
    from services.dcsync.minikeystone import UserError, add_user

    conn = await _connect(_database(data_dir, None))
    try:
        return await add_user(conn, name, password, project=project, role=role)
    except UserError as exc:
        raise CliError(str(exc)) from None
    finally:
        await conn.close()


@demo_user.command("list")
@click.option("--subcloud", help="A subcloud's users (default: the system controller's).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def demo_user_list(obj: Context, subcloud: str | None, as_json: bool) -> None:
    """The users of the controller's keystone, or of a subcloud's (the password column: the hash's algorithm
    and a fingerprint of it, the same wherever the row was synced)."""
    users = run(_user_list(obj.data_dir, subcloud))
    if as_json:
        click.echo(json.dumps(users, indent=2))
    else:
        click.echo(table(users, ["name", "id", "enabled", "roles", "password"]))


async def _user_list(data_dir: Path, subcloud: str | None) -> list[dict[str, Any]]:
    from services.dcsync.minikeystone import list_users

    conn = await _connect(_database(data_dir, subcloud))
    try:
        return await list_users(conn)
    finally:
        await conn.close()
