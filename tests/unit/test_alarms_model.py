"""Alarm instances, pure: entity ids, set / clear / re-assert decisions, hierarchical and operator suppression."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.alarms.catalogue import (
    AlarmError,
    AlarmType,
    Catalogue,
    NotAnAlarm,
    Severity,
    UnknownAlarmId,
    roost_catalogue,
)
from services.alarms.model import (
    REASON_MAX,
    Alarm,
    AlarmKey,
    AlarmState,
    Change,
    ClearRequest,
    EntityInstanceId,
    FieldChange,
    InvalidSeverity,
    LogRequest,
    MalformedEntityId,
    SetRequest,
    SuppressionStatus,
    check_log,
    decide_clear,
    decide_reassert,
    decide_set,
    masked,
    masked_keys,
    suppression_status,
    visible,
)

STARLINGX_EVENTS = Path(__file__).resolve().parents[2] / ".." / "shared" / "starlingx-fault" / "events.yaml"
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])   # a loaded 2-core machine
NOW = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
ROOST = roost_catalogue()


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    if not STARLINGX_EVENTS.is_file():
        pytest.fail(f"the StarlingX catalogue is missing: expected it at {STARLINGX_EVENTS.resolve()}")
    return Catalogue.merge(Catalogue.load(STARLINGX_EVENTS), ROOST)


def _set(alarm_id: str, entity: str, severity: str, reason: str = "") -> SetRequest:
    return SetRequest(alarm_id=alarm_id, entity_instance_id=entity, severity=Severity(severity), reason_text=reason)


def _raise(catalogue: Catalogue, alarm_id: str, entity: str, severity: str, reason: str = "") -> Alarm:
    outcome = decide_set(None, _set(alarm_id, entity, severity, reason), catalogue, NOW)
    assert outcome.change is Change.RAISED
    return outcome.alarm


# -- entity instance ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "segments"), [
    ("host=controller-0", (("host", "controller-0"),)),
    ("host=controller-0.port=eth0", (("host", "controller-0"), ("port", "eth0"))),
    ("host=controller-0.filesystem=/scratch", (("host", "controller-0"), ("filesystem", "/scratch"))),
    ("host=controller-0.ntp=10.0.0.1", (("host", "controller-0"), ("ntp", "10.0.0.1"))),
    ("system=x.alarm=950.001", (("system", "x"), ("alarm", "950.001"))),
    ("service_domain=controller.service_group=oam-services",
     (("service_domain", "controller"), ("service_group", "oam-services"))),
])
def test_entity_ids_parse_and_print_back(text: str, segments: tuple[tuple[str, str], ...]) -> None:
    entity = EntityInstanceId.parse(text)
    assert entity.segments == segments
    assert str(entity) == text


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("host", "is not key=value"),
    ("host=", "empty value"),
    ("=controller-0", "empty key"),
    ("host=controller-0.", "stray dot"),
    (".host=controller-0", "stray dot"),
    ("host=controller-0..port=eth0", "stray dot"),
    ("host=controller-0.eth0", "is not key=value"),
    ("host=a=b", "two '='"),
    ("ho st=a", "key 'ho st'"),
    ("host= a", "surrounding spaces"),
    ("host=a\nb", "control character"),
    ("host=" + "x" * 300, "longer than 255"),
])
def test_malformed_entity_ids_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(MalformedEntityId, match=message):
        EntityInstanceId.parse(text)
    with pytest.raises(ValidationError, match=message):
        _set("950.002", text, "critical")


def test_prefix_is_by_whole_segments() -> None:
    c1 = EntityInstanceId.parse("host=controller-1")
    assert c1.is_prefix_of(EntityInstanceId.parse("host=controller-1.port=eth0"))
    assert c1.is_prefix_of(c1)
    assert not c1.is_prefix_of(EntityInstanceId.parse("host=controller-10"))
    assert not c1.is_prefix_of(EntityInstanceId.parse("host=controller-10.port=eth0"))
    assert not EntityInstanceId.parse("host=controller-1.port=eth0").is_prefix_of(c1)
    assert c1.matches(EntityInstanceId.parse("host=controller-1.port=eth0"), prefix=True)
    assert not c1.matches(EntityInstanceId.parse("host=controller-1.port=eth0"))
    assert EntityInstanceId.parse("host=controller-1.port=eth0").entity_type_id == "host.port"
    assert EntityInstanceId.parse("host=controller-1.port=eth0").parent == c1
    assert c1.parent is None


KEYS = st.sampled_from(["host", "port", "network", "sensor", "subcloud", "interface"])
VALUES = st.one_of(st.sampled_from(["controller-0", "controller-1", "controller-10", "controller-1-a", "eth0",
                                    "mgmt", "oam", "1", "10"]),
                   st.from_regex(r"[a-z0-9][a-z0-9_/-]{0,8}", fullmatch=True))
ENTITIES = st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=4).map(
    lambda segs: EntityInstanceId(tuple(segs)))


@PROPERTY
@given(ENTITIES)
def test_any_entity_prints_and_parses_back(entity: EntityInstanceId) -> None:
    assert EntityInstanceId.parse(str(entity)) == entity


@PROPERTY
@given(ENTITIES, ENTITIES)
def test_an_exact_match_is_a_match_of_the_texts(a: EntityInstanceId, b: EntityInstanceId) -> None:
    """decide_clear compares the texts of an exact clear: the printed text is canonical."""
    assert str(EntityInstanceId.parse(str(a))) == str(a)
    assert (str(a) == str(b)) == a.matches(b) == (EntityInstanceId.parse(str(a)) == EntityInstanceId.parse(str(b)))


@PROPERTY
@given(ENTITIES, ENTITIES)
def test_prefix_matching_is_segment_wise(a: EntityInstanceId, b: EntityInstanceId) -> None:
    text_a, text_b = str(a), str(b)
    # a string prefix counts only when it ends on a segment boundary
    assert a.is_prefix_of(b) == (text_b == text_a or text_b.startswith(text_a + "."))
    assert a.is_prefix_of(b) == (b.segments[:len(a.segments)] == a.segments)
    if a.is_prefix_of(b) and b.is_prefix_of(a):
        assert a == b


# -- set --------------------------------------------------------------------------------------------------


def test_raise_starlingx_alarms(catalogue: Catalogue) -> None:
    cpu = _raise(catalogue, "100.101", "host=controller-0", "major", "Platform CPU threshold exceeded; 91%")
    assert (cpu.alarm_id, cpu.severity, cpu.alarm_state) == ("100.101", Severity.MAJOR, AlarmState.SET)
    assert cpu.entity_type_id == "host"
    assert cpu.mgmt_affecting and not cpu.degrade_affecting        # thresholds: mgmt major, degrade critical
    assert cpu.alarm_type is AlarmType.OPERATIONAL_VIOLATION and cpu.probable_cause == "threshold-crossed"
    assert cpu.suppression and not cpu.inhibit_alarms and not cpu.service_affecting
    assert cpu.proposed_repair_action.startswith("Monitor")
    assert cpu.created_at == cpu.updated_at == cpu.timestamp == NOW
    critical = _raise(catalogue, "100.101", "host=controller-0", "critical")
    assert critical.mgmt_affecting and critical.degrade_affecting

    locked = _raise(catalogue, "200.001", "host=compute-3", "warning")
    assert locked.inhibit_alarms and not locked.suppression and locked.service_affecting

    bmc = decide_set(None, SetRequest(alarm_id=200.01, entity_instance_id="host=compute-3",
                                      severity=Severity.WARNING), catalogue, NOW).alarm
    assert bmc.alarm_id == "200.010"
    assert not bmc.mgmt_affecting                       # Management_Affecting_Severity: none

    ntp = _raise(catalogue, "100.114", "host=controller-0.ntp=10.0.0.1", "minor")
    assert ntp.entity_type_id == "host.ntp"

    long_action = next(d for d in catalogue.alarms()
                       if len(d.proposed_repair_action.for_severity(d.severities[0]) or "") > REASON_MAX)
    cut = _raise(catalogue, long_action.id, "host=controller-0", long_action.severities[0].value)
    assert len(cut.proposed_repair_action) == REASON_MAX and cut.proposed_repair_action.endswith("…")


def test_bad_sets_are_refused_clearly(catalogue: Catalogue) -> None:
    with pytest.raises(UnknownAlarmId, match=r"unknown alarm id '999\.999'"):
        decide_set(None, _set("999.999", "host=controller-0", "major"), catalogue, NOW)
    with pytest.raises(InvalidSeverity, match=r"alarm 200\.010 may be raised as warning, not critical"):
        decide_set(None, _set("200.010", "host=controller-0", "critical"), catalogue, NOW)
    with pytest.raises(NotAnAlarm):
        decide_set(None, _set("200.020", "host=controller-0", "warning"), catalogue, NOW)
    with pytest.raises(ValidationError, match="at most 255 characters"):
        _set("950.002", "host=controller-0", "critical", "x" * (REASON_MAX + 1))
    with pytest.raises(ValidationError, match="severity"):
        SetRequest(alarm_id="950.002", entity_instance_id="host=c", severity="fatal")
    with pytest.raises(ValidationError, match="malformed alarm id"):
        _set("950-002", "host=c", "critical")
    with pytest.raises(AlarmError, match="alarm_type"):
        decide_set(None, SetRequest(alarm_id="950.002", entity_instance_id="host=c", severity=Severity.CRITICAL,
                                    alarm_type=AlarmType.QOS), catalogue, NOW)
    with pytest.raises(ValueError, match="timezone"):
        decide_set(None, _set("950.002", "host=c", "critical"), catalogue, datetime(2026, 1, 1))
    current = _raise(catalogue, "950.002", "host=a", "critical")
    with pytest.raises(ValueError, match="not the one requested"):
        decide_set(current, _set("950.002", "host=b", "critical"), catalogue, NOW)
    cleared = current.model_copy(update={"alarm_state": AlarmState.CLEAR})
    with pytest.raises(ValueError, match="is clear, not an active alarm"):
        decide_set(cleared, _set("950.002", "host=a", "critical"), catalogue, NOW)


def test_customer_logs_are_checked(catalogue: Catalogue) -> None:
    lock = LogRequest(log_id="950.503", entity_instance_id="host=controller-1", severity=Severity.WARNING,
                      reason_text="admin locked controller-1: ok")
    assert check_log(lock, catalogue).id == "950.503"
    with pytest.raises(InvalidSeverity, match=r"log 950\.503 is recorded as warning, not critical"):
        check_log(lock.model_copy(update={"severity": Severity.CRITICAL}), catalogue)
    with pytest.raises(AlarmError, match="is an alarm, not a customer log"):
        check_log(LogRequest(log_id="950.001", entity_instance_id="host=c", severity=Severity.WARNING), catalogue)
    with pytest.raises(UnknownAlarmId):
        check_log(LogRequest(log_id="950.999", entity_instance_id="host=c", severity=Severity.WARNING), catalogue)


def test_reset_keeps_the_uuid_and_records_the_change(catalogue: Catalogue) -> None:
    first = _raise(catalogue, "100.101", "host=controller-0", "major", "91%")
    later = NOW + timedelta(minutes=5)
    same = decide_set(first, _set("100.101", "host=controller-0", "major", "91%"), catalogue, later)
    assert same.change is Change.UNCHANGED and same.alarm is first and not same.writes

    worse = decide_set(first, _set("100.101", "host=controller-0", "critical", "96%"), catalogue, later)
    assert worse.change is Change.CHANGED and worse.writes and worse.previous == first
    assert worse.alarm.uuid == first.uuid and worse.alarm.created_at == NOW
    assert worse.alarm.updated_at == worse.alarm.timestamp == later
    assert worse.alarm.degrade_affecting and not first.degrade_affecting
    assert worse.changes == (FieldChange("severity", "major", "critical"), FieldChange("reason_text", "91%", "96%"))

    reworded = decide_set(worse.alarm, _set("100.101", "host=controller-0", "critical", "97%"), catalogue, later)
    assert reworded.changes == (FieldChange("reason_text", "96%", "97%"),)


REQUESTS = st.builds(
    lambda d, entity, reason, data: SetRequest(alarm_id=d.id, entity_instance_id=str(entity),
                                               severity=data.draw(st.sampled_from(d.severities)),
                                               reason_text=reason),
    st.sampled_from(list(ROOST.alarms())), ENTITIES, st.sampled_from(["", "down", "still down"]), st.data())


@PROPERTY
@given(REQUESTS)
def test_set_is_idempotent(request: SetRequest) -> None:
    first = decide_set(None, request, ROOST, NOW)
    assert first.change is Change.RAISED
    again = decide_set(first.alarm, request, ROOST, NOW + timedelta(seconds=1))
    assert again.change is Change.UNCHANGED and again.alarm == first.alarm


# -- clear ------------------------------------------------------------------------------------------------


def test_clear_is_exact_unless_a_prefix_is_asked_for() -> None:
    active = [_raise(ROOST, "950.002", e, "critical") for e in
              ("host=controller-1", "host=controller-10", "host=controller-1.network=mgmt")]
    active.append(_raise(ROOST, "950.003", "host=controller-1.network=mgmt", "major"))
    exact = decide_clear(active, ClearRequest(alarm_id="950.002", entity_instance_id="host=controller-1"), ROOST)
    assert [a.entity_instance_id for a in exact.cleared] == ["host=controller-1"]
    tree = decide_clear(active, ClearRequest(alarm_id="950.002", entity_instance_id="host=controller-1",
                                             prefix=True), ROOST)
    assert [a.entity_instance_id for a in tree.cleared] == ["host=controller-1", "host=controller-1.network=mgmt"]
    host_deleted = decide_clear(active, ClearRequest(entity_instance_id="host=controller-1", prefix=True), ROOST)
    assert {a.key for a in host_deleted.cleared} == {a.key for a in active} - {
        AlarmKey("950.002", "host=controller-10")}
    nothing = decide_clear(active, ClearRequest(alarm_id="950.002", entity_instance_id="host=controller-2"), ROOST)
    assert not nothing.found
    with pytest.raises(UnknownAlarmId):
        decide_clear(active, ClearRequest(alarm_id="999.001", entity_instance_id="host=controller-1"), ROOST)


ALARMS = st.lists(REQUESTS, max_size=12).map(
    lambda reqs: list({r.key: decide_set(None, r, ROOST, NOW).alarm for r in reqs}.values()))


def _target(data: st.DataObject, active: list[Alarm]) -> EntityInstanceId:
    """An entity to clear: often one of the active alarms' (or a prefix of it), else any."""
    from_active: bool = data.draw(st.booleans())
    if active and from_active:
        entity = data.draw(st.sampled_from(active)).entity
        return EntityInstanceId(entity.segments[:data.draw(st.integers(1, len(entity.segments)))])
    return data.draw(ENTITIES)


