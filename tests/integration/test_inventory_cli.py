"""`roost host …` against a running inventory service as `roost up` runs it: the service hosted by
``ServiceHost`` (its own bus connection with PostgreSQL-checked API tokens, its outbox relay) on a real NATS
JetStream server and a fresh PostgreSQL database; the `roost` command run as a separate process with
``--bus-url`` and ``--token``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.envelope import Role
from services.core.auth import create_token
from services.core.embedded.nats_server import NatsServer
from services.core.host import Connections, ServiceHost
from services.core.secrets import SecretStore
from services.core.settings import load_settings
from services.inventory.service import InventoryService
from tests.integration.test_roost_up import Up, clean_env, data_dir
from tests.integration.test_roost_up import roost as roost_up
from tests.support.nats import nats_server
from tests.support.postgres import fresh_database, pool_on
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.nats, pytest.mark.postgres]
__all__ = ["data_dir", "nats_server"]       # the fixtures

SECRET = "s3cr3t-bmc-password-" + "q" * 20
ROOST = [sys.executable, "-m", "services.cli"]


@dataclass
class Roost:
    bus_url: str
    admin: str
    reader: str
    data_dir: Path
    service: InventoryService

    async def __call__(self, *args: str, role: str = "admin", input: str | None = None,
                       timeout: float = 90) -> subprocess.CompletedProcess[str]:
        token = self.admin if role == "admin" else self.reader
        argv = [*ROOST, "--data-dir", str(self.data_dir), "--bus-url", self.bus_url, "--token", token, *args]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
            start_new_session=True)          # no controlling terminal: a hidden prompt reads stdin
        try:
            out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else b""), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        result = subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())
        assert SECRET not in result.stdout + result.stderr, "the BMC password was printed"
        assert "Traceback" not in result.stderr, result.stderr
        return result

    async def json(self, *args: str) -> Any:
        r = await self(*args, "--json")
        return json.loads(r.stdout)


@pytest.fixture
async def roost(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Roost]:
    async with fresh_database() as url, pool_on(url) as pool:
        async with pool.acquire() as conn:
            admin = await create_token(conn, "operator", Role.ADMIN)
            reader = await create_token(conn, "viewer", Role.READER)
        service = InventoryService(go_enabled_timeout=1.0, lock_timeout=10.0,
                                   secrets=SecretStore(tmp_path / "secrets"))
        host = ServiceHost(service, load_settings(), Connections(nats_server.url, url), token=None)
        await host.start()
        try:
            yield Roost(nats_server.url, admin, reader, tmp_path / "data", service)
        finally:
            await host.stop(asyncio.get_running_loop().time() + 30)


def properties(text: str) -> dict[str, str]:
    """`roost host show`'s property/value lines."""
    return dict(line.split(None, 1) for line in text.splitlines()[1:] if len(line.split(None, 1)) == 2)


def state(host: dict[str, Any]) -> tuple[str, str, str]:
    return host["administrative"], host["operational"], host["availability"]


