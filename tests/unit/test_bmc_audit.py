"""The BMC audit: which alarms a round raises and clears (pure), and a round over many BMCs at once where a
hanging BMC costs only its own timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import SecretStr

from schemas.inventory import Hardware, PowerState
from services.alarms.catalogue import Severity, roost_catalogue
from services.alarms.model import EntityInstanceId
from services.inventory.bmc.abc import (
    ActionReport,
    BmcActionName,
    BmcAuthFailed,
    BmcEndpoint,
    BmcError,
    BmcSystem,
    BmcUnreachable,
)
from services.inventory.bmc.audit import (
    BMC_AUTH_FAILED,
    BMC_UNREACHABLE,
    AlarmClear,
    AlarmSet,
    AuditResult,
    AuditTarget,
    audit_once,
    bmc_entity,
    bmc_name,
    classify,
    decide,
    decide_all,
    forget,
)

ENTITY = "host=controller-0.bmc=10.0.0.3"


def result(outcome: str = "ok", message: str = "", *, hostname: str = "controller-0",
           address: str = "https://10.0.0.3", uuid: str = "u-1") -> AuditResult:
    return AuditResult(host_uuid=uuid, hostname=hostname, address=address, outcome=outcome,  # type: ignore[arg-type]
                       message=message)


UNREACHABLE = result("unreachable", "BMC https://10.0.0.3 does not answer: connection refused")
TIMED_OUT = result("unreachable", "no answer within 30s")
REFUSED = result("auth-failed", "BMC https://10.0.0.3 refuses the credentials of user 'root' (HTTP 401)")
OK = result()


def ids(decision_part: tuple[AlarmSet, ...] | tuple[AlarmClear, ...]) -> list[tuple[str, str]]:
    return [(a.alarm_id, a.entity_instance_id) for a in decision_part]


# -- the entity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "name"), [
    ("https://10.0.0.3", "10.0.0.3"),
    ("http://10.0.0.3:8000/", "10.0.0.3"),
    ("https://bmc-7.lab.example.com:8443", "bmc-7-lab-example-com"),
    ("https://[fd00::3]", "fd00-3"),
    ("https://idrac_01", "idrac_01"),
    ("", "redfish"),
])
def test_the_bmc_part_of_the_entity(address: str, name: str) -> None:
    assert bmc_name(address) == name
    entity = bmc_entity("worker-3", address)
    parsed = EntityInstanceId.parse(entity)
    assert str(parsed) == entity
    assert parsed.segments == (("host", "worker-3"), ("bmc", name))


def test_the_alarms_are_in_the_catalogue_as_used() -> None:
    catalogue = roost_catalogue()
    for alarm_id in (BMC_UNREACHABLE, BMC_AUTH_FAILED):
        definition = catalogue.alarm(alarm_id)
        assert definition.allows(Severity.MAJOR)
        assert "host=<hostname>.bmc=<bmc>" in str(definition.entity_instance_id.model_dump())


# -- decisions --------------------------------------------------------------------------------------------


def test_first_round_sets_what_holds_and_clears_the_other() -> None:
    decision = decide(UNREACHABLE)
    assert ids(decision.sets) == [(BMC_UNREACHABLE, ENTITY)]
    assert ids(decision.clears) == [(BMC_AUTH_FAILED, ENTITY)]
    assert decision.sets[0].severity == "major"
    assert decision.sets[0].reason_text == ("The BMC of controller-0 does not answer: BMC https://10.0.0.3 does not "
                                            "answer: connection refused")
    assert decision.reachable is False and decision.last_error == UNREACHABLE.message

    refused = decide(REFUSED)
    assert ids(refused.sets) == [(BMC_AUTH_FAILED, ENTITY)] and ids(refused.clears) == [(BMC_UNREACHABLE, ENTITY)]
    assert refused.sets[0].reason_text.startswith("The BMC of controller-0 refuses the configured credentials: ")

    fine = decide(OK)
    assert fine.sets == () and ids(fine.clears) == [(BMC_UNREACHABLE, ENTITY), (BMC_AUTH_FAILED, ENTITY)]
    assert fine.reachable is True and fine.last_error is None


def test_a_fixed_bmc_clears_its_alarm() -> None:
    assert ids(decide(OK, UNREACHABLE).clears) == [(BMC_UNREACHABLE, ENTITY)]
    assert decide(OK, UNREACHABLE).sets == ()
    assert ids(decide(OK, REFUSED).clears) == [(BMC_AUTH_FAILED, ENTITY)]


def test_a_changed_fault_swaps_the_alarms() -> None:
    swap = decide(REFUSED, UNREACHABLE)
    assert ids(swap.clears) == [(BMC_UNREACHABLE, ENTITY)] and ids(swap.sets) == [(BMC_AUTH_FAILED, ENTITY)]
    back = decide(UNREACHABLE, REFUSED)
    assert ids(back.clears) == [(BMC_AUTH_FAILED, ENTITY)] and ids(back.sets) == [(BMC_UNREACHABLE, ENTITY)]
    assert back.payloads()[0][0] == "roost.fault.clear", "the old alarm goes first"


def test_an_unchanged_verdict_publishes_nothing() -> None:
    assert not decide(OK, OK).changed
    assert not decide(UNREACHABLE, UNREACHABLE).changed
    assert not decide(REFUSED, REFUSED).changed


def test_a_new_reason_re_sets_the_same_alarm() -> None:
    decision = decide(TIMED_OUT, UNREACHABLE)
    assert decision.clears == () and ids(decision.sets) == [(BMC_UNREACHABLE, ENTITY)]
    assert decision.sets[0].reason_text.endswith("no answer within 30s")


def test_a_new_address_clears_the_old_entity() -> None:
    moved = result("unreachable", "no answer within 30s", address="https://10.0.0.4")
    decision = decide(moved, UNREACHABLE)
    new_entity = "host=controller-0.bmc=10.0.0.4"
    assert ids(decision.clears) == [(BMC_UNREACHABLE, ENTITY), (BMC_AUTH_FAILED, new_entity)]
    assert ids(decision.sets) == [(BMC_UNREACHABLE, new_entity)]
    fixed_by_moving = decide(result(address="https://10.0.0.4"), REFUSED)
    assert (BMC_AUTH_FAILED, ENTITY) in ids(fixed_by_moving.clears) and fixed_by_moving.sets == ()


def test_a_removed_bmc_clears_both() -> None:
    assert ids(forget(REFUSED).clears) == [(BMC_UNREACHABLE, ENTITY), (BMC_AUTH_FAILED, ENTITY)]


def test_a_round_of_decisions() -> None:
    previous = {"u-1": UNREACHABLE, "u-2": result(uuid="u-2", hostname="worker-1"),
                "u-3": result("auth-failed", "x", uuid="u-3", hostname="worker-2")}
    now = [result(uuid="u-1"), result(uuid="u-2", hostname="worker-1")]
    decisions, kept = decide_all(now, previous)
    assert set(decisions) == {"u-1", "u-3"}, "u-2 is unchanged; u-3 left the audit"
    assert ids(decisions["u-1"].clears) == [(BMC_UNREACHABLE, ENTITY)]
    assert ids(decisions["u-3"].clears) == [(BMC_UNREACHABLE, "host=worker-2.bmc=10.0.0.3"),
                                            (BMC_AUTH_FAILED, "host=worker-2.bmc=10.0.0.3")]
    assert set(kept) == {"u-1", "u-2"}


def test_payloads_are_valid_fault_messages() -> None:
    long = result("unreachable", "x" * 400)
    decision = decide(long)
    assert [kind for kind, _ in decision.payloads()] == ["roost.fault.clear", "roost.fault.set"]
    assert decision.sets[0].fault().alarm_id == BMC_UNREACHABLE
    assert len(decision.sets[0].fault().reason_text) == 255
    assert decision.clears[0].fault().entity_instance_id == ENTITY


def test_classify() -> None:
    assert classify(None) == ("ok", "")
    assert classify(BmcAuthFailed("refused")) == ("auth-failed", "refused")
    assert classify(BmcUnreachable("down")) == ("unreachable", "down")
    assert classify(BmcError("two systems")) == ("unreachable", "two systems")
    assert classify(TimeoutError(), timeout=2.5) == ("unreachable", "no answer within 2.5s")
    assert classify(RuntimeError("password=hunter2-hunter2")) == ("unreachable", "the check failed: RuntimeError")


# -- one round over many BMCs -------------------------------------------------------------------------------


class FakeBmc:
    """A Bmc whose check() behaves as its address says: ok, refused, down, or hanging forever."""

    running = 0
    most = 0

    def __init__(self, endpoint: BmcEndpoint) -> None:
        self.endpoint = endpoint
        self.closed = False
        if "broken" in endpoint.address:
            raise BmcError("BMC address 'broken' is not an http(s)://host[:port] URL")

    async def check(self) -> BmcSystem:
        FakeBmc.running += 1
        FakeBmc.most = max(FakeBmc.most, FakeBmc.running)
        try:
            await asyncio.sleep(0.05)
            if "hang" in self.endpoint.address:
                await asyncio.Event().wait()
            if "refused" in self.endpoint.address:
                raise BmcAuthFailed(f"BMC {self.endpoint.address} refuses the credentials of user 'root' (HTTP 401)")
            if "down" in self.endpoint.address:
                raise BmcUnreachable(f"BMC {self.endpoint.address} does not answer: connection refused")
            return BmcSystem(system_id="1", power_state="on")
        finally:
            FakeBmc.running -= 1

    async def power_state(self) -> PowerState:
        return "on"

    async def perform(self, action: BmcActionName, *, wait: float | None = None) -> ActionReport:
        return ActionReport(action=action, sent=(), power_state="on")

    async def hardware(self) -> Hardware:
        return Hardware(source="redfish")

    async def close(self) -> None:
        self.closed = True


def target(n: int, kind: str) -> AuditTarget:
    return AuditTarget(host_uuid=f"u-{n}", hostname=f"worker-{n}",
                       endpoint=BmcEndpoint(address=f"https://{kind}-{n}", username="root",
                                            password=SecretStr("pw-never-shown")))


async def test_a_hanging_bmc_costs_only_its_timeout() -> None:
    FakeBmc.running = FakeBmc.most = 0
    made: list[FakeBmc] = []

    def factory(endpoint: BmcEndpoint) -> FakeBmc:
        bmc = FakeBmc(endpoint)
        made.append(bmc)
        return bmc

    kinds = ["hang", "ok", "refused", "down", "broken"] + ["ok"] * 10
    targets = [target(i, kind) for i, kind in enumerate(kinds)]
    started = time.monotonic()
    results = await audit_once(targets, factory, concurrency=4, timeout=0.5)
    elapsed = time.monotonic() - started
    assert [r.host_uuid for r in results] == [t.host_uuid for t in targets], "in the order of the targets"
    assert [r.outcome for r in results[:5]] == ["unreachable", "ok", "auth-failed", "unreachable", "unreachable"]
    assert results[0].message == "no answer within 0.5s"
    assert results[4].message.startswith("BMC address 'broken'")
    assert all(r.outcome == "ok" for r in results[5:])
    assert elapsed < 1.5, f"the hanging BMC held one slot for 0.5 s; the round took {elapsed:.2f}s"
    assert max(r.elapsed for r in results[1:]) < 0.5
    assert FakeBmc.most <= 4
    assert all(b.closed for b in made)
    assert len(made) == len(targets) - 1, "the broken one was never made"


async def test_many_hanging_bmcs_take_timeout_per_slot() -> None:
    targets = [target(i, "hang") for i in range(4)] + [target(9, "ok")]
    started = time.monotonic()
    results = await audit_once(targets, FakeBmc, concurrency=4, timeout=0.3)
    assert [r.outcome for r in results] == ["unreachable"] * 4 + ["ok"]
    assert time.monotonic() - started < 1.0


async def test_shared_bmcs_are_not_closed() -> None:
    shared = FakeBmc(target(1, "ok").endpoint)
    await audit_once([target(1, "ok")], lambda _: shared, close=False)
    assert not shared.closed


async def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await audit_once([], FakeBmc, concurrency=0)
