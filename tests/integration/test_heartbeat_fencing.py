"""Fencing a controller through the sushy-tools Redfish emulator (issue 5, test item 3): the BMC access
arrives sealed, as inventory announces it; ForceOff lands and the power state reads back Off; a BMC that
does not answer, refuses the credentials or is unknown is a failed fence with the reason, in bounded time;
no password in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from pydantic import SecretStr

from schemas.inventory import BmcAccess
from services.heartbeat.fencing import Fencer
from services.inventory.bmc.abc import BmcEndpoint
from services.inventory.bmc.redfish import RedfishBmc
from services.inventory.bmc.vault import FencingSealer, new_key
from tests.support.sushy import FakeSystem, SushyEmulator, closed_port, running_sushy

pytestmark = [pytest.mark.slow]

USER, PASSWORD = "root", "fence-Pa55-" + "z" * 12
CONTROLLER_0 = FakeSystem("44444444-0000-4000-8000-000000000000", "controller-0", "On", ("52:54:00:20:00:00",))
CONTROLLER_1 = FakeSystem("44444444-0000-4000-8000-000000000001", "controller-1", "Off", ("52:54:00:20:00:01",))
HOST_UUID = {"controller-0": "u-c0", "controller-1": "u-c1"}


@pytest.fixture(scope="module")
def sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyEmulator]:
    with running_sushy(tmp_path_factory.mktemp("sushy-fencing"), (CONTROLLER_0, CONTROLLER_1),
                       credentials=(USER, PASSWORD)) as emulator:
        yield emulator


@contextlib.asynccontextmanager
async def silent_bmc() -> AsyncIterator[str]:
    """A BMC address that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


SEALER = FencingSealer(new_key())


def access(hostname: str, address: str, system: FakeSystem | None, *, version: int = 1,
           password: str = PASSWORD) -> BmcAccess:
    endpoint = BmcEndpoint(address, USER, SecretStr(password), system.uuid if system else None)
    key_id, sealed = SEALER.seal(HOST_UUID[hostname], endpoint)
    return BmcAccess(entity_id=HOST_UUID[hostname], version=version, hostname=hostname, key_id=key_id, sealed=sealed)


async def power(sushy: SushyEmulator, system: FakeSystem) -> str:
    bmc = RedfishBmc(BmcEndpoint(sushy.url, USER, SecretStr(PASSWORD), system.uuid))
    try:
        return await bmc.power_state()
    finally:
        await bmc.close()


async def test_fencing_forces_the_controller_off_and_reads_it_back(sushy: SushyEmulator) -> None:
    fencer = Fencer(SEALER, timeout=20.0)
    fencer.learn(access("controller-0", sushy.url, CONTROLLER_0))
    assert fencer.known() == ["controller-0"]
    assert await power(sushy, CONTROLLER_0) == "on"
    with structlog.testing.capture_logs() as logs:
        result = await fencer.fence("controller-0")
    assert result.ok, result.detail
    assert result.detail == "ForceOff sent, power state read back as Off"
    assert await power(sushy, CONTROLLER_0) == "off"
    assert "ComputerSystem.Reset" in sushy.log()
    assert PASSWORD not in repr(logs)

    again = await fencer.fence("controller-0")
    assert again.ok and again.detail == "the power state reads Off already"


async def test_a_controller_already_off_is_fenced_without_a_reset(sushy: SushyEmulator) -> None:
    fencer = Fencer(SEALER)
    fencer.learn(access("controller-1", sushy.url, CONTROLLER_1))
    resets = sushy.log().count("ComputerSystem.Reset")
    result = await fencer.fence("controller-1")
    assert result.ok and result.detail == "the power state reads Off already"
    assert sushy.log().count("ComputerSystem.Reset") == resets


async def test_a_bmc_that_does_not_answer_is_a_failed_fence_in_bounded_time() -> None:
    fencer = Fencer(SEALER, timeout=3.0, request_timeout=1.0)
    async with silent_bmc() as address:
        fencer.learn(access("controller-0", address, None))
        started = time.monotonic()
        result = await fencer.fence("controller-0")
    assert not result.ok and time.monotonic() - started < 6.0
    assert "controller-0" in result.detail, result.detail


async def test_unreachable_refused_and_unknown_bmcs_are_failed_fences(sushy: SushyEmulator) -> None:
    fencer = Fencer(SEALER, timeout=10.0, request_timeout=2.0)
    unknown = await fencer.fence("controller-1")
    assert not unknown.ok and "no BMC is known for controller-1" in unknown.detail

    fencer.learn(access("controller-0", f"http://127.0.0.1:{closed_port()}", CONTROLLER_0))
    refused = await fencer.fence("controller-0")
    assert not refused.ok and "BMC" in refused.detail

    fencer.learn(access("controller-0", sushy.url, CONTROLLER_0, version=2, password="not-the-password"))
    with structlog.testing.capture_logs() as logs:
        wrong = await fencer.fence("controller-0")
    assert not wrong.ok and ("credentials" in wrong.detail.lower() or "401" in wrong.detail), wrong.detail
    assert "not-the-password" not in repr(logs)

    fencer.learn(access("controller-0", sushy.url, CONTROLLER_0, version=1))       # older: ignored
    assert not (await fencer.fence("controller-0")).ok
    removed = BmcAccess(entity_id="u-c0", version=3, hostname="controller-0", key_id=SEALER.key_id, sealed="")
    fencer.learn(removed)
    assert fencer.known() == []


def test_a_sealed_access_of_another_key_is_not_learned() -> None:
    other = FencingSealer(new_key())
    endpoint = BmcEndpoint("http://127.0.0.1:1", USER, SecretStr(PASSWORD))
    key_id, sealed = other.seal("u-c0", endpoint)
    fencer = Fencer(SEALER)
    fencer.learn(BmcAccess(entity_id="u-c0", version=1, hostname="controller-0", key_id=key_id, sealed=sealed))
    assert fencer.known() == []