async def test_add_list_show_lock_unlock_delete(roost: Roost) -> None:
    added = await roost("host", "add", "--hostname", "worker-1", "--personality", "worker",
                        "--mgmt-mac", "52:54:00:AA:00:01", "--label", "zone=a", "--label", "sriov=on",
                        "--address", "mgmt=10.0.0.5", "--location", "rack 1")
    assert added.returncode == 0, added.stderr
    assert "worker-1" in added.stdout and "52:54:00:aa:00:01" in added.stdout and "sriov=on, zone=a" in added.stdout
    controller = await roost("host", "add", "--personality", "controller", "--mgmt-mac", "52:54:00:aa:00:00")
    assert controller.returncode == 0 and "controller-0" in controller.stdout, controller.stderr

    listed = await roost("host", "list", role="reader")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "HOSTNAME", "PERSONALITY", "ADMINISTRATIVE", "OPERATIONAL", "AVAILABILITY",
                                "TASK", "ACTIVE"]
    assert [line.split()[1:6] for line in lines[1:]] == [
        ["worker-1", "worker", "locked", "disabled", "offline"],
        ["controller-0", "controller", "locked", "disabled", "offline"]]
    only = await roost.json("host", "list", "--personality", "controller")
    assert [h["hostname"] for h in only["result"]["items"]] == ["controller-0"]

    shown = await roost("host", "show", "worker-1", role="reader")
    assert shown.returncode == 0, shown.stderr
    props = properties(shown.stdout)
    assert props["hostname"] == "worker-1" and props["location"] == "rack 1" and props["addresses"] == "mgmt=10.0.0.5"
    assert props["bm_type"] == "none"

    denied = await roost("host", "lock", "worker-1", role="reader")
    assert denied.returncode == 1 and "reader" in denied.stderr, denied.stderr
    offline = await roost("host", "unlock", "worker-1")
    assert offline.returncode == 1 and "not online" in offline.stderr, offline.stderr

    forced = await roost("host", "unlock", "worker-1", "--force", "--timeout", "60")
    assert forced.returncode == 0, forced.stderr
    assert "unlocking worker-1" in forced.stdout and "intest" in forced.stdout

    async def failed() -> bool:
        return state((await roost.json("host", "show", "worker-1"))["result"]) == ("unlocked", "disabled", "failed")

    await wait_until(failed, timeout=60, what="worker-1 failed its in-test checks (no agent)")
    locked = await roost("host", "lock", "worker-1")
    assert locked.returncode == 0, locked.stderr
    assert "locked" in locked.stdout and "no orchestrator is configured" in locked.stdout, locked.stdout
    assert state((await roost.json("host", "show", "worker-1"))["result"])[0] == "locked"

    for verb in ("reboot", "reset", "power-on", "power-off", "reinstall"):
        refused = await roost("host", verb, "worker-1")
        assert refused.returncode == 1, (verb, refused.stderr)
        assert f"roost.cmd.host.{verb.replace('-', '_')} rejected: Can not {verb} worker-1" in refused.stderr, (
            verb, refused.stderr)
    swact = await roost("host", "swact", "controller-0", "--force")
    assert swact.returncode == 1 and "locked" in swact.stderr, swact.stderr

    hardware = await roost("host", "hardware", "worker-1")
    assert hardware.returncode == 0 and "nothing reported yet" in hardware.stdout, hardware.stdout

    deleted = await roost("host", "delete", "worker-1")
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted worker-1", deleted.stderr
    gone = await roost("host", "show", "worker-1")
    assert gone.returncode == 1 and "no host" in gone.stderr