@PROPERTY
@given(ALARMS, st.sampled_from([d.id for d in ROOST.alarms()]), st.data())
def test_exact_clear_never_touches_another_entity(active: list[Alarm], alarm_id: str, data: st.DataObject) -> None:
    entity = _target(data, active)
    same_id: bool = data.draw(st.booleans())
    if active and same_id:
        alarm_id = data.draw(st.sampled_from(active)).alarm_id
    outcome = decide_clear(active, ClearRequest(alarm_id=alarm_id, entity_instance_id=str(entity)), ROOST)
    assert all(a.key == (alarm_id, str(entity)) for a in outcome.cleared)
    assert len(outcome.cleared) == sum(a.key == (alarm_id, str(entity)) for a in active)
    everything = decide_clear(active, ClearRequest(entity_instance_id=str(entity)), ROOST)
    assert all(a.entity_instance_id == str(entity) for a in everything.cleared)


@PROPERTY
@given(ALARMS, st.data())
def test_prefix_clear_takes_exactly_the_entity_tree(active: list[Alarm], data: st.DataObject) -> None:
    entity = _target(data, active)
    outcome = decide_clear(active, ClearRequest(entity_instance_id=str(entity), prefix=True), ROOST)
    expected = {a.key for a in active
                if a.entity_instance_id == str(entity) or a.entity_instance_id.startswith(f"{entity}.")}
    assert {a.key for a in outcome.cleared} == expected


