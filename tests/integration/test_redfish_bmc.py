"""``RedfishBmc`` against the real sushy-tools emulator (``sushy-emulator --fake``).

Two emulators per module: one with basic auth and several systems (so ``system_id`` matters), one with
a single system and no auth.  The fake driver applies a power change 1 to 11 seconds after accepting
it, so the power scenarios are started together, each on its own system, when the module begins
(``power_runs``), and each test awaits its own: the module takes about as long as the slowest one.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_asyncio
import structlog
from pydantic import SecretStr

from schemas.inventory import PowerState
from services.inventory.bmc.abc import (
    ActionReport,
    BmcAuthFailed,
    BmcBusy,
    BmcEndpoint,
    BmcError,
    BmcUnreachable,
    BmcUnsupported,
)
from services.inventory.bmc.audit import (
    BMC_AUTH_FAILED,
    BMC_UNREACHABLE,
    AuditTarget,
    audit_once,
    decide,
)
from services.inventory.bmc.redfish import RedfishBmc
from tests.support.sushy import FakeSystem, RewritingProxy, SushyEmulator, closed_port, running_sushy
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

USER = "admin"
PASSWORD = "S3cret-BMC-Passw0rd"
WRONG = "Wr0ng-BMC-Passw0rd"
LANDS = 30.0                     # the fake driver lands a power change within 11 s (the rest: a loaded machine)


def uuid(n: int) -> str:
    return f"11111111-0000-4000-8000-{n:012d}"


CONTROLLER = FakeSystem(uuid(1), "controller-0", "On", ("52:54:00:00:00:01", "52:54:00:00:01:01"),
                        drives=(("disk0", 480 * 1024**3),))
TO_POWER_OFF = FakeSystem(uuid(2), "worker-0", "On", ("52:54:00:00:00:02",))
TO_POWER_ON = FakeSystem(uuid(3), "worker-1", "Off", ("52:54:00:00:00:03",))
TO_RESET = FakeSystem(uuid(4), "worker-2", "On", ("52:54:00:00:00:04",))
TO_REBOOT = FakeSystem(uuid(5), "worker-3", "On", ("52:54:00:00:00:05",))
TO_REINSTALL = FakeSystem(uuid(6), "worker-4", "On", ("52:54:00:00:00:06",))
TO_RESET_TWICE = FakeSystem(uuid(7), "worker-5", "On", ("52:54:00:00:00:07",))
TO_FORCE_OFF = FakeSystem(uuid(8), "worker-6", "On", ("52:54:00:00:00:08",))
BEHIND_PROXY = FakeSystem(uuid(9), "worker-7", "Off", ("52:54:00:00:00:09",))
SYSTEMS = (CONTROLLER, TO_POWER_OFF, TO_POWER_ON, TO_RESET, TO_REBOOT, TO_REINSTALL, TO_RESET_TWICE, TO_FORCE_OFF,
           BEHIND_PROXY)
LONELY = FakeSystem("22222222-0000-4000-8000-000000000001", "storage-0", "Off", ("52:54:00:00:02:01",))


@pytest.fixture(scope="module")
def sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyEmulator]:
    with running_sushy(tmp_path_factory.mktemp("sushy"), SYSTEMS, credentials=(USER, PASSWORD)) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def tls_sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyEmulator]:
    with running_sushy(tmp_path_factory.mktemp("sushy-tls"), (LONELY,), tls=True) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def lonely_sushy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SushyEmulator]:
    with running_sushy(tmp_path_factory.mktemp("sushy-one"), (LONELY,)) as emulator:
        yield emulator


def endpoint(emulator: SushyEmulator, system: FakeSystem | None = None, *, system_id: str | None = None,
             password: str = PASSWORD) -> BmcEndpoint:
    return BmcEndpoint(address=emulator.url, username=USER, password=SecretStr(password),
                       system_id=system_id if system_id is not None else (system.uuid if system else None),
                       timeout=3.0)


def fast(ep: BmcEndpoint, **kwargs: Any) -> RedfishBmc:
    return RedfishBmc(ep, poll_interval=0.2, **{"graceful_timeout": LANDS, **kwargs})


async def power_on_reaches(bmc: RedfishBmc, wanted: PowerState, seconds: float = LANDS) -> None:
    async def reached() -> bool:
        return await bmc.power_state() == wanted
    await wait_until(reached, seconds, what=f"power {wanted}")


def read_power(emulator: SushyEmulator, system: FakeSystem) -> str:
    return str(emulator.get(f"/redfish/v1/Systems/{system.uuid}")["PowerState"])


# -- the power scenarios, started together --------------------------------------------------------------


async def reset_then_observe(sushy: SushyEmulator) -> tuple[ActionReport, str | None, PowerState, str | None]:
    """ForceRestart without waiting: Off at once, On later; in progress until On is seen."""
    bmc = fast(endpoint(sushy, TO_RESET))
    report = await bmc.perform("reset")
    in_progress = bmc.action_in_progress
    await power_on_reaches(bmc, "on")
    final = await bmc.power_state()
    after = bmc.action_in_progress
    await bmc.close()
    return report, in_progress, final, after


async def reset_during_reset(sushy: SushyEmulator) -> dict[str, Any]:
    bmc = fast(endpoint(sushy, TO_RESET_TWICE))
    seen: dict[str, Any] = {}
    first = asyncio.create_task(bmc.perform("reset", wait=LANDS))
    await wait_until(lambda: bmc.action_in_progress == "reset", 5, what="the first reset to start")
    for second in ("reset", "reboot", "power-off"):
        try:
            await bmc.perform(second)
        except BmcBusy as exc:
            seen[f"while running: {second}"] = str(exc)
    seen["first"] = await first
    seen["after the first"] = bmc.action_in_progress
    # sent without waiting: still in progress until the power is seen on again
    seen["second"] = await bmc.perform("reset")
    try:
        await bmc.perform("reset")
    except BmcBusy as exc:
        seen["while settling: reset"] = str(exc)
    await power_on_reaches(bmc, "on")
    seen["third"] = await bmc.perform("power-on")          # landed: not busy; already on: nothing sent
    await bmc.close()
    return seen


async def force_off_after_grace(sushy: SushyEmulator) -> ActionReport:
    """A host whose OS ignores the graceful shutdown (a proxy shows its power on until a ForceOff goes
    through): after ``graceful_timeout``, ForceOff."""
    def ignores_graceful(path: str, document: dict[str, Any]) -> dict[str, Any] | None:
        forced = any(b"ForceOff" in body for _, _, body in proxy.requests)
        if path.rstrip("/") == f"/redfish/v1/Systems/{TO_FORCE_OFF.uuid}" and not forced:
            return {**document, "PowerState": "On"}
        return None

    with RewritingProxy(sushy.url, ignores_graceful) as proxy:
        bmc = fast(replace(endpoint(sushy, TO_FORCE_OFF), address=proxy.url), graceful_timeout=1.0)
        try:
            return await bmc.perform("power-off", wait=LANDS)
        finally:
            await bmc.close()


async def one_action(sushy: SushyEmulator, system: FakeSystem, action: Any) -> ActionReport:
    bmc = fast(endpoint(sushy, system))
    try:
        return await bmc.perform(action, wait=LANDS)
    finally:
        await bmc.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def power_runs(sushy: SushyEmulator) -> AsyncIterator[dict[str, asyncio.Task[Any]]]:
    scenarios: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "power-off": lambda: one_action(sushy, TO_POWER_OFF, "power-off"),
        "power-on": lambda: one_action(sushy, TO_POWER_ON, "power-on"),
        "reboot": lambda: one_action(sushy, TO_REBOOT, "reboot"),
        "reinstall": lambda: one_action(sushy, TO_REINSTALL, "reinstall"),
        "reset": lambda: reset_then_observe(sushy),
        "reset during reset": lambda: reset_during_reset(sushy),
        "force-off": lambda: force_off_after_grace(sushy),
    }
    tasks = {name: asyncio.create_task(make(), name=name) for name, make in scenarios.items()}
    yield tasks
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


# -- the rest, run while the power scenarios are under way ------------------------------------------------


async def test_check(sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(sushy, CONTROLLER))
    system = await bmc.check()
    await bmc.close()
    assert system.system_id == CONTROLLER.uuid
    assert system.power_state == "on"
    assert system.manufacturer == "Sushy Emulator"
    assert system.macs == CONTROLLER.macs
    assert {"On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart"} <= set(system.reset_types)


async def test_system_by_name_follows_the_redirect(sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(sushy, system_id="controller-0"))
    assert (await bmc.check()).system_id == CONTROLLER.uuid
    assert await bmc.power_state() == "on"
    await bmc.close()


async def test_several_systems_need_a_system_id(sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(sushy))
    with pytest.raises(BmcError, match=f"it has {len(SYSTEMS)} systems .*set the BMC's system id") as caught:
        await bmc.check()
    assert type(caught.value) is BmcError
    with pytest.raises(BmcError, match="it has no system 'nope'"):
        await RedfishBmc(endpoint(sushy, system_id="nope")).check()


async def test_the_only_system_needs_no_system_id(lonely_sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(lonely_sushy))
    system = await bmc.check()
    assert system.system_id == LONELY.uuid and system.power_state == "off" and system.macs == LONELY.macs
    await bmc.close()


async def test_wrong_password(sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(sushy, CONTROLLER, password=WRONG))
    with pytest.raises(BmcAuthFailed, match="refuses the credentials of user 'admin'"):
        await bmc.check()
    with pytest.raises(BmcAuthFailed):
        await bmc.perform("reset")
    assert bmc.action_in_progress is None, "a refused action leaves nothing in progress"


async def test_unreachable_bmc_fails_quickly() -> None:
    bmc = RedfishBmc(BmcEndpoint(address=f"http://127.0.0.1:{closed_port()}", username=USER,
                                 password=SecretStr(PASSWORD), timeout=2.0))
    started = time.monotonic()
    with pytest.raises(BmcUnreachable, match="does not answer: connection refused"):
        await bmc.check()
    assert time.monotonic() - started < 5, "one retry after a second, no more"
    with pytest.raises(BmcUnreachable):
        await bmc.perform("power-on")


async def test_a_bmc_that_accepts_and_never_answers_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)                      # connections complete in the kernel; nothing ever answers
        bmc = RedfishBmc(BmcEndpoint(address=f"http://127.0.0.1:{silent.getsockname()[1]}", username=USER,
                                     password=SecretStr(PASSWORD), timeout=0.5))
        started = time.monotonic()
        with pytest.raises(BmcUnreachable, match=r"does not answer: no answer within 0\.5s"):
            await bmc.check()
        assert time.monotonic() - started < 4


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
async def test_tls_is_verified_unless_told_not_to(tls_sushy: SushyEmulator,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_sushy.url.startswith("https://") and tls_sushy.certificate is not None
    with pytest.raises(BmcUnreachable, match="its TLS certificate is not trusted"):
        await RedfishBmc(endpoint(tls_sushy)).check()
    unverified = RedfishBmc(replace(endpoint(tls_sushy), verify_tls=False))
    assert (await unverified.check()).system_id == LONELY.uuid
    await unverified.close()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_sushy.certificate))     # a site CA bundle
    trusted = RedfishBmc(endpoint(tls_sushy))
    assert (await trusted.check()).system_id == LONELY.uuid
    await trusted.close()


async def test_unsupported_reset_types(sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(sushy, CONTROLLER))
    with pytest.raises(BmcUnsupported, match="does not offer reset type PowerCycle"):
        await bmc.send_reset("PowerCycle")                 # not advertised: never sent
    with pytest.raises(BmcUnsupported, match="HTTP 501"):
        await bmc.send_reset("Nmi")                        # advertised, answered 501 by the fake driver
    assert await bmc.power_state() == "on"
    await bmc.close()


RESET_INFO = f"/redfish/v1/Systems/{BEHIND_PROXY.uuid}/ResetActionInfo"


def offers_less(path: str, document: dict[str, Any]) -> dict[str, Any] | None:
    """Only ForceOn and GracefulRestart, listed in an ActionInfo rather than inline; no Boot."""
    if path.rstrip("/") != f"/redfish/v1/Systems/{BEHIND_PROXY.uuid}":
        return None
    reset = document["Actions"]["#ComputerSystem.Reset"]
    del reset["ResetType@Redfish.AllowableValues"]
    reset["@Redfish.ActionInfo"] = RESET_INFO
    del document["Boot"]
    return document


async def test_a_bmc_that_offers_less(sushy: SushyEmulator) -> None:
    info = {"@odata.id": RESET_INFO, "Id": "ResetActionInfo", "Name": "Reset Action Info",
            "Parameters": [{"Name": "ResetType", "Required": True, "DataType": "String",
                            "AllowableValues": ["ForceOn", "GracefulRestart"]}]}
    made: list[RedfishBmc] = []
    with RewritingProxy(sushy.url, offers_less, {RESET_INFO: info}) as proxy:
        def bmc() -> RedfishBmc:                 # a fresh one each time: each action stays in progress
            made.append(RedfishBmc(replace(endpoint(sushy, BEHIND_PROXY), address=proxy.url)))
            return made[-1]

        assert (await bmc().check()).reset_types == ("ForceOn", "GracefulRestart")
        assert (await bmc().perform("power-on")).sent == ("ForceOn",), "On is not offered: its pair"
        assert (await bmc().perform("reset")).sent == ("GracefulRestart",), "ForceRestart is not offered"
        assert (await bmc().perform("reboot")).sent == ("GracefulRestart",)
        with pytest.raises(BmcUnsupported, match="does not offer reset type ForceOff"):
            await bmc().send_reset("ForceOff")
        refused = bmc()
        with pytest.raises(BmcUnsupported, match="no Boot settings"):
            await refused.perform("reinstall")
        assert refused.action_in_progress is None, "nothing was sent"
        for each in made:
            await each.close()


async def test_hardware_is_what_the_bmc_offers(sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(sushy, CONTROLLER))
    hardware = await bmc.hardware()
    await bmc.close()
    assert hardware.source == "redfish" and hardware.reported_at is not None
    assert [p.mac for p in hardware.ports] == list(CONTROLLER.macs)
    assert all(p.link == "unknown" and p.speed_mbps is None for p in hardware.ports)
    assert [(d.device_node, d.size_mib, d.type) for d in hardware.disks] == [("disk0", 480 * 1024, "HDD")]
    assert hardware.cpus == [] and hardware.memory is None, "the fake driver has no CPU count and no memory"


async def test_hardware_without_storage(lonely_sushy: SushyEmulator) -> None:
    bmc = RedfishBmc(endpoint(lonely_sushy))
    hardware = await bmc.hardware()               # Storage answers 500 here, Memory 404: left out
    await bmc.close()
    assert [p.mac for p in hardware.ports] == list(LONELY.macs) and hardware.disks == []


async def test_the_audit_over_real_bmcs(sushy: SushyEmulator) -> None:
    targets = [AuditTarget(uuid(1), "controller-0", endpoint(sushy, CONTROLLER)),
               AuditTarget(uuid(2), "controller-1", endpoint(sushy, TO_POWER_OFF, password=WRONG)),
               AuditTarget(uuid(3), "worker-9", BmcEndpoint(address=f"http://127.0.0.1:{closed_port()}",
                                                            username=USER, password=SecretStr(PASSWORD),
                                                            timeout=2.0))]
    results = await audit_once(targets, RedfishBmc, timeout=10)
    assert [r.outcome for r in results] == ["ok", "auth-failed", "unreachable"]
    assert [[s.alarm_id for s in decide(r).sets] for r in results] == [[], [BMC_AUTH_FAILED], [BMC_UNREACHABLE]]
    assert results[0].system is not None and results[0].system.system_id == CONTROLLER.uuid


@pytest.mark.filterwarnings("ignore:Service incorrectly responded with HTTP 401")
async def test_the_password_is_never_logged_or_shown(sushy: SushyEmulator, caplog: pytest.LogCaptureFixture,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("redfish", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    shown: list[str] = []
    with structlog.testing.capture_logs() as ours:
        good = RedfishBmc(endpoint(sushy, CONTROLLER))
        shown += [repr(good), repr(good.endpoint), str(await good.check())]
        await good.hardware()
        try:
            await good.send_reset("Nmi")
        except BmcError as exc:
            shown += [str(exc), repr(exc)]
        await good.close()
        for password, address in ((PASSWORD, "http://127.0.0.1:1"), (PASSWORD, sushy.url + "/nowhere"),
                                  (WRONG, sushy.url)):
            bad = RedfishBmc(BmcEndpoint(address=address, username=USER, password=SecretStr(password),
                                         system_id=CONTROLLER.uuid, timeout=2.0))
            shown.append(repr(bad))
            try:
                await bad.check()
            except BmcError as exc:
                shown += [str(exc), repr(exc), repr(exc.__cause__), repr(exc.__context__)]
        with pytest.raises(BmcError) as caught:
            RedfishBmc(BmcEndpoint(address=f"http://{USER}:{PASSWORD}@127.0.0.1:1", username=USER,
                                   password=SecretStr(PASSWORD)))
        shown.append(str(caught.value))
    logged = caplog.text + capsys.readouterr().out + "\n".join(map(str, ours)) + "\n".join(
        str(r.args) for r in caplog.records)
    assert "redfish" in caplog.text or ours, "the logs were captured"
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    wrong = base64.b64encode(f"{USER}:{WRONG}".encode()).decode()
    for secret in (PASSWORD, WRONG, basic, wrong):
        assert secret not in logged
        assert not [s for s in shown if secret in s], shown


# -- the power scenarios' outcomes (started with the module, awaited last) ---------------------------------


async def test_power_off_lands_seconds_later(power_runs: dict[str, asyncio.Task[Any]], sushy: SushyEmulator) -> None:
    report = await power_runs["power-off"]
    assert report.sent == ("GracefulShutdown",) and report.power_state == "off"
    assert read_power(sushy, TO_POWER_OFF) == "Off"


async def test_power_off_forces_when_the_grace_runs_out(power_runs: dict[str, asyncio.Task[Any]]) -> None:
    report = await power_runs["force-off"]
    assert report.sent == ("GracefulShutdown", "ForceOff") and report.power_state == "off"


async def test_power_on(power_runs: dict[str, asyncio.Task[Any]], sushy: SushyEmulator) -> None:
    report = await power_runs["power-on"]
    assert report.sent == ("On",) and report.power_state == "on"
    assert read_power(sushy, TO_POWER_ON) == "On"


async def test_reset_is_off_at_once_then_on(power_runs: dict[str, asyncio.Task[Any]]) -> None:
    report, in_progress, final, after = await power_runs["reset"]
    assert report.sent == ("ForceRestart",)
    assert report.power_state == "off", "ForceRestart shows Off at once"
    assert in_progress == "reset"
    assert final == "on" and after is None


async def test_reboot_is_graceful(power_runs: dict[str, asyncio.Task[Any]]) -> None:
    report = await power_runs["reboot"]
    assert report.sent == ("GracefulRestart",) and report.power_state == "on"


async def test_reinstall_boots_from_the_network(power_runs: dict[str, asyncio.Task[Any]],
                                                sushy: SushyEmulator) -> None:
    report = await power_runs["reinstall"]
    assert report.sent == ("ForceRestart",) and report.power_state == "on"
    boot = sushy.get(f"/redfish/v1/Systems/{TO_REINSTALL.uuid}")["Boot"]
    assert boot["BootSourceOverrideTarget"] == "Pxe"


async def test_a_reset_during_a_reset_is_refused(power_runs: dict[str, asyncio.Task[Any]]) -> None:
    seen = await power_runs["reset during reset"]
    for second in ("reset", "reboot", "power-off"):
        message = seen[f"while running: {second}"]
        assert "a reset is in progress" in message and f"{second} refused" in message, message
    assert seen["first"].sent == ("ForceRestart",) and seen["first"].power_state == "on"
    assert seen["after the first"] is None, "the first reset landed: nothing in progress"
    assert seen["second"].sent == ("ForceRestart",)
    assert "a reset is in progress" in seen["while settling: reset"], "sent, not yet seen to land: still busy"
    assert seen["third"].sent == () and seen["third"].power_state == "on"