async def test_update_and_the_bmc_password_from_a_file(roost: Roost, tmp_path: Path) -> None:
    assert (await roost("host", "add", "--hostname", "worker-2", "--personality", "worker",
                        "--mgmt-mac", "52:54:00:aa:00:02", "--label", "zone=a")).returncode == 0
    updated = await roost.json("host", "update", "worker-2", "--label", "sriov=on", "--remove-label", "zone",
                               "--address", "oam=192.168.0.2", "--serial", "SN-2")
    host = updated["result"]
    assert host["labels"] == {"sriov": "on"} and host["addresses"] == {"oam": "192.168.0.2"}
    assert host["serial"] == "SN-2"

    password_file = tmp_path / "bmc-password"
    password_file.write_text(SECRET + "\n")
    with_bmc = await roost("host", "update", "worker-2", "--bmc-address", "https://10.10.10.3",
                           "--bmc-username", "root", "--bmc-password-file", str(password_file))
    assert with_bmc.returncode == 0, with_bmc.stderr
    props = properties(with_bmc.stdout)
    assert (props["bm_address"], props["bm_username"], props["bm_password"]) == ("https://10.10.10.3", "root", "set")
    from_stdin = await roost("host", "add", "--hostname", "worker-3", "--personality", "worker",
                             "--mgmt-mac", "52:54:00:aa:00:03", "--bmc-address", "https://10.10.10.4",
                             "--bmc-username", "root", "--bmc-password-file", "-", input=SECRET + "\n")
    assert from_stdin.returncode == 0 and properties(from_stdin.stdout)["bm_password"] == "set", from_stdin.stderr
    prompted = await roost("host", "add", "--hostname", "worker-6", "--personality", "worker", "--mgmt-mac",
                           "52:54:00:aa:00:06", "--bmc-address", "https://10.10.10.6", "--bmc-username", "root",
                           input=f"{SECRET}\n{SECRET}\n")         # asked twice, not echoed
    assert prompted.returncode == 0 and "BMC password" in prompted.stderr, prompted.stderr
    rotated = await roost.json("host", "update", "worker-6", "--bmc-password-file", str(password_file))
    assert rotated["result"]["bmc"]["password_set"] is True and rotated["result"]["bmc"]["username"] == "root"
    shown = await roost.json("host", "show", "worker-2")
    assert shown["result"]["bmc"]["address"] == "https://10.10.10.3" and "password" not in shown["result"]["bmc"]
    removed = await roost.json("host", "update", "worker-2", "--no-bmc")
    assert removed["result"]["bmc"] is None

    empty = tmp_path / "empty"
    empty.write_text("")
    bad = await roost("host", "add", "--hostname", "worker-4", "--personality", "worker", "--mgmt-mac",
                      "52:54:00:aa:00:04", "--bmc-address", "https://10.10.10.5", "--bmc-username", "root",
                      "--bmc-password-file", str(empty))
    assert bad.returncode == 2 and "empty" in bad.stderr, bad.stderr
    duplicate = await roost("host", "add", "--hostname", "worker-2", "--personality", "worker",
                            "--mgmt-mac", "52:54:00:aa:00:09")
    assert duplicate.returncode == 1 and "hostname already exists" in duplicate.stderr, duplicate.stderr
    invalid = await roost("host", "add", "--hostname", "worker-5", "--personality", "worker", "--mgmt-mac", "nope")
    assert invalid.returncode == 1 and "mgmt_mac" in invalid.stderr, invalid.stderr
    listed = {h["hostname"] for h in (await roost.json("host", "list"))["result"]["items"]}
    assert "worker-2" in listed and not {"worker-4", "worker-5"} & listed, "nothing refused was added"


def test_through_roost_up(data_dir: Path) -> None:
    """The real `roost up` (embedded NATS with a broker user per service and one for the `roost` command,
    embedded PostgreSQL): `roost host` finds the system from the data dir, with the local operator token."""
    up = Up(data_dir, clean_env())
    try:
        up.wait_ready()
        added = roost_up(data_dir, "host", "add", "--hostname", "worker-1", "--personality", "worker",
                         "--mgmt-mac", "52:54:00:bb:00:01", "--address", "mgmt=10.0.0.5")
        assert added.returncode == 0, added.stderr
        listed = roost_up(data_dir, "host", "list")
        assert listed.returncode == 0 and listed.stdout.splitlines()[1].split()[1:6] == [
            "worker-1", "worker", "locked", "disabled", "offline"], listed.stdout + listed.stderr
        unlock = roost_up(data_dir, "host", "unlock", "worker-1")
        assert unlock.returncode == 1 and "not online" in unlock.stderr, unlock.stderr
        assert "Traceback" not in unlock.stderr
        shown = roost_up(data_dir, "host", "show", "worker-1", "--json")
        assert json.loads(shown.stdout)["result"]["addresses"] == {"mgmt": "10.0.0.5"}
        deleted = roost_up(data_dir, "host", "delete", "worker-1")
        assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted worker-1", deleted.stderr
        assert roost_up(data_dir, "host", "list").stdout.strip() == "(none)"
        assert up.interrupt() == 0, up.stderr.read_text()[-3000:]
    finally:
        if up.process.poll() is None:
            up.process.kill()