# -- re-assertion -----------------------------------------------------------------------------------------


def _owned(owner: str) -> st.SearchStrategy[list[SetRequest]]:
    """Requests on entities under host=<owner>-<n>, so each owner has its own entities."""
    def rooted(request: SetRequest, n: int) -> SetRequest:
        return request.model_copy(update={"entity_instance_id": f"host={owner}-{n}.{request.entity_instance_id}"})
    return st.lists(st.builds(rooted, REQUESTS, st.integers(0, 2)), max_size=8).map(
        lambda reqs: list({r.key: r for r in reqs}.values()))


@settings(PROPERTY, max_examples=150)
@given(_owned("a"), _owned("a"), _owned("b"))
def test_reassert_makes_the_owner_s_alarms_the_asserted_set(before_a: list[SetRequest], asserted: list[SetRequest],
                                                             before_b: list[SetRequest]) -> None:
    world: dict[AlarmKey, tuple[str, Alarm]] = {}
    for owner, requests in (("a", before_a), ("b", before_b)):
        for r in requests:
            world[r.key] = (owner, decide_set(None, r, ROOST, NOW).alarm)
    others_before = {k: v for k, v in world.items() if v[0] != "a"}
    current_a = [alarm for owner, alarm in world.values() if owner == "a"]

    to_set, to_clear = decide_reassert(current_a, asserted, ROOST)
    later = NOW + timedelta(seconds=30)
    for key in to_clear:
        assert world.pop(key)[0] == "a"
    for r in to_set:
        held = world.get(r.key)
        outcome = decide_set(held[1] if held else None, r, ROOST, later)
        assert outcome.writes
        world[r.key] = ("a", outcome.alarm)

    mine = {k: (alarm.severity, alarm.reason_text) for k, (owner, alarm) in world.items() if owner == "a"}
    assert mine == {r.key: (r.severity, r.reason_text) for r in asserted}
    assert {k: v for k, v in world.items() if v[0] != "a"} == others_before
    kept = {a.key: a.uuid for a in current_a}
    assert all(world[k][1].uuid == u for k, u in kept.items() if k in world)
    # asserting the same set again does nothing
    again = decide_reassert([alarm for owner, alarm in world.values() if owner == "a"], asserted, ROOST)
    assert again.to_set == () and again.to_clear == ()


def test_reassert_checks_everything_first() -> None:
    good = _set("950.002", "host=a", "critical")
    with pytest.raises(InvalidSeverity):
        decide_reassert([], [good, _set("950.001", "host=b", "critical")], ROOST)
    with pytest.raises(AlarmError, match="asserted twice"):
        decide_reassert([], [good, _set("950.002", "host=a", "critical", "other words")], ROOST)


# -- suppression ------------------------------------------------------------------------------------------


def test_host_locked_masks_its_suppressible_alarms_and_its_children(catalogue: Catalogue) -> None:
    locked = _raise(ROOST, "950.001", "host=controller-1", "warning")
    failed = _raise(ROOST, "950.002", "host=controller-1", "critical")
    path = _raise(ROOST, "950.003", "host=controller-1.network=mgmt", "major")
    neighbour = _raise(ROOST, "950.002", "host=controller-10", "critical")
    split = _raise(ROOST, "950.007", "system=roost", "critical")
    active = [locked, failed, path, neighbour, split]

    assert masked_keys(active, ROOST) == {failed.key, path.key}
    assert masked(failed, active, ROOST) and masked(path, active, ROOST)
    assert not masked(neighbour, active, ROOST)         # controller-10 is not under controller-1
    assert not masked(locked, active, ROOST)            # the inhibitor is not suppressible
    assert not masked(split, active, ROOST)
    # clearing the lock unmasks them
    unlocked = [a for a in active if a is not locked]
    assert masked_keys(unlocked, ROOST) == frozenset()
    assert visible(active, ROOST, ()) == [locked, neighbour, split]
    assert visible(active, ROOST, (), include_masked=True) == active
    # StarlingX's own: 200.001 masks 100.101 (suppressible) on the same host
    sx_locked = _raise(catalogue, "200.001", "host=compute-0", "warning")
    cpu = _raise(catalogue, "100.101", "host=compute-0", "major")
    assert masked(cpu, [sx_locked], catalogue)
    assert not masked(cpu, [], catalogue)
    # an inhibitor on a child does not mask its parent
    port_locked = _raise(ROOST, "950.001", "host=controller-2.port=eth0", "warning")
    parent = _raise(ROOST, "950.002", "host=controller-2", "critical")
    assert not masked(parent, [port_locked], ROOST)


def test_operator_suppression_hides_from_lists_unless_asked() -> None:
    failed = _raise(ROOST, "950.002", "host=controller-1", "critical")
    bmc = _raise(ROOST, "950.004", "host=controller-1.bmc=primary", "major")
    suppressed = {"950.004"}
    assert suppression_status("950.004", suppressed) is SuppressionStatus.SUPPRESSED
    assert suppression_status("950.002", suppressed) is SuppressionStatus.UNSUPPRESSED
    assert visible([failed, bmc], ROOST, suppressed) == [failed]
    assert visible([failed, bmc], ROOST, suppressed, include_suppress=True) == [failed, bmc]


def test_records_validate_like_fm() -> None:
    alarm = _raise(ROOST, "950.003", "host=controller-1.network=mgmt", "major", "mgmt path down")
    dumped = alarm.model_dump(mode="json")
    assert set(dumped) == {
        "uuid", "alarm_id", "alarm_state", "entity_type_id", "entity_instance_id", "timestamp", "severity",
        "reason_text", "alarm_type", "probable_cause", "proposed_repair_action", "service_affecting",
        "suppression", "inhibit_alarms", "mgmt_affecting", "degrade_affecting", "created_at", "updated_at"}
    assert Alarm.model_validate(dumped) == alarm
    assert isinstance(alarm.uuid, uuid.UUID)
    with pytest.raises(ValidationError, match="Extra inputs"):
        Alarm.model_validate({**dumped, "masked": True})
    with pytest.raises(ValidationError, match="timezone"):
        Alarm.model_validate({**dumped, "timestamp": "2026-01-01T00:00:00"})


def test_a_parsed_entity_id_is_remembered_and_a_malformed_one_refused_every_time() -> None:
    text = "host=cache-1.port=eth0"
    first = EntityInstanceId.parse(text)
    assert EntityInstanceId.parse(text) is first             # parsed once
    assert first.entity_type_id == "host.port" and str(first) == text
    for _ in range(2):
        with pytest.raises(MalformedEntityId):
            EntityInstanceId.parse("host=cache-1..port=eth0")
    with pytest.raises(MalformedEntityId):
        EntityInstanceId.parse(["host=x"])                  # type: ignore[arg-type]
